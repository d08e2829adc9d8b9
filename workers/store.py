"""The model store on disk: save trained models as new versions, load them back.

Layout (see :mod:`shared.store_layout`, which producers read without torch)::

    <root>/<SYMBOL>/<timeframe>/<model_type>/<version>/
        config.json          the model's config plus "model_type"
        weights.safetensors  parameters (safetensors: no pickle anywhere, nothing executes on load)
        meta.json            version, created_at, training range, held-out metrics, seed, timings, sha256

Versions are integers as strings ("1", "2", ...). A version is written in a hidden temporary directory and
renamed into place, so that readers never see half a model; a reader that lists versions only counts
directories with a ``config.json``.

Loading is on the cold path of every cache miss, so it does no work twice: the weights are memory-mapped
(safetensors), the module is cloned from a per-process template of its architecture instead of being built with
its initialisers (:mod:`workers.models.templates`), and a weights file whose sha256 this store already checked
is not hashed again while it is unchanged on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from shared import store_layout
from shared.errors import InvalidInputError, ModelLoadError, ModelNotFoundError
from shared.schemas import ModelKey, ModelType
from workers.models import templates
from workers.models.registry import n_params, validate_config

#: Meta fields copied into :meth:`ModelStore.list_models` summaries.
SUMMARY_FIELDS = ("created_at", "heldout", "n_params", "train_seconds", "training_range")
#: Weights files whose checked sha256 a store remembers (the oldest is forgotten first).
MAX_VERIFIED = 4096


@dataclass
class LoadedArtifacts:
    """A stored model version, loaded: the module (eval mode, CPU) and its config and metadata."""

    model: nn.Module
    config: dict[str, Any]
    meta: dict[str, Any]
    path: Path
    version: str


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _next_version(base: Path) -> int:
    """One more than any numbered directory, complete or not (a broken one must not be written into)."""
    return max((int(p.name) for p in base.iterdir() if p.name.isdigit()), default=0) + 1


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


class ModelStore:
    """Versioned models under ``root``; every path comes from a validated :class:`ModelKey`."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self._verified: dict[str, tuple[tuple[int, ...], str]] = {}

    def versions(self, key: ModelKey) -> list[str]:
        """Complete versions of ``key``, oldest first."""
        return store_layout.versions(self.root, key)

    def model_dir(self, key: ModelKey, version: str | None = None) -> Path:
        """Directory of ``version`` (the newest when None). Raises :class:`ModelNotFoundError` if absent."""
        return store_layout.model_dir(self.root, key, version)

    def save(self, key: ModelKey, model: nn.Module, config: dict[str, Any],
             meta: dict[str, Any]) -> tuple[str, Path]:
        """Store ``model`` as the next version of ``key``; returns ``(version, path)``.

        ``meta`` holds what training knows (training range, held-out metrics, seed, train_seconds); the store
        adds ``version``, ``created_at``, ``n_params`` and ``weights_sha256``.
        """
        base = store_layout.key_dir(self.root, key)
        base.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=base))
        try:
            tmp.chmod(0o755)  # mkdtemp makes it private; the version must be readable by every worker
            weights = tmp / store_layout.WEIGHTS_FILE
            state = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
            save_file(state, str(weights))
            _write_json(tmp / store_layout.CONFIG_FILE, {**config, "model_type": key.model_type.value})
            full_meta = {**meta, "model_id": key.model_id, "n_params": n_params(model),
                         "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                         "weights_sha256": file_sha256(weights)}
            while True:
                version = str(_next_version(base))
                _write_json(tmp / store_layout.META_FILE, {**full_meta, "version": version})
                target = base / version
                try:
                    # NOTE: rename fails if the target exists, so two concurrent savers never share a version.
                    os.rename(tmp, target)
                except OSError:
                    if not target.exists():
                        raise
                    continue
                return version, target
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def load(self, key: ModelKey, version: str | None = None) -> LoadedArtifacts:
        return self.load_from_path(self.model_dir(key, version))

    def load_from_path(self, path: Path | str) -> LoadedArtifacts:
        """Load the version directory at ``path``, which must lie inside the store (symlinks resolved).

        Raises:
            InvalidInputError: the path escapes the store (``..``, another absolute path, a symlink).
            ModelNotFoundError: no stored model there.
            ModelLoadError: the files are corrupt or do not match the config.
        """
        if ".." in Path(path).parts:
            raise InvalidInputError(f"model path {str(path)!r} must not contain '..'", field="model_path")
        directory = store_layout.confine(self.root, path)
        config_file = store_layout.confine(self.root, directory / store_layout.CONFIG_FILE)
        if not config_file.is_file():
            raise ModelNotFoundError(f"no stored model at {path}", field="model_path")
        weights = store_layout.confine(self.root, directory / store_layout.WEIGHTS_FILE)
        meta_file = store_layout.confine(self.root, directory / store_layout.META_FILE)
        try:
            config = store_layout.read_json(config_file)
            meta = store_layout.read_json(meta_file) if meta_file.is_file() else {}
        except (OSError, ValueError, InvalidInputError) as exc:
            raise ModelLoadError(f"unreadable config or meta in {directory}: {exc}") from None
        model_type = config.get("model_type")
        if model_type not in {m.value for m in ModelType}:
            raise ModelLoadError(f"{directory / store_layout.CONFIG_FILE} names no known model_type")
        typed = validate_config(model_type, config)
        if not weights.is_file():
            raise ModelLoadError(f"{directory} has no {store_layout.WEIGHTS_FILE}")
        expected = meta.get("weights_sha256")
        if expected:
            self._verify(weights, expected)
        try:
            model = self._restore(model_type, typed, weights)
        except (SafetensorError, RuntimeError, OSError) as exc:
            raise ModelLoadError(f"cannot load weights of {directory}: {exc}") from None
        # NOTE: the typed config, not the file's: inference and the adapters read every field (a sentiment
        # config that leaves max_len or labels to their defaults must serve like one that spells them out).
        return LoadedArtifacts(model=model, config={"model_type": model_type, **typed.model_dump()}, meta=meta,
                               path=directory, version=directory.name)

    def _verify(self, weights: Path, expected: str) -> None:
        """Check ``weights`` against the sha256 recorded at save time, once per unchanged file.

        NOTE: a version is immutable once renamed into place; a file replaced or rewritten since it was checked
        has another inode, size or timestamps, and is hashed again.
        """
        stat = weights.stat()
        stamp = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
        if self._verified.get(str(weights)) == (stamp, expected):
            return
        if file_sha256(weights) != expected:
            raise ModelLoadError(f"{weights} does not match the sha256 recorded in meta.json (corrupt copy?)")
        if len(self._verified) >= MAX_VERIFIED:
            self._verified.pop(next(iter(self._verified)), None)
        self._verified[str(weights)] = (stamp, expected)

    def _restore(self, model_type: str, typed: BaseModel, weights: Path) -> nn.Module:
        """The model (eval mode, CPU) holding the weights in ``weights`` (memory-mapped, not copied)."""
        return templates.restore(model_type, typed, load_file(str(weights)))

    def list_models(self) -> list[dict[str, Any]]:
        """Every stored model: symbol, timeframe, model_type, versions, latest and a summary of its meta."""
        out = []
        for entry in store_layout.list_models(self.root):
            meta = entry.pop("meta")
            entry["meta"] = {k: meta[k] for k in SUMMARY_FIELDS if k in meta}
            out.append(entry)
        return out
