"""mnist-attack: hostile clients against mnist-serve, each check judged against the server's contract.

Starts its own servers on loopback (`loadtest.servers.ServerProcess`, the bundled model, a free gRPC
port and a free metrics port each; more flags with `--server-args`), runs the checks below one by
one, and writes DIR/report.json and DIR/report.md (rewritten after every check, so a run cut short
still leaves its report): one line per check with what was sent, what was measured, the target
and PASS / FAIL / SKIP. Exit status 1 when any line FAILs. Loopback only: nothing leaves the machine.

Checks share one server where they cannot disturb each other (malformed messages, image modes,
non-digits); memory, overload, idle-client and shutdown checks get a fresh server each. The load
of the overload checks comes from separate processes (one Python process cannot send fast enough on
two cores), and the rate they actually reached is reported beside the rate asked for, with the CPU
the senders, the server and the whole machine used. `overload` loads the server as configured (the
CPU model: senders, server and model share the cores); `overload-device` loads a server whose
model runs off the CPU (emulated device time), where the model, not the CPU, is the limit. Every step
has a time limit; the whole run stays within `--budget-s` (a check that no longer fits is SKIPped).
A check that needs a server flag the server does not accept yet FAILs with "flag missing".
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import multiprocessing as mp
import os
import re
import resource
import shlex
import signal
import subprocess
import sys
import threading
import time
import traceback
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from loadtest.servers import ServerProcess, free_port, wait_until_serving

CLASSIFY = "/mnist.v1.Classifier/Classify"
CLASSIFY_BATCH = "/mnist.v1.Classifier/ClassifyBatch"
GET_MODEL_INFO = "/mnist.v1.Classifier/GetModelInfo"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
HEALTH_WATCH = "/grpc.health.v1.Health/Watch"
REFLECTION_V1ALPHA = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
REFLECTION_V1 = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
RETRY_HINT_KEYS = ("retry-after-ms", "grpc-retry-pushback-ms")
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
# Bytes no protobuf message parses (checked for every request type in tests/test_attack.py). A known field
# with a *different but valid* wire type is not among them: protobuf keeps it as an unknown field, by design.
GARBAGE = (
    ("ff-x4", b"\xff\xff\xff\xff"),  # a tag varint that never ends
    ("truncated-varint", b"\x08\x80"),  # field 1, varint, continuation bit set and nothing after
    ("truncated-length", b"\x0a\x05ab"),  # field 1, 5 bytes announced, 2 present
    ("wire-type-7", b"\x0f\x00"),  # field 1 with the invalid wire type 7
    ("stray-end-group", b"\x0c"),  # end-group marker (wire type 4) with no group open
)
PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"
INFO = "INFO"  # a measurement reported for comparison, not judged
RECOVERY_WATCH_S = 5.0  # overload: how long after the load the recovery probe keeps measuring
PROBE_INTERVAL_S = 0.01  # the probe sends at most 100 calls/s (unpaced, fast refusals made it a 700/s sender)
LIVENESS_INTERVAL_S = 0.1  # overload: /livez and grpc health Check are each asked this often during the load ...
LIVENESS_TIMEOUT_S = 1.0  # ... with this timeout (a kubelet probe's default is 1 s)
LIVENESS_P99_MS = 100.0
# Flags the hardened server is to accept; the report notes which it does.
EXPECTED_FLAGS = (
    "--metrics-host",
    "--max-image-pixels",
    "--max-request-pixels",
    "--max-decoding-pixels",
    "--queue-target-ms",
    "--max-concurrent-calls",
    "--max-streams",
    "--stream-idle-seconds",
)


# --- results -----------------------------------------------------------------------------------------


class Skip(Exception):
    """The check cannot run here (the reason is reported)."""


class Fail(Exception):
    """The check failed before it could measure anything (e.g. a flag the server does not accept)."""


@dataclass
class Line:
    name: str
    status: str
    sent: str
    measured: str
    target: str
    reason: str = ""
    seconds: float = 0.0
    data: dict = field(default_factory=dict)


def judge(name: str, ok: bool, sent: str, measured: str, target: str, reason: str = "", **data: Any) -> Line:
    return Line(name, PASS if ok else FAIL, sent, measured, target, "" if ok else reason, data=data)


def inform(name: str, sent: str, measured: str, **data: Any) -> Line:
    """A line that reports a measurement beside judged ones (e.g. for comparison) and passes or fails nothing."""
    return Line(name, INFO, sent, measured, "(information, not judged)", data=data)


@dataclass
class Check:
    name: str
    group: str
    sends: str
    target: str
    quick: bool
    timeout_s: float
    estimate_s: float
    fn: Callable[[Ctx], list[Line]]
    quick_estimate_s: float = 0.0


CHECKS: list[Check] = []


def check(
    name: str,
    group: str,
    sends: str,
    target: str,
    *,
    quick: bool,
    timeout_s: float,
    estimate_s: float,
    quick_estimate_s: float = 0.0,
):
    def register(fn: Callable[[Ctx], list[Line]]) -> Callable[[Ctx], list[Line]]:
        CHECKS.append(Check(name, group, sends, target, quick, timeout_s, estimate_s, fn, quick_estimate_s))
        return fn

    return register


# --- servers -----------------------------------------------------------------------------------------


def log_tail(path: Path, lines: int = 6) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()[1:]  # the first line is the command
    except OSError:
        return ""
    return " | ".join(text[-lines:])


class AttackServer(ServerProcess):
    """mnist-serve on free gRPC and metrics ports, its log in the report folder, its process watched with psutil."""

    def __init__(self, name: str, args: list[str], log_dir: Path, wait_s: float = 90.0) -> None:
        self.metrics_port = free_port()
        flags = ["--metrics-port", str(self.metrics_port), "--http-port", "0", "--log-level", "INFO"]
        super().__init__([*flags, *args], wait_s=wait_s)
        self.name = name
        self.log_path = log_dir / f"server-{name}.log"
        self._log = None

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def livez_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/livez"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def __enter__(self) -> AttackServer:
        self._log = self.log_path.open("w")
        self._log.write("$ " + shlex.join(self.command) + "\n")
        self._log.flush()
        self.process = subprocess.Popen(self.command, stdout=self._log, stderr=subprocess.STDOUT)
        if not wait_until_serving(self.process, self.target, self.wait_s):
            exited = self.process.poll()
            self.close()
            tail = log_tail(self.log_path, 3)
            missing = re.search(r"unrecognized arguments: ([^|]*)", tail)
            if missing:
                raise Fail(f"flag missing: the server does not accept {missing.group(1).strip()}")
            if exited is not None:
                raise Fail(f"the server exited with status {exited} at start: {tail}")
            raise Fail(f"server did not become SERVING within {self.wait_s:.0f} s: {tail}")
        return self

    def close(self, wait_s: float = 15.0) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(wait_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __exit__(self, *exc: object) -> None:
        self.close()


def server_help() -> str:
    done = subprocess.run([sys.executable, "-m", "server.app", "--help"], capture_output=True, text=True, timeout=120)
    return " ".join(done.stdout.split())


def flag_default(help_text: str, flag: str) -> str | None:
    """The default `mnist-serve --help` prints for `flag` ("... default 40000000]")."""
    match = re.search(re.escape(flag) + r" [A-Z_]+ [^\[]*\[env [A-Z_]+; default ([^\]]*)\]", help_text)
    return match.group(1).strip() or None if match else None


def flag_value(args: list[str], flag: str) -> str | None:
    """The last value given to `flag` in a list of arguments (`--flag V` or `--flag=V`)."""
    value = None
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


# --- the run's context -------------------------------------------------------------------------------


class Ctx:
    """What checks share: options, the report folder, servers, the server's flags and limits, the clock."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.quick: bool = args.quick
        self.out: Path = args.out
        self.server_args: list[str] = shlex.split(args.server_args)
        self.senders: int = args.senders
        self.servers: dict[str, AttackServer] = {}
        self._help: str | None = None
        self.notes: list[str] = []
        self.check_thread: threading.Thread | None = None

    # flags and limits the server was started with
    @property
    def help(self) -> str:
        if self._help is None:
            self._help = server_help()
        return self._help

    def has_flag(self, flag: str) -> bool:
        return re.search(re.escape(flag) + r"\b", self.help) is not None

    def setting(self, flag: str, extra: list[str] | None = None) -> float | None:
        """The value `flag` has in a server started with our arguments: given, else the server's default."""
        text = flag_value([*self.server_args, *(extra or [])], flag) or flag_default(self.help, flag)
        try:
            return float(text) if text is not None else None
        except ValueError:
            return None

    def max_image_pixels(self) -> int:
        return int(self.setting("--max-image-pixels") or 40_000_000)

    # servers
    def server(self, key: str, extra: list[str] | None = None) -> AttackServer:
        """The server named `key`, started with `extra` flags the first time (or again if it died)."""
        if threading.current_thread() is not self.check_thread:
            raise Fail("check abandoned (it ran out of time)")  # a timed-out check must not start servers
        current = self.servers.get(key)
        if current is not None and current.alive():
            with Client(current.target) as client:
                if client.health(timeout=5).code == "OK":
                    return current
            self.notes.append(f"server {key} stopped answering health checks; started again")
        if current is not None:
            current.close()
        server = AttackServer(key, [*self.server_args, *(extra or [])], self.out)
        server.__enter__()
        self.servers[key] = server
        return server

    def close_servers(self, keep: tuple[str, ...] = ()) -> None:
        for key in list(self.servers):
            if key not in keep:
                self.servers.pop(key).close()

    def short(self, quick: float, full: float) -> float:
        return quick if self.quick else full


# --- talking to the server (this process) ------------------------------------------------------------


