"""The digit detector as ONNX nodes, attached to the classifier graph: one session run gives the answer and its score.

`server/pipeline/digit_detector.py` (numpy) runs after the model on the batch runner thread: 0.18 ms for one
image, 36 us per image at 256, on a GPU several times the model itself. Here the same computation
(same features, same fusion network, the same numbers: `DigitDetector.graph_constants`) becomes a
subgraph reading the graph's `image` input and its `probabilities` output and writing a third
output, `digit_score` [batch] float32 (proto/contract.py). The numpy detector stays as the reference
and as the fallback for model files without the output; tests hold the two equal.

Every node and initializer of the subgraph is named under PREFIX, so it can be detached again (to
convert the classifier to fp16 and re-attach the detector unchanged, in fp32) or replaced (after the
detector is refitted). Step by step, as `DigitDetector.raw_inputs` / `score` compute it:

  x (N, 784) -> x @ pixel projection (components, means, ones, frame mask) -> mass, frame share, pixel coordinates
  image -> 2x2 convolution (d/dx, d/dy, both diagonals, each signed both ways) -> Relu -> a stride-4 convolution
           summing each 4x4 cell (|a| = relu(a) + relu(-a)) -> the orientation map, normalized
  both projections -> squared centred projections, means, norms -> @ novelty matrix -> the 44 novelty measures ->
  the predicted digit's (GatherElements on argmax) and the best digit's (ReduceMin)
  -> logarithms, squares, coordinates, log probabilities -> standardize, clip -> tanh layer -> the fusion's log-odds
  image -> the pixel network (3x3 Conv + Relu, MaxPool, ..., GlobalAveragePool, one output) -> its log-odds
  both log-odds, weighed (`fusion_weights`) and added -> Sigmoid -> score (a version 2 detector: the fusion's alone)

Cost, measured on the 2-core development CPU: the features and fusion alone 70-95 us at batch 1 and about 3.5 ms at
256 (the numpy detector: 95 us and 3.4-3.7 ms; the orientation map is a third of either at 256), the pixel network
77 us and 14 ms. Inside the model, right after GoogLeNet has pushed its matrices out of the L2 cache, about 0.3 ms
at batch 1 (+14% of the classifier's run) and +5.6% at 256 (python -m loadtest.digit_score_cost).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from proto.contract import (
    BATCH_AXIS,
    DIGIT_SCORE,
    INPUT_NAME,
    METADATA_PREFIX,
    PROBABILITIES,
    output_layout,
    read_metadata,
)
from server.pipeline.digit_detector import (
    FEATURE_NAMES,
    HOG_CELLS,
    HOG_CHANNELS,
    HOG_SIZE,
    NOVELTY,
    NUM_CLASSES,
    PIXELS,
    SIDE,
    DigitDetector,
)

PREFIX = "digit_score/"  # every node and initializer of the subgraph
CELL = SIDE // HOG_CELLS  # pixels per side of an orientation cell
# 2x2 kernels of the orientation map (cross-correlation, as ONNX Conv): x[i, j+1] - x[i, j], x[i+1, j] - x[i, j],
# their sum and their difference; the map's last row and column stay 0, as in `orientation_cells`.
EDGE_KERNELS = np.array(
    [[[-1, 1], [0, 0]], [[-1, 0], [1, 0]], [[-2, 1], [1, 0]], [[0, 1], [-1, 0]]], np.float32
).reshape(HOG_CHANNELS, 1, 2, 2)
# Sums a channel's two halves (relu(a), relu(-a)) over a 4x4 cell: (out channel, in channel, 4, 4)
CELL_SUMS = np.zeros((HOG_CHANNELS, 2 * HOG_CHANNELS, CELL, CELL), np.float32)
for _channel in range(HOG_CHANNELS):
    CELL_SUMS[_channel, [_channel, HOG_CHANNELS + _channel]] = 1.0


@dataclass
class Subgraph:
    """Nodes and initializers under PREFIX, and the output they produce: what `attach` adds to a graph."""

    nodes: list[Any]  # onnx.NodeProto
    initializers: list[Any]  # onnx.TensorProto
    output: Any  # onnx.ValueInfoProto of DIGIT_SCORE


class _Builder:
    """Nodes and initializers named under PREFIX, each node's output named after the step that makes it."""

    def __init__(self) -> None:
        from onnx import helper, numpy_helper

        self._helper, self._numpy_helper = helper, numpy_helper
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self._names: set[str] = set()

    def _name(self, base: str) -> str:
        name, i = PREFIX + base, 1
        while name in self._names:
            i += 1
            name = f"{PREFIX}{base}_{i}"
        self._names.add(name)
        return name

    def const(self, base: str, value: Any, dtype: Any = np.float32) -> str:
        """An initializer. A float32 array whose values fp16 holds exactly (the pixel projection, stored as fp16
        in the .npz) is stored as fp16 and cast back: half the bytes, the same numbers; ONNX Runtime folds the
        cast at load, so runs pay nothing for it."""
        array = np.asarray(value, dtype)
        if array.dtype == np.float32 and array.size > 1024:
            half = array.astype(np.float16)
            if np.array_equal(half.astype(np.float32), array):
                stored = self._name(base + "_fp16")
                self.initializers.append(self._numpy_helper.from_array(half, stored))
                return self.op("Cast", stored, name=base, to=1)  # onnx.TensorProto.FLOAT
        name = self._name(base)
        self.initializers.append(self._numpy_helper.from_array(array, name))
        return name

    def op(self, op_type: str, *inputs: str, name: str | None = None, **attributes: Any) -> str:
        output = self._name(name or op_type.lower())
        self.nodes.append(self._helper.make_node(op_type, list(inputs), [output], name=output, **attributes))
        return output

    def split(self, tensor: str, sizes: list[int], names: list[str]) -> list[str]:
        """A 2-D tensor cut into consecutive column blocks of `sizes`, one node."""
        outputs = [self._name(name) for name in names]
        sizes_name = self.const(names[0] + "_sizes", sizes, np.int64)
        self.nodes.append(
            self._helper.make_node("Split", [tensor, sizes_name], outputs, name=outputs[0] + "_split", axis=1)
        )
        return outputs

    def columns(self, tensor: str, start: int, stop: int, name: str) -> str:
        """tensor[:, start:stop] of a 2-D tensor."""
        return self.op(
            "Slice",
            tensor,
            self.const(name + "_start", [start], np.int64),
            self.const(name + "_stop", [stop], np.int64),
            self.const(name + "_axis", [1], np.int64),
            name=name,
        )


