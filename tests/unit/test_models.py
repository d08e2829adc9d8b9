"""Models: shapes, TorchScript (trace and script) parity, configs, the sentiment tokenizer, the registry."""

from __future__ import annotations


import pytest
import torch

from shared.errors import ModelLoadError
from shared.schemas import ModelType
from workers.models import EncoderLayer, Patcher, patch_count
from workers.models.registry import (
    CONFIG_CLASSES,
    MODEL_CLASSES,
    build_model,
    n_params,
    param_bytes,
)
from workers.models.sentiment import encode, tokenize
from workers.serving.examples import example_inputs

FORECASTERS = [m for m in ModelType if m.is_forecaster]
TINY = {"context_length": 32, "prediction_length": 8, "n_channels": 3}
TINY_CONFIGS = {
    ModelType.PATCHTST: {**TINY, "patch_len": 8, "stride": 4, "d_model": 16, "n_heads": 2, "n_layers": 1,
                         "d_ff": 32},
    ModelType.PATCHTSMIXER: {**TINY, "patch_len": 8, "stride": 4, "d_model": 16, "n_layers": 2,
                             "channel_mixing": True},
    ModelType.ENHANCED_TRANSFORMER: {**TINY, "d_model": 16, "n_heads": 2, "n_layers": 1, "d_ff": 32,
                                     "moving_avg": 5},
    ModelType.SENTIMENT: {"vocab": ["shares", "jump", "after", "earnings", "beat"], "max_len": 12,
                          "embed_dim": 8, "hidden_dim": 8, "n_buckets": 64},
}


def _model(model_type: ModelType) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(model_type, TINY_CONFIGS[model_type])
    if model_type is ModelType.ENHANCED_TRANSFORMER:
        # The head starts at zero (training starts from the linear skip); make it count in the parity checks.
        torch.nn.init.normal_(model.head[-1].weight, std=0.1)
    return model


@pytest.mark.parametrize("model_type", FORECASTERS)
def test_forecasters_map_a_window_to_the_horizon(model_type: ModelType) -> None:
    model = _model(model_type)
    x = example_inputs(model_type, TINY_CONFIGS[model_type], batch=4)
    assert x.shape == (4, 32, 3) and x.dtype == torch.float32
    assert model(x).shape == (4, 8, 3)
    assert not model.training


@pytest.mark.parametrize("model_type", list(ModelType))
def test_trace_and_script_match_eager(model_type: ModelType) -> None:
    model = _model(model_type)
    config = TINY_CONFIGS[model_type]
    # Traced with autograd on (the trace's own check re-runs it): the models take one path in every grad mode.
    traced = torch.jit.trace(model, example_inputs(model_type, config, batch=2))
    scripted = torch.jit.script(model)
    with torch.inference_mode():
        for batch in (1, 5):  # a batch size the trace did not see
            x = example_inputs(model_type, config, batch=batch)
            eager = model(x)
            assert torch.allclose(traced(x), eager, atol=1e-5, rtol=0)
            assert torch.allclose(scripted(x), eager, atol=1e-5, rtol=0)


def test_patchtst_reference_size_has_about_1_2m_parameters() -> None:
    config = {"context_length": 512, "n_channels": 7, "prediction_length": 96, "patch_len": 16, "stride": 8,
              "d_model": 128, "n_layers": 3, "n_heads": 4, "d_ff": 256}
    model = build_model(ModelType.PATCHTST, config)
    assert 1_000_000 <= n_params(model) <= 1_400_000
    assert model(torch.zeros(1, 512, 7)).shape == (1, 96, 7)


def test_patcher_pads_the_end_with_the_last_value() -> None:
    patcher = Patcher(context_length=10, patch_len=4, stride=3)
    z = torch.arange(10, dtype=torch.float32).unsqueeze(0)
    patches = patcher(z)
    assert patches.shape == (1, patch_count(10, 4, 3), 4) == (1, 4, 4)
    assert patches[0, -1].tolist() == [9.0, 9.0, 9.0, 9.0]
    assert patches[0, 0].tolist() == [0.0, 1.0, 2.0, 3.0]


