"""The Open Inference Protocol (KServe v2) over REST: its wire forms, and their translation to and from fleet jobs.

An OIP model is a stored fleet model named by its id (``AAPL_1h_patchtst``). Its signature comes from the stored
``config.json``: a forecaster takes an FP32 ``series`` of ``[-1, n_channels]`` (at least ``context_length`` rows)
and answers FP32 ``predictions`` (``[n_steps, n_channels]``) and ``confidence`` (``[1]``); a sentiment model takes
BYTES ``texts`` (``[-1]``) and answers FP32 ``probabilities`` (``[-1, n_classes]``) and BYTES ``labels``.

An infer request becomes the body of a ``/v1/predict`` job (a series as the compact ``inputs.tensor``), which
:func:`producer_api.enqueue.parse_job` validates like any other: the bounds are the fleet's. This module checks only
what the signature declares (input names, datatypes, shapes) and moves bytes. Tensors come as JSON (``data``, flat
or nested, row-major) or, with the binary tensor extension, as raw bytes after a JSON header of
``Inference-Header-Content-Length`` bytes (``parameters.binary_data_size`` per input; FP32 little-endian, BYTES as
a 4-byte little-endian length before each element). Outputs are binary where asked (``parameters.binary_data`` of
an output, or ``binary_data_output`` for all).

Errors answer ``{"error": "<message>", "type", "retryable", "field"?}``: the protocol's clients read the ``error``
string (tritonclient raises it as ``InferenceServerException``), and the rest is the fleet's typed error.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import numpy as np
import orjson
from pydantic import BaseModel, Field, ValidationError

from producer_api.enqueue import SENTIMENT_CLASSES
from producer_api.errors import BadRequestError, validation_error
from producer_api.jobdoc import JobDocument
from shared import store_layout
from shared.errors import (FleetError, InternalError, InvalidInputError, JobCancelledError, ModelNotFoundError,
                           error_from_dict)
from shared.schemas import MAX_N_STEPS, ModelKey, PredictionResult

SERVER_NAME = "finsight-fleet"
PLATFORM = "finsight-fleet"
#: Protocol extensions the fleet speaks (Triton's names).
EXTENSIONS = ("binary_tensor_data", "parameters")
HEADER_LENGTH = "Inference-Header-Content-Length"
#: Request parameters that are job fields as they are (the job's schema validates them).
JOB_PARAMETERS = ("n_steps", "adapter", "device", "deadline_s")
#: Job fields the job's schema names, as the protocol names them.
_RENAMES = (("inputs.tensor", "series"), ("inputs.series", "series"), ("inputs.texts", "texts"))
_LENGTH = struct.Struct("<I")

#: A protocol parameter's value: always a primitive.
Parameter = Union[bool, int, float, str]


class ModelNotReadyError(FleetError):
    """No live worker process holds the model (or that version of it) now."""

    http_status = 503


class InferTimeoutError(FleetError):
    """The infer's job did not end within the wait; it goes on, and ``GET /v1/jobs/{id}`` reads it."""

    http_status = 504


class TensorSpec(BaseModel):
    """A tensor of a signature (the protocol's ``$metadata_tensor``); a dimension of ``-1`` takes any size."""

    name: str
    datatype: Literal["FP32", "BYTES"]
    shape: list[int]


class ModelSignature(BaseModel):
    """What a model takes and answers, as the protocol's tensors.

    ``parameters`` holds what the model's config tells (``context_length``: the fewest rows a series needs;
    ``prediction_length``: the horizon; ``labels``: the classes, in order) and the request parameter an infer
    takes, with its default and bound (``n_steps``: the horizon; ``n_steps_max``).
    """

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    parameters: dict[str, Parameter] = Field(default_factory=dict)


class ServerMetadata(BaseModel):
    """``GET /v2``: the server's name, version and the protocol extensions it speaks."""

    name: str = SERVER_NAME
    version: str
    extensions: list[str] = Field(default_factory=lambda: list(EXTENSIONS))


class ModelMetadata(ModelSignature):
    """``GET /v2/models/{name}``: the protocol's model metadata (every stored version; the signature of one)."""

    name: str
    versions: list[str]
    platform: str = PLATFORM


