"""Reading numbers: find each handwritten digit in an image, then say how they fit together. numpy and scipy only.

Two steps around one batched model call, so the model sees every candidate of an image at once:

1. `segment(gray)`: ink found on a denoised, binarized copy (uneven paper lighting removed first);
   connected components; broken strokes merged (a 5's hat, a 4 in two pieces); components grouped into
   lines; a component too wide for one digit gets split candidates (cut where its ink is thinnest);
   every candidate is prepared as MNIST's digits are (`fit_to_mnist_box`, as `Classify` does).
2. `Segmentation.assemble(probabilities)`: for each wide component, keep the split the classifier is
   most confident about (with the expected digit count, if the caller gave it, as a constraint); then
   digits in reading order, groups split at wide gaps, lines in order.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from server.pipeline.preprocess import fit_to_mnist_box

NO_DIGITS = "no digits found: no ink stands out from the background"
MIN_CONTRAST = 0.1  # ink at least this much darker (or lighter) than the paper, on a 0..1 scale
WIDE = 1.0  # a component wider than this many line heights may hold several digits
DIGIT_WIDTH = 1.0  # a typical digit's width, in line heights
GROUP_GAP = 0.55  # a gap wider than this many line heights starts a new group (a space in the text)
SPLIT_PRIOR = 1.0  # log-confidence cost per piece away from what the component's width suggests
DETECTOR_WEIGHT = 1.0  # how much the digit detector's say (does this look like one digit?) counts in a choice
CUT_COST = 0.0  # log-confidence cost of a cut through a typical column's worth of ink (a neck costs little)
MAX_PIECES = 4
ROW_OVERLAP = 0.15  # ink reaching less than this many digit heights into the row below does not join the rows
MARKS_PER_DIGIT = 4  # separate pieces of ink allowed per digit of the limit (broken strokes, dots)


@dataclass(frozen=True)
class Box:
    """x, y, width, height in the working image's pixels."""

    x: int
    y: int
    w: int
    h: int

    @property
    def right(self) -> int:
        return self.x + self.w

    @property
    def bottom(self) -> int:
        return self.y + self.h

    def scaled(self, factor: float) -> tuple[int, int, int, int]:
        """In the original image's pixels."""
        return (
            round(self.x * factor),
            round(self.y * factor),
            max(1, round(self.w * factor)),
            max(1, round(self.h * factor)),
        )


@dataclass
class Option:
    """One way to read a component: as `len(boxes)` digits, whose prepared images are rows `rows` of the batch."""

    boxes: list[Box]
    rows: list[int]
    cut_ink: float = 0.0  # ink the cuts go through, in a typical column's worth: a neck between two digits is thin


@dataclass
class Component:
    """A blob of ink in a line, and the ways to cut it into digits (option 0: one digit)."""

    box: Box
    line: int
    options: list[Option] = field(default_factory=list)
    natural: float = 1.0  # how many digits its upright width suggests


@dataclass(frozen=True)
class ReadDigit:
    box: tuple[int, int, int, int]  # x, y, width, height in the original image's pixels
    digit: int
    confidence: float
    alternatives: tuple[tuple[int, float], ...]  # the top 3 digits and their probabilities, best first
    line: int
    group: int


@dataclass(frozen=True)
class Reading:
    text: str  # digits; a space between groups, a newline between lines
    digits: tuple[ReadDigit, ...]
    confidence: float  # that every digit is right: the product of the digits' confidences
    images: np.ndarray | None = None  # (digits, 28, 28) uint8: each digit as the model saw it (the feedback loop's)


