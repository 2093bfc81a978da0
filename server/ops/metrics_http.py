"""Prometheus /metrics over HTTP/1.1 that untrusted clients cannot tie up.

prometheus_client's `start_http_server` is a ThreadingHTTPServer: one thread per connection, a listen
backlog of 5 and no read timeouts, so a few hundred slow or idle connections hold as many threads
forever and Prometheus can no longer connect. `MetricsHttpServer` serves the same exposition from
asyncio streams on its own event loop in one daemon thread (so rendering never runs on the gRPC
server's loop), with a deadline for every request head, body and response write, an idle timeout
between keep-alive requests, a cap on open connections (the rest get a cheap 503) and a deep backlog.

With `ssl_context` (server/security.py's `http_ssl_context`: the gRPC port's certificate and
client-certificate
policy) it speaks HTTPS only; the handshake shares the request head's deadline. With `auth` (a TokenChecker),
GET /metrics needs `Authorization: Bearer <token>`: 401 with `WWW-Authenticate` without one, 403 for an unknown
one, each reported to `on_refused`.

With `liveness` / `readiness` (callables returning None when all is well, else what is wrong) it also serves
GET /livez and /readyz: 200 "ok", or 503 with the problem. They need no token (probes carry none) and are
answered on this server's own thread, so a backlog on the gRPC server's loop cannot delay them; the callables
are called on that thread and must only read state (never wait for the gRPC loop).
"""

from __future__ import annotations

import asyncio
import errno
import gzip
import logging
import os
import re
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from types import TracebackType
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder, gzip_accepted

from server.errors import AuthRefused
from server.security import TokenChecker, http_refusal

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024  # a body on GET is read and discarded up to this; more gets 413
MAX_HEADER_LINES = 100  # header lines beyond this get 431, whatever their size
LINGER_S = 1.0  # after a final response: how long to drain what the client still sends before closing
ALLOW = "GET, HEAD"

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VERSION = re.compile(rb"HTTP/([0-9])\.([0-9])")
_TARGET_BAD = re.compile(rb"[\x00-\x20\x7f]")
_NO_IPV6 = {errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT}
_INDEX = (
    b'<!DOCTYPE html><html><head><title>Metrics</title></head><body><a href="/metrics">/metrics</a></body></html>\n'
)
_BUSY = b"too many connections\n"
# Prebuilt so that turning a connection away costs one write and no formatting.
_RESPONSE_503 = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: %d\r\nRetry-After: 1\r\nConnection: close\r\n\r\n%s" % (len(_BUSY), _BUSY)
)


