"""The store's path confinement and version lookup (torch-free layout)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from shared import store_layout
from shared.errors import InvalidInputError, ModelNotFoundError
from shared.schemas import ModelKey

KEY = ModelKey(symbol="AAPL", timeframe="1h", model_type="patchtst")


def make_version(root: Path, version: str) -> Path:
    d = root / "AAPL" / "1h" / "patchtst" / version
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"model_type": "patchtst"}))
    (d / "meta.json").write_text(json.dumps({"version": version}))
    return d


def test_newest_complete_version_is_chosen(tmp_path: Path) -> None:
    make_version(tmp_path, "1")
    make_version(tmp_path, "10")
    (tmp_path / "AAPL" / "1h" / "patchtst" / "11").mkdir()  # incomplete: no config
    assert store_layout.versions(tmp_path, KEY) == ["1", "10"]
    assert store_layout.model_dir(tmp_path, KEY).name == "10"
    assert store_layout.model_dir(tmp_path, KEY, "1").name == "1"
    with pytest.raises(ModelNotFoundError, match="no version 3"):
        store_layout.model_dir(tmp_path, KEY, "3")


def test_missing_model_is_a_typed_not_found(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="AAPL_1h_patchtst"):
        store_layout.model_dir(tmp_path, KEY)


def test_paths_outside_the_store_are_refused(tmp_path: Path) -> None:
    root = tmp_path / "store"
    root.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    with pytest.raises(InvalidInputError, match="outside the model store"):
        store_layout.confine(root, "../outside")
    with pytest.raises(InvalidInputError):
        store_layout.confine(root, outside)
    os.symlink(outside, root / "AAPL")  # a planted symlink must not lead out either
    with pytest.raises(InvalidInputError):
        store_layout.key_dir(root, KEY)
    assert store_layout.confine(root, "x/y") == (root / "x" / "y").resolve()


def test_list_models_reports_versions_and_meta(tmp_path: Path) -> None:
    make_version(tmp_path, "1")
    make_version(tmp_path, "2")
    (tmp_path / "not a symbol!").mkdir()
    listed = store_layout.list_models(tmp_path)
    assert [(m["model_id"], m["versions"], m["latest"]) for m in listed] == [("AAPL_1h_patchtst", ["1", "2"], "2")]
    assert listed[0]["meta"] == {"version": "2"}
