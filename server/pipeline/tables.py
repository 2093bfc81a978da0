"""Reading a table of handwritten numbers: rows and columns of cells, ruled or not. numpy and scipy only.

Steps, around one batched model call as for ReadDigits (server/pipeline/reading.py):

1. `segment_table(gray)`: the ink found as for a number; the page's skew measured (the angle whose rows of ink
   are sharpest) and taken out by rotating the ink; ruling lines found (runs of ink much longer than a digit is
   wide or tall) and taken out of the ink, remembered as row and column boundaries; the rest segmented into
   digit candidates as a number is. Rows: between horizontal rulings when there are any, else lines of ink.
   Columns: between vertical rulings when there are any, else the spans where some row has ink, split where
   every row leaves a gap wider than a digit's half-height... the refusals (no table, too many cells) come here,
   before the model runs.
2. `TableSegmentation.assemble(probabilities)`: the digits kept as for a number, each put in the cell whose row
   and column hold it; every cell of the grid answered, empty ones as empty text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from server.config import TABLE_CANDIDATES_PER_CELL
from server.pipeline.reading import (
    NO_DIGITS,
    Box,
    ReadDigit,
    Segmentation,
    _binarize,
    _ink,
    _otsu,
    rows_of_ink,
    segment_ink,
)

NO_TABLE = "no table found: no ink stands out from the background"
ONE_CELL = "no table found: the ink forms a single cell (for one number, use ReadDigits)"
MAX_SKEW_DEGREES = 6.0  # pages photographed more askew than this are not straightened
SKEW_STEP_DEGREES = 0.1
STRAIGHTEN_GROWTH = 1.5  # a page is not straightened when turning it would need this many times its pixels
STRAIGHTEN_OVER_DEGREES = 0.2  # a smaller skew is left alone: rotating costs more than it helps
RULING_LENGTH = 1.6  # a ruling line is a run of ink at least this many digit heights long (a box round one digit)...
RULING_SHARE = 0.25  # ...and at least this share of the ink's extent across
EMPTY_ROW_GAP = 1.75  # two rows of ink this many row pitches apart have an empty row between them
COLUMN_GAP = 0.6  # columns of an unruled table are apart by more than this many line heights in every row
# A cut through a digit's body costs this much log-confidence per typical column of ink it crosses: the one cue
# that tells a wide 0 (cut through two strokes) from two digits apart (tuned on other seeds than the benchmark's).
CUT_COST_IN_A_CELL = 2.0
SPLIT_PRIOR_IN_A_CELL = 1.0


@dataclass(frozen=True)
class TableCell:
    text: str  # the digits read, in order; "" for an empty cell
    confidence: float  # that the text is right: the product of its digits' confidences (1.0 for an empty cell)
    box: tuple[int, int, int, int]  # the cell's row span by its column span, in the original image's pixels
    digits: tuple[ReadDigit, ...]


@dataclass(frozen=True)
class Table:
    rows: tuple[tuple[TableCell, ...], ...]  # every row has one cell per column
    columns: int
    ruled_rows: bool  # rows came from horizontal ruling lines
    ruled_columns: bool  # columns came from vertical ruling lines
    skew_degrees: float  # how far the page was turned; positive: lines fall to the right
    confidence: float  # that every cell is right

    @property
    def cells(self) -> int:
        return len(self.rows) * self.columns


@dataclass
class _Straightening:
    """The working image's skew taken out: output (row, col) -> input = matrix @ (row, col) + offset."""

    matrix: np.ndarray
    offset: np.ndarray
    size: tuple[int, int]  # the working image's (height, width), which boxes are kept within

    def box_back(self, box: Box, scale: float) -> tuple[int, int, int, int]:
        """A box in the straightened image -> its bounding box in the original image's pixels, within the image."""
        corners = np.array([[box.y, box.x], [box.y, box.right], [box.bottom, box.x], [box.bottom, box.right]], float)
        original = corners @ self.matrix.T + self.offset
        top, left = np.maximum(original.min(axis=0), 0)
        bottom, right = np.minimum(original.max(axis=0), self.size)
        return Box(round(left), round(top), max(1, round(right - left)), max(1, round(bottom - top))).scaled(scale)


