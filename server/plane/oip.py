"""The Open Inference Protocol (KServe v2, as Triton speaks it), transport-free: tensors in, tensors out.

The protocol's tensors and their checks, shared by its two transports: gRPC `inference.GRPCInferenceService`
(server/transport/oip_grpc.py) and HTTP/REST `/v2/...` (server/transport/rest.py), both over the one data plane
(server/plane/data_plane.py), which turns a request's tensors into images for the same model pipeline and
batch queue as `mnist.v1` and the predictions back into tensors. The model takes one input and gives
two outputs:

- `image`: FP32 [N, 1, 28, 28] normalized as in training ((pixel / 255 - 0.1307) / 0.3081), or UINT8
  [N, 28, 28] (or [N, 1, 28, 28]) raw pixels, light digit on dark, which the server normalizes, or BYTES
  [N]: encoded images (PNG, JPEG, ...) of any size, prepared exactly as `mnist.v1`'s `encoded` images
  (the web page sends its drawing this way).
- `probabilities`: FP32 [N, 10], index = digit; `digit`: INT64 [N], the most probable digit.

Failures are domain errors (server/errors.py): each transport maps them to its own status codes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from proto.contract import IMAGE_SIDE, INPUT_NAME, INPUT_SHAPE, MNIST_NORMALIZATION, PROBABILITIES
from server.errors import InvalidInput

DIGIT = "digit"
OUTPUTS = (PROBABILITIES, DIGIT)
SERVER_NAME = "mnist-googlenet-service"
PLATFORM = "onnxruntime_onnx"  # what Triton calls an ONNX model served by ONNX Runtime
EXTENSIONS = ("model_configuration", "statistics", "binary_tensor_data")
# The protocol's datatype names and the numpy types they travel as (little-endian on the wire).
DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
IMAGE_DTYPES = ("FP32", "UINT8", "BYTES")
LENGTH_PREFIX = 4  # BYTES elements as raw data: each a little-endian uint32 length, then that many bytes
# Normalized pixels lie in [low, high]; a little slack for clients that normalize in another precision.
_LOW = float(MNIST_NORMALIZATION.apply(np.zeros(1))[0])
_HIGH = float(MNIST_NORMALIZATION.apply(np.full(1, 255))[0])
NORMALIZED_SLACK = 0.05


@dataclass(frozen=True)
class Tensor:
    """One named tensor of a request or response, whatever the transport."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray  # flat or shaped; `shape` is what the client declared


def tensor_from_bytes(name: str, datatype: str, shape: Sequence[int], raw: bytes) -> Tensor:
    """A tensor sent as raw little-endian bytes (gRPC raw_input_contents, HTTP binary data)."""
    count = _element_count(name, shape)
    if datatype == "BYTES":
        return Tensor(name, datatype, tuple(shape), _bytes_elements(name, raw, count))
    dtype = _dtype(name, datatype)
    if len(raw) != count * dtype.itemsize:
        raise InvalidInput(
            f"input '{name}': {len(raw)} bytes of data for shape {list(shape)} of {datatype}, which needs "
            f"{count * dtype.itemsize}"
        )
    return Tensor(name, datatype, tuple(shape), np.frombuffer(raw, dtype))


def tensor_from_values(name: str, datatype: str, shape: Sequence[int], values: Sequence | np.ndarray) -> Tensor:
    """A tensor sent as typed values (gRPC `contents`, JSON `data`, flat or nested)."""
    count = _element_count(name, shape)
    if datatype == "BYTES":
        elements = list(values)
        if not all(isinstance(element, bytes) for element in elements):
            raise InvalidInput(
                f"input '{name}': BYTES (encoded images) travel as binary data, not JSON text; use the binary tensor "
                "extension (binary_data_size) over HTTP, or bytes_contents / raw_input_contents over gRPC"
            )
        if len(elements) != count:
            raise InvalidInput(f"input '{name}': {len(elements)} elements for shape {list(shape)}, which needs {count}")
        return Tensor(name, datatype, tuple(shape), _object_array(elements))
    dtype = _dtype(name, datatype)
    try:
        given = np.asarray(values)
        if dtype.kind in "iu" and given.size:  # integers must be whole and in range, not wrapped or truncated
            if given.dtype.kind not in "iub" and not (given.dtype.kind == "f" and np.all(given == np.round(given))):
                raise ValueError
            limits = np.iinfo(dtype)
            if given.min() < limits.min or given.max() > limits.max:
                raise InvalidInput(
                    f"input '{name}': {datatype} values must lie in {limits.min}..{limits.max}; got "
                    f"{given.min()}..{given.max()}"
                )
        data = given.astype(dtype).reshape(-1)
    except (ValueError, TypeError, OverflowError):
        raise InvalidInput(f"input '{name}': data is not a list of {datatype} numbers") from None
    if data.size != count:
        raise InvalidInput(f"input '{name}': {data.size} values for shape {list(shape)}, which needs {count}")
    return Tensor(name, datatype, tuple(shape), data)


