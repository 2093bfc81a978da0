"""Request parsing that sees what protobuf hides: both members of the `image` oneof on the wire.

Protobuf keeps only the last member of a oneof it parses, so a request carrying both `encoded`
and `raw` would silently lose one. These deserializers scan the top-level wire fields first and
hand the service a `ParsedRequest` with the problem named, to be answered INVALID_ARGUMENT.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

from proto.mnist.v1 import classifier_pb2 as pb

ENCODED_FIELD = pb.ClassifyRequest.ENCODED_FIELD_NUMBER
RAW_FIELD = pb.ClassifyRequest.RAW_FIELD_NUMBER
REQUESTS_FIELD = pb.ClassifyBatchRequest.REQUESTS_FIELD_NUMBER
BOTH_SET = "both 'encoded' and 'raw' are set; send exactly one image field"


class ParsedRequest(NamedTuple):
    message: Any
    problem: str | None = None


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(data: bytes) -> Iterator[tuple[int, bytes | None]]:
    """(field number, payload of length-delimited fields, else None) for each top-level field."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == 2:
            length, pos = _varint(data, pos)
            yield number, data[pos : pos + length]
            pos += length
        elif wire_type == 0:
            _, pos = _varint(data, pos)
            yield number, None
        elif wire_type in (1, 5):
            pos += 8 if wire_type == 1 else 4
            yield number, None
        elif wire_type in (3, 4):  # group start/end markers (deprecated); their contents scan as fields
            yield number, None
        else:
            raise ValueError(f"unsupported wire type {wire_type}")


def _both_image_fields(data: bytes) -> bool:
    numbers = {number for number, payload in _fields(data) if payload is not None}
    return ENCODED_FIELD in numbers and RAW_FIELD in numbers


def _malformed(message_type: Any, exc: Exception) -> ParsedRequest:
    return ParsedRequest(message_type(), f"malformed request: not a valid {message_type.DESCRIPTOR.name} ({exc})")


def parse_classify_request(data: bytes) -> ParsedRequest:
    """Never raises: a deserializer that raises makes gRPC answer INTERNAL, unseen by the metrics."""
    try:
        message = pb.ClassifyRequest.FromString(data)
        return ParsedRequest(message, BOTH_SET if _both_image_fields(data) else None)
    except Exception as exc:  # noqa: BLE001 - DecodeError, or our own scan's ValueError
        return _malformed(pb.ClassifyRequest, exc)


def parse_classify_batch_request(data: bytes) -> ParsedRequest:
    try:
        message = pb.ClassifyBatchRequest.FromString(data)
        items = [payload for number, payload in _fields(data) if number == REQUESTS_FIELD]
        for index, payload in enumerate(items):
            if payload is not None and _both_image_fields(payload):
                return ParsedRequest(message, f"requests[{index}]: {BOTH_SET}")
        return ParsedRequest(message)
    except Exception as exc:  # noqa: BLE001
        return _malformed(pb.ClassifyBatchRequest, exc)
