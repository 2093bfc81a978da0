from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ClassifyRequest(_message.Message):
    __slots__ = ("encoded", "raw", "request_id", "model_name", "model_version")
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    encoded: bytes
    raw: bytes
    request_id: str
    model_name: str
    model_version: str
    def __init__(self, encoded: _Optional[bytes] = ..., raw: _Optional[bytes] = ..., request_id: _Optional[str] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ...) -> None: ...

class ClassifyResponse(_message.Message):
    __slots__ = ("digit", "confidence", "probabilities", "model_version", "request_id", "digit_score", "is_digit")
    DIGIT_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DIGIT_SCORE_FIELD_NUMBER: _ClassVar[int]
    IS_DIGIT_FIELD_NUMBER: _ClassVar[int]
    digit: int
    confidence: float
    probabilities: _containers.RepeatedScalarFieldContainer[float]
    model_version: str
    request_id: str
    digit_score: float
    is_digit: bool
    def __init__(self, digit: _Optional[int] = ..., confidence: _Optional[float] = ..., probabilities: _Optional[_Iterable[float]] = ..., model_version: _Optional[str] = ..., request_id: _Optional[str] = ..., digit_score: _Optional[float] = ..., is_digit: _Optional[bool] = ...) -> None: ...

class ClassifyBatchRequest(_message.Message):
    __slots__ = ("requests", "model_name", "model_version")
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[ClassifyRequest]
    model_name: str
    model_version: str
    def __init__(self, requests: _Optional[_Iterable[_Union[ClassifyRequest, _Mapping]]] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ...) -> None: ...

class ClassifyBatchResponse(_message.Message):
    __slots__ = ("responses",)
    RESPONSES_FIELD_NUMBER: _ClassVar[int]
    responses: _containers.RepeatedCompositeFieldContainer[ClassifyResponse]
    def __init__(self, responses: _Optional[_Iterable[_Union[ClassifyResponse, _Mapping]]] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ("model_name", "model_version")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_version: str
    def __init__(self, model_name: _Optional[str] = ..., model_version: _Optional[str] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelVersionStatus(_message.Message):
    __slots__ = ("name", "version", "state", "reason", "is_default", "load_seconds")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    IS_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    state: str
    reason: str
    is_default: bool
    load_seconds: float
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., state: _Optional[str] = ..., reason: _Optional[str] = ..., is_default: _Optional[bool] = ..., load_seconds: _Optional[float] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "default_model")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MODEL_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelVersionStatus]
    default_model: str
    def __init__(self, models: _Optional[_Iterable[_Union[ModelVersionStatus, _Mapping]]] = ..., default_model: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "version", "sha256", "providers", "max_batch_size", "test_accuracy", "backend", "precision", "layout", "batch_buckets", "cuda_graph", "device", "runtime", "engine_options", "digit_threshold", "digit_detector")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    PROVIDERS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    TEST_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    BATCH_BUCKETS_FIELD_NUMBER: _ClassVar[int]
    CUDA_GRAPH_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_FIELD_NUMBER: _ClassVar[int]
    ENGINE_OPTIONS_FIELD_NUMBER: _ClassVar[int]
    DIGIT_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    DIGIT_DETECTOR_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    sha256: str
    providers: _containers.RepeatedScalarFieldContainer[str]
    max_batch_size: int
    test_accuracy: float
    backend: str
    precision: str
    layout: str
    batch_buckets: _containers.RepeatedScalarFieldContainer[int]
    cuda_graph: bool
    device: str
    runtime: str
    engine_options: _containers.RepeatedScalarFieldContainer[str]
    digit_threshold: float
    digit_detector: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., sha256: _Optional[str] = ..., providers: _Optional[_Iterable[str]] = ..., max_batch_size: _Optional[int] = ..., test_accuracy: _Optional[float] = ..., backend: _Optional[str] = ..., precision: _Optional[str] = ..., layout: _Optional[str] = ..., batch_buckets: _Optional[_Iterable[int]] = ..., cuda_graph: _Optional[bool] = ..., device: _Optional[str] = ..., runtime: _Optional[str] = ..., engine_options: _Optional[_Iterable[str]] = ..., digit_threshold: _Optional[float] = ..., digit_detector: _Optional[str] = ...) -> None: ...