@dataclass
class Segmentation:
    """The candidates of one image: `images` go to the model in one batch, `assemble` reads its answers."""

    images: np.ndarray  # (N, 28, 28) uint8, MNIST-style
    components: list[Component]
    line_height: dict[int, float]
    scale: float  # original pixels per working pixel
    expected: int = 0
    split_prior: float = SPLIT_PRIOR
    cut_cost: float = CUT_COST
    cut_into: int = 0  # judge a cut component by its pieces' first `cut_into` classes only (0: all): into digits

    def assemble(self, probabilities: np.ndarray, digit_scores: np.ndarray | None = None) -> Reading:
        """The reading, from the model's (N, 10) probabilities for `images` (and the digit detector's scores, which
        help tell one wide digit from two touching ones, when the server has a detector)."""
        probabilities = np.asarray(probabilities, np.float64)
        digits: list[ReadDigit] = []
        rows: list[int] = []
        lines: list[list[str]] = []
        for line, pieces in self.pieces(probabilities, digit_scores).items():
            height = self.line_height[line]
            groups: list[str] = [""]
            for i, (box, row) in enumerate(pieces):
                if i and box.x - pieces[i - 1][0].right > GROUP_GAP * height:
                    groups.append("")
                p = probabilities[row]
                top = np.argsort(-p)[:3]
                digit = int(top[0])
                groups[-1] += str(digit)
                alternatives = tuple((int(d), float(p[d])) for d in top)
                rows.append(row)
                digits.append(
                    ReadDigit(box.scaled(self.scale), digit, float(p[digit]), alternatives, len(lines), len(groups) - 1)
                )
            lines.append(groups)
        confidence = float(np.prod([d.confidence for d in digits])) if digits else 0.0
        text = "\n".join(" ".join(groups) for groups in lines)
        return Reading(text, tuple(digits), confidence, self.images[rows] if rows else None)

    def candidate_heights(self) -> np.ndarray:
        """Each candidate's (row of `images`) height over its line's height: an expression's operators are short."""
        heights = np.ones(len(self.images))
        for c in self.components:
            for option in c.options:
                for box, row in zip(option.boxes, option.rows, strict=True):
                    heights[row] = box.h / max(self.line_height[c.line], 1.0)
        return heights

    def pieces(
        self, probabilities: np.ndarray, digit_scores: np.ndarray | None = None
    ) -> dict[int, list[tuple[Box, int]]]:
        """Per line, top to bottom, the kept candidates left to right: (box, row of `images`). `probabilities` are
        (N, K) over any alphabet (digits; an expression's symbols): a split is judged by its pieces' top ones."""
        choice = self._choose(np.asarray(probabilities, np.float64), digit_scores)
        lines: dict[int, list[tuple[Box, int]]] = {}
        for line in sorted({c.line for c in self.components}):
            pieces = [
                (box, row)
                for c, k in zip(self.components, choice, strict=True)
                if c.line == line
                for box, row in zip(c.options[k].boxes, c.options[k].rows, strict=True)
            ]
            lines[line] = sorted(pieces, key=lambda piece: piece[0].x + piece[0].w / 2)
        return lines

    def _choose(self, probabilities: np.ndarray, digit_scores: np.ndarray | None) -> list[int]:
        """Per component, the option to keep: the most confident split, nudged by the component's width; with an
        expected count, the best choice that reaches it (dynamic programming over the components)."""
        scores = []
        for c in self.components:
            natural = c.natural
            row = []
            for option in c.options:
                classes = probabilities[option.rows]
                if self.cut_into and len(option.rows) > 1:
                    classes = classes[:, : self.cut_into]
                confidence = classes.max(axis=1)
                fit = float(np.log(np.clip(confidence, 1e-6, 1.0)).mean())
                if digit_scores is not None:
                    scores_ = np.nan_to_num(np.asarray(digit_scores, np.float64)[option.rows], nan=1.0)
                    fit += DETECTOR_WEIGHT * float(np.log(np.clip(scores_, 1e-6, 1.0)).mean())
                prior = self.split_prior * abs(math.log(len(option.boxes) / natural))
                row.append(fit - prior - self.cut_cost * option.cut_ink)
            scores.append(row)
        free = [int(np.argmax(row)) for row in scores]
        if not self.expected:
            return free
        # best[n] = (total score, choices) reaching n digits with the components seen so far
        best: dict[int, tuple[float, list[int]]] = {0: (0.0, [])}
        for c, row in zip(self.components, scores, strict=True):
            step: dict[int, tuple[float, list[int]]] = {}
            for count, (total, picks) in best.items():
                for k, score in enumerate(row):
                    n = count + len(c.options[k].boxes)
                    if n > self.expected + MAX_PIECES * len(self.components):
                        continue
                    candidate = (total + score, [*picks, k])
                    if n not in step or candidate[0] > step[n][0]:
                        step[n] = candidate
            best = step
        return best[self.expected][1] if self.expected in best else free


