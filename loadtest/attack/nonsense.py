"""Group 4, no confident nonsense (shared server): every image mode, corrupt files, blanks, non-digits, and real
digits, each judged on the answer and its is_digit."""

from __future__ import annotations

from collections import Counter

from loadtest.attack.client import Client, Reply, digits, encoded_request, raw_request, response_field
from loadtest.attack.context import Ctx
from loadtest.attack.core import Line, check, judge


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
    from loadtest.attack.craft import mnist_test, mode_cases

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
    from loadtest.attack.craft import corrupt_cases

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
    from loadtest.attack.craft import blank_cases

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
    from loadtest.attack.craft import nondigit_cases

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
