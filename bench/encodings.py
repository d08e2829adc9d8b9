"""What each wire encoding costs the producer: encode time and payload bytes of one predict body.

A pure micro-measurement (no server) on the reference input, 512 x 7 float32, in the three forms the API
accepts: JSON lists (``inputs.series``), JSON with a base64 tensor and msgpack with a raw tensor
(``inputs.tensor``). Decode time (what the API pays to parse the body) is reported alongside.
"""

from __future__ import annotations

import base64
import json
import statistics
import time
from typing import Any, Callable

import msgpack
import numpy as np


def predict_body(series: np.ndarray, key: dict[str, str], form: str) -> Any:
    """The predict body of ``series`` in ``form`` (``json-list`` | ``json-b64`` | ``msgpack``), encoded."""
    if form == "json-list":
        return json.dumps({**key, "inputs": {"series": series.tolist()}}).encode()
    tensor = {"dtype": "float32", "shape": list(series.shape)}
    raw = np.ascontiguousarray(series, dtype="<f4").tobytes()
    if form == "json-b64":
        return json.dumps({**key, "inputs": {"tensor": {**tensor, "data": base64.b64encode(raw).decode()}}}).encode()
    if form == "msgpack":
        return msgpack.packb({**key, "inputs": {"tensor": {**tensor, "data": raw}}}, use_bin_type=True)
    raise ValueError(f"unknown wire form {form!r}")


def decode_body(body: bytes, form: str) -> np.ndarray:
    """Back to an array, as the API's decoder and schema would (without the rest of validation)."""
    if form == "json-list":
        return np.asarray(json.loads(body)["inputs"]["series"], dtype=np.float32)
    if form == "json-b64":
        t = json.loads(body)["inputs"]["tensor"]
        return np.frombuffer(base64.b64decode(t["data"]), dtype="<f4").reshape(t["shape"])
    t = msgpack.unpackb(body, raw=False)["inputs"]["tensor"]
    return np.frombuffer(t["data"], dtype="<f4").reshape(t["shape"])


def _median_us(fn: Callable[[], object], budget_s: float) -> float:
    times = []
    deadline = time.perf_counter() + budget_s
    while time.perf_counter() < deadline or len(times) < 5:
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e6)
        if len(times) >= 5000:
            break
    return statistics.median(times)


def measure(series: np.ndarray, key: dict[str, str], budget_s: float = 0.3) -> list[dict[str, Any]]:
    """One row per form: payload bytes, median encode and decode microseconds."""
    rows = []
    for form in ("json-list", "json-b64", "msgpack"):
        body = predict_body(series, key, form)
        assert np.array_equal(decode_body(body, form), series.astype(np.float32))
        rows.append({"form": form, "bytes": len(body),
                     "encode_us": _median_us(lambda: predict_body(series, key, form), budget_s),
                     "decode_us": _median_us(lambda: decode_body(body, form), budget_s)})
    return rows
