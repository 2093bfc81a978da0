"""The wire format, where protobuf's own objects would hide something or cost too much.

Requests: protobuf keeps only the last member of a oneof it parses, so a request carrying both
`encoded` and `raw` would silently lose one. These deserializers notice (a message that
re-serializes shorter than it arrived lost something; only then are the wire fields scanned) and
hand the service a `ParsedRequest` with the problem named, to be answered INVALID_ARGUMENT. They
never raise: a raising deserializer makes gRPC answer INTERNAL, unseen by the metrics.

A `ClassifyBatchRequest` whose every item holds a raw image and nothing else (as clients send a
batch of raw digits) is read straight off the wire as one (N, 784) array (`RawBatch`): each such
item is the same 790 bytes, so one vectorized comparison of their headers proves the layout, and no
message per image is built. Anything else takes protobuf's parser.

Responses: a `ClassifyBatchResponse` is written straight from the prediction arrays with numpy
(one fixed-width record per image), instead of building and serializing a message per image.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np

from proto.contract import IMAGE_SIDE, NUM_CLASSES, RAW_BYTES
from proto.mnist.v1 import classifier_pb2 as pb
from server.pipeline.predictions import Predictions

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
    """(field number, payload of length-delimited fields, else None) for each top-level field.

    Fields inside a group (deprecated wire types 3 and 4, only ever unknown to us) belong to the
    group, not to this message, and are skipped."""
    pos = 0
    groups: list[int] = []  # numbers of the groups we are inside, innermost last
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire_type = key >> 3, key & 7
        payload = None
        if wire_type == 2:
            length, pos = _varint(data, pos)
            if pos + length > len(data):
                raise ValueError("truncated length-delimited field")
            payload = data[pos : pos + length]
            pos += length
        elif wire_type == 0:
            _, pos = _varint(data, pos)
        elif wire_type in (1, 5):
            pos += 8 if wire_type == 1 else 4
        elif wire_type == 3:
            groups.append(number)
            continue
        elif wire_type == 4:
            if not groups or groups.pop() != number:
                raise ValueError(f"group end for field {number} without its start")
            continue
        else:
            raise ValueError(f"unsupported wire type {wire_type}")
        if not groups:
            yield number, payload
    if groups:
        raise ValueError(f"group {groups[-1]} is never closed")


def _both_image_fields(data: bytes) -> bool:
    numbers = {number for number, payload in _fields(data) if payload is not None}
    return ENCODED_FIELD in numbers and RAW_FIELD in numbers


def _malformed(message_type: Any, exc: Exception) -> ParsedRequest:
    return ParsedRequest(message_type(), f"malformed request: not a valid {message_type.DESCRIPTOR.name} ({exc})")


def _lost_nothing(message: Any, data: bytes) -> bool:
    """Protobuf drops only repeated singular fields (a second oneof member among them) when parsing;
    a message that re-serializes to as many bytes as arrived dropped nothing (the C parser keeps
    unknown fields). Non-canonical encodings also differ in size: they take the slow, exact scan."""
    return message.ByteSize() == len(data)


def parse_classify_request(data: bytes) -> ParsedRequest:
    try:
        message = pb.ClassifyRequest.FromString(data)
        if _lost_nothing(message, data):
            return ParsedRequest(message)
        return ParsedRequest(message, BOTH_SET if _both_image_fields(data) else None)
    except Exception as exc:  # noqa: BLE001 - DecodeError, or our own scan's ValueError
        return _malformed(pb.ClassifyRequest, exc)


class RawBatch(NamedTuple):
    """A `ClassifyBatchRequest` of raw images only (no request ids, no per-item model), read as one array."""

    pixels: np.ndarray  # (N, 1, 28, 28) uint8, a view of the request's bytes
    model_name: str
    model_version: str


def _raw_item_header() -> bytes:
    body = _tag(RAW_FIELD, 2) + _encode_varint(RAW_BYTES)
    return _tag(REQUESTS_FIELD, 2) + _encode_varint(len(body) + RAW_BYTES) + body


def _raw_batch(data: bytes) -> RawBatch | None:
    """`data` as a RawBatch when it is a run of raw-only items (then, at most, the batch's model fields)."""
    count = len(data) // _RAW_ITEM_BYTES
    if not count:
        return None
    heads = np.ndarray((count,), "<u8", data, strides=(_RAW_ITEM_BYTES,))  # each item's first 8 bytes
    if not np.all(heads & _HEADER_MASK == _RAW_ITEM_HEAD):
        return None
    items = np.frombuffer(data, np.uint8, count * _RAW_ITEM_BYTES).reshape(count, _RAW_ITEM_BYTES)
    rest = pb.ClassifyBatchRequest.FromString(data[count * _RAW_ITEM_BYTES :])
    if rest.requests:  # more items after the run: not uniform, protobuf reads it all
        return None
    pixels = items[:, len(_RAW_ITEM_HEADER) :].reshape(count, 1, IMAGE_SIDE, IMAGE_SIDE)
    return RawBatch(pixels, rest.model_name, rest.model_version)


def parse_classify_batch_request(data: bytes) -> ParsedRequest:
    try:
        if (raw := _raw_batch(data)) is not None:
            return ParsedRequest(raw)
        message = pb.ClassifyBatchRequest.FromString(data)
        if _lost_nothing(message, data):
            return ParsedRequest(message)
        items = [payload for number, payload in _fields(data) if number == REQUESTS_FIELD]
        for index, payload in enumerate(items):
            if payload is not None and _both_image_fields(payload):
                return ParsedRequest(message, f"requests[{index}]: {BOTH_SET}")
        return ParsedRequest(message)
    except Exception as exc:  # noqa: BLE001
        return _malformed(pb.ClassifyBatchRequest, exc)


def safe_parser(message_type: Any) -> Callable[[bytes], ParsedRequest]:
    """A deserializer for any request type that, like the two above, reports garbage instead of raising."""

    def parse(data: bytes) -> ParsedRequest:
        try:
            return ParsedRequest(message_type.FromString(data))
        except Exception as exc:  # noqa: BLE001
            return _malformed(message_type, exc)

    return parse


# --- responses ---------------------------------------------------------------------------------------


def new_request_ids(count: int) -> list[str]:
    """`count` random 32-hex-digit ids (uuid4-sized), from one urandom call."""
    text = os.urandom(16 * count).hex()
    return [text[i : i + 32] for i in range(0, 32 * count, 32)]


_HEX = np.frombuffer(b"0123456789abcdef", np.uint8)


def new_request_id_array(count: int) -> np.ndarray:
    """`count` ids like `new_request_ids`, as a (count, 32) array of their ASCII bytes, for a batch response: 24 hex
    digits of randomness shared by the batch (96 bits, from one urandom call), then each item's index in 8."""
    random = np.frombuffer(os.urandom(12), np.uint8)
    prefix = np.empty(24, np.uint8)
    prefix[0::2], prefix[1::2] = _HEX[random >> 4], _HEX[random & 15]
    ids = np.empty((count, 32), np.uint8)
    ids[:, :24] = prefix
    ids[:, 24:] = _index_hex(count)
    return ids


def _index_hex(count: int) -> np.ndarray:
    """(count, 8): 0, 1, 2, ... as 8 hex digits each; made once, for the largest batch seen so far."""
    global _INDEX_HEX
    if len(_INDEX_HEX) < count:
        index = np.arange(max(count, 2 * len(_INDEX_HEX)), dtype=">u4").view(np.uint8).reshape(-1, 4)
        table = np.empty((len(index), 8), np.uint8)
        table[:, 0::2], table[:, 1::2] = _HEX[index >> 4], _HEX[index & 15]
        _INDEX_HEX = table
    return _INDEX_HEX[:count]


_INDEX_HEX = np.empty((0, 8), np.uint8)


def fill_request_ids(request_ids: Sequence[str]) -> list[str]:
    """The ids clients sent, with a generated one wherever a client sent none."""
    missing = [i for i, rid in enumerate(request_ids) if not rid]
    if not missing:
        return list(request_ids)
    filled = list(request_ids)
    for i, generated in zip(missing, new_request_ids(len(missing)), strict=True):
        filled[i] = generated
    return filled


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def _tag(field_number: int, wire_type: int) -> bytes:
    return _encode_varint(field_number << 3 | wire_type)


_RESPONSES = _tag(pb.ClassifyBatchResponse.RESPONSES_FIELD_NUMBER, 2)
_DIGIT = _tag(pb.ClassifyResponse.DIGIT_FIELD_NUMBER, 0)
_CONFIDENCE = _tag(pb.ClassifyResponse.CONFIDENCE_FIELD_NUMBER, 5)
_PROBABILITIES = _tag(pb.ClassifyResponse.PROBABILITIES_FIELD_NUMBER, 2) + _encode_varint(4 * NUM_CLASSES)
_VERSION = _tag(pb.ClassifyResponse.MODEL_VERSION_FIELD_NUMBER, 2)
_REQUEST_ID = _tag(pb.ClassifyResponse.REQUEST_ID_FIELD_NUMBER, 2)
_DIGIT_SCORE = _tag(pb.ClassifyResponse.DIGIT_SCORE_FIELD_NUMBER, 5)
_IS_DIGIT = _tag(pb.ClassifyResponse.IS_DIGIT_FIELD_NUMBER, 0)
_RAW_ITEM_HEADER = _raw_item_header()  # a raw-only item of a batch request: these 6 bytes, then the 784 pixels
_RAW_ITEM_HEAD = np.frombuffer(_RAW_ITEM_HEADER + b"\0\0", "<u8")[0]  # the header as a number, for one comparison
_HEADER_MASK = np.uint64(2 ** (8 * len(_RAW_ITEM_HEADER)) - 1)
_RAW_ITEM_BYTES = len(_RAW_ITEM_HEADER) + RAW_BYTES


def encode_classify_response(predictions: Predictions, request_id: str) -> bytes:
    """The serialized `ClassifyResponse` of a one-image request (the same record as one item of a batch response)."""
    version, rid = predictions.model_version.encode(), request_id.encode()
    return b"".join(
        (
            _DIGIT,
            _encode_varint(int(predictions.digits[0])),
            _CONFIDENCE,
            struct.pack("<f", predictions.confidences[0]),
            _PROBABILITIES,
            np.ascontiguousarray(predictions.probabilities[0], "<f4").tobytes(),
            _VERSION,
            _encode_varint(len(version)),
            version,
            _REQUEST_ID,
            _encode_varint(len(rid)),
            rid,
            _DIGIT_SCORE,
            struct.pack("<f", predictions.digit_scores[0]),
            _IS_DIGIT,
            b"\x01" if predictions.is_digit[0] else b"\x00",
        )
    )


def encode_classify_batch_response(predictions: Predictions, request_ids: Sequence[str] | np.ndarray) -> bytes:
    """The serialized `ClassifyBatchResponse`, one response per row, in order; `request_ids` as strings, or as
    the (N, width) array of their bytes (`new_request_id_array`).

    When every request id has the same length (always so for generated ids), each response is a
    record of the same width and the whole message is one numpy array; otherwise protobuf builds it.
    Every field is written, the digit even when it is 0 (proto3 parsers accept an explicit default).
    """
    if isinstance(request_ids, np.ndarray):
        id_bytes = request_ids
    else:
        ids = [rid.encode() for rid in request_ids]
        if not ids or len(set(map(len, ids))) != 1:
            return _protobuf_batch_response(predictions, request_ids)
        id_bytes = np.frombuffer(b"".join(ids), np.uint8).reshape(len(ids), len(ids[0]))
    count, id_length = id_bytes.shape
    version = predictions.model_version.encode()
    middle = _VERSION + _encode_varint(len(version)) + version + _REQUEST_ID + _encode_varint(id_length)
    inner = (
        len(_DIGIT) + 1 + len(_CONFIDENCE) + 4 + len(_PROBABILITIES) + 4 * NUM_CLASSES + len(middle) + id_length
    ) + (len(_DIGIT_SCORE) + 4 + len(_IS_DIGIT) + 1)
    prefix = _RESPONSES + _encode_varint(inner)
    head = prefix + _DIGIT
    record = np.empty((count, len(prefix) + inner), np.uint8)
    columns = [
        (head, None),
        (None, predictions.digits.astype(np.uint8).reshape(count, 1)),  # 0..9: a one-byte varint
        (_CONFIDENCE, None),
        (None, np.ascontiguousarray(predictions.confidences, "<f4").view(np.uint8).reshape(count, 4)),
        (_PROBABILITIES, None),
        (
            None,
            np.ascontiguousarray(predictions.probabilities, "<f4").view(np.uint8).reshape(count, 4 * NUM_CLASSES),
        ),
        (middle, None),
        (None, id_bytes),
        (_DIGIT_SCORE, None),
        (None, np.ascontiguousarray(predictions.digit_scores, "<f4").view(np.uint8).reshape(count, 4)),
        (_IS_DIGIT, None),
        (None, predictions.is_digit.astype(np.uint8).reshape(count, 1)),
    ]
    at = 0
    for constant, values in columns:
        width = len(constant) if constant is not None else values.shape[1]
        record[:, at : at + width] = np.frombuffer(constant, np.uint8) if constant is not None else values
        at += width
    return record.tobytes()


def _protobuf_batch_response(predictions: Predictions, request_ids: Sequence[str]) -> bytes:
    return pb.ClassifyBatchResponse(
        responses=[
            pb.ClassifyResponse(
                digit=int(digit),
                confidence=float(confidence),
                probabilities=row,
                model_version=predictions.model_version,
                request_id=rid,
                digit_score=float(score),
                is_digit=bool(is_digit),
            )
            for digit, confidence, row, rid, score, is_digit in zip(
                predictions.digits.tolist(),
                predictions.confidences.tolist(),
                predictions.probabilities.tolist(),
                request_ids,
                predictions.digit_scores.tolist(),
                predictions.is_digit.tolist(),
                strict=True,
            )
        ]
    ).SerializeToString()
