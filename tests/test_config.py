"""ServeConfig: defaults, MNIST_SERVE_* variables, flags, validation and help."""

from __future__ import annotations

from dataclasses import fields

import pytest

from server.config import BUNDLED_MODEL, ServeConfig, build_parser, load_config
from server.runtime import batch_shapes


def test_defaults_serve_the_bundled_model() -> None:
    config = load_config([], environ={})
    assert config == ServeConfig() and config.model == str(BUNDLED_MODEL) and config.port == 50051


def test_flags_override_environment_which_overrides_defaults() -> None:
    env = {"MNIST_SERVE_PORT": "6000", "MNIST_SERVE_MAX_QUEUE_DELAY_MS": "0.5", "MNIST_SERVE_PROVIDER": "cpu"}
    config = load_config(["--port", "7000"], environ=env)
    assert (config.port, config.max_queue_delay_ms, config.provider) == (7000, 0.5, "cpu")


def test_a_malformed_environment_value_names_the_variable() -> None:
    with pytest.raises(SystemExit, match="MNIST_SERVE_PORT='abc' is not a valid int"):
        load_config([], environ={"MNIST_SERVE_PORT": "abc"})


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max-batch-size", "0"], "max_batch_size must be at least 1"),
        (["--provider", "tpu"], "provider must be auto, cuda or cpu"),
        (["--model", "/no/such.onnx"], "/no/such.onnx does not exist"),
        (["--max-request-images", "100", "--max-queue-size", "10"], "cannot exceed max_queue_size"),
        (["--drain-seconds", "-1"], "drain_seconds must not be negative"),
    ],
)
def test_invalid_settings_are_refused_with_the_reason(flags: list[str], message: str) -> None:
    with pytest.raises(SystemExit, match=message):
        load_config(flags, environ={})


def test_help_names_every_flag_and_its_environment_variable() -> None:
    text = " ".join(build_parser().format_help().split())
    for field in fields(ServeConfig):
        assert "--" + field.name.replace("_", "-") in text
        assert "MNIST_SERVE_" + field.name.upper() in text


def test_gpu_batch_shapes_are_powers_of_two_capped_by_the_maximum() -> None:
    assert batch_shapes(32) == [1, 2, 4, 8, 16, 32]
    assert batch_shapes(24) == [1, 2, 4, 8, 16, 24]
    assert batch_shapes(1) == [1]
