"""Inference engines behind one protocol; `build_backend` picks one from the configuration.

A new engine is a new module here with a class that satisfies `Backend`, and a line in `ENGINES`.
"""

from __future__ import annotations

from collections.abc import Callable

from server.config import ServeConfig
from server.engine.backends.base import Backend, BackendInfo, BackendOutput, BackendUnavailable


def _onnxruntime(config: ServeConfig) -> Backend:
    from server.engine.backends.onnxruntime_backend import OnnxRuntimeBackend

    return OnnxRuntimeBackend.from_config(config)


def _null(config: ServeConfig) -> Backend:
    from server.engine.backends.null_backend import NullBackend

    return NullBackend.from_config(config)


ENGINES: dict[str, Callable[[ServeConfig], Backend]] = {
    "onnxruntime": _onnxruntime,
    "null": _null,
    "null-threaded": _null,
}


def build_backend(config: ServeConfig) -> Backend:
    """The engine `config.backend` names, built (not yet warmed up) from the rest of the configuration."""
    try:
        factory = ENGINES[config.backend]
    except KeyError:
        raise BackendUnavailable(f"unknown backend {config.backend!r}; choose one of {', '.join(ENGINES)}") from None
    return factory(config)


__all__ = ["ENGINES", "Backend", "BackendInfo", "BackendOutput", "BackendUnavailable", "build_backend"]
