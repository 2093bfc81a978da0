"""Group 3, idle and slow clients (fresh servers): idle reflection and health Watch streams, slow connections to
the gRPC and metrics ports, held by another process while a well-behaved client measures the server."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

from loadtest.attack.client import HEALTH_WATCH, REFLECTION_V1ALPHA, Client, error_rate, fmt_ms, probe, scrape, warm
from loadtest.attack.context import AttackServer, Ctx
from loadtest.attack.core import Line, Skip, check, judge
from loadtest.attack.load import gather, raise_fd_limit


def _holder(kind: str, host: str, port: int, count: int, channels: int, ready, stop, results) -> None:
    """Open `count` streams or connections of `kind`, report how that went on `ready`, hold until `stop`."""
    results.put(asyncio.run(_hold_async(kind, host, port, count, channels, ready, stop)))


async def _hold_async(kind: str, host: str, port: int, count: int, channels: int, ready, stop) -> dict:
    loop = asyncio.get_running_loop()
    opened: Counter = Counter()
    holder = _StreamHolder(host, port, channels) if kind in ("reflection", "watch") else _SocketHolder(host, port)
    started = time.monotonic()
    await holder.open(kind, count, opened)
    await asyncio.sleep(1.0)  # let refusals of streams that sent nothing arrive
    state = await holder.state()
    ready.put({"opened": dict(opened), "open_s": time.monotonic() - started, "state_after_1s": state})
    trickle = asyncio.ensure_future(holder.trickle()) if kind == "slow-grpc" else None
    while not await loop.run_in_executor(None, stop.wait, 0.2):
        pass
    if trickle:
        trickle.cancel()
    final = await holder.state()
    await holder.close()
    return {"final": final}


class _StreamHolder:
    def __init__(self, host: str, port: int, channels: int) -> None:
        import grpc

        self.grpc = grpc
        self.channels = [
            grpc.aio.insecure_channel(f"{host}:{port}", options=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(channels)
        ]
        self.calls: list[Any] = []

    async def open(self, kind: str, count: int, opened: Counter) -> None:
        from grpc_health.v1 import health_pb2
        from grpc_reflection.v1alpha import reflection_pb2

        async def one(i: int) -> None:
            channel = self.channels[i % len(self.channels)]
            try:
                if kind == "watch":
                    call = channel.unary_stream(
                        HEALTH_WATCH,
                        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                        response_deserializer=health_pb2.HealthCheckResponse.FromString,
                    )(health_pb2.HealthCheckRequest(service=""))
                    self.calls.append(call)
                    first = await asyncio.wait_for(call.read(), 15)
                else:
                    call = channel.stream_stream(
                        REFLECTION_V1ALPHA,
                        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
                    )()
                    self.calls.append(call)
                    if i % 2:  # half send nothing at all
                        opened["open, sent nothing"] += 1
                        return
                    await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
                    first = await asyncio.wait_for(call.read(), 15)
                if first is self.grpc.aio.EOF:
                    opened["closed: " + (await call.code()).name] += 1
                else:
                    opened["accepted"] += 1
            except self.grpc.aio.AioRpcError as err:
                opened["refused" if err.code().name == "RESOURCE_EXHAUSTED" else "failed: " + err.code().name] += 1
            except TimeoutError:
                opened["no answer in 15 s"] += 1

        await asyncio.gather(*(one(i) for i in range(count)))

    async def state(self) -> dict:
        states: Counter = Counter()
        for call in self.calls:
            if not call.done():
                states["open"] += 1
            else:
                try:
                    states["ended: " + (await asyncio.wait_for(call.code(), 1)).name] += 1
                except Exception:  # noqa: BLE001
                    states["ended"] += 1
        return dict(states)

    async def trickle(self) -> None:
        return None

    async def close(self) -> None:
        for call in self.calls:
            call.cancel()
        for channel in self.channels:
            await channel.close()


HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
HALF_HTTP_HEAD = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: slow"


class _SocketHolder:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.watchers: list[asyncio.Future] = []
        self.closed_by_server = 0
        self.answered = 0

    async def _watch(self, reader: asyncio.StreamReader) -> None:
        try:
            data = await reader.read(65536)
        except (ConnectionError, OSError):
            data = b""
        if data:
            self.answered += 1
            with contextlib.suppress(Exception):
                while await reader.read(65536):
                    pass
        self.closed_by_server += 1

    async def open(self, kind: str, count: int, opened: Counter) -> None:
        async def one(i: int) -> None:
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), 10)
            except (TimeoutError, OSError) as exc:
                opened["connect failed: " + type(exc).__name__] += 1
                return
            self.conns.append((reader, writer))
            opened["connected"] += 1
            if kind == "slow-metrics":
                writer.write(HALF_HTTP_HEAD)
            elif i % 2 == 0:  # slow-grpc: half trickle the HTTP/2 preface, half send nothing
                writer.write(HTTP2_PREFACE[:1])
            self.watchers.append(asyncio.ensure_future(self._watch(reader)))

        for first in range(0, count, 100):  # in waves, so the server's accept queue is not the thing measured
            await asyncio.gather(*(one(i) for i in range(first, min(first + 100, count))))

    async def trickle(self) -> None:
        """One more byte of the preface every 0.5 s on the trickling half (never the whole preface)."""
        sent = 1
        while sent < len(HTTP2_PREFACE) - 1:
            await asyncio.sleep(0.5)
            for i, (_, writer) in enumerate(self.conns):
                if i % 2 == 0 and not writer.is_closing():
                    with contextlib.suppress(Exception):
                        writer.write(HTTP2_PREFACE[sent : sent + 1])
            sent += 1

    async def state(self) -> dict:
        return {
            "held": len(self.conns) - self.closed_by_server,
            "closed by server": self.closed_by_server,
            "answered": self.answered,
        }

    async def close(self) -> None:
        for _, writer in self.conns:
            writer.close()
        for watcher in self.watchers:
            watcher.cancel()


@contextlib.contextmanager
def holding(kind: str, port: int, count: int, channels: int = 10, timeout: float = 120) -> Iterator[dict]:
    """A process holding `count` streams/connections of `kind` for the `with` block; yields its open report."""
    context = mp.get_context("spawn")
    ready, results, stop = context.Queue(), context.Queue(), context.Event()
    proc = context.Process(
        target=_holder, args=(kind, "127.0.0.1", port, count, channels, ready, stop, results), daemon=True
    )
    proc.start()
    report: dict = {}
    try:
        report.update(gather(ready, [proc], 1, timeout, f"{kind} holder")[0])
        yield report
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            report.update(gather(results, [proc], 1, 30, f"{kind} holder")[0])
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join(5)


def _fd_guard(needed: int) -> None:
    soft, hard = raise_fd_limit()
    if soft < needed:
        raise Skip(f"RLIMIT_NOFILE is {soft} (hard {hard}); {needed} file descriptors needed")


def _client_attack(
    ctx: Ctx,
    name: str,
    kind: str,
    count: int,
    port_of: Callable[[AttackServer], int],
    sent: str,
    scrape_metrics: bool = False,
) -> list[Line]:
    _fd_guard(count + 512)
    server = ctx.server(name)
    seconds = ctx.short(2.0, 5.0)
    with Client(server.target) as client:
        warm(client)
    before = probe(server.target, seconds)
    scrapes: list[tuple[bool, float, str]] = []
    with holding(kind, port_of(server), count) as report:
        stop = threading.Event()

        def scraper() -> None:
            while not stop.is_set():
                t0 = time.perf_counter()
                try:
                    scrape(server.metrics_url, 2.0)
                    scrapes.append((True, time.perf_counter() - t0, ""))
                except Exception as exc:  # noqa: BLE001
                    scrapes.append((False, time.perf_counter() - t0, type(exc).__name__))
                stop.wait(0.5)

        thread = threading.Thread(target=scraper, daemon=True)
        if scrape_metrics:
            thread.start()
        during = probe(server.target, seconds)
        stop.set()
        if scrape_metrics:
            thread.join(5)
    after = probe(server.target, seconds)  # idle again: this machine drifts, so idle is measured on both sides
    keys = ("classify_p99_ms", "health_p99_ms", "classify_p50_ms")
    aftermath = [] if after["calls"] else ["no probe call succeeded"]
    if error_rate(after) > 2 * error_rate(before) + 0.01:
        aftermath.append(f"probe calls failed {after['errors']}")
    for key in keys[:2]:
        if not after[key] <= 2 * before[key]:
            aftermath.append(f"{key.split('_')[0]} p99 {fmt_ms(after[key])} vs {fmt_ms(before[key])} before")
    if aftermath:  # the server had not recovered: that is no idle sample
        idle = dict(before)
    else:
        idle = {key: (before[key] + after[key]) / 2 for key in keys}
        idle["calls"] = before["calls"] + after["calls"]
        idle["errors"] = dict(Counter(before["errors"]) + Counter(after["errors"]))
    opened = report.get("opened", {})
    final = report.get("final", {})
    c_ratio = during["classify_p99_ms"] / idle["classify_p99_ms"]
    h_ratio = during["health_p99_ms"] / idle["health_p99_ms"]
    measured = (
        f"opened {opened} in {report.get('open_s', 0):.1f} s; at the end {final}; Classify p99 "
        f"{fmt_ms(during['classify_p99_ms'])} vs idle {fmt_ms(idle['classify_p99_ms'])} ({c_ratio:.2f}x; probe "
        f"before/after {fmt_ms(before['classify_p99_ms'])}/{fmt_ms(after['classify_p99_ms'])}), health p99 "
        f"{fmt_ms(during['health_p99_ms'])} vs {fmt_ms(idle['health_p99_ms'])} ({h_ratio:.2f}x)"
    )
    if during["errors"] or idle["errors"]:
        measured += f"; probe errors {during['errors']} (idle: {idle['errors']})"
    problems = []
    if not c_ratio <= 2:
        problems.append(f"Classify p99 {c_ratio:.1f}x idle")
    if not h_ratio <= 2:
        problems.append(f"health p99 {h_ratio:.1f}x idle")
    if error_rate(during) > 2 * error_rate(idle) + 0.01:  # refusals beyond twice those at idle
        problems.append(
            f"probe calls failed {during['errors']} ({100 * error_rate(during):.1f}%, idle "
            f"{100 * error_rate(idle):.1f}%)"
        )
    if aftermath:
        measured += f"; once the attack stopped: {'; '.join(aftermath)}"
        problems.append("not serving normally after the attack stopped (" + "; ".join(aftermath) + ")")
    broken = {state: n for state, n in {**opened, **final}.items() if "INTERNAL" in state or "UNKNOWN" in state}
    if broken:
        problems.append(f"streams answered {broken}")
    if scrape_metrics:
        good = sum(ok for ok, _, _ in scrapes)
        measured += f"; /metrics scraped {good}/{len(scrapes)}"
        if good:
            measured += f" (max {max(t for ok, t, _ in scrapes if ok) * 1000:.0f} ms)"
        if not scrapes or good < len(scrapes):
            problems.append(f"/metrics failed {len(scrapes) - good}/{len(scrapes)} scrapes")
    target = (
        "Classify and health p99 <= 2x idle" + ("; /metrics scrapable" if scrape_metrics else "") + "; normal after"
    )
    return [
        judge(
            name,
            not problems,
            sent,
            measured,
            target,
            "; ".join(problems),
            opened=opened,
            final=final,
            idle=idle,
            during=during,
        )
    ]


STREAMS = 1000


@check(
    "reflection-streams",
    "3 idle and slow clients",
    f"{STREAMS} server-reflection streams (v1alpha ServerReflectionInfo) over 10 channels: half send one request "
    "and read its answer, half send nothing; all then stay idle, held by another process",
    "Classify p99 and health Check p99 within 2x of idle while held, serving normally once released; refusals "
    "(RESOURCE_EXHAUSTED) counted, no stream answered INTERNAL/UNKNOWN",
    quick=False,
    timeout_s=150,
    estimate_s=25,
)
def check_reflection_streams(ctx: Ctx) -> list[Line]:
    return _client_attack(
        ctx, "reflection-streams", "reflection", STREAMS, lambda s: s.port, f"{STREAMS} idle reflection streams"
    )


@check(
    "watch-streams",
    "3 idle and slow clients",
    f"{STREAMS} health Watch streams over 10 channels, each reading its first status then idle",
    "Classify p99 and health Check p99 within 2x of idle while held, serving normally once released; refusals "
    "counted, no stream answered INTERNAL/UNKNOWN",
    quick=False,
    timeout_s=150,
    estimate_s=25,
)
def check_watch_streams(ctx: Ctx) -> list[Line]:
    return _client_attack(ctx, "watch-streams", "watch", STREAMS, lambda s: s.port, f"{STREAMS} health Watch streams")


@check(
    "slow-grpc",
    "3 idle and slow clients",
    f"{STREAMS} TCP connections to the gRPC port: half send nothing, half trickle the HTTP/2 preface one byte per "
    "0.5 s (never completing it)",
    "Classify p99 and health Check p99 within 2x of idle while held, serving normally once released",
    quick=False,
    timeout_s=150,
    estimate_s=25,
)
def check_slow_grpc(ctx: Ctx) -> list[Line]:
    return _client_attack(
        ctx, "slow-grpc", "slow-grpc", STREAMS, lambda s: s.port, f"{STREAMS} slow connections to gRPC"
    )


@check(
    "slow-metrics",
    "3 idle and slow clients",
    f"{STREAMS} TCP connections to the metrics port, each sending half an HTTP request head and then nothing",
    "Classify p99 and health Check p99 within 2x of idle; /metrics still scrapable (every scrape, 2 s limit); "
    "serving normally once released",
    quick=False,
    timeout_s=150,
    estimate_s=25,
)
def check_slow_metrics(ctx: Ctx) -> list[Line]:
    return _client_attack(
        ctx,
        "slow-metrics",
        "slow-metrics",
        STREAMS,
        lambda s: s.metrics_port,
        f"{STREAMS} slow connections to /metrics",
        scrape_metrics=True,
    )