def _bytes_elements(name: str, raw: bytes, count: int) -> np.ndarray:
    """Length-prefixed BYTES elements -> an object array of bytes."""
    elements, at = [], 0
    while at < len(raw):
        if at + LENGTH_PREFIX > len(raw):
            raise InvalidInput(f"input '{name}': BYTES data ends inside an element's 4-byte length")
        size = int.from_bytes(raw[at : at + LENGTH_PREFIX], "little")
        at += LENGTH_PREFIX
        if at + size > len(raw):
            raise InvalidInput(f"input '{name}': a BYTES element of {size} bytes runs past the end of the data")
        elements.append(raw[at : at + size])
        at += size
    if len(elements) != count:
        raise InvalidInput(f"input '{name}': {len(elements)} BYTES elements for a shape that needs {count}")
    return _object_array(elements)


def _object_array(elements: list[bytes]) -> np.ndarray:
    array = np.empty(len(elements), object)
    array[:] = elements
    return array


def _dtype(name: str, datatype: str) -> np.dtype:
    if not isinstance(datatype, str) or datatype not in DTYPES:
        raise InvalidInput(f"input '{name}': unknown datatype {datatype!r}; this model takes FP32, UINT8 or BYTES")
    return DTYPES[datatype]


MAX_ELEMENTS = 1 << 31  # no tensor this model takes comes near it; beyond, a shape is nonsense (or an overflow)


def _element_count(name: str, shape: Sequence[int]) -> int:
    if not shape or any(not isinstance(d, int) or isinstance(d, bool) or d < 0 for d in shape):
        raise InvalidInput(f"input '{name}': shape {list(shape)} must be a list of non-negative whole numbers")
    count = math.prod(shape)  # Python integers: no overflow
    if count > MAX_ELEMENTS:
        raise InvalidInput(f"input '{name}': shape {list(shape)} holds {count:,} elements, far more than any request")
    return count


def images_from(tensor: Tensor, max_images: int) -> np.ndarray:
    """The `image` input -> (N, 1, 28, 28) uint8 pixels or float32 normalized input checked to be in range, or
    (N,) encoded images (an object array of bytes)."""
    if tensor.name != INPUT_NAME:
        raise InvalidInput(f"unknown input '{tensor.name}'; this model takes one input, '{INPUT_NAME}'")
    if tensor.datatype not in IMAGE_DTYPES:
        raise InvalidInput(
            f"input '{INPUT_NAME}' must be FP32 (normalized), UINT8 (raw pixels) or BYTES (encoded images), not "
            f"{tensor.datatype}"
        )
    shape = tensor.shape
    if tensor.datatype == "BYTES":
        if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)):
            raise InvalidInput(f"BYTES '{INPUT_NAME}' has shape {list(shape)}; send [N] (or [N, 1]) encoded images")
        if shape[0] < 1 or shape[0] > max_images:
            raise InvalidInput(f"input '{INPUT_NAME}' holds {shape[0]} images; send 1 to {max_images} per request")
        return tensor.data.reshape(-1)
    if not (len(shape) in (3, 4) and shape[-2:] == (IMAGE_SIDE, IMAGE_SIDE) and (len(shape) == 3 or shape[1] == 1)):
        raise InvalidInput(
            f"input '{INPUT_NAME}' has shape {list(shape)}; send [N, 1, {IMAGE_SIDE}, {IMAGE_SIDE}] or "
            f"[N, {IMAGE_SIDE}, {IMAGE_SIDE}]"
        )
    if shape[0] < 1 or shape[0] > max_images:
        raise InvalidInput(f"input '{INPUT_NAME}' holds {shape[0]} images; send 1 to {max_images} per request")
    images = tensor.data.reshape(shape[0], *INPUT_SHAPE)
    if tensor.datatype == "UINT8":
        return np.ascontiguousarray(images, np.uint8)
    images = np.ascontiguousarray(images, np.float32)
    low, high = float(images.min()), float(images.max())
    if not (np.isfinite(low) and np.isfinite(high)) or low < _LOW - NORMALIZED_SLACK or high > _HIGH + NORMALIZED_SLACK:
        raise InvalidInput(
            f"FP32 '{INPUT_NAME}' must be normalized as (pixel / 255 - {MNIST_NORMALIZATION.mean}) / "
            f"{MNIST_NORMALIZATION.std}, within [{_LOW:.4f}, {_HIGH:.4f}]; got values from {low:g} to {high:g}. "
            "Send UINT8 raw pixels to have the server normalize them"
        )
    return images
