"""Group 5, malformed messages (shared server): undecodable payloads to every method, and valid requests with
unknown fields and groups."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from loadtest.attack.client import (
    CLASSIFY,
    CLASSIFY_BATCH,
    GET_MODEL_INFO,
    HEALTH_CHECK,
    HEALTH_WATCH,
    REFLECTION_V1,
    REFLECTION_V1ALPHA,
    Client,
    digits,
    metric,
    raw_request,
    response_field,
    scrape,
    varint,
)
from loadtest.attack.context import Ctx
from loadtest.attack.core import SKIP, Line, check, judge

# Bytes no protobuf message parses (checked for every request type in tests/test_attack.py). A known field
# with a *different but valid* wire type is not among them: protobuf keeps it as an unknown field, by design.
GARBAGE = (
    ("ff-x4", b"\xff\xff\xff\xff"),  # a tag varint that never ends
    ("truncated-varint", b"\x08\x80"),  # field 1, varint, continuation bit set and nothing after
    ("truncated-length", b"\x0a\x05ab"),  # field 1, 5 bytes announced, 2 present
    ("wire-type-7", b"\x0f\x00"),  # field 1 with the invalid wire type 7
    ("stray-end-group", b"\x0c"),  # end-group marker (wire type 4) with no group open
)


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