@dataclass
class TableSegmentation:
    """The digit candidates of a table (`segmentation.images` go to the model in one batch) and its grid."""

    segmentation: Segmentation
    row_spans: list[tuple[float, float]]  # top, bottom of each row, in the straightened image
    column_spans: list[tuple[float, float]]  # left, right of each column
    row_of_line: dict[int, int]  # the segmentation's line -> the table's row
    ruled_rows: bool
    ruled_columns: bool
    skew_degrees: float
    straightening: _Straightening

    @property
    def images(self) -> np.ndarray:
        return self.segmentation.images

    @property
    def cells(self) -> int:
        return len(self.row_spans) * len(self.column_spans)

    def assemble(self, probabilities: np.ndarray, digit_scores: np.ndarray | None = None) -> Table:
        probabilities = np.asarray(probabilities, np.float64)
        scale = self.segmentation.scale
        found: dict[tuple[int, int], list[ReadDigit]] = {}
        for line, pieces in self.segmentation.pieces(probabilities, digit_scores).items():
            row = self.row_of_line[line]
            for box, image_row in pieces:
                column = _nearest_span(self.column_spans, box.x + box.w / 2)
                p = probabilities[image_row]
                top = np.argsort(-p)[:3]
                digit = int(top[0])
                alternatives = tuple((int(d), float(p[d])) for d in top)
                found.setdefault((row, column), []).append(
                    ReadDigit(
                        self.straightening.box_back(box, scale), digit, float(p[digit]), alternatives, row, column
                    )
                )
        rows = []
        for r, (top, bottom) in enumerate(self.row_spans):
            cells = []
            for c, (left, right) in enumerate(self.column_spans):
                digits = tuple(found.get((r, c), ()))
                span = Box(round(left), round(top), max(1, round(right - left)), max(1, round(bottom - top)))
                cells.append(
                    TableCell(
                        "".join(str(d.digit) for d in digits),
                        float(np.prod([d.confidence for d in digits])) if digits else 1.0,
                        self.straightening.box_back(span, scale),
                        digits,
                    )
                )
            rows.append(tuple(cells))
        confidence = float(np.prod([cell.confidence for row in rows for cell in row]))
        return Table(
            tuple(rows), len(self.column_spans), self.ruled_rows, self.ruled_columns, self.skew_degrees, confidence
        )


def segment_table(
    gray: np.ndarray, scale: float = 1.0, max_cells: int = 256, max_candidates: int | None = None
) -> TableSegmentation:
    """A table's grid and digit candidates from `gray` (float [0, 1], any size, dark ink on light or the reverse).
    Candidate digit images are bounded by `max_candidates` (default: TABLE_CANDIDATES_PER_CELL per allowed cell).

    ValueError naming the problem: no ink, no table (a single cell), more cells than `max_cells`, too many marks
    or candidates."""
    try:
        ink = _ink(gray)
        skew = _skew_degrees(_binarize(ink))
    except ValueError:
        raise ValueError(NO_TABLE) from None
    ink, straightening = _straightened(ink, skew)
    try:
        mask = _binarize(ink)
    except ValueError:
        raise ValueError(NO_TABLE) from None
    horizontal, vertical = _rulings(mask, _faint(ink))
    rulings = ndimage.binary_dilation(horizontal | vertical, np.ones((3, 3), bool))
    ink = np.where(rulings, 0.0, ink).astype(np.float32)
    mask &= ~rulings & (ink > 0)
    if not mask.any():
        raise ValueError(NO_TABLE + " (ruling lines alone are not a table)")
    row_lines = _line_positions(horizontal.sum(axis=1))
    column_lines = _line_positions(vertical.sum(axis=0))

    ruled_rows = False

    def rows_of(boxes: list[Box]) -> list[int]:
        """A ruled table's rows are the bands between its rulings, unless some band holds several lines of ink
        (rulings missed, or lines between some rows only): then the lines of ink."""
        nonlocal ruled_rows
        lines = rows_of_ink(boxes)
        bands = [int(np.searchsorted(row_lines, box.y + box.h / 2)) for box in boxes]
        typical = float(np.median([box.h for box in boxes]))
        digit_sized = [n for n, box in enumerate(boxes) if box.h >= 0.5 * typical]  # a decimal point is no row
        rows_of_digits = {lines[n] for n in digit_sized}
        ruled_rows = bool(row_lines) and len({bands[n] for n in digit_sized}) >= len(rows_of_digits)
        return bands if ruled_rows else lines

    most = max_candidates or TABLE_CANDIDATES_PER_CELL * max_cells
    try:
        segmentation = segment_ink(ink, mask, scale, 0, most, lines_of=rows_of, one_height=True, max_images=True)
    except ValueError as problem:
        if str(problem) == NO_DIGITS:
            raise ValueError(NO_TABLE) from None
        raise ValueError(
            f"{problem} ({TABLE_CANDIDATES_PER_CELL} per cell of --max-table-cells {max_cells}, at most "
            "--max-queue-size)"
        ) from None
    segmentation.split_prior, segmentation.cut_cost = SPLIT_PRIOR_IN_A_CELL, CUT_COST_IN_A_CELL
    boxes = [c.box for c in segmentation.components]
    lines = sorted({c.line for c in segmentation.components})
    height = float(np.median([b.h for b in boxes]))
    if ruled_rows:
        row_spans, band_of_row = _bands(
            row_lines,
            [(b.y, b.bottom, c.line) for b, c in zip(boxes, segmentation.components, strict=True)],
            mask.shape[0],
            height,
        )
        row_of_line = {line: band_of_row[line] for line in lines}
    else:
        inked = [
            (
                min(b.y for b, c in zip(boxes, segmentation.components, strict=True) if c.line == line),
                max(b.bottom for b, c in zip(boxes, segmentation.components, strict=True) if c.line == line),
            )
            for line in lines
        ]
        row_spans, row_index = _with_empty_rows(inked)
        row_of_line = {line: row_index[n] for n, line in enumerate(lines)}
    column_spans = _column_spans(boxes, COLUMN_GAP * height)
    ruled_columns = False
    if column_lines:  # a ruled table's columns are the bands between its rulings
        column_bands = [int(np.searchsorted(column_lines, b.x + b.w / 2)) for b in boxes]
        ruled_spans, _ = _bands(
            column_lines,
            [(b.x, b.right, band) for b, band in zip(boxes, column_bands, strict=True)],
            mask.shape[1],
            height,
        )
        # Only when every column the ink shows lies between its own rulings; else (only the border ruled, a
        # ruling missed) the ink's own columns.
        bands_of_spans = [int(np.searchsorted(column_lines, (left + right) / 2)) for left, right in column_spans]
        if len(set(bands_of_spans)) == len(bands_of_spans):
            column_spans, ruled_columns = ruled_spans, True
    cells = len(row_spans) * len(column_spans)
    if cells > max_cells:
        raise ValueError(
            f"found {len(row_spans)} rows x {len(column_spans)} columns = {cells} cells, over the limit of "
            f"{max_cells} cells per table"
        )
    if cells < 2:
        raise ValueError(ONE_CELL)
    return TableSegmentation(
        segmentation, row_spans, column_spans, row_of_line, ruled_rows, ruled_columns, skew, straightening
    )


