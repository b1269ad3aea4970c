from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DataType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DATA_TYPE_UNSPECIFIED: _ClassVar[DataType]
    FLOAT32: _ClassVar[DataType]
    FLOAT16: _ClassVar[DataType]
    BFLOAT16: _ClassVar[DataType]
    FLOAT64: _ClassVar[DataType]
    UINT8: _ClassVar[DataType]
    INT32: _ClassVar[DataType]
    INT64: _ClassVar[DataType]

class Segmenter(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SEGMENTER_UNSPECIFIED: _ClassVar[Segmenter]
    SLIC: _ClassVar[Segmenter]
    GRID: _ClassVar[Segmenter]

class ScoreOutput(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SCORE_OUTPUT_UNSPECIFIED: _ClassVar[ScoreOutput]
    PROBABILITY: _ClassVar[ScoreOutput]
    LOGIT: _ClassVar[ScoreOutput]

class Return(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RETURN_UNSPECIFIED: _ClassVar[Return]
    MAP: _ClassVar[Return]
    OVERLAY: _ClassVar[Return]
    MAP_AND_OVERLAY: _ClassVar[Return]
DATA_TYPE_UNSPECIFIED: DataType
FLOAT32: DataType
FLOAT16: DataType
BFLOAT16: DataType
FLOAT64: DataType
UINT8: DataType
INT32: DataType
INT64: DataType
SEGMENTER_UNSPECIFIED: Segmenter
SLIC: Segmenter
GRID: Segmenter
SCORE_OUTPUT_UNSPECIFIED: ScoreOutput
PROBABILITY: ScoreOutput
LOGIT: ScoreOutput
RETURN_UNSPECIFIED: Return
MAP: Return
OVERLAY: Return
MAP_AND_OVERLAY: Return

class Tensor(_message.Message):
    __slots__ = ("shape", "dtype", "data")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: DataType
    data: bytes
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[DataType, str]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Baseline(_message.Message):
    __slots__ = ("value", "blur")
    VALUE_FIELD_NUMBER: _ClassVar[int]
    BLUR_FIELD_NUMBER: _ClassVar[int]
    value: float
    blur: bool
    def __init__(self, value: _Optional[float] = ..., blur: _Optional[bool] = ...) -> None: ...

class Options(_message.Message):
    __slots__ = ("samples", "steps", "rule", "n_segments", "segmenter", "baseline", "seed", "kernel_width", "alpha", "keep_prob", "paired", "blur_sigma", "output", "noise", "base", "abs", "window", "stride", "top_channels", "tolerance", "budget_ms", "cam_linear", "head_fusion", "discard_ratio", "baselines")
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    N_SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    SEGMENTER_FIELD_NUMBER: _ClassVar[int]
    BASELINE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    KERNEL_WIDTH_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    KEEP_PROB_FIELD_NUMBER: _ClassVar[int]
    PAIRED_FIELD_NUMBER: _ClassVar[int]
    BLUR_SIGMA_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    NOISE_FIELD_NUMBER: _ClassVar[int]
    BASE_FIELD_NUMBER: _ClassVar[int]
    ABS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    STRIDE_FIELD_NUMBER: _ClassVar[int]
    TOP_CHANNELS_FIELD_NUMBER: _ClassVar[int]
    TOLERANCE_FIELD_NUMBER: _ClassVar[int]
    BUDGET_MS_FIELD_NUMBER: _ClassVar[int]
    CAM_LINEAR_FIELD_NUMBER: _ClassVar[int]
    HEAD_FUSION_FIELD_NUMBER: _ClassVar[int]
    DISCARD_RATIO_FIELD_NUMBER: _ClassVar[int]
    BASELINES_FIELD_NUMBER: _ClassVar[int]
    samples: int
    steps: int
    rule: str
    n_segments: int
    segmenter: Segmenter
    baseline: Baseline
    seed: int
    kernel_width: float
    alpha: float
    keep_prob: float
    paired: bool
    blur_sigma: float
    output: ScoreOutput
    noise: float
    base: str
    abs: bool
    window: int
    stride: int
    top_channels: int
    tolerance: float
    budget_ms: int
    cam_linear: str
    head_fusion: str
    discard_ratio: float
    baselines: int
    def __init__(self, samples: _Optional[int] = ..., steps: _Optional[int] = ..., rule: _Optional[str] = ..., n_segments: _Optional[int] = ..., segmenter: _Optional[_Union[Segmenter, str]] = ..., baseline: _Optional[_Union[Baseline, _Mapping]] = ..., seed: _Optional[int] = ..., kernel_width: _Optional[float] = ..., alpha: _Optional[float] = ..., keep_prob: _Optional[float] = ..., paired: _Optional[bool] = ..., blur_sigma: _Optional[float] = ..., output: _Optional[_Union[ScoreOutput, str]] = ..., noise: _Optional[float] = ..., base: _Optional[str] = ..., abs: _Optional[bool] = ..., window: _Optional[int] = ..., stride: _Optional[int] = ..., top_channels: _Optional[int] = ..., tolerance: _Optional[float] = ..., budget_ms: _Optional[int] = ..., cam_linear: _Optional[str] = ..., head_fusion: _Optional[str] = ..., discard_ratio: _Optional[float] = ..., baselines: _Optional[int] = ...) -> None: ...

class ExplainRequest(_message.Message):
    __slots__ = ("request_id", "model", "method", "image", "tensor", "target", "layer", "options", "returns", "top_k", "progress", "targets", "top_labels", "foil", "quality")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    RETURNS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    TOP_LABELS_FIELD_NUMBER: _ClassVar[int]
    FOIL_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    method: str
    image: bytes
    tensor: Tensor
    target: int
    layer: str
    options: Options
    returns: Return
    top_k: int
    progress: bool
    targets: _containers.RepeatedScalarFieldContainer[int]
    top_labels: int
    foil: int
    quality: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., method: _Optional[str] = ..., image: _Optional[bytes] = ..., tensor: _Optional[_Union[Tensor, _Mapping]] = ..., target: _Optional[int] = ..., layer: _Optional[str] = ..., options: _Optional[_Union[Options, _Mapping]] = ..., returns: _Optional[_Union[Return, str]] = ..., top_k: _Optional[int] = ..., progress: _Optional[bool] = ..., targets: _Optional[_Iterable[int]] = ..., top_labels: _Optional[int] = ..., foil: _Optional[int] = ..., quality: _Optional[_Iterable[str]] = ...) -> None: ...

class TargetExplanation(_message.Message):
    __slots__ = ("target", "map", "overlay_png", "segment_weights", "segment_stderr", "intercept", "score")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    MAP_FIELD_NUMBER: _ClassVar[int]
    OVERLAY_PNG_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_STDERR_FIELD_NUMBER: _ClassVar[int]
    INTERCEPT_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    target: int
    map: Tensor
    overlay_png: bytes
    segment_weights: _containers.RepeatedScalarFieldContainer[float]
    segment_stderr: _containers.RepeatedScalarFieldContainer[float]
    intercept: float
    score: float
    def __init__(self, target: _Optional[int] = ..., map: _Optional[_Union[Tensor, _Mapping]] = ..., overlay_png: _Optional[bytes] = ..., segment_weights: _Optional[_Iterable[float]] = ..., segment_stderr: _Optional[_Iterable[float]] = ..., intercept: _Optional[float] = ..., score: _Optional[float] = ...) -> None: ...

class ClassScore(_message.Message):
    __slots__ = ("index", "label", "probability", "logit")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    LOGIT_FIELD_NUMBER: _ClassVar[int]
    index: int
    label: str
    probability: float
    logit: float
    def __init__(self, index: _Optional[int] = ..., label: _Optional[str] = ..., probability: _Optional[float] = ..., logit: _Optional[float] = ...) -> None: ...

class Timing(_message.Message):
    __slots__ = ("queue_ms", "compute_ms", "batch_size", "cache_hit")
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    CACHE_HIT_FIELD_NUMBER: _ClassVar[int]
    queue_ms: float
    compute_ms: float
    batch_size: int
    cache_hit: bool
    def __init__(self, queue_ms: _Optional[float] = ..., compute_ms: _Optional[float] = ..., batch_size: _Optional[int] = ..., cache_hit: _Optional[bool] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class ExplainResponse(_message.Message):
    __slots__ = ("request_id", "model", "method", "layer", "target", "map", "top_k", "overlay_png", "segments", "segment_weights", "intercept", "score", "seed", "samples", "timing", "error", "partial", "segment_stderr", "per_target", "foil", "quality")
    class QualityEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    MAP_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    OVERLAY_PNG_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    INTERCEPT_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_STDERR_FIELD_NUMBER: _ClassVar[int]
    PER_TARGET_FIELD_NUMBER: _ClassVar[int]
    FOIL_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    method: str
    layer: str
    target: int
    map: Tensor
    top_k: _containers.RepeatedCompositeFieldContainer[ClassScore]
    overlay_png: bytes
    segments: Tensor
    segment_weights: _containers.RepeatedScalarFieldContainer[float]
    intercept: float
    score: float
    seed: int
    samples: int
    timing: Timing
    error: Error
    partial: bool
    segment_stderr: _containers.RepeatedScalarFieldContainer[float]
    per_target: _containers.RepeatedCompositeFieldContainer[TargetExplanation]
    foil: int
    quality: _containers.ScalarMap[str, float]
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., method: _Optional[str] = ..., layer: _Optional[str] = ..., target: _Optional[int] = ..., map: _Optional[_Union[Tensor, _Mapping]] = ..., top_k: _Optional[_Iterable[_Union[ClassScore, _Mapping]]] = ..., overlay_png: _Optional[bytes] = ..., segments: _Optional[_Union[Tensor, _Mapping]] = ..., segment_weights: _Optional[_Iterable[float]] = ..., intercept: _Optional[float] = ..., score: _Optional[float] = ..., seed: _Optional[int] = ..., samples: _Optional[int] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., partial: _Optional[bool] = ..., segment_stderr: _Optional[_Iterable[float]] = ..., per_target: _Optional[_Iterable[_Union[TargetExplanation, _Mapping]]] = ..., foil: _Optional[int] = ..., quality: _Optional[_Mapping[str, float]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "input_shape", "num_classes", "default_layer", "layers", "methods", "device", "max_batch_size", "ready", "has_class_names", "forward_path")
    NAME_FIELD_NUMBER: _ClassVar[int]
    INPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_LAYER_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    METHODS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    HAS_CLASS_NAMES_FIELD_NUMBER: _ClassVar[int]
    FORWARD_PATH_FIELD_NUMBER: _ClassVar[int]
    name: str
    input_shape: _containers.RepeatedScalarFieldContainer[int]
    num_classes: int
    default_layer: str
    layers: _containers.RepeatedScalarFieldContainer[str]
    methods: _containers.RepeatedScalarFieldContainer[str]
    device: str
    max_batch_size: int
    ready: bool
    has_class_names: bool
    forward_path: ForwardPath
    def __init__(self, name: _Optional[str] = ..., input_shape: _Optional[_Iterable[int]] = ..., num_classes: _Optional[int] = ..., default_layer: _Optional[str] = ..., layers: _Optional[_Iterable[str]] = ..., methods: _Optional[_Iterable[str]] = ..., device: _Optional[str] = ..., max_batch_size: _Optional[int] = ..., ready: _Optional[bool] = ..., has_class_names: _Optional[bool] = ..., forward_path: _Optional[_Union[ForwardPath, _Mapping]] = ...) -> None: ...

class ForwardPath(_message.Message):
    __slots__ = ("tuned", "memory_format", "precision", "batch_size", "grad_batch_size", "compiled", "images_per_s", "speedup", "top1_agreement", "logit_error", "rank_correlation", "summary", "linear")
    TUNED_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FORMAT_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    GRAD_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    COMPILED_FIELD_NUMBER: _ClassVar[int]
    IMAGES_PER_S_FIELD_NUMBER: _ClassVar[int]
    SPEEDUP_FIELD_NUMBER: _ClassVar[int]
    TOP1_AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    LOGIT_ERROR_FIELD_NUMBER: _ClassVar[int]
    RANK_CORRELATION_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    LINEAR_FIELD_NUMBER: _ClassVar[int]
    tuned: bool
    memory_format: str
    precision: str
    batch_size: int
    grad_batch_size: int
    compiled: bool
    images_per_s: float
    speedup: float
    top1_agreement: float
    logit_error: float
    rank_correlation: float
    summary: str
    linear: str
    def __init__(self, tuned: _Optional[bool] = ..., memory_format: _Optional[str] = ..., precision: _Optional[str] = ..., batch_size: _Optional[int] = ..., grad_batch_size: _Optional[int] = ..., compiled: _Optional[bool] = ..., images_per_s: _Optional[float] = ..., speedup: _Optional[float] = ..., top1_agreement: _Optional[float] = ..., logit_error: _Optional[float] = ..., rank_correlation: _Optional[float] = ..., summary: _Optional[str] = ..., linear: _Optional[str] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "metrics")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    metrics: _containers.RepeatedCompositeFieldContainer[MetricInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., metrics: _Optional[_Iterable[_Union[MetricInfo, _Mapping]]] = ...) -> None: ...

class MetricInfo(_message.Message):
    __slots__ = ("name", "higher_is_better", "description")
    NAME_FIELD_NUMBER: _ClassVar[int]
    HIGHER_IS_BETTER_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    name: str
    higher_is_better: bool
    description: str
    def __init__(self, name: _Optional[str] = ..., higher_is_better: _Optional[bool] = ..., description: _Optional[str] = ...) -> None: ...

class EvaluateInput(_message.Message):
    __slots__ = ("image", "tensor", "target")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    tensor: Tensor
    target: int
    def __init__(self, image: _Optional[bytes] = ..., tensor: _Optional[_Union[Tensor, _Mapping]] = ..., target: _Optional[int] = ...) -> None: ...

class EvaluateRequest(_message.Message):
    __slots__ = ("request_id", "model", "method", "inputs", "metrics", "layer", "options")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    method: str
    inputs: _containers.RepeatedCompositeFieldContainer[EvaluateInput]
    metrics: _containers.RepeatedScalarFieldContainer[str]
    layer: str
    options: Options
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., method: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[EvaluateInput, _Mapping]]] = ..., metrics: _Optional[_Iterable[str]] = ..., layer: _Optional[str] = ..., options: _Optional[_Union[Options, _Mapping]] = ...) -> None: ...

