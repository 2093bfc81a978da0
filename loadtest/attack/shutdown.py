"""Group 6, shutdown (fresh server): SIGTERM under load; the codes clients see and the codes /metrics counts."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import threading
import time
from collections import Counter
from typing import Any

from loadtest.attack.client import CLASSIFY, CLASSIFY_BATCH, digits, metric, raw_request, scrape
from loadtest.attack.context import Ctx
from loadtest.attack.core import FAIL, Line, check, judge

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