def _with_empty_rows(spans: list[tuple[float, float]]) -> tuple[list[tuple[float, float]], list[int]]:
    """An unruled table's rows with its empty rows put back: where the gap between two rows of ink is about a whole
    number of the usual row pitch, as many rows with no ink were written there. Needs three rows of ink to know
    the pitch. Returns every row's span and where each inked row went."""
    if len(spans) < 3:
        return spans, list(range(len(spans)))
    centres = [(top + bottom) / 2 for top, bottom in spans]
    pitch = float(np.median(np.diff(centres)))
    rows: list[tuple[float, float]] = [spans[0]]
    index = [0]
    for (top, bottom), before, centre in zip(spans[1:], centres[:-1], centres[1:], strict=True):
        missing = round((centre - before) / pitch) - 1 if centre - before >= EMPTY_ROW_GAP * pitch else 0
        half, step = (bottom - top) / 2, (centre - before) / (missing + 1)
        rows += [(before + k * step - half, before + k * step + half) for k in range(1, missing + 1)]
        index.append(len(rows))
        rows.append((top, bottom))
    return rows, index


def _skew_degrees(mask: np.ndarray) -> float:
    """The angle (degrees) at which the ink's rows are sharpest: the sum of squared row counts of the ink sheared
    by it is largest. Positive: lines fall to the right (row grows with column)."""
    ys, xs = np.nonzero(mask)
    if len(ys) > 200_000:
        pick = np.random.default_rng(0).choice(len(ys), 200_000, replace=False)
        ys, xs = ys[pick], xs[pick]
    ys, xs = ys.astype(np.float64), xs.astype(np.float64) - xs.mean()
    best, best_score = 0.0, -1.0
    for degrees in np.arange(-MAX_SKEW_DEGREES, MAX_SKEW_DEGREES + 1e-9, SKEW_STEP_DEGREES):
        sheared = np.rint(ys - xs * math.tan(math.radians(degrees))).astype(np.int64)
        counts = np.bincount(sheared - sheared.min())
        score = float(np.dot(counts, counts))
        if score > best_score * (1 + 1e-9) or (score >= best_score and abs(degrees) < abs(best)):
            best, best_score = float(degrees), score
    return round(best, 2)


