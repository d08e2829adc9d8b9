"""Training of the fleet's models on data that ships with it or is generated: no downloads, no pretrained weights.

* :mod:`workers.training.synthetic`: deterministic synthetic OHLCV-like bars per symbol and timeframe;
* :mod:`workers.training.headlines`: the labelled finance headlines of ``data/headlines.jsonl``;
* :mod:`workers.training.train`: training loops, held-out checks against baselines, ``create_models``.
"""
