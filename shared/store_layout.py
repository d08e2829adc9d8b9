"""The model store's layout on disk, readable without torch.

``<root>/<SYMBOL>/<timeframe>/<model_type>/<version>/`` holds ``config.json``, ``weights.safetensors`` and
``meta.json``. Producers use this module to check that a model exists before enqueueing; workers use it to
find what to load. Paths are built only from validated keys, and anything that resolves outside the root is
refused (a symlink planted in the store included).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from shared.errors import InvalidInputError, ModelNotFoundError
from shared.schemas import ModelKey, ModelType, TimeFrame

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.safetensors"
META_FILE = "meta.json"


def confine(root: Path, path: Path | str) -> Path:
    """``path`` resolved, if it lies inside ``root``; otherwise :class:`InvalidInputError`."""
    root_resolved = Path(root).resolve()
    candidate = Path(path)
    if not candidate.is_absolute():
        candidate = root_resolved / candidate
    resolved = candidate.resolve()
    if resolved != root_resolved and root_resolved not in resolved.parents:
        raise InvalidInputError(f"model path {str(path)!r} is outside the model store", field="model_path")
    return resolved


def key_dir(root: Path, key: ModelKey) -> Path:
    return confine(root, Path(key.symbol) / key.timeframe.value / key.model_type.value)


def versions(root: Path, key: ModelKey) -> list[str]:
    """Complete versions of a model (those with a config), oldest first."""
    base = key_dir(root, key)
    if not base.is_dir():
        return []
    found = [p.name for p in base.iterdir() if p.name.isdigit() and (p / CONFIG_FILE).is_file()]
    return sorted(found, key=int)


def model_dir(root: Path, key: ModelKey, version: str | None = None) -> Path:
    """The directory of one version (the newest when ``version`` is None); :class:`ModelNotFoundError` if absent."""
    available = versions(root, key)
    if not available:
        raise ModelNotFoundError(f"model {key.model_id} is not in the model store", field="symbol")
    chosen = version or available[-1]
    if chosen not in available:
        raise ModelNotFoundError(f"model {key.model_id} has no version {chosen} (has {', '.join(available)})",
                                 field="version")
    return confine(root, key_dir(root, key) / chosen)


def read_json(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    if not isinstance(data, dict):
        raise InvalidInputError(f"{path.name} must hold a JSON object")
    return data


def list_models(root: Path) -> list[dict[str, Any]]:
    """Every model in the store with its versions and the newest version's metadata."""
    root = Path(root)
    out: list[dict[str, Any]] = []
    if not root.is_dir():
        return out
    for sym_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for tf in TimeFrame:
            for mt in ModelType:
                try:
                    key = ModelKey(symbol=sym_dir.name, timeframe=tf, model_type=mt)
                    found = versions(root, key)
                except (ValueError, InvalidInputError):
                    continue
                if not found:
                    continue
                latest = key_dir(root, key) / found[-1]
                meta = read_json(latest / META_FILE) if (latest / META_FILE).is_file() else {}
                out.append({"model_id": key.model_id, "symbol": key.symbol, "timeframe": tf.value,
                            "model_type": mt.value, "versions": found, "latest": found[-1], "meta": meta})
    return out