def test_patchtst_is_channel_independent_and_the_mixer_can_mix() -> None:
    x = example_inputs(ModelType.PATCHTST, TINY_CONFIGS[ModelType.PATCHTST], batch=1)
    changed = x.clone()
    changed[..., 1] += 1.0
    patchtst = _model(ModelType.PATCHTST)
    assert torch.allclose(patchtst(x)[..., 0], patchtst(changed)[..., 0])
    assert not torch.allclose(patchtst(x)[..., 1], patchtst(changed)[..., 1])
    mixer = _model(ModelType.PATCHTSMIXER)  # channel_mixing=True in the tiny config
    assert not torch.allclose(mixer(x)[..., 0], mixer(changed)[..., 0])


@pytest.mark.parametrize(("model_type", "bad"), [
    (ModelType.PATCHTST, {"d_model": 30, "n_heads": 4}),
    (ModelType.PATCHTST, {"patch_len": 64}),
    (ModelType.PATCHTSMIXER, {"unknown_field": 1}),
    (ModelType.ENHANCED_TRANSFORMER, {"moving_avg": 4}),
    (ModelType.SENTIMENT, {"labels": ["bad", "good"]}),
    (ModelType.PATCHTST, {"model_type": "patchtsmixer"}),
])
def test_bad_configs_raise_model_load_error(model_type: ModelType, bad: dict) -> None:
    with pytest.raises(ModelLoadError):
        build_model(model_type, {**TINY_CONFIGS[model_type], **bad})


def test_stored_configs_with_model_type_build() -> None:
    model = build_model("patchtsmixer", {**TINY_CONFIGS[ModelType.PATCHTSMIXER], "model_type": "patchtsmixer"})
    assert isinstance(model, MODEL_CLASSES[ModelType.PATCHTSMIXER])
    with pytest.raises(ModelLoadError, match="unknown model type"):
        build_model("lstm", {})


def test_default_configs_are_the_small_sizes() -> None:
    patchtst = CONFIG_CLASSES[ModelType.PATCHTST]()
    assert (patchtst.context_length, patchtst.prediction_length, patchtst.patch_len, patchtst.stride,
            patchtst.d_model, patchtst.n_heads, patchtst.n_layers, patchtst.d_ff) == (96, 24, 16, 8, 32, 4, 2, 64)


def test_tokenizer_and_encoding() -> None:
    assert tokenize("Shares JUMP 5.5% after Q3 earnings-beat!") == ["shares", "jump", "5.5%", "after", "q",
                                                                    "3", "earnings", "beat"]
    ids = encode(["shares jump", "unknown words here", ""], ["shares", "jump"], max_len=2)
    assert ids.tolist() == [[2, 3], [1, 1], [0, 0]]
    assert ids.dtype == torch.long


def test_sentiment_ignores_padding() -> None:
    model = _model(ModelType.SENTIMENT)
    short = encode(["shares jump"], TINY_CONFIGS[ModelType.SENTIMENT]["vocab"], max_len=4)
    longer = encode(["shares jump"], TINY_CONFIGS[ModelType.SENTIMENT]["vocab"], max_len=12)
    assert torch.allclose(model(short), model(longer), atol=1e-6)
    assert model(example_inputs(ModelType.SENTIMENT, TINY_CONFIGS[ModelType.SENTIMENT], batch=3)).shape == (3, 3)


def test_param_bytes_counts_parameters_and_buffers() -> None:
    model = _model(ModelType.ENHANCED_TRANSFORMER)
    expected = 4 * (n_params(model) + model.sinusoid.numel())
    assert param_bytes(model) == expected


def test_encoder_layer_computes_what_the_stock_pytorch_layer_does() -> None:
    torch.manual_seed(0)
    ours = EncoderLayer(16, 4, 32, 0.0).eval()
    stock = torch.nn.TransformerEncoderLayer(16, 4, 32, 0.0, activation="gelu", batch_first=True,
                                             norm_first=True).eval()
    stock.load_state_dict(ours.state_dict())
    x = torch.randn(3, 10, 16)
    with torch.inference_mode():  # the stock layer takes its fused fast path here
        assert torch.allclose(ours(x), stock(x), atol=1e-5)
    assert torch.allclose(ours(x), stock(x), atol=1e-5)
