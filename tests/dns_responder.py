"""A DNS server for one test: answers A queries for any name with the addresses it is given now, over UDP on
loopback. gRPC's own DNS resolver can be pointed at it (`dns://127.0.0.1:PORT/NAME:GRPC_PORT`), so a test can add a
replica to a name as Kubernetes adds a pod to a headless Service, without a network or a real DNS server."""

from __future__ import annotations

import socket
import struct
import threading

A, IN = 1, 1
TTL_S = 1


class DnsResponder:
    """`addresses`: the IPv4 addresses every A query gets now (replace the list to change the answer)."""

    def __init__(self, addresses: list[str]) -> None:
        self.addresses = list(addresses)
        self.queries = 0
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.settimeout(0.2)  # the thread looks at _stop this often
        self._stop = threading.Event()
        self.port = self._sock.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> DnsResponder:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                query, peer = self._sock.recvfrom(512)
                self._sock.sendto(self.answer(query), peer)
            except TimeoutError:
                continue
            except OSError:
                return
            except (ValueError, struct.error, IndexError):
                continue  # not a query we can read: no answer, the resolver asks again

    def answer(self, query: bytes) -> bytes:
        """The response to one query: A records for an A question, no record (NODATA) for any other type."""
        (ident,) = struct.unpack_from(">H", query, 0)
        end = 12
        while query[end]:  # the question's name: length-prefixed labels up to a zero byte
            end += 1 + query[end]
        qtype, _qclass = struct.unpack_from(">HH", query, end + 1)
        question = query[12 : end + 5]
        records = self.addresses if qtype == A else []
        self.queries += 1
        header = struct.pack(">HHHHHH", ident, 0x8180, 1, len(records), 0, 0)  # a response, recursion available
        answers = b"".join(
            struct.pack(">HHHIH", 0xC00C, A, IN, TTL_S, 4) + socket.inet_aton(address) for address in records
        )
        return header + question + answers
