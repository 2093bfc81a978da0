"""`python -m server.livez_probe`: GET /livez of the mnist-serve in this container; exit 0 if alive, else 1.

The image's HEALTHCHECK. It reads the server's own MNIST_SERVE_* variables to find the metrics port and
whether it speaks TLS, and MNIST_TLS_CERT / MNIST_TLS_KEY (as mnist-classify does) for a client certificate
when the port requires one (mTLS). The server's certificate is not verified: the probe sends nothing secret
and asks only whether the local process answers, as the kubelet's HTTPS probes do.
"""

from __future__ import annotations

import argparse
import os
import ssl
import sys
import urllib.error
import urllib.request

from server.config import ENV_PREFIX, ServeConfig

WILDCARDS = ("", "::", "[::]", "0.0.0.0")


def livez_url(environ: dict[str, str]) -> str:
    """Where the server configured by `environ` serves /livez (ValueError when its metrics port is off)."""
    port = int(environ.get(ENV_PREFIX + "METRICS_PORT", ServeConfig.metrics_port))
    if not port:
        raise ValueError(f"{ENV_PREFIX}METRICS_PORT is 0: there is no /livez (use mnist-classify --health instead)")
    host = environ.get(ENV_PREFIX + "METRICS_HOST") or environ.get(ENV_PREFIX + "HOST", ServeConfig.host)
    host = "localhost" if host in WILDCARDS else host
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    scheme = "https" if environ.get(ENV_PREFIX + "TLS_CERT") else "http"
    return f"{scheme}://{host}:{port}/livez"


def client_context(environ: dict[str, str]) -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if environ.get("MNIST_TLS_CERT") and environ.get("MNIST_TLS_KEY"):
        context.load_cert_chain(environ["MNIST_TLS_CERT"], environ["MNIST_TLS_KEY"])
    return context


def main(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> int:
    environ = dict(os.environ if environ is None else environ)
    parser = argparse.ArgumentParser(prog="python -m server.livez_probe", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--url", help="instead of the one the MNIST_SERVE_* variables give, e.g. http://[::1]:9464/livez"
    )
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for the answer")
    args = parser.parse_args(argv)
    try:
        url = args.url or livez_url(environ)
    except ValueError as exc:
        print(f"livez: {exc}", file=sys.stderr)
        return 1
    try:
        context = client_context(environ) if url.startswith("https:") else None
        with urllib.request.urlopen(url, timeout=args.timeout, context=context) as reply:  # noqa: S310 - our URL
            print(f"{url}: {reply.status} {reply.read().decode(errors='replace').strip()}")
            return 0
    except urllib.error.HTTPError as err:
        print(f"{url}: {err.code} {err.read().decode(errors='replace').strip()}")
    except (OSError, ValueError) as exc:
        print(f"{url}: {type(exc).__name__}: {exc}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
