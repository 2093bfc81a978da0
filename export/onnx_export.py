"""mnist-export: turn a training checkpoint into a verified, self-describing ONNX model.

Steps: load (weights_only) -> export with a dynamic batch axis -> the digit detector attached as a
third output, `digit_score` (export/digit_score_graph.py) -> onnx.checker -> parity against
PyTorch on real test images -> the score against the numpy detector -> test accuracy through ONNX
Runtime -> metadata_props (the score's threshold and the detector's description included) -> save.
With --fp16, the fp32 file is then converted to an fp16 variant (`name.fp16.onnx`: fp16 weights
and arithmetic, float32 input and output, softmax and the digit score kept in fp32), checked
against the fp32 file through ONNX Runtime and measured again. --add-digit-score puts the score
into existing model files without retraining, checking that their classifier answers stay
bit-identical. A checkpoint trained with --non-digits has a score of its own, its eleventh output: exported as
`digit_score` (checked against PyTorch) with a threshold from digits it never trained on, no detector attached.
A model that fails a check is not written.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from proto.contract import (
    BATCH_AXIS,
    CLASS_LABELS,
    DIGIT_SCORE,
    INPUT_NAME,
    INPUT_SHAPE,
    LOGITS,
    MNIST_NORMALIZATION,
    OUTPUT_NAMES,
    PROBABILITIES,
    SCORED_OUTPUT_NAMES,
    ModelMetadata,
    input_layout,
    output_layout,
    read_metadata,
    variant_path,
)
from server.config import DIGIT_DETECTOR
from server.pipeline.digit_detector import DigitDetector, DigitDetectorError
from training.data import sha256_file

OPSET = 18
FP32_LOGIT_TOLERANCE = 1e-4
# fp16 against fp32, both through ONNX Runtime. Measured on the bundled googlenet-fast (10,000 test
# images, CPU provider): max |Δlogit| 0.0037, max |Δprobability| 0.0011, no prediction changed.
# Allowed: ~10x that (fp16 keeps ~3 significant digits of logits around 10-20), and at most 0.1% of
# predictions and 0.1 points of test accuracy may move (images near a tie can flip either way).
FP16_LOGIT_TOLERANCE = 0.05
FP16_PROBABILITY_TOLERANCE = 0.01
FP16_MAX_CHANGED_PREDICTIONS = 0.001
FP16_MAX_ACCURACY_DROP = 0.001
# The in-graph digit score against the numpy detector (server/pipeline/digit_detector.py) on the same images and the
# model's
# own probabilities. Both compute in float32 and several features are differences of large sums (the energy outside
# a subspace can be ~1 of a |x|^2 of ~220), so the two round differently, each about as far from a float64
# computation as from the other. Measured on the bundled model: max |Δscore| 2.4e-5 on the 10,000 MNIST test digits,
# 2.5e-5 on synthetic non-digits, 1.0e-4 on blurred test digits (mnist-eval's gaussian_blur); x2 for other CPUs.
SCORE_TOLERANCE = 2e-4
SCORE_CHECK_NON_DIGITS = 40  # per kind of training.fit_digit_detector.quick_non_digits (six kinds)
SPLIT_KEYS = ("seed", "validation_size", "train_limit")  # of a training config: which digits it never trained on
OWN_CLASS = "in-model class"  # metadata digit_detector["kind"] of a score that is the model's own eleventh output
# Such a score against PyTorch (fp32 both) and its fp16 variant against fp32, in log-odds. Measured on the first such
# model: 5.1e-4 against PyTorch (ONNX Runtime's logistic function, not the logits, which agree to ~1e-5), 7.5e-3 fp16
# against fp32 (fp16 logits are ~0.006 off); about 4x and 7x that allowed.
OWN_CLASS_LOG_ODDS_TOLERANCE = 2e-3
FP16_LOG_ODDS_TOLERANCE = 0.05


class ExportError(RuntimeError):
    """A check failed; the message says which and by how much."""


@dataclass
class ParityResult:
    images: int
    max_abs_logit_diff: float
    argmax_mismatches: int
    tolerance: float
    max_abs_probability_diff: float = 0.0
    allowed_mismatches: int = 0

    @property
    def ok(self) -> bool:
        return self.max_abs_logit_diff <= self.tolerance and self.argmax_mismatches <= self.allowed_mismatches


@dataclass
class ScoreCheck:
    """The in-graph digit score against the numpy detector on real test digits and synthetic non-digits."""

    digits: int
    non_digits: int
    max_abs_score_diff: float
    tolerance: float
    threshold: float
    decisions_changed: int  # images whose is_digit differs from the numpy detector's
    decisions_changed_off_threshold: int  # ... where the numpy score is more than `tolerance` from the threshold
    digits_passed: float  # share of the test digits with is_digit true (in-graph score)
    non_digits_caught: float  # share of the non-digits with is_digit false
    reference: str = "the numpy detector"  # what the score was checked against
    in_log_odds: bool = False  # max_abs_score_diff and tolerance in log-odds, not in score

    @property
    def ok(self) -> bool:
        return self.max_abs_score_diff <= self.tolerance and self.decisions_changed_off_threshold == 0


def load_checkpoint_model(path: Path):  # -> torch.nn.Module, in eval mode
    """Load `model.pt` (or a resumable `checkpoint.pt`) written by mnist-train."""
    import torch

    from training.model import build_model

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ExportError(f"{path}: checkpoint not found") from None
    except Exception as exc:  # unpickling refuses anything but tensors and plain containers
        raise ExportError(f"{path}: not a loadable mnist-train checkpoint ({exc})") from None
    preset = state.get("preset") or state.get("config", {}).get("preset")
    if preset is None or "model" not in state:
        raise ExportError(f"{path}: not an mnist-train checkpoint (no 'model' weights or preset)")
    trained_on_non_digits = bool(state.get("config", {}).get("non_digits"))  # checkpoint.pt of the first runs
    model = build_model(preset, not_a_digit_class=bool(state.get("not_a_digit_class", trained_on_non_digits)))
    model.load_state_dict(state["model"])
    return model.eval(), preset, state.get("test_accuracy")


def checkpoint_config(path: Path) -> dict:
    """The training config a checkpoint carries (model.pt since the eleventh class; checkpoint.pt always)."""
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    config = state.get("config")
    if not isinstance(config, dict):
        raise ExportError(f"{path}: carries no training config (re-save it with mnist-train of this version)")
    return config


def normalized_test_images(limit: int, data_dir: str | None) -> tuple[np.ndarray, np.ndarray]:
    """The first `limit` MNIST test images as the model's normalized float32 NCHW input, and labels."""
    from training.data import load_split

    test = load_split("test", data_dir)
    n = min(limit, len(test)) if limit else len(test)
    x = MNIST_NORMALIZATION.apply(test.images[:n])
    return x[:, None, :, :], test.labels[:n].astype(np.int64)


