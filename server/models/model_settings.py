"""A model's own serving settings, from its `config.pbtxt` in the repository; the server's flags are the defaults.

Triton's model configuration says how each model is batched and where it runs, and `mnist-export --publish`
(export/triton.py) writes one beside every model. What this server takes from it:

| config.pbtxt                                             | setting (the flag it overrides for this model) |
| -------------------------------------------------------- | ---------------------------------------------- |
| `max_batch_size: N` (N > 0)                              | `--max-batch-size`                             |
| `dynamic_batching { max_queue_delay_microseconds: U }`   | `--max-queue-delay-ms` (U / 1000)              |
| `instance_group [ { kind: KIND_CPU } ]`                  | `--provider cpu` (KIND_GPU: the flag decides;  |
|                                                          | one engine per version, whatever `count` says) |
| `parameters { key: "batch_buckets" ... }`                | `--batch-buckets` (e.g. "1,8,32,256")          |
| `parameters { key: "precision" ... }`                    | `--precision` (auto, fp32, fp16)               |
| `parameters { key: "layout" ... }`                       | `--layout` (auto, nchw, nhwc)                  |
| `parameters { key: "cuda_graph" ... }`                   | `--cuda-graph` (auto, on, off)                 |
| `parameters { key: "queue_target_ms" ... }`              | `--queue-target-ms` (auto, off, or ms)         |
| `parameters { key: "cudnn_conv_algo_search" ... }`       | `--cudnn-conv-algo-search` (0, 1, 2 or the names)|

cudnn_conv_algo_search takes 0, 1, 2 as Triton's ONNX Runtime backend reads them. Anything else in the
file is Triton's and is left alone. A value out of range is a problem of that model (its versions are
FAILED, saying which value), never of the whole server. Changed settings load the model's versions again.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from proto.inference import model_config_pb2
from server.config import CHOICES, ServeConfig, batching_problems, parse_buckets, parse_queue_target

# Triton's ONNX Runtime backend reads cudnn_conv_algo_search as a number.
CUDNN_SEARCH_NUMBERS = {"0": "EXHAUSTIVE", "1": "HEURISTIC", "2": "DEFAULT"}
PARAMETERS = ("batch_buckets", "precision", "layout", "cuda_graph", "queue_target_ms", "cudnn_conv_algo_search")


@dataclass(frozen=True)
class ModelSettings:
    """The settings one model's config.pbtxt gives; None: the server's flag (ServeConfig field of the same name)."""

    max_batch_size: int | None = None
    max_queue_delay_ms: float | None = None
    provider: str | None = None
    batch_buckets: str | None = None
    precision: str | None = None
    layout: str | None = None
    cuda_graph: str | None = None
    queue_target_ms: str | None = None
    cudnn_conv_algo_search: str | None = None

    def overrides(self) -> dict[str, Any]:
        """The ServeConfig fields this model sets."""
        return {name: value for name, value in asdict(self).items() if value is not None}

    def applied_to(self, config: ServeConfig) -> ServeConfig:
        """`config` with this model's settings in place of the flags."""
        return replace(config, **self.overrides())

    def describe(self) -> str:
        return ", ".join(f"{name} {value}" for name, value in self.overrides().items()) or "the server's flags"


def settings_from(config: model_config_pb2.ModelConfig) -> ModelSettings:
    """The settings in a parsed config.pbtxt; ValueError naming the first value this server cannot use."""
    found: dict[str, Any] = {}
    if config.max_batch_size < 0:
        raise ValueError(f"max_batch_size must not be negative, not {config.max_batch_size}")
    if config.max_batch_size > 0:
        found["max_batch_size"] = int(config.max_batch_size)
    if config.HasField("dynamic_batching"):
        found["max_queue_delay_ms"] = config.dynamic_batching.max_queue_delay_microseconds / 1000
    kinds = {group.kind for group in config.instance_group}
    if kinds == {model_config_pb2.ModelInstanceGroup.KIND_CPU}:
        found["provider"] = "cpu"
    for key in PARAMETERS:
        if key in config.parameters:
            found[key] = _parameter(key, config.parameters[key].string_value.strip())
    return ModelSettings(**found)


def _parameter(key: str, value: str) -> str:
    if key == "batch_buckets":
        if value.lower() not in ("auto", "none"):
            parse_buckets(value)  # ValueError naming what is wrong
        return value.lower() if value.lower() in ("auto", "none") else value
    if key == "queue_target_ms":
        parse_queue_target(value)
        return value
    if key == "cudnn_conv_algo_search":
        value = CUDNN_SEARCH_NUMBERS.get(value, value.upper())
    else:
        value = value.lower()
    if value not in CHOICES[key]:
        raise ValueError(f"parameter {key} must be one of {', '.join(CHOICES[key])}, not {value!r}")
    return value


def check_against(settings: ModelSettings, config: ServeConfig) -> None:
    """ValueError if the settings cannot work together with the server's (a batch bucket over the largest batch)."""
    problems = batching_problems(settings.applied_to(config))
    if problems:
        raise ValueError("; ".join(problems))
