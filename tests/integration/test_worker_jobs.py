"""A real worker process on the real Redis: load -> predict -> batch -> unload, and the failure paths."""

from __future__ import annotations

import math

import numpy as np
import pytest
from kombu import Exchange, Producer

from shared import routing, tasks
from shared.keys import Keys
from tests.helpers import wait_for
from workers.training.synthetic import generate_bars
from tests.integration.conftest import failure, send

TIMEOUT = 60


def window(symbol: str, rows: int = 200) -> np.ndarray:
    # a different seed from training: data the model has not seen
    return generate_bars(symbol, "1h", n_bars=rows + 500, seed=123).values[-rows:]


@pytest.fixture()
def worker(start_worker):
    return start_worker(concurrency=2)


def test_load_predict_batch_unload(worker, producer, redis_client, fleet_settings, stats) -> None:
    key = {"symbol": "AAPL", "timeframe": "1h", "model_type": "patchtst"}
    info = send(producer, tasks.LOAD, key).get(timeout=TIMEOUT)
    assert info["is_loaded"] and info["model_id"] == "AAPL_1h_patchtst" and info["memory_usage_mb"] > 0

    series = window("AAPL")
    res = send(producer, tasks.PREDICT, {**key, "inputs": {"series": series.tolist()}, "n_steps": 30}).get(
        timeout=TIMEOUT)
    preds = np.asarray(res["predictions"])
    assert preds.shape == (30, series.shape[1])  # n_steps beyond the horizon roll forward
    assert np.isfinite(preds).all()
    # De-normalised: forecasts live in the units of the input, near its recent level, not around zero.
    level, spread = series[-96:].mean(axis=0), series[-96:].std(axis=0) + 1e-6
    assert (np.abs(preds.mean(axis=0) - level) / spread < 5).all()
    assert 0 <= res["confidence_score"] <= 1 and res["inference_time_ms"] > 0

    bad = {**key, "inputs": {"series": series[:, :2].tolist()}}  # wrong channel count
    unknown = {"symbol": "ZZZZ", "timeframe": "1h", "model_type": "patchtst", "inputs": {"series": [[1.0] * 5]}}
    good = {**key, "inputs": {"series": series.tolist()}}
    batch = send(producer, tasks.BATCH_PREDICT, {"requests": [good, bad, good, unknown, {"symbol": 5}]})
    out = batch.get(timeout=TIMEOUT)
    assert (out["total"], out["succeeded"], out["failed"]) == (5, 2, 3)
    items = out["items"]
    assert [i["index"] for i in items] == [0, 1, 2, 3, 4]
    assert items[0]["result"] and items[2]["result"]
    assert items[1]["error"]["type"] == "InvalidInputError" and "channel" in items[1]["error"]["message"]
    assert items[3]["error"]["type"] == "ModelNotFoundError"
    assert items[4]["error"]["type"] == "InvalidInputError" and items[4]["error"]["field"] == "requests.4"
    job_key = Keys(fleet_settings.redis_key_prefix).job(batch.id)
    # the record's final state is written just after Celery stores the result (task_postrun)
    record = wait_for(lambda: (r := {k.decode(): v.decode() for k, v in redis_client.hgetall(job_key).items()})
                      and r.get("status") == "succeeded" and r, 10, "the batch job's final record")
    assert (record["progress_done"], record["progress_total"], record["status"]) == ("5", "5", "succeeded")

    sentiment = send(producer, tasks.PREDICT, {"symbol": "AAPL", "timeframe": "1h", "model_type": "sentiment",
                                               "inputs": {"texts": ["Shares plunge after profit warning",
                                                                    "Company beats estimates, raises guidance"]}})
    sres = sentiment.get(timeout=TIMEOUT)
    assert sres["labels"] == ["negative", "positive"]
    assert all(math.isclose(sum(p), 1.0, rel_tol=1e-4) for p in sres["predictions"])

    assert send(producer, tasks.UNLOAD, key).get(timeout=TIMEOUT)["model_id"] == "AAPL_1h_patchtst"
    model = stats.model("AAPL_1h_patchtst")
    assert model.successful_predictions >= 3 and model.failed_predictions >= 1


