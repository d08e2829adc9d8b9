"""The model store: versions, atomic saves, safetensors round trips, confinement to the store root."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from shared.errors import InvalidInputError, ModelLoadError, ModelNotFoundError
from shared.schemas import ModelKey, ModelType
from workers.models.registry import build_model
from workers.serving.examples import example_inputs
from workers.store import ModelStore

from tests.unit.test_models import TINY_CONFIGS

CONFIG = {"context_length": 16, "prediction_length": 4, "n_channels": 5, "patch_len": 8, "stride": 4,
          "d_model": 8, "n_layers": 1}
KEY = ModelKey(symbol="AAPL", timeframe="1h", model_type="patchtsmixer")
META = {"seed": 0, "train_seconds": 0.1, "heldout": {"mae": 0.5, "naive_mae": 1.0},
        "training_range": {"start": "a", "end": "b", "n_bars": 10}}


@pytest.fixture()
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "store")


def _save(store: ModelStore, key: ModelKey = KEY, seed: int = 0) -> tuple[str, Path, torch.nn.Module]:
    torch.manual_seed(seed)
    model = build_model(key.model_type, CONFIG)
    version, path = store.save(key, model, CONFIG, META)
    return version, path, model


def test_save_and_load_round_trip(store: ModelStore) -> None:
    version, path, model = _save(store)
    assert version == "1" and path == store.root.resolve() / "AAPL" / "1h" / "patchtsmixer" / "1"
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "meta.json", "weights.safetensors"]
    config = json.loads((path / "config.json").read_text())
    assert config == {**CONFIG, "model_type": "patchtsmixer"}
    loaded = store.load(KEY)
    assert loaded.version == "1" and loaded.path == path and not loaded.model.training
    for field in ("version", "created_at", "training_range", "heldout", "seed", "train_seconds", "n_params",
                  "weights_sha256"):
        assert field in loaded.meta
    x = example_inputs(KEY.model_type, CONFIG, batch=2)
    with torch.inference_mode():
        assert torch.equal(loaded.model(x), model(x))


def test_weights_are_safetensors_not_pickle(store: ModelStore) -> None:
    _, path, model = _save(store)
    raw = (path / "weights.safetensors").read_bytes()
    assert not raw.startswith(b"PK") and not raw.startswith(b"\x80")  # neither torch.save zip nor pickle
    with safe_open(str(path / "weights.safetensors"), framework="pt") as fh:
        assert set(fh.keys()) == set(model.state_dict())


def test_versions_increase_and_leave_no_temporary_directories(store: ModelStore) -> None:
    assert store.versions(KEY) == []
    for expected in ("1", "2", "3"):
        assert _save(store)[0] == expected
    assert store.versions(KEY) == ["1", "2", "3"]
    assert store.load(KEY, "2").version == "2" and store.load(KEY).version == "3"
    assert sorted(os.listdir(store.model_dir(KEY).parent)) == ["1", "2", "3"]


def test_missing_models_and_versions(store: ModelStore) -> None:
    with pytest.raises(ModelNotFoundError, match="AAPL_1h_patchtsmixer is not in the model store"):
        store.model_dir(KEY)
    _save(store)
    with pytest.raises(ModelNotFoundError, match="no version 7"):
        store.load(KEY, "7")
    with pytest.raises(ModelNotFoundError):
        store.load_from_path("AAPL/1h/patchtsmixer/9")


def test_load_from_path_accepts_paths_inside_the_store(store: ModelStore) -> None:
    _, path, _ = _save(store)
    assert store.load_from_path(path).version == "1"
    assert store.load_from_path("AAPL/1h/patchtsmixer/1").path == path


def test_load_from_path_refuses_paths_outside_the_store(store: ModelStore, tmp_path: Path) -> None:
    _, path, _ = _save(store)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    for name in ("config.json", "meta.json", "weights.safetensors"):
        (outside / name).write_bytes((path / name).read_bytes())
    with pytest.raises(InvalidInputError, match="outside the model store"):
        store.load_from_path(outside)
    with pytest.raises(InvalidInputError, match=r"'\.\.'"):
        store.load_from_path(store.root / "AAPL" / ".." / "AAPL" / "1h" / "patchtsmixer" / "1")
    with pytest.raises(InvalidInputError):
        store.load_from_path("../elsewhere")
    link = store.root / "AAPL" / "1h" / "patchtsmixer" / "2"
    link.symlink_to(outside, target_is_directory=True)
    with pytest.raises(InvalidInputError, match="outside the model store"):
        store.load_from_path(link)


def test_corrupt_artefacts_raise_model_load_error(store: ModelStore) -> None:
    _, path, _ = _save(store)
    weights = path / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="sha256"):
        store.load(KEY)
    _, path2, _ = _save(store)
    config = json.loads((path2 / "config.json").read_text())
    (path2 / "config.json").write_text(json.dumps({**config, "d_model": 16}))
    with pytest.raises(ModelLoadError, match="cannot load weights"):
        store.load(KEY, "2")
    (path2 / "config.json").write_text(json.dumps({**config, "bogus": 1}))
    with pytest.raises(ModelLoadError, match="invalid patchtsmixer config"):
        store.load(KEY, "2")


def test_list_models_summarises_each_model(store: ModelStore) -> None:
    assert store.list_models() == []
    _save(store)
    _save(store)
    other = ModelKey(symbol="MSFT", timeframe="1h", model_type="patchtsmixer")
    _save(store, other)
    listed = store.list_models()
    assert [m["model_id"] for m in listed] == ["AAPL_1h_patchtsmixer", "MSFT_1h_patchtsmixer"]
    first = listed[0]
    assert first["versions"] == ["1", "2"] and first["latest"] == "2"
    assert first["symbol"] == "AAPL" and first["timeframe"] == "1h" and first["model_type"] == "patchtsmixer"
    assert first["meta"]["heldout"] == META["heldout"] and "n_params" in first["meta"]
    assert "weights_sha256" not in first["meta"]


@pytest.mark.parametrize("model_type", ["patchtst", "patchtsmixer", "enhanced_transformer", "sentiment"])
def test_every_model_type_round_trips(store: ModelStore, model_type: str) -> None:
    config = TINY_CONFIGS[ModelType(model_type)]
    key = ModelKey(symbol="AAPL", timeframe="1h", model_type=model_type)
    torch.manual_seed(0)
    model = build_model(model_type, config)
    store.save(key, model, config, META)
    loaded = store.load(key)
    x = example_inputs(model_type, config, batch=2)
    with torch.inference_mode():
        assert torch.equal(loaded.model(x), model(x))


def test_a_broken_version_directory_is_skipped_not_reused(store: ModelStore) -> None:
    _save(store)
    (store.model_dir(KEY).parent / "2").mkdir()  # no config.json: not a version, but the name is taken
    (store.model_dir(KEY).parent / "2" / "junk").write_text("x")
    assert _save(store)[0] == "3"
    assert store.versions(KEY) == ["1", "3"]


def test_weights_are_hashed_once_while_the_file_is_unchanged(store: ModelStore,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import workers.store as store_module

    _, path, _ = _save(store)
    hashed = []
    real = store_module.file_sha256
    monkeypatch.setattr(store_module, "file_sha256", lambda p: hashed.append(p) or real(p))
    store.load(KEY)
    store.load(KEY)
    assert len(hashed) == 1
    # A copy replaced in place by a corrupt one (another inode) is hashed again, and refused.
    weights = path / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    tmp = path / "weights.tmp"
    tmp.write_bytes(bytes(data))
    os.replace(tmp, weights)
    with pytest.raises(ModelLoadError, match="sha256"):
        store.load(KEY)
    assert len(hashed) == 2