class RequestInput(BaseModel):
    """One input tensor of an infer request."""

    name: str
    shape: list[Annotated[int, Field(ge=0)]] = Field(max_length=8)
    datatype: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    data: Any = None
    """Values, flat or nested (row-major); absent when ``parameters.binary_data_size`` bytes follow the header."""


class RequestOutput(BaseModel):
    """An output the caller wants (``parameters.binary_data``: as raw bytes after the JSON header)."""

    name: str
    parameters: dict[str, Any] = Field(default_factory=dict)


class InferenceRequest(BaseModel):
    """``POST /v2/models/{name}/infer`` (its JSON header, with the binary extension).

    ``parameters``: ``n_steps`` (forecast length), ``adapter``, ``device`` and ``deadline_s`` as in
    ``/v1/predict``; ``priority`` in Triton's sense (0 the default, 1 the most urgent, larger less);
    ``binary_data_output`` (every output as raw bytes). Others are ignored.
    """

    id: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    inputs: list[RequestInput] = Field(min_length=1, max_length=16)
    outputs: list[RequestOutput] | None = Field(None, max_length=16)


class ResponseOutput(BaseModel):
    """One output tensor: ``data`` in JSON, or ``parameters.binary_data_size`` bytes after the JSON header."""

    name: str
    datatype: str
    shape: list[int]
    parameters: dict[str, Parameter] | None = None
    data: list[Any] | None = None


class InferenceResponse(BaseModel):
    """What an infer answers; ``parameters`` holds the fleet's ``job_id``, ``inference_time_ms`` and ``worker``."""

    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, Parameter] = Field(default_factory=dict)
    outputs: list[ResponseOutput]


class OipError(BaseModel):
    """The error shape of the ``/v2`` routes: the protocol's ``error`` string, then the fleet's typed fields."""

    error: str
    type: str
    retryable: bool = False
    field: str | None = None


@dataclass(frozen=True)
class StoredVersion:
    """One stored version of a model as the protocol describes it: its version, every version, its signature."""

    version: str
    versions: tuple[str, ...]
    signature: ModelSignature


def model_key(name: str) -> ModelKey:
    """The model a protocol name (a fleet model id) names; :class:`ModelNotFoundError` when it names none."""
    try:
        return ModelKey.parse(name)
    except ValueError:  # pydantic's ValidationError is one
        raise ModelNotFoundError(f"unknown model {name!r}: a model's name is its id, <SYMBOL>_<timeframe>_"
                                 f"<model_type> (e.g. AAPL_1h_patchtst)", field="name") from None


