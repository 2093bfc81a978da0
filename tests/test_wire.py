"""server.transport.wire: hand-written responses parse as protobuf's own; request parsers name problems and
never raise."""

from __future__ import annotations

import re

import numpy as np
import pytest

import server.transport.wire
from proto.mnist.v1 import classifier_pb2 as pb
from server.pipeline.predictions import Predictions
from server.transport.wire import (
    BOTH_SET,
    RawBatch,
    encode_classify_batch_response,
    encode_classify_response,
    fill_request_ids,
    new_request_id_array,
    new_request_ids,
    parse_classify_batch_request,
    parse_classify_request,
    safe_parser,
)

HEX32 = re.compile(r"[0-9a-f]{32}")
RAW = bytes(range(256)) * 3 + bytes(16)  # 784 bytes


def predictions(count: int, seed: int, version: str = "v") -> Predictions:
    """Random float32 probability rows, their argmax digits (0 included), confidences and digit scores."""
    rng = np.random.default_rng(seed)
    probabilities = rng.dirichlet(np.ones(10), size=count).astype(np.float32)
    if count > 1:
        probabilities[0] = np.eye(10, dtype=np.float32)[0]  # digit 0 with confidence exactly 1
        probabilities[1, :] = np.float32(0.1)  # a tie: argmax says 0
    digits = probabilities.argmax(1)
    scores = rng.random(count).astype(np.float32)
    return Predictions(probabilities, digits, probabilities[np.arange(count), digits], scores, scores >= 0.5, version)


def expected_batch(answers: Predictions, ids: list[str]) -> pb.ClassifyBatchResponse:
    return pb.ClassifyBatchResponse(
        responses=[
            pb.ClassifyResponse(
                digit=int(digit),
                confidence=float(confidence),
                probabilities=row,
                model_version=answers.model_version,
                request_id=rid,
                digit_score=float(score),
                is_digit=bool(is_digit),
            )
            for row, digit, confidence, rid, score, is_digit in zip(
                answers.probabilities.tolist(),
                answers.digits,
                answers.confidences,
                ids,
                answers.digit_scores,
                answers.is_digit,
                strict=True,
            )
        ]
    )


def assert_same_floats(parsed: pb.ClassifyBatchResponse, answers: Predictions) -> None:
    """Every float arrives as the very float32 that was sent."""
    got_probabilities = np.array([list(r.probabilities) for r in parsed.responses], np.float32)
    got_confidences = np.array([r.confidence for r in parsed.responses], np.float32)
    got_scores = np.array([r.digit_score for r in parsed.responses], np.float32)
    np.testing.assert_array_equal(got_probabilities.view(np.uint32), answers.probabilities.view(np.uint32))
    np.testing.assert_array_equal(got_confidences.view(np.uint32), answers.confidences.view(np.uint32))
    np.testing.assert_array_equal(got_scores.view(np.uint32), answers.digit_scores.view(np.uint32))


# --- responses -------------------------------------------------------------------------------------------


