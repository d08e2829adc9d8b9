"""The job document's status precedence and field mapping (pure), and the API record matching the workers'."""

from __future__ import annotations

import pytest

from producer_api.jobdoc import build_document, decode_meta
from producer_api.records import JobRecords
from shared.jobs import RECORD_FIELDS
from tests.unit.test_api_helpers import KEYS, aredis, failure, server, sredis  # noqa: F401


def _meta(status: str, result=None) -> dict:
    return {"status": status, "result": result}


@pytest.mark.parametrize("record_status, meta, expected", [
    ("queued", None, "queued"),
    ("running", None, "running"),
    ("queued", _meta("STARTED", {"pid": 1}), "running"),
    ("running", _meta("PROGRESS", {"done": 1, "total": 3}), "running"),
    ("cancelled", _meta("STARTED"), "cancelled"),
    ("cancelled", _meta("SUCCESS", {}), "succeeded"),  # Celery's terminal state wins
    ("running", _meta("FAILURE", failure("ModelLoadError", "bad")), "failed"),
    ("running", _meta("FAILURE", failure("JobCancelledError", "stop")), "cancelled"),
    ("queued", _meta("FAILURE", failure("DeadlineExceededError", "late")), "expired"),
    ("queued", _meta("REVOKED", failure("TaskRevokedError", "revoked")), "cancelled"),
    (None, _meta("STARTED"), "running"),
    ("nonsense", None, "queued"),
])
def test_status_precedence(record_status, meta, expected):
    record = {"status": record_status} if record_status else {}
    assert build_document("j", record, meta).status == expected


def test_unknown_job_has_no_document():
    assert build_document("j", {}, None) is None


def test_errors_from_celery_and_from_the_record():
    doc = build_document("j", {}, _meta("FAILURE", {"exc_type": "PredictionError", "exc_message": "plain",
                                                    "exc_module": "shared.errors"}))
    assert doc.error.type == "PredictionError" and doc.error.message == "plain"
    doc = build_document("j", {}, _meta("REVOKED", failure("TaskRevokedError", "revoked")))
    assert doc.error.type == "JobCancelledError"
    doc = build_document("j", {"status": "cancelled", "error": '{"type": "JobCancelledError", "message": "m"}'},
                         None)
    assert doc.error.message == "m"
    doc = build_document("j", {"status": "failed", "error": "not json"}, None)
    assert doc.status == "failed" and doc.error is None


def test_timings_and_garbage_fields():
    record = {"status": "succeeded", "enqueued_at": "100.0", "started_at": "100.25", "finished_at": "101.5",
              "load_ms": "7.5", "inference_ms": "x", "progress_done": "1", "progress_total": ""}
    doc = build_document("j", record, None)
    assert doc.timings.queued_ms == 250.0 and doc.timings.total_ms == 1500.0
    assert doc.timings.load_ms == 7.5 and doc.timings.inference_ms is None and doc.progress is None


def test_unreadable_meta_is_ignored():
    assert decode_meta(b"\x80\x81 msgpack?") is None and decode_meta(b"[1]") is None and decode_meta(None) is None


async def test_api_record_has_the_fields_the_workers_write(aredis, sredis):
    pipe = aredis.pipeline(transaction=True)
    JobRecords(aredis, KEYS, 60).enqueued(pipe, "a", "predict", "M", "simple", "cpu", "infer.simple.cpu", 1.5,
                                          owner="alice")
    await pipe.execute()
    # the producer's fields, as shared.jobs documents them (the workers' writers add the others)
    record = sredis.hgetall(KEYS.job("a"))
    assert record == {b"kind": b"predict", b"model_id": b"M", b"adapter": b"simple", b"device": b"cpu",
                      b"queue": b"infer.simple.cpu", b"owner": b"alice", b"status": b"queued", b"enqueued_at": b"1.5"}
    assert {k.decode() for k in record} <= set(RECORD_FIELDS)
    assert 0 < sredis.ttl(KEYS.job("a")) <= 60
