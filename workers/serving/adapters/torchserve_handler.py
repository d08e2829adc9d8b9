"""The TorchServe handler of the fleet: runs a stored model's TorchScript ``model.pt`` on raw tensors.

:mod:`workers.serving.adapters.torchserve` archives this file, as it is, with the model (``torch-model-archiver
--handler``); TorchServe imports it in its own Python worker, where the fleet's packages may not be importable. So
it stays self-contained: the standard library, numpy and torch only.

It runs only the model's forward on what the worker sends (normalised windows ``[B, L, C]`` float32, or token ids
``[B, T]`` int64): pre- and post-processing stay in the fleet worker, as with Triton, so that every adapter returns
the same numbers. Every request of one TorchServe batch (``batch_size`` / ``max_batch_delay``) runs in one forward.

Wire format of a request body and of an answer (little-endian)::

    b"FSTS"  uint8 dtype (0: float32, 1: int64)  uint8 ndim  ndim x uint32 dims  the values, row-major

A body that is not such a tensor fails its own request with a message starting ``bad tensor:`` (the caller's
fault), and a forward that raises answers ``forward failed on shape [...]: <error>`` to the requests it held (with
status 200: an exception would make TorchServe answer 503, which the adapter must read as a server that is down);
the other requests of the batch still run.
"""

from __future__ import annotations

import os
import struct
from typing import Any

import numpy as np
import torch

MAGIC = b"FSTS"
DTYPES = {0: np.dtype("<f4"), 1: np.dtype("<i8")}
CODES = {np.dtype("<f4"): 0, np.dtype("<i8"): 1}
_HEAD = struct.Struct("<4sBB")
#: Largest tensor a request may carry (values): a bad header must not make the worker allocate without end.
MAX_VALUES = 64 * 2**20


class BadTensorError(ValueError):
    """A request body that is not a tensor in the wire format."""


def encode(array: np.ndarray) -> bytes:
    """``array`` (float32 or int64) in the wire format."""
    array = np.ascontiguousarray(array)
    dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
    code = CODES.get(np.dtype(dtype).newbyteorder("<"))
    if code is None:
        raise BadTensorError(f"bad tensor: dtype {array.dtype} (float32 or int64 only)")
    head = _HEAD.pack(MAGIC, code, array.ndim) + struct.pack(f"<{array.ndim}I", *array.shape)
    return head + array.astype(DTYPES[code], copy=False).tobytes()


def decode(body: bytes | bytearray | memoryview) -> np.ndarray:
    """A wire-format tensor as an array (a read-only view of ``body``)."""
    view = memoryview(body)
    if len(view) < _HEAD.size:
        raise BadTensorError(f"bad tensor: {len(view)} bytes, shorter than the header")
    magic, code, ndim = _HEAD.unpack_from(view)
    if magic != MAGIC or code not in DTYPES or not 1 <= ndim <= 8:
        raise BadTensorError("bad tensor: not the fleet's tensor format (magic, dtype or rank)")
    dims = struct.unpack_from(f"<{ndim}I", view, _HEAD.size)
    count = 1
    for dim in dims:
        count *= dim
    if count > MAX_VALUES:
        raise BadTensorError(f"bad tensor: shape {list(dims)} holds {count} values; at most {MAX_VALUES}")
    start = _HEAD.size + 4 * ndim
    dtype = DTYPES[code]
    if len(view) - start != count * dtype.itemsize:
        raise BadTensorError(f"bad tensor: {len(view) - start} bytes of data, shape {list(dims)} needs "
                             f"{count * dtype.itemsize}")
    return np.frombuffer(view[start:], dtype=dtype).reshape(dims)


class FleetHandler:
    """Loads ``model.pt`` once per TorchServe worker and runs batches of requests as one forward."""

    def __init__(self) -> None:
        self.module: Any = None
        self.device = torch.device("cpu")

    def initialize(self, context: Any) -> None:
        props = context.system_properties
        torch.set_num_threads(max(1, int(os.environ.get("FLEET_TORCH_THREADS", "1"))))
        gpu = props.get("gpu_id")
        if gpu is not None and torch.cuda.is_available():
            self.device = torch.device(f"cuda:{gpu}")
        path = os.path.join(props["model_dir"], context.manifest["model"]["serializedFile"])
        self.module = torch.jit.load(path, map_location=self.device).eval()

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[Any]:
        answers: list[Any] = [None] * len(data)
        # NOTE: requests of one TorchServe batch may come from different worker processes: only those of one
        # dtype and row shape can share a forward, so each such group runs as one.
        groups: dict[tuple[Any, ...], list[tuple[int, np.ndarray]]] = {}
        for i, row in enumerate(data):
            body = row.get("body") if row.get("body") is not None else row.get("data")
            try:
                array = decode(bytes(body or b""))
            except BadTensorError as exc:
                answers[i] = str(exc)
                continue
            groups.setdefault((array.dtype.str, *array.shape[1:]), []).append((i, array))
        for members in groups.values():
            try:
                batch = torch.from_numpy(np.concatenate([a for _, a in members], axis=0)).to(self.device)
                with torch.inference_mode():
                    out = self.module(batch).to("cpu").numpy().astype("<f4", copy=False)
            except Exception as exc:
                # NOTE: an exception out of handle() becomes TorchServe's 503 "Prediction failed", which reads as
                # "try again later": a forward that fails on these rows answers why, for their requests only.
                for i, array in members:
                    answers[i] = f"forward failed on shape {list(array.shape)}: {type(exc).__name__}: {exc}"
                continue
            start = 0
            for i, array in members:
                stop = start + array.shape[0]
                answers[i] = encode(out[start:stop])
                start = stop
        return answers


_service = FleetHandler()


def handle(data: list[dict[str, Any]] | None, context: Any) -> list[Any] | None:
    """TorchServe's function entry point: initialise on first call, then one answer per request."""
    if _service.module is None:
        _service.initialize(context)
    if data is None:
        return None
    return _service.handle(data, context)
