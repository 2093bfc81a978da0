"""Group 3, where the metrics listen: a server started with --metrics-host 127.0.0.1 listens there only."""

from __future__ import annotations

import contextlib
from pathlib import Path

from loadtest.attack.context import Ctx
from loadtest.attack.core import FAIL, Line, check, judge


def listening(pid: int, port: int) -> list[str]:
    """Addresses process `pid` listens on at `port` (psutil, else /proc/net/tcp*)."""
    import psutil

    try:
        conns = psutil.Process(pid).net_connections(kind="inet")
        return sorted({c.laddr.ip for c in conns if c.status == psutil.CONN_LISTEN and c.laddr.port == port})
    except (psutil.Error, AttributeError):
        found = set()
        for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
            with contextlib.suppress(OSError):
                for row in Path(table).read_text().splitlines()[1:]:
                    local, state = row.split()[1], row.split()[3]
                    address, hexport = local.split(":")
                    if state == "0A" and int(hexport, 16) == port:
                        found.add("0.0.0.0" if set(address) == {"0"} and width == 8 else address)
        return sorted(found)


@check(
    "metrics-bind",
    "3 idle and slow clients",
    "a server started with --host 127.0.0.1 --metrics-host 127.0.0.1; its listening sockets read with psutil",
    "the metrics port listens on 127.0.0.1 only (not 0.0.0.0 or ::)",
    quick=True,
    timeout_s=60,
    estimate_s=3,
)
def check_metrics_bind(ctx: Ctx) -> list[Line]:
    sent = "mnist-serve --host 127.0.0.1 --metrics-host 127.0.0.1"
    if not ctx.has_flag("--metrics-host"):
        server = ctx.server("shared")  # still say where the metrics listen without the flag
        where = listening(server.pid, server.metrics_port)
        return [
            Line(
                "metrics-bind",
                FAIL,
                sent,
                f"without the flag, metrics listen on {', '.join(where) or '?'}",
                "127.0.0.1 only",
                "flag missing: --metrics-host",
            )
        ]
    server = ctx.server("metrics-bind", ["--metrics-host", "127.0.0.1"])
    where = listening(server.pid, server.metrics_port)
    grpc_where = listening(server.pid, server.port)
    ok = where == ["127.0.0.1"]
    measured = f"metrics listen on {', '.join(where) or 'nothing'}; gRPC on {', '.join(grpc_where) or 'nothing'}"
    return [judge("metrics-bind", ok, sent, measured, "127.0.0.1 only", f"metrics listen on {where}")]
