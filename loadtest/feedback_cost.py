"""What the feedback loop adds to each answer on the serving path: `python -m loadtest.feedback_cost`.

Every Classify answer is remembered by request id (server/feedback/answers.py, on the event loop) and tallied for drift
(server/feedback/quality.py, on the batch runner). Both are timed here in a tight loop over single-image answers, the
memory filled to its default bound, against one call's budget (the echo server's p50 at one client is about 0.5-0.8
ms on the 2-core machine: docs/performance.md).
"""

from __future__ import annotations

import argparse
import math
import time
import uuid

import numpy as np

from server.feedback.answers import AnswerMemory
from server.feedback.quality import AnswerTally
from server.pipeline.predictions import Predictions


def one_answer(rng: np.random.Generator) -> Predictions:
    probabilities = rng.dirichlet(np.ones(10)).astype(np.float32)[None]
    return Predictions(
        probabilities, probabilities.argmax(1), probabilities.max(1), np.full(1, math.nan, np.float32),
        np.ones(1, bool), "1", "googlenet-fast", rng.integers(0, 256, (1, 1, 28, 28), dtype=np.uint8),
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--answers", type=int, default=50_000, help="single-image answers timed")
    parser.add_argument("--memory", type=int, default=20_000, help="answers remembered (the server's default)")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    answers = [one_answer(rng) for _ in range(args.answers)]
    ids = [uuid.uuid4().hex for _ in answers]
    memory, tally = AnswerMemory(max_answers=args.memory), AnswerTally()
    started = time.perf_counter()
    for answer, request_id in zip(answers, ids, strict=True):
        memory.remember(answer, [request_id])
    remembered = time.perf_counter() - started
    started = time.perf_counter()
    for answer in answers:
        tally.add(answer.digits, answer.confidences)
    tallied = time.perf_counter() - started
    print(
        f"remember {remembered / len(answers) * 1e6:.2f} us per answer, drift tally {tallied / len(answers) * 1e6:.2f} "
        f"us per answer ({len(answers):,} single-image answers, {len(memory):,} remembered at the end)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