class MetricValues(_message.Message):
    __slots__ = ("metric", "values", "mean", "stderr", "higher_is_better")
    METRIC_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STDERR_FIELD_NUMBER: _ClassVar[int]
    HIGHER_IS_BETTER_FIELD_NUMBER: _ClassVar[int]
    metric: str
    values: _containers.RepeatedScalarFieldContainer[float]
    mean: float
    stderr: float
    higher_is_better: bool
    def __init__(self, metric: _Optional[str] = ..., values: _Optional[_Iterable[float]] = ..., mean: _Optional[float] = ..., stderr: _Optional[float] = ..., higher_is_better: _Optional[bool] = ...) -> None: ...

class EvaluateResponse(_message.Message):
    __slots__ = ("request_id", "fraction", "stage", "done", "metrics", "targets")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    FRACTION_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    fraction: float
    stage: str
    done: bool
    metrics: _containers.RepeatedCompositeFieldContainer[MetricValues]
    targets: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, request_id: _Optional[str] = ..., fraction: _Optional[float] = ..., stage: _Optional[str] = ..., done: _Optional[bool] = ..., metrics: _Optional[_Iterable[_Union[MetricValues, _Mapping]]] = ..., targets: _Optional[_Iterable[int]] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("image", "tensor")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    tensor: Tensor
    def __init__(self, image: _Optional[bytes] = ..., tensor: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ConceptSet(_message.Message):
    __slots__ = ("name", "images")
    NAME_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    name: str
    images: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, name: _Optional[str] = ..., images: _Optional[_Iterable[bytes]] = ...) -> None: ...

