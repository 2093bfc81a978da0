"""Handwritten arithmetic: one line of digits and operators read, then evaluated exactly. numpy and scipy only.

Reading reuses the number reader (server/pipeline/reading.py) in its symbols mode: small marks are kept and
marks above one another are one symbol (the bars of =, the dots of ÷). Every candidate goes through the digit
classifier and the operator model (server/pipeline/operators.py) in the same batch; a symbol's probabilities
are the operator model's for each operator, and its "a digit" share spread over the ten digits as the classifier
reads them. The classifier's own contract is untouched: Classify still answers 0-9.

Evaluation is exact (fractions, never floats): × and ÷ before + and -, left to right; a leading minus negates
the first number. What follows = is the writer's answer, checked against the value. What cannot be evaluated
(division by zero, two operators in a row, an operator at either end) is an error in the answer, not a crash.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from proto.contract import OPERATOR_CLASSES, OPERATORS
from server.pipeline.reading import Segmentation, _binarize, _ink, rows_of_ink, segment_ink

DIGITS = "0123456789"
ALPHABET = DIGITS + "".join(OPERATORS)  # every symbol an expression may hold: the digits, then + - × ÷ =
ARITHMETIC = "+-×÷"
DOT_REACH = 0.7  # ink need only reach this share of a number's threshold: a ÷'s faint dots stay
TALL = 0.9  # a candidate at least this share of its line's height is as tall as a digit...
TALL_OPERATOR_ODDS = 0.2  # ...and its operators' probabilities are weighed by this
NO_NUMBER = "no number found: the image reads {text!r}; an expression needs digits to work on"
NO_OPERATOR = (
    "no operator found: the image reads {text!r}; an expression needs at least one of + - × ÷ "
    "(for a number alone use ReadDigits)"
)


@dataclass(frozen=True)
class ReadSymbol:
    box: tuple[int, int, int, int]  # x, y, width, height in the original image's pixels
    symbol: str  # one of ALPHABET
    confidence: float
    alternatives: tuple[tuple[str, float], ...]  # the top 3 symbols and their probabilities, best first


@dataclass(frozen=True)
class Evaluation:
    value: str = ""  # exact: "19", "-3", "3/4"; empty when it cannot be evaluated
    error: str = ""  # why there is no value
    written_answer: str = ""  # what follows =, when the writer gave an answer
    answer_correct: bool = False  # the written answer equals the value


@dataclass(frozen=True)
class Expression:
    text: str  # e.g. "12+7=": ASCII + and -, and × ÷ =
    symbols: tuple[ReadSymbol, ...]
    confidence: float  # that every symbol is right: the product of the symbols' confidences
    evaluation: Evaluation


def segment_expression(gray: np.ndarray, scale: float = 1.0, max_symbols: int = 64) -> Segmentation:
    """Candidates for every symbol of a one-line expression in `gray` (float [0, 1]).

    ValueError naming the problem: no ink, too many symbols, or more than one line."""
    ink = _ink(gray)
    segmentation = segment_ink(
        ink, _binarize(ink, DOT_REACH), scale, 0, max_symbols, symbols=True, lines_of=rows_of_ink
    )
    segmentation.cut_into = len(DIGITS)  # touching symbols are digits: people leave room around an operator
    lines = len(segmentation.line_height)
    if lines > 1:
        raise ValueError(f"found {lines} lines of symbols: an expression is read from one line (one per image)")
    return segmentation


def symbol_probabilities(digit_probabilities: np.ndarray, operator_probabilities: np.ndarray) -> np.ndarray:
    """(N, 10) digit classifier and (N, 6) operator model outputs -> (N, 15) over ALPHABET, each row summing to 1."""
    digit_share = operator_probabilities[:, :1] * digit_probabilities
    return np.concatenate([digit_share, operator_probabilities[:, 1 : len(OPERATOR_CLASSES)]], axis=1)


def with_size_prior(probabilities: np.ndarray, heights: np.ndarray) -> np.ndarray:
    """Symbol probabilities weighed by size: a candidate as tall as the line's digits is rarely an operator (people
    write + - × ÷ = smaller than their digits), so its operators' share is cut to TALL_OPERATOR_ODDS; the operator
    model still wins where it is that much surer. `heights`: each candidate's height over its line's."""
    weights = np.ones_like(probabilities)
    weights[heights >= TALL, len(DIGITS) :] = TALL_OPERATOR_ODDS
    weighed = probabilities * weights
    return weighed / weighed.sum(axis=1, keepdims=True)


def read_expression(
    segmentation: Segmentation, digit_probabilities: np.ndarray, operator_probabilities: np.ndarray
) -> Expression:
    """The expression, from the model outputs for `segmentation.images`. ValueError when it holds no operator."""
    probabilities = symbol_probabilities(
        np.asarray(digit_probabilities, np.float64), np.asarray(operator_probabilities, np.float64)
    )
    probabilities = with_size_prior(probabilities, segmentation.candidate_heights())
    symbols: list[ReadSymbol] = []
    for pieces in segmentation.pieces(probabilities).values():
        for box, row in pieces:
            p = probabilities[row]
            top = np.argsort(-p)[:3]
            alternatives = tuple((ALPHABET[k], float(p[k])) for k in top)
            symbols.append(ReadSymbol(box.scaled(segmentation.scale), ALPHABET[top[0]], float(p[top[0]]), alternatives))
    text = "".join(s.symbol for s in symbols)
    if not any(op in text for op in ARITHMETIC):
        raise ValueError(NO_OPERATOR.format(text=text))
    if not any(symbol in DIGITS for symbol in text):
        raise ValueError(NO_NUMBER.format(text=text))
    confidence = float(np.prod([s.confidence for s in symbols]))
    return Expression(text, tuple(symbols), confidence, evaluate(text))


def evaluate(text: str) -> Evaluation:
    """`text` (digits and + - × ÷ =) evaluated exactly, with the usual precedence; never raises."""
    left, equals, answer = text.partition("=")
    try:
        if "=" in answer:
            raise _Malformed("more than one =")
        value = _value(_tokens(left))
        shown = _exact(value)
    except _Malformed as problem:
        return Evaluation(error=f"malformed expression {text!r}: {problem}")
    except ZeroDivisionError:
        return Evaluation(error=f"division by zero in {text!r}")
    except ValueError:  # Python's bound on the digits of an integer written out (thousands): never at 64 symbols
        return Evaluation(error=f"the value of {text!r} has too many digits to write out")
    if not (equals and answer):
        return Evaluation(shown)
    try:  # the writer's answer, as written: the value stands even when the answer is not a number
        written = _number(answer, "the answer after =")
    except (_Malformed, ValueError) as problem:
        return Evaluation(shown, f"malformed answer in {text!r}: {problem}", answer)
    return Evaluation(shown, "", answer, Fraction(written) == value)


class _Malformed(ValueError):
    pass


def _tokens(text: str) -> list[Fraction | str]:
    """Numbers and operators, alternating, a number first and last (a leading minus belongs to the number)."""
    if not text:
        raise _Malformed("no number before =")
    tokens: list[Fraction | str] = []
    digits = ""
    for position, symbol in enumerate(text):
        if symbol in DIGITS:
            digits += symbol
            continue
        if not digits:
            if symbol == "-" and position == 0:
                digits = "-"
                continue
            where = "at the start" if position == 0 else f"after {text[position - 1]!r}"
            raise _Malformed(f"{symbol!r} {where}, where a number should be")
        if digits == "-":
            raise _Malformed(f"{symbol!r} after a leading minus, where a number should be")
        tokens += [Fraction(int(digits)), symbol]
        digits = ""
    if digits in ("", "-"):
        raise _Malformed(f"it ends with {text[-1]!r}, where a number should be")
    tokens.append(Fraction(int(digits)))
    return tokens


def _value(tokens: list[Fraction | str]) -> Fraction:
    """× and ÷ first, then + and -, each left to right."""
    terms: list[Fraction] = [tokens[0]]  # type: ignore[list-item]
    signs: list[int] = [1]
    for operator, number in zip(tokens[1::2], tokens[2::2], strict=True):
        assert isinstance(number, Fraction)
        if operator == "×":
            terms[-1] *= number
        elif operator == "÷":
            terms[-1] /= number  # ZeroDivisionError: the caller's error
        else:
            terms.append(number)
            signs.append(1 if operator == "+" else -1)
    return sum((sign * term for sign, term in zip(signs, terms, strict=True)), Fraction(0))


def _number(text: str, what: str) -> int:
    body = text[1:] if text.startswith("-") else text
    if not body or not body.isdigit():
        raise _Malformed(f"{what} is {text!r}, not a number")
    return int(text)


def _exact(value: Fraction) -> str:
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"