def top_level_fields(data: bytes) -> set[int]:
    """Field numbers present at the top level of a serialized message (empty set if it does not scan)."""
    numbers, pos = set(), 0
    try:
        while pos < len(data):
            key, pos = _varint(data, pos)
            number, wire = key >> 3, key & 7
            numbers.add(number)
            if wire == 0:
                _, pos = _varint(data, pos)
            elif wire == 2:
                length, pos = _varint(data, pos)
                pos += length
            elif wire in (1, 5):
                pos += 8 if wire == 1 else 4
            elif wire not in (3, 4):
                return numbers
    except IndexError:
        pass
    return numbers


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


@dataclass
class Reply:
    code: str
    seconds: float
    details: str = ""
    response: Any = None  # a parsed ClassifyResponse / ClassifyBatchResponse on OK
    wire: set[int] = field(default_factory=set)  # top-level field numbers of a ClassifyResponse on the wire
    trailing: tuple = ()


def response_field(response: Any, name: str) -> Any:
    """`response.name`, or None when the generated stubs lack the field (not yet regenerated)."""
    if response is None or name not in response.DESCRIPTOR.fields_by_name:
        return None
    return getattr(response, name)


class Client:
    """Raw-bytes calls to the server, timed; failures come back as a status name, never raised."""

    def __init__(self, target: str) -> None:
        import grpc

        self.grpc = grpc
        self.channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        self._classify = self.channel.unary_unary(CLASSIFY)
        self._batch = self.channel.unary_unary(CLASSIFY_BATCH)
        self._check = self.channel.unary_unary(HEALTH_CHECK)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.channel.close()

    def _call(self, method: Any, payload: bytes, timeout: float, parse: Any) -> Reply:
        started = time.perf_counter()
        try:
            data, call = method.with_call(payload, timeout=timeout)
        except self.grpc.RpcError as err:
            return Reply(
                err.code().name,
                time.perf_counter() - started,
                err.details() or "",
                trailing=tuple(err.trailing_metadata() or ()),
            )
        seconds = time.perf_counter() - started
        return Reply("OK", seconds, "", parse(data), top_level_fields(data), tuple(call.trailing_metadata() or ()))

    def classify(self, request: Any, timeout: float = 10.0) -> Reply:
        from proto.mnist.v1 import classifier_pb2 as pb

        payload = request if isinstance(request, bytes) else request.SerializeToString()
        return self._call(self._classify, payload, timeout, pb.ClassifyResponse.FromString)

    def classify_batch(self, requests: list[Any], timeout: float = 10.0) -> Reply:
        from proto.mnist.v1 import classifier_pb2 as pb

        payload = pb.ClassifyBatchRequest(requests=requests).SerializeToString()
        return self._call(self._batch, payload, timeout, pb.ClassifyBatchResponse.FromString)

    def health(self, timeout: float = 5.0) -> Reply:
        from grpc_health.v1 import health_pb2

        return self._call(self._check, b"", timeout, health_pb2.HealthCheckResponse.FromString)


def raw_request(data: bytes) -> Any:
    from proto.mnist.v1 import classifier_pb2 as pb

    return pb.ClassifyRequest(raw=data)


def encoded_request(data: bytes) -> Any:
    from proto.mnist.v1 import classifier_pb2 as pb

    return pb.ClassifyRequest(encoded=data)


def scrape(url: str, timeout: float = 2.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as reply:  # noqa: S310 - loopback only
        return reply.read().decode()


def metric(text: str, name: str, **labels: str) -> float | None:
    """Sum of the samples called `name` whose labels include `labels`; None when there is no such sample."""
    from prometheus_client.parser import text_string_to_metric_families

    total, seen = 0.0, False
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
                seen = True
    return total if seen else None


def percentile_ms(seconds: list[float] | np.ndarray, q: float) -> float:
    values = np.asarray(seconds, float)
    return float(np.percentile(values, q) * 1000) if len(values) else float("nan")


def fmt_ms(value: float) -> str:
    return "n/a" if value != value else (f"{value:.1f} ms" if value >= 10 else f"{value:.2f} ms")


def mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:,.0f} MB"


def digits(count: int, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    from loadtest.attacks_images import mnist_test

    images, labels = mnist_test()
    return images[start : start + count], labels[start : start + count]


# --- server memory and CPU ---------------------------------------------------------------------------


def rss(pid: int) -> int:
    import psutil

    return psutil.Process(pid).memory_info().rss


def reset_peak(pid: int) -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of `pid` to its current RSS (Linux >= 4.0)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class Sampler:
    """Samples a process's RSS and CPU time every `interval` s in a thread (and optionally a /metrics gauge)."""

    def __init__(self, pid: int, interval: float = 0.02, metrics_url: str = "", gauge: str = "") -> None:
        import psutil

        self.process = psutil.Process(pid)
        self.interval = interval
        self.metrics_url, self.gauge = metrics_url, gauge
        self.times: list[float] = []
        self.rss: list[int] = []
        self.cpu: list[float] = []
        self.gauge_samples: list[tuple[float, float | None]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True)]
        if gauge:
            self._threads.append(threading.Thread(target=self._run_gauge, daemon=True))

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with self.process.oneshot():
                    cpu = self.process.cpu_times()
                    self.rss.append(self.process.memory_info().rss)
                    self.cpu.append(cpu.user + cpu.system)
                    self.times.append(time.monotonic())
            except Exception:  # noqa: BLE001 - the process has exited
                return
            self._stop.wait(self.interval)

    def _run_gauge(self) -> None:
        while not self._stop.is_set():
            try:
                value = metric(scrape(self.metrics_url, 1.0), self.gauge)
            except Exception:  # noqa: BLE001
                value = None
            self.gauge_samples.append((time.monotonic(), value))
            self._stop.wait(0.1)

    def __enter__(self) -> Sampler:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(5)

    @property
    def peak(self) -> int:
        return max(self.rss, default=0)


# --- load from other processes -----------------------------------------------------------------------


def _gather(queue: Any, procs: list, count: int, timeout: float, what: str) -> list:
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
        _gather(ready, procs, len(procs), 90, "load generators starting")
        start_at = time.time() + lead_s
        start.value = start_at
        go.set()
        extra = during(start_at) if during else None
        gathered = _gather(results, procs, len(procs), seconds + lead_s + 90, "load generators")
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


def _closed_worker(target: str, clients: int, seconds: float, seed: int, ready, go, start, results) -> None:
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
    _, gathered, _ = run_workers(_closed_worker, [(target, n, seconds, i) for i, n in enumerate(per) if n], seconds)
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


