from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ModelRef(_message.Message):
    __slots__ = ("symbol", "timeframe", "model_type", "version")
    SYMBOL_FIELD_NUMBER: _ClassVar[int]
    TIMEFRAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_TYPE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    symbol: str
    timeframe: str
    model_type: str
    version: str
    def __init__(self, symbol: _Optional[str] = ..., timeframe: _Optional[str] = ..., model_type: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class Placement(_message.Message):
    __slots__ = ("adapter", "device")
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    adapter: str
    device: str
    def __init__(self, adapter: _Optional[str] = ..., device: _Optional[str] = ...) -> None: ...

class Series(_message.Message):
    __slots__ = ("shape", "data")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Texts(_message.Message):
    __slots__ = ("texts",)
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    texts: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, texts: _Optional[_Iterable[str]] = ...) -> None: ...

class LoadJob(_message.Message):
    __slots__ = ("model", "placement")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    model: ModelRef
    placement: Placement
    def __init__(self, model: _Optional[_Union[ModelRef, _Mapping]] = ..., placement: _Optional[_Union[Placement, _Mapping]] = ...) -> None: ...

class UnloadJob(_message.Message):
    __slots__ = ("model", "placement")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    model: ModelRef
    placement: Placement
    def __init__(self, model: _Optional[_Union[ModelRef, _Mapping]] = ..., placement: _Optional[_Union[Placement, _Mapping]] = ...) -> None: ...

class PredictJob(_message.Message):
    __slots__ = ("model", "placement", "series", "texts", "n_steps", "priority", "deadline_s")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    SERIES_FIELD_NUMBER: _ClassVar[int]
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    N_STEPS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_S_FIELD_NUMBER: _ClassVar[int]
    model: ModelRef
    placement: Placement
    series: Series
    texts: Texts
    n_steps: int
    priority: int
    deadline_s: float
    def __init__(self, model: _Optional[_Union[ModelRef, _Mapping]] = ..., placement: _Optional[_Union[Placement, _Mapping]] = ..., series: _Optional[_Union[Series, _Mapping]] = ..., texts: _Optional[_Union[Texts, _Mapping]] = ..., n_steps: _Optional[int] = ..., priority: _Optional[int] = ..., deadline_s: _Optional[float] = ...) -> None: ...

class BatchPredictJob(_message.Message):
    __slots__ = ("requests", "placement", "priority")
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[PredictJob]
    placement: Placement
    priority: int
    def __init__(self, requests: _Optional[_Iterable[_Union[PredictJob, _Mapping]]] = ..., placement: _Optional[_Union[Placement, _Mapping]] = ..., priority: _Optional[int] = ...) -> None: ...

class SubmitRequest(_message.Message):
    __slots__ = ("load", "unload", "predict", "batch_predict")
    LOAD_FIELD_NUMBER: _ClassVar[int]
    UNLOAD_FIELD_NUMBER: _ClassVar[int]
    PREDICT_FIELD_NUMBER: _ClassVar[int]
    BATCH_PREDICT_FIELD_NUMBER: _ClassVar[int]
    load: LoadJob
    unload: UnloadJob
    predict: PredictJob
    batch_predict: BatchPredictJob
    def __init__(self, load: _Optional[_Union[LoadJob, _Mapping]] = ..., unload: _Optional[_Union[UnloadJob, _Mapping]] = ..., predict: _Optional[_Union[PredictJob, _Mapping]] = ..., batch_predict: _Optional[_Union[BatchPredictJob, _Mapping]] = ...) -> None: ...

class SubmitResponse(_message.Message):
    __slots__ = ("job_id", "job")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    job: Job
    def __init__(self, job_id: _Optional[str] = ..., job: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("done", "total")
    DONE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    done: int
    total: int
    def __init__(self, done: _Optional[int] = ..., total: _Optional[int] = ...) -> None: ...

class JobError(_message.Message):
    __slots__ = ("type", "message", "field", "retryable")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    RETRYABLE_FIELD_NUMBER: _ClassVar[int]
    type: str
    message: str
    field: str
    retryable: bool
    def __init__(self, type: _Optional[str] = ..., message: _Optional[str] = ..., field: _Optional[str] = ..., retryable: _Optional[bool] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("queued_ms", "load_ms", "inference_ms", "total_ms")
    QUEUED_MS_FIELD_NUMBER: _ClassVar[int]
    LOAD_MS_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    queued_ms: float
    load_ms: float
    inference_ms: float
    total_ms: float
    def __init__(self, queued_ms: _Optional[float] = ..., load_ms: _Optional[float] = ..., inference_ms: _Optional[float] = ..., total_ms: _Optional[float] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("job_id", "kind", "status", "final", "progress", "result", "error", "timings", "worker", "adapter", "device")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    kind: str
    status: str
    final: bool
    progress: Progress
    result: _struct_pb2.Struct
    error: JobError
    timings: Timings
    worker: str
    adapter: str
    device: str
    def __init__(self, job_id: _Optional[str] = ..., kind: _Optional[str] = ..., status: _Optional[str] = ..., final: _Optional[bool] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ..., result: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., error: _Optional[_Union[JobError, _Mapping]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., worker: _Optional[str] = ..., adapter: _Optional[str] = ..., device: _Optional[str] = ...) -> None: ...

class CancelJobResponse(_message.Message):
    __slots__ = ("job", "cancelled", "cancel_requested")
    JOB_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    CANCEL_REQUESTED_FIELD_NUMBER: _ClassVar[int]
    job: Job
    cancelled: bool
    cancel_requested: bool
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ..., cancelled: _Optional[bool] = ..., cancel_requested: _Optional[bool] = ...) -> None: ...
