"""mnist-export: turn a training checkpoint into a verified, self-describing ONNX model.

Steps: load (weights_only) -> export with a dynamic batch axis -> onnx.checker -> parity against
PyTorch on real test images -> test accuracy through ONNX Runtime -> metadata_props -> save.
With --fp16, the fp32 file is then converted to an fp16 variant (`name.fp16.onnx`: fp16 weights
and arithmetic, float32 input and output, softmax kept in fp32), checked against the fp32 file
through ONNX Runtime and measured again. A model that fails a check is not written.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from proto.contract import (
    BATCH_AXIS,
    CLASS_LABELS,
    INPUT_NAME,
    INPUT_SHAPE,
    LOGITS,
    MNIST_NORMALIZATION,
    OUTPUT_LAYOUT,
    OUTPUT_NAMES,
    PROBABILITIES,
    ModelMetadata,
    input_layout,
    read_metadata,
    variant_path,
)
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
    model = build_model(preset)
    model.load_state_dict(state["model"])
    return model.eval(), preset, state.get("test_accuracy")


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
        if hasattr(ort, "preload_dlls"):
            ort.preload_dlls()
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
        reference = model(torch.from_numpy(x)).numpy()
    single = np.concatenate([session.run([LOGITS], {INPUT_NAME: x[i : i + 1]})[0] for i in range(min(8, len(x)))])
    batched = run_batched(session, x, batch_size=256)
    diff = max(float(np.abs(batched - reference).max()), float(np.abs(single - reference[: len(single)]).max()))
    mismatches = int((batched.argmax(1) != reference.argmax(1)).sum())
    return ParityResult(len(x), diff, mismatches, tolerance)


def export_checkpoint(
    checkpoint: Path,
    output: Path,
    model_version: str | None = None,
    parity_images: int = 1000,
    accuracy_images: int = 0,
    data_dir: str | None = None,
    provider: str = "cpu",
) -> dict:
    """Export, verify and annotate; returns the export report (also written beside the model).

    Parity is checked on the CPU provider (fp32 there matches PyTorch to 1e-4); the stored test accuracy
    is measured through `provider`.
    """
    import onnx
    import torch

    from training.model import WithProbabilities

    started = time.time()
    model, preset, _ = load_checkpoint_model(checkpoint)
    checkpoint_sha = sha256_file(checkpoint)

    with tempfile.TemporaryDirectory() as tmp:
        raw_path = Path(tmp) / "model.onnx"
        wrapped = WithProbabilities(model).eval()
        batch = torch.export.Dim(BATCH_AXIS, min=1, max=65536)
        # The exporter logs every torchvision op it cannot register and warns about its own internals.
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                wrapped,
                (torch.zeros(2, *INPUT_SHAPE),),
                input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES),
                opset_version=OPSET,
                dynamo=True,
                external_data=False,
                dynamic_shapes={"x": {0: batch}},
                verbose=False,
            )
        program.save(str(raw_path), external_data=False)
        proto = onnx.load(str(raw_path))
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
        x_acc, y_acc = normalized_test_images(accuracy_images, data_dir)
        measuring = session if provider == "cpu" else ort_session(candidate, provider)
        accuracy = float((run_batched(measuring, x_acc).argmax(1) == y_acc).mean())

    metadata = ModelMetadata(
        model_name=preset,
        model_version=model_version or checkpoint_sha[:12],
        class_labels=list(CLASS_LABELS),
        normalization=MNIST_NORMALIZATION.as_dict(),
        input_layout=input_layout("fp32"),
        output_layout=OUTPUT_LAYOUT,
        test_accuracy=accuracy,
        test_images=len(y_acc),
        checkpoint_sha256=checkpoint_sha,
        opset=OPSET,
        exported_with=f"torch {torch.__version__}, onnx {onnx.__version__}",
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
        "seconds": time.time() - started,
    }
    output.with_suffix(".export.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


# Ops left in fp32 by `to_fp16`: the softmax, so probabilities near 0 and 1 keep their digits.
FP32_OPS = frozenset({"Softmax"})


def to_fp16(proto):
    """A copy of an fp32 model computing in fp16: fp16 weights and arithmetic, the graph's float inputs and
    outputs still float32 (cast at the edges), ops in FP32_OPS still in fp32.

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
    fp32_nodes = [node for node in graph.node if node.op_type in FP32_OPS]
    kept_fp32 = {name for node in fp32_nodes for name in node.output}
    fp32_world = float_inputs | float_outputs | kept_fp32  # tensors that stay float32 under their own names
    fp16_inputs = {name for node in graph.node if node.op_type not in FP32_OPS for name in node.input}
    nodes = [helper.make_node("Cast", [name], [f"{name}__fp16"], to=TensorProto.FLOAT16) for name in float_inputs]
    for node in graph.node:
        fp32_op = node.op_type in FP32_OPS
        for i, name in enumerate(node.input):
            if fp32_op and name and name not in fp32_world:  # an fp16 tensor into an fp32 op
                nodes.append(helper.make_node("Cast", [name], [f"{name}__fp32"], to=TensorProto.FLOAT))
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
) -> dict:
    """Write `name.fp16.onnx` beside an fp32 model written by mnist-export, checked against it; returns the report.

    The fp16-against-fp32 check runs on the CPU provider; both accuracies are measured through `provider`.
    """
    import onnx

    started = time.time()
    proto32 = onnx.load(str(fp32_model))
    metadata32 = read_metadata(proto32)
    if metadata32.precision != "fp32":
        raise ExportError(f"{fp32_model} is already {metadata32.precision}; give the fp32 model")
    proto16 = to_fp16(proto32)
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
        "fp32_test_accuracy_same_images": accuracy32,
        "accuracy_provider": provider,
        "seconds": time.time() - started,
    }
    output.with_suffix(".export.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


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
    if inputs != [INPUT_NAME] or tuple(outputs) != OUTPUT_NAMES:
        raise ExportError(
            f"exported graph has inputs {inputs} and outputs {outputs}, expected [{INPUT_NAME}] {OUTPUT_NAMES}"
        )
    not_float = [v.name for v in (*proto.graph.input, *proto.graph.output) if v.type.tensor_type.elem_type != 1]
    if not_float:
        raise ExportError(f"{', '.join(not_float)} must be float32 (the contract), whatever the precision inside")
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    if batch_dim.HasField("dim_value"):
        raise ExportError(f"batch axis of {INPUT_NAME} is fixed at {batch_dim.dim_value}, expected dynamic")


def check_model_file(path: Path, data_dir: str | None, limit: int, provider: str = "cpu") -> dict:
    """Checker, metadata and test-set accuracy of an existing ONNX model (the bundled one, say)."""
    import onnx

    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    _check_io_contract(proto)
    metadata = read_metadata(proto)
    session = ort_session(path, provider)
    x, labels = normalized_test_images(limit, data_dir)
    started = time.perf_counter()
    predictions = run_batched(session, x).argmax(1)
    seconds = time.perf_counter() - started
    return {
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
        "metadata_props. With --fp16, also write and verify an fp16 variant NAME.fp16.onnx. With --check, verify an "
        "existing ONNX model instead (and with --fp16, write its fp16 variant).",
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

    from export.triton import publish_version

    metadata = read_metadata(onnx.load(str(model_path), load_external_data=False))
    fp16_path = variant_path(model_path, "fp16") if args.fp16 else None
    config_existed = (args.publish / metadata.model_name / "config.pbtxt").is_file()
    folder, number = publish_version(
        model_path, args.publish, metadata, args.triton_max_batch_size, fp16_path=fp16_path
    )
    files = "model.onnx, model.fp16.onnx" if fp16_path else "model.onnx"
    print(f"published {metadata.model_name} version {number} to {folder}/ ({files})")
    if config_existed:
        print(f"  kept the existing {folder.parent / 'config.pbtxt'}")
    else:
        print(f"  wrote {folder.parent / 'config.pbtxt'} and labels.txt")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.check:
            result = check_model_file(args.check, args.data_dir, args.accuracy_images, args.provider)
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
            _write_triton(args, args.check)
            if args.fp16:
                _print_fp16(
                    export_fp16_variant(
                        args.check, args.parity_images, args.accuracy_images, args.data_dir, args.provider
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
        )
        _write_triton(args, output)
        fp16_report = (
            export_fp16_variant(output, args.parity_images, args.accuracy_images, args.data_dir, args.provider)
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


if __name__ == "__main__":
    sys.exit(main())