class ReadDigitsRequest(_message.Message):
    __slots__ = ("image", "expected_digits", "request_id", "model_name", "model_version")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_DIGITS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    expected_digits: int
    request_id: str
    model_name: str
    model_version: str
    def __init__(self, image: _Optional[bytes] = ..., expected_digits: _Optional[int] = ..., request_id: _Optional[str] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ...) -> None: ...

class DigitAlternative(_message.Message):
    __slots__ = ("digit", "probability")
    DIGIT_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    digit: int
    probability: float
    def __init__(self, digit: _Optional[int] = ..., probability: _Optional[float] = ...) -> None: ...

class ReadDigit(_message.Message):
    __slots__ = ("digit", "confidence", "x", "y", "width", "height", "alternatives", "line", "group")
    DIGIT_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    X_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    ALTERNATIVES_FIELD_NUMBER: _ClassVar[int]
    LINE_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    digit: int
    confidence: float
    x: int
    y: int
    width: int
    height: int
    alternatives: _containers.RepeatedCompositeFieldContainer[DigitAlternative]
    line: int
    group: int
    def __init__(self, digit: _Optional[int] = ..., confidence: _Optional[float] = ..., x: _Optional[int] = ..., y: _Optional[int] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., alternatives: _Optional[_Iterable[_Union[DigitAlternative, _Mapping]]] = ..., line: _Optional[int] = ..., group: _Optional[int] = ...) -> None: ...

class ReadDigitsResponse(_message.Message):
    __slots__ = ("text", "digits", "confidence", "model_version", "request_id", "image_width", "image_height")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    DIGITS_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_WIDTH_FIELD_NUMBER: _ClassVar[int]
    IMAGE_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    text: str
    digits: _containers.RepeatedCompositeFieldContainer[ReadDigit]
    confidence: float
    model_version: str
    request_id: str
    image_width: int
    image_height: int
    def __init__(self, text: _Optional[str] = ..., digits: _Optional[_Iterable[_Union[ReadDigit, _Mapping]]] = ..., confidence: _Optional[float] = ..., model_version: _Optional[str] = ..., request_id: _Optional[str] = ..., image_width: _Optional[int] = ..., image_height: _Optional[int] = ...) -> None: ...

class ReadTableRequest(_message.Message):
    __slots__ = ("image", "request_id", "model_name", "model_version")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    request_id: str
    model_name: str
    model_version: str
    def __init__(self, image: _Optional[bytes] = ..., request_id: _Optional[str] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ...) -> None: ...

class TableCell(_message.Message):
    __slots__ = ("text", "confidence", "x", "y", "width", "height", "digits")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    X_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    DIGITS_FIELD_NUMBER: _ClassVar[int]
    text: str
    confidence: float
    x: int
    y: int
    width: int
    height: int
    digits: _containers.RepeatedCompositeFieldContainer[ReadDigit]
    def __init__(self, text: _Optional[str] = ..., confidence: _Optional[float] = ..., x: _Optional[int] = ..., y: _Optional[int] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., digits: _Optional[_Iterable[_Union[ReadDigit, _Mapping]]] = ...) -> None: ...

class TableRow(_message.Message):
    __slots__ = ("cells",)
    CELLS_FIELD_NUMBER: _ClassVar[int]
    cells: _containers.RepeatedCompositeFieldContainer[TableCell]
    def __init__(self, cells: _Optional[_Iterable[_Union[TableCell, _Mapping]]] = ...) -> None: ...