def segment(gray: np.ndarray, scale: float = 1.0, expected: int = 0, max_digits: int = 64) -> Segmentation:
    """Candidates for every digit in `gray` (float [0, 1], any size, dark ink on light paper or the reverse).

    ValueError with NO_DIGITS when there is no ink, or naming the count when there are more candidate digits than
    `max_digits`."""
    ink = _ink(gray)
    return segment_ink(ink, _binarize(ink), scale, expected, max_digits)


def segment_ink(
    ink: np.ndarray,
    mask: np.ndarray,
    scale: float = 1.0,
    expected: int = 0,
    max_digits: int = 64,
    *,
    symbols: bool = False,
    lines_of: Callable[[list[Box]], list[int]] | None = None,
    one_height: bool = False,
    max_images: bool = False,
) -> Segmentation:
    """`segment` on ink already found (`ink`, and `mask`: which pixels are ink). Tables come here with their ruling
    lines taken out. `symbols`: an expression's symbols, not only digits: small marks are kept (the dots of a ÷)
    and marks above one another are one symbol (=, ÷). `lines_of(boxes)`: each candidate's line (row), when the
    caller knows the rows better (a ruled table); by default, lines from the boxes' vertical spans. `one_height`: every
    line is taken to be written at the page's typical height (a table's rows: a row of short digits is not small
    writing, and its wide digits are not pairs). `max_images`: `max_digits` bounds the candidate images too (every way
    of cutting a wide blob counted), refused as soon as they pass it: a page of wide blobs cannot make the model
    read thousands."""
    what = "symbols" if symbols else "digits"
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if count == 0:
        raise ValueError(NO_DIGITS)
    boxes = [
        Box(s[1].start, s[0].start, s[1].stop - s[1].start, s[0].stop - s[0].start)
        for s in ndimage.find_objects(labels)
    ]
    areas = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    keep, alone = (_not_dust(areas),) * 2 if symbols else _not_specks(boxes, areas)
    marks = [i for i in range(count) if keep[i]]
    typical = 0.0 if symbols else _typical_height(boxes, areas)
    if len(marks) > MARKS_PER_DIGIT * max_digits:  # noise, a photo of a page: refused before any costly step
        raise ValueError(
            f"found {len(marks)} separate marks, over the limit of {MARKS_PER_DIGIT * max_digits} "
            f"({MARKS_PER_DIGIT} per {what[:-1]}, {max_digits} {what} per image)"
        )
    groups = _merge_broken_strokes(marks, boxes, not symbols, typical)  # a ÷'s dot beside a 1 is not its hat
    groups = [group for group in groups if any(alone[i] for i in group)]  # a hat that found no digit goes
    if symbols:
        groups = _stacked_marks(groups, boxes, areas)
    if not groups:
        raise ValueError(NO_DIGITS)
    if len(groups) > max_digits:  # before any candidate is prepared
        raise ValueError(f"found {len(groups)} candidate {what}, over the limit of {max_digits} per image")
    merged = [(_union([boxes[i] for i in members]), [i + 1 for i in members]) for members in groups]
    lines = (lines_of or _lines)([box for box, _ in merged])
    # An expression's operators are shorter than its digits: its line height is that of its taller symbols.
    height_of = (lambda heights: float(np.percentile(heights, 75))) if symbols else np.median
    line_height = {
        line: float(height_of([merged[i][0].h for i, ln in enumerate(lines) if one_height or ln == line]))
        for line in set(lines)
    }
    images: list[np.ndarray] = []
    components: list[Component] = []
    upright = []
    for box, members in merged:
        region = (slice(box.y, box.bottom), slice(box.x, box.right))
        upright.append(_deskewed(np.where(np.isin(labels[region], members), ink[region], 0.0)))
    short = expected - len(merged)
    for (box, _), line, (straight, offsets) in zip(merged, lines, upright, strict=True):
        component = Component(box, line)
        height = line_height[line]
        width = straight.shape[1]
        component.natural = max(1.0, width / (DIGIT_WIDTH * height))
        most = 1 if width <= WIDE * height else min(MAX_PIECES, max(2, round(component.natural) + 1))
        if short > 0 and width >= 0.5 * height:  # the caller expects more digits than there are blobs: try cuts
            most = max(most, min(MAX_PIECES, 1 + short))
        for pieces in range(1, most + 1):
            for cuts, cut_ink in _cut_options(straight, pieces):
                option = Option([], [], cut_ink)
                for left, right in zip([0, *cuts], [*cuts, width], strict=True):
                    ys, xs = np.nonzero(straight[:, left:right] > 0)
                    if not len(ys):
                        break
                    xs = xs + left - offsets[ys]  # back to the component's own (slanted) columns
                    top, left_x = int(ys.min()), int(xs.min())
                    height_px, width_px = int(ys.max()) - top + 1, int(xs.max()) - left_x + 1
                    option.boxes.append(Box(box.x + left_x, box.y + top, width_px, height_px))
                    option.rows.append(len(images))
                    crop = np.zeros((height_px, width_px), np.float32)  # the piece's own pixels, as written
                    crop[ys - top, xs - left_x] = straight[ys, xs + offsets[ys]]
                    images.append(_prepared(crop))
                    if max_images and len(images) > max_digits:
                        raise ValueError(
                            f"found over {max_digits} candidate {what} (each way of cutting a wide mark counted), "
                            f"over the limit of {max_digits} per image"
                        )
                else:
                    component.options.append(option)
        if component.options:  # a mark with no ink left in it reads as nothing
            components.append(component)
    if not components:
        raise ValueError(NO_DIGITS)
    return Segmentation(np.stack(images), components, line_height, scale, expected)


