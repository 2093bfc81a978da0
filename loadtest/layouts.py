"""Generated tables and expressions for mnist-read-bench: MNIST *test* digits, held-out operator strokes.

Tables: 2-12 rows by 2-6 columns of numbers of 1-4 digits (a column's numbers share an alignment, a few cells
are empty), uneven column gaps and row pitches, ruled (a full grid, or rows only) or not, turned by up to 2.5
degrees, on clean paper or a photo-like page. Expressions: 2-4 operands of 1-3 digits joined by + - × ÷ and
often ending in =, the operators drawn by the held-out stroke generator "B" (training/strokes.py): the operator
model was trained on generator "A" only, so these scores are its held-out truth.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from loadtest.reading import Composed, _digit_ink, _render

TABLE_KINDS = ("table-unruled", "table-ruled")
EXPRESSION_KIND = "expression"
OPERATOR_SYMBOLS = "+-×÷"
EMPTY_CELL_SHARE = 0.06


def _number_ink(
    rng: np.random.Generator, images: np.ndarray, labels: np.ndarray, count: int, height: int, slant: float
) -> tuple[np.ndarray, str, list[int]]:
    """`count` test digits written side by side as one number: its ink, its text and the test digits' indices."""
    pieces, text, sources = [], "", []
    for _ in range(count):
        index = int(rng.integers(0, len(images)))
        sources.append(index)
        pieces.append(
            _digit_ink(images[index], int(height * rng.uniform(0.9, 1.1)), slant + rng.uniform(-0.05, 0.05), rng)
        )
        text += str(int(labels[index]))
    gaps = [int(rng.uniform(0.1, 0.3) * height) for _ in pieces[1:]]
    tall = max(p.shape[0] for p in pieces)
    ink = np.zeros((tall, sum(p.shape[1] for p in pieces) + sum(gaps)), np.float32)
    x = 0
    for n, piece in enumerate(pieces):
        top = tall - piece.shape[0]
        np.maximum(ink[top:, x : x + piece.shape[1]], piece, out=ink[top:, x : x + piece.shape[1]])
        x += piece.shape[1] + (gaps[n] if n < len(gaps) else 0)
    return ink, text, sources