def test_unknown_model_fails_with_typed_error(worker, producer) -> None:
    job = {"symbol": "NOPE", "timeframe": "1h", "model_type": "patchtst", "inputs": {"series": [[1.0] * 5]}}
    kind, message = failure(send(producer, tasks.PREDICT, job), TIMEOUT)
    assert kind == "ModelNotFoundError" and "NOPE_1h_patchtst" in message


@pytest.mark.parametrize("job,expected_field", [
    ({"symbol": "AAPL", "timeframe": "1h", "model_type": "patchtst", "inputs": {"series": [[float("nan")] * 5] * 200}},
     "finite"),
    ({"symbol": "AAPL", "timeframe": "1h", "model_type": "patchtst", "inputs": {"series": [[1.0] * 5] * 3}},
     "context"),
    ({"symbol": "AAPL", "timeframe": "7h", "model_type": "patchtst", "inputs": {"series": [[1.0]]}}, "timeframe"),
    ({"symbol": "AAPL", "timeframe": "1h", "model_type": "patchtst", "inputs": {"texts": ["hi"]}}, "inputs.series"),
])
def test_malformed_input_fails_typed_and_worker_keeps_serving(worker, producer, job, expected_field) -> None:
    kind, message = failure(send(producer, tasks.PREDICT, job), TIMEOUT)
    assert kind == "InvalidInputError" and expected_field in message
    ok = send(producer, tasks.PREDICT, {"symbol": "MSFT", "timeframe": "1h", "model_type": "patchtsmixer",
                                        "inputs": {"series": window("MSFT").tolist()}})
    assert len(ok.get(timeout=TIMEOUT)["predictions"]) > 0


def test_non_object_job_is_a_typed_error(worker, producer) -> None:
    result = producer.send_task(tasks.PREDICT, kwargs={"job": [1, 2, 3]})
    assert failure(result, TIMEOUT)[0] == "InvalidInputError"


def test_pickled_message_is_refused_and_worker_keeps_serving(worker, producer) -> None:
    queue = routing.queue_name("simple", "cpu")
    with producer.connection_for_write() as conn:  # the app's transport options (priority lists, separator)
        Producer(conn).publish(
            {"job": "whatever"}, serializer="pickle", exchange=Exchange(routing.QUEUE_PREFIX, type="direct"),
            routing_key=queue, declare=[q for q in routing.all_queues() if q.name == queue],
            headers={"task": tasks.PREDICT, "id": "pickled-1", "lang": "py", "argsrepr": "", "kwargsrepr": ""})
    ok = send(producer, tasks.PREDICT, {"symbol": "AAPL", "timeframe": "1h", "model_type": "enhanced_transformer",
                                        "inputs": {"series": window("AAPL").tolist()}})
    assert np.isfinite(np.asarray(ok.get(timeout=TIMEOUT)["predictions"])).all()
    assert worker.proc.poll() is None
    assert "pickle" in worker.output().lower() or "ContentDisallowed" in worker.output()


def test_prefork_children_split_the_cores_between_them(worker) -> None:
    import os

    cores = len(os.sched_getaffinity(0))
    expected = max(1, cores // 2)  # the fixture's worker runs two prefork children
    assert f"{expected} torch thread(s)" in worker.output()


def test_control_commands_answer_for_every_worker(worker, producer) -> None:
    send(producer, tasks.LOAD, {"symbol": "MSFT", "timeframe": "1h", "model_type": "patchtst"}).get(timeout=TIMEOUT)
    replies = producer.control.broadcast(tasks.CONTROL_LIST_MODELS, reply=True, timeout=5)
    models = [m["model_id"] for reply in replies for r in reply.values() for ms in r["processes"].values() for m in ms]
    assert "MSFT_1h_patchtst" in models
    health = producer.control.broadcast(tasks.CONTROL_HEALTH, reply=True, timeout=5)
    assert health and all(r["healthy"] for reply in health for r in reply.values())