@pytest.fixture
def fallbacks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the batch responses built by protobuf (the fallback) rather than by the numpy fast path."""
    calls: list[int] = []
    original = server.transport.wire._protobuf_batch_response

    def counted(answers, request_ids):
        calls.append(len(request_ids))
        return original(answers, request_ids)

    monkeypatch.setattr(server.transport.wire, "_protobuf_batch_response", counted)
    return calls


@pytest.mark.parametrize("version", ["bbd9b92952ad", "v" * 40])  # a long version needs a 2-byte record length
def test_a_batch_response_with_generated_ids_parses_as_protobufs_own(version: str, fallbacks: list[int]) -> None:
    answers = predictions(200, seed=1, version=version)
    ids = new_request_ids(200)
    data = encode_classify_batch_response(answers, ids)
    parsed = pb.ClassifyBatchResponse.FromString(data)
    assert parsed == expected_batch(answers, ids)
    assert [r.digit for r in parsed.responses][:2] == [0, 0] and (answers.digits == 0).sum() >= 2
    assert {r.is_digit for r in parsed.responses} == {True, False}
    assert_same_floats(parsed, answers)
    assert fallbacks == []  # written by numpy


def test_a_batch_response_with_ids_of_mixed_lengths_parses_as_protobufs_own(fallbacks: list[int]) -> None:
    answers = predictions(7, seed=2, version="v1")
    ids = fill_request_ids(["client-1", "", "zähler-1", "", "x" * 200, "7", "ünïcödé-✓"])
    assert ids[0] == "client-1" and ids[2] == "zähler-1" and HEX32.fullmatch(ids[1]) and HEX32.fullmatch(ids[3])
    data = encode_classify_batch_response(answers, ids)
    parsed = pb.ClassifyBatchResponse.FromString(data)
    assert parsed == expected_batch(answers, ids)
    assert [r.request_id for r in parsed.responses] == ids
    assert_same_floats(parsed, answers)
    assert fallbacks == [7]  # built by protobuf


def test_non_ascii_ids_of_equal_byte_length_take_the_fast_path_and_parse_right(fallbacks: list[int]) -> None:
    """The fast path measures ids in UTF-8 bytes, not characters: 'zähler-1' is 9 bytes, 'zahler-12' too."""
    answers = predictions(3, seed=3)
    ids = ["zähler-1", "zahler-12", "ÄÖ-abcd"]
    assert len({len(rid.encode()) for rid in ids}) == 1 and len({len(rid) for rid in ids}) == 3
    parsed = pb.ClassifyBatchResponse.FromString(encode_classify_batch_response(answers, ids))
    assert parsed == expected_batch(answers, ids)
    assert fallbacks == []


def test_uniformly_empty_ids_take_the_fast_path_and_parse_as_empty(fallbacks: list[int]) -> None:
    answers = predictions(4, seed=4)
    data = encode_classify_batch_response(answers, [""] * 4)
    assert pb.ClassifyBatchResponse.FromString(data) == expected_batch(answers, [""] * 4)
    assert fallbacks == []


def test_an_empty_batch_response_is_an_empty_message() -> None:
    data = encode_classify_batch_response(predictions(0, seed=0), [])
    assert pb.ClassifyBatchResponse.FromString(data) == pb.ClassifyBatchResponse()


@pytest.mark.parametrize("digit", [0, 7])
def test_a_single_response_parses_as_protobufs_own(digit: int) -> None:
    rng = np.random.default_rng(digit)
    row = rng.dirichlet(np.ones(10)).astype(np.float32)
    for score in (np.float32(0.25), np.float32(0.75), np.float32("nan")):
        answer = Predictions(
            row[None], np.array([digit]), row[digit : digit + 1], np.array([score]), np.array([score >= 0.5]), "v2"
        )
        parsed = pb.ClassifyResponse.FromString(encode_classify_response(answer, "zähler-1"))
        expected = pb.ClassifyResponse(
            digit=digit,
            confidence=float(row[digit]),
            probabilities=row.tolist(),
            model_version="v2",
            request_id="zähler-1",
            digit_score=float(score),
            is_digit=bool(score >= 0.5),
        )
        if np.isnan(score):
            assert np.isnan(parsed.digit_score) and not parsed.is_digit
            parsed.digit_score = expected.digit_score = 0.0
        assert parsed == expected
        # one image's response is the same record as one item of a batch response
        batch = pb.ClassifyBatchResponse.FromString(encode_classify_batch_response(answer, ["zähler-1"]))
        if np.isnan(score):
            batch.responses[0].digit_score = 0.0
        assert batch.responses[0] == expected


def test_new_request_ids_are_distinct_32_hex_digit_strings() -> None:
    ids = new_request_ids(1000)
    assert len(ids) == 1000 and len(set(ids)) == 1000
    assert all(HEX32.fullmatch(rid) for rid in ids)
    assert new_request_ids(0) == [] and set(new_request_ids(5)).isdisjoint(ids)


def test_fill_request_ids_keeps_given_ids_and_fills_only_empty_ones() -> None:
    given = ["a", "", "b", ""]
    filled = fill_request_ids(given)
    assert filled[0] == "a" and filled[2] == "b"
    assert HEX32.fullmatch(filled[1]) and HEX32.fullmatch(filled[3]) and filled[1] != filled[3]
    assert given == ["a", "", "b", ""]  # the caller's list is not changed
    assert fill_request_ids(["x", "y"]) == ["x", "y"]


# --- requests ---------------------------------------------------------------------------------------------


def test_a_normal_request_parses_without_a_problem() -> None:
    request = pb.ClassifyRequest(raw=RAW, request_id="r1")
    parsed = parse_classify_request(request.SerializeToString())
    assert parsed.problem is None and parsed.message == request


def both_fields(raw: bytes = RAW) -> bytes:
    return pb.ClassifyRequest(encoded=b"png?").SerializeToString() + pb.ClassifyRequest(raw=raw).SerializeToString()


def test_a_request_carrying_both_image_fields_has_the_both_problem() -> None:
    parsed = parse_classify_request(both_fields())
    assert parsed.problem == BOTH_SET
    reverse = pb.ClassifyRequest(raw=RAW).SerializeToString() + pb.ClassifyRequest(encoded=b"x").SerializeToString()
    assert parse_classify_request(reverse).problem == BOTH_SET


def test_a_duplicated_request_id_is_valid_and_the_last_one_wins() -> None:
    """Non-canonical (the message re-serializes shorter) but valid protobuf: no problem."""
    data = pb.ClassifyRequest(raw=RAW, request_id="first").SerializeToString()
    data += pb.ClassifyRequest(request_id="second").SerializeToString()
    parsed = parse_classify_request(data)
    assert parsed.problem is None and parsed.message.request_id == "second" and parsed.message.raw == RAW
    assert parsed.message.ByteSize() < len(data)  # the slow, exact scan was taken


@pytest.mark.parametrize(
    "data", [b"\x12\xff\xff\x03truncated", b"\xff", b"\x0a\x05ab", b"\x0f"], ids=["long", "ff", "short", "wiretype"]
)
def test_garbage_is_a_malformed_request_problem(data: bytes) -> None:
    parsed = parse_classify_request(data)
    assert parsed.problem is not None and parsed.problem.startswith("malformed request: not a valid ClassifyRequest")
    assert isinstance(parsed.message, pb.ClassifyRequest)
    batch = parse_classify_batch_request(data)
    assert batch.problem is not None and "not a valid ClassifyBatchRequest" in batch.problem


def test_the_parsers_never_raise_on_random_bytes() -> None:
    rng = np.random.default_rng(5)
    for _ in range(2000):
        data = rng.integers(0, 256, size=int(rng.integers(0, 40)), dtype=np.uint8).tobytes()
        for parse in (parse_classify_request, parse_classify_batch_request, safe_parser(pb.GetModelInfoRequest)):
            parsed = parse(data)
            assert parsed.problem is None or parsed.problem.startswith("malformed request")


def test_a_batch_names_the_item_with_both_image_fields() -> None:
    items = [pb.ClassifyRequest(raw=RAW).SerializeToString(), pb.ClassifyRequest(raw=RAW).SerializeToString()]
    items.insert(2, both_fields())
    data = b"".join(b"\x0a" + bytes([len(item) & 0x7F | 0x80, len(item) >> 7]) + item for item in items)
    parsed = parse_classify_batch_request(data)
    assert parsed.problem == f"requests[2]: {BOTH_SET}"
    assert len(parsed.message.requests) == 3


def test_a_normal_batch_and_one_with_only_duplicated_ids_have_no_problem() -> None:
    batch = pb.ClassifyBatchRequest(requests=[pb.ClassifyRequest(raw=RAW, request_id=str(i)) for i in range(3)])
    assert parse_classify_batch_request(batch.SerializeToString()) == (batch, None)
    item = pb.ClassifyRequest(raw=RAW, request_id="a").SerializeToString() + b"\x1a\x01b"  # request_id again
    data = b"\x0a" + bytes([len(item) & 0x7F | 0x80, len(item) >> 7]) + item
    parsed = parse_classify_batch_request(data)
    assert parsed.problem is None and parsed.message.requests[0].request_id == "b"


def test_safe_parser_reports_garbage_instead_of_raising() -> None:
    parse = safe_parser(pb.GetModelInfoRequest)
    assert parse(b"") == (pb.GetModelInfoRequest(), None)
    parsed = parse(b"\x12\xff\xff\x03truncated")
    assert parsed.problem.startswith("malformed request: not a valid GetModelInfoRequest")
    assert parsed.message == pb.GetModelInfoRequest()


def _group(number: int, body: bytes) -> bytes:
    return bytes([number << 3 | 3]) + body + bytes([number << 3 | 4])


def test_an_unknown_group_holding_fields_1_and_2_is_not_mistaken_for_both_image_fields() -> None:
    inner = pb.ClassifyRequest(encoded=b"png").SerializeToString() + pb.ClassifyRequest(raw=b"x").SerializeToString()
    data = pb.ClassifyRequest(raw=RAW).SerializeToString() + _group(15, inner)
    parsed = parse_classify_request(data)
    assert parsed.problem is None and parsed.message.raw == RAW
    batch = pb.ClassifyBatchRequest(requests=[pb.ClassifyRequest(raw=RAW)]).SerializeToString() + _group(9, inner)
    assert parse_classify_batch_request(batch).problem is None


def test_both_image_fields_beside_an_unknown_group_are_still_caught() -> None:
    data = pb.ClassifyRequest(raw=RAW).SerializeToString() + _group(15, b"\x08\x01")
    data += pb.ClassifyRequest(encoded=b"png").SerializeToString()
    assert parse_classify_request(data).problem == BOTH_SET


def test_an_unclosed_or_mismatched_group_is_malformed() -> None:
    base = pb.ClassifyRequest(raw=RAW).SerializeToString()
    for tail in (bytes([15 << 3 | 3]), bytes([15 << 3 | 3, 14 << 3 | 4])):
        assert "malformed" in (parse_classify_request(base + tail).problem or "")


# --- batches of raw images, read off the wire -----------------------------------------------------------------


def raw_items(count: int, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, 784, dtype=np.uint8).tobytes() for _ in range(count)]


@pytest.mark.parametrize("model", [("", ""), ("googlenet-fast", "3")])
def test_a_batch_of_raw_images_only_is_read_as_one_array_holding_what_protobuf_reads(model: tuple[str, str]) -> None:
    images = raw_items(37, seed=6)
    batch = pb.ClassifyBatchRequest(
        requests=[pb.ClassifyRequest(raw=raw) for raw in images], model_name=model[0], model_version=model[1]
    )
    parsed = parse_classify_batch_request(batch.SerializeToString())
    assert parsed.problem is None and isinstance(parsed.message, RawBatch)
    assert parsed.message.pixels.shape == (37, 1, 28, 28) and parsed.message.pixels.dtype == np.uint8
    assert [row.tobytes() for row in parsed.message.pixels] == [item.raw for item in batch.requests]
    assert (parsed.message.model_name, parsed.message.model_version) == model


def _with_id(items: list[pb.ClassifyRequest]) -> None:
    items[5].request_id = "mine"


def _encoded(items: list[pb.ClassifyRequest]) -> None:
    items[0].encoded = items[0].raw  # 784 bytes, the other image field: same length, another tag


def _short(items: list[pb.ClassifyRequest]) -> None:
    items[-1].raw = items[-1].raw[:783]


def _own_model(items: list[pb.ClassifyRequest]) -> None:
    items[3].model_name = "other"


@pytest.mark.parametrize("change", [_with_id, _encoded, _short, _own_model])
def test_a_batch_with_anything_else_in_an_item_is_read_by_protobuf(change) -> None:
    items = [pb.ClassifyRequest(raw=raw) for raw in raw_items(8, seed=7)]
    change(items)
    batch = pb.ClassifyBatchRequest(requests=items)
    parsed = parse_classify_batch_request(batch.SerializeToString())
    assert parsed == (batch, None)


def test_batch_fields_before_the_items_or_items_after_them_are_read_by_protobuf() -> None:
    items = [pb.ClassifyRequest(raw=raw) for raw in raw_items(4, seed=8)]
    raw_run = pb.ClassifyBatchRequest(requests=items).SerializeToString()
    name_first = pb.ClassifyBatchRequest(model_name="m").SerializeToString() + raw_run
    parsed = parse_classify_batch_request(name_first)
    assert parsed == (pb.ClassifyBatchRequest(requests=items, model_name="m"), None)
    encoded_after = raw_run + pb.ClassifyBatchRequest(requests=[pb.ClassifyRequest(encoded=b"png")]).SerializeToString()
    parsed = parse_classify_batch_request(encoded_after)
    assert isinstance(parsed.message, pb.ClassifyBatchRequest) and len(parsed.message.requests) == 5


def test_generated_request_id_arrays_are_distinct_hex_and_make_the_same_response_as_strings() -> None:
    ids = new_request_id_array(500)
    strings = [row.tobytes().decode() for row in ids]
    assert len(set(strings)) == 500 and all(HEX32.fullmatch(rid) for rid in strings)
    answers = predictions(500, seed=9)
    assert encode_classify_batch_response(answers, ids) == encode_classify_batch_response(answers, strings)
