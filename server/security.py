"""TLS and bearer tokens, the same for every port the server opens: gRPC, the HTTP API and /metrics.

TLS (`--tls-cert`, `--tls-key`, PEM files): every port is served over TLS 1.2+ with that certificate
chain; `--tls-client-ca` also requires every client to present a certificate signed by that CA (mTLS).
`grpc_server_credentials(config)` is the gRPC port's; `http_ssl_context(config)` the HTTP servers'.

Tokens (`--auth-tokens-file`): one token per line, optionally followed by its scopes, comma-separated:
`infer` (every call of the model: Classify, reading, the Open Inference Protocol, reflection, /metrics) and
`feedback` (the Feedback call: labels that train the next version, so not every client may send them). A token
with no scopes has `infer` only. Blank lines and lines starting with `#` are ignored. A token is RFC 6750
`b64token` characters (letters, digits, `-._~+/`, trailing `=`), e.g. `openssl rand -hex 32`. Clients send the header
`authorization: Bearer <token>`. `TokenChecker.check` compares the SHA-256 of what was sent with that of
every accepted token with `hmac.compare_digest`, always all of them: neither the time taken nor an early
exit tells which token matched or how long the accepted ones are. No header, or one not of the form
`Bearer <token>`: `Unauthenticated` (gRPC UNAUTHENTICATED, HTTP 401 with `WWW-Authenticate: Bearer`);
a well-formed token that is not accepted, or lacks the call's scope: `PermissionDenied` (PERMISSION_DENIED,
HTTP 403).
The file is read once at start (a restart picks up a rotated file).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import ssl
import stat
import urllib.parse
from collections.abc import Iterable
from http import HTTPStatus
from pathlib import Path
from typing import Any

from server.errors import AuthRefused, PermissionDenied, Unauthenticated

log = logging.getLogger("mnist.security")

AUTHORIZATION = "authorization"  # gRPC metadata key (lower case) and HTTP header name
REALM = "mnist-serve"
MIN_TOKEN_CHARS = 16  # shorter tokens are accepted with a warning: they can be guessed
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
INFER, FEEDBACK = "infer", "feedback"
SCOPES = (INFER, FEEDBACK)
METHOD_SCOPES = {"Feedback": FEEDBACK}  # every other call (gRPC method or REST route name) needs INFER


def scope_of(method: str) -> str:
    """The scope a call needs, by its gRPC method or REST route name."""
    return METHOD_SCOPES.get(method, INFER)


# --- tokens ------------------------------------------------------------------------------------------


def read_tokens(path: str | os.PathLike) -> list[str]:
    """The tokens in `path` (see read_token_scopes)."""
    return [token for token, _ in read_token_scopes(path)]


def read_token_scopes(path: str | os.PathLike) -> list[tuple[str, frozenset[str]]]:
    """The tokens in `path` and their scopes; ValueError naming the file and line when it holds none or a malformed
    one."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"auth tokens file {path}: cannot read: {exc}") from None
    tokens = []
    for number, line in enumerate(text.splitlines(), 1):
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        token = words[0]
        if not _B64TOKEN.fullmatch(token) or len(words) > 2:
            raise ValueError(
                f"auth tokens file {path}, line {number}: a line is a token (letters, digits and -._~+/, trailing = "
                f"allowed), then optionally its scopes, comma-separated ({', '.join(SCOPES)}); no quotes or names"
            )
        scopes = frozenset(words[1].split(",")) if len(words) == 2 else frozenset({INFER})
        if unknown := sorted(scopes - set(SCOPES)):
            raise ValueError(
                f"auth tokens file {path}, line {number}: unknown scope {', '.join(unknown)} (scopes: "
                f"{', '.join(SCOPES)})"
            )
        tokens.append((token, scopes))
    if not tokens:
        raise ValueError(f"auth tokens file {path} holds no token (only blank or # comment lines): nobody could call")
    return tokens


class TokenChecker:
    """Accepts `authorization: Bearer <token>` for any of `tokens` that has the call's scope; see the module
    docstring. A token given alone has the scope `infer`; (token, scopes) pairs say theirs."""

    def __init__(self, tokens: Iterable[str | tuple[str, Iterable[str]]]) -> None:
        pairs = [(t, frozenset({INFER})) if isinstance(t, str) else (t[0], frozenset(t[1])) for t in tokens]
        self._digests = [(_digest(token), scopes) for token, scopes in pairs]
        if not self._digests:
            raise ValueError("TokenChecker needs at least one token")

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> TokenChecker:
        """Load `path` (see read_token_scopes); warn when others may read it or a token is short."""
        tokens = read_token_scopes(path)
        mode = os.stat(path).st_mode
        if mode & stat.S_IROTH:
            log.warning("auth tokens file %s is readable by every user (mode %o): chmod o-r it", path, mode & 0o777)
        short = sum(len(token) < MIN_TOKEN_CHARS for token, _ in tokens)
        if short:
            log.warning("auth tokens file %s: %d token(s) shorter than %d characters", path, short, MIN_TOKEN_CHARS)
        feedback = sum(FEEDBACK in scopes for _, scopes in tokens)
        log.info("bearer tokens required: %d accepted (%d may send feedback), from %s", len(tokens), feedback, path)
        return cls(tokens)

    def __len__(self) -> int:
        return len(self._digests)

    def check(self, authorization: str | None, scope: str = INFER) -> None:
        """Return if `authorization` (the header's value, None when absent) carries an accepted token with `scope`,
        else raise Unauthenticated (missing or malformed) or PermissionDenied (not accepted, or without the scope)."""
        if authorization is None or not authorization.strip():
            raise Unauthenticated("missing credentials: send the header 'authorization: Bearer <token>'", "missing")
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or any(c.isspace() for c in token):
            raise Unauthenticated(
                "malformed authorization header: expected 'Bearer <token>' (one token, no other scheme)", "malformed"
            )
        sent = _digest(token)
        accepted, scoped = False, False
        for digest, scopes in self._digests:  # every one, no early exit
            match = hmac.compare_digest(sent, digest)
            accepted |= match
            scoped |= match and scope in scopes
        if not accepted:
            raise PermissionDenied("the bearer token is not accepted by this server")
        if not scoped:
            raise PermissionDenied(f"the bearer token lacks the scope {scope!r} this call needs (--auth-tokens-file)")