class TcavRequest(_message.Message):
    __slots__ = ("request_id", "model", "layer", "target", "concepts", "inputs", "runs", "random_size", "concept_size", "alpha", "seed")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    CONCEPTS_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    RUNS_FIELD_NUMBER: _ClassVar[int]
    RANDOM_SIZE_FIELD_NUMBER: _ClassVar[int]
    CONCEPT_SIZE_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    layer: str
    target: int
    concepts: _containers.RepeatedCompositeFieldContainer[ConceptSet]
    inputs: _containers.RepeatedCompositeFieldContainer[Image]
    runs: int
    random_size: int
    concept_size: int
    alpha: float
    seed: int
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., layer: _Optional[str] = ..., target: _Optional[int] = ..., concepts: _Optional[_Iterable[_Union[ConceptSet, _Mapping]]] = ..., inputs: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., runs: _Optional[int] = ..., random_size: _Optional[int] = ..., concept_size: _Optional[int] = ..., alpha: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class TcavConcept(_message.Message):
    __slots__ = ("concept", "scores", "mean", "std", "p_value", "significant", "cav_accuracies")
    CONCEPT_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    P_VALUE_FIELD_NUMBER: _ClassVar[int]
    SIGNIFICANT_FIELD_NUMBER: _ClassVar[int]
    CAV_ACCURACIES_FIELD_NUMBER: _ClassVar[int]
    concept: str
    scores: _containers.RepeatedScalarFieldContainer[float]
    mean: float
    std: float
    p_value: float
    significant: bool
    cav_accuracies: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, concept: _Optional[str] = ..., scores: _Optional[_Iterable[float]] = ..., mean: _Optional[float] = ..., std: _Optional[float] = ..., p_value: _Optional[float] = ..., significant: _Optional[bool] = ..., cav_accuracies: _Optional[_Iterable[float]] = ...) -> None: ...

