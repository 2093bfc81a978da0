"""Load generators for mnist-bench: closed-loop clients and an open-loop (fixed arrival rate) sender.

Each client runs in a process of its own, so client-side Python does not serialize the calls.
Closed loop: every client keeps one call in flight, the next sent when the last returns; a slow
server slows its clients, so closed loops alone understate the tail. Open loop: calls are sent on
a fixed schedule whatever the server does, and each latency counts from the moment the call was
due (or sent, if later), so a server falling behind shows its queueing in the percentiles.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from proto.contract import IMAGE_SIDE

CONNECT_TIMEOUT_S = 30.0


@dataclass
class LoadResult:
    """What one load level measured: per-call latencies, failed calls by status, wall time."""

    latencies_s: np.ndarray
    errors: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    images_per_call: int = 1
    sent: int = 0  # calls sent (open loop: as scheduled)
    late_p99_ms: float = 0.0  # open loop: how late the sender itself was at the 99th percentile
    reasons: dict[str, int] = field(default_factory=dict)  # open loop: failures by code and what the server said

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


def sample_digits(count: int = 1000) -> np.ndarray:
    """Real MNIST test digits when the data is at hand, else seeded random strokes (same shapes, same cost)."""
    try:
        from training.data import load_split

        return load_split("test").images[:count]
    except Exception:  # noqa: BLE001 - the benchmark must run on a serving-only install
        rng = np.random.default_rng(0)
        return (rng.random((count, IMAGE_SIDE, IMAGE_SIDE)) > 0.8).astype(np.uint8) * 255


def _requests(images_per_call: int, seed: int, digits: np.ndarray | None = None) -> tuple[list, str]:
    """Prebuilt requests (raw MNIST digits) and the method that takes them."""
    from proto.mnist.v1 import classifier_pb2 as pb

    digits = sample_digits() if digits is None else digits
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(digits))
    singles = [pb.ClassifyRequest(raw=digits[i].tobytes()) for i in order]
    if images_per_call == 1:
        return singles, "Classify"
    batches = [
        pb.ClassifyBatchRequest(requests=[singles[(k + j) % len(singles)] for j in range(images_per_call)])
        for k in range(0, 8 * images_per_call, images_per_call)
    ]
    return batches, "ClassifyBatch"


RETRY_AFTER_KEY = "retry-after-ms"  # server/transport/guards.py: the hint a RESOURCE_EXHAUSTED answer carries
MAX_RETRY_AFTER_S = 0.1


def retry_after(error) -> float:
    """Seconds the server asked us to wait before the next call (0 when it gave no hint), at most 0.1 s."""
    for key, value in error.trailing_metadata() or ():
        if key == RETRY_AFTER_KEY:
            try:
                return min(MAX_RETRY_AFTER_S, max(0.0, float(value) / 1000))
            except ValueError:
                return 0.0
    return 0.0


def _connect(call, request) -> None:
    """One call that succeeds, before the clock starts: the connection is up, the server answers."""
    import grpc

    give_up = time.monotonic() + CONNECT_TIMEOUT_S
    while True:
        try:
            call(request, timeout=CONNECT_TIMEOUT_S)
            return
        except grpc.RpcError as exc:  # a busy server sheds load (RESOURCE_EXHAUSTED): try again shortly
            if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or time.monotonic() > give_up:
                raise
            time.sleep(0.01)


class StartLine:
    """Load processes get ready (import, connect) at their own pace, then all start at one moment the parent sets.

    Spawning 16 clients on two busy cores once took longer than any fixed head start, and late starters ran short
    measurements: 16 clients seemed to get half of what they did."""

    def __init__(self, context: Any) -> None:
        self._ready = context.Semaphore(0)
        self._failed = context.Event()
        self._go = context.Event()
        self._at = context.Value("d", 0.0)

    def ready(self, timeout: float = 120.0) -> float:
        """In a load process, once it can send: wait for the others; returns the start time (time.time())."""
        self._ready.release()
        if not self._go.wait(timeout):
            raise TimeoutError("the load never started")
        return self._at.value

    def abort(self) -> None:
        """In a load process that cannot start: tell the parent at once instead of letting it wait."""
        self._failed.set()

    def start(self, processes: list, timeout: float, head_start: float = 0.1) -> float:
        """In the parent: wait until every process is ready, then set the start; returns it (time.time()).
        RuntimeError at once if one aborted or died first."""
        give_up = time.monotonic() + timeout
        waiting = len(processes)
        while waiting:
            if self._ready.acquire(timeout=0.2):
                waiting -= 1
            elif self._failed.is_set() or any(p.exitcode is not None for p in processes):
                raise RuntimeError("a load process could not start")
            elif time.monotonic() > give_up:
                raise RuntimeError(f"{waiting} load processes were not ready within {timeout:g} s")
        self._at.value = time.time() + head_start
        self._go.set()
        return self._at.value


def _closed_loop_client(
    target: str, seconds: float, seed: int, images_per_call: int, digits: np.ndarray, start: StartLine, queue: mp.Queue
) -> None:
    import grpc

    from proto.mnist.v1 import classifier_pb2_grpc as pb_grpc

    try:
        requests, method = _requests(images_per_call, seed, digits)
        channel = grpc.insecure_channel(target)
        call = getattr(pb_grpc.ClassifierStub(channel), method)
        _connect(call, requests[0])
    except BaseException as exc:
        start.abort()
        queue.put(exc)
        raise
    latencies, errors = [], Counter()
    with channel:
        start_at = start.ready()
        while time.time() < start_at:
            time.sleep(0.001)
        end = start_at + seconds
        i = 0
        while time.time() < end:
            t0 = time.perf_counter()
            try:
                call(requests[i % len(requests)], timeout=10)
                latencies.append(time.perf_counter() - t0)
            except grpc.RpcError as exc:
                errors[exc.code().name] += 1
                time.sleep(retry_after(exc))  # a shed call says when to come back: a well-behaved client waits
            i += 1
    queue.put((latencies, dict(errors), i))


def _in_processes(
    worker, arguments: list[tuple], seconds: float, on_start: Callable[[float], None] | None = None
) -> list:
    """Run `worker(*args, start, queue)` in one spawned process per entry of `arguments`, all starting together
    (StartLine); their results, in any order. A process that fails to get ready fails the whole load at once."""
    context = mp.get_context("spawn")
    queue: mp.Queue = context.Queue()
    start = StartLine(context)
    procs = [context.Process(target=worker, args=(*args, start, queue)) for args in arguments]
    for p in procs:
        p.start()
    try:
        start_at = start.start(procs, timeout=120)
    except RuntimeError as problem:
        failure = next((item for item in _drain(queue) if isinstance(item, BaseException)), None)
        for p in procs:
            p.kill()
        raise RuntimeError(f"{problem}: {failure!r}") from failure
    if on_start is not None:
        on_start(start_at)
    gathered = [queue.get(timeout=seconds + 120) for _ in procs]
    for p in procs:
        p.join()
    if failures := [item for item in gathered if isinstance(item, BaseException)]:
        raise RuntimeError(f"a load process failed: {failures[0]!r}") from failures[0]
    return gathered


def _drain(queue: mp.Queue) -> list:
    items = []
    with contextlib.suppress(Exception):
        while True:
            items.append(queue.get(timeout=1.0))
    return items


def closed_loop(target: str, clients: int, seconds: float, images_per_call: int = 1) -> LoadResult:
    """`clients` processes, each with one call in flight for `seconds`."""
    digits = sample_digits()  # read once here, not in every client process (MNIST took each of them ~0.3 s)
    arguments = [(target, seconds, i, images_per_call, digits) for i in range(clients)]
    gathered = _in_processes(_closed_loop_client, arguments, seconds)
    errors: Counter = Counter()
    for _, errs, _ in gathered:
        errors.update(errs)
    latencies = np.concatenate([np.asarray(lat, float) for lat, _, _ in gathered])
    return LoadResult(latencies, dict(errors), seconds, images_per_call, sum(sent for _, _, sent in gathered))


async def _open_loop_sender(
    target: str,
    rate: float,
    seconds: float,
    offset: float,
    images_per_call: int,
    seed: int,
    deadline_s: float,
    digits: np.ndarray,
    start: StartLine,
) -> tuple[list[float], dict[str, int], int, list[float], dict[str, int]]:
    import grpc

    from proto.mnist.v1 import classifier_pb2_grpc as pb_grpc

    requests, method = _requests(images_per_call, seed, digits)
    latencies: list[float] = []
    lateness: list[float] = []
    errors: Counter = Counter()
    reasons: Counter = Counter()
    async with grpc.aio.insecure_channel(target) as channel:
        call = getattr(pb_grpc.ClassifierStub(channel), method)
        try:  # connected (not a call: a server that refuses everything is a fine target)
            await asyncio.wait_for(channel.channel_ready(), CONNECT_TIMEOUT_S)
        except BaseException:
            start.abort()
            raise
        start_at = start.ready()
        perf_start = time.perf_counter() + (start_at - time.time()) + offset
        interval = 1.0 / rate

        async def one(request, due: float) -> None:
            sent = time.perf_counter()
            lateness.append(max(0.0, sent - due))
            try:
                await call(request, timeout=deadline_s)
                latencies.append(time.perf_counter() - max(due, sent))
            except grpc.aio.AioRpcError as exc:
                errors[exc.code().name] += 1
                reasons[f"{exc.code().name}: {(exc.details() or '').split(':')[0][:60]}"] += 1

        tasks = []
        k = 0
        while (due := perf_start + k * interval) < perf_start + seconds:
            wait = due - time.perf_counter()
            if wait > 0.0005:  # the loop's timers are only millisecond-precise: never send more than 0.5 ms early
                await asyncio.sleep(wait - 0.0005)
            tasks.append(asyncio.ensure_future(one(requests[k % len(requests)], due)))
            k += 1
        await asyncio.gather(*tasks)
    return latencies, dict(errors), k, lateness, dict(reasons)


def _open_loop_process(
    target: str,
    rate: float,
    seconds: float,
    offset: float,
    images_per_call: int,
    seed: int,
    deadline_s: float,
    digits: np.ndarray,
    start: StartLine,
    queue: mp.Queue,
) -> None:
    try:
        sender = _open_loop_sender(target, rate, seconds, offset, images_per_call, seed, deadline_s, digits, start)
        result = asyncio.run(sender)
    except BaseException as exc:
        queue.put(exc)
        raise
    queue.put(result)


def open_loop(
    target: str,
    rate: float,
    seconds: float,
    processes: int = 2,
    images_per_call: int = 1,
    deadline_s: float = 5.0,
    on_start: Callable[[float], None] | None = None,
) -> LoadResult:
    """Calls at `rate` per second in all, evenly spaced, from `processes` senders interleaved in time, each with a
    deadline of `deadline_s`; they begin together once every sender is connected (`on_start(time.time())` is told
    when, in the parent)."""
    per_process = rate / processes
    digits = sample_digits()
    gathered = _in_processes(
        _open_loop_process,
        [
            (target, per_process, seconds, i / rate, images_per_call, 100 + i, deadline_s, digits)
            for i in range(processes)
        ],
        seconds,
        on_start,
    )
    errors: Counter = Counter()
    reasons: Counter = Counter()
    for _, errs, _, _, said in gathered:
        errors.update(errs)
        reasons.update(said)
    latencies = np.concatenate([np.asarray(lat, float) for lat, *_ in gathered])
    lateness = np.concatenate([np.asarray(late, float) for _, _, _, late, _ in gathered])
    return LoadResult(
        latencies,
        dict(errors),
        seconds,
        images_per_call,
        sent=sum(sent for _, _, sent, _, _ in gathered),
        late_p99_ms=float(np.percentile(lateness, 99) * 1000) if len(lateness) else 0.0,
        reasons=dict(reasons),
    )


# --- one client, in this process: latency without process start-up in the way ----------------------------


def classify_p50(stub: Any, requests: list[Any], seconds: float) -> float:
    """Classify p50 (ms) of one client in this process, calls back to back for `seconds`."""
    latencies, started, i = [], time.perf_counter(), 0
    while time.perf_counter() - started < seconds:
        t0 = time.perf_counter()
        stub.Classify(requests[i % len(requests)], timeout=10)
        latencies.append(time.perf_counter() - t0)
        i += 1
    return float(np.percentile(latencies, 50) * 1000)


def alternating_p50s(targets: list[str], rounds: int, seconds: float) -> list[list[float]]:
    """Classify p50 (ms) of one client against each target in turn, `rounds` times: both see the same minutes."""
    import grpc

    from proto.mnist.v1 import classifier_pb2 as pb
    from proto.mnist.v1 import classifier_pb2_grpc as pb_grpc

    requests = [pb.ClassifyRequest(raw=digit.tobytes()) for digit in sample_digits(64)]
    channels = [grpc.insecure_channel(target) for target in targets]
    stubs = [pb_grpc.ClassifierStub(channel) for channel in channels]
    try:
        for stub in stubs:
            classify_p50(stub, requests, 0.3)  # connected and warm
        p50s: list[list[float]] = [[] for _ in targets]
        for _ in range(rounds):
            for stub, values in zip(stubs, p50s, strict=True):
                values.append(classify_p50(stub, requests, seconds))
        return p50s
    finally:
        for channel in channels:
            channel.close()