def _straightened(ink: np.ndarray, degrees: float) -> tuple[np.ndarray, _Straightening]:
    """The ink turned so that lines falling by `degrees` become level, and how to map boxes back."""
    unturned = ink, _Straightening(np.eye(2), np.zeros(2), ink.shape)
    if abs(degrees) < STRAIGHTEN_OVER_DEGREES:
        return unturned
    angle = math.radians(degrees)
    cos, sin = math.cos(angle), math.sin(angle)
    matrix = np.array([[cos, sin], [-sin, cos]])  # output (row, col) -> input (row, col), about the centres
    h, w = ink.shape
    corners = np.array([[0, 0], [0, w], [h, 0], [h, w]], float) - [h / 2, w / 2]
    extent = np.abs(corners @ matrix).max(axis=0)  # matrix is orthogonal: its transpose maps input to output
    shape = (int(math.ceil(2 * extent[0])), int(math.ceil(2 * extent[1])))
    if shape[0] * shape[1] > STRAIGHTEN_GROWTH * h * w:  # a long strip turned: read as it is, never a huge copy
        return unturned
    offset = np.array([h / 2, w / 2]) - matrix @ np.array([shape[0] / 2, shape[1] / 2])
    turned = ndimage.affine_transform(ink, matrix, offset, output_shape=shape, order=1, cval=0.0)
    return turned.astype(np.float32), _Straightening(matrix, offset, ink.shape)


def _faint(ink: np.ndarray) -> np.ndarray:
    """Ink, faint ink included: a printed form's thin, pale rulings often stay under the threshold digits pass."""
    smooth = ndimage.gaussian_filter(ink, 1.0)
    return smooth > 0.25 * max(_otsu(smooth), 0.3 * float(smooth.max()))


def _rulings(mask: np.ndarray, faint: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Horizontal and vertical ruling lines, in `faint` (ink found with a low threshold): runs of ink far longer
    than a digit of `mask` (an opening by a line that long), allowing a pixel of wobble across the run."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), bool))
    rows, cols = np.nonzero(mask)
    extent_h, extent_w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    objects = ndimage.find_objects(labels)
    heights = np.array([s[0].stop - s[0].start for s in objects], float)
    widths = np.array([s[1].stop - s[1].start for s in objects], float)
    # digit-like marks: not a line (long and thin), not the grid (across the whole table both ways)
    shaped = (heights > 2) & (widths <= 4 * heights) & (heights <= 8 * widths)
    small = shaped & ((heights < 0.5 * extent_h) | (widths < 0.5 * extent_w))
    digit = float(np.median(heights[small])) if small.any() else float(min(extent_h, extent_w))
    lines = []
    for axis, extent in ((1, extent_w), (0, extent_h)):
        length = int(max(RULING_LENGTH * digit, RULING_SHARE * extent, 8))
        wobble = ndimage.maximum_filter1d(faint.astype(np.uint8), 3, axis=1 - axis)
        opened = ndimage.maximum_filter1d(ndimage.minimum_filter1d(wobble, length, axis=axis), length, axis=axis)
        lines.append(faint & (opened > 0))
    return lines[0], lines[1]


def _line_positions(profile: np.ndarray) -> list[float]:
    """Centres of the ruling lines in a profile of line pixels per row (or column): runs of rows that hold some."""
    on = profile > 0.5 * profile.max() if profile.max() > 0 else np.zeros_like(profile, bool)
    runs, count = ndimage.label(on)
    return [float(np.mean(np.flatnonzero(runs == k))) for k in range(1, count + 1)]


def _bands(
    lines: list[float], members: list[tuple[int, int, int]], size: int, height: float
) -> tuple[list[tuple[float, float]], dict[int, int]]:
    """The spans between ruling lines that are cells' rows (or columns): every band enclosed by two lines and at
    least half a digit high, and the open bands outside the first and last lines that hold ink. `members` are
    (start, end, band) of the ink; returns the spans and each band's index among them."""
    edges = [0.0, *lines, float(size)]
    holding = {band for _, _, band in members}
    spans: list[tuple[float, float]] = []
    index: dict[int, int] = {}
    for band, (start, end) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
        enclosed = 0 < band < len(edges) - 2
        if band in holding or (enclosed and end - start >= 0.5 * height):
            index[band] = len(spans)
            spans.append((start, end))
    return spans, index


def _column_spans(boxes: list[Box], gap: float) -> list[tuple[float, float]]:
    """An unruled table's columns: the x-spans of ink over all rows, joined where they are closer than `gap`."""
    spans: list[list[float]] = []
    for box in sorted(boxes, key=lambda b: b.x):
        if spans and box.x - spans[-1][1] < gap:
            spans[-1][1] = max(spans[-1][1], box.right)
        else:
            spans.append([float(box.x), float(box.right)])
    return [(left, right) for left, right in spans]


def _nearest_span(spans: list[tuple[float, float]], centre: float) -> int:
    distances = [
        0.0 if left <= centre <= right else min(abs(centre - left), abs(centre - right)) for left, right in spans
    ]
    return int(np.argmin(distances))