class TcavResponse(_message.Message):
    __slots__ = ("request_id", "fraction", "stage", "done", "layer", "target", "concepts", "random_scores", "alpha")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    FRACTION_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    CONCEPTS_FIELD_NUMBER: _ClassVar[int]
    RANDOM_SCORES_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    fraction: float
    stage: str
    done: bool
    layer: str
    target: int
    concepts: _containers.RepeatedCompositeFieldContainer[TcavConcept]
    random_scores: _containers.RepeatedScalarFieldContainer[float]
    alpha: float
    def __init__(self, request_id: _Optional[str] = ..., fraction: _Optional[float] = ..., stage: _Optional[str] = ..., done: _Optional[bool] = ..., layer: _Optional[str] = ..., target: _Optional[int] = ..., concepts: _Optional[_Iterable[_Union[TcavConcept, _Mapping]]] = ..., random_scores: _Optional[_Iterable[float]] = ..., alpha: _Optional[float] = ...) -> None: ...

class DissectRequest(_message.Message):
    __slots__ = ("request_id", "model", "layer", "dataset", "per_concept", "quantile", "min_iou", "top", "seed")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    PER_CONCEPT_FIELD_NUMBER: _ClassVar[int]
    QUANTILE_FIELD_NUMBER: _ClassVar[int]
    MIN_IOU_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    layer: str
    dataset: str
    per_concept: int
    quantile: float
    min_iou: float
    top: int
    seed: int
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., layer: _Optional[str] = ..., dataset: _Optional[str] = ..., per_concept: _Optional[int] = ..., quantile: _Optional[float] = ..., min_iou: _Optional[float] = ..., top: _Optional[int] = ..., seed: _Optional[int] = ...) -> None: ...