def compose_table(
    rng: np.random.Generator, images: np.ndarray, labels: np.ndarray, ruled: bool, photo: bool
) -> Composed:
    """One table; its truth is the cells' text, tab-separated, rows on separate lines."""
    rows, columns = int(rng.integers(2, 13)), int(rng.integers(2, 7))
    height = int(rng.integers(24, 48))
    slant = rng.uniform(-0.2, 0.2)
    widest = [int(rng.integers(1, 5)) for _ in range(columns)]  # a column's longest number
    right_aligned = rng.random() < 0.7
    cells: list[list[tuple[np.ndarray | None, str, list[int]]]] = []
    for _ in range(rows):
        row = []
        for c in range(columns):
            if rng.random() < EMPTY_CELL_SHARE:
                row.append((None, "", []))
            else:
                row.append(_number_ink(rng, images, labels, int(rng.integers(1, widest[c] + 1)), height, slant))
        cells.append(row)
    if all(ink is None for row in cells for ink, _, _ in row):  # never a table without a digit
        cells[0][0] = _number_ink(rng, images, labels, 1, height, slant)
    column_width = [
        max([ink.shape[1] for row in cells for ink in [row[c][0]] if ink is not None] or [height])
        for c in range(columns)
    ]
    margin = int(rng.uniform(0.5, 1.0) * height)
    gaps = [int(rng.uniform(0.9, 2.0) * height) for _ in range(columns - 1)]
    lefts = [margin]
    for c in range(1, columns):
        lefts.append(lefts[-1] + column_width[c - 1] + gaps[c - 1])
    pitch = [int(rng.uniform(1.5, 2.0) * height) for _ in range(rows)]
    tops = [margin + sum(pitch[:r]) for r in range(rows)]
    page_w = lefts[-1] + column_width[-1] + margin
    page_h = tops[-1] + pitch[-1] + margin
    canvas = np.zeros((page_h, page_w), np.float32)
    for r, row in enumerate(cells):
        for c, (ink, _, _) in enumerate(row):
            if ink is None:
                continue
            h, w = ink.shape
            x = lefts[c] + (column_width[c] - w if right_aligned else 0)
            y = tops[r] + (pitch[r] - h) // 2 + int(rng.uniform(-0.1, 0.1) * height)
            y = min(max(y, 0), page_h - h)
            np.maximum(canvas[y : y + h, x : x + w], ink, out=canvas[y : y + h, x : x + w])
    if ruled:
        thickness = int(rng.integers(1, 4))
        strength = rng.uniform(0.5, 1.0)
        for r in range(rows + 1):
            y = min(page_h - thickness, (tops[r] if r < rows else tops[-1] + pitch[-1]))
            canvas[y : y + thickness, margin // 3 : page_w - margin // 3] = np.maximum(
                canvas[y : y + thickness, margin // 3 : page_w - margin // 3], strength
            )
        if rng.random() < 0.6:  # a full grid; otherwise rows only
            for c in range(columns + 1):
                x = (
                    lefts[c] - gaps[c - 1] // 2
                    if 0 < c < columns
                    else (margin // 3 if c == 0 else page_w - margin // 3)
                )
                canvas[tops[0] : tops[-1] + pitch[-1] + thickness, x : x + thickness] = strength
    degrees = rng.uniform(-2.5, 2.5)
    turned = np.asarray(
        Image.fromarray(canvas, "F").rotate(degrees, Image.Resampling.BILINEAR, expand=True, fillcolor=0.0), np.float32
    )
    text = "\n".join("\t".join(t for _, t, _ in row) for row in cells)
    sources = tuple(index for row in cells for _, _, indices in row for index in indices)
    return _render(np.clip(turned, 0, 1), text, "table-ruled" if ruled else "table-unruled", photo, rng, sources)


def compose_expression(rng: np.random.Generator, images: np.ndarray, labels: np.ndarray, photo: bool) -> Composed:
    """One expression: 2-4 operands of 1-3 test digits, operators from stroke generator B, often ending in =."""
    from training.strokes import render_symbol

    height = int(rng.integers(28, 80))
    slant = rng.uniform(-0.2, 0.2)
    operands = int(rng.integers(2, 5))
    parts: list[tuple[np.ndarray, str, bool]] = []  # ink, text, is an operator
    for n in range(operands):
        ink, text, _ = _number_ink(rng, images, labels, int(rng.integers(1, 4)), height, slant)
        parts.append((ink, text, False))
        if n < operands - 1:
            symbol = OPERATOR_SYMBOLS[int(rng.integers(0, len(OPERATOR_SYMBOLS)))]
            drawn = ":" if symbol == "÷" and rng.random() < 0.3 else symbol
            parts.append((render_symbol(drawn, "B", rng, height), symbol, True))
    if rng.random() < 0.6:
        parts.append((render_symbol("=", "B", rng, height), "=", True))
    margin = int(rng.uniform(0.3, 0.8) * height)
    gaps = [int(rng.uniform(0.25, 0.6) * height) for _ in parts[1:]]
    canvas = np.zeros((2 * height + 2 * margin, sum(p[0].shape[1] for p in parts) + sum(gaps) + 2 * margin), np.float32)
    x, baseline = margin, margin + int(1.5 * height)
    for n, (ink, _, operator) in enumerate(parts):
        h, w = ink.shape
        # digits stand on the baseline; an operator sits about the middle of the digits' height
        y = baseline - h if not operator else baseline - height // 2 - h // 2 + int(rng.uniform(-0.08, 0.08) * height)
        y = min(max(y, 0), canvas.shape[0] - h)
        np.maximum(canvas[y : y + h, x : x + w], ink, out=canvas[y : y + h, x : x + w])
        x += w + (gaps[n] if n < len(gaps) else 0)
    text = "".join(t for _, t, _ in parts)
    return _render(canvas, text, EXPRESSION_KIND, photo, rng)


def layout_set(
    images: np.ndarray, labels: np.ndarray, tables_per_kind: int, expressions: int, seed: int = 0
) -> list[Composed]:
    """Tables of each kind and expressions, half on clean paper and half photo-like, seeded."""
    rng = np.random.default_rng(seed + 1_000_003)  # apart from the number benchmark's stream
    composed = []
    for kind in TABLE_KINDS:
        for i in range(tables_per_kind):
            composed.append(compose_table(rng, images, labels, kind == "table-ruled", photo=i % 2 == 1))
    for i in range(expressions):
        composed.append(compose_expression(rng, images, labels, photo=i % 2 == 1))
    return composed


def table_text(rows: list[list[str]]) -> str:
    return "\n".join("\t".join(row) for row in rows)


def score_tables(results: list[tuple[Composed, str]], misread: frozenset[int] | None = None) -> dict[str, dict]:
    """Per kind and background: cells exactly right (a cell missing from the answer's grid is wrong) and whole
    tables exactly right (the grid's shape too). Given `misread`, the test digits the classifier gets wrong on their
    own (28x28, as MNIST stores them), also the classifier's ceiling: the share of tables none of whose digits it
    misreads, what a perfect segmentation feeding this classifier would score."""
    table: dict[str, dict] = {}
    for composed, answer in results:
        truth = [row.split("\t") for row in composed.text.split("\n")]
        read = [row.split("\t") for row in answer.split("\n")] if answer and not answer.startswith("<") else []
        right = sum(
            1
            for r, row in enumerate(truth)
            for c, cell in enumerate(row)
            if r < len(read) and c < len(read[r]) and read[r][c] == cell
        )
        for key in (composed.kind, f"{composed.kind}/{composed.background}"):
            entry = table.setdefault(key, {"tables": 0, "cells": 0, "cells_right": 0, "tables_right": 0})
            entry["tables"] += 1
            entry["cells"] += sum(len(row) for row in truth)
            entry["cells_right"] += right
            entry["tables_right"] += read == truth
            if misread is not None:
                readable = not misread.intersection(composed.sources)
                entry["tables_the_classifier_reads"] = entry.get("tables_the_classifier_reads", 0) + readable
    for entry in table.values():
        entry["cell_accuracy"] = entry["cells_right"] / max(entry["cells"], 1)
        entry["table_accuracy"] = entry["tables_right"] / max(entry["tables"], 1)
        if misread is not None:
            entry["classifier_ceiling"] = entry["tables_the_classifier_reads"] / max(entry["tables"], 1)
    return dict(sorted(table.items()))


def score_expressions(results: list[tuple[Composed, str]]) -> dict[str, dict]:
    """Per background: expressions read exactly (the whole text), and operators right (the i-th operator of the
    truth against the i-th non-digit of the answer)."""
    table: dict[str, dict] = {}
    for composed, answer in results:
        truth_ops = [s for s in composed.text if not s.isdigit()]
        read_ops = [s for s in answer if not s.isdigit()] if not answer.startswith("<") else []
        right = sum(1 for i, op in enumerate(truth_ops) if i < len(read_ops) and read_ops[i] == op)
        for key in (composed.kind, f"{composed.kind}/{composed.background}"):
            entry = table.setdefault(key, {"expressions": 0, "exact": 0, "operators": 0, "operators_right": 0})
            entry["expressions"] += 1
            entry["exact"] += answer == composed.text
            entry["operators"] += len(truth_ops)
            entry["operators_right"] += right
    for entry in table.values():
        entry["text_accuracy"] = entry["exact"] / max(entry["expressions"], 1)
        entry["operator_accuracy"] = entry["operators_right"] / max(entry["operators"], 1)
    return dict(sorted(table.items()))
