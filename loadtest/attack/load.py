"""Load from other processes (one Python process cannot send fast enough on two cores): spawned workers started
together at one wall-clock time, closed and open loops of raw Classify, and a prober of /livez and grpc health as a
kubelet asks them; and the limit on open files raised for processes that hold many connections."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import multiprocessing as mp
import os
import resource
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from loadtest.attack.client import CLASSIFY, HEALTH_CHECK, RETRY_HINT_KEYS, digits, fmt_ms, percentile_ms
from loadtest.attack.core import Fail

LIVENESS_INTERVAL_S = 0.1  # overload: /livez and grpc health Check are each asked this often during the load ...
LIVENESS_TIMEOUT_S = 1.0  # ... with this timeout (a kubelet probe's default is 1 s)


def gather(queue: Any, procs: list, count: int, timeout: float, what: str) -> list:
    """`count` items from `queue`, noticing a worker that died instead of waiting out the timeout."""
    import queue as queue_module

    items, deadline = [], time.monotonic() + timeout
    while len(items) < count:
        try:
            items.append(queue.get(timeout=0.5))
        except queue_module.Empty:
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if dead:
                raise Fail(f"{what}: a worker process died (exit {dead[0].exitcode})") from None
            if time.monotonic() > deadline:
                raise Fail(f"{what}: no answer from the worker processes within {timeout:.0f} s") from None
    return items


@contextlib.contextmanager
def workers(worker: Callable, arguments: list[tuple]) -> Iterator[tuple[list, Any, Any, Any, Any]]:
    """Worker processes (spawned) called as worker(*args, ready, go, start, results); yields their handles.

    Each worker connects and warms up, puts one item on `ready`, waits for `go`, then starts at the
    wall-clock time in `start`: no client is counted before every client is connected."""
    context = mp.get_context("spawn")
    ready, results = context.Queue(), context.Queue()
    go, start = context.Event(), context.Value("d", 0.0)
    procs = [context.Process(target=worker, args=(*args, ready, go, start, results), daemon=True) for args in arguments]
    for proc in procs:
        proc.start()
    try:
        yield procs, ready, go, start, results
    finally:
        go.set()
        for proc in procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(5)


def run_workers(
    worker: Callable,
    arguments: list[tuple],
    seconds: float,
    lead_s: float = 0.5,
    during: Callable[[float], Any] | None = None,
) -> tuple[float, list, Any]:
    """Start `worker` processes together; returns (start time, their results, what `during(start)` returned)."""
    with workers(worker, arguments) as (procs, ready, go, start, results):
        gather(ready, procs, len(procs), 90, "load generators starting")
        start_at = time.time() + lead_s
        start.value = start_at
        go.set()
        extra = during(start_at) if during else None
        gathered = gather(results, procs, len(procs), seconds + lead_s + 90, "load generators")
    return start_at, gathered, extra


def _raw_payloads(seed: int, count: int = 500) -> list[bytes]:
    from proto.mnist.v1 import classifier_pb2 as pb

    images, _ = digits(count)
    order = np.random.default_rng(seed).permutation(len(images))
    return [pb.ClassifyRequest(raw=images[i].tobytes()).SerializeToString() for i in order]


CODE_NAMES: dict[int, str] = {}


def code_name(value: int) -> str:
    if not CODE_NAMES:
        import grpc

        CODE_NAMES.update({code.value[0]: code.name for code in grpc.StatusCode})
    return CODE_NAMES.get(value, str(value))


async def connect(channel: Any, call: Any, payload: bytes) -> None:
    """Connected and warm before the clock starts (a refusal, e.g. RESOURCE_EXHAUSTED, is fine here)."""
    import grpc

    await asyncio.wait_for(channel.channel_ready(), 30)
    with contextlib.suppress(grpc.aio.AioRpcError):
        await call(payload, timeout=10)


def closed_worker(target: str, clients: int, seconds: float, seed: int, ready, go, start, results) -> None:
    """`clients` callers in one process, each with one raw Classify in flight; latencies of OK calls."""
    results.put(asyncio.run(_closed_async(target, clients, seconds, seed, ready, go, start)))


async def _closed_async(target: str, clients: int, seconds: float, seed: int, ready, go, start) -> dict:
    import grpc

    payloads = _raw_payloads(seed)
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_unary(CLASSIFY)
        await connect(channel, call, payloads[0])
        ready.put(os.getpid())
        await asyncio.get_running_loop().run_in_executor(None, go.wait, 120)
        await asyncio.sleep(max(0.0, start.value - time.time()))
        end = time.perf_counter() + seconds
        latencies: list[float] = []
        errors: Counter = Counter()

        async def client(offset: int) -> None:
            i = offset
            while time.perf_counter() < end:
                t0 = time.perf_counter()
                try:
                    await call(payloads[i % len(payloads)], timeout=10)
                    latencies.append(time.perf_counter() - t0)
                except grpc.aio.AioRpcError as err:
                    errors[err.code().name] += 1
                i += 7

        await asyncio.gather(*(client(k) for k in range(clients)))
    return {"latencies": latencies, "errors": dict(errors)}


def closed_load(target: str, clients: int, seconds: float, processes: int) -> dict:
    """Closed loop: `clients` raw-Classify callers spread over `processes` processes, started together."""
    per = [clients // processes + (1 if i < clients % processes else 0) for i in range(processes)]
    _, gathered, _ = run_workers(closed_worker, [(target, n, seconds, i) for i, n in enumerate(per) if n], seconds)
    latencies = np.concatenate([np.asarray(g["latencies"], float) for g in gathered])
    errors: Counter = Counter()
    for g in gathered:
        errors.update(g["errors"])
    return {
        "calls_per_s": len(latencies) / seconds,
        "p50_ms": percentile_ms(latencies, 50),
        "p99_ms": percentile_ms(latencies, 99),
        "calls": len(latencies),
        "errors": dict(errors),
    }


def open_worker(
    target: str, rate: float, seconds: float, offset: float, deadline_s: float, seed: int, ready, go, start, results
) -> None:
    """Raw Classify at `rate` per second whatever the server does; one record per call (wall-clock times)."""
    results.put(asyncio.run(_open_async(target, rate, seconds, offset, deadline_s, seed, ready, go, start)))


async def _open_async(target, rate, seconds, offset, deadline_s, seed, ready, go, start) -> dict:
    import grpc

    payloads = _raw_payloads(seed)
    records: list[tuple[float, float, float, int, bool]] = []  # due, sent, done (perf), code, retry hint
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_unary(CLASSIFY)
        await connect(channel, call, payloads[0])
        ready.put(os.getpid())
        await asyncio.get_running_loop().run_in_executor(None, go.wait, 120)
        to_wall = time.time() - time.perf_counter()
        first = start.value - to_wall + offset
        interval = 1.0 / rate
        cpu_at_start = time.process_time()
        gc.disable()  # a collection here would stall every call in flight and be charged to the server

        async def one(payload: bytes, due: float) -> None:
            sent = time.perf_counter()
            code, hint = 0, False
            try:
                await call(payload, timeout=deadline_s)
            except grpc.aio.AioRpcError as err:
                code = err.code().value[0]
                hint = any(key in RETRY_HINT_KEYS for key, _ in (err.trailing_metadata() or ()))
            records.append((due, sent, time.perf_counter(), code, hint))

        tasks, k = [], 0
        while (due := first + k * interval) < first + seconds:
            wait = due - time.perf_counter()
            if wait > 0.0005:
                await asyncio.sleep(wait - 0.0005)
            tasks.append(asyncio.ensure_future(one(payloads[k % len(payloads)], due)))
            k += 1
        await asyncio.gather(*tasks)
        gc.enable()
    array = np.array([r[:3] for r in records], float) + to_wall
    return {
        "times": array,
        "codes": np.array([r[3] for r in records], int),
        "hints": np.array([r[4] for r in records], bool),
        "scheduled": k,
        "cpu_s": time.process_time() - cpu_at_start,
    }


def health_prober(livez_url: str, target: str, seconds: float, ready, go, start, results) -> None:
    """GET /livez and grpc health Check, each every LIVENESS_INTERVAL_S with a LIVENESS_TIMEOUT_S timeout, from
    the load's start for `seconds`: in a process of its own, as the kubelet probes, so that what is measured is
    the server and not a prober sharing a busy process with the senders. Per probe: (sent wall time, seconds,
    outcome: the HTTP status or gRPC code, else the error's name, and how late the probe was sent)."""
    import urllib.error

    import grpc

    def livez() -> str:
        try:
            with urllib.request.urlopen(livez_url, timeout=LIVENESS_TIMEOUT_S) as reply:  # noqa: S310 - loopback
                reply.read()
                return str(reply.status)
        except urllib.error.HTTPError as err:
            return str(err.code)
        except OSError as exc:  # URLError wraps a connect timeout or refusal; a read timeout comes bare
            return type(getattr(exc, "reason", exc)).__name__

    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(HEALTH_CHECK)

        def health() -> str:
            try:
                call(b"", timeout=LIVENESS_TIMEOUT_S)  # an empty HealthCheckRequest: the whole server
                return "OK"
            except grpc.RpcError as err:
                return err.code().name

        grpc.channel_ready_future(channel).result(timeout=30)
        call(b"", timeout=10)
        livez()
        ready.put(os.getpid())
        go.wait(120)
        log: dict[str, list[tuple[float, float, str, float]]] = {"livez": [], "health": []}

        def every_interval(kind: str, probe: Callable[[], str]) -> None:
            time.sleep(max(0.0, start.value - time.time()))
            end, due = start.value + seconds, time.perf_counter()
            while time.time() < end:
                sent, t0 = time.time(), time.perf_counter()
                outcome = probe()
                log[kind].append((sent, time.perf_counter() - t0, outcome, max(0.0, t0 - due)))
                due = max(due + LIVENESS_INTERVAL_S, time.perf_counter())  # a slow probe is not followed by a burst
                time.sleep(max(0.0, due - time.perf_counter()))

        threads = [threading.Thread(target=every_interval, args=("livez", livez))]
        threads.append(threading.Thread(target=every_interval, args=("health", health)))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    results.put(log)


def probe_summary(records: list[tuple[float, float, str, float]], ok: str) -> dict:
    """Count, failures by outcome, latency percentiles (failed probes included) and the prober's own lateness."""
    latency = [seconds for _, seconds, _, _ in records]
    failed = Counter(outcome for _, _, outcome, _ in records if outcome != ok)
    return {
        "count": len(records),
        "failed": sum(failed.values()),
        "failures": dict(failed),
        "p50_ms": percentile_ms(latency, 50),
        "p99_ms": percentile_ms(latency, 99),
        "max_ms": max(latency, default=float("nan")) * 1000,
        "late_p99_ms": percentile_ms([late for _, _, _, late in records], 99),
    }


def describe_probes(summary: dict) -> str:
    failures = f" ({summary['failures']})" if summary["failed"] else ""
    return (
        f"{summary['failed']} of {summary['count']} failed{failures}; p50 {fmt_ms(summary['p50_ms'])}, p99 "
        f"{fmt_ms(summary['p99_ms'])}, max {fmt_ms(summary['max_ms'])} (prober lateness p99 "
        f"{fmt_ms(summary['late_p99_ms'])})"
    )


def raise_fd_limit() -> tuple[int, int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)