def redact_url(url: str) -> str:
    """`url` with its password (in the user info or a `password=` parameter) replaced by ***."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return re.sub(r"//[^/@]*@", "//***@", url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, hostinfo = netloc.rsplit("@", 1)
        if ":" in userinfo:
            netloc = f"{userinfo.split(':', 1)[0]}:***@{hostinfo}"
    query = re.sub(r"(?i)(^|&)(password=)[^&]*", r"\1\2***", parts.query)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc, query=query))


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def load_token_checker(config: Any) -> TokenChecker | None:
    """The checker for `config.auth_tokens_file`, or None when no tokens are configured (calls are not checked)."""
    return TokenChecker.from_file(config.auth_tokens_file) if config.auth_tokens_file else None


def grpc_authorization(metadata: Iterable[Any] | None) -> str | None:
    """The `authorization` value of gRPC invocation metadata; repeated ones joined with ", " (hence malformed)."""
    values = [value for key, value in (metadata or ()) if key == AUTHORIZATION]
    if not values:
        return None
    return ", ".join(value.decode("latin-1") if isinstance(value, bytes) else value for value in values)


def http_refusal(error: AuthRefused) -> tuple[HTTPStatus, dict[str, str]]:
    """The HTTP status and headers for a refused request: 401 + WWW-Authenticate, or 403."""
    if isinstance(error, Unauthenticated):
        challenge = f'Bearer realm="{REALM}"'
        if error.reason == "malformed":
            challenge += ', error="invalid_request"'
        return HTTPStatus.UNAUTHORIZED, {"WWW-Authenticate": challenge}
    return HTTPStatus.FORBIDDEN, {}


# --- TLS ---------------------------------------------------------------------------------------------


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"{what} {path}: cannot read: {exc.strerror or exc}") from None


def tls_enabled(config: Any) -> bool:
    return bool(getattr(config, "tls_cert", ""))


def grpc_server_credentials(config: Any):
    """grpc.ServerCredentials for `config.tls_cert/tls_key` (client certificates required when
    `config.tls_client_ca` is set), or None when TLS is off (the port is plaintext)."""
    if not tls_enabled(config):
        return None
    import grpc  # here: the HTTP servers use this module without needing gRPC loaded

    chain, key = _read(config.tls_cert, "TLS certificate"), _read(config.tls_key, "TLS key")
    client_ca = _read(config.tls_client_ca, "TLS client CA") if config.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def peer_channel_credentials(config: Any):
    """grpc.ChannelCredentials for calls to the fleet's other replicas (--feedback-peers): TLS trusting
    `config.feedback_peers_ca` when this server speaks TLS (so do they), else None (plaintext)."""
    if not tls_enabled(config):
        return None
    import grpc

    return grpc.ssl_channel_credentials(root_certificates=_read(config.feedback_peers_ca, "feedback peers CA"))


def http_ssl_context(config: Any) -> ssl.SSLContext | None:
    """A server-side SSLContext for the HTTP servers (REST API, /metrics) with the same certificate and client
    policy as gRPC, or None when TLS is off. ValueError naming the file when the material does not load."""
    if not tls_enabled(config):
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(config.tls_cert, config.tls_key)
    except FileNotFoundError as exc:
        raise ValueError(f"TLS certificate or key: {exc.filename}: no such file") from None
    except (ssl.SSLError, OSError) as exc:
        raise ValueError(
            f"TLS certificate {config.tls_cert} with key {config.tls_key}: cannot load ({exc}); both must be PEM, "
            "the key unencrypted and matching the certificate"
        ) from None
    if config.tls_client_ca:
        try:
            context.load_verify_locations(cafile=config.tls_client_ca)
        except (ssl.SSLError, OSError) as exc:
            raise ValueError(f"TLS client CA {config.tls_client_ca}: cannot load ({exc}); expected PEM") from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def describe(config: Any) -> str:
    """For the start-up log: what protects the ports, e.g. "TLS; bearer tokens required except by health"."""
    if tls_enabled(config):
        text = "mTLS (TLS, client certificates required)" if config.tls_client_ca else "TLS"
    else:
        text = "plaintext"
    if config.auth_tokens_file:
        exempt = "health" if config.metrics_auth == "on" else "health and /metrics"
        text += f"; bearer tokens required except by {exempt}"
    return text
