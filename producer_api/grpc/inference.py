"""The Open Inference Protocol's ``GRPCInferenceService`` (KServe v2), wire-compatible with ``tritonclient.grpc``.

The messages are the generated modules ``tritonclient`` ships (Triton's ``service.proto``, a superset of KServe's
``grpc_predict_v2.proto``: the same package, service and field numbers). Six methods are served: ServerLive,
ServerReady, ServerMetadata, ModelMetadata, ModelReady and ModelInfer; the rest (Triton's repository, shared
memory, statistics extensions) answer UNIMPLEMENTED.

An infer is decoded into the same :class:`~producer_api.oip.InferenceRequest` plus raw tensor bytes that the REST
route reads, and run by :func:`producer_api.service.inference.infer`: the same checks, the same predict job, the
same numbers. Tensors come as ``raw_input_contents`` (what tritonclient sends: FP32 little-endian, BYTES as a
4-byte length before each element) or as typed ``contents``; outputs always go as ``raw_output_contents``.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from tritonclient.grpc import service_pb2 as pb

import shared
from producer_api import oip
from producer_api.errors import validation_error
from producer_api.grpc.handlers import Call
from producer_api.service import inference
from producer_api.service.health import readiness
from shared.errors import FleetError, InvalidInputError

SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
METHODS = ("ServerLive", "ServerReady", "ServerMetadata", "ModelMetadata", "ModelReady", "ModelInfer")


def parameter_value(param: pb.InferParameter) -> Any:
    """An ``InferParameter`` as the primitive it holds (None when it holds nothing)."""
    which = param.WhichOneof("parameter_choice")
    return getattr(param, which) if which else None


def set_parameter(target: pb.InferParameter, value: oip.Parameter) -> None:
    if isinstance(value, bool):
        target.bool_param = value
    elif isinstance(value, int):
        target.int64_param = value
    elif isinstance(value, float):
        target.double_param = value
    else:
        target.string_param = str(value)


def _contents(tensor: Any) -> list[Any] | None:
    """Typed ``contents`` of an input as JSON-like data (BYTES decoded as UTF-8), None when it holds none."""
    contents = tensor.contents
    if tensor.datatype == "BYTES" and contents.bytes_contents:
        try:
            return [item.decode("utf-8") for item in contents.bytes_contents]
        except UnicodeDecodeError:
            raise InvalidInputError(f"input {tensor.name!r}: texts must be UTF-8", field=tensor.name) from None
    for field in ("fp32_contents", "fp64_contents", "int64_contents", "int_contents", "uint64_contents",
                  "uint_contents", "bool_contents", "bytes_contents"):
        values = getattr(contents, field)
        if values:
            return list(values)
    return None


def decode_request(request: pb.ModelInferRequest) -> tuple[oip.InferenceRequest, memoryview]:
    """The protocol's request as the REST route reads it: its JSON header and the raw bytes after it.

    Raises:
        InvalidInputError: raw contents that are not one per input, an input without data, or a request that is
            not an inference request (naming the field).
    """
    raws = list(request.raw_input_contents)
    if raws and len(raws) != len(request.inputs):
        raise InvalidInputError(f"raw_input_contents holds {len(raws)} tensors for {len(request.inputs)} inputs; "
                                "give one per input, or none and typed contents", field="raw_input_contents")
    inputs = []
    for index, tensor in enumerate(request.inputs):
        entry: dict[str, Any] = {"name": tensor.name, "shape": list(tensor.shape), "datatype": tensor.datatype,
                                 "parameters": {k: parameter_value(v) for k, v in tensor.parameters.items()}}
        if raws:
            entry["parameters"]["binary_data_size"] = len(raws[index])
        else:
            entry["data"] = _contents(tensor)
        inputs.append(entry)
    outputs = [{"name": out.name, "parameters": {k: parameter_value(v) for k, v in out.parameters.items()}}
               for out in request.outputs]
    doc = {"id": request.id or None, "inputs": inputs, "outputs": outputs or None,
           "parameters": {k: parameter_value(v) for k, v in request.parameters.items()}}
    try:
        decoded = oip.InferenceRequest.model_validate(doc)
    except ValidationError as exc:
        raise validation_error(exc) from None
    return decoded, memoryview(b"".join(raws))


def encode_response(outcome: inference.InferOutcome, request_id: str) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name=outcome.key.model_id,
                                     model_version=outcome.result.model_info.version, id=request_id)
    for name, value in outcome.parameters().items():
        set_parameter(response.parameters[name], value)
    for tensor in outcome.tensors():
        response.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        response.raw_output_contents.append(tensor.raw())
    return response


class InferenceServicer:
    """The protocol's methods over :mod:`producer_api.service.inference` (each gets its :class:`Call`)."""

    async def ServerLive(self, request: pb.ServerLiveRequest, call: Call) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, call: Call) -> pb.ServerReadyResponse:
        """Ready as ``/readyz`` is: Redis answers and every configured pool has a live worker."""
        try:
            await readiness(call.api)
        except FleetError:
            return pb.ServerReadyResponse(ready=False)
        return pb.ServerReadyResponse(ready=True)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, call: Call) -> pb.ServerMetadataResponse:
        meta = oip.ServerMetadata(version=shared.__version__)
        return pb.ServerMetadataResponse(name=meta.name, version=meta.version, extensions=meta.extensions)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, call: Call) -> pb.ModelMetadataResponse:
        key, found = await inference.stored(call.api, request.name, request.version or None)
        response = pb.ModelMetadataResponse(name=key.model_id, versions=list(found.versions), platform=oip.PLATFORM)
        for spec, target in ((found.signature.inputs, response.inputs), (found.signature.outputs, response.outputs)):
            for tensor in spec:
                target.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        return response

    async def ModelReady(self, request: pb.ModelReadyRequest, call: Call) -> pb.ModelReadyResponse:
        """Ready when a live worker process holds the model (NOT_FOUND for a model not stored)."""
        _, ready = await inference.model_ready(call.api, request.name, request.version or None)
        return pb.ModelReadyResponse(ready=ready)

    async def ModelInfer(self, request: pb.ModelInferRequest, call: Call) -> pb.ModelInferResponse:
        version = request.model_version or None
        key, found = await inference.stored(call.api, request.model_name, version)
        decoded, binary = decode_request(request)
        outcome = await inference.infer(call.api, call.principal, key, found, decoded, binary, version)
        return encode_response(outcome, request.id)
