"""Redis refusing work (full under noeviction, loading its AOF, read-only after a failover) is a 503, never a 500."""

from __future__ import annotations

import pytest
from redis.exceptions import BusyLoadingError, OutOfMemoryError, ReadOnlyError

from tests.unit.test_api_helpers import PREDICT, aredis, celery, client, server, settings  # noqa: F401


@pytest.mark.parametrize("error", [
    OutOfMemoryError("OOM command not allowed when used memory > 'maxmemory'."),
    BusyLoadingError("Redis is loading the dataset in memory"),
    ReadOnlyError("You can't write against a read only replica."),
])
async def test_redis_refusing_a_write_is_a_retryable_503(client, monkeypatch, error):
    async def refuse(self, *args, **kwargs):
        raise error

    monkeypatch.setattr("redis.asyncio.client.Pipeline.execute", refuse)  # the MULTI that enqueues the job
    resp = await client.post("/v1/predict", json=PREDICT)
    assert resp.status == 503
    body = (await resp.json())["error"]
    assert body["type"] == "BrokerUnavailableError" and body["retryable"] is True
