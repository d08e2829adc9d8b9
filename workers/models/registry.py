"""Model type -> config class and model class; building models from stored configs.

Stored configs (``config.json``) carry a ``"model_type"`` key besides the config fields; :func:`build_model`
accepts them as they are.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError
from torch import nn

from shared.errors import ModelLoadError
from shared.schemas import ModelType
from workers.models.enhanced_transformer import EnhancedTransformer, EnhancedTransformerConfig
from workers.models.patchtsmixer import PatchTSMixer, PatchTSMixerConfig
from workers.models.patchtst import PatchTST, PatchTSTConfig
from workers.models.sentiment import SentimentClassifier, SentimentConfig

CONFIG_CLASSES: dict[ModelType, type[BaseModel]] = {
    ModelType.PATCHTST: PatchTSTConfig,
    ModelType.PATCHTSMIXER: PatchTSMixerConfig,
    ModelType.ENHANCED_TRANSFORMER: EnhancedTransformerConfig,
    ModelType.SENTIMENT: SentimentConfig,
}
MODEL_CLASSES: dict[ModelType, type[nn.Module]] = {
    ModelType.PATCHTST: PatchTST,
    ModelType.PATCHTSMIXER: PatchTSMixer,
    ModelType.ENHANCED_TRANSFORMER: EnhancedTransformer,
    ModelType.SENTIMENT: SentimentClassifier,
}


def validate_config(model_type: ModelType | str, config: dict[str, Any]) -> BaseModel:
    """The typed config of ``config`` (a stored ``"model_type"`` key is allowed and checked).

    Raises:
        ModelLoadError: unknown model type, a mismatching ``model_type`` key, or invalid fields.
    """
    try:
        mtype = ModelType(model_type)
    except ValueError:
        raise ModelLoadError(f"unknown model type {model_type!r}") from None
    fields = dict(config)
    stored = fields.pop("model_type", mtype.value)
    if stored != mtype.value:
        raise ModelLoadError(f"config is for a {stored} model, not {mtype.value}")
    try:
        return CONFIG_CLASSES[mtype].model_validate(fields)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in exc.errors())
        raise ModelLoadError(f"invalid {mtype.value} config: {problems}") from None


def build_model(model_type: ModelType | str, config: dict[str, Any]) -> nn.Module:
    """A freshly initialised model of ``model_type`` for ``config``, in eval mode."""
    typed = validate_config(model_type, config)
    model = MODEL_CLASSES[ModelType(model_type)](typed)
    return model.eval()


def param_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
