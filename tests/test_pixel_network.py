"""The digit detector's pixel network: fitted in PyTorch, served in numpy and in the model's graph, the same numbers.

A small network is fitted for a few steps on synthetic data here (no MNIST needed); the bundled detector's own
network is held to the graph by tests/test_digit_score_graph.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from export.digit_score_graph import _Builder, pixel_network_logit, with_digit_score
from proto.contract import DIGIT_SCORE, INPUT_NAME
from server.config import BUNDLED_MODEL, DIGIT_DETECTOR
from server.pipeline import pixel_network
from server.pipeline.digit_detector import DigitDetector, DigitDetectorError
from server.pipeline.pixel_network import PixelNetwork
from training.fit_digit_detector import choose_pixel_weight, strictest_quantile, weighted_quantile
from training.pixel_network import PixelCNN, fit, fold


def _bundled_params() -> dict[str, np.ndarray]:
    with np.load(DIGIT_DETECTOR, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def _trained_looking_cnn(seed: int = 0) -> PixelCNN:
    """A network in eval mode whose batch normalizations hold non-trivial statistics, as after fitting."""
    torch.manual_seed(seed)
    model = PixelCNN()
    for module in model:
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def _inputs(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, 1.0, (n, 1, 28, 28)).astype(np.float32)


def test_numpy_network_computes_what_the_fitted_torch_network_does() -> None:
    model = _trained_looking_cnn()
    x = _inputs(40)
    with torch.no_grad():
        reference = model(torch.from_numpy(x)).reshape(-1).numpy()
    problems: list[str] = []
    network = PixelNetwork(fold(model), problems)
    assert problems == []
    np.testing.assert_allclose(network.logits(x), reference, atol=2e-4)  # convolutions kept in float16
    np.testing.assert_allclose(network.logits(x[7:8]), network.logits(x)[7:8], atol=1e-6)  # alone as in a batch
    channels = sum(m.num_features for m in model if isinstance(m, torch.nn.BatchNorm2d))
    # folding turns each normalization's scale and shift into the convolution's bias
    assert network.parameters == sum(p.numel() for p in model.parameters()) - channels


def _with_network(model: PixelCNN, weights: tuple[float, float]) -> dict[str, np.ndarray]:
    params = {key: value for key, value in _bundled_params().items() if not key.startswith(pixel_network.PREFIX)}
    params.update(fold(model))
    params["fusion_weights"] = np.array(weights, np.float32)
    return params


def test_the_score_adds_the_networks_log_odds_with_their_weights() -> None:
    fusion_only = {k: v for k, v in _bundled_params().items() if not k.startswith(pixel_network.PREFIX)}
    fusion_only.pop("fusion_weights", None)
    plain = DigitDetector(fusion_only)
    model = _trained_looking_cnn()
    fused = DigitDetector(_with_network(model, (0.04, 0.06)))
    x = _inputs(12)
    p = np.full((12, 10), 0.1, np.float32)
    fusion_logit = 2 * plain._half_logits(plain.raw_inputs(x, p)).astype(np.float64)
    with torch.no_grad():
        pixel_logit = model(torch.from_numpy(x)).reshape(-1).numpy()
    expected = 1 / (1 + np.exp(-(0.04 * fusion_logit + 0.06 * pixel_logit)))
    assert 0.01 < expected.std()  # not all saturated: the weights are seen
    np.testing.assert_allclose(fused.score(x, p), expected, atol=1e-4)


def test_the_pixel_subgraph_computes_the_numpy_network() -> None:
    """The network's own log-odds, node for node: a kernel flipped or transposed moves them far beyond the tolerance
    (the score itself, squashed near 0 or 1 on noise, would hide it)."""
    params = fold(_trained_looking_cnn(3))
    params[f"{pixel_network.PREFIX}head_weight"] = params[f"{pixel_network.PREFIX}head_weight"] * 50  # spread out
    network = PixelNetwork(params, [])
    builder = _Builder()
    logit = pixel_network_logit(builder, INPUT_NAME, network.graph_constants())
    graph = onnx.helper.make_graph(
        builder.nodes,
        "pixel_network",
        [onnx.helper.make_tensor_value_info(INPUT_NAME, onnx.TensorProto.FLOAT, ["N", 1, 28, 28])],
        [onnx.helper.make_tensor_value_info(logit, onnx.TensorProto.FLOAT, ["N"])],
        builder.initializers,
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)], ir_version=9)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = _inputs(16)
    expected = network.logits(x)
    assert expected.std() > 0.1  # the check below can see a wrong kernel
    np.testing.assert_allclose(session.run(None, {INPUT_NAME: x})[0], expected, atol=1e-4)


def test_the_graph_computes_the_numpy_score_with_a_pixel_network() -> None:
    detector = DigitDetector(_with_network(_trained_looking_cnn(3), (0.3, 0.7)))
    proto = with_digit_score(onnx.load(str(BUNDLED_MODEL)), detector)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.concatenate([_inputs(16), np.full((1, 1, 28, 28), np.nan, np.float32)])
    probabilities, scores = session.run(["probabilities", DIGIT_SCORE], {INPUT_NAME: x})
    np.testing.assert_allclose(scores, detector.score(x, probabilities), atol=2e-4)
    assert scores[-1] < detector.threshold  # NaN is not a digit, with the network too


def test_a_file_without_a_pixel_network_scores_with_the_fusion_alone(tmp_path: Path) -> None:
    params = {k: v for k, v in _bundled_params().items() if not k.startswith(pixel_network.PREFIX)}
    params.pop("fusion_weights", None)
    params["format_version"] = np.int64(2)
    path = tmp_path / "version2.npz"
    np.savez(path, **params)
    detector = DigitDetector.load(path)
    assert detector.pixel_network is None and detector.describe()["pixel_network"] is None
    x, p = _inputs(5), np.full((5, 10), 0.1, np.float32)
    half = detector._half_logits(detector.raw_inputs(x, p))
    np.testing.assert_allclose(detector.score(x, p), 1 / (1 + np.exp(-2 * half)), atol=1e-6)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda p: p.pop(f"{pixel_network.PREFIX}head_bias"), r"partial pixel network: pixel_net_head_bias missing"),
        (lambda p: p.update({f"{pixel_network.PREFIX}conv1_weight": np.zeros((48, 3, 3, 3))}), r"conv1_weight has"),
        (lambda p: p.update({f"{pixel_network.PREFIX}head_weight": np.zeros(5)}), r"head_weight has shape \(5,\)"),
        (lambda p: p.update(fusion_weights=np.array([1.0, np.nan])), r"fusion_weights must be two finite numbers"),
        (lambda p: p.update(fusion_weights=np.array([1.0, -0.5])), r"fusion_weights must be two finite numbers >= 0"),
        (lambda p: p.pop("fusion_weights"), r"fusion_weights must be .* beside a pixel network, not \[\]"),
    ],
)
def test_a_damaged_pixel_network_is_refused_with_the_reason(tmp_path: Path, change, message: str) -> None:
    params = _with_network(_trained_looking_cnn(), (0.5, 0.5))
    change(params)
    path = tmp_path / "edited.npz"
    np.savez(path, **params)
    with pytest.raises(DigitDetectorError, match=r"edited\.npz.*" + message):
        DigitDetector.load(path)


def test_fitting_learns_to_tell_blobs_from_stripes_and_its_folded_weights_still_do() -> None:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:28, :28]
    blobs = [np.exp(-((yy - 14 + dy) ** 2 + (xx - 14 + dx) ** 2) / 30.0) for dy, dx in rng.integers(-3, 4, (300, 2))]
    stripes = [(np.sin(xx / p + phase) > 0).astype(float) for p, phase in rng.uniform(1, 3, (300, 2))]
    x = (np.stack(blobs + stripes)[:, None] * 2 - 0.5).astype(np.float32)
    y = np.r_[np.ones(300), np.zeros(300)]
    result = fit(x, y, np.ones(600), seed=0, epochs=3, log=lambda message: None)
    problems: list[str] = []
    logits = PixelNetwork(result.params, problems).logits(x)
    assert problems == [] and np.isfinite(result.final_loss)
    assert (logits[:300] > 0).mean() > 0.95 and (logits[300:] < 0).mean() > 0.95


def test_the_pixel_weight_is_chosen_where_fitted_kinds_are_caught_most() -> None:
    """Digits: fusion ~N(3, 4), network ~N(3, 1). Non-digits: the fusion cannot tell them (~N(3, 4)), the network can
    (~N(-3, 1)): most of the weight on the network catches the most at 1% of digits flagged."""
    rng = np.random.default_rng(0)
    digits = [(rng.normal(3, 4, 2000), rng.normal(3, 1, 2000))]
    others = [(rng.normal(3, 4, 500), rng.normal(-3, 1, 500))]
    share, grid = choose_pixel_weight(digits, others)
    catches = {row["pixel_weight"]: row["catch_fitted_kinds"] for row in grid}
    assert share >= 0.8
    assert catches[0.0] < 0.05 and catches[share] > 0.9


def test_the_threshold_flags_at_most_1_percent_of_every_set_of_digits_not_of_their_average() -> None:
    """Two sets of threshold digits, one scored much lower (other hands): the threshold answers to that set, so it
    flags 1% of it and less of the other; the average of the two would flag about 2% of the harder one."""
    rng = np.random.default_rng(0)
    easy, hard = rng.normal(5, 1, 5000), rng.normal(2, 1, 1000)
    threshold = strictest_quantile([easy, hard], 0.01)
    assert np.mean(hard < threshold) <= 0.01 and np.mean(easy < threshold) < 0.001
    assert np.mean(hard < weighted_quantile([easy, hard], 0.01)) > 0.015
