"""server.ops.metrics_http: /metrics that slow, idle or hostile clients cannot tie up; loopback only.

Every test reads what came back (status, headers and the metric's sample line), so a server that
answers the right status with the wrong body, or keeps a connection it should drop, fails.
"""

from __future__ import annotations

import errno
import gzip
import http.client
import resource
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import BinaryIO

import pytest
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families

from server.ops.metrics_http import MetricsHttpServer
from server.security import TokenChecker

SAMPLE = b"metrics_http_test_requests_total 7.0\n"


def make_registry() -> tuple[CollectorRegistry, Counter]:
    registry = CollectorRegistry()
    counter = Counter("metrics_http_test_requests", "Requests seen by the test.", registry=registry)
    counter.inc(7)
    return registry, counter


@pytest.fixture
def serve() -> Iterator[Callable[..., MetricsHttpServer]]:
    """Start servers on a free port (127.0.0.1 unless told); every one is stopped after the test."""
    servers: list[MetricsHttpServer] = []

    def start(registry: CollectorRegistry | None = None, host: str = "127.0.0.1", **kwargs) -> MetricsHttpServer:
        server = MetricsHttpServer(registry if registry is not None else make_registry()[0], host, 0, **kwargs)
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def get(
    port: int, path: str = "/metrics", method: str = "GET", headers: dict[str, str] | None = None, host="127.0.0.1"
):
    conn = http.client.HTTPConnection(host, port, timeout=5)
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        return response, response.read()
    finally:
        conn.close()


def connect(port: int, host: str = "127.0.0.1", timeout: float = 5.0) -> tuple[socket.socket, BinaryIO]:
    sock = socket.create_connection((host, port), timeout=timeout)
    return sock, sock.makefile("rb")


