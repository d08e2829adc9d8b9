"""The cold-load benchmark (``python -m bench coldload``) on one small model, two loads per path."""

from __future__ import annotations

from pathlib import Path

import torch

from bench import coldload
from bench.__main__ import cli
from shared.schemas import ModelKey
from workers.models.registry import build_model
from workers.store import ModelStore


def test_measure_reports_every_path_of_one_small_model(tmp_path: Path) -> None:
    config = coldload.SIZES[("patchtst", "small")]
    torch.manual_seed(0)
    key = ModelKey(symbol=coldload._symbol("small"), timeframe="1h", model_type="patchtst")
    _, path = ModelStore(tmp_path).save(key, build_model("patchtst", config), config, {})
    result = coldload.measure(tmp_path, [path], repeats=2)
    (row,) = result["models"]
    assert (row["model_type"], row["size"], result["repeats"]) == ("patchtst", "small", 2)
    for name in coldload.PATHS:
        assert row[name]["n"] == 2 and 0 < row[name]["p50_ms"] <= row[name]["p99_ms"]
    assert row["n_params"] > 0 and row["weights_bytes"] > 0 and row["speedup_p50"] > 0
    assert result["target"]["measured_ms"] == row["new"]["p50_ms"]
    assert set(row["stages_ms"]) == set(coldload.STAGES) and row["stages_ms"]["forward"] > 0
    markdown = coldload.render(result)
    assert "| patchtst | small |" in markdown and "Target:" in markdown
    assert "coldload" in cli.commands