class _HttpError(Exception):
    """A request we answer with `status` and then close the connection: we cannot trust what follows it."""

    def __init__(self, status: HTTPStatus, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


class _ClientGone(Exception):
    """End of stream in the middle of a request head: nobody to answer."""


@dataclass
class _Request:
    method: str
    target: str
    version: tuple[int, int]
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "
    keep_alive: bool = True


@dataclass
class _Response:
    status: HTTPStatus
    headers: list[tuple[str, str]]
    body: bytes = b""


def _display(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def listen_sockets(
    host: str, port: int, backlog: int, purpose: str = "metrics HTTP", reuse_port: bool = False
) -> list[socket.socket]:
    """Bind and listen in the caller's thread, so that start() raises at once if the address is unusable.

    "::", "[::]" and "" mean every address, IPv6 and IPv4 on one dual-stack socket (IPv4 only where the
    host has no IPv6); a name such as "localhost" gets one socket per address it resolves to, all on one port.
    `reuse_port`: SO_REUSEPORT, so the workers of `mnist-serve --workers N` listen on one port and the kernel
    spreads connections among them.
    """
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        if bare in ("", "::"):
            if socket.has_dualstack_ipv6():
                try:
                    return [
                        socket.create_server(
                            ("::", port),
                            family=socket.AF_INET6,
                            backlog=backlog,
                            dualstack_ipv6=True,
                            reuse_port=reuse_port,
                        )
                    ]
                except OSError as exc:
                    if exc.errno not in _NO_IPV6:
                        raise
            return [
                socket.create_server(("0.0.0.0", port), family=socket.AF_INET, backlog=backlog, reuse_port=reuse_port)
            ]
        infos = socket.getaddrinfo(
            bare, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP, flags=socket.AI_PASSIVE
        )
        for attempt in range(5):  # port 0 and several addresses: the port picked for the first may be taken on another
            try:
                return _listen_all(infos, port, backlog, reuse_port)
            except OSError as exc:
                if port != 0 or exc.errno != errno.EADDRINUSE or attempt == 4:
                    raise
        raise AssertionError("unreachable")
    except OSError as exc:
        if exc.errno and exc.errno > 0 and not isinstance(exc, socket.gaierror):
            reason = os.strerror(exc.errno)  # create_server's own text repeats the address as a tuple
        else:
            reason = exc.strerror or str(exc)
        message = f"cannot listen for {purpose} on {_display(bare, port)}: {reason}"
        raise OSError(exc.errno, message) from exc


def _listen_all(infos: list, port: int, backlog: int, reuse_port: bool = False) -> list[socket.socket]:
    socks: list[socket.socket] = []
    seen: set[tuple] = set()
    try:
        for family, _, _, _, sockaddr in infos:
            if (family, sockaddr[0]) in seen:
                continue
            seen.add((family, sockaddr[0]))
            bound_port = socks[0].getsockname()[1] if socks else port
            address = (sockaddr[0], bound_port, *sockaddr[2:])
            try:
                socks.append(socket.create_server(address, family=family, backlog=backlog, reuse_port=reuse_port))
            except OSError as exc:
                if family == socket.AF_INET6 and exc.errno in _NO_IPV6 and len(infos) > 1:
                    continue  # "localhost" on a host without IPv6: IPv4 alone will do
                raise
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    if not socks:
        raise OSError(errno.EADDRNOTAVAIL, "no usable address")
    return socks


class MetricsHttpServer:
    """Serves `registry` at /metrics (and /livez, /readyz when given their checks) over HTTP/1.1 from one daemon
    thread with its own asyncio loop.

    Each connection costs a few kilobytes and no thread. A client must send a request head within
    `header_timeout_s` (slowloris), may stay idle `idle_timeout_s` between keep-alive requests and must
    read a response within `write_timeout_s`; beyond `max_connections` open connections new ones get 503.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        host: str,
        port: int,
        *,
        backlog: int = 1024,
        max_connections: int = 512,
        header_timeout_s: float = 5.0,
        idle_timeout_s: float = 30.0,
        max_header_bytes: int = 8192,
        write_timeout_s: float = 10.0,
        ssl_context: ssl.SSLContext | None = None,
        auth: TokenChecker | None = None,
        on_refused: Callable[[AuthRefused], None] | None = None,
        liveness: Callable[[], str | None] | None = None,
        readiness: Callable[[], str | None] | None = None,
    ) -> None:
        if max_connections < 1 or backlog < 1 or max_header_bytes < 64:
            raise ValueError("max_connections and backlog must be >= 1, max_header_bytes >= 64")
        if min(header_timeout_s, idle_timeout_s, write_timeout_s) <= 0:
            raise ValueError("timeouts must be > 0")
        self.registry = registry
        self.host = host
        self.port = port
        self.backlog = backlog
        self.max_connections = max_connections
        self.header_timeout_s = header_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.max_header_bytes = max_header_bytes
        self.write_timeout_s = write_timeout_s
        self.ssl_context = ssl_context
        self.auth = auth
        self.on_refused = on_refused
        self.probes = {path: check for path, check in (("/livez", liveness), ("/readyz", readiness)) if check}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._tasks: set[asyncio.Task] = set()
        self._open = 0  # connections being served (not counting those turned away with 503)
        self._linger_s = min(LINGER_S, header_timeout_s)

    @property
    def open_connections(self) -> int:
        """Connections currently being served, for tests and diagnostics (read from any thread)."""
        return self._open

    def start(self) -> int:
        """Bind, start the serving thread and return the bound port; OSError naming host:port if it cannot bind."""
        with self._lock:
            if self._thread is not None:
                raise RuntimeError("MetricsHttpServer already started")
            socks = listen_sockets(self.host, self.port, self.backlog)
            self.port = socks[0].getsockname()[1]
            loop = asyncio.new_event_loop()
            started = threading.Event()
            failure: list[BaseException] = []
            self._loop, self._stopping, self._open = loop, asyncio.Event(), 0
            thread = threading.Thread(
                target=self._run, args=(loop, socks, started, failure), name=f"metrics-http-{self.port}", daemon=True
            )
            thread.start()
            started.wait()
            if failure:
                thread.join()
                self._loop = self._stopping = None
                raise failure[0]
            self._thread = thread
            return self.port

    def stop(self) -> None:
        """Close the listeners and every connection, then join the thread. Safe to call twice or before start()."""
        with self._lock:
            thread, loop, stopping = self._thread, self._loop, self._stopping
            self._thread = self._loop = self._stopping = None
        if thread is None or loop is None or stopping is None:
            return
        if thread is threading.current_thread():
            raise RuntimeError("MetricsHttpServer.stop() called from its own thread")
        try:
            loop.call_soon_threadsafe(stopping.set)
        except RuntimeError:  # the loop already ended
            pass
        thread.join()

    def __enter__(self) -> MetricsHttpServer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

    # The serving thread.

    def _run(
        self,
        loop: asyncio.AbstractEventLoop,
        socks: list[socket.socket],
        started: threading.Event,
        failure: list[BaseException],
    ) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._main(socks, started, failure))
        except BaseException as exc:  # reported to start(), or logged: the thread must not die silently
            if not started.is_set():
                failure.append(exc)
            else:
                logger.exception("metrics HTTP server failed")
        finally:
            started.set()
            for sock in socks:
                sock.close()
            loop.close()

    async def _main(self, socks: list[socket.socket], started: threading.Event, failure: list[BaseException]) -> None:
        assert self._stopping is not None
        stopping = self._stopping
        servers: list[asyncio.Server] = []
        try:
            for sock in socks:
                servers.append(
                    await asyncio.start_server(
                        self._on_connection,
                        sock=sock,
                        backlog=self.backlog,
                        limit=self.max_header_bytes,
                        ssl=self.ssl_context,
                        ssl_handshake_timeout=self.header_timeout_s if self.ssl_context else None,
                    )
                )
        except BaseException as exc:
            failure.append(exc)
            for server in servers:
                server.close()
            return
        started.set()
        try:
            await stopping.wait()
        finally:
            for server in servers:
                server.close()
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for server in servers:
                try:
                    async with asyncio.timeout(1.0):
                        await server.wait_closed()
                except TimeoutError:
                    pass

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            if self._open >= self.max_connections:
                writer.write(_RESPONSE_503)
                await self._close(reader, writer, linger=True)
                return
            self._open += 1
            try:
                await self._serve(reader, writer)
            finally:
                self._open -= 1
        except (OSError, asyncio.IncompleteReadError, _ClientGone, TimeoutError):
            pass  # the client went away or stalled; nothing to tell anyone
        except asyncio.CancelledError:
            pass  # stop(): end as a finished task, for asyncio's streams log the traceback of a cancelled one
        except Exception:
            logger.exception("metrics HTTP connection failed")
        finally:
            self._tasks.discard(task)
            if not writer.transport.is_closing():
                writer.transport.abort()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Requests on one connection, one after another (pipelined ones too), until close or a timeout."""
        lead = b""
        while True:
            received = [len(lead)]
            try:
                async with asyncio.timeout(self.header_timeout_s):
                    request = await self._read_head(reader, lead, received)
                async with asyncio.timeout(self.header_timeout_s):
                    await self._skip_body(reader, request)
            except TimeoutError:
                if received[0]:  # lines of a head came: say why before hanging up; a silent client just goes
                    writer.write(self._encode(_Response(HTTPStatus.REQUEST_TIMEOUT, *_text("request timeout")), True))
                await self._close(reader, writer, linger=False)
                return
            except _HttpError as err:
                writer.write(self._encode(_Response(err.status, *_text(err.detail)), True))
                await self._close(reader, writer, linger=True)
                return
            response = self._respond(request)
            payload = self._encode(response, not request.keep_alive, request)
            writer.write(payload)
            if not await self._drain(writer):
                return
            if not request.keep_alive:
                await self._close(reader, writer, linger=True)
                return
            try:
                async with asyncio.timeout(self.idle_timeout_s):
                    lead = await reader.readexactly(1)  # the next request's first byte starts its head deadline
            except (TimeoutError, asyncio.IncompleteReadError):
                await self._close(reader, writer, linger=False)
                return

    async def _read_head(self, reader: asyncio.StreamReader, lead: bytes, received: list[int]) -> _Request:
        async def line(kind: HTTPStatus) -> bytes:
            try:
                data = await reader.readuntil(b"\n")
            except asyncio.LimitOverrunError:
                raise _HttpError(kind, "request head too large") from None
            except asyncio.IncompleteReadError as exc:
                raise _ClientGone() from exc
            except ValueError:  # the stream's limit, reported this way by some Python versions
                raise _HttpError(kind, "request head too large") from None
            received[0] += len(data)
            if received[0] > self.max_header_bytes:
                raise _HttpError(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "request head too large")
            return data

        first = lead + await line(HTTPStatus.REQUEST_URI_TOO_LONG)
        for _ in range(4):  # RFC 9112 2.2: ignore empty lines before the request line
            if first not in (b"\r\n", b"\n"):
                break
            first = await line(HTTPStatus.REQUEST_URI_TOO_LONG)
        parts = _strip_eol(first).split(b" ")
        if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or not parts[1] or _TARGET_BAD.search(parts[1]):
            raise _HttpError(HTTPStatus.BAD_REQUEST, "malformed request line")
        version = _VERSION.fullmatch(parts[2])
        if version is None:
            raise _HttpError(HTTPStatus.BAD_REQUEST, "malformed request line")
        if version.group(1) != b"1":
            raise _HttpError(HTTPStatus.HTTP_VERSION_NOT_SUPPORTED, "only HTTP/1.x is served")
        headers: dict[str, str] = {}
        for _ in range(MAX_HEADER_LINES + 1):
            raw = _strip_eol(await line(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE))
            if not raw:
                break
            name, colon, value = raw.partition(b":")
            if not colon or not _TOKEN.fullmatch(name):  # also rejects obsolete line folding and "Name : value"
                raise _HttpError(HTTPStatus.BAD_REQUEST, "malformed header line")
            key, text = name.decode("ascii").lower(), value.strip(b" \t").decode("latin-1")
            headers[key] = f"{headers[key]}, {text}" if key in headers else text
        else:
            raise _HttpError(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "too many header lines")
        major_minor = (int(version.group(1)), int(version.group(2)))
        tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
        keep_alive = "close" not in tokens if major_minor >= (1, 1) else "keep-alive" in tokens
        return _Request(parts[0].decode("ascii"), parts[1].decode("latin-1"), major_minor, headers, keep_alive)

    async def _skip_body(self, reader: asyncio.StreamReader, request: _Request) -> None:
        """Read and drop a small body so the next request parses; a chunked one ends the connection instead."""
        length = request.headers.get("content-length")
        if "transfer-encoding" in request.headers:
            if length is not None:  # both: a request-smuggling pattern
                raise _HttpError(HTTPStatus.BAD_REQUEST, "both Content-Length and Transfer-Encoding")
            request.keep_alive = False  # answer, then close instead of parsing chunks we do not need
            return
        if length is None:
            return
        if not (length.isascii() and length.isdigit()):
            raise _HttpError(HTTPStatus.BAD_REQUEST, "invalid Content-Length")
        remaining = int(length)
        if remaining > MAX_BODY_BYTES:
            raise _HttpError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "request body too large")
        while remaining:
            chunk = await reader.read(min(remaining, 16384))
            if not chunk:
                raise _ClientGone()
            remaining -= len(chunk)

    def _respond(self, request: _Request) -> _Response:
        split = urlsplit(request.target)
        if split.path not in ("/metrics", "/") and split.path not in self.probes:
            return _Response(HTTPStatus.NOT_FOUND, *_text("not found; metrics are at /metrics"))
        if request.method not in ("GET", "HEAD"):
            response = _Response(HTTPStatus.METHOD_NOT_ALLOWED, *_text(f"{request.method} not allowed; use GET"))
            response.headers.append(("Allow", ALLOW))
            return response
        if split.path == "/":
            return _Response(HTTPStatus.OK, [("Content-Type", "text/html; charset=utf-8")], _INDEX)
        if split.path in self.probes:  # before the token check: probes carry none
            return self._probe(split.path)
        if self.auth is not None:
            try:
                self.auth.check(request.headers.get("authorization"))
            except AuthRefused as refused:
                if self.on_refused is not None:
                    self.on_refused(refused)
                status, headers = http_refusal(refused)
                response = _Response(status, *_text(str(refused)))
                response.headers += list(headers.items())
                return response
        try:
            encoder, content_type = choose_encoder(request.headers.get("accept", ""))
            registry = self.registry
            names = parse_qs(split.query).get("name[]")
            if names:
                registry = registry.restricted_registry(names)
            body = encoder(registry)
        except Exception:
            logger.exception("rendering metrics failed")
            return _Response(HTTPStatus.INTERNAL_SERVER_ERROR, *_text("rendering metrics failed"))
        headers = [("Content-Type", content_type), ("Cache-Control", "no-store"), ("Vary", "Accept, Accept-Encoding")]
        if gzip_accepted(request.headers.get("accept-encoding", "")):
            body = gzip.compress(body, compresslevel=6)
            headers.append(("Content-Encoding", "gzip"))
        return _Response(HTTPStatus.OK, headers, body)

    def _probe(self, path: str) -> _Response:
        try:
            problem = self.probes[path]()
        except Exception:
            logger.exception("%s check failed", path)
            problem = f"{path} check failed"
        headers, body = _text(problem or "ok")
        status = HTTPStatus.OK if problem is None else HTTPStatus.SERVICE_UNAVAILABLE
        return _Response(status, [*headers, ("Cache-Control", "no-store")], body)

    @staticmethod
    def _encode(response: _Response, close: bool, request: _Request | None = None) -> bytes:
        lines = [f"HTTP/1.1 {response.status.value} {response.status.phrase}", f"Date: {formatdate(usegmt=True)}"]
        lines += [f"{name}: {value}" for name, value in response.headers]
        lines.append(f"Content-Length: {len(response.body)}")
        if close:
            lines.append("Connection: close")
        elif request is not None and request.version < (1, 1):
            lines.append("Connection: keep-alive")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        return head if request is not None and request.method == "HEAD" else head + response.body

    async def _drain(self, writer: asyncio.StreamWriter) -> bool:
        """Wait for the client to take the response; one that does not read within write_timeout_s is cut off."""
        try:
            async with asyncio.timeout(self.write_timeout_s):
                await writer.drain()
            return True
        except TimeoutError:
            writer.transport.abort()
            return False

    async def _close(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, linger: bool) -> None:
        """Close after the last response. With `linger`, half-close and drop what the client still sends for a
        moment first: closing with unread input would send a reset that can destroy the response in flight."""
        transport = writer.transport
        if transport.is_closing():
            return
        if linger:
            try:
                if await self._drain(writer) and writer.can_write_eof():
                    writer.write_eof()
                    async with asyncio.timeout(self._linger_s):
                        for _ in range(64):
                            if not await reader.read(16384):
                                break
            except (OSError, TimeoutError):
                pass
        if transport.is_closing():
            return
        if transport.get_write_buffer_size():
            transport.abort()  # close() would wait for a client that does not read
        else:
            transport.close()


def _text(message: str) -> tuple[list[tuple[str, str]], bytes]:
    return [("Content-Type", "text/plain; charset=utf-8")], (message + "\n").encode()


def _strip_eol(line: bytes) -> bytes:
    if line.endswith(b"\r\n"):
        return line[:-2]
    return line[:-1] if line.endswith(b"\n") else line