def read_response(stream: BinaryIO, head_only: bool = False) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response from a raw connection: (status, lower-case headers, body by Content-Length)."""
    status_line = stream.readline()
    assert status_line.startswith(b"HTTP/1.1 "), f"not an HTTP/1.1 response: {status_line!r}"
    headers: dict[str, str] = {}
    while (line := stream.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    body = b"" if head_only else stream.read(int(headers["content-length"]))
    return int(status_line.split()[1]), headers, body


def assert_closed(stream: BinaryIO) -> None:
    """The server ended the connection cleanly and sent nothing more."""
    assert stream.read() == b""


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def metrics_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("metrics-http")]


# Scrapes.


def test_scrape_returns_the_registry_live_in_the_prometheus_text_format(serve):
    registry, counter = make_registry()
    server = serve(registry)
    response, body = get(server.port)
    assert response.status == 200
    assert response.getheader("Content-Type").startswith("text/plain; version=0.0.4")
    assert int(response.getheader("Content-Length")) == len(body)
    assert response.getheader("Content-Encoding") is None
    assert SAMPLE in body
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert families["metrics_http_test_requests"].samples[0].value == 7.0
    counter.inc()
    assert b"metrics_http_test_requests_total 8.0\n" in get(server.port)[1]  # rendered per scrape, not cached


def test_gzip_when_the_client_accepts_it(serve):
    server = serve()
    response, body = get(server.port, headers={"Accept-Encoding": "deflate, gzip;q=1.0"})
    assert response.status == 200
    assert response.getheader("Content-Encoding") == "gzip"
    assert SAMPLE in gzip.decompress(body)


def test_openmetrics_when_the_client_asks_for_it(serve):
    server = serve()
    response, body = get(server.port, headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert response.status == 200
    assert response.getheader("Content-Type").startswith("application/openmetrics-text; version=1.0.0")
    assert body.endswith(b"# EOF\n")
    assert SAMPLE in body


def test_name_filter_restricts_the_scrape(serve):
    registry, _ = make_registry()
    Counter("metrics_http_test_other", "Another counter.", registry=registry).inc()
    server = serve(registry)
    _, body = get(server.port, "/metrics?name[]=metrics_http_test_requests_total")
    assert SAMPLE in body
    assert b"metrics_http_test_other" not in body


def test_head_sends_the_headers_of_get_and_no_body(serve):
    server = serve()
    sock, stream = connect(server.port)
    with sock, stream:
        # Pipelined: if HEAD sent any body bytes, the GET response would not start where it must.
        sock.sendall(b"HEAD /metrics HTTP/1.1\r\nHost: t\r\n\r\nGET /metrics HTTP/1.1\r\nHost: t\r\n\r\n")
        head_status, head_headers, _ = read_response(stream, head_only=True)
        get_status, get_headers, body = read_response(stream)
    assert (head_status, get_status) == (200, 200)
    assert SAMPLE in body
    assert int(head_headers["content-length"]) == len(body)
    assert head_headers["content-type"] == get_headers["content-type"]


def test_root_serves_a_link_to_metrics(serve):
    server = serve()
    response, body = get(server.port, "/")
    assert response.status == 200
    assert response.getheader("Content-Type").startswith("text/html")
    assert b'href="/metrics"' in body
    assert SAMPLE not in body


def test_rendering_runs_on_the_servers_own_thread(serve):
    seen: list[str] = []

    class Probe:
        def collect(self):
            seen.append(threading.current_thread().name)
            yield GaugeMetricFamily("metrics_http_test_probe", "Probe.", value=1)

    registry = CollectorRegistry()
    registry.register(Probe())
    seen.clear()  # register() collects once, on this thread
    server = serve(registry)
    _, body = get(server.port)
    assert b"metrics_http_test_probe 1.0\n" in body
    assert seen == [f"metrics-http-{server.port}"]
    assert [t.daemon for t in metrics_threads()] == [True]


def test_a_failing_collector_gives_500_and_the_server_keeps_serving(serve):
    class Broken:
        fail = False

        def collect(self):
            if self.fail:
                raise RuntimeError("collector broke")
            yield GaugeMetricFamily("metrics_http_test_gauge", "Gauge.", value=3)

    registry, broken = CollectorRegistry(), Broken()
    registry.register(broken)
    server = serve(registry)
    broken.fail = True
    response, body = get(server.port)
    assert response.status == 500
    assert b"metrics_http_test_gauge" not in body
    broken.fail = False
    response, body = get(server.port)
    assert response.status == 200
    assert b"metrics_http_test_gauge 3.0\n" in body


# Probes: /livez and /readyz.


def test_probes_answer_200_ok_or_503_with_the_problem_their_check_names(serve):
    problems: dict[str, str | None] = {"live": None, "ready": "not serving yet: model loading"}
    server = serve(liveness=lambda: problems["live"], readiness=lambda: problems["ready"])
    response, body = get(server.port, "/livez")
    assert (response.status, body) == (200, b"ok\n")
    assert response.getheader("Cache-Control") == "no-store"
    response, body = get(server.port, "/readyz")
    assert (response.status, body) == (503, b"not serving yet: model loading\n")
    problems.update(live="the loop is stuck", ready=None)
    assert (get(server.port, "/livez")[0].status, get(server.port, "/readyz")[0].status) == (503, 200)
    response, body = get(server.port, "/livez", "HEAD")
    assert (response.status, body, response.getheader("Content-Length")) == (503, b"", str(len("the loop is stuck\n")))
    assert get(server.port, "/livez", "POST")[0].status == 405


def test_probes_are_checked_on_the_servers_own_thread(serve):
    seen: list[str] = []
    server = serve(liveness=lambda: seen.append(threading.current_thread().name))
    assert get(server.port, "/livez")[0].status == 200
    assert seen == [f"metrics-http-{server.port}"]


def test_probes_need_no_token_where_metrics_do(serve):
    token = "a-token-for-the-metrics-tests-0123456789"
    server = serve(auth=TokenChecker([token]), liveness=lambda: None, readiness=lambda: None)
    assert get(server.port)[0].status == 401
    assert get(server.port, headers={"Authorization": f"Bearer {token}"})[0].status == 200
    assert get(server.port, "/livez")[0].status == 200
    assert get(server.port, "/readyz")[0].status == 200


def test_a_probe_without_its_check_is_404_like_any_unknown_path(serve):
    server = serve(liveness=lambda: None)
    assert get(server.port, "/livez")[0].status == 200
    for path in ("/readyz", "/livez/", "/healthz", "/nope"):
        assert get(server.port, path)[0].status == 404, path


def test_a_check_that_raises_is_503_and_the_server_keeps_serving(serve):
    def broken() -> str | None:
        raise RuntimeError("check broke")

    server = serve(liveness=broken)
    response, body = get(server.port, "/livez")
    assert (response.status, body) == (503, b"/livez check failed\n")
    assert SAMPLE in get(server.port)[1]


# Errors.


def test_unknown_path_is_404_and_the_connection_stays_usable(serve):
    server = serve()
    sock, stream = connect(server.port)
    with sock, stream:
        sock.sendall(b"GET /nope HTTP/1.1\r\nHost: t\r\n\r\n")
        status, _, body = read_response(stream)
        assert status == 404
        assert SAMPLE not in body
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n")
        status, _, body = read_response(stream)
    assert status == 200
    assert SAMPLE in body


def test_other_methods_are_405_with_allow_and_their_body_is_skipped(serve):
    server = serve()
    sock, stream = connect(server.port)
    with sock, stream:
        sock.sendall(b"POST /metrics HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello")
        status, headers, body = read_response(stream)
        assert status == 405
        assert headers["allow"] == "GET, HEAD"
        assert SAMPLE not in body
        # The 5 body bytes were read and dropped, so the next request on the connection parses.
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n")
        status, _, body = read_response(stream)
    assert status == 200
    assert SAMPLE in body


def test_a_small_body_on_get_is_ignored(serve):
    server = serve()
    sock, stream = connect(server.port)
    with sock, stream:
        sock.sendall(
            b"GET /metrics HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabcGET / HTTP/1.1\r\nHost: t\r\n\r\n"
        )
        first = read_response(stream)
        second = read_response(stream)
    assert first[0] == 200 and SAMPLE in first[2]
    assert second[0] == 200 and b'href="/metrics"' in second[2]


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"NONSENSE\r\n\r\n", 400),
        (b"GET /metrics\r\n\r\n", 400),
        (b"GET  /metrics HTTP/1.1\r\n\r\n", 400),
        (b"GET /metrics HTTP/1.1\r\nNo colon here\r\n\r\n", 400),
        (b"GET /metrics HTTP/1.1\r\nHost: t\r\n folded: line\r\n\r\n", 400),
        (b"GET /metrics HTTP/1.1\r\nContent-Length: x\r\n\r\n", 400),
        (b"GET /metrics HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        (b"GET /metrics HTTP/1.1\r\nContent-Length: 10000000\r\n\r\n", 413),
        (b"GET /metrics HTTP/2.0\r\n\r\n", 505),
        (b"GET /" + b"a" * 3000 + b" HTTP/1.1\r\n\r\n", 414),
        (b"GET /metrics HTTP/1.1\r\nX-Big: " + b"b" * 3000 + b"\r\n\r\n", 431),
        (b"GET /metrics HTTP/1.1\r\n" + b"X-Many: 0123456789\r\n" * 150 + b"\r\n", 431),
    ],
    ids=[
        "garbage",
        "no-version",
        "double-space",
        "header-without-colon",
        "obs-fold",
        "bad-content-length",
        "content-length-and-chunked",
        "body-too-large",
        "http2",
        "request-line-too-long",
        "header-too-large",
        "head-too-large",
    ],
)
def test_bad_requests_get_their_status_and_the_connection_is_closed(serve, request_bytes, status):
    server = serve(max_header_bytes=2048)
    sock, stream = connect(server.port)
    with sock, stream:
        sock.sendall(request_bytes)
        got, headers, body = read_response(stream)
        assert got == status
        assert headers["connection"] == "close"
        assert SAMPLE not in body
        assert_closed(stream)
    response, body = get(server.port)  # and the server is fine
    assert response.status == 200 and SAMPLE in body


# Connections.


def test_keep_alive_serves_several_requests_on_one_connection(serve):
    registry, counter = make_registry()
    server = serve(registry)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        conn.request("GET", "/metrics")
        first = conn.getresponse()
        first_body = first.read()
        local = conn.sock.getsockname()
        counter.inc()
        conn.request("GET", "/metrics")
        second = conn.getresponse()
        second_body = second.read()
        assert conn.sock.getsockname() == local  # http.client would reconnect had the server closed
    finally:
        conn.close()
    assert first.status == second.status == 200
    assert SAMPLE in first_body
    assert b"metrics_http_test_requests_total 8.0\n" in second_body
    assert first.getheader("Connection") is None


def test_connection_close_is_honoured(serve):
    server = serve()
    sock, stream = connect(server.port)
    with sock, stream:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        status, headers, body = read_response(stream)
        assert status == 200 and SAMPLE in body
        assert headers["connection"] == "close"
        assert_closed(stream)


def test_http_1_0_closes_unless_keep_alive_is_asked(serve):
    server = serve()
    sock, stream = connect(server.port)
    with sock, stream:
        sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        status, _, body = read_response(stream)
        assert status == 200 and SAMPLE in body
        assert_closed(stream)
    sock, stream = connect(server.port)
    with sock, stream:
        sock.sendall(b"GET /metrics HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        status, headers, _ = read_response(stream)
        assert headers["connection"] == "keep-alive"
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        status, _, body = read_response(stream)
        assert status == 200 and b'href="/metrics"' in body


def test_an_idle_keep_alive_connection_is_closed_after_idle_timeout(serve):
    # The other timeouts are far beyond the read's hang guard (60 s): a close before it can only be the idle one's.
    server = serve(idle_timeout_s=0.3, header_timeout_s=600.0, write_timeout_s=600.0)
    sock, stream = connect(server.port, timeout=60)
    with sock, stream:
        start = time.monotonic()  # before the request: the idle time can only start later
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n")
        assert read_response(stream)[0] == 200
        assert_closed(stream)
        assert time.monotonic() - start >= 0.3  # not before the idle timeout
    wait_for(lambda: server.open_connections == 0)


def test_slowloris_is_closed_after_header_timeout(serve):
    server = serve(header_timeout_s=0.5, idle_timeout_s=600.0, write_timeout_s=600.0)
    trickle = b"GET /metrics HTTP/1.1\r\nHost: t\r\nX-Slow: " + b"z" * 100
    start = time.monotonic()  # before the connection: the head's time can only start later
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=60)
    closed_after = None
    with sock:
        for byte in trickle:  # one byte every 50 ms, never finishing the head
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                closed_after = time.monotonic() - start
                break
            if select.select([sock], [], [], 0.05)[0]:
                data = sock.recv(65536)
                assert data == b"" or data.startswith(b"HTTP/1.1 408 "), data
                closed_after = time.monotonic() - start
                break
    # Closed while the head was still arriving, a byte every 50 ms or slower (at least 7 s in all): the bytes did not
    # extend the head's deadline, and nothing but that deadline closes a connection this early.
    assert closed_after is not None, "the server kept a trickling connection open"
    assert closed_after >= 0.5  # not before the header timeout
    wait_for(lambda: server.open_connections == 0)


def test_a_silent_connection_is_closed_after_header_timeout(serve):
    # The other timeouts are far beyond the read's hang guard (60 s): a close before it can only be the header one's.
    server = serve(header_timeout_s=0.5, idle_timeout_s=600.0, write_timeout_s=600.0)
    start = time.monotonic()  # before the connection: the head's time can only start later
    sock, stream = connect(server.port, timeout=60)
    with sock, stream:
        assert_closed(stream)
        assert time.monotonic() - start >= 0.5  # not before the header timeout


def test_a_client_that_never_reads_is_cut_off_after_write_timeout(serve):
    class Big:
        calls = 0
        label = "x" * 16_000_000  # far more than loopback socket buffers hold

        def collect(self):
            self.calls += 1
            family = GaugeMetricFamily("metrics_http_test_big", "Big.", labels=["v"])
            family.add_metric([self.label], 1)
            yield family

    registry, big = CollectorRegistry(), Big()
    registry.register(big)
    # The other timeouts are far beyond the hang guard below (60 s): a close before it can only be the write one's.
    server = serve(registry, write_timeout_s=0.5, header_timeout_s=600.0, idle_timeout_s=600.0)
    big.calls = 0
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    with sock:
        sock.connect(("127.0.0.1", server.port))
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n")  # and never read
        wait_for(lambda: big.calls == 1)
        big.label = "small"
        assert server.open_connections == 1
        response, body = get(server.port)  # others are served meanwhile
        assert b'metrics_http_test_big{v="small"} 1.0\n' in body
        wait_for(lambda: server.open_connections == 0, timeout=60.0)  # cut off though the client is still there


def test_idle_and_slow_connections_cost_no_threads_and_do_not_block_a_scrape(serve):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2048:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(2048, hard), hard))
    server = serve(header_timeout_s=600.0)  # the half heads stay open for the whole test
    threads = threading.active_count()
    assert len(metrics_threads()) == 1
    idle = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(300)]
    slow = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(50)]
    try:
        for part in (b"GET /metrics HTTP/1.1\r\n", b"Host: t\r\n", b"X-Slow: 1"):  # half a head, slowly
            for sock in slow:
                sock.sendall(part)
            time.sleep(0.05)
        wait_for(lambda: server.open_connections == 350)
        response, body = get(server.port)  # a scrape stuck behind them would wait for their 600 s (get's limit: 5 s)
        assert response.status == 200 and SAMPLE in body
        assert threading.active_count() <= threads  # not one more thread for 350 connections
        assert len(metrics_threads()) == 1
    finally:
        for sock in idle + slow:
            sock.close()
    wait_for(lambda: server.open_connections == 0)


def test_connections_over_max_connections_get_503_and_are_closed(serve):
    server = serve(max_connections=5, header_timeout_s=10.0)
    held = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(5)]
    try:
        wait_for(lambda: server.open_connections == 5)
        sock, stream = connect(server.port)
        with sock, stream:
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n")
            status, headers, body = read_response(stream)
            assert status == 503
            assert headers["connection"] == "close"
            assert SAMPLE not in body
            assert_closed(stream)
        assert server.open_connections == 5
        held.pop().close()
        wait_for(lambda: server.open_connections == 4)
        response, body = get(server.port)
        assert response.status == 200 and SAMPLE in body
    finally:
        for sock in held:
            sock.close()


# Addresses and lifecycle.


def other_local_ipv4() -> str | None:
    """A non-loopback IPv4 address of this host, if it has one (found without sending a packet)."""
    candidates: set[str] = set()
    try:
        candidates.update(info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET))
    except OSError:
        pass
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("192.0.2.1", 9))  # UDP connect only picks a route and source address
            candidates.add(probe.getsockname()[0])
    except OSError:
        pass
    for address in sorted(candidates):
        if address.startswith("127.") or address == "0.0.0.0":
            continue
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as check:
                check.bind((address, 0))
            return address
        except OSError:
            continue
    return None


def ipv6_loopback_usable() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as check:
            check.bind(("::1", 0))
        return True
    except OSError:
        return False


def reachable(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=2).close()
        return True
    except ConnectionRefusedError:
        return False


@pytest.mark.may_skip("a host with only the loopback address")
def test_loopback_bind_is_not_reachable_from_another_local_address(serve):
    other = other_local_ipv4()
    if other is None:
        pytest.skip("this host has no non-loopback IPv4 address")
    loopback = serve(host="127.0.0.1")
    assert reachable("127.0.0.1", loopback.port)
    assert not reachable(other, loopback.port)
    everywhere = serve(host="0.0.0.0")  # the control: the other address does reach a server bound to all
    assert reachable(other, everywhere.port)
    _, body = get(everywhere.port, host=other)
    assert SAMPLE in body


@pytest.mark.may_skip("a host without IPv6")
@pytest.mark.skipif(not (socket.has_dualstack_ipv6() and ipv6_loopback_usable()), reason="no dual-stack IPv6")
@pytest.mark.parametrize("host", ["[::]", "::"])
def test_all_addresses_serve_ipv6_and_ipv4(serve, host):
    server = serve(host=host)
    for client_host in ("127.0.0.1", "::1"):
        _, body = get(server.port, host=client_host)
        assert SAMPLE in body


@pytest.mark.may_skip("a host without IPv6")
@pytest.mark.skipif(not ipv6_loopback_usable(), reason="no IPv6 loopback")
def test_ipv6_loopback_in_brackets(serve):
    server = serve(host="[::1]")
    _, body = get(server.port, host="::1")
    assert SAMPLE in body
    assert not reachable("127.0.0.1", server.port)


def test_localhost_is_reachable_by_name(serve):
    server = serve(host="localhost")
    _, body = get(server.port, host="localhost")
    assert SAMPLE in body


def test_a_taken_port_raises_oserror_naming_the_address():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = MetricsHttpServer(make_registry()[0], "127.0.0.1", port)
        with pytest.raises(OSError) as caught:
            server.start()
        server.stop()  # harmless after a failed start
    assert caught.value.errno == errno.EADDRINUSE
    assert f"127.0.0.1:{port}" in str(caught.value)
    assert metrics_threads() == []  # no thread left behind


def test_stop_closes_everything_and_frees_the_port():
    server = MetricsHttpServer(make_registry()[0], "127.0.0.1", 0, header_timeout_s=600.0, idle_timeout_s=600.0)
    port = server.start()
    assert port == server.port != 0
    (thread,) = metrics_threads()
    kept, kept_stream = connect(port)
    silent, silent_stream = connect(port)
    with kept, kept_stream, silent, silent_stream:
        kept.sendall(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n")
        assert SAMPLE in read_response(kept_stream)[2]
        wait_for(lambda: server.open_connections == 2)
        # a stop that waited for the connections' own timeouts (600 s) would outlast the join's hang guard (60 s)
        stopping = threading.Thread(target=server.stop)
        stopping.start()
        stopping.join(60)
        assert not stopping.is_alive(), "stop waited for the open connections"
        for stream in (kept_stream, silent_stream):
            try:
                assert stream.read() == b""
            except ConnectionResetError:
                pass  # aborted: just as closed
    assert not thread.is_alive() and metrics_threads() == []
    assert not reachable("127.0.0.1", port)
    server.stop()  # idempotent
    with MetricsHttpServer(make_registry()[0], "127.0.0.1", port) as again:  # the port is free again
        assert again.port == port
        assert SAMPLE in get(port)[1]
    assert not reachable("127.0.0.1", port)


def test_start_twice_is_an_error(serve):
    server = serve()
    with pytest.raises(RuntimeError):
        server.start()
    assert SAMPLE in get(server.port)[1]
