"""Models restored from per-process templates: exactly the old path's numbers, independent clones, strict keys."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from shared.schemas import ModelKey, ModelType
from workers.models import templates
from workers.models.registry import MODEL_CLASSES, build_model, param_bytes, validate_config
from workers.serving.examples import example_inputs
from workers.store import ModelStore

from tests.unit.test_models import TINY_CONFIGS


@pytest.fixture(autouse=True)
def _fresh_templates():
    templates.clear()
    yield
    templates.clear()


def _trained(model_type: ModelType, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model(model_type, TINY_CONFIGS[model_type])
    # The enhanced transformer's head starts at zero; give every weight a value of its own.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _old_path(model_type: ModelType, weights: Path) -> torch.nn.Module:
    """The load path before the templates: construct (initialisers run), copy the stored weights in."""
    model = build_model(model_type, TINY_CONFIGS[model_type])
    model.load_state_dict(load_file(str(weights)), strict=True)
    return model.eval()


@pytest.mark.parametrize("model_type", list(ModelType))
def test_the_fast_path_predicts_exactly_what_the_old_path_did(tmp_path: Path, model_type: ModelType) -> None:
    store = ModelStore(tmp_path)
    key = ModelKey(symbol="T", timeframe="1h", model_type=model_type)
    _, path = store.save(key, _trained(model_type, 1), TINY_CONFIGS[model_type], {})
    fast = store.load(key).model
    old = _old_path(model_type, path / "weights.safetensors")
    x = example_inputs(model_type, TINY_CONFIGS[model_type], batch=3)
    with torch.inference_mode():
        assert torch.equal(fast(x), old(x))
    assert not fast.training and [n for n, _ in fast.named_parameters()] == [n for n, _ in old.named_parameters()]
    assert [p.requires_grad for p in fast.parameters()] == [p.requires_grad for p in old.parameters()]
    assert fast.state_dict().keys() == old.state_dict().keys()
    for name, buf in old.named_buffers():  # non-persistent buffers (a sinusoid table) are real, as built
        assert torch.equal(dict(fast.named_buffers())[name], buf)
    assert param_bytes(fast) == param_bytes(old)


def test_clones_of_one_template_are_independent_and_hold_the_stored_tensors() -> None:
    mtype = ModelType.ENHANCED_TRANSFORMER
    typed = validate_config(mtype, TINY_CONFIGS[mtype])
    first, second = _state(_trained(mtype, 1)), _state(_trained(mtype, 2))
    a, b = templates.restore(mtype, typed, first), templates.restore(mtype, typed, second)
    x = example_inputs(mtype, TINY_CONFIGS[mtype], batch=2)
    with torch.inference_mode():
        assert not torch.equal(a(x), b(x))
    assert a.head[0].weight.data_ptr() == first["head.0.weight"].data_ptr()  # assigned, not copied
    assert a.sinusoid.data_ptr() != b.sinusoid.data_ptr()  # each clone owns its buffers
    assert not {id(m) for m in a.modules()} & {id(m) for m in b.modules()}
    template = templates.template(mtype, typed)
    assert all(p.is_meta for p in template.module.parameters())  # the template holds no weights
    a.register_forward_hook(lambda *args: None)
    assert not b._forward_hooks and not template.module._forward_hooks


def test_sentiment_models_share_a_template_by_vocabulary_size() -> None:
    mtype = ModelType.SENTIMENT
    base = TINY_CONFIGS[mtype]
    same_size = validate_config(mtype, {**base, "vocab": [w + "x" for w in base["vocab"]]})
    bigger = validate_config(mtype, {**base, "vocab": [*base["vocab"], "more"]})
    assert templates.template(mtype, validate_config(mtype, base)) is templates.template(mtype, same_size)
    assert templates.template(mtype, bigger) is not templates.template(mtype, same_size)


def test_missing_unexpected_and_misshaped_weights_are_refused() -> None:
    mtype = ModelType.PATCHTST
    typed = validate_config(mtype, TINY_CONFIGS[mtype])
    state = _state(_trained(mtype, 1))
    state.pop("head.bias")
    state["extra"] = torch.zeros(1)
    state["embed.weight"] = torch.zeros(3, 3)
    with pytest.raises(RuntimeError) as err:
        templates.restore(mtype, typed, state)
    message = str(err.value)
    assert "missing keys ['head.bias']" in message and "unexpected keys ['extra']" in message
    assert "size mismatch for embed.weight: stored [3, 3]" in message


def test_a_module_that_cannot_be_cloned_is_built_the_ordinary_way(monkeypatch: pytest.MonkeyPatch) -> None:
    mtype = ModelType.PATCHTSMIXER
    typed = validate_config(mtype, TINY_CONFIGS[mtype])
    model = _trained(mtype, 3)
    model.register_forward_hook(lambda *args: None)
    assert not templates._clonable(model)
    monkeypatch.setattr(templates, "_clonable", lambda module: False)
    restored = templates.restore(mtype, typed, _state(model))
    x = example_inputs(mtype, TINY_CONFIGS[mtype], batch=2)
    with torch.inference_mode():
        assert torch.equal(restored(x), model.eval()(x))
    assert type(restored) is MODEL_CLASSES[mtype] and not restored.training


def test_templates_are_bounded_least_recently_used_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(templates, "MAX_TEMPLATES", 2)
    mtype = ModelType.PATCHTST
    configs = [validate_config(mtype, {**TINY_CONFIGS[mtype], "d_model": d}) for d in (8, 16, 32)]
    first = templates.template(mtype, configs[0])
    templates.template(mtype, configs[1])
    assert templates.template(mtype, configs[0]) is first  # a use: configs[1] is now the oldest
    templates.template(mtype, configs[2])
    assert len(templates._templates) == 2 and templates.template(mtype, configs[0]) is first
