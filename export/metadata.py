"""The model's self-description, stored as ONNX `metadata_props` (string key -> string value).

Kept free of heavy imports: the server reads the same keys through ONNX Runtime's
`custom_metadata_map` with `ModelMetadata.from_props`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any

PREFIX = "mnist."


@dataclass(frozen=True)
class ModelMetadata:
    model_name: str
    model_version: str
    class_labels: list[str]
    normalization: dict[str, Any]  # {"scale", "mean", "std"}: input = (pixel * scale - mean) / std
    input_layout: str
    output_layout: str
    test_accuracy: float
    test_images: int
    checkpoint_sha256: str
    opset: int
    exported_with: str

    def to_props(self) -> dict[str, str]:
        return {PREFIX + k: v if isinstance(v, str) else json.dumps(v) for k, v in asdict(self).items()}

    @classmethod
    def from_props(cls, props: dict[str, str]) -> ModelMetadata:
        """Parse metadata written by `to_props`; a missing key is named in the error."""
        values: dict[str, Any] = {}
        for field in fields(cls):
            key = PREFIX + field.name
            if key not in props:
                raise ValueError(f"model metadata lacks {key!r}; was the model written by mnist-export?")
            values[field.name] = props[key] if field.type == "str" else json.loads(props[key])
        return cls(**values)

    def write_into(self, model_proto: Any) -> None:
        """Replace this metadata's keys in an `onnx.ModelProto`; other props are kept."""
        props = self.to_props()
        kept = [p for p in model_proto.metadata_props if p.key not in props]
        del model_proto.metadata_props[:]
        model_proto.metadata_props.extend(kept)
        for key, value in props.items():
            entry = model_proto.metadata_props.add()
            entry.key, entry.value = key, value
        model_proto.doc_string = f"{self.model_name} {self.model_version}: MNIST digit classifier (GoogLeNet)"


def read_metadata(model_proto: Any) -> ModelMetadata:
    return ModelMetadata.from_props({p.key: p.value for p in model_proto.metadata_props})
