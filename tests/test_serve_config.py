"""server.config: defaults, MNIST_SERVE_* variables, flags, validation, help; and the GPU batch shapes."""

from __future__ import annotations

import os
from dataclasses import fields
from pathlib import Path

import pytest

from server.config import BUNDLED_MODEL, ServeConfig, build_parser, load_config, parse_device_ms


def test_defaults_load_without_flags_or_environment() -> None:
    config = load_config([], environ={})
    assert config == ServeConfig()
    assert (config.port, config.max_batch_size, config.max_queue_delay_ms) == (50051, 0, 0.0)  # 0: by device


def test_the_default_model_is_the_bundled_googlenet() -> None:
    model = Path(load_config([], environ={}).model)
    assert model == BUNDLED_MODEL and model.is_file()
    assert model.parent.name == "bundled" and model.name == "googlenet-fast.onnx"


def test_an_environment_variable_overrides_the_default() -> None:
    config = load_config([], environ={"MNIST_SERVE_PORT": "6000", "MNIST_SERVE_PROVIDER": "cpu"})
    assert (config.port, config.provider) == (6000, "cpu")


def test_a_flag_overrides_the_environment_variable() -> None:
    config = load_config(["--port", "7000", "--provider", "cuda"], environ={"MNIST_SERVE_PORT": "6000"})
    assert (config.port, config.provider) == (7000, "cuda")


def test_environment_values_are_converted_to_the_field_type() -> None:
    config = load_config([], environ={"MNIST_SERVE_MAX_QUEUE_DELAY_MS": "0.5", "MNIST_SERVE_PREPROCESS_WORKERS": "8"})
    assert config.max_queue_delay_ms == 0.5 and isinstance(config.max_queue_delay_ms, float)
    assert config.preprocess_workers == 8 and isinstance(config.preprocess_workers, int)


def test_the_process_environment_is_read_when_none_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [name for name in os.environ if name.startswith("MNIST_SERVE_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("MNIST_SERVE_METRICS_PORT", "9191")
    assert load_config([]).metrics_port == 9191


def test_variables_without_the_prefix_are_ignored() -> None:
    assert load_config([], environ={"PORT": "1", "MNIST_PORT": "2"}).port == 50051


@pytest.mark.parametrize(("variable", "value"), [("MNIST_SERVE_PORT", "abc"), ("MNIST_SERVE_DRAIN_SECONDS", "soon")])
def test_a_malformed_environment_value_exits_naming_the_variable(variable: str, value: str) -> None:
    with pytest.raises(SystemExit, match=f"{variable}='{value}'"):
        load_config([], environ={variable: value})


def test_a_malformed_flag_value_exits(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        load_config(["--port", "abc"], environ={})
    assert "--port" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "environ", "problem"),
    [
        (["--max-batch-size", "-1"], {}, "max_batch_size must not be negative"),
        ([], {"MNIST_SERVE_MAX_BATCH_SIZE": "-2"}, "max_batch_size must not be negative"),
        (["--provider", "tpu"], {}, "provider must be one of auto, cuda, cpu, not 'tpu'"),
        (["--model", "/nonexistent/model.onnx"], {}, "model file /nonexistent/model.onnx does not exist"),
        (["--max-request-images", "65", "--max-queue-size", "64"], {}, "max_request_images cannot exceed"),
        (["--max-queue-delay-ms", "-1"], {}, "max_queue_delay_ms must not be negative"),
        (["--backend", "tensorrt"], {}, "backend must be one of onnxruntime, null, null-threaded"),
        (["--precision", "int8"], {}, "precision must be one of auto, fp32, fp16"),
        (["--batch-buckets", "1,x"], {}, "batch buckets must be comma-separated whole numbers"),
        (["--batch-buckets", "0,8"], {}, "batch buckets must be at least 1"),
        (["--batch-buckets", "8,64", "--max-batch-size", "32"], {}, "max_batch_size 32 is under the largest batch"),
        (["--backend", "null-threaded", "--null-device-ms", "2ms"], {}, "null_device_ms must look like FIXED"),
        (["--backend", "null-threaded", "--null-device-ms", "1+-4"], {}, "two non-negative numbers"),
        (["--backend", "null", "--null-device-ms", "1+4"], {}, "null_device_ms needs --backend null-threaded"),
        (["--ort-spinning", "always"], {}, "ort_spinning must be one of auto, on, run, off"),
        (["--liveness-stall-seconds", "0"], {}, "liveness_stall_seconds must be > 0"),
    ],
    ids=[
        "batch-size-flag",
        "batch-size-env",
        "provider",
        "missing-model",
        "request-over-queue",
        "negative-delay",
        "backend",
        "precision",
        "bucket-not-a-number",
        "bucket-zero",
        "max-under-largest-bucket",
        "device-ms-unit",
        "device-ms-negative",
        "device-ms-on-the-loop",
        "spinning",
        "liveness-stall",
    ],
)
def test_an_invalid_setting_exits_naming_the_problem(flags: list[str], environ: dict[str, str], problem: str) -> None:
    with pytest.raises(SystemExit, match="invalid configuration: .*" + problem):
        load_config(flags, environ=environ)


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(SystemExit) as raised:
        load_config(["--max-batch-size", "-1", "--provider", "tpu"], environ={})
    assert "max_batch_size" in str(raised.value) and "provider" in str(raised.value)


def test_a_request_limit_equal_to_the_queue_size_is_accepted() -> None:
    assert load_config(["--max-request-images", "64", "--max-queue-size", "64"], environ={}).max_request_images == 64


def test_help_names_every_flag_and_its_environment_variable() -> None:
    text = " ".join(build_parser().format_help().split())
    for field in fields(ServeConfig):
        assert f"--{field.name.replace('_', '-')} " in text
        assert f"MNIST_SERVE_{field.name.upper()};" in text


def test_choices_are_matched_whatever_their_case() -> None:
    config = load_config(["--layout", "NHWC", "--log-level", "debug", "--cudnn-conv-algo-search", "heuristic"], {})
    assert (config.layout, config.log_level, config.cudnn_conv_algo_search) == ("nhwc", "DEBUG", "HEURISTIC")


def test_the_null_backend_needs_no_model_file() -> None:
    assert load_config(["--backend", "null", "--model", "/nonexistent.onnx"], environ={}).backend == "null"


@pytest.mark.parametrize(
    ("text", "parsed"), [("0+0", (0.0, 0.0)), ("2", (2.0, 0.0)), ("1+4", (1.0, 4.0)), ("0.5 + 0.25", (0.5, 0.25))]
)
def test_emulated_device_time_reads_as_fixed_plus_per_image_milliseconds(text: str, parsed: tuple) -> None:
    assert parse_device_ms(text) == parsed
    assert load_config(["--backend", "null-threaded", "--null-device-ms", text], environ={}).null_device_ms == text
