"""The last step of a graceful shutdown: cut the gRPC port's TCP connections, so no call is left to be CANCELLED.

gRPC's own shutdown sends GOAWAY and, at the same moment, kills the calls its core has received but
not yet handed to the application: their clients see CANCELLED, which they must not retry. Once
every call we were given is answered, shutting the port's sockets down first makes those late calls
fail as a lost connection (UNAVAILABLE, which clients retry elsewhere) instead. Linux only (/proc);
elsewhere nothing is cut and gRPC's shutdown behaves as it always does.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
from pathlib import Path

log = logging.getLogger("mnist.sockets")
SOCKET_LINK = re.compile(r"socket:\[(\d+)\]")


def _inodes_on_port(port: int) -> set[str]:
    """Inodes of this host's TCP sockets on local port `port`: the listener too, or a client reconnecting
    in the last moment would send calls into the shutdown (gRPC then logs "Closing acceptor": expected)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if len(fields) > 9 and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(fields[9])
    return inodes


def cut_connections(port: int) -> int:
    """Shut down (not close: gRPC still owns them) this process's sockets on `port`; returns how many."""
    inodes = _inodes_on_port(port)
    cut = 0
    with contextlib.suppress(OSError):
        for fd_name in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError, ValueError):
                match = SOCKET_LINK.fullmatch(os.readlink(f"/proc/self/fd/{fd_name}"))
                if match and match.group(1) in inodes:
                    sock = socket.socket(fileno=int(fd_name))
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                        cut += 1
                    finally:
                        sock.detach()  # the descriptor stays gRPC's to close
    log.info("cut %d connection(s) on port %d before stopping gRPC", cut, port)
    return cut
