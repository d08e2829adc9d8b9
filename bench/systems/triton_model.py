"""The Triton Python-backend model of the benchmark (copied into the repository as ``<model>/1/model.py``).

Triton's dynamic batcher hands ``execute`` several requests at once; they run as one forward through
:class:`bench.systems.forecaster.Forecaster` (the fleet's loader and pre/post-processing). Settings come from
the model config's ``parameters``: ``repo_root``, ``store_dir``, ``symbol``, ``torch_threads``.
"""

import json
import sys

import numpy as np
import triton_python_backend_utils as pb_utils  # provided by the Python backend's stub


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        if params["repo_root"] not in sys.path:
            sys.path.insert(0, params["repo_root"])
        import torch

        threads = int(params["torch_threads"])
        torch.set_num_threads(threads)
        from bench.systems.forecaster import Forecaster

        self.forecaster = Forecaster(params["store_dir"], params["symbol"], threads)

    def execute(self, requests):
        arrays, counts = [], []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "INPUT").as_numpy()
            arrays.extend(x)
            counts.append(len(x))
        try:
            outs = self.forecaster.predict_batch(arrays)
        except Exception as exc:  # every request of the batch fails with the same error
            error = pb_utils.TritonError(f"{type(exc).__name__}: {exc}")
            return [pb_utils.InferenceResponse(output_tensors=[], error=error) for _ in requests]
        responses, k = [], 0
        for n in counts:
            y = np.stack(outs[k:k + n]).astype(np.float32)
            k += n
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("OUTPUT", y)]))
        return responses
