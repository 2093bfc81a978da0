"""Group 2, admission control (fresh server): capacity measured, then an open loop at 5x capacity; goodput,
refusals (their speed and retry hints), latency, recovery and liveness during the load judged."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import Counter

import numpy as np

from loadtest.attack.client import CLASSIFY, digits, fmt_ms, percentile_ms, raw_request, scrape
from loadtest.attack.context import Ctx
from loadtest.attack.core import Line, check, inform, judge
from loadtest.attack.load import (
    LIVENESS_INTERVAL_S,
    LIVENESS_TIMEOUT_S,
    closed_load,
    code_name,
    describe_probes,
    gather,
    health_prober,
    open_worker,
    probe_summary,
    run_workers,
    workers,
)
from loadtest.attack.measure import busy_cpu_seconds, cpu_seconds

RECOVERY_WATCH_S = 5.0  # overload: how long after the load the recovery probe keeps measuring
PROBE_INTERVAL_S = 0.01  # the probe sends at most 100 calls/s (unpaced, fast refusals made it a 700/s sender)
LIVENESS_P99_MS = 100.0  # /livez during the load: its p99 at most this


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
    with workers(health_prober, prober_arguments) as (prober, prober_ready, prober_go, prober_start, prober_results):
        gather(prober_ready, prober, 1, 90, "health prober starting")

        def during_load(start_at: float) -> threading.Thread:
            nonlocal server_cpu, machine_cpu, clock
            prober_start.value = start_at
            prober_go.set()
            time.sleep(max(0.0, start_at - time.time()))
            server_cpu, machine_cpu, clock = cpu_seconds(server.pid), busy_cpu_seconds(), time.time()
            return during(start_at)

        start_at, gathered, thread = run_workers(open_worker, arguments, seconds, during=during_load)
        busy_s = time.time() - clock
        server_cores = (cpu_seconds(server.pid) - server_cpu) / busy_s
        machine_cores = (busy_cpu_seconds() - machine_cpu) / busy_s
        sender_cores = sum(g["cpu_s"] for g in gathered) / busy_s
        probes = gather(prober_results, prober, 1, 30, "health prober")[0]
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
