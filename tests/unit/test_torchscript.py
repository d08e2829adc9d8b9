"""TorchScript conversion and the TorchScript adapter: equivalence with eager PyTorch, artefact reuse."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from shared.errors import InvalidInputError
from shared.schemas import ModelKey, ModelType
from shared.settings import FleetSettings, TorchScriptSettings
from workers.models import inference
from workers.serving.adapters.simple import SimpleServingAdapter
from workers.serving.adapters.torchscript import TorchScriptServingAdapter, resolve_device
from workers.models.registry import build_model, validate_config
from workers.serving.examples import example_inputs
from workers.serving import torchscript_convert as convert
from workers.store import ModelStore, file_sha256
from workers.serving.torchscript_convert import (ATOL, RTOL, CompileOptions, compile_module, configure_fusion,
                                         load_artefact, sidecar_path, source_hash, store_artefact_path)
from workers.training.synthetic import generate_bars

TYPES = [t.value for t in ModelType]
FORECASTERS = [t.value for t in ModelType if t.is_forecaster]
VOCAB = ["shares", "jump", "after", "earnings", "beat", "plunge", "profit", "warning", "raises", "guidance"]
TEXTS = ["Shares jump after earnings beat", "Profit warning: shares plunge", "Company raises guidance",
         "Nothing known here"]


def small_config(model_type: str) -> dict:
    extra = {"vocab": VOCAB, "max_len": 12} if model_type == "sentiment" else {"context_length": 48,
                                                                                 "prediction_length": 12}
    return validate_config(model_type, extra).model_dump()


@pytest.fixture()
def store(tmp_path: Path) -> ModelStore:
    """Registry defaults (shortened windows) with random weights, one model per type, symbol ``T``."""
    store = ModelStore(tmp_path / "store")
    torch.manual_seed(0)
    for mtype in TYPES:
        config = small_config(mtype)
        store.save(ModelKey(symbol="T", timeframe="1h", model_type=mtype), build_model(mtype, config), config,
                   {"heldout": {"mae": 0.5, "naive_mae": 1.0}})
    return store


def settings_for(store: ModelStore, **torchscript: object) -> FleetSettings:
    return FleetSettings(model_store_dir=store.root, torchscript=TorchScriptSettings(**torchscript))


def model_dir(store: ModelStore, mtype: str) -> Path:
    return store.model_dir(ModelKey(symbol="T", timeframe="1h", model_type=mtype))


def series() -> np.ndarray:
    return generate_bars("T", "1h", n_bars=200, seed=7).values


def assert_same_prediction(got, want, mtype: str, config: dict, data) -> None:
    """The documented tolerance, after de-normalisation.

    Forecasts: the model outputs (normalised, z) agree within ``ATOL + RTOL * |z|``, so the de-normalised
    forecasts agree within ``(ATOL + RTOL * |z|) * std`` per channel, ``std`` being the input window's.
    Sentiment: probabilities agree within ``ATOL``.
    """
    got, want = np.asarray(got.predictions), np.asarray(want.predictions)
    assert got.shape == want.shape
    if mtype == "sentiment":
        np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)
        return
    prepared = inference.prepare_series(data, config)
    z = np.abs((want - prepared.mean) / prepared.std)
    assert (np.abs(got - want) <= (ATOL + RTOL * z) * prepared.std + 1e-9).all(), np.abs(got - want).max()


def load(adapter, store: ModelStore, mtype: str):
    return adapter.load_model(model_dir(store, mtype), "T", "1h", mtype)


@pytest.mark.parametrize("mode", ["trace", "script"])
@pytest.mark.parametrize("mtype", TYPES)
def test_compiled_matches_eager_for_every_model_type(mtype: str, mode: str) -> None:
    torch.manual_seed(1)
    config = small_config(mtype)
    model = build_model(mtype, config)
    for optimize in (False, True):
        module = compile_module(model, mtype, config, CompileOptions(mode=mode, optimize=optimize))
        x = example_inputs(mtype, config, batch=5)  # another batch size than the trace's
        with torch.inference_mode():
            want, got = model(x), module(x)
        torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("mode", ["trace", "script"])
@pytest.mark.parametrize("mtype", TYPES)
def test_adapter_predictions_match_the_simple_adapter(store: ModelStore, mtype: str, mode: str) -> None:
    settings = settings_for(store, compile_mode=mode)
    ts, simple = TorchScriptServingAdapter(settings), SimpleServingAdapter(settings)
    info = load(ts, store, mtype)
    load(simple, store, mtype)
    data = TEXTS if mtype == "sentiment" else series()
    for _ in range(3):  # the profiling executor optimises after the first runs: check those too
        assert_same_prediction(ts.predict(info.model_id, data), simple.predict(info.model_id, data), mtype,
                               info.metadata["config"], data)
    if mtype != "sentiment":
        batch = ts.predict_many(info.model_id, [(data, None), (data[:10], None), (data[-60:], None)])
        assert isinstance(batch[1], InvalidInputError)
        assert_same_prediction(batch[2], simple.predict(info.model_id, data[-60:]), mtype, info.metadata["config"],
                               data[-60:])


def test_artefact_is_saved_next_to_the_model_and_reused(store: ModelStore) -> None:
    settings = settings_for(store)
    first = load(TorchScriptServingAdapter(settings), store, "patchtst")
    report = first.metadata["torchscript"]
    artefact = store_artefact_path(model_dir(store, "patchtst"), "T_1h_patchtst")
    assert report["reused"] is False and report["saved"] is True and report["compile_ms"] > 0
    assert report["path"] == str(artefact) and artefact.is_file()
    sidecar = json.loads(sidecar_path(artefact).read_text())
    assert sidecar["source_hash"] == report["source_hash"] and sidecar["torch"] == torch.__version__
    assert not [p for p in artefact.parent.iterdir() if p.name.endswith(".tmp")]  # atomic writes left nothing

    # Another process (a fresh adapter) loads the archive instead of compiling.
    second = load(TorchScriptServingAdapter(settings), store, "patchtst")
    again = second.metadata["torchscript"]
    assert again["reused"] is True and again["compile_ms"] == 0 and again["source_hash"] == report["source_hash"]
    assert again["load_ms"] < report["compile_ms"]
    assert second.memory_usage_mb == first.memory_usage_mb > 0


def test_in_process_reload_after_unload_reuses_too(store: ModelStore) -> None:
    adapter = TorchScriptServingAdapter(settings_for(store))
    assert load(adapter, store, "sentiment").metadata["torchscript"]["reused"] is False
    assert load(adapter, store, "sentiment").metadata["torchscript"]["reused"] is False  # a cache hit: same info
    assert adapter.unload_model("T_1h_sentiment")
    assert load(adapter, store, "sentiment").metadata["torchscript"]["reused"] is True


def test_changed_weights_compile_again(store: ModelStore) -> None:
    settings = settings_for(store)
    before = load(TorchScriptServingAdapter(settings), store, "patchtsmixer").metadata["torchscript"]
    directory = model_dir(store, "patchtsmixer")
    weights = directory / "weights.safetensors"
    state = {k: v + 0.01 for k, v in load_file(str(weights)).items()}
    save_file(state, str(weights))
    meta = json.loads((directory / "meta.json").read_text())
    meta["weights_sha256"] = file_sha256(weights)
    (directory / "meta.json").write_text(json.dumps(meta))

    ts, simple = TorchScriptServingAdapter(settings), SimpleServingAdapter(settings)
    after = load(ts, store, "patchtsmixer")
    assert after.metadata["torchscript"]["reused"] is False
    assert after.metadata["torchscript"]["source_hash"] != before["source_hash"]
    load(simple, store, "patchtsmixer")
    data = series()
    assert_same_prediction(ts.predict("T_1h_patchtsmixer", data), simple.predict("T_1h_patchtsmixer", data),
                           "patchtsmixer", after.metadata["config"], data)


def test_compile_settings_are_part_of_the_hash(store: ModelStore) -> None:
    directory = model_dir(store, "enhanced_transformer")
    config = json.loads((directory / "config.json").read_text())
    hashes = {source_hash(directory, config, CompileOptions(mode=m, optimize=o)) for m in ("trace", "script")
              for o in (True, False)}
    assert len(hashes) == 4
    traced = load(TorchScriptServingAdapter(settings_for(store)), store, "enhanced_transformer")
    scripted = load(TorchScriptServingAdapter(settings_for(store, compile_mode="script")), store,
                    "enhanced_transformer")
    assert scripted.metadata["torchscript"]["reused"] is False
    assert scripted.metadata["torchscript"]["mode"] == "script" != traced.metadata["torchscript"]["mode"]


def test_corrupt_or_foreign_archive_is_not_reused(store: ModelStore) -> None:
    settings = settings_for(store)
    load(TorchScriptServingAdapter(settings), store, "patchtst")
    artefact = store_artefact_path(model_dir(store, "patchtst"), "T_1h_patchtst")
    artefact.write_bytes(b"not a TorchScript archive")
    info = load(TorchScriptServingAdapter(settings), store, "patchtst")
    assert info.metadata["torchscript"]["reused"] is False  # recompiled, and the job did not fail

    # A fresh sidecar cannot vouch for an archive compiled from another source: the hash inside decides.
    other = store_artefact_path(model_dir(store, "patchtsmixer"), "T_1h_patchtsmixer")
    load(TorchScriptServingAdapter(settings), store, "patchtsmixer")
    artefact.write_bytes(other.read_bytes())
    info = load(TorchScriptServingAdapter(settings), store, "patchtst")
    assert info.metadata["torchscript"]["reused"] is False
    _, provenance = load_artefact(artefact, "cpu")
    assert provenance["model_id"] == "T_1h_patchtst"


def test_read_only_store_still_serves(store: ModelStore, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_: object, **__: object) -> None:
        raise PermissionError(13, "Permission denied")

    # NOTE: a patched writer, not chmod: the tests may run as root, which writes into read-only directories.
    monkeypatch.setattr(convert, "save_artefact", refuse)
    adapter = TorchScriptServingAdapter(settings_for(store))
    info = load(adapter, store, "sentiment")
    assert info.metadata["torchscript"]["saved"] is False and info.metadata["torchscript"]["reused"] is False
    assert not store_artefact_path(model_dir(store, "sentiment"), "T_1h_sentiment").exists()
    assert len(adapter.predict("T_1h_sentiment", TEXTS).labels) == len(TEXTS)


def test_concurrent_loads_agree(store: ModelStore) -> None:
    settings = settings_for(store)
    adapters = [TorchScriptServingAdapter(settings) for _ in range(3)]
    infos: list = [None] * 3
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            infos[i] = load(adapters[i], store, "patchtst")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len({i.metadata["torchscript"]["source_hash"] for i in infos}) == 1
    _, provenance = load_artefact(store_artefact_path(model_dir(store, "patchtst"), "T_1h_patchtst"), "cpu")
    assert provenance["source_hash"] == infos[0].metadata["torchscript"]["source_hash"]


def test_metadata_and_health_describe_the_compilation(store: ModelStore) -> None:
    adapter = TorchScriptServingAdapter(settings_for(store, optimize_for_inference=False, enable_fusion=False))
    info = load(adapter, store, "patchtst")
    meta = info.metadata["torchscript"]
    assert meta["optimize"] is False and meta["mode"] == "trace" and meta["fusion"] is False
    assert info.metadata["adapter"] == "torchscript" and info.memory_usage_mb > 0
    health = adapter.health_check()
    assert health["healthy"] and health["compile_mode"] == "trace" and health["models_loaded"] == 1


def test_fusion_and_device_settings() -> None:
    assert configure_fusion(False, "cpu") is False
    # CPU fusion needs LLVM; without it the flag is reported off rather than silently slow.
    assert configure_fusion(True, "cpu") is bool(torch._C._llvm_enabled())
    configure_fusion(True, "cpu")
    assert resolve_device("cpu", "cpu") == "cpu"
    assert resolve_device("cuda", "cuda:1") == "cuda:1"
    assert resolve_device("cpu", "cuda:1") == "cpu"  # the pool's device wins over another kind


def test_artefact_names_keep_cpu_and_gpu_pools_apart(tmp_path) -> None:
    assert store_artefact_path(tmp_path, "A_1h_patchtst").name == "A_1h_patchtst_torchscript.pt"
    assert store_artefact_path(tmp_path, "A_1h_patchtst", "cuda:1").name == "A_1h_patchtst_torchscript.cuda.pt"