def ort_session(path: Path, provider: str = "cpu"):
    """A session on the CPU (what the checks are defined on), or on CUDA to measure what a GPU serves."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ExportError("onnxruntime is not installed: pip install -e '.[serve]' (or '.[serve-cpu]')") from None
    if provider == "cuda":
        from server.engine.backends.onnxruntime_backend import preload_cuda_libraries

        preload_cuda_libraries(ort)  # the server's loader: also finds CUDA wheels unpacked apart from onnxruntime
        session = ort.InferenceSession(str(path), providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
        if session.get_providers()[0] != "CUDAExecutionProvider":
            raise ExportError(f"--provider cuda asked for, but ONNX Runtime could not start CUDA for {path}")
        return session
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run_batched(session, x: np.ndarray, batch_size: int = 500, output: str = LOGITS) -> np.ndarray:
    return np.concatenate(
        [session.run([output], {INPUT_NAME: x[i : i + batch_size]})[0] for i in range(0, len(x), batch_size)]
    )


def check_parity(model, session, x: np.ndarray, tolerance: float) -> ParityResult:
    """Compare logits of PyTorch (fp32, eval) and ONNX Runtime on the same images, at two batch sizes."""
    import torch

    with torch.no_grad():
        reference = model(torch.from_numpy(x)).numpy()[:, : len(CLASS_LABELS)]  # a "not a digit" class is not served
    single = np.concatenate([session.run([LOGITS], {INPUT_NAME: x[i : i + 1]})[0] for i in range(min(8, len(x)))])
    batched = run_batched(session, x, batch_size=256)
    diff = max(float(np.abs(batched - reference).max()), float(np.abs(single - reference[: len(single)]).max()))
    mismatches = int((batched.argmax(1) != reference.argmax(1)).sum())
    return ParityResult(len(x), diff, mismatches, tolerance)


def load_detector(path: Path) -> DigitDetector:
    try:
        return DigitDetector.load(path)
    except DigitDetectorError as exc:
        raise ExportError(str(exc)) from None


def detector_description(detector: DigitDetector, path: Path) -> dict:
    """What the model's metadata says about its digit score: the detector's own description, its file by name and
    SHA-256 (so a later conversion can tell whether it holds the same detector)."""
    return {**detector.describe(), "source": Path(path).name, "detector_sha256": sha256_file(Path(path))}


def check_digit_score(session, detector: DigitDetector, digits: np.ndarray) -> ScoreCheck:
    """Run `digits` and a quick set of non-digits through the model (batches of 256, and a few alone) and compare
    its digit_score with the numpy detector's score of the same inputs and the model's own probabilities."""
    return compare_scores(session, detector.score, detector.threshold, digits, "the numpy detector")


def compare_scores(
    session,
    reference_score: Callable[[np.ndarray, np.ndarray], np.ndarray],
    threshold: float,
    digits: np.ndarray,
    reference: str,
    tolerance: float = SCORE_TOLERANCE,
    in_log_odds: bool = False,
) -> ScoreCheck:
    """The model's digit_score of `digits` and a quick set of non-digits (batches of 256, and a few alone) against
    `reference_score(inputs, the model's probabilities)`, and the is_digit decisions either makes at `threshold`.

    `in_log_odds`: differences (and the tolerance, and the margin around the threshold where a changed decision is
    excused) are taken in log-odds: a threshold near 0 (an own class's) leaves no room for an absolute tolerance."""
    from training.fit_digit_detector import quick_non_digits

    non_digits = np.concatenate(list(quick_non_digits(SCORE_CHECK_NON_DIGITS).values()))
    x = np.concatenate([digits, non_digits]).astype(np.float32)
    runs = [session.run([PROBABILITIES, DIGIT_SCORE], {INPUT_NAME: x[i : i + 256]}) for i in range(0, len(x), 256)]
    probabilities = np.concatenate([run[0] for run in runs])
    scores = np.concatenate([run[1] for run in runs])
    alone = [session.run([PROBABILITIES, DIGIT_SCORE], {INPUT_NAME: x[i : i + 1]}) for i in (0, len(digits))]
    expected = reference_score(x, probabilities)
    expected_alone = [reference_score(x[i : i + 1], run[0]) for i, run in zip((0, len(digits)), alone, strict=True)]
    scale = _log_odds if in_log_odds else np.asarray
    diff = max(
        float(np.abs(scale(scores) - scale(expected)).max()),
        *(float(np.abs(scale(run[1]) - scale(ref)).max()) for run, ref in zip(alone, expected_alone, strict=True)),
    )
    changed = (scores >= threshold) != (expected >= threshold)
    off_threshold = changed & (np.abs(scale(expected) - scale(np.float64(threshold))) > tolerance)
    return ScoreCheck(
        digits=len(digits),
        non_digits=len(non_digits),
        max_abs_score_diff=diff,
        tolerance=tolerance,
        threshold=threshold,
        decisions_changed=int(changed.sum()),
        decisions_changed_off_threshold=int(off_threshold.sum()),
        digits_passed=float(np.mean(scores[: len(digits)] >= threshold)),
        non_digits_caught=float(np.mean(scores[len(digits) :] < threshold)),
        reference=reference,
        in_log_odds=in_log_odds,
    )


def _log_odds(p: np.ndarray) -> np.ndarray:
    """log(p / (1 - p)), p clipped to [1e-4, 0.999], the range a threshold sits in: float32 steps of 6e-8 near 1 are
    log-odds noise of 0.06 at 1 - 1e-6, and ONNX Runtime's logistic function is 7% off PyTorch's at 1e-6 (measured)."""
    q = np.clip(np.asarray(p, np.float64), 1e-4, 0.999)
    return np.log(q) - np.log1p(-q)


def is_own_class(metadata: ModelMetadata) -> bool:
    """Whether a model's digit score is its own "not a digit" output (else a detector attached to its graph)."""
    return (metadata.digit_detector or {}).get("kind") == OWN_CLASS


def own_class_threshold(session, config: dict, data_dir: str | None) -> tuple[float, dict]:
    """The threshold of a model whose digit score is its own "not a digit" class, and the description its metadata
    carries: where 1% of digits it never trained on are flagged (training.non_digits.threshold_digits)."""
    from training.fit_digit_detector import weighted_quantile
    from training.non_digits import THRESHOLD_FALSE_ALARM, threshold_digits

    sets = threshold_digits(config, data_dir)
    if not sets:
        raise ExportError("no digits to set the threshold on: the run had no validation split and no renders")
    scores = {name: run_batched(session, x.astype(np.float32), output=DIGIT_SCORE) for name, x in sets.items()}
    threshold = weighted_quantile(list(scores.values()), THRESHOLD_FALSE_ALARM)
    description = {
        "kind": OWN_CLASS,
        "source": "the model's own 'not a digit' output",
        "method": "the classifier's eleventh output, 'not a digit', trained with the digits on non-digits of the "
        "detector's fitted kinds (mnist-train --non-digits); digit_score = 1 - its share of the eleven-way softmax",
        "threshold_rule": f"{THRESHOLD_FALSE_ALARM:.0%} of digits never trained on flagged, each set weighing alike",
        "threshold_sets": {name: {"n": len(v), "flagged": float(np.mean(v < threshold))} for name, v in scores.items()},
        "validation_split": {key: config.get(key) for key in SPLIT_KEYS},  # rebuilds the sets: threshold_digits
    }
    return threshold, description


def _torch_score(wrapped) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """The digit score of a WithDigitScore model in PyTorch (fp32, eval): the reference for its ONNX graph."""
    import torch

    def score(x: np.ndarray, _probabilities: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return wrapped(torch.from_numpy(np.ascontiguousarray(x, np.float32)))[2].numpy()

    return score


def _require_score(check: ScoreCheck, what: str) -> None:
    if not check.ok:
        raise ExportError(
            f"digit score check failed for {what} on {check.digits} test digits and {check.non_digits} non-digits: "
            f"max |Δ{'log-odds' if check.in_log_odds else 'score'}| against {check.reference} "
            f"{check.max_abs_score_diff:.2e} (tolerance "
            f"{check.tolerance:.0e}), {check.decisions_changed_off_threshold} is_digit decisions changed away from "
            "the threshold"
        )


def export_checkpoint(
    checkpoint: Path,
    output: Path,
    model_version: str | None = None,
    parity_images: int = 1000,
    accuracy_images: int = 0,
    data_dir: str | None = None,
    provider: str = "cpu",
    digit_detector: Path | None = DIGIT_DETECTOR,
) -> dict:
    """Export, verify and annotate; returns the export report (also written beside the model).

    Parity is checked on the CPU provider (fp32 there matches PyTorch to 1e-4); the stored test accuracy
    is measured through `provider`. With `digit_detector` (a .npz of training.fit_digit_detector; None: no score) the
    detector becomes the graph's `digit_score` output, checked against the numpy detector.
    """
    import onnx
    import torch

    from export.digit_score_graph import with_digit_score
    from training.model import WithDigitScore, WithProbabilities

    started = time.time()
    model, preset, _ = load_checkpoint_model(checkpoint)
    checkpoint_sha = sha256_file(checkpoint)
    own_class = model.config.not_a_digit_class  # its score is its own eleventh output: no detector is attached
    detector = load_detector(digit_detector) if digit_detector is not None and not own_class else None

    with tempfile.TemporaryDirectory() as tmp:
        raw_path = Path(tmp) / "model.onnx"
        wrapped = (WithDigitScore if own_class else WithProbabilities)(model).eval()
        batch = torch.export.Dim(BATCH_AXIS, min=1, max=65536)
        # The exporter logs every torchvision op it cannot register and warns about its own internals.
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                wrapped,
                (torch.zeros(2, *INPUT_SHAPE),),
                input_names=[INPUT_NAME],
                output_names=list(SCORED_OUTPUT_NAMES if own_class else OUTPUT_NAMES),
                opset_version=OPSET,
                dynamo=True,
                external_data=False,
                dynamic_shapes={"x": {0: batch}},
                verbose=False,
            )
        program.save(str(raw_path), external_data=False)
        proto = onnx.load(str(raw_path))
    _check_io_contract(proto)
    if detector is not None:
        proto = with_digit_score(proto, detector)
    onnx.checker.check_model(proto, full_check=True)
    _check_io_contract(proto)

    with tempfile.TemporaryDirectory() as tmp:
        candidate = Path(tmp) / "candidate.onnx"
        onnx.save(proto, str(candidate))
        session = ort_session(candidate)
        x, labels = normalized_test_images(max(parity_images, accuracy_images), data_dir)
        parity = check_parity(model, session, x[:parity_images], FP32_LOGIT_TOLERANCE)
        if not parity.ok:
            raise ExportError(
                f"parity check failed on {parity.images} test images: max |Δlogit| {parity.max_abs_logit_diff:.2e} "
                f"(tolerance {parity.tolerance:.0e}), {parity.argmax_mismatches} different predictions"
            )
        score, threshold, description = None, None, None
        if own_class:
            threshold, description = own_class_threshold(session, checkpoint_config(checkpoint), data_dir)
            score = compare_scores(
                session,
                _torch_score(wrapped),
                threshold,
                x[:parity_images],
                "PyTorch",
                OWN_CLASS_LOG_ODDS_TOLERANCE,
                in_log_odds=True,
            )
        elif detector is not None:
            score = check_digit_score(session, detector, x[:parity_images])
            threshold, description = detector.threshold, detector_description(detector, digit_detector)
        if score is not None:
            _require_score(score, "the exported model")
        x_acc, y_acc = normalized_test_images(accuracy_images, data_dir)
        measuring = session if provider == "cpu" else ort_session(candidate, provider)
        accuracy = float((run_batched(measuring, x_acc).argmax(1) == y_acc).mean())

    metadata = ModelMetadata(
        model_name=preset,
        model_version=model_version or checkpoint_sha[:12],
        class_labels=list(CLASS_LABELS),
        normalization=MNIST_NORMALIZATION.as_dict(),
        input_layout=input_layout("fp32"),
        output_layout=output_layout(score is not None),
        test_accuracy=accuracy,
        test_images=len(y_acc),
        checkpoint_sha256=checkpoint_sha,
        opset=OPSET,
        exported_with=f"torch {torch.__version__}, onnx {onnx.__version__}",
        digit_threshold=threshold,
        digit_detector=description,
    )
    metadata.write_into(proto)
    save_atomically(proto, output)
    report = {
        "model": str(output),
        "onnx_sha256": sha256_file(output),
        "size_bytes": output.stat().st_size,
        "checkpoint": str(checkpoint),
        "metadata": asdict(metadata),
        "parity": {**asdict(parity), "passed": parity.ok},
        "digit_score": {**asdict(score), "passed": True} if score is not None else None,
        "seconds": time.time() - started,
    }
    output.with_suffix(".export.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


# Ops left in fp32 by `to_fp16`: the softmax, so probabilities near 0 and 1 keep their digits. The nodes only the
# digit_score output needs (a score that is the model's own class: its log-odds from the logits, the logistic
# function) stay in fp32 too.
FP32_OPS = frozenset({"Softmax"})


def _score_only_nodes(graph) -> set[int]:
    """Indices of the nodes that only the DIGIT_SCORE output needs (none in a graph without it)."""
    producer = {name: i for i, node in enumerate(graph.node) for name in node.output}

    def ancestors(outputs: set[str]) -> set[int]:
        seen: set[int] = set()
        pending = [producer[name] for name in outputs if name in producer]
        while pending:
            i = pending.pop()
            if i not in seen:
                seen.add(i)
                pending += [producer[name] for name in graph.node[i].input if name in producer]
        return seen

    scored = {o.name for o in graph.output if o.name == DIGIT_SCORE}
    return ancestors(scored) - ancestors({o.name for o in graph.output} - scored) if scored else set()


def to_fp16(proto):
    """A copy of an fp32 model computing in fp16: fp16 weights and arithmetic, the graph's float inputs and
    outputs still float32 (cast at the edges), ops in FP32_OPS and the score's own nodes still in fp32.

    Written here rather than taken from onnxconverter-common, whose converter (1.16) types the output of a
    node feeding both a graph output and another node as fp16 (our logits feed the softmax): ONNX Runtime
    refuses that model. The result is checked against the fp32 file by `export_fp16_variant` anyway.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.ModelProto()
    model.CopyFrom(proto)
    graph = model.graph
    float_inputs = {i.name for i in graph.input if i.type.tensor_type.elem_type == TensorProto.FLOAT}
    float_outputs = {o.name for o in graph.output if o.type.tensor_type.elem_type == TensorProto.FLOAT}
    for tensor in graph.initializer:
        if tensor.data_type == TensorProto.FLOAT:
            half = np.clip(numpy_helper.to_array(tensor), -65504, 65504).astype(np.float16)
            tensor.CopyFrom(numpy_helper.from_array(half, tensor.name))
    fp32_ids = {i for i, node in enumerate(graph.node) if node.op_type in FP32_OPS} | _score_only_nodes(graph)
    kept_fp32 = {name for i in fp32_ids for name in graph.node[i].output}
    fp32_world = float_inputs | float_outputs | kept_fp32  # tensors that stay float32 under their own names
    fp16_inputs = {name for i, node in enumerate(graph.node) if i not in fp32_ids for name in node.input}
    floats = (TensorProto.FLOAT, TensorProto.FLOAT16)
    not_float = {t.name for t in graph.initializer if t.data_type not in floats} | {
        name
        for node in graph.node
        if node.op_type == "Constant" and any(a.t.data_type not in floats for a in node.attribute if a.name == "value")
        for name in node.output
    }  # axes and shapes: an fp32 op takes them as they are
    nodes = [helper.make_node("Cast", [name], [f"{name}__fp16"], to=TensorProto.FLOAT16) for name in float_inputs]
    cast_up: set[str] = set()  # fp16 tensors given an fp32 twin: one Cast each, however many fp32 nodes read it
    for index, node in enumerate(graph.node):
        fp32_op = index in fp32_ids
        for i, name in enumerate(node.input):
            if fp32_op and name and name not in fp32_world and name not in not_float:  # an fp16 tensor, fp32 op
                if name not in cast_up:
                    nodes.append(helper.make_node("Cast", [name], [f"{name}__fp32"], to=TensorProto.FLOAT))
                    cast_up.add(name)
                node.input[i] = f"{name}__fp32"
            elif not fp32_op and name in fp32_world:  # a float32 tensor into an fp16 op: its fp16 twin
                node.input[i] = f"{name}__fp16"
        produced_fp32 = []
        for i, name in enumerate(node.output):
            if not fp32_op and name in float_outputs:  # made in fp16, handed out as float32
                node.output[i] = f"{name}__fp16"
                produced_fp32.append(helper.make_node("Cast", [f"{name}__fp16"], [name], to=TensorProto.FLOAT))
            elif fp32_op and name in fp16_inputs:  # an fp32 op's output read by fp16 ops
                produced_fp32.append(helper.make_node("Cast", [name], [f"{name}__fp16"], to=TensorProto.FLOAT16))
        nodes += [node, *produced_fp32]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]  # intermediate types changed; ONNX Runtime infers them again
    sort_nodes_topologically(graph)
    return model


def sort_nodes_topologically(graph) -> None:
    """Reorder `graph.node` so every node comes after the nodes producing its inputs (stable otherwise)."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [node for node in pending if all(name in available for name in node.input)]
        if not ready:
            raise ExportError(f"graph cannot be ordered: {pending[0].name} needs an input nothing produces")
        for node in ready:
            available.update(node.output)
        ordered.extend(ready)
        ready_ids = {id(node) for node in ready}
        pending = [node for node in pending if id(node) not in ready_ids]
    del graph.node[:]
    graph.node.extend(ordered)


def export_fp16_variant(
    fp32_model: Path,
    parity_images: int = 1000,
    accuracy_images: int = 0,
    data_dir: str | None = None,
    provider: str = "cpu",
    digit_detector: Path | None = DIGIT_DETECTOR,
) -> dict:
    """Write `name.fp16.onnx` beside an fp32 model written by mnist-export, checked against it; returns the report.

    The fp16-against-fp32 check runs on the CPU provider; both accuracies are measured through `provider`. A digit
    score in the fp32 model is carried over unchanged, in fp32 (its residual features are differences of large
    sums, which fp16 cannot hold), and checked against the numpy detector `digit_detector`, which must be the file
    the score was built from.
    """
    import onnx

    from export.digit_score_graph import attach, detach

    started = time.time()
    proto32 = onnx.load(str(fp32_model))
    metadata32 = read_metadata(proto32)
    if metadata32.precision != "fp32":
        raise ExportError(f"{fp32_model} is already {metadata32.precision}; give the fp32 model")
    own_class = is_own_class(metadata32)
    classifier32, score_graph = (proto32, None) if own_class else detach(proto32)
    detector = _detector_of(metadata32, fp32_model, digit_detector) if score_graph is not None else None
    proto16 = to_fp16(classifier32)  # an own class's score is converted with it, its last steps kept in fp32
    if score_graph is not None:
        proto16 = attach(proto16, score_graph)
    onnx.checker.check_model(proto16, full_check=True)
    _check_io_contract(proto16)
    output = variant_path(fp32_model, "fp16")

    with tempfile.TemporaryDirectory() as tmp:
        candidate = Path(tmp) / "candidate.onnx"
        onnx.save(proto16, str(candidate))
        session16, session32 = ort_session(candidate), ort_session(fp32_model)
        x, labels = normalized_test_images(max(parity_images, accuracy_images), data_dir)
        xp = x[:parity_images]
        logits16, logits32 = run_batched(session16, xp), run_batched(session32, xp)
        probability_diff = float(
            np.abs(
                run_batched(session16, xp, output=PROBABILITIES) - run_batched(session32, xp, output=PROBABILITIES)
            ).max()
        )
        parity = ParityResult(
            images=len(xp),
            max_abs_logit_diff=float(np.abs(logits16 - logits32).max()),
            argmax_mismatches=int((logits16.argmax(1) != logits32.argmax(1)).sum()),
            tolerance=FP16_LOGIT_TOLERANCE,
            max_abs_probability_diff=probability_diff,
            allowed_mismatches=int(FP16_MAX_CHANGED_PREDICTIONS * len(xp)),
        )
        if not parity.ok or probability_diff > FP16_PROBABILITY_TOLERANCE:
            raise ExportError(
                f"fp16 check failed on {parity.images} test images against {fp32_model}: max |Δlogit| "
                f"{parity.max_abs_logit_diff:.2e} (tolerance {FP16_LOGIT_TOLERANCE}), max |Δprobability| "
                f"{probability_diff:.2e} (tolerance {FP16_PROBABILITY_TOLERANCE}), {parity.argmax_mismatches} "
                f"different predictions (at most {parity.allowed_mismatches})"
            )
        score = None
        if own_class:
            score = compare_scores(
                session16,
                lambda x, _p: run_batched(session32, x, output=DIGIT_SCORE),
                float(metadata32.digit_threshold),
                xp,
                f"the fp32 model {fp32_model.name}",
                FP16_LOG_ODDS_TOLERANCE,
                in_log_odds=True,
            )
        elif detector is not None:
            score = check_digit_score(session16, detector, xp)
        if score is not None:
            _require_score(score, "the fp16 variant")
        x_acc, y_acc = normalized_test_images(accuracy_images, data_dir)
        if provider != "cpu":
            session16, session32 = ort_session(candidate, provider), ort_session(fp32_model, provider)
        accuracy16 = float((run_batched(session16, x_acc).argmax(1) == y_acc).mean())
        accuracy32 = float((run_batched(session32, x_acc).argmax(1) == y_acc).mean())
    if accuracy32 - accuracy16 > FP16_MAX_ACCURACY_DROP:
        raise ExportError(
            f"fp16 test accuracy {100 * accuracy16:.2f}% is more than {100 * FP16_MAX_ACCURACY_DROP:.1f} points "
            f"under fp32's {100 * accuracy32:.2f}% on the same {len(y_acc):,} images"
        )

    from dataclasses import replace

    metadata = replace(
        metadata32,
        precision="fp16",
        input_layout=input_layout("fp16"),
        test_accuracy=accuracy16,
        test_images=len(y_acc),
        exported_with=f"{metadata32.exported_with}; fp16 by mnist-export (onnx {onnx.__version__})",
    )
    metadata.write_into(proto16)
    save_atomically(proto16, output)
    report = {
        "model": str(output),
        "onnx_sha256": sha256_file(output),
        "size_bytes": output.stat().st_size,
        "converted_from": str(fp32_model),
        "converted_from_sha256": sha256_file(fp32_model),
        "metadata": asdict(metadata),
        "parity_against_fp32": {
            **asdict(parity),
            "probability_tolerance": FP16_PROBABILITY_TOLERANCE,
            "passed": True,
        },
        "digit_score": {**asdict(score), "precision": "fp32 inside the fp16 model", "passed": True}
        if score is not None
        else None,
        "fp32_test_accuracy_same_images": accuracy32,
        "accuracy_provider": provider,
        "seconds": time.time() - started,
    }
    output.with_suffix(".export.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _detector_of(metadata: ModelMetadata, model: Path, digit_detector: Path | None) -> DigitDetector:
    """The numpy detector a model's digit score was built from: `digit_detector`, if its SHA-256 is the one the
    model's metadata records."""
    recorded = (metadata.digit_detector or {}).get("detector_sha256")
    if digit_detector is None or (recorded and sha256_file(digit_detector) != recorded):
        raise ExportError(
            f"{model} has a digit score built from {(metadata.digit_detector or {}).get('source', '?')} "
            f"(sha256 {str(recorded)[:16]}…); give that file with --digit-detector to check it"
        )
    return load_detector(digit_detector)


def add_digit_score(
    model_path: Path, digit_detector: Path = DIGIT_DETECTOR, parity_images: int = 1000, data_dir: str | None = None
) -> dict:
    """Put `digit_detector`'s score into an existing model file (fp32 or fp16; one it already has is replaced), without
    retraining: the classifier's logits and probabilities must stay bit-identical on `parity_images` test images (at
    batch 256 and alone) and the score must match the numpy detector. Rewrites the file and its .export.json report
    (if any); returns the score's part of that report."""
    import onnx

    from export.digit_score_graph import with_digit_score

    started = time.time()
    before = onnx.load(str(model_path))
    metadata = read_metadata(before)
    _check_io_contract(before)
    if is_own_class(metadata):
        raise ExportError(f"{model_path}: its digit score is its own 'not a digit' class; there is nothing to add")
    detector = load_detector(digit_detector)
    after = with_digit_score(before, detector)
    onnx.checker.check_model(after, full_check=True)
    _check_io_contract(after)
    x, _ = normalized_test_images(parity_images, data_dir)
    with tempfile.TemporaryDirectory() as tmp:
        candidate = Path(tmp) / "candidate.onnx"
        onnx.save(after, str(candidate))
        old, new = ort_session(model_path), ort_session(candidate)
        changed = [
            f"{name} at batch {batch}"
            for batch in (256, 1)
            for name in OUTPUT_NAMES
            if not np.array_equal(
                run_batched(old, x[: 8 if batch == 1 else None], batch, name),
                run_batched(new, x[: 8 if batch == 1 else None], batch, name),
            )
        ]
        if changed:
            raise ExportError(f"{model_path}: adding the digit score changed the classifier's {', '.join(changed)}")
        score = check_digit_score(new, detector, x)
        _require_score(score, str(model_path))
    from dataclasses import replace

    metadata = replace(
        metadata,
        output_layout=output_layout(True),
        digit_threshold=detector.threshold,
        digit_detector=detector_description(detector, digit_detector),
    )
    metadata.write_into(after)
    save_atomically(after, model_path)
    entry = {
        **asdict(score),
        "passed": True,
        "classifier_unchanged": f"logits and probabilities bit-identical on {len(x)} test images (batch 256 and 1)",
        "added_by": "mnist-export --add-digit-score",
        "seconds": round(time.time() - started, 1),
    }
    report_path = model_path.with_suffix(".export.json")
    if report_path.is_file():
        report = json.loads(report_path.read_text())
        report.update(
            onnx_sha256=sha256_file(model_path),
            size_bytes=model_path.stat().st_size,
            metadata=asdict(metadata),
            digit_score=entry,
        )
        report_path.write_text(json.dumps(report, indent=2) + "\n")
    return entry


def save_atomically(proto, output: Path) -> None:
    """Write under a temporary name, then rename: a reader never sees half a model."""
    import onnx

    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + ".tmp")
    onnx.save(proto, str(partial))
    partial.replace(output)


def _check_io_contract(proto) -> None:
    inputs = [i.name for i in proto.graph.input]
    outputs = [o.name for o in proto.graph.output]
    if inputs != [INPUT_NAME] or tuple(outputs) not in (OUTPUT_NAMES, SCORED_OUTPUT_NAMES):
        raise ExportError(
            f"exported graph has inputs {inputs} and outputs {outputs}, expected [{INPUT_NAME}] {OUTPUT_NAMES} "
            f"or {SCORED_OUTPUT_NAMES}"
        )
    not_float = [v.name for v in (*proto.graph.input, *proto.graph.output) if v.type.tensor_type.elem_type != 1]
    if not_float:
        raise ExportError(f"{', '.join(not_float)} must be float32 (the contract), whatever the precision inside")
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    if batch_dim.HasField("dim_value"):
        raise ExportError(f"batch axis of {INPUT_NAME} is fixed at {batch_dim.dim_value}, expected dynamic")


def check_model_file(
    path: Path, data_dir: str | None, limit: int, provider: str = "cpu", digit_detector: Path | None = DIGIT_DETECTOR
) -> dict:
    """Checker, metadata and test-set accuracy of an existing ONNX model (the bundled one, say); its digit score, if
    it has one, against the numpy detector it was built from (`digit_detector`, when that is the file)."""
    import onnx

    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    _check_io_contract(proto)
    metadata = read_metadata(proto)
    has_output = DIGIT_SCORE in [o.name for o in proto.graph.output]
    if has_output != metadata.has_digit_score:
        missing = "digit_threshold in its metadata" if has_output else f"{DIGIT_SCORE} output"
        raise ExportError(f"{path}: its digit score is incomplete: no {missing}")
    session = ort_session(path, provider)
    x, labels = normalized_test_images(limit, data_dir)
    started = time.perf_counter()
    predictions = run_batched(session, x).argmax(1)
    seconds = time.perf_counter() - started
    score = None
    if has_output and is_own_class(metadata):  # nothing apart from the model computes it: its threshold rebuilt
        alone = ort_session(path)
        stored = float(metadata.digit_threshold)
        rebuilt, _ = own_class_threshold(alone, metadata.digit_detector["validation_split"], data_dir)
        if abs(float(_log_odds(rebuilt) - _log_odds(stored))) > FP16_LOG_ODDS_TOLERANCE:
            raise ExportError(
                f"{path}: threshold {stored:.6f} is not where the rule puts it on this model's scores ({rebuilt:.6f})"
            )
        check = compare_scores(
            alone,
            lambda x, _p: run_batched(alone, x, batch_size=1, output=DIGIT_SCORE),
            stored,
            x[:500],
            "the same model one image at a time",
            OWN_CLASS_LOG_ODDS_TOLERANCE,
            in_log_odds=True,
        )
        score = {**asdict(check), "threshold_rebuilt": rebuilt}
    elif has_output:
        score = asdict(check_digit_score(ort_session(path), _detector_of(metadata, path, digit_detector), x[:1000]))
    return {
        "digit_score": score,
        "metadata": asdict(metadata),
        "sha256": sha256_file(path),
        "images": len(labels),
        "provider": session.get_providers()[0],
        "accuracy": float((predictions == labels).mean()),
        "images_per_second": len(labels) / seconds,
        "first_predictions": predictions[:12].tolist(),
        "first_labels": labels[:12].tolist(),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mnist-export",
        description="Export an mnist-train checkpoint to ONNX (opset 18, dynamic batch axis, input 'image', outputs "
        "'logits' and 'probabilities'), verify it (onnx.checker; fp32 parity with PyTorch on real test images: max "
        "|Δlogit| <= 1e-4 and identical predictions), measure its test accuracy through ONNX Runtime and store "
        "model name, version, labels, normalization, layout, precision, accuracy and checkpoint SHA-256 in "
        "metadata_props. The digit detector (--digit-detector) becomes a third output, 'digit_score' (float32 [batch], "
        "is_digit = digit_score >= the threshold stored in the metadata), checked against the numpy detector. With "
        "--fp16, also write and verify an fp16 variant NAME.fp16.onnx. With --check, verify an existing ONNX model "
        "instead (and with --fp16, write its fp16 variant). With --add-digit-score, put the score into existing models "
        "without retraining.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("checkpoint", nargs="?", type=Path, help="model.pt or checkpoint.pt written by mnist-train")
    parser.add_argument(
        "-o",
        "--output",
        type=Path,
        help="ONNX file to write (default: beside the checkpoint, "
        "named after the preset); an .export.json report is written next to it",
    )
    parser.add_argument(
        "--model-version",
        help="version string stored in the metadata (default: first 12 hex digits of the checkpoint's SHA-256)",
    )
    parser.add_argument("--parity-images", type=int, default=1000, help="test images compared against PyTorch")
    parser.add_argument(
        "--accuracy-images",
        type=int,
        default=0,
        help="test images for the accuracy stored in the metadata (0 = all 10,000)",
    )
    parser.add_argument(
        "--data-dir", help="MNIST directory (default: $MNIST_DIR, else ../shared/data/mnist, else the user cache)"
    )
    parser.add_argument(
        "--triton-repo",
        type=Path,
        metavar="DIR",
        help="also write a Triton model repository DIR/<name>/1/model.onnx + config.pbtxt (dynamic batching) for "
        "the exported model, or for the --check model; this REPLACES DIR/<name>/ (all its versions and its config) "
        "with version 1 only: to add a version to a live repository, use --publish",
    )
    parser.add_argument(
        "--publish",
        type=Path,
        metavar="DIR",
        help="also publish the exported (or --check) model into the model repository DIR as the next version: "
        "DIR/<name>/<N>/model.onnx, N = 1 + the largest integer-named version folder there (1 if none; other names "
        "are ignored), with --fp16 also model.fp16.onnx beside it. The files are staged in a hidden folder inside "
        "DIR/<name>/ and renamed to N in one step, so a server polling DIR (mnist-serve --model-repository, "
        "Triton) never sees a half-written version; if another publisher takes N meanwhile, the next number is "
        "used. config.pbtxt and labels.txt are written only when DIR/<name>/ has no config.pbtxt yet: an "
        "existing one (a version policy, say) is kept, and must name the same model",
    )
    parser.add_argument(
        "--triton-max-batch-size", type=int, default=256, help="max_batch_size in a config.pbtxt written"
    )
    parser.add_argument(
        "--fp16",
        action="store_true",
        help="also write NAME.fp16.onnx: fp16 weights and arithmetic, float32 input/output, softmax in fp32; "
        f"written only if, against the fp32 file through ONNX Runtime, max |Δlogit| <= {FP16_LOGIT_TOLERANCE}, "
        f"max |Δprobability| <= {FP16_PROBABILITY_TOLERANCE}, at most {100 * FP16_MAX_CHANGED_PREDICTIONS:g}%% of "
        f"predictions change and test accuracy drops by at most {100 * FP16_MAX_ACCURACY_DROP:g} points",
    )
    parser.add_argument(
        "--provider",
        choices=["cpu", "cuda"],
        default="cpu",
        help="ONNX Runtime provider the test accuracy is measured with (cuda: what a GPU server computes); the "
        "parity checks always run on the CPU",
    )
    parser.add_argument(
        "--check",
        type=Path,
        metavar="MODEL.onnx",
        help="instead of exporting, verify an existing model and print its metadata and accuracy",
    )
    parser.add_argument(
        "--digit-detector",
        default=str(DIGIT_DETECTOR),
        metavar="FILE.npz|none",
        help="the digit detector (written by python -m training.fit_digit_detector) computed inside the graph as the "
        f"output '{DIGIT_SCORE}', its threshold and description stored in the metadata; none: a model without it "
        f"(the server then scores with its separate --digit-detector file). The score must match the numpy detector "
        f"to {SCORE_TOLERANCE:.0e} on test digits and non-digits. With --fp16 or --check, the file the model's score "
        "was built from, to check it. Not used for a checkpoint trained with --non-digits: its score is its own "
        "'not a digit' output, checked against PyTorch, its threshold set where 1%% of digits it never trained on "
        "(its validation split, fresh renders of the fit handwriting fonts) are flagged",
    )
    parser.add_argument(
        "--add-digit-score",
        type=Path,
        nargs="+",
        metavar="MODEL.onnx",
        help="instead of exporting, add the digit detector's score to existing model files (fp32 or fp16; an earlier "
        "score is replaced), without retraining: each file is rewritten only if its logits and probabilities stay "
        "bit-identical on --parity-images test images and the score matches the numpy detector; its .export.json "
        "report is updated",
    )
    return parser


def _write_triton(args: argparse.Namespace, model_path: Path) -> None:
    if args.triton_repo is None:
        return
    import onnx

    from export.triton import write_triton_repository

    metadata = read_metadata(onnx.load(str(model_path), load_external_data=False))
    folder = write_triton_repository(model_path, args.triton_repo, metadata, args.triton_max_batch_size)
    print(f"  Triton repository: {folder}/ (config.pbtxt, labels.txt, 1/model.onnx)")


def _publish(args: argparse.Namespace, model_path: Path) -> None:
    """--publish: the next version of `model_path` (and, with --fp16, its variant written before this)."""
    if args.publish is None:
        return
    import onnx

    from export.reference import reference_is_current, write_reference
    from export.triton import publish_version

    metadata = read_metadata(onnx.load(str(model_path), load_external_data=False))
    fp16_path = variant_path(model_path, "fp16") if args.fp16 else None
    config_existed = (args.publish / metadata.model_name / "config.pbtxt").is_file()
    if not reference_is_current(model_path):  # the servers compare the version's live answers with it (drift)
        reference = write_reference(model_path, args.data_dir)
        print(f"  wrote {reference} (its answers on the MNIST test set, for the servers' drift check)")
    folder, number = publish_version(
        model_path, args.publish, metadata, args.triton_max_batch_size, fp16_path=fp16_path
    )
    files = "model.onnx, model.fp16.onnx" if fp16_path else "model.onnx"
    files += ", model.reference.json"
    print(f"published {metadata.model_name} version {number} to {folder}/ ({files})")
    if config_existed:
        print(f"  kept the existing {folder.parent / 'config.pbtxt'}")
    else:
        print(f"  wrote {folder.parent / 'config.pbtxt'} and labels.txt")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.digit_detector = None if args.digit_detector == "none" else Path(args.digit_detector)
    try:
        if args.add_digit_score:
            if args.digit_detector is None:
                build_parser().error("--add-digit-score needs a --digit-detector file")
            for model_path in args.add_digit_score:
                entry = add_digit_score(model_path, args.digit_detector, args.parity_images, args.data_dir)
                print(f"{model_path}: digit score added ({model_path.stat().st_size / 1e6:.2f} MB)")
                _print_score(entry)
            return 0
        if args.check:
            result = check_model_file(
                args.check, args.data_dir, args.accuracy_images, args.provider, args.digit_detector
            )
            meta = result["metadata"]
            print(
                f"{args.check}: {meta['model_name']} version {meta['model_version']}, sha256 {result['sha256'][:16]}…"
            )
            print(f"  input  {meta['input_layout']}\n  output {meta['output_layout']}")
            print(
                f"  test accuracy {100 * result['accuracy']:.2f}% on {result['images']:,} MNIST test images "
                f"through ONNX Runtime ({result['provider']}, {result['images_per_second']:,.0f} images/s); "
                f"metadata says {100 * meta['test_accuracy']:.2f}%"
            )
            print(f"  first predictions {result['first_predictions']}\n  true labels       {result['first_labels']}")
            if result["digit_score"] is not None:
                _print_score(result["digit_score"])
            _write_triton(args, args.check)
            if args.fp16:
                _print_fp16(
                    export_fp16_variant(
                        args.check,
                        args.parity_images,
                        args.accuracy_images,
                        args.data_dir,
                        args.provider,
                        args.digit_detector,
                    )
                )
            _publish(args, args.check)
            return 0
        if args.checkpoint is None:
            build_parser().error("give a checkpoint to export, or --check MODEL.onnx")
        output = args.output or args.checkpoint.with_name(f"{load_checkpoint_model(args.checkpoint)[1]}.onnx")
        report = export_checkpoint(
            args.checkpoint,
            output,
            args.model_version,
            args.parity_images,
            args.accuracy_images,
            args.data_dir,
            args.provider,
            args.digit_detector,
        )
        _write_triton(args, output)
        fp16_report = (
            export_fp16_variant(
                output, args.parity_images, args.accuracy_images, args.data_dir, args.provider, args.digit_detector
            )
            if args.fp16
            else None
        )
    except (ExportError, ValueError, FileNotFoundError) as exc:
        print(f"mnist-export: {exc}", file=sys.stderr)
        return 2
    parity, meta = report["parity"], report["metadata"]
    print(f"wrote {report['model']} ({report['size_bytes'] / 1e6:.1f} MB, sha256 {report['onnx_sha256'][:16]}…)")
    print(
        f"  onnx.checker: ok | parity on {parity['images']} test images: max |Δlogit| "
        f"{parity['max_abs_logit_diff']:.2e} <= {parity['tolerance']:.0e}, {parity['argmax_mismatches']} "
        f"different predictions"
    )
    print(f"  test accuracy through ONNX Runtime: {100 * meta['test_accuracy']:.2f}% on {meta['test_images']:,} images")
    if report["digit_score"] is not None:
        _print_score(report["digit_score"])
    print(
        f"  metadata: {meta['model_name']} version {meta['model_version']}, checkpoint sha256 "
        f"{meta['checkpoint_sha256'][:16]}…"
    )
    if fp16_report is not None:
        _print_fp16(fp16_report)
    try:
        _publish(args, output)
    except (ValueError, OSError) as exc:
        print(f"mnist-export: not published: {exc}", file=sys.stderr)
        return 2
    return 0


def _print_score(check: dict) -> None:
    print(
        f"  digit_score against {check.get('reference', 'the numpy detector')} on {check['digits']} test digits "
        f"and {check['non_digits']} "
        f"non-digits: max |Δ{'log-odds' if check.get('in_log_odds') else 'score'}| {check['max_abs_score_diff']:.1e} "
        f"<= {check['tolerance']:.0e}, "
        f"{check['decisions_changed']} is_digit decisions changed ({check['decisions_changed_off_threshold']} away "
        f"from the threshold {check['threshold']:.4f}); digits passed {100 * check['digits_passed']:.1f}%, "
        f"non-digits caught {100 * check['non_digits_caught']:.1f}%"
    )


def _print_fp16(report: dict) -> None:
    parity, meta = report["parity_against_fp32"], report["metadata"]
    print(f"wrote {report['model']} ({report['size_bytes'] / 1e6:.1f} MB, sha256 {report['onnx_sha256'][:16]}…)")
    print(
        f"  fp16 against fp32 on {parity['images']} test images: max |Δlogit| {parity['max_abs_logit_diff']:.2e} <= "
        f"{parity['tolerance']}, max |Δprobability| {parity['max_abs_probability_diff']:.2e} <= "
        f"{parity['probability_tolerance']}, {parity['argmax_mismatches']} different predictions "
        f"(<= {parity['allowed_mismatches']})"
    )
    print(
        f"  test accuracy through ONNX Runtime: {100 * meta['test_accuracy']:.2f}% on {meta['test_images']:,} images "
        f"(fp32: {100 * report['fp32_test_accuracy_same_images']:.2f}%)"
    )
    if report["digit_score"] is not None:
        _print_score(report["digit_score"])


if __name__ == "__main__":
    sys.exit(main())