class ReadTableResponse(_message.Message):
    __slots__ = ("rows", "columns", "ruled_rows", "ruled_columns", "skew_degrees", "confidence", "model_version", "request_id", "image_width", "image_height")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    RULED_ROWS_FIELD_NUMBER: _ClassVar[int]
    RULED_COLUMNS_FIELD_NUMBER: _ClassVar[int]
    SKEW_DEGREES_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_WIDTH_FIELD_NUMBER: _ClassVar[int]
    IMAGE_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    rows: _containers.RepeatedCompositeFieldContainer[TableRow]
    columns: int
    ruled_rows: bool
    ruled_columns: bool
    skew_degrees: float
    confidence: float
    model_version: str
    request_id: str
    image_width: int
    image_height: int
    def __init__(self, rows: _Optional[_Iterable[_Union[TableRow, _Mapping]]] = ..., columns: _Optional[int] = ..., ruled_rows: _Optional[bool] = ..., ruled_columns: _Optional[bool] = ..., skew_degrees: _Optional[float] = ..., confidence: _Optional[float] = ..., model_version: _Optional[str] = ..., request_id: _Optional[str] = ..., image_width: _Optional[int] = ..., image_height: _Optional[int] = ...) -> None: ...

class ReadExpressionRequest(_message.Message):
    __slots__ = ("image", "request_id", "model_name", "model_version")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    request_id: str
    model_name: str
    model_version: str
    def __init__(self, image: _Optional[bytes] = ..., request_id: _Optional[str] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ...) -> None: ...

class SymbolAlternative(_message.Message):
    __slots__ = ("symbol", "probability")
    SYMBOL_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    symbol: str
    probability: float
    def __init__(self, symbol: _Optional[str] = ..., probability: _Optional[float] = ...) -> None: ...

class ExpressionSymbol(_message.Message):
    __slots__ = ("symbol", "confidence", "x", "y", "width", "height", "alternatives")
    SYMBOL_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    X_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    ALTERNATIVES_FIELD_NUMBER: _ClassVar[int]
    symbol: str
    confidence: float
    x: int
    y: int
    width: int
    height: int
    alternatives: _containers.RepeatedCompositeFieldContainer[SymbolAlternative]
    def __init__(self, symbol: _Optional[str] = ..., confidence: _Optional[float] = ..., x: _Optional[int] = ..., y: _Optional[int] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., alternatives: _Optional[_Iterable[_Union[SymbolAlternative, _Mapping]]] = ...) -> None: ...

class ReadExpressionResponse(_message.Message):
    __slots__ = ("text", "symbols", "value", "error", "written_answer", "answer_correct", "confidence", "model_version", "request_id", "image_width", "image_height")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SYMBOLS_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    WRITTEN_ANSWER_FIELD_NUMBER: _ClassVar[int]
    ANSWER_CORRECT_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_WIDTH_FIELD_NUMBER: _ClassVar[int]
    IMAGE_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    text: str
    symbols: _containers.RepeatedCompositeFieldContainer[ExpressionSymbol]
    value: str
    error: str
    written_answer: str
    answer_correct: bool
    confidence: float
    model_version: str
    request_id: str
    image_width: int
    image_height: int
    def __init__(self, text: _Optional[str] = ..., symbols: _Optional[_Iterable[_Union[ExpressionSymbol, _Mapping]]] = ..., value: _Optional[str] = ..., error: _Optional[str] = ..., written_answer: _Optional[str] = ..., answer_correct: _Optional[bool] = ..., confidence: _Optional[float] = ..., model_version: _Optional[str] = ..., request_id: _Optional[str] = ..., image_width: _Optional[int] = ..., image_height: _Optional[int] = ...) -> None: ...

class FeedbackRequest(_message.Message):
    __slots__ = ("request_id", "label", "text", "model_name")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    label: int
    text: str
    model_name: str
    def __init__(self, request_id: _Optional[str] = ..., label: _Optional[int] = ..., text: _Optional[str] = ..., model_name: _Optional[str] = ...) -> None: ...

class FeedbackResponse(_message.Message):
    __slots__ = ("model_name", "model_version", "prediction", "correct", "stored", "live_accuracy", "live_answers")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_FIELD_NUMBER: _ClassVar[int]
    CORRECT_FIELD_NUMBER: _ClassVar[int]
    STORED_FIELD_NUMBER: _ClassVar[int]
    LIVE_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    LIVE_ANSWERS_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_version: str
    prediction: str
    correct: bool
    stored: bool
    live_accuracy: float
    live_answers: int
    def __init__(self, model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., prediction: _Optional[str] = ..., correct: _Optional[bool] = ..., stored: _Optional[bool] = ..., live_accuracy: _Optional[float] = ..., live_answers: _Optional[int] = ...) -> None: ...
