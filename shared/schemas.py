"""Pydantic v2 schemas: the wire contract of every job and result.

Job payloads travel as the keyword argument ``job`` of the public Celery tasks, in their JSON form
(``model_dump(mode="json")``); results come back the same way. Series travel either as plain nested lists
(``inputs.series``: time x channels) or in the compact form (``inputs.tensor``: raw little-endian float32 with
its shape, raw bytes in msgpack or base64 in JSON).
"""

from __future__ import annotations

import base64
import math
import re
import time
from enum import Enum
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    BeforeValidator,
    computed_field,
    field_validator,
    model_validator,
)

from shared.settings import AdapterName, DeviceName

SYMBOL_PATTERN = re.compile(r"^[A-Z0-9][A-Z0-9._-]{0,15}$")
MAX_SERIES_ROWS = 100_000
#: Most channels (values per row) a series may have: a row is one bar of a few features, never thousands.
MAX_CHANNELS = 256
#: Most values a tensor may hold (a series of the longest length and the widest width).
MAX_TENSOR_VALUES = MAX_SERIES_ROWS * MAX_CHANNELS
MAX_TEXTS = 1024
MAX_N_STEPS = 1024
MAX_BATCH_REQUESTS = 1024


class TimeFrame(str, Enum):
    """Bar length of a series."""

    M1 = "1m"
    M5 = "5m"
    M15 = "15m"
    M30 = "30m"
    H1 = "1h"
    H4 = "4h"
    D1 = "1d"
    W1 = "1w"


class ModelType(str, Enum):
    """The model families the fleet serves."""

    PATCHTST = "patchtst"
    PATCHTSMIXER = "patchtsmixer"
    ENHANCED_TRANSFORMER = "enhanced_transformer"
    SENTIMENT = "sentiment"

    @property
    def is_forecaster(self) -> bool:
        return self is not ModelType.SENTIMENT