class DissectUnit(_message.Message):
    __slots__ = ("unit", "concept", "category", "iou", "threshold")
    UNIT_FIELD_NUMBER: _ClassVar[int]
    CONCEPT_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    IOU_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    unit: int
    concept: str
    category: str
    iou: float
    threshold: float
    def __init__(self, unit: _Optional[int] = ..., concept: _Optional[str] = ..., category: _Optional[str] = ..., iou: _Optional[float] = ..., threshold: _Optional[float] = ...) -> None: ...

class DissectCategory(_message.Message):
    __slots__ = ("category", "units", "concepts")
    class ConceptsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    UNITS_FIELD_NUMBER: _ClassVar[int]
    CONCEPTS_FIELD_NUMBER: _ClassVar[int]
    category: str
    units: int
    concepts: _containers.ScalarMap[str, int]
    def __init__(self, category: _Optional[str] = ..., units: _Optional[int] = ..., concepts: _Optional[_Mapping[str, int]] = ...) -> None: ...

class DissectResponse(_message.Message):
    __slots__ = ("request_id", "fraction", "stage", "done", "layer", "total_units", "units", "summary", "min_iou")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    FRACTION_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    TOTAL_UNITS_FIELD_NUMBER: _ClassVar[int]
    UNITS_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    MIN_IOU_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    fraction: float
    stage: str
    done: bool
    layer: str
    total_units: int
    units: _containers.RepeatedCompositeFieldContainer[DissectUnit]
    summary: _containers.RepeatedCompositeFieldContainer[DissectCategory]
    min_iou: float
    def __init__(self, request_id: _Optional[str] = ..., fraction: _Optional[float] = ..., stage: _Optional[str] = ..., done: _Optional[bool] = ..., layer: _Optional[str] = ..., total_units: _Optional[int] = ..., units: _Optional[_Iterable[_Union[DissectUnit, _Mapping]]] = ..., summary: _Optional[_Iterable[_Union[DissectCategory, _Mapping]]] = ..., min_iou: _Optional[float] = ...) -> None: ...

