"""GPU paths: the in-process adapter on CUDA matches CPU. Skipped cleanly on machines without a GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shared.schemas import ModelKey, PredictInputs
from shared.settings import FleetSettings
from shared.store_layout import model_dir
from workers.serving.adapters.simple import SimpleServingAdapter
from workers.training.synthetic import generate_bars

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("model_type", ["patchtst", "patchtsmixer", "enhanced_transformer"])
def test_cuda_forecast_matches_cpu(model_store, model_type: str) -> None:
    settings = FleetSettings(model_store_dir=model_store)
    path = model_dir(model_store, ModelKey(symbol="AAPL", timeframe="1h", model_type=model_type))
    series = generate_bars("AAPL", "1h", n_bars=600, seed=5).values[-300:]
    out = {}
    for device in ("cpu", "cuda"):
        adapter = SimpleServingAdapter(settings, device)
        info = adapter.load_model(path, "AAPL", "1h", model_type)
        assert info.metadata["device"].startswith(device)
        out[device] = np.asarray(adapter.predict(info.model_id, PredictInputs(series=series.tolist())).predictions)
        adapter.close()
    np.testing.assert_allclose(out["cuda"], out["cpu"], rtol=1e-3, atol=1e-3)
