"""The Triton Python-backend model of the fleet: runs a TorchScript ``model.pt`` with torch.

:mod:`workers.serving.adapters.triton_repo` copies this file, as it is, to ``<repository>/<model>/<version>/model.py``;
Triton's Python backend imports it in its stub process, where the fleet's packages may not be importable. So it
stays self-contained: the standard library, numpy, torch, and ``triton_python_backend_utils`` (which exists
only inside the stub, hence imported in :meth:`TritonPythonModel.initialize`).

It runs only the model's forward on what the worker sends (normalised windows ``[B, L, C]`` float32, or token
ids ``[B, T]`` int64): pre- and post-processing stay in the worker (:mod:`workers.models.inference`), so that every
adapter computes the same forecast. The requests of one ``execute`` call (Triton's dynamic batcher groups
them) run as one forward.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import torch


class TritonPythonModel:
    """Triton's Python-backend entry point (``initialize`` / ``execute`` / ``finalize``)."""

    def initialize(self, args: dict[str, Any]) -> None:
        import triton_python_backend_utils as pb_utils  # only inside Triton's stub

        self.pb = pb_utils
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in (config.get("parameters") or {}).items()}
        torch.set_num_threads(max(1, int(params.get("torch_num_threads") or 1)))
        if args.get("model_instance_kind") == "GPU":
            self.device = torch.device(f"cuda:{args.get('model_instance_device_id', 0)}")
        else:
            self.device = torch.device("cpu")
        path = os.path.join(args["model_repository"], str(args["model_version"]),
                            params.get("torchscript_file") or "model.pt")
        self.module = torch.jit.load(path, map_location=self.device).eval()
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]
        self.output_dtype = pb_utils.triton_string_to_numpy(config["output"][0]["data_type"])

    def execute(self, requests: list[Any]) -> list[Any]:
        pb = self.pb
        arrays = [pb.get_input_tensor_by_name(r, self.input_name).as_numpy() for r in requests]
        try:
            batch = torch.from_numpy(np.concatenate(arrays, axis=0)).to(self.device)
            with torch.inference_mode():
                out = self.module(batch).to("cpu").numpy().astype(self.output_dtype, copy=False)
        except Exception as exc:  # one bad batch fails its requests, never the model instance
            error = pb.TritonError(f"forward failed: {type(exc).__name__}: {exc}")
            return [pb.InferenceResponse(output_tensors=[], error=error) for _ in requests]
        responses, start = [], 0
        for arr in arrays:
            stop = start + arr.shape[0]
            responses.append(pb.InferenceResponse(
                output_tensors=[pb.Tensor(self.output_name, np.ascontiguousarray(out[start:stop]))]))
            start = stop
        return responses

    def finalize(self) -> None:
        self.module = None