class VisualizeRequest(_message.Message):
    __slots__ = ("request_id", "model", "objectives", "steps", "size", "lr", "seed")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVES_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    objectives: _containers.RepeatedScalarFieldContainer[str]
    steps: int
    size: int
    lr: float
    seed: int
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., objectives: _Optional[_Iterable[str]] = ..., steps: _Optional[int] = ..., size: _Optional[int] = ..., lr: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class VisualizedObjective(_message.Message):
    __slots__ = ("objective", "png", "trace", "value")
    OBJECTIVE_FIELD_NUMBER: _ClassVar[int]
    PNG_FIELD_NUMBER: _ClassVar[int]
    TRACE_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    objective: str
    png: bytes
    trace: _containers.RepeatedScalarFieldContainer[float]
    value: float
    def __init__(self, objective: _Optional[str] = ..., png: _Optional[bytes] = ..., trace: _Optional[_Iterable[float]] = ..., value: _Optional[float] = ...) -> None: ...

class VisualizeResponse(_message.Message):
    __slots__ = ("request_id", "fraction", "stage", "done", "images")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    FRACTION_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    fraction: float
    stage: str
    done: bool
    images: _containers.RepeatedCompositeFieldContainer[VisualizedObjective]
    def __init__(self, request_id: _Optional[str] = ..., fraction: _Optional[float] = ..., stage: _Optional[str] = ..., done: _Optional[bool] = ..., images: _Optional[_Iterable[_Union[VisualizedObjective, _Mapping]]] = ...) -> None: ...