def build(detector: DigitDetector, image: str = INPUT_NAME, probabilities: str = PROBABILITIES) -> Subgraph:
    """The detector's score of `image` (N, 1, 28, 28, normalized) and the model's `probabilities` (N, 10), as nodes."""
    from onnx import TensorProto, helper

    c = detector.graph_constants()
    b = _Builder()
    one_axis = b.const("axis_1", [1], np.int64)
    # --- pixels: one product gives components, the 11 means, x . 1 and x . frame
    x = b.op("Reshape", image, b.const("shape_pixels", [-1, PIXELS], np.int64), name="x")
    pixel_projection = b.const("pixel_projection", c["pixel_projection"])
    product = b.op("MatMul", x, pixel_projection, name="pixel_product")
    end, hog_end = c["pixel_end"], c["hog_end"]
    means = 1 + NUM_CLASSES
    projections, mean_products, ink_sum, frame_sum = b.split(
        product, [end, means, 1, 1], ["pixel_projections", "pixel_mean_products", "pixel_sum", "frame_sum"]
    )
    mass = b.op(
        "Mul",
        b.op("Sub", ink_sum, b.const("black_total", PIXELS * c["black"]), name="mass_normalized"),
        b.const("std", c["std"]),
        name="mass",
    )
    per_mass = b.op("Div", b.const("std_2", c["std"]), b.op("Add", mass, b.const("one", 1.0)), name="per_mass")

    def count_over(level: Any, name: str) -> str:
        above = b.op("Cast", b.op("Greater", x, b.const(name + "_level", level)), name=name + "_mask", to=1)
        return b.op("ReduceSum", above, one_axis, name=name, keepdims=1)

    ink, lit = count_over(c["half"], "ink"), count_over(c["lit"], "lit")
    # --- the orientation map: four edge directions, |.| as relu(a) + relu(-a) (a convolution of eight kernels with
    # its Relu fused), summed over 7x7 cells of 4x4 pixels by a second convolution (stride 4; the 27x27 map padded
    # with one row and column of 0 at its end): both stay in ONNX Runtime's blocked layout, no transposes between
    signed = b.op("Conv", image, b.const("edge_kernels", np.concatenate([EDGE_KERNELS, -EDGE_KERNELS])), name="edges")
    magnitudes = b.op("Relu", signed, name="edge_halves")
    cells = b.op(
        "Reshape",
        b.op("Conv", magnitudes, b.const("cell_sums", CELL_SUMS), strides=[CELL, CELL], pads=[0, 0, 1, 1]),
        b.const("shape_map", [-1, HOG_SIZE], np.int64),
        name="cells",
    )
    straight = b.op("ReduceSum", b.columns(cells, 0, HOG_SIZE // 2, "straight_cells"), one_axis, keepdims=1)
    roughness = b.op("Mul", straight, per_mass, name="roughness")
    total = b.op("Add", b.op("ReduceSum", cells, one_axis, keepdims=1), b.const("hog_eps", c["hog_eps"]))
    hog_map = b.op("Div", cells, total, name="orientation_map")
    hog_product = b.op("MatMul", hog_map, b.const("hog_projection", c["hog_projection"]), name="hog_product")
    hog_projections, hog_mean_products = b.split(
        hog_product, [hog_end, means], ["hog_projections", "hog_mean_products"]
    )
    # --- novelty: energy outside and Mahalanobis length inside the 11 subspaces, in both spaces

    def squared_norm(tensor: str, width: int, name: str) -> str:
        """Row-wise |v|^2 as (v * v) @ ones: ReduceSumSquare adds in one float32 running sum, 1e-3 off on a digit's
        |x|^2 of ~220, and the energy outside a subspace (|x - mean|^2 minus the energy inside) can be ~1: the
        product accumulates in several lanes, like numpy's vecdot, to ~1e-5."""
        ones = b.const(name + "_ones", np.ones((width, 1), np.float32))
        return b.op("MatMul", b.op("Mul", tensor, tensor, name=name + "_squares"), ones, name=name)

    mean = c["novelty_mean"]
    centred = b.op("Sub", projections, b.const("pixel_means", mean[:end]))
    hog_centred = b.op("Sub", hog_projections, b.const("hog_means", mean[end:]))
    row = b.op(
        "Concat",
        b.op("Mul", centred, centred, name="pixel_projections_sq"),
        b.op("Mul", hog_centred, hog_centred, name="hog_projections_sq"),
        mean_products,
        hog_mean_products,
        squared_norm(x, PIXELS, "pixel_norm"),
        squared_norm(hog_map, HOG_SIZE, "hog_norm"),
        name="novelty_row",
        axis=1,
    )
    measures = b.op(
        "Add",
        b.op("MatMul", row, b.const("novelty_matrix", c["novelty_matrix"])),
        b.const("novelty_constant", c["novelty_constant"]),
        name="novelty_measures",
    )  # (N, 44): per space, outside the 11 subspaces, then Mahalanobis inside them
    predicted = b.op("ArgMax", probabilities, name="predicted", axis=1, keepdims=1)
    pick = b.op(
        "Add",
        b.const("novelty_base", c["novelty_base"], np.int64),
        b.op("Mul", predicted, b.const("novelty_step", c["novelty_step"], np.int64)),
        name="novelty_pick",
    )
    picked = b.op(
        "Reshape",
        b.op("GatherElements", measures, pick, axis=1),
        b.const("shape_picked", [-1, 2, 4], np.int64),
        name="novelty_picked",
    )
    by_space = b.op("Reshape", measures, b.const("shape_measures", [-1, 2, 2 * means], np.int64))
    best = b.op(
        "ReduceMin",
        b.op(
            "Slice",
            by_space,
            b.const("digits_start", [1], np.int64),
            b.const("digits_stop", [means], np.int64),
            b.const("axis_2", [2], np.int64),
            name="digit_residuals",
        ),
        b.const("axis_2b", [2], np.int64),
        name="best_digit_residual",
        keepdims=1,
    )
    novelty = b.op(
        "Reshape",
        b.op("Concat", picked, best, name="novelty_by_space", axis=2),
        b.const("shape_novelty", [-1, 2 * NOVELTY], np.int64),
        name="novelty",
    )
    # --- model evidence
    top = b.op(
        "Min", b.op("ReduceMax", probabilities, one_axis, keepdims=1), b.const("one_2", 1.0), name="top_probability"
    )
    odds = b.op("Div", top, b.op("Sub", b.const("one_plus", 1.0 + 1e-7), top), name="odds")
    # --- the logarithmic features: scaled, floored at 0, + eps, log; the log-odds capped
    logs = b.op("Concat", novelty, ink, mass, roughness, odds, name="log_arguments", axis=1)
    scaled = b.op("Max", b.op("Mul", logs, b.const("log_scale", c["log_scale"])), b.const("zero", 0.0))
    caps = np.full(len(c["log_scale"]), np.inf, np.float32)
    caps[-1] = c["max_logit"]
    logged = b.op(
        "Min",
        b.op("Log", b.op("Add", scaled, b.const("log_eps", c["log_eps"])), name="logs"),
        b.const("log_caps", caps),
        name="log_features",
    )
    soft = b.op("Div", b.op("Sub", lit, ink), b.op("Add", lit, b.const("one_3", 1.0)), name="soft_share")
    frame = b.op(
        "Mul",
        b.op("Sub", frame_sum, b.const("frame_black", c["frame_total"] * c["black"])),
        per_mass,
        name="frame_share",
    )
    clipped = b.op("Max", probabilities, b.const("min_probability", c["min_probability"]), name="clipped")
    log_p = b.op("Log", clipped, name="log_p")
    entropy = b.op("Neg", b.op("ReduceSum", b.op("Mul", clipped, log_p), one_axis, keepdims=1), name="entropy")
    features = b.op("Concat", logged, soft, frame, entropy, name="features", axis=1)
    squared = c["squared"]
    if np.array_equal(squared, np.arange(len(FEATURE_NAMES))):
        squares = b.op("Mul", features, features, name="squares")
    else:
        chosen = b.op("Gather", features, b.const("squared", squared, np.int64), name="squared_features", axis=1)
        squares = b.op("Mul", chosen, chosen, name="squares")
    inputs = b.op(
        "Concat",
        features,
        squares,
        b.columns(projections, 0, c["pixel_components"], "pixel_coordinates"),
        b.columns(hog_projections, 0, c["hog_components"], "hog_coordinates"),
        log_p,
        name="fusion_inputs",
        axis=1,
    )
    # --- the fusion network
    clip = c["input_clip"]
    z = b.op(
        "Clip",
        b.op(
            "Mul", b.op("Sub", inputs, b.const("input_mean", c["input_mean"])), b.const("input_scale", c["input_scale"])
        ),
        b.const("clip_low", -clip),
        b.const("clip_high", clip),
        name="standardized",
    )
    # The network as numpy runs it, with the halved output layer doubled again (exact in binary) and the logistic
    # function as Sigmoid rather than (1 + tanh(t / 2)) / 2: fewer nodes, the same numbers to float32 rounding.
    weights = c["weights"]
    hidden = b.op(
        "Tanh",
        b.op(
            "Add",
            b.op("MatMul", z, b.const("hidden_weights", weights[:, 1:])),
            b.const("hidden_bias", c["hidden_bias"]),
        ),
        name="hidden",
    )
    logit = b.op(
        "Add",
        b.op(
            "Add",
            b.op("MatMul", hidden, b.const("output_weights", 2 * c["output"]), name="hidden_term"),
            b.op("MatMul", z, b.const("linear_weights", 2 * weights[:, 0]), name="linear_term"),
        ),
        b.const("bias", 2 * c["bias"]),
        name="logit",
    )  # (N,): 1-D weights give one value per image
    if c["pixel_network"] is not None:
        logit = b.op(
            "Add",
            b.op("Mul", logit, b.const("feature_weight", c["feature_weight"]), name="fusion_term"),
            b.op("Mul", pixel_network_logit(b, image, c["pixel_network"]), b.const("pixel_weight", c["pixel_weight"])),
            name="fused_logit",
        )
    logit = b.op(
        "Where", b.op("IsNaN", logit), b.const("nan_logit", 2 * c["nan_half_logit"]), logit, name="logit_or_nan"
    )
    b.nodes.append(helper.make_node("Sigmoid", [logit], [DIGIT_SCORE], name=PREFIX + "score"))
    output = helper.make_tensor_value_info(DIGIT_SCORE, TensorProto.FLOAT, [BATCH_AXIS])
    return Subgraph(b.nodes, b.initializers, output)


def pixel_network_logit(b: _Builder, image: str, network: dict[str, Any]) -> str:
    """The pixel network (server/pipeline/pixel_network.py) on `image`: (N,) log-odds of "digit"."""
    x = image
    layers = len(network["conv_weights"])
    for i, (weight, bias) in enumerate(zip(network["conv_weights"], network["conv_biases"], strict=True)):
        pad = weight.shape[-1] // 2
        x = b.op(
            "Relu",
            b.op(
                "Conv",
                x,
                b.const(f"pixel_conv{i}_weight", weight),
                b.const(f"pixel_conv{i}_bias", bias),
                pads=[pad] * 4,
            ),
            name=f"pixel_conv{i}",
        )
        if i < layers - 1:
            x = b.op("MaxPool", x, name=f"pixel_pool{i}", kernel_shape=[2, 2], strides=[2, 2])
    pooled = b.op("Flatten", b.op("GlobalAveragePool", x), name="pixel_pooled", axis=1)
    return b.op(
        "Add",
        b.op("MatMul", pooled, b.const("pixel_head_weight", network["head_weight"])),
        b.const("pixel_head_bias", network["head_bias"]),
        name="pixel_logit",
    )


def has_digit_score(model: Any) -> bool:
    """Whether an onnx.ModelProto has the DIGIT_SCORE output."""
    return any(o.name == DIGIT_SCORE for o in model.graph.output)


def detach(model: Any) -> tuple[Any, Subgraph | None]:
    """(a copy of `model` without the digit score, the subgraph taken out of it, or None if it had none)."""
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = copy.graph
    nodes = [n for n in graph.node if n.name.startswith(PREFIX)]
    initializers = [t for t in graph.initializer if t.name.startswith(PREFIX)]
    outputs = [o for o in graph.output if o.name == DIGIT_SCORE]
    if not (nodes or initializers or outputs):
        return copy, None
    if not (nodes and outputs):
        raise ValueError(
            f"the graph has a partial digit score ({len(nodes)} nodes, outputs {[o.name for o in outputs]})"
        )
    kept_nodes = [n for n in graph.node if not n.name.startswith(PREFIX)]
    kept_initializers = [t for t in graph.initializer if not t.name.startswith(PREFIX)]
    kept_outputs = [o for o in graph.output if o.name != DIGIT_SCORE]
    kept_value_info = [v for v in graph.value_info if not v.name.startswith(PREFIX)]
    taken = Subgraph([_copy(n) for n in nodes], [_copy(t) for t in initializers], _copy(outputs[0]))
    for field, kept in (
        (graph.node, kept_nodes),
        (graph.initializer, kept_initializers),
        (graph.output, kept_outputs),
        (graph.value_info, kept_value_info),
    ):
        items = [_copy(item) for item in kept]
        del field[:]
        field.extend(items)
    return copy, taken


def attach(model: Any, subgraph: Subgraph) -> Any:
    """A copy of `model` (an onnx.ModelProto without the digit score) computing it too, as its last output."""
    import onnx

    if has_digit_score(model):
        raise ValueError(f"the model already has a {DIGIT_SCORE!r} output; detach it first")
    names = {n.name for n in model.graph.node} | {t.name for t in model.graph.initializer}
    clash = sorted(names & ({n.name for n in subgraph.nodes} | {t.name for t in subgraph.initializers}))
    if clash:
        raise ValueError(f"names of the digit score subgraph already used in the model: {clash[:3]}")
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.graph.node.extend(subgraph.nodes)
    copy.graph.initializer.extend(subgraph.initializers)
    copy.graph.output.append(subgraph.output)
    return copy


def without_digit_score(model: Any) -> Any:
    """A copy of `model` as files exported before the digit score were: no output, no threshold in the metadata."""
    from dataclasses import replace

    if has_digit_score(model) and not any(n.name.startswith(PREFIX) for n in model.graph.node):
        classifier = _without_output(model, DIGIT_SCORE)  # the score is the model's own class, not a detector
    else:
        classifier, _ = detach(model)
    if any(p.key.startswith(METADATA_PREFIX) for p in classifier.metadata_props):
        metadata = read_metadata(classifier)
        replace(metadata, output_layout=output_layout(False), digit_threshold=None, digit_detector=None).write_into(
            classifier
        )
    return classifier


def _without_output(model: Any, name: str) -> Any:
    """A copy of `model` without the output `name` and the nodes and initializers nothing else needs."""
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = copy.graph
    outputs = [_copy(o) for o in graph.output if o.name != name]
    del graph.output[:]
    graph.output.extend(outputs)
    while True:
        needed = {o.name for o in graph.output} | {i for n in graph.node for i in n.input}
        kept = [_copy(n) for n in graph.node if any(o in needed for o in n.output)]
        if len(kept) == len(graph.node):
            break
        del graph.node[:]
        graph.node.extend(kept)
    used = {i for n in graph.node for i in n.input}
    initializers = [_copy(t) for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    return copy


def with_digit_score(model: Any, detector: DigitDetector) -> Any:
    """A copy of `model` whose graph also computes `detector`'s score (an earlier digit score is replaced)."""
    classifier, _ = detach(model)
    return attach(classifier, build(detector))


def _copy(message: Any) -> Any:
    duplicate = type(message)()
    duplicate.CopyFrom(message)
    return duplicate