def _validate_symbol(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("symbol must be a string")
    symbol = value.strip().upper()
    if not SYMBOL_PATTERN.match(symbol):
        raise ValueError(
            "symbol must be 1-16 characters of letters, digits, '.', '-' or '_', starting with a letter or digit"
        )
    return symbol


Symbol = Annotated[str, BeforeValidator(_validate_symbol)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False, use_enum_values=False)


class ModelKey(_Strict):
    """What identifies a served model: symbol, timeframe and model type."""

    symbol: Symbol
    timeframe: TimeFrame
    model_type: ModelType

    @property
    def model_id(self) -> str:
        return model_id_for(self.symbol, self.timeframe, self.model_type)

    @classmethod
    def parse(cls, model_id: str) -> "ModelKey":
        """Split ``{symbol}_{timeframe}_{model_type}`` (symbols may contain ``_``, so parse from the right)."""
        for mtype in ModelType:
            suffix = f"_{mtype.value}"
            if model_id.endswith(suffix):
                head = model_id[: -len(suffix)]
                symbol, _, timeframe = head.rpartition("_")
                return cls(symbol=symbol, timeframe=timeframe, model_type=mtype)
        raise ValueError(f"not a model id: {model_id!r}")


def model_id_for(symbol: str, timeframe: TimeFrame | str, model_type: ModelType | str) -> str:
    tf = timeframe.value if isinstance(timeframe, TimeFrame) else timeframe
    mt = model_type.value if isinstance(model_type, ModelType) else model_type
    return f"{symbol}_{tf}_{mt}"


def _decode_bytes(value: Any) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except ValueError as exc:
            raise ValueError("data must be base64") from exc
    raise ValueError("data must be bytes (msgpack bin) or a base64 string (JSON)")


WireBytes = Annotated[
    bytes,
    BeforeValidator(_decode_bytes),
    PlainSerializer(lambda b, info: base64.b64encode(b).decode("ascii") if info.mode == "json" else b),
]


class EncodedTensor(_Strict):
    """A dense float32 array in its compact wire form: little-endian bytes in row-major order, with shape."""

    dtype: Literal["float32"] = "float32"
    shape: list[Annotated[int, Field(ge=1)]] = Field(min_length=1, max_length=3)
    data: WireBytes

    @field_validator("shape")
    @classmethod
    def _bounded(cls, shape: list[int]) -> list[int]:
        # NOTE: Python ints, not np.prod: [2**32, 2**32] wraps to 0 in int64 and would pass the size check.
        values = math.prod(shape)
        if values > MAX_TENSOR_VALUES:
            raise ValueError(f"shape {shape} holds {values} values; at most {MAX_TENSOR_VALUES} are allowed")
        return shape

    @model_validator(mode="after")
    def _check_size(self) -> "EncodedTensor":
        expected = math.prod(self.shape) * 4
        if len(self.data) != expected:
            raise ValueError(f"data holds {len(self.data)} bytes, shape {self.shape} needs {expected}")
        return self

    def to_numpy(self) -> np.ndarray:
        return np.frombuffer(self.data, dtype="<f4").reshape(self.shape)

    @classmethod
    def from_numpy(cls, array: np.ndarray) -> "EncodedTensor":
        arr = np.ascontiguousarray(array, dtype="<f4")
        return cls(shape=list(arr.shape), data=arr.tobytes())


class PredictInputs(_Strict):
    """Exactly one of: ``series`` (time x channels lists), ``tensor`` (compact series), ``texts`` (headlines)."""

    series: list[Annotated[list[float], Field(max_length=MAX_CHANNELS)]] | None = Field(
        None, min_length=1, max_length=MAX_SERIES_ROWS)
    tensor: EncodedTensor | None = None
    texts: list[Annotated[str, Field(min_length=1, max_length=1000)]] | None = Field(
        None, min_length=1, max_length=MAX_TEXTS
    )

    @field_validator("series")
    @classmethod
    def _rectangular(cls, rows: list[list[float]] | None) -> list[list[float]] | None:
        if rows is not None:
            width = len(rows[0])
            if width == 0:
                raise ValueError("series rows must hold at least one channel")
            for i, row in enumerate(rows):
                if len(row) != width:
                    raise ValueError(f"series must be rectangular: row {i} has {len(row)} values, row 0 has {width}")
        return rows

    @field_validator("tensor")
    @classmethod
    def _series_shaped(cls, tensor: EncodedTensor | None) -> EncodedTensor | None:
        if tensor is None:
            return tensor
        if len(tensor.shape) != 2:
            raise ValueError("inputs.tensor must be 2-D (time x channels)")
        rows, channels = tensor.shape
        if rows > MAX_SERIES_ROWS or channels > MAX_CHANNELS:
            raise ValueError(f"inputs.tensor.shape {tensor.shape} is over the bounds of a series: at most "
                             f"{MAX_SERIES_ROWS} rows of at most {MAX_CHANNELS} channels")
        return tensor

    @model_validator(mode="after")
    def _exactly_one(self) -> "PredictInputs":
        given = [name for name in ("series", "tensor", "texts") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError("inputs must hold exactly one of 'series', 'tensor' or 'texts'")
        return self

    @property
    def channels(self) -> int | None:
        """Values per row of a series (either form); None for texts."""
        if self.tensor is not None:
            return self.tensor.shape[1]
        return len(self.series[0]) if self.series else None

    def series_array(self) -> np.ndarray | None:
        """The series as a float32 (time, channels) array, whichever form it came in."""
        if self.tensor is not None:
            return self.tensor.to_numpy()
        if self.series is not None:
            return np.asarray(self.series, dtype=np.float32)
        return None


class _JobBase(ModelKey):
    adapter: AdapterName | None = None
    """Serving adapter; ``SERVING_ADAPTER_TYPE`` when omitted. With ``device`` it picks the queue."""
    device: DeviceName | None = None
    version: str | None = Field(None, pattern=r"^[0-9]{1,9}$")
    """Model version in the store; the newest when omitted."""


class LoadJob(_JobBase):
    """Load a model into the worker processes of a pool (idempotent)."""


class UnloadJob(_JobBase):
    """Unload a model from the worker process that takes the job."""


class PredictJob(_JobBase):
    """Run one prediction: a forecast of ``n_steps`` bars, or sentiment for some headlines."""

    inputs: PredictInputs
    n_steps: int | None = Field(None, ge=1, le=MAX_N_STEPS)
    """Forecast length; the model's horizon when omitted (longer horizons roll forward autoregressively)."""
    priority: int = Field(5, ge=0, le=9)
    """0 (least urgent) to 9 (most urgent); 5 by default. See :func:`shared.routing.broker_priority`."""
    deadline_s: float | None = Field(None, gt=0, le=86400)
    """Give up (typed ``DeadlineExceededError``) when no worker started the job within this many seconds."""
    enqueued_at: float | None = None
    """Unix time the producer enqueued the job (set by the producer; used for queue time and deadlines)."""

    def deadline_passed(self, now: float | None = None) -> bool:
        if self.deadline_s is None or self.enqueued_at is None:
            return False
        return (now if now is not None else time.time()) > self.enqueued_at + self.deadline_s


class BatchPredictJob(_Strict):
    """Many predictions in one job; each item gets its own result or its own typed error."""

    requests: list[dict[str, Any]] = Field(min_length=1, max_length=MAX_BATCH_REQUESTS)
    """Predict job bodies. Validated one by one by the worker, so that one bad item fails only itself."""
    adapter: AdapterName | None = None
    device: DeviceName | None = None
    priority: int = Field(5, ge=0, le=9)
    enqueued_at: float | None = None


class ModelInfo(BaseModel):
    """A model as a serving adapter holds it."""

    model_id: str
    symbol: str
    timeframe: TimeFrame
    model_type: ModelType
    model_path: str
    is_loaded: bool = False
    loaded_at: float | None = None
    memory_usage_mb: float = 0.0
    version: str = "1"
    metadata: dict[str, Any] = Field(default_factory=dict)


class PredictionResult(BaseModel):
    """The result of one prediction, in the units of the input (de-normalised)."""

    predictions: list[list[float]]
    """Forecasters: ``n_steps`` x channels. Sentiment: one row per text of class probabilities."""
    confidence_score: float = Field(ge=0, le=1)
    inference_time_ms: float
    model_info: ModelInfo
    labels: list[str] | None = None
    """Sentiment only: the most likely label of each text (``negative``, ``neutral``, ``positive``)."""


class JobErrorBody(BaseModel):
    """A typed error as it crosses processes."""

    type: str
    message: str
    field: str | None = None
    retryable: bool = False
    """Whether the same job sent again later can succeed (the runtime or Redis was unreachable)."""


class BatchItemResult(BaseModel):
    index: int
    result: PredictionResult | None = None
    error: JobErrorBody | None = None


class BatchPredictResult(BaseModel):
    items: list[BatchItemResult]
    total: int
    succeeded: int
    failed: int


class UnloadResult(BaseModel):
    model_id: str
    unloaded: bool


class ServingStats(BaseModel):
    """Serving counters of a worker, a model or the whole fleet."""

    total_predictions: int = 0
    successful_predictions: int = 0
    failed_predictions: int = 0
    average_inference_time_ms: float = 0.0
    models_loaded: int = 0
    total_memory_mb: float = 0.0
    uptime_seconds: float = 0.0
    success_rate: float = 0.0
    cache_hits: int = 0
    cache_misses: int = 0
    cache_evictions: int = 0
    cache_evictions_by_reason: dict[str, int] = Field(default_factory=dict)
    """Evictions split by cause: ``lru`` (count bound), ``memory`` (budget), ``ttl`` (idle)."""
    cache_loads: int = 0
    """Cold loads into a process's cache (store to a model ready to serve)."""
    cache_load_ms_total: int = 0
    """Milliseconds those loads took, summed (divide by ``cache_loads`` for the mean)."""
    cache_evicted_age_seconds_total: int = 0
    """Seconds each model evicted by the cache (not by an unload) had been resident, summed."""
    latency_histogram_ms: dict[str, int] = Field(default_factory=dict)
    """Cumulative counts by bucket upper bound (``le``), Prometheus style, ``+Inf`` included."""

    @computed_field  # type: ignore[prop-decorator]
    @property
    def cache_hit_ratio(self) -> float:
        lookups = self.cache_hits + self.cache_misses
        return self.cache_hits / lookups if lookups else 0.0