def _deskewed(ink: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A component's ink with its slant taken out (each row shifted so its strokes stand upright, the shear from
    the ink's second moments), and each row's shift: upright column c of row y is column c - shift[y] of `ink`.
    Widths are judged and cuts made upright: a slanted pair of digits is cut between them, not across both."""
    ys, xs = np.nonzero(ink > 0)
    if not len(ys):  # a mark whose ink was all taken out (a ruling's fringe): nothing to straighten
        return ink, np.zeros(ink.shape[0], np.int64)
    weights = ink[ys, xs]
    cy, cx = np.average(ys, weights=weights), np.average(xs, weights=weights)
    spread = float(np.average((ys - cy) ** 2, weights=weights))
    slant = float(np.clip(np.average((xs - cx) * (ys - cy), weights=weights) / max(spread, 1e-6), -0.6, 0.6))
    shift = np.rint(-slant * (np.arange(ink.shape[0]) - cy)).astype(np.int64)
    shift -= shift.min()
    upright = np.zeros((ink.shape[0], ink.shape[1] + int(shift.max())), np.float32)
    for y in range(ink.shape[0]):
        upright[y, shift[y] : shift[y] + ink.shape[1]] = ink[y]
    cols = np.flatnonzero(upright.max(axis=0) > 0)
    return upright[:, cols[0] : cols[-1] + 1], shift - cols[0]


def _ink(gray: np.ndarray) -> np.ndarray:
    """Ink bright on zero, whatever the polarity, with uneven lighting (a photo's shading) taken out."""
    gray = np.asarray(gray, np.float32)
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    # The border is paper; the ink is on the side of it that reaches furthest (of a lightly blurred copy, so lone
    # noisy pixels do not count): darker for grey paper in a dim photo too, however little ink there is.
    paper = float(np.median(border))
    smooth = ndimage.uniform_filter(gray, 3) if min(gray.shape) >= 3 else gray
    ink = 1.0 - gray if paper - float(smooth.min()) > float(smooth.max()) - paper else gray
    # The background is what a grey opening wider than any stroke leaves: strokes vanish, shading stays.
    size = max(15, min(ink.shape) // 6)
    background = ndimage.grey_opening(ndimage.uniform_filter(ink, 3), size=(size, size))
    return np.clip(ink - background, 0.0, 1.0)


def _binarize(ink: np.ndarray, reach: float = 1.0) -> np.ndarray:
    """Ink pixels, by hysteresis on a lightly blurred copy: regions over a low threshold that reach a high one
    (Otsu's, never under a third of the peak). Thin, faint parts of a stroke stay joined to the rest of their
    digit; faint specks and paper texture that never reach the high threshold are dropped. `reach` < 1 lowers the
    high threshold by that factor: small marks that matter (a ÷'s dots, blurred away from their peak) stay."""
    smooth = ndimage.gaussian_filter(ink, 1.0)
    peak = float(np.percentile(smooth, 99.9)) if smooth.size > 1000 else float(smooth.max())
    if peak < MIN_CONTRAST:
        raise ValueError(NO_DIGITS)
    high = reach * max(_otsu(smooth), 0.3 * peak)
    weak, count = ndimage.label(smooth > 0.4 * high, structure=np.ones((3, 3), bool))
    strong = np.zeros(count + 1, bool)
    strong[np.unique(weak[smooth > high])] = True
    strong[0] = False
    return strong[weak]


def _otsu(values: np.ndarray) -> float:
    counts, edges = np.histogram(values, bins=128, range=(0.0, float(values.max()) or 1.0))
    centres = (edges[:-1] + edges[1:]) / 2
    weight = np.cumsum(counts)
    mean = np.cumsum(counts * centres)
    total, grand = weight[-1], mean[-1]
    between = (grand * weight - mean * total) ** 2 / np.maximum(weight * (total - weight), 1e-12)
    return float(centres[int(np.argmax(between[:-1]))])


def _not_specks(boxes: list[Box], areas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Components big enough to be part of a digit, and which of them could be a digit alone: specks of noise and
    dust are dropped; a piece long only across (a 5's flat hat drawn apart) or short (a dot, a decimal point) may
    join a digit, never stand alone."""
    largest = float(areas.max())
    tall = np.array([b.h for b in boxes], np.float64)
    wide = np.array([b.w for b in boxes], np.float64)
    typical = _typical_height(boxes, areas)
    big_enough = areas >= max(6.0, 0.03 * largest)
    piece = big_enough & ((tall >= 0.25 * typical) | (wide >= 0.25 * typical) | (areas >= 0.15 * largest))
    alone = big_enough & ((tall >= 0.4 * typical) | (areas >= 0.15 * largest))  # a dot is no digit
    return piece, alone


def _typical_height(boxes: list[Box], areas: np.ndarray) -> float:
    """A digit's height on this page: the median height of the components with a fifth of the most ink or more."""
    largest = float(areas.max())
    tall = np.array([b.h for b in boxes], np.float64)
    big = areas >= 0.2 * largest
    return float(np.median(tall[big])) if big.any() else float(tall.max())


def _not_dust(areas: np.ndarray) -> np.ndarray:
    """Marks worth reading in an expression: only dust is dropped (a ÷'s dots are small and short)."""
    return areas >= max(4.0, 0.004 * float(areas.max()))


def _stacked_marks(pieces: list[list[int]], boxes: list[Box], areas: np.ndarray) -> list[list[int]]:
    """An expression's symbols from its digits' pieces: pieces that share most of their columns are one symbol (the
    bars of =, the dots and bar of ÷), since an expression is one line. Then lone dots go."""
    spans = [_union([boxes[i] for i in piece]) for piece in pieces]
    typical = float(np.percentile([span.h for span in spans], 75)) if spans else 0.0
    groups: list[list[int]] = []
    joined: list[Box] = []
    for n in sorted(range(len(pieces)), key=lambda n: spans[n].x):
        box = spans[n]
        for g, span in enumerate(joined):
            overlap = min(span.right, box.right) - max(span.x, box.x)
            centres = abs((span.x + span.right) - (box.x + box.right)) / 2
            # most columns shared, or two small marks nearly above one another (a slanted colon's dots)
            small = max(span.h, box.h) < 0.5 * typical
            stacked = overlap >= 0.5 * min(span.w, box.w) or (small and centres <= 0.25 * typical)
            if stacked and _union([span, box]).h <= 1.3 * typical:  # within one line: not a digit over another
                groups[g] += pieces[n]
                joined[g] = _union([span, box])
                break
        else:
            groups.append(list(pieces[n]))
            joined.append(box)
    # A lone dot is no symbol (÷ has its bar, : its second dot): a speck, or a stray mark of a digit, it goes.
    return [group for group, span in zip(groups, joined, strict=True) if max(span.w, span.h) >= 0.25 * typical]


def _merge_broken_strokes(
    indices: list[int], boxes: list[Box], adjoining: bool = True, typical: float = 0.0
) -> list[list[int]]:
    """Components that are one digit drawn in pieces: mostly on top of each other, and close in height; or, given
    the `typical` digit height, two pieces each too short for a digit that together make one digit's size.

    Pairs are merged until none qualifies; a group that grew is checked again against the others. Groups are kept
    in order of their left edge and a group is held only against those that start within reach of its right edge,
    so a page of a few thousand marks takes milliseconds, not the seconds of every pair."""
    # no rule joins pieces further apart than this across (adjoining: 8% of the taller; halves: 15% of typical)
    reach = 0.08 * max((boxes[i].h for i in indices), default=0) + 0.15 * typical + 1
    order = sorted(indices, key=lambda i: boxes[i].x)
    groups = [[i] for i in order]
    spans = [boxes[i] for i in order]
    changed = True
    while changed:
        changed = False
        a = 0
        while a < len(groups):
            b = a + 1
            while b < len(groups) and spans[b].x <= spans[a].right + reach:
                if _pieces_of_one_digit(spans[a], spans[b], adjoining) or _halves(spans[a], spans[b], typical):
                    groups[a] += groups.pop(b)
                    spans[a] = _union([spans[a], spans.pop(b)])  # its left edge stays: the order holds
                    changed = True
                    b = a + 1  # the group grew: check it against the others again
                    continue
                b += 1
            a += 1
    return groups


def _halves(box_a: Box, box_b: Box, typical: float) -> bool:
    """Two pieces too short for a digit each (a 5's hat and its belly drawn apart), touching or nearly, that
    together are one digit's size."""
    if not typical or max(box_a.h, box_b.h) >= 0.65 * typical:
        return False
    joined = _union([box_a, box_b])
    beside = max(box_a.x, box_b.x) - min(box_a.right, box_b.right)
    above = max(box_a.y, box_b.y) - min(box_a.bottom, box_b.bottom)
    close = beside <= 0.15 * typical and above <= 0.3 * typical
    return close and joined.w <= 1.1 * typical and joined.h <= 1.3 * typical


def _pieces_of_one_digit(box_a: Box, box_b: Box, adjoining: bool = True) -> bool:
    overlap = min(box_a.right, box_b.right) - max(box_a.x, box_b.x)
    gap = max(box_a.y, box_b.y) - min(box_a.bottom, box_b.bottom)
    tallest = max(box_a.h, box_b.h)
    joined = _union([box_a, box_b])
    small = min(box_a.h, box_b.h) < 0.5 * tallest  # a 5's hat, a 4's or 7's bar drawn apart
    beside = max(box_a.x, box_b.x) - min(box_a.right, box_b.right)  # horizontal gap (negative: overlap)
    stacked = (
        overlap >= 0.3 * min(box_a.w, box_b.w)
        and gap <= 0.35 * tallest
        and joined.h <= 1.5 * tallest
        and min(box_a.h, box_b.h) < 0.75 * tallest  # a piece, not a digit of its own above another
    )
    beside_it = adjoining and small and beside <= 0.08 * tallest and gap < 0 and joined.h <= 1.5 * tallest
    return stacked or beside_it


def _union(boxes: list[Box]) -> Box:
    x, y = min(b.x for b in boxes), min(b.y for b in boxes)
    return Box(x, y, max(b.right for b in boxes) - x, max(b.bottom for b in boxes) - y)


def rows_of_ink(boxes: list[Box]) -> list[int]:
    """Rows of written marks (an unruled table's, an expression's line): bands where digit-sized marks lie one above
    the other, apart where none crosses between them (rows are written apart; a tall digit may reach a little into
    the next band), numbered top to bottom. Short marks (a decimal point, a minus written high) join the nearest band
    and start none. A band taller than two digits is rows touching: split into lines by their centres (`_lines`)."""
    typical = float(np.median([b.h for b in boxes]))
    small = [i for i, b in enumerate(boxes) if b.h < 0.5 * typical]  # a decimal point, a dash: they start no row
    order = sorted((i for i, b in enumerate(boxes) if b.h >= 0.5 * typical), key=lambda i: boxes[i].y)
    bands: list[list[int]] = []
    bottom = -math.inf
    for i in order:
        if bands and boxes[i].y < bottom - ROW_OVERLAP * typical:
            bands[-1].append(i)
            bottom = max(bottom, boxes[i].bottom)
        else:
            bands.append([i])
            bottom = boxes[i].bottom
    for i in small:
        centre = boxes[i].y + boxes[i].h / 2
        spans = [(min(boxes[k].y for k in band), max(boxes[k].bottom for k in band)) for band in bands]
        nearest = min(range(len(bands)), key=lambda n: max(spans[n][0] - centre, centre - spans[n][1], 0.0))
        bands[nearest].append(i)
    rows = [0] * len(boxes)
    row = 0
    for band in bands:
        top, low = min(boxes[i].y for i in band), max(boxes[i].bottom for i in band)
        lines = _lines([boxes[i] for i in band]) if low - top > 2 * typical else [0] * len(band)
        for i, line in zip(band, lines, strict=True):
            rows[i] = row + line
        row += max(lines) + 1
    return rows


def _lines(boxes: list[Box]) -> list[int]:
    """The line of each box, lines numbered top to bottom: a box joins the line whose span holds its centre."""
    order = sorted(range(len(boxes)), key=lambda i: boxes[i].y + boxes[i].h / 2)
    spans: list[list[float]] = []  # top, bottom, members' heights summed, count
    line_of = [0] * len(boxes)
    for i in order:
        box = boxes[i]
        centre = box.y + box.h / 2
        for number, span in enumerate(spans):
            height = span[2] / span[3]
            if span[0] - 0.15 * height <= centre <= span[1] + 0.15 * height:
                span[0], span[1] = min(span[0], box.y), max(span[1], box.bottom)
                span[2] += box.h
                span[3] += 1
                line_of[i] = number
                break
        else:
            line_of[i] = len(spans)
            spans.append([float(box.y), float(box.bottom), float(box.h), 1.0])
    ranking = sorted(range(len(spans)), key=lambda n: spans[n][0])
    renumber = {old: new for new, old in enumerate(ranking)}
    return [renumber[n] for n in line_of]


def _cut_options(ink: np.ndarray, pieces: int) -> list[tuple[list[int], float]]:
    """Column cuts that split a component into `pieces`, where its ink is thinnest near each even share, and how
    much ink they cut through (summed over the cuts, in units of the component's median column)."""
    width = ink.shape[1]
    if pieces == 1:
        return [([], 0.0)]
    profile = ndimage.uniform_filter1d((ink > 0).sum(axis=0).astype(np.float64), 3)
    typical = max(float(np.median(profile[profile > 0])) if (profile > 0).any() else 1.0, 1.0)
    options: list[tuple[list[int], float]] = []
    for spread in (0.18, 0.3):  # two search widths around the even cut: near it, and wherever the ink is thinnest
        cuts: list[int] = []
        for k in range(1, pieces):
            centre = width * k / pieces
            low = max(int(centre - spread * width / pieces), (cuts[-1] + 2) if cuts else 2)
            high = min(int(centre + spread * width / pieces) + 1, width - 2)
            if high <= low:
                break
            cuts.append(low + int(np.argmin(profile[low:high])))
        if len(cuts) == pieces - 1 and cuts not in [c for c, _ in options]:
            options.append((cuts, float(sum(profile[c] for c in cuts)) / typical))
    return options


def _prepared(crop: np.ndarray) -> np.ndarray:
    """One candidate's ink (its own pixels only) as the model's 28x28 uint8 input, as Classify prepares digits."""
    crop = crop / max(float(np.percentile(crop[crop > 0], 95)) if (crop > 0).any() else 1.0, 1e-6)
    return np.clip(np.rint(fit_to_mnist_box(np.clip(crop, 0.0, 1.0))), 0, 255).astype(np.uint8)
