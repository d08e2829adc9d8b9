"""The Triton model repository: ``config.pbtxt`` generation and writing a model's files.

Layout of one model (``<name>`` is the fleet's model id, ``<version>`` the store version)::

    <repository>/<name>/config.pbtxt
    <repository>/<name>/<version>/model.pt      TorchScript of the stored model (both backends)
    <repository>/<name>/<version>/model.json    provenance of model.pt (source hash; see torchscript_convert)
    <repository>/<name>/<version>/model.py      python backend only: a copy of workers/serving/adapters/triton_model.py

Two backends: ``pytorch_libtorch`` serves ``model.pt`` directly (GPU production); ``python`` runs it with torch
in Triton's Python backend (the only backend the ``nvidia-pytriton`` wheel ships). Both take the *normalised*
window ``[B, L, C]`` float32 (sentiment: token ids ``[B, T]`` int64) and return ``[B, H, C]`` (sentiment:
logits ``[B, 3]``); the batch dimension is implicit (``max_batch_size`` > 0, so dims omit it and metadata
shows it as -1). Configs are built as ``ModelConfig`` protobuf messages and written in text format, so every
generated file parses back into ``tritonclient.grpc.model_config_pb2.ModelConfig``.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from shared.schemas import ModelType
from workers.serving.fileio import atomic_write

INPUT_NAME = "INPUT__0"
OUTPUT_NAME = "OUTPUT__0"
MODEL_FILE = "model.pt"
PYTHON_FILE = "model.py"
CONFIG_FILE = "config.pbtxt"
#: The python-backend model copied into every version directory (this package's own file).
PYTHON_MODEL_SOURCE = Path(__file__).with_name("triton_model.py")

Backend = Literal["python", "pytorch_libtorch"]


@dataclass(frozen=True)
class TensorSpec:
    """One input or output, without the batch dimension."""

    name: str
    data_type: str
    """A ``ModelConfig`` type name: ``TYPE_FP32``, ``TYPE_INT64``."""
    dims: tuple[int, ...]

    @property
    def datatype(self) -> str:
        """The name the inference protocol uses (``FP32``, ``INT64``)."""
        return self.data_type.removeprefix("TYPE_")

    def metadata_shape(self) -> list[int]:
        """The shape model metadata reports for it: the batch dimension first, as -1."""
        return [-1, *self.dims]


def model_io(model_type: ModelType | str, config: dict[str, Any]) -> tuple[TensorSpec, TensorSpec]:
    """Input and output of a stored model, from its config."""
    if ModelType(model_type) is ModelType.SENTIMENT:
        labels = config.get("labels") or ("negative", "neutral", "positive")
        return (TensorSpec(INPUT_NAME, "TYPE_INT64", (int(config["max_len"]),)),
                TensorSpec(OUTPUT_NAME, "TYPE_FP32", (len(labels),)))
    length, horizon, channels = (int(config["context_length"]), int(config["prediction_length"]),
                                 int(config["n_channels"]))
    return (TensorSpec(INPUT_NAME, "TYPE_FP32", (length, channels)),
            TensorSpec(OUTPUT_NAME, "TYPE_FP32", (horizon, channels)))


def preferred_batch_sizes(max_batch_size: int) -> list[int]:
    """Quarter, half and full ``max_batch_size`` (deduplicated): what the dynamic batcher aims for."""
    return sorted({max(1, max_batch_size // 4), max(1, max_batch_size // 2), max_batch_size})


@dataclass(frozen=True)
class RepoModel:
    """Everything that goes into one model's ``config.pbtxt``."""

    name: str
    version: int
    backend: Backend
    input: TensorSpec
    output: TensorSpec
    max_batch_size: int = 32
    max_queue_delay_us: int = 2000
    device: str = "cpu"
    """``cpu`` -> ``KIND_CPU`` instances, ``cuda`` / ``cuda:N`` -> ``KIND_GPU`` (on GPU N when given)."""
    instance_count: int = 1
    parameters: dict[str, str] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return "KIND_GPU" if self.device.startswith("cuda") else "KIND_CPU"


def build_config(model: RepoModel) -> mc.ModelConfig:
    """The ``ModelConfig`` message of ``model``."""
    config = mc.ModelConfig(name=model.name, backend=model.backend, max_batch_size=model.max_batch_size)
    config.version_policy.latest.num_versions = 1
    for spec, target in ((model.input, config.input), (model.output, config.output)):
        tensor = target.add()
        tensor.name = spec.name
        tensor.data_type = mc.DataType.Value(spec.data_type)
        tensor.dims.extend(spec.dims)
    batching = config.dynamic_batching
    batching.preferred_batch_size.extend(preferred_batch_sizes(model.max_batch_size))
    batching.max_queue_delay_microseconds = model.max_queue_delay_us
    group = config.instance_group.add()
    group.kind = mc.ModelInstanceGroup.Kind.Value(model.kind)
    group.count = model.instance_count
    if model.kind == "KIND_GPU" and ":" in model.device:
        group.gpus.append(int(model.device.split(":", 1)[1]))
    params = dict(model.parameters)
    if model.backend == "pytorch_libtorch":
        params.setdefault("INFERENCE_MODE", "true")  # libtorch backend: run under torch.inference_mode
    else:
        params.setdefault("torchscript_file", MODEL_FILE)
        params.setdefault("torch_num_threads", "1")
    for key, value in sorted(params.items()):
        config.parameters[key].string_value = value
    return config


def render_config(model: RepoModel) -> str:
    """``config.pbtxt`` text of ``model``."""
    return text_format.MessageToString(build_config(model))


def parse_config(text: str) -> mc.ModelConfig:
    """Parse ``config.pbtxt`` text (raises ``text_format.ParseError`` when it is not a valid ModelConfig)."""
    return text_format.Parse(text, mc.ModelConfig())


def model_dir(repository: Path, name: str) -> Path:
    return Path(repository) / name


def version_dir(repository: Path, name: str, version: int) -> Path:
    return model_dir(repository, name) / str(version)


def _write_if_changed(path: Path, data: bytes) -> bool:
    """Atomically write ``data`` to ``path`` unless it already holds exactly that; True when written."""
    try:
        if path.read_bytes() == data:
            return False
    except OSError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
    return True


def write_model_files(repository: Path, model: RepoModel) -> bool:
    """Write ``config.pbtxt`` (and ``model.py`` for the python backend) of ``model``; ``model.pt`` is written
    separately (:func:`workers.serving.torchscript_convert.ensure_torchscript`). Other versions of the model are
    removed, so that the ``latest 1`` policy serves this one. Returns True when anything changed.
    """
    changed = False
    vdir = version_dir(repository, model.name, model.version)
    vdir.mkdir(parents=True, exist_ok=True)
    if model.backend == "python":
        changed |= _write_if_changed(vdir / PYTHON_FILE, PYTHON_MODEL_SOURCE.read_bytes())
    changed |= _write_if_changed(model_dir(repository, model.name) / CONFIG_FILE, render_config(model).encode())
    for other in model_dir(repository, model.name).iterdir():
        if other.is_dir() and other.name.isdigit() and other.name != str(model.version):
            shutil.rmtree(other, ignore_errors=True)
            changed = True
    return changed
