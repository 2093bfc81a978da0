"""Group 1, decode budgets (fresh servers): a decompression bomb, a large JPEG, concurrent large PNGs, a batch
past its deadline, and memory given back after large images."""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

import numpy as np

from loadtest.attack.client import (
    Client,
    Reply,
    digits,
    encoded_request,
    fmt_ms,
    mb,
    percentile_ms,
    probe,
    raw_request,
    response_field,
    warm,
)
from loadtest.attack.context import Ctx
from loadtest.attack.core import FAIL, SKIP, Line, check, judge
from loadtest.attack.measure import Sampler, peak_rss, reset_peak, rss

BOMB_SAMPLES = 5  # bombs sent, each followed by the control; the medians are compared


@check(
    "bomb",
    "1 decode budgets",
    "a 6000x6000 grayscale PNG of ~50 KB (a decompression bomb: 36 MB of pixels) via Classify, 5 times, each time "
    "followed by a control: an ordinary 112x112 PNG of a digit padded to the bomb's size (a private chunk)",
    "INVALID_ARGUMENT (over the pixel limit) no slower than the control is answered OK (medians: refused from the "
    "header, never decoded), server RSS growth < 50 MB",
    quick=True,
    timeout_s=90,
    estimate_s=8,
    quick_estimate_s=8,
)
def check_bomb(ctx: Ctx) -> list[Line]:
    """Timed against a control in the same run, not against a fixed number of ms: a busy client or server machine
    slows both alike, while decoding the bomb's 36 M pixels costs a hundred times what a 112x112 image does."""
    from loadtest.attack.craft import bomb_png, digit_indices, small_png_digit

    bomb = bomb_png()
    control = small_png_digit(digit_indices(1)[0], len(bomb))
    server = ctx.server("bomb")
    codes, times, growth, details = [], [], [], ""
    control_codes, control_times = [], []
    with Client(server.target) as client:
        warm(client)
        for _ in range(BOMB_SAMPLES):
            before = rss(server.pid)
            reset_peak(server.pid)
            with Sampler(server.pid) as sampler:
                reply = client.classify(encoded_request(bomb), timeout=30)
            peak = max(peak_rss(server.pid) or 0, sampler.peak)
            codes.append(reply.code)
            times.append(reply.seconds)
            growth.append(peak - before)
            details = reply.details or details
            answer = client.classify(encoded_request(control), timeout=30)
            control_codes.append(answer.code)
            control_times.append(answer.seconds)
    median_ms = float(np.median(times) * 1000)
    control_ms = float(np.median(control_times) * 1000)
    ok_code = all(code == "INVALID_ARGUMENT" for code in codes)
    measured = (
        f"codes {dict(Counter(codes))}, {', '.join(f'{t * 1000:.1f}' for t in times)} ms (median "
        f"{median_ms:.1f} ms); control {dict(Counter(control_codes))}, median {control_ms:.1f} ms; RSS growth "
        f"{', '.join(mb(g) for g in growth)}" + (f"; '{details[:80]}'" if details else "")
    )
    problems = [] if ok_code else [f"answered {dict(Counter(codes))}"]
    if any(code != "OK" for code in control_codes):
        problems.append(f"the control was answered {dict(Counter(control_codes))}: nothing to compare with")
    elif median_ms > control_ms:
        problems.append(f"median {median_ms:.1f} ms > the control's {control_ms:.1f} ms")
    if max(growth) >= 50e6:
        problems.append(f"RSS grew {mb(max(growth))} >= 50 MB")
    return [
        judge(
            "bomb",
            not problems,
            f"6000x6000 PNG, {len(bomb) / 1e3:.0f} KB",
            measured,
            "INVALID_ARGUMENT, median <= the control's, RSS +< 50 MB",
            "; ".join(problems),
            seconds=times,
            control_seconds=control_times,
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
    from loadtest.attack.craft import big_jpeg_digit, digit_indices, mnist_test

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
    from loadtest.attack.craft import big_png_digit, digit_indices, image_size

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
    from loadtest.attack.craft import big_png_digit, digit_indices, image_size

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
    from loadtest.attack.craft import big_png_digit, digit_indices, image_size

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