def _open_worker(
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


def _health_prober(livez_url: str, target: str, seconds: float, ready, go, start, results) -> None:
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


# --- idle streams and slow connections, held by another process ---------------------------------------


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
        report.update(_gather(ready, [proc], 1, timeout, f"{kind} holder")[0])
        yield report
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            report.update(_gather(results, [proc], 1, 30, f"{kind} holder")[0])
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join(5)


def raise_fd_limit() -> tuple[int, int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


# --- probes: what a well-behaved client sees -----------------------------------------------------------


def probe(target: str, seconds: float, threads: int = 2, classify_every: int = 1) -> dict:
    """`threads` clients alternating raw Classify and health Check for `seconds`; latencies of each."""
    from grpc_health.v1 import health_pb2

    images, _ = digits(64)
    payloads = [raw_request(image.tobytes()).SerializeToString() for image in images]
    check_payload = health_pb2.HealthCheckRequest(service="").SerializeToString()
    result: dict[str, list] = {"classify": [], "health": []}
    errors: Counter = Counter()
    lock = threading.Lock()

    def run(offset: int) -> None:
        import grpc

        with grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            classify, health = channel.unary_unary(CLASSIFY), channel.unary_unary(HEALTH_CHECK)
            with contextlib.suppress(grpc.RpcError):
                health(check_payload, timeout=5)
            end, i = time.monotonic() + seconds, offset
            while time.monotonic() < end:
                for kind, method, payload in (
                    ("classify", classify, payloads[i % 64]),
                    ("health", health, check_payload),
                ):
                    t0 = time.perf_counter()
                    try:
                        method(payload, timeout=2)
                        with lock:
                            result[kind].append(time.perf_counter() - t0)
                    except grpc.RpcError as err:
                        with lock:
                            errors[f"{kind} {err.code().name}"] += 1
                i += 1

    pool = [threading.Thread(target=run, args=(k,), daemon=True) for k in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(seconds + 30)
    return {
        "classify_p99_ms": percentile_ms(result["classify"], 99),
        "health_p99_ms": percentile_ms(result["health"], 99),
        "classify_p50_ms": percentile_ms(result["classify"], 50),
        "calls": len(result["classify"]) + len(result["health"]),
        "errors": dict(errors),
    }


def error_rate(probed: dict) -> float:
    failed = sum(probed["errors"].values())
    return failed / max(1, failed + probed["calls"])


# === the checks ========================================================================================

# --- 5. malformed messages (shared server) -----------------------------------------------------------


def _send_garbage(channel: Any, path: str, kind: str, payload: bytes) -> str:
    import grpc

    try:
        if kind == "unary":
            channel.unary_unary(path)(payload, timeout=5)
            return "OK"
        if kind == "server-stream":
            for _ in channel.unary_stream(path)(payload, timeout=3):
                return "OK (a response streamed)"
            return "OK"
        for _ in channel.stream_stream(path)(iter([payload]), timeout=3):
            return "OK (a response streamed)"
        return "OK"
    except grpc.RpcError as err:
        return err.code().name


def _reflection_v1_served(channel: Any) -> bool:
    import grpc
    from grpc_reflection.v1alpha import reflection_pb2

    request = reflection_pb2.ServerReflectionRequest(list_services="").SerializeToString()
    try:
        for _ in channel.stream_stream(REFLECTION_V1)(iter([request]), timeout=5):
            return True
        return True
    except grpc.RpcError as err:
        return err.code().name != "UNIMPLEMENTED"


MALFORMED_TARGETS = (  # line name, metric label (the method's short name), path, kind
    ("Classify", "Classify", CLASSIFY, "unary"),
    ("ClassifyBatch", "ClassifyBatch", CLASSIFY_BATCH, "unary"),
    ("GetModelInfo", "GetModelInfo", GET_MODEL_INFO, "unary"),
    ("health.Check", "Check", HEALTH_CHECK, "unary"),
    ("health.Watch", "Watch", HEALTH_WATCH, "server-stream"),
    ("reflection.v1alpha", "ServerReflectionInfo", REFLECTION_V1ALPHA, "bidi"),
    ("reflection.v1", "ServerReflectionInfo", REFLECTION_V1, "bidi"),
)


@check(
    "malformed",
    "5 malformed messages",
    f"{len(GARBAGE)} undecodable payloads ({', '.join(n for n, _ in GARBAGE)}) to every method (Classify, "
    "ClassifyBatch, GetModelInfo, health Check and Watch, reflection v1alpha and v1 if served), identity "
    "serializers",
    "every one INVALID_ARGUMENT (never INTERNAL/UNKNOWN); mnist_requests_total{method=<short name>,"
    'code="INVALID_ARGUMENT"} rises by the number sent',
    quick=True,
    timeout_s=90,
    estimate_s=5,
)
def check_malformed(ctx: Ctx) -> list[Line]:
    import grpc

    server = ctx.server("shared")
    lines = []
    with grpc.insecure_channel(server.target) as channel:
        v1_served = _reflection_v1_served(channel)
        for short, label, path, kind in MALFORMED_TARGETS:
            name = f"malformed.{short}"
            sent = f"{len(GARBAGE)} garbage payloads to {path} ({kind})"
            if path == REFLECTION_V1 and not v1_served:
                lines.append(Line(name, SKIP, sent, "", "INVALID_ARGUMENT", "grpc.reflection.v1 is not served"))
                continue
            before = (
                metric(scrape(server.metrics_url), "mnist_requests_total", method=label, code="INVALID_ARGUMENT") or 0.0
            )
            codes = Counter(_send_garbage(channel, path, kind, payload) for _, payload in GARBAGE)
            counted, waited = 0.0, time.monotonic() + 1.0
            while True:  # the counter is written before the status is sent, but allow the scrape a moment
                counted = (
                    metric(scrape(server.metrics_url), "mnist_requests_total", method=label, code="INVALID_ARGUMENT")
                    or 0.0
                ) - before
                if counted >= len(GARBAGE) or time.monotonic() > waited:
                    break
                time.sleep(0.1)
            all_invalid = codes == Counter({"INVALID_ARGUMENT": len(GARBAGE)})
            measured = f"codes {dict(codes)}; counter {label}/INVALID_ARGUMENT +{counted:g}"
            problems = [] if all_invalid else [f"answered {dict(codes)}"]
            if counted != len(GARBAGE):
                problems.append(f"counted {counted:g} of {len(GARBAGE)}")
            lines.append(
                judge(
                    name,
                    not problems,
                    sent,
                    measured,
                    f"{len(GARBAGE)}x INVALID_ARGUMENT, counted",
                    "; ".join(problems),
                    codes=dict(codes),
                    counted=counted,
                )
            )
    return lines


def group_request(raw: bytes, overlong: bool = False) -> bytes:
    """ClassifyRequest{raw} followed by an unknown group (field 100) that holds fields 1 and 2 inside.

    `overlong`: the raw field's length is written with a needless extra varint byte, so the message
    does not re-serialize to its own size (a server then takes its slow, exact wire scan)."""
    length = varint(len(raw))
    if overlong:
        length = (
            bytes([length[0] | 0x80, *length[1:-1], length[-1] | 0x80, 0x00])
            if len(length) > 1
            else bytes([length[0] | 0x80, 0x00])
        )
    inner = b"\x0a\x03abc" + b"\x12\x03def"
    return b"\x12" + length + raw + varint(100 << 3 | 3) + inner + varint(100 << 3 | 4)


@check(
    "unknown-fields",
    "5 malformed messages",
    "valid raw ClassifyRequests plus unknown fields: a group (field 100, wire types 3/4) holding fields 1 and 2, "
    "the same with a non-canonical length (forces an exact wire scan), unknown varint and length-delimited fields",
    "OK with the right digit (never 'both set')",
    quick=True,
    timeout_s=30,
    estimate_s=1,
)
def check_unknown_fields(ctx: Ctx) -> list[Line]:
    server = ctx.server("shared")
    images, labels = digits(3, start=20)
    cases = [
        ("group", "raw + unknown group 100 {1: 'abc', 2: 'def'}", group_request(images[0].tobytes()), labels[0]),
        (
            "group-overlong",
            "as above, raw length written in one byte too many",
            group_request(images[1].tobytes(), overlong=True),
            labels[1],
        ),
        (
            "varint-length",
            "raw + unknown varint field 50 and length-delimited field 51",
            raw_request(images[2].tobytes()).SerializeToString()
            + varint(50 << 3)
            + varint(12345)
            + varint(51 << 3 | 2)
            + b"\x04wxyz",
            labels[2],
        ),
    ]
    lines = []
    with Client(server.target) as client:
        for name, what, payload, label in cases:
            reply = client.classify(payload)
            digit = response_field(reply.response, "digit")
            ok = reply.code == "OK" and digit == label
            measured = f"{reply.code} digit {digit}" + (f" ({reply.details})" if reply.details else "")
            lines.append(
                judge(
                    f"unknown-fields.{name}",
                    ok,
                    what,
                    measured,
                    f"OK, digit {label}",
                    reply.details or f"digit {digit}, expected {label}",
                )
            )
    return lines


# --- 4. no confident nonsense (shared server) ----------------------------------------------------------


def digit_flag(reply: Reply) -> str:
    """'true' / 'false' / 'field missing' (stubs without is_digit)."""
    value = response_field(reply.response, "is_digit")
    return "field missing" if value is None else str(bool(value)).lower()


@check(
    "modes",
    "4 no confident nonsense",
    "one MNIST test digit per image mode, dark ink on white at 112x112: 16-bit PNG (I;16), mode-I digit above "
    "8 bits as 16-bit PNG, palette PNG with transparency, LA, RGBA on transparent black, CMYK JPEG, 1-bit PNG, "
    "grayscale JPEG, progressive JPEG, EXIF-rotated JPEG",
    "OK with the right digit, and is_digit not false unless the same digit sent raw is flagged too",
    quick=True,
    timeout_s=60,
    estimate_s=2,
)
def check_modes(ctx: Ctx) -> list[Line]:
    from loadtest.attacks_images import mnist_test, mode_cases

    server = ctx.server("shared")
    images, _ = mnist_test()
    lines = []
    with Client(server.target) as client:
        for case in mode_cases():
            reply = client.classify(encoded_request(case.data))
            digit, flag = response_field(reply.response, "digit"), digit_flag(reply)
            # The mode must not change the verdict: about 1% of MNIST's own digits are flagged sent raw.
            raw_flag = digit_flag(client.classify(raw_request(images[case.index].tobytes())))
            ok = reply.code == "OK" and digit == case.label and (flag != "false" or raw_flag == "false")
            measured = f"{reply.code}" + (
                f" digit {digit}, is_digit {flag} (sent raw: {raw_flag})"
                if reply.code == "OK"
                else f": {reply.details[:90]}"
            )
            reason = (
                reply.details[:90]
                if reply.code != "OK"
                else (
                    f"digit {digit}, expected {case.label}"
                    if digit != case.label
                    else "is_digit false for a digit the raw path accepts"
                )
            )
            lines.append(judge(f"modes.{case.name}", ok, case.what, measured, f"OK, digit {case.label}", reason))
    return lines


@check(
    "corrupt",
    "4 no confident nonsense",
    "truncated PNG and JPEG (first half), PNG with a flipped IDAT CRC and with a flipped IHDR CRC, a valid PNG "
    "header then garbage; a JPEG with 200 bytes zeroed in the middle",
    "INVALID_ARGUMENT; the zeroed JPEG: INVALID_ARGUMENT or is_digit=false",
    quick=True,
    timeout_s=30,
    estimate_s=1,
)
def check_corrupt(ctx: Ctx) -> list[Line]:
    from loadtest.attacks_images import corrupt_cases

    server = ctx.server("shared")
    must, either = corrupt_cases()
    lines = []
    with Client(server.target) as client:
        for case in must:
            reply = client.classify(encoded_request(case.data))
            measured = reply.code + (
                f": {reply.details[:90]}" if reply.details else f" digit {response_field(reply.response, 'digit')}"
            )
            lines.append(
                judge(
                    f"corrupt.{case.name}",
                    reply.code == "INVALID_ARGUMENT",
                    case.what,
                    measured,
                    "INVALID_ARGUMENT",
                    f"answered {reply.code}",
                )
            )
        for case in either:
            reply = client.classify(encoded_request(case.data))
            flag = digit_flag(reply) if reply.code == "OK" else "-"
            if reply.code == "INVALID_ARGUMENT":
                ok, measured, reason = True, f"INVALID_ARGUMENT: {reply.details[:90]}", ""
            else:
                digit = response_field(reply.response, "digit")
                ok = reply.code == "OK" and flag == "false"
                measured = f"{reply.code} digit {digit}, is_digit {flag}"
                reason = "field missing: is_digit" if flag == "field missing" else f"{reply.code}, is_digit {flag}"
            lines.append(
                judge(
                    f"corrupt.{case.name}",
                    ok,
                    case.what,
                    measured,
                    "INVALID_ARGUMENT or is_digit=false",
                    reason,
                    outcome=reply.code,
                    is_digit=flag,
                )
            )
    return lines


@check(
    "blank",
    "4 no confident nonsense",
    "raw images all 0, all 255, all 128; a white PNG and a flat gray JPEG",
    "INVALID_ARGUMENT",
    quick=True,
    timeout_s=30,
    estimate_s=1,
)
def check_blank(ctx: Ctx) -> list[Line]:
    from loadtest.attacks_images import blank_cases

    server = ctx.server("shared")
    lines = []
    with Client(server.target) as client:
        for case in blank_cases():
            reply = client.classify(raw_request(case.data) if case.raw else encoded_request(case.data))
            measured = reply.code + (
                f": {reply.details[:80]}"
                if reply.details
                else f" digit {response_field(reply.response, 'digit')} confidence "
                f"{response_field(reply.response, 'confidence'):.3f}"
            )
            lines.append(
                judge(
                    f"blank.{case.name}",
                    reply.code == "INVALID_ARGUMENT",
                    case.what,
                    measured,
                    "INVALID_ARGUMENT",
                    f"answered {reply.code}",
                )
            )
    return lines


@check(
    "nondigits",
    "4 no confident nonsense",
    "non-digits: raw noise (dense and sparse), a 10000x1 line PNG, random-line PNGs, letters A K W X M (PNG) and "
    "A K X (raw), checkerboards (PNG, raw), a noise PNG",
    ">= 90% flagged: is_digit=false, or refused INVALID_ARGUMENT",
    quick=True,
    timeout_s=60,
    estimate_s=2,
)
def check_nondigits(ctx: Ctx) -> list[Line]:
    from loadtest.attacks_images import nondigit_cases

    server = ctx.server("shared")
    cases = nondigit_cases()
    flagged, refused, missing, wire_score, missed = 0, 0, 0, 0, []
    with Client(server.target) as client:
        for case in cases:
            reply = client.classify(raw_request(case.data) if case.raw else encoded_request(case.data))
            flag = digit_flag(reply) if reply.code == "OK" else "-"
            wire_score += 6 in reply.wire
            if reply.code == "INVALID_ARGUMENT":
                flagged += 1
                refused += 1
            elif reply.code == "OK" and flag == "false":
                flagged += 1
            else:
                missing += flag == "field missing"
                digit = response_field(reply.response, "digit")
                conf = response_field(reply.response, "confidence")
                missed.append(
                    f"{case.name}: {reply.code} {digit} ({conf or 0:.2f})"
                    if reply.code == "OK"
                    else f"{case.name}: {reply.code}"
                )
    rate = flagged / len(cases)
    measured = (
        f"{flagged}/{len(cases)} flagged ({100 * rate:.0f}%: {refused} INVALID_ARGUMENT, {flagged - refused} "
        f"is_digit=false); not flagged: {', '.join(missed) or 'none'}"
    )
    reason = f"flagged {100 * rate:.0f}% < 90%"
    if missing:
        reason = "field missing: is_digit (stubs not regenerated); " + reason
    elif flagged - refused and not wire_score:
        reason = "the server never sent digit_score: is_digit=false may only be the proto default"
        rate = refused / len(cases)
    return [
        judge(
            "nondigits",
            rate >= 0.9,
            f"{len(cases)} crafted non-digits",
            measured,
            ">= 90% flagged",
            reason,
            rate=rate,
            missed=missed,
        )
    ]


@check(
    "digits",
    "4 no confident nonsense",
    "200 raw MNIST test digits (test #0..199) through Classify",
    "is_digit true for >= 97% (accuracy reported)",
    quick=True,
    timeout_s=60,
    estimate_s=2,
)
def check_digits(ctx: Ctx) -> list[Line]:
    server = ctx.server("shared")
    images, labels = digits(200)
    flagged, right, missing, failed = 0, 0, 0, Counter()
    with Client(server.target) as client:
        for image, label in zip(images, labels, strict=True):
            reply = client.classify(raw_request(image.tobytes()))
            if reply.code != "OK":
                failed[reply.code] += 1
                continue
            right += response_field(reply.response, "digit") == label
            flag = digit_flag(reply)
            missing += flag == "field missing"
            flagged += flag == "true"
    rate = flagged / len(labels)
    measured = f"is_digit true {flagged}/{len(labels)} ({100 * rate:.1f}%); right digit {right}/{len(labels)}" + (
        f"; failed {dict(failed)}" if failed else ""
    )
    reason = "field missing: is_digit (stubs not regenerated)" if missing else f"{100 * rate:.1f}% < 97%"
    return [
        judge(
            "digits",
            rate >= 0.97 and not missing,
            "200 raw MNIST test digits",
            measured,
            ">= 97% is_digit",
            reason,
            rate=rate,
            accuracy=right / len(labels),
        )
    ]


# --- 3. where the metrics listen -------------------------------------------------------------------------


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


# --- 1. decode budgets (fresh servers) ---------------------------------------------------------------


def warm(client: Client) -> None:
    images, _ = digits(1)
    client.classify(raw_request(images[0].tobytes()), timeout=30)


@check(
    "bomb",
    "1 decode budgets",
    "a 6000x6000 grayscale PNG of ~50 KB (a decompression bomb: 36 MB of pixels) via Classify (3 times; once in "
    "--quick)",
    "INVALID_ARGUMENT (over the pixel limit) within 50 ms (median), server RSS growth < 50 MB",
    quick=True,
    timeout_s=90,
    estimate_s=15,
    quick_estimate_s=6,
)
def check_bomb(ctx: Ctx) -> list[Line]:
    from loadtest.attacks_images import bomb_png

    bomb = bomb_png()
    server = ctx.server("bomb")
    codes, times, growth, details = [], [], [], ""
    with Client(server.target) as client:
        warm(client)
        for _ in range(1 if ctx.quick else 3):
            before = rss(server.pid)
            reset_peak(server.pid)
            with Sampler(server.pid) as sampler:
                reply = client.classify(encoded_request(bomb), timeout=30)
            peak = max(peak_rss(server.pid) or 0, sampler.peak)
            codes.append(reply.code)
            times.append(reply.seconds)
            growth.append(peak - before)
            details = reply.details or details
    median_ms = float(np.median(times) * 1000)
    ok_code = all(code == "INVALID_ARGUMENT" for code in codes)
    measured = (
        f"codes {dict(Counter(codes))}, {', '.join(f'{t * 1000:.0f}' for t in times)} ms (median "
        f"{median_ms:.0f} ms), RSS growth {', '.join(mb(g) for g in growth)}"
        + (f"; '{details[:80]}'" if details else "")
    )
    problems = [] if ok_code else [f"answered {dict(Counter(codes))}"]
    if median_ms > 50:
        problems.append(f"median {median_ms:.0f} ms > 50 ms")
    if max(growth) >= 50e6:
        problems.append(f"RSS grew {mb(max(growth))} >= 50 MB")
    return [
        judge(
            "bomb",
            not problems,
            f"6000x6000 PNG, {len(bomb) / 1e3:.0f} KB",
            measured,
            "INVALID_ARGUMENT, <= 50 ms, RSS +< 50 MB",
            "; ".join(problems),
            seconds=times,
            rss_growth=growth,
        )
    ]


@check(
    "big-jpeg",
    "1 decode budgets",
    "a 6000x6000 JPEG of an MNIST test 7 (dark ink on white) via Classify (3 times)",
    "OK with digit 7 within 500 ms (median), RSS growth < 200 MB",
    quick=False,
    timeout_s=90,
    estimate_s=12,
)
def check_big_jpeg(ctx: Ctx) -> list[Line]:
    from loadtest.attacks_images import big_jpeg_digit, digit_indices, mnist_test

    index = digit_indices(1)[0]
    label = int(mnist_test()[1][index])
    jpeg = big_jpeg_digit(index)
    server = ctx.server("big-jpeg")
    codes, times, growth, answers = [], [], [], []
    with Client(server.target) as client:
        warm(client)
        for _ in range(3):
            before = rss(server.pid)
            reset_peak(server.pid)
            with Sampler(server.pid) as sampler:
                reply = client.classify(encoded_request(jpeg), timeout=30)
            growth.append(max(peak_rss(server.pid) or 0, sampler.peak) - before)
            codes.append(reply.code)
            times.append(reply.seconds)
            answers.append(response_field(reply.response, "digit") if reply.code == "OK" else reply.details[:60])
    median_ms = float(np.median(times) * 1000)
    problems = []
    if codes != ["OK"] * 3 or answers != [label] * 3:
        problems.append(f"answers {answers}")
    if median_ms > 500:
        problems.append(f"median {median_ms:.0f} ms > 500 ms")
    if max(growth) >= 200e6:
        problems.append(f"RSS grew {mb(max(growth))} >= 200 MB")
    measured = (
        f"{codes[0]} {answers}, {', '.join(f'{t * 1000:.0f}' for t in times)} ms (median {median_ms:.0f}), "
        f"RSS growth {', '.join(mb(g) for g in growth)}"
    )
    return [
        judge(
            "big-jpeg",
            not problems,
            f"6000x6000 JPEG of a {label}, {len(jpeg) / 1e3:.0f} KB",
            measured,
            f"OK {label}, <= 500 ms, RSS +< 200 MB",
            "; ".join(problems),
        )
    ]


def concurrent_calls(target: str, requests: list[Any], timeout: float) -> list[Reply]:
    replies: list[Reply | None] = [None] * len(requests)

    def run(i: int) -> None:
        with Client(target) as client:
            replies[i] = client.classify(requests[i], timeout=timeout)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout + 10)
    return [r or Reply("NO ANSWER", timeout) for r in replies]


@check(
    "concurrent-png",
    "1 decode budgets",
    "8 concurrent Classify calls, each a PNG of a digit just under --max-image-pixels (98% of it), while one client "
    "sends raw Classify",
    "server peak RSS growth < 1 GB (raw Classify p99 during it reported)",
    quick=False,
    timeout_s=180,
    estimate_s=25,
)
def check_concurrent_png(ctx: Ctx) -> list[Line]:
    from loadtest.attacks_images import big_png_digit, digit_indices, image_size

    pixels = int(ctx.max_image_pixels() * 0.98)
    png = big_png_digit(digit_indices(1)[0], pixels)
    width, height = image_size(png)
    server = ctx.server("concurrent-png")
    with Client(server.target) as client:
        warm(client)
    idle = probe(server.target, ctx.short(1.0, 2.0), threads=1)
    before = rss(server.pid)
    reset_peak(server.pid)
    raw_latencies: list[float] = []
    done = threading.Event()

    def raw_client() -> None:
        images, _ = digits(32)
        with Client(server.target) as client:
            i = 0
            while not done.is_set():
                reply = client.classify(raw_request(images[i % 32].tobytes()), timeout=10)
                if reply.code == "OK":
                    raw_latencies.append(reply.seconds)
                i += 1

    prober = threading.Thread(target=raw_client, daemon=True)
    with Sampler(server.pid) as sampler:
        prober.start()
        started = time.monotonic()
        replies = concurrent_calls(server.target, [encoded_request(png)] * 8, timeout=120)
        took = time.monotonic() - started
        done.set()
        prober.join(15)
    growth = max(peak_rss(server.pid) or 0, sampler.peak) - before
    codes = Counter(r.code for r in replies)
    p99 = percentile_ms(raw_latencies, 99)
    measured = (
        f"peak RSS growth {mb(growth)}; codes {dict(codes)} in {took:.1f} s; raw Classify p99 {fmt_ms(p99)} "
        f"during (idle {fmt_ms(idle['classify_p99_ms'])}, {len(raw_latencies)} calls)"
    )
    return [
        judge(
            "concurrent-png",
            growth < 1e9,
            f"8x {width}x{height} PNG ({len(png) / 1e3:.0f} KB each)",
            measured,
            "peak RSS growth < 1 GB",
            f"RSS grew {mb(growth)}",
            growth=growth,
            raw_p99_ms=p99,
            codes=dict(codes),
        )
    ]


def busy_until(times: list[float], cpu: list[float], after: float, threshold: float) -> float | None:
    """The last sample time after `after` that ends an interval with the process busier than `threshold` cores."""
    last = None
    for i in range(1, len(times)):
        dt = times[i] - times[i - 1]
        if times[i] > after and dt > 0 and (cpu[i] - cpu[i - 1]) / dt > threshold:
            last = times[i]
    return last


BATCH_DEADLINE_FLAGS = (
    ("--max-image-pixels", "40000000"),
    ("--max-request-pixels", "1000000000"),
    ("--max-decoding-pixels", "80000000"),
    ("--max-message-bytes", "67108864"),
)


@check(
    "batch-deadline",
    "1 decode budgets",
    "ClassifyBatch of 16 large PNGs of digits (36 M pixels each) with a 2 s deadline, to a server started with "
    "--max-image-pixels 40000000 --max-request-pixels 1000000000 --max-decoding-pixels 80000000 --max-message-bytes "
    "67108864 (so the batch is admitted and takes longer than its deadline); the server's CPU time (psutil) and the "
    "gauge mnist_decoding_pixels sampled every 0.1 s",
    "the server stops working on it within 0.5 s after the deadline (CPU back to idle, gauge back to 0)",
    quick=False,
    timeout_s=90,
    estimate_s=20,
)
def check_batch_deadline(ctx: Ctx) -> list[Line]:
    from loadtest.attacks_images import big_png_digit, digit_indices, image_size

    extra, missing = [], []
    for flag, value in BATCH_DEADLINE_FLAGS:
        (extra.extend((flag, value)) if ctx.has_flag(flag) else missing.append(flag))
    per_image = int(min(36e6, 0.96 * (ctx.setting("--max-image-pixels", extra) or 40e6)))
    request_pixels = ctx.setting("--max-request-pixels", extra)
    if request_pixels:
        per_image = int(min(per_image, 0.95 * request_pixels / 16))
    unique = [big_png_digit(index, per_image) for index in digit_indices(4)]
    pngs = [unique[i % 4] for i in range(16)]
    width, height = image_size(pngs[0])
    server = ctx.server("batch-deadline", extra)
    with Client(server.target) as client:
        warm(client)
        # idle, with the same sampling (scraping /metrics costs the server some CPU too)
        with Sampler(server.pid, 0.1, server.metrics_url, "mnist_decoding_pixels") as idle:
            time.sleep(1.5)
        idle_rate = (idle.cpu[-1] - idle.cpu[0]) / max(idle.times[-1] - idle.times[0], 1e-3) if idle.cpu else 0.0
        threshold = idle_rate + 0.3
        with Sampler(server.pid, 0.1, server.metrics_url, "mnist_decoding_pixels") as sampler:
            sent_at = time.monotonic()
            reply = client.classify_batch([encoded_request(p) for p in pngs], timeout=2.0)
            answered = time.monotonic()
            deadline = sent_at + 2.0
            quiet_since = None
            while time.monotonic() < deadline + 15:  # until the server has been idle for 1 s
                time.sleep(0.2)
                busy = busy_until(sampler.times, sampler.cpu, deadline, threshold)
                quiet_since = busy or deadline
                if time.monotonic() - max(quiet_since, answered) > 1.0:
                    break
    busy_end = busy_until(sampler.times, sampler.cpu, deadline, threshold)
    cpu_lag = (busy_end - deadline) if busy_end else 0.0
    gauge = [(t, v) for t, v in sampler.gauge_samples if t >= deadline]
    gauge_present = any(v is not None for _, v in sampler.gauge_samples)
    gauge_lag = None
    if gauge_present:
        nonzero = [t for t, v in gauge if v]
        gauge_lag = (max(nonzero) - deadline + 0.1) if nonzero else 0.0  # + one sampling interval
    sent = f"ClassifyBatch of 16x {width}x{height} PNG, deadline 2 s"
    flags = f"flag missing: {', '.join(missing)} (ran with the server's defaults); " if missing else ""
    if reply.code == "OK":
        measured = f"answered OK in {reply.seconds:.2f} s, before the deadline: nothing left to stop"
        status, reason = (FAIL, flags) if missing else (SKIP, "inconclusive: the batch finished within its deadline")
        return [Line("batch-deadline", status, sent, measured, "stops <= 0.5 s after the deadline", reason)]
    measured = (
        f"{reply.code} after {reply.seconds:.2f} s; server CPU busy (> {threshold:.2f} cores) until "
        f"{cpu_lag:+.2f} s after the deadline; gauge mnist_decoding_pixels "
        + (f"back to 0 at {gauge_lag:+.2f} s" if gauge_present else "not exported")
    )
    lag = max(cpu_lag, gauge_lag or 0.0)
    reason = flags + (f"still working {lag:.2f} s after the deadline" if lag > 0.5 else "")
    return [
        judge(
            "batch-deadline",
            lag <= 0.5 and not missing,
            sent,
            measured,
            "stops <= 0.5 s after the deadline",
            reason,
            cpu_lag_s=cpu_lag,
            gauge_lag_s=gauge_lag,
            code=reply.code,
        )
    ]


@check(
    "memory-return",
    "1 decode budgets",
    "three rounds of 4 concurrent Classify calls, each a PNG of a digit (16 M pixels, or 95% of the limit if "
    "lower); then 60 s idle (5 s in --quick)",
    "server RSS then within 100 MB of its RSS before the rounds",
    quick=True,
    timeout_s=150,
    estimate_s=80,
    quick_estimate_s=14,
)
def check_memory_return(ctx: Ctx) -> list[Line]:
    from loadtest.attacks_images import big_png_digit, digit_indices, image_size

    pixels = int(min(16e6, 0.95 * ctx.max_image_pixels()))
    png = big_png_digit(digit_indices(2)[1], pixels)
    width, height = image_size(png)
    server = ctx.server("memory-return")
    with Client(server.target) as client:
        warm(client)
    before = rss(server.pid)
    codes: Counter = Counter()
    peaks = []
    for _ in range(3):
        with Sampler(server.pid) as sampler:
            codes.update(r.code for r in concurrent_calls(server.target, [encoded_request(png)] * 4, 60))
        peaks.append(sampler.peak)
    rest = ctx.short(5.0, 60.0)
    time.sleep(rest)
    after = rss(server.pid)
    measured = (
        f"RSS {mb(before)} before, peaks {', '.join(mb(p) for p in peaks)}, {mb(after)} {rest:.0f} s after "
        f"({'+' if after >= before else ''}{mb(after - before)}); codes {dict(codes)}"
    )
    return [
        judge(
            "memory-return",
            after - before <= 100e6,
            f"3 rounds of 4x {width}x{height} PNG",
            measured,
            f"RSS {rest:.0f} s later within 100 MB of before",
            f"RSS stayed {mb(after - before)} higher",
            before=before,
            after=after,
            peaks=peaks,
        )
    ]


# --- 3. idle and slow clients (fresh servers) ---------------------------------------------------------


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


# --- 2. admission control (fresh server) ---------------------------------------------------------------


def latency_buckets(text: str, method: str, code: str) -> dict[float, float]:
    """The cumulative buckets of mnist_request_latency_seconds{method, code} in a scrape (le -> count)."""
    from prometheus_client.parser import text_string_to_metric_families

    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if sample.name == "mnist_request_latency_seconds_bucket" and (labels.get("method"), labels.get("code")) == (
                method,
                code,
            ):
                buckets[float(labels["le"])] = sample.value
    return buckets


def server_quantile_ms(before: str, after: str, code: str, q: float = 0.99) -> float | None:
    """Server-side latency quantile of Classify calls answered `code` between two scrapes (bucket resolution)."""
    from loadtest.run import histogram_quantile

    old = latency_buckets(before, "Classify", code)
    delta = {edge: count - old.get(edge, 0.0) for edge, count in latency_buckets(after, "Classify", code).items()}
    value = histogram_quantile(q, delta)
    return None if value is None else value * 1000


OVERLOAD_SENDS = (
    "capacity first: closed loops of raw Classify with 4 and 16 clients (several processes, 10 s each; the better "
    "OK calls/s is the capacity) and 1 client (idle); then an open loop at 5x capacity with 1 s deadlines for 20 s "
    "from several processes (achieved send rate reported), while 1 client probes, until 5 s after the load, and "
    "another process asks GET /livez (metrics port) and grpc health Check every 100 ms with a 1 s timeout"
)
OVERLOAD_TARGET = (
    "successful calls/s >= 80% of capacity; refusals (RESOURCE_EXHAUSTED) answered in <= 5 ms at p99 (client side, "
    "from send; the server's own histogram and the senders' lateness reported beside it) and each with "
    "retry-after-ms or grpc-retry-pushback-ms; successful p99 (client side, from send) <= 3x idle p99; p50 back "
    "within 1.5x of idle within 1 s after the load; /livez: no failed check and p99 <= 100 ms during the load "
    "(grpc health Check's figures reported beside it)"
)
# A model that keeps the CPU free, as on an accelerator: 1 ms per batch and 4 ms per image of emulated device time.
# Its capacity (about 230/s here) leaves the CPU to the senders, whose 5x rate this machine can then send.
DEVICE_FLAGS = ["--backend", "null-threaded", "--null-device-ms", "1+4"]


@check(
    "overload",
    "2 admission control",
    OVERLOAD_SENDS + "; to the server as configured (the CPU model by default: senders, server and model share the "
    "CPU, and the CPU each used is reported)",
    OVERLOAD_TARGET,
    quick=False,
    timeout_s=240,
    estimate_s=80,
)
def check_overload(ctx: Ctx) -> list[Line]:
    return overload_lines(ctx, "overload", [])


@check(
    "overload-device",
    "2 admission control",
    OVERLOAD_SENDS
    + "; to a server whose model runs off the CPU, as on an accelerator ("
    + " ".join(DEVICE_FLAGS)
    + ": 1 ms per batch + 4 ms per image of emulated device time), so that the model, not the CPU, is the limit",
    OVERLOAD_TARGET,
    quick=False,
    timeout_s=240,
    estimate_s=80,
)
def check_overload_device(ctx: Ctx) -> list[Line]:
    return overload_lines(ctx, "overload-device", DEVICE_FLAGS)


def cpu_seconds(pid: int) -> float:
    import psutil

    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def busy_cpu_seconds() -> float:
    import psutil

    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


def overload_lines(ctx: Ctx, name: str, extra: list[str]) -> list[Line]:
    server = ctx.server(name, extra)
    senders = max(1, ctx.senders)
    idle = closed_load(server.target, 1, ctx.short(3.0, 5.0), 1)
    levels = {
        clients: closed_load(server.target, clients, ctx.short(4.0, 10.0), min(4, senders, clients))
        for clients in ((16,) if ctx.quick else (4, 16))
    }
    best = max(levels, key=lambda clients: levels[clients]["calls_per_s"])
    capacity = levels[best]
    cap = capacity["calls_per_s"]
    rate = 5 * cap
    seconds = ctx.short(6.0, 20.0)
    probe_log: list[tuple[float, float, str]] = []  # (sent wall time, latency s, code)

    def recovery_probe(start_at: float) -> None:
        import grpc

        images, _ = digits(32)
        payloads = [raw_request(image.tobytes()).SerializeToString() for image in images]
        end = start_at + seconds + RECOVERY_WATCH_S + 0.5
        with grpc.insecure_channel(server.target) as channel:
            call = channel.unary_unary(CLASSIFY)
            grpc.channel_ready_future(channel).result(timeout=30)
            with contextlib.suppress(grpc.RpcError):
                call(payloads[0], timeout=10)
            i = 0
            while time.time() < end:
                sent, t0 = time.time(), time.perf_counter()
                try:
                    call(payloads[i % 32], timeout=1.0)
                    code = "OK"
                except grpc.RpcError as err:
                    code = err.code().name
                probe_log.append((sent, time.perf_counter() - t0, code))
                i += 1
                time.sleep(max(0.0, t0 + PROBE_INTERVAL_S - time.perf_counter()))  # refusals must not make it a sender

    def during(start_at: float) -> threading.Thread:
        thread = threading.Thread(target=recovery_probe, args=(start_at,), daemon=True)
        thread.start()
        return thread

    scrape_before = scrape(server.metrics_url)
    arguments = [(server.target, rate / senders, seconds, i / rate, 1.0, 100 + i) for i in range(senders)]
    server_cpu, machine_cpu, clock = cpu_seconds(server.pid), busy_cpu_seconds(), time.time()
    prober_arguments = [(server.livez_url, server.target, seconds)]
    with workers(_health_prober, prober_arguments) as (prober, prober_ready, prober_go, prober_start, prober_results):
        _gather(prober_ready, prober, 1, 90, "health prober starting")

        def during_load(start_at: float) -> threading.Thread:
            nonlocal server_cpu, machine_cpu, clock
            prober_start.value = start_at
            prober_go.set()
            time.sleep(max(0.0, start_at - time.time()))
            server_cpu, machine_cpu, clock = cpu_seconds(server.pid), busy_cpu_seconds(), time.time()
            return during(start_at)

        start_at, gathered, thread = run_workers(_open_worker, arguments, seconds, during=during_load)
        busy_s = time.time() - clock
        server_cores = (cpu_seconds(server.pid) - server_cpu) / busy_s
        machine_cores = (busy_cpu_seconds() - machine_cpu) / busy_s
        sender_cores = sum(g["cpu_s"] for g in gathered) / busy_s
        probes = _gather(prober_results, prober, 1, 30, "health prober")[0]
    thread.join(seconds + 30)
    scrape_after = scrape(server.metrics_url)
    times = np.concatenate([g["times"] for g in gathered])
    codes = np.concatenate([g["codes"] for g in gathered])
    hints = np.concatenate([g["hints"] for g in gathered])
    end_at = start_at + seconds
    sent_rate = float(np.sum(times[:, 1] < end_at) / seconds)
    late_p99 = percentile_ms(np.maximum(times[:, 1] - times[:, 0], 0), 99)
    ok, refused = codes == 0, codes == 8  # OK, RESOURCE_EXHAUSTED
    latency = times[:, 2] - times[:, 1]
    good_rate = float(np.sum(ok & (times[:, 2] <= end_at + 1.0)) / seconds)
    other = Counter(code_name(int(c)) for c in codes[~ok & ~refused])
    reached = sent_rate / rate if rate else 0.0
    levels_text = ", ".join(
        f"{c} clients {levels[c]['calls_per_s']:,.0f}/s (p99 {fmt_ms(levels[c]['p99_ms'])}"
        + (f", refused {levels[c]['errors']}" if levels[c]["errors"] else "")
        + ")"
        for c in levels
    )
    load = (
        f"open loop {rate:,.0f}/s asked (5x capacity {cap:,.0f}/s), {sent_rate:,.0f}/s sent ({100 * reached:.0f}%, "
        f"sender lateness p99 {fmt_ms(late_p99)}) by {senders} processes for {seconds:.0f} s, deadline 1 s"
    )
    cpu_text = (
        f"CPU during the load: senders {sender_cores:.2f} cores, server {server_cores:.2f}, whole machine "
        f"{machine_cores:.2f} of {os.cpu_count()}"
    )
    load += "; " + cpu_text
    if reached < 0.9:
        load += "; THE LOAD GENERATOR FELL SHORT of the rate asked"
    short = f"the same open loop ({sent_rate:,.0f}/s sent of {rate:,.0f}/s)"
    summary = f"{len(codes)} calls: {int(ok.sum())} OK, {int(refused.sum())} RESOURCE_EXHAUSTED, other {dict(other)}"
    share = 100 * good_rate / max(cap, 1e-9)
    lines = [
        judge(
            f"{name}.goodput",
            good_rate >= 0.8 * cap,
            load,
            f"{good_rate:,.0f} OK calls/s = {share:.0f}% of capacity {cap:,.0f}/s (closed loop: {levels_text}); "
            + summary,
            ">= 80% of capacity",
            f"{share:.0f}% of capacity",
            capacity=levels,
            idle=idle,
            asked=rate,
            sent_rate=sent_rate,
            sender_cores=sender_cores,
            server_cores=server_cores,
            machine_cores=machine_cores,
        )
    ]
    client_p99 = percentile_ms(latency[refused], 99)
    server_p99 = server_quantile_ms(scrape_before, scrape_after, "RESOURCE_EXHAUSTED")
    if refused.any():
        measured = (
            f"{int(refused.sum())} refusals: client-side p99 {fmt_ms(client_p99)}, p50 "
            f"{fmt_ms(percentile_ms(latency[refused], 50))} (senders' lateness p99 {fmt_ms(late_p99)}); server-side "
            "(handler) p99 " + (fmt_ms(server_p99) if server_p99 is not None else "n/a")
        )
        ok_refusal = client_p99 <= 5.0
        lines.append(
            judge(
                f"{name}.refusal-latency",
                ok_refusal,
                short,
                measured,
                "refusal p99 <= 5 ms",
                f"client-side p99 {fmt_ms(client_p99)}",
            )
        )
        with_hint = float(hints[refused].mean())
        lines.append(
            judge(
                f"{name}.retry-hint",
                with_hint == 1.0,
                short,
                f"{100 * with_hint:.1f}% of {int(refused.sum())} refusals carry a retry hint (metadata "
                "retry-after-ms or grpc-retry-pushback-ms)",
                "every refusal has a hint",
                f"{100 * (1 - with_hint):.1f}% without a hint",
            )
        )
    else:
        reason = "" if not other else f"no RESOURCE_EXHAUSTED at all; failures instead: {dict(other)}"
        for kind, target in (("refusal-latency", "refusal p99 <= 5 ms"), ("retry-hint", "every refusal has a hint")):
            lines.append(judge(f"{name}.{kind}", not other, short, "no refusals; " + summary, target, reason))
    ok_p99 = percentile_ms(latency[ok], 99)
    server_ok_p99 = server_quantile_ms(scrape_before, scrape_after, "OK")
    lines.append(
        judge(
            f"{name}.latency",
            ok_p99 <= 3 * idle["p99_ms"],
            short,
            f"successful p99 {fmt_ms(ok_p99)} (client side, from send) vs idle p99 {fmt_ms(idle['p99_ms'])} "
            f"({ok_p99 / idle['p99_ms']:.1f}x); server-side p99 "
            + (fmt_ms(server_ok_p99) if server_ok_p99 is not None else "n/a")
            + f"; idle p50 {fmt_ms(idle['p50_ms'])}",
            "<= 3x idle p99",
            f"{ok_p99 / idle['p99_ms']:.1f}x idle p99",
        )
    )
    after = [(t, lat, code) for t, lat, code in probe_log if t >= end_at]
    limit = 1.5 * idle["p50_ms"] / 1000
    recovered_at = None
    for window_start in np.arange(end_at, end_at + RECOVERY_WATCH_S - 0.25, 0.05):
        window = [lat for t, lat, code in after if window_start <= t < window_start + 0.25 and code == "OK"]
        if len(window) >= 3 and float(np.median(window)) <= limit:
            recovered_at = float(window_start + 0.25 - end_at)
            break
    during_p50 = percentile_ms([lat for t, lat, c in probe_log if start_at + 1 <= t < end_at and c == "OK"], 50)
    when = (
        f"{recovered_at:.2f} s after it stopped" if recovered_at is not None else f"not within {RECOVERY_WATCH_S:g} s"
    )
    measured = (
        f"probe p50 {fmt_ms(during_p50)} during the load; back within 1.5x of idle p50 {fmt_ms(idle['p50_ms'])} "
        f"{when} ({len(after)} probe calls after)"
    )
    lines.append(
        judge(
            f"{name}.recovery",
            recovered_at is not None and recovered_at <= 1.0,
            short,
            measured,
            "p50 <= 1.5x idle within 1 s",
            "not recovered within 1 s",
            recovered_s=recovered_at,
        )
    )
    livez, grpc_health = probe_summary(probes["livez"], "200"), probe_summary(probes["health"], "OK")
    every = f"every {1000 * LIVENESS_INTERVAL_S:.0f} ms with a {LIVENESS_TIMEOUT_S:g} s timeout"
    expected = seconds / LIVENESS_INTERVAL_S
    problems = [f"{livez['failed']} failed" if livez["failed"] else "", f"p99 {fmt_ms(livez['p99_ms'])}"]
    lines.append(
        judge(
            f"{name}.liveness",
            livez["failed"] == 0 and livez["p99_ms"] <= LIVENESS_P99_MS and livez["count"] >= 0.8 * expected,
            f"{short}; GET /livez on the metrics port {every}, from a process of its own, for the load's "
            f"{seconds:.0f} s",
            f"/livez: {describe_probes(livez)}; grpc health Check on the same schedule: {describe_probes(grpc_health)}",
            f"0 failed checks, p99 <= {LIVENESS_P99_MS:.0f} ms (and >= 80% of the {expected:.0f} probes sent)",
            ", ".join(problem for problem in problems if problem) + f", {livez['count']} probes sent",
            livez=livez,
            grpc_health=grpc_health,
        )
    )
    lines.append(
        inform(
            f"{name}.grpc-health",
            f"{short}; grpc.health.v1 Check (the whole server) {every}, from the same prober process",
            f"{describe_probes(grpc_health)}: what a gRPC liveness probe would see (kubelet restarts after 3 "
            "failures in a row)",
            grpc_health=grpc_health,
        )
    )
    return lines


# --- 6. shutdown (fresh server) ------------------------------------------------------------------------


DRAIN_S = 1.0


@check(
    "shutdown",
    "6 shutdown",
    "SIGTERM to a server with --drain-seconds 1 while 4 threads send raw Classify (10 s deadline) and one sends "
    "ClassifyBatch of 32 raw digits with a 30 ms deadline every 20 ms; /metrics scraped every 50 ms until exit",
    "no call fails CANCELLED (nor INTERNAL/UNKNOWN); once the drain is over every failed call is UNAVAILABLE "
    "(ClassifyBatch: or DEADLINE_EXCEEDED; before then RESOURCE_EXHAUSTED refusals of the load are allowed and "
    'reported); the last scrape shows no code="CANCELLED" and expired calls counted DEADLINE_EXCEEDED; exit 0',
    quick=True,
    timeout_s=90,
    estimate_s=10,
)
def check_shutdown(ctx: Ctx) -> list[Line]:
    import grpc

    from proto.mnist.v1 import classifier_pb2 as pb

    server = ctx.server("shutdown", ["--drain-seconds", str(DRAIN_S)])
    images, _ = digits(64)
    single = [raw_request(image.tobytes()).SerializeToString() for image in images]
    batch = pb.ClassifyBatchRequest(requests=[raw_request(image.tobytes()) for image in images[:32]])
    stop = threading.Event()
    ends: list[tuple[str, float, str]] = []  # (method, when it ended, code)
    lock = threading.Lock()
    last_scrape: dict[str, Any] = {"text": "", "at": 0.0, "count": 0}

    def caller(method: str, path: str, payloads: list[bytes], timeout: float, pause: float) -> None:
        with grpc.insecure_channel(server.target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            call, i = channel.unary_unary(path), 0
            while not stop.is_set():
                try:
                    call(payloads[i % len(payloads)], timeout=timeout)
                    code = "OK"
                except grpc.RpcError as err:
                    code = err.code().name
                with lock:
                    ends.append((method, time.monotonic(), code))
                if pause or code == "UNAVAILABLE":  # refused at the connection: do not spin
                    time.sleep(max(pause, 0.005))
                i += 1

    def scraper() -> None:
        while not stop.is_set():
            with contextlib.suppress(Exception):
                text = scrape(server.metrics_url, 0.5)
                last_scrape.update(text=text, at=time.monotonic(), count=last_scrape["count"] + 1)
            stop.wait(0.05)

    threads = [threading.Thread(target=caller, args=("Classify", CLASSIFY, single, 10.0, 0.0)) for _ in range(4)]
    threads.append(
        threading.Thread(target=caller, args=("ClassifyBatch", CLASSIFY_BATCH, [batch.SerializeToString()], 0.03, 0.02))
    )
    threads.append(threading.Thread(target=scraper))
    for thread in threads:
        thread.daemon = True
        thread.start()
    time.sleep(1.5)
    signalled = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    try:
        exit_code = server.process.wait(30)
    except subprocess.TimeoutExpired:
        exit_code = None
    exited = time.monotonic()
    time.sleep(0.5)  # calls after exit: refused at the connection
    stop.set()
    for thread in threads:
        thread.join(15)

    def phase(when: float) -> str:
        if when < signalled:
            return "load"
        if when < signalled + DRAIN_S + 0.1:
            return "drain"
        return "stopping" if when < exited else "after exit"

    table: dict[str, dict[str, Counter]] = {"Classify": {}, "ClassifyBatch": {}}
    problems: Counter = Counter()
    for method, when, code in ends:
        where = phase(when)
        table[method].setdefault(where, Counter())[code] += 1
        allowed = {"OK", "UNAVAILABLE"} | ({"RESOURCE_EXHAUSTED"} if where in ("load", "drain") else set())
        if method == "ClassifyBatch":
            allowed.add("DEADLINE_EXCEEDED")
        if code not in allowed:
            problems[f"{method} {code} ({where})"] += 1
    sent = "SIGTERM (--drain-seconds 1) under 4 Classify callers and 1 ClassifyBatch caller (30 ms deadline)"
    client_measured = (
        "; ".join(
            f"{method} " + ", ".join(f"{where} {dict(codes)}" for where, codes in phases.items())
            for method, phases in table.items()
        )
        + f"; exit {exit_code} {exited - signalled:.1f} s after SIGTERM"
    )
    reasons = [f"{key} x{count}" for key, count in problems.items()]
    if exit_code != 0:
        reasons.append(f"exit status {exit_code}")
    lines = [
        judge(
            "shutdown.client-codes",
            not reasons,
            sent,
            client_measured,
            "failures UNAVAILABLE (batch: or DEADLINE_EXCEEDED; RESOURCE_EXHAUSTED only before the drain ends), "
            "never CANCELLED; exit 0",
            "; ".join(reasons),
            outcomes={method: {where: dict(c) for where, c in phases.items()} for method, phases in table.items()},
        )
    ]
    text = last_scrape["text"]
    if not text:
        lines.append(
            Line("shutdown.metrics-codes", FAIL, sent, "no scrape succeeded", "no CANCELLED", "/metrics not scraped")
        )
        return lines
    cancelled = metric(text, "mnist_requests_total", code="CANCELLED") or 0.0
    expired = metric(text, "mnist_requests_total", code="DEADLINE_EXCEEDED") or 0.0
    client_expired = sum(1 for method, _, code in ends if code == "DEADLINE_EXCEEDED")
    measured = (
        f"last scrape {exited - last_scrape['at']:.2f} s before exit ({last_scrape['count']} scrapes): "
        f"code=CANCELLED {cancelled:g}, code=DEADLINE_EXCEEDED {expired:g} (client saw {client_expired})"
    )
    reasons = []
    if cancelled:
        reasons.append(f"{cancelled:g} calls counted CANCELLED")
    if client_expired and not expired:
        reasons.append("no call counted DEADLINE_EXCEEDED though deadlines expired")
    lines.append(
        judge(
            "shutdown.metrics-codes",
            not reasons,
            sent,
            measured,
            "no CANCELLED; expired calls DEADLINE_EXCEEDED",
            "; ".join(reasons),
            cancelled=cancelled,
            expired=expired,
        )
    )
    return lines


# === running them ======================================================================================


def select(only: str | None, quick: bool) -> list[Check]:
    if only:
        wanted = [name.strip() for name in only.split(",") if name.strip()]
        known = {c.name for c in CHECKS} | {c.group.split()[0] for c in CHECKS}
        unknown = [name for name in wanted if name not in known]
        if unknown:
            raise SystemExit(
                f"mnist-attack: unknown check(s) {', '.join(unknown)}; known: {', '.join(c.name for c in CHECKS)}"
            )
        return [c for c in CHECKS if c.name in wanted or c.group.split()[0] in wanted]
    return [c for c in CHECKS if c.quick or not quick]


def run_check(ctx: Ctx, item: Check, timeout: float) -> list[Line]:
    """Run one check in a thread with a time limit; exceptions and timeouts become FAIL lines."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["lines"] = item.fn(ctx)
        except Skip as exc:
            outcome["lines"] = [Line(item.name, SKIP, item.sends, "", item.target, str(exc))]
        except Fail as exc:
            outcome["lines"] = [Line(item.name, FAIL, item.sends, "", item.target, str(exc))]
        except Exception as exc:  # noqa: BLE001 - a broken check is reported, the run goes on
            outcome["lines"] = [
                Line(item.name, FAIL, item.sends, "", item.target, f"error: {type(exc).__name__}: {exc}")
            ]
            outcome["traceback"] = traceback.format_exc()

    started = time.monotonic()
    thread = threading.Thread(target=target, name=f"check-{item.name}", daemon=True)
    ctx.check_thread = thread
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        ctx.close_servers(keep=("shared",))
        thread.join(10)
        outcome["lines"] = [Line(item.name, FAIL, item.sends, "", item.target, f"timed out after {timeout:.0f} s")]
    elapsed = time.monotonic() - started
    lines = outcome.get("lines") or [Line(item.name, FAIL, item.sends, "", item.target, "no result")]
    for line in lines:
        line.seconds = round(elapsed, 2)
    if "traceback" in outcome:
        (ctx.out / f"traceback-{item.name}.txt").write_text(outcome["traceback"])
    return lines


def cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def write_report(out: Path, meta: dict, lines: list[Line]) -> None:
    counts = Counter(line.status for line in lines)
    report = {**meta, "summary": dict(counts), "lines": [asdict(line) for line in lines]}
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    md = [
        f"# mnist-attack {'--quick ' if meta['quick'] else ''}report",
        "",
        f"{meta['started']}, {meta['elapsed_s']:.0f} s of a {meta['budget_s']:.0f} s budget; server flags: "
        f"`{meta['server_args'] or '(defaults)'}`; {meta['machine']}",
        "",
        f"**{counts.get(PASS, 0)} PASS, {counts.get(FAIL, 0)} FAIL, {counts.get(SKIP, 0)} SKIP**",
        "",
        "| check | sent | measured | target | result |",
        "| --- | --- | --- | --- | --- |",
    ]
    for line in lines:
        result = f"**{line.status}**" + (f": {line.reason}" if line.reason else "")
        md.append(
            f"| {cell(line.name)} | {cell(line.sent)} | {cell(line.measured)} | {cell(line.target)} | {cell(result)} |"
        )
    if meta.get("notes"):
        md += ["", *[f"- {note}" for note in meta["notes"]]]
    (out / "report.md").write_text("\n".join(md) + "\n")


def describe_checks() -> str:
    import textwrap

    rows = []
    for item in CHECKS:
        rows.append(f"  {item.name}{' (quick)' if item.quick else ''}  [group {item.group}]")
        for label, text in (("sends: ", item.sends), ("target:", item.target)):
            rows.append(
                textwrap.fill(
                    text, 100, initial_indent=f"      {label} ", subsequent_indent=" " * 14, break_on_hyphens=False
                )
            )
    return "checks, in the order they run (--only takes their names or group numbers):\n" + "\n".join(rows)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown, and the description's own line breaks kept."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mnist-attack", description=__doc__, epilog=describe_checks(), formatter_class=HelpFormatter
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("reports/attack"),
        help="folder for report.json, report.md and the servers' logs",
    )
    parser.add_argument("--quick", action="store_true", help="only the checks marked (quick), shortened: <= 60 s")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=600.0,
        help="the whole run's time limit; a check that no longer fits is SKIPped",
    )
    parser.add_argument(
        "--only", metavar="NAME[,NAME]", help="run only these checks (names below, or a group number 1-6)"
    )
    parser.add_argument(
        "--server-args",
        default="",
        help="more mnist-serve flags for every server started, e.g. '--max-image-pixels 16000000'",
    )
    parser.add_argument("--senders", type=int, default=4, help="load-generator processes for the overload check")
    parser.add_argument("--list", action="store_true", help="list the checks and exit")
    return parser


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list:
        print(describe_checks())
        return 0
    chosen = select(args.only, args.quick)
    try:
        digits(1)  # every check sends MNIST test digits: find them before starting anything
    except Exception as exc:  # noqa: BLE001
        print(f"mnist-attack: the MNIST test set is needed ({exc}); set MNIST_DIR", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    soft, hard = raise_fd_limit()
    signal.signal(signal.SIGTERM, _interrupt)  # a terminated run still stops its servers and writes its report
    ctx = Ctx(args)
    started, clock = time.strftime("%Y-%m-%d %H:%M:%S"), time.monotonic()
    budget = min(args.budget_s, 60.0) if args.quick and args.budget_s == 600.0 else args.budget_s
    meta: dict[str, Any] = {
        "started": started,
        "quick": args.quick,
        "budget_s": budget,
        "elapsed_s": 0.0,
        "server_args": args.server_args,
        "machine": f"{os.cpu_count()} CPUs, RLIMIT_NOFILE {soft}/{hard}, Python {sys.version.split()[0]}",
        "notes": ctx.notes,
    }
    lines: list[Line] = []

    def say(text: str) -> None:
        print(f"[{time.monotonic() - clock:6.1f}s] {text}", flush=True)

    try:
        missing = [flag for flag in EXPECTED_FLAGS if not ctx.has_flag(flag)]
        ctx.notes.append("server flags not accepted yet: " + (", ".join(missing) or "none"))
        meta["server_flags_missing"] = missing
    except (OSError, subprocess.SubprocessError) as exc:
        ctx.notes.append(f"mnist-serve --help failed: {exc}")
    say(
        f"mnist-attack: {len(chosen)} checks{' (quick)' if args.quick else ''}, budget {budget:.0f} s, report in "
        f"{args.out}"
    )
    try:
        for index, item in enumerate(chosen):
            left = budget - (time.monotonic() - clock)
            need = (item.quick_estimate_s or item.estimate_s) if args.quick else item.estimate_s
            if left < need:
                lines.append(
                    Line(
                        item.name,
                        SKIP,
                        item.sends,
                        "",
                        item.target,
                        f"budget: {left:.0f} s left, the check needs about {need:.0f} s",
                    )
                )
                say(f"{item.name}: SKIP (budget)")
                continue
            timeout = min(item.timeout_s, max(left, need))
            say(f"{item.name}: running (limit {timeout:.0f} s)")
            new = run_check(ctx, item, timeout)
            lines += new
            for line in new:
                say(
                    f"  {line.status} {line.name}: {line.measured[:150]}"
                    + (f" -- {line.reason}" if line.reason else "")
                )
            later_shared = any(c.name in SHARED_CHECKS for c in chosen[index + 1 :])
            ctx.close_servers(keep=("shared",) if later_shared else ())
            meta["elapsed_s"] = time.monotonic() - clock
            write_report(args.out, meta, lines)
    except KeyboardInterrupt:
        say("interrupted")
        ctx.notes.append("run interrupted")
    finally:
        ctx.close_servers()
        meta["elapsed_s"] = time.monotonic() - clock
        write_report(args.out, meta, lines)
    counts = Counter(line.status for line in lines)
    say(
        f"done: {counts.get(PASS, 0)} PASS, {counts.get(FAIL, 0)} FAIL, {counts.get(SKIP, 0)} SKIP; "
        f"{args.out / 'report.md'}"
    )
    return 1 if counts.get(FAIL) else 0


SHARED_CHECKS = {"malformed", "unknown-fields", "modes", "corrupt", "blank", "nondigits", "digits", "metrics-bind"}


if __name__ == "__main__":
    from loadtest.attack import main as _main  # the spawned load generators import this module by name

    sys.exit(_main())