def _dim(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else -1


def signature(key: ModelKey, config: dict[str, Any]) -> ModelSignature:
    """The signature of a model of ``key``'s type with ``config``; what the config does not tell is ``-1``."""
    if not key.model_type.is_forecaster:
        labels = config.get("labels")
        labels = labels if isinstance(labels, list) and labels and all(isinstance(x, str) for x in labels) else None
        classes = len(labels) if labels else SENTIMENT_CLASSES
        return ModelSignature(
            inputs=[TensorSpec(name="texts", datatype="BYTES", shape=[-1])],
            outputs=[TensorSpec(name="probabilities", datatype="FP32", shape=[-1, classes]),
                     TensorSpec(name="labels", datatype="BYTES", shape=[-1])],
            parameters={"labels": ",".join(labels)} if labels else {})
    channels = _dim(config.get("n_channels"))
    parameters: dict[str, Parameter] = {name: config[name] for name in ("context_length", "prediction_length")
                                        if _dim(config.get(name)) > 0}
    if "prediction_length" in parameters:
        parameters["n_steps"] = parameters["prediction_length"]  # without n_steps a worker forecasts the horizon
    parameters["n_steps_max"] = MAX_N_STEPS
    return ModelSignature(inputs=[TensorSpec(name="series", datatype="FP32", shape=[-1, channels])],
                          outputs=[TensorSpec(name="predictions", datatype="FP32", shape=[-1, channels]),
                                   TensorSpec(name="confidence", datatype="FP32", shape=[1])],
                          parameters=parameters)


def read_model(root: Path, key: ModelKey, version: str | None = None) -> StoredVersion:
    """One version of a model in the store (the newest when ``version`` is None). Blocking file IO.

    Raises:
        ModelNotFoundError: the store lacks the model (field ``name``) or that version (field ``version``).
    """
    try:
        found = store_layout.model_dir(root, key, version)
    except ModelNotFoundError as exc:
        raise ModelNotFoundError(exc.message, field="version" if exc.field == "version" else "name") from None
    try:
        config = store_layout.read_json(found / store_layout.CONFIG_FILE)
    except (OSError, ValueError, InvalidInputError):
        config = {}  # a worker reports the broken config when it loads the model; the shapes are then unknown
    return StoredVersion(found.name, tuple(store_layout.versions(root, key)), signature(key, config))


def read_request(raw: bytes | bytearray, header_length: str | None) -> tuple[InferenceRequest, memoryview]:
    """The request's JSON header, and the bytes after it (none without the binary extension).

    Raises:
        BadRequestError: the header length is not a byte count within the body, or the header is not JSON (400).
        InvalidInputError: the header is not an inference request (422, naming the field).
    """
    view = memoryview(raw)
    size = len(view)
    if header_length is not None:
        try:
            size = int(header_length)
        except ValueError:
            size = -1
        if not 0 <= size <= len(view):
            raise BadRequestError(f"{HEADER_LENGTH} must be the byte length of the JSON header, 0 to {len(view)}; "
                                  f"got {header_length[:40]!r}", field=HEADER_LENGTH)
    try:
        doc = orjson.loads(view[:size])
    except orjson.JSONDecodeError as exc:
        raise BadRequestError(f"malformed JSON inference request: {exc}") from None
    try:
        return InferenceRequest.model_validate(doc), view[size:]
    except ValidationError as exc:
        raise validation_error(exc) from None


def requested_outputs(request: InferenceRequest, sig: ModelSignature) -> dict[str, bool]:
    """Output name -> whether it goes as raw bytes, for the outputs the request wants (all when it names none)."""
    every = request.parameters.get("binary_data_output") is True
    names = [spec.name for spec in sig.outputs]
    if request.outputs is None:
        return {name: every for name in names}
    wanted: dict[str, bool] = {}
    for out in request.outputs:
        if out.name not in names:
            raise InvalidInputError(f"output {out.name!r}: the model has no such output; it answers "
                                    f"{', '.join(names)}", field=out.name)
        if out.parameters.get("classification"):
            raise InvalidInputError(f"output {out.name!r}: the classification extension is not supported; the "
                                    f"labels output names each text's most likely class", field=out.name)
        binary = out.parameters.get("binary_data")
        wanted[out.name] = every if binary is None else binary is True
    return wanted


def _inputs_by_name(request: InferenceRequest, binary: memoryview) -> dict[str, tuple[RequestInput, memoryview | None]]:
    """Each input with its raw bytes (None for JSON data), the bytes after the header cut in input order."""
    found: dict[str, tuple[RequestInput, memoryview | None]] = {}
    offset = 0
    for tensor in request.inputs:
        if tensor.name in found:
            raise InvalidInputError(f"input {tensor.name!r} is given twice", field=tensor.name)
        size, chunk = tensor.parameters.get("binary_data_size"), None
        if size is not None:
            left = len(binary) - offset
            if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= left:
                raise BadRequestError(f"input {tensor.name!r}: binary_data_size {size!r} is not a byte count within "
                                      f"the {left} bytes left after the JSON header", field=tensor.name)
            if tensor.data is not None:
                raise InvalidInputError(f"input {tensor.name!r} holds both data and binary_data_size",
                                        field=tensor.name)
            chunk, offset = binary[offset:offset + size], offset + size
        elif tensor.data is None:
            raise InvalidInputError(f"input {tensor.name!r} holds no data (neither data nor "
                                    f"parameters.binary_data_size)", field=tensor.name)
        found[tensor.name] = (tensor, chunk)
    if offset != len(binary):
        raise BadRequestError(f"{len(binary) - offset} bytes after the JSON header belong to no input "
                              f"(see each input's parameters.binary_data_size)")
    return found


def _check_spec(tensor: RequestInput, spec: TensorSpec) -> None:
    if tensor.datatype != spec.datatype:
        raise InvalidInputError(f"input {spec.name!r}: datatype {tensor.datatype[:20]!r}; the model takes "
                                f"{spec.datatype}", field=spec.name)
    if len(tensor.shape) != len(spec.shape) or any(want not in (-1, got) for got, want in zip(tensor.shape,
                                                                                               spec.shape)):
        raise InvalidInputError(f"input {spec.name!r}: shape {tensor.shape}; the model takes {spec.shape} "
                                f"(-1: any size)", field=spec.name)


def _floats(tensor: RequestInput, chunk: memoryview | None, count: int) -> np.ndarray:
    if chunk is not None:
        if len(chunk) != count * 4:
            raise InvalidInputError(f"input {tensor.name!r}: {len(chunk)} bytes of data; shape {tensor.shape} of FP32 "
                                    f"needs {count * 4}", field=tensor.name)
        return np.frombuffer(chunk, dtype="<f4")
    try:
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is an infinity, which the job refuses
            values = np.asarray(tensor.data, dtype="<f4")
    except (ValueError, TypeError, OverflowError):
        raise InvalidInputError(f"input {tensor.name!r}: data must be numbers, flat or nested row-major",
                                field=tensor.name) from None
    if values.size != count:
        raise InvalidInputError(f"input {tensor.name!r}: {values.size} values; shape {tensor.shape} holds {count}",
                                field=tensor.name)
    return values


def _flat_strings(data: Any, name: str) -> list[str]:
    out: list[str] = []
    stack = [data]
    while stack:  # NOTE: a loop, not recursion: JSON nests deeper than Python's recursion limit
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        elif isinstance(item, str):
            out.append(item)
        else:
            raise InvalidInputError(f"input {name!r}: BYTES data must be strings, flat or nested", field=name)
    return out


def _strings(tensor: RequestInput, chunk: memoryview | None, count: int) -> list[str]:
    if chunk is None:
        texts = _flat_strings(tensor.data, tensor.name)
    else:
        items, at = [], 0
        while at < len(chunk) and len(items) <= count:  # past count is wrong already: stop reading
            if at + _LENGTH.size > len(chunk):
                break
            (size,) = _LENGTH.unpack_from(chunk, at)
            at += _LENGTH.size
            if at + size > len(chunk):
                break
            items.append(bytes(chunk[at:at + size]))
            at += size
        if at != len(chunk) and len(items) <= count:
            raise InvalidInputError(f"input {tensor.name!r}: malformed BYTES data (each element is a 4-byte "
                                    f"little-endian length, then that many bytes)", field=tensor.name)
        try:
            texts = [item.decode("utf-8") for item in items]
        except UnicodeDecodeError:
            raise InvalidInputError(f"input {tensor.name!r}: texts must be UTF-8", field=tensor.name) from None
    if len(texts) != count:
        raise InvalidInputError(f"input {tensor.name!r}: {len(texts)} elements; shape {tensor.shape} holds {count}",
                                field=tensor.name)
    return texts


def job_inputs(sig: ModelSignature, request: InferenceRequest, binary: memoryview) -> dict[str, Any]:
    """The job's ``inputs`` from the request's tensors: ``tensor`` (a series) or ``texts``.

    Raises:
        InvalidInputError: an input the model lacks, or one that does not fit the signature (422, naming it).
        BadRequestError: the binary sizes do not add up to the bytes after the header (400).
    """
    spec = sig.inputs[0]  # every fleet model takes one input
    found = _inputs_by_name(request, binary)
    extra = sorted(set(found) - {spec.name})
    if extra:
        raise InvalidInputError(f"input {extra[0]!r}: the model has no such input; it takes {spec.name!r}",
                                field=extra[0])
    if spec.name not in found:
        raise InvalidInputError(f"input {spec.name!r} is missing", field=spec.name)
    tensor, chunk = found[spec.name]
    _check_spec(tensor, spec)
    count = math.prod(tensor.shape)
    if spec.datatype == "BYTES":
        return {"texts": _strings(tensor, chunk, count)}
    values = _floats(tensor, chunk, count)
    return {"tensor": {"dtype": "float32", "shape": tensor.shape, "data": values.tobytes()}}


def fleet_priority(level: Any) -> Any:
    """Triton's priority (0: the default; 1 the most urgent, larger less) as the fleet's (5 by default; 9 the most
    urgent, 0 the least). Anything else is left for the job's schema to refuse."""
    if isinstance(level, bool) or not isinstance(level, int) or level < 0:
        return level
    return 5 if level == 0 else max(0, 10 - level)


def job_body(key: ModelKey, sig: ModelSignature, request: InferenceRequest, binary: memoryview,
             version: str | None) -> dict[str, Any]:
    """The ``/v1/predict`` body an infer request stands for (for :func:`producer_api.enqueue.parse_job`)."""
    body: dict[str, Any] = {"symbol": key.symbol, "timeframe": key.timeframe.value,
                            "model_type": key.model_type.value, "inputs": job_inputs(sig, request, binary)}
    if version is not None:
        body["version"] = version
    params = request.parameters
    body.update({name: params[name] for name in JOB_PARAMETERS if name in params})
    if "priority" in params:
        body["priority"] = fleet_priority(params["priority"])
    return body


def renamed(err: FleetError) -> FleetError:
    """``err``, naming the protocol's input (``series``, ``texts``) where the job's schema named its own field."""
    for field, name in _RENAMES:
        if err.field and (err.field == field or err.field.startswith(field + ".")):
            err.field = name + err.field[len(field):]
            err.message = err.message.replace(field, name)
            err.args = (err.message,)
            break
    return err


def job_result(doc: JobDocument) -> PredictionResult:
    """The result of an infer's finished job; its typed error (inputs named as the protocol names them) otherwise."""
    if doc.status == "succeeded":
        return PredictionResult.model_validate(doc.result)
    if doc.error is not None:
        raise renamed(error_from_dict(doc.error.model_dump()))
    if doc.status == "cancelled":
        raise JobCancelledError(f"job {doc.job_id} was cancelled")
    raise InternalError(f"job {doc.job_id} ended {doc.status} without an error")


@dataclass(frozen=True)
class OutputTensor:
    """One output of a result: FP32 values as an array, BYTES ones as strings."""

    name: str
    datatype: str
    values: Any

    @property
    def shape(self) -> list[int]:
        return list(self.values.shape) if isinstance(self.values, np.ndarray) else [len(self.values)]

    def raw(self) -> bytes:
        if isinstance(self.values, np.ndarray):
            return self.values.tobytes()
        encoded = [text.encode("utf-8") for text in self.values]
        return b"".join(_LENGTH.pack(len(item)) + item for item in encoded)


def result_tensors(key: ModelKey, result: PredictionResult) -> list[OutputTensor]:
    """A result as the signature's outputs."""
    rows = np.asarray(result.predictions, dtype="<f4").reshape(len(result.predictions), -1)
    if key.model_type.is_forecaster:
        return [OutputTensor("predictions", "FP32", rows),
                OutputTensor("confidence", "FP32", np.asarray([result.confidence_score], dtype="<f4"))]
    return [OutputTensor("probabilities", "FP32", rows), OutputTensor("labels", "BYTES", list(result.labels or []))]


def encode_response(model_name: str, model_version: str | None, request_id: str | None,
                    parameters: dict[str, Parameter], tensors: list[OutputTensor],
                    wanted: dict[str, bool]) -> tuple[bytes, str, dict[str, str]]:
    """The response body, its content type and its extra headers (the header length, when outputs are binary).

    NOTE: built as plain dicts and dumped by orjson (float32 arrays as they are), not through
    :class:`InferenceResponse`: a forecast of thousands of values would otherwise cost a pydantic float each.
    """
    outputs, buffers = [], []
    for tensor in tensors:
        if tensor.name not in wanted:
            continue
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": tensor.shape}
        if wanted[tensor.name]:
            raw = tensor.raw()
            buffers.append(raw)
            entry["parameters"] = {"binary_data_size": len(raw)}
        else:
            entry["data"] = tensor.values.reshape(-1) if isinstance(tensor.values, np.ndarray) else tensor.values
        outputs.append(entry)
    doc: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        doc["id"] = request_id
    doc.update(parameters=parameters, outputs=outputs)
    header = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    if not buffers:
        return header, "application/json", {}
    return header + b"".join(buffers), "application/octet-stream", {HEADER_LENGTH: str(len(header))}
