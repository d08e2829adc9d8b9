"""API keys, scopes and rate limits: who may call what, how keys are made and revoked, and 429s."""

from __future__ import annotations

import json
import time

import pytest

from producer_api.app import create_app
from producer_api.security.keystore import KeyExistsError, KeyStore, digest, load_static_keys, static_keys
from producer_api.security.middleware import PUBLIC, ROUTE_SCOPES
from shared.errors import InvalidInputError
from tests.helpers import wait_for_async
from tests.unit.test_api_helpers import (KEYS, PREDICT, aredis, celery, client, make_key, server,  # noqa: F401
                                         settings, sredis)


@pytest.fixture
async def anon(aiohttp_client, settings, aredis, celery):
    """A client that sends no key; tests add headers per request."""
    return await aiohttp_client(create_app(settings, redis=aredis, celery_app=celery))


def _key(secret: str) -> dict[str, str]:
    return {"X-API-Key": secret}


async def test_without_a_key_every_v1_route_is_401_in_the_json_error_shape(anon):
    for method, path in (("post", "/v1/predict"), ("get", "/v1/jobs/abc"), ("get", "/v1/models"),
                         ("get", "/v1/stats"), ("get", "/metrics"), ("get", "/v1/jobs/abc/events"),
                         ("post", "/v1/models/load"), ("get", "/v1/keys")):
        resp = await getattr(anon, method)(path, json=PREDICT if method == "post" else None)
        assert resp.status == 401, (method, path)
        error = (await resp.json())["error"]
        assert error["type"] == "AuthenticationError" and "X-API-Key" in error["message"]
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")


async def test_probes_and_docs_need_no_key(anon):
    for path in ("/healthz", "/openapi.json", "/docs"):
        assert (await anon.get(path)).status == 200, path
    # /readyz answers without a key (503 here: no worker heart-beats in this test)
    assert (await anon.get("/readyz")).status == 503


async def test_an_unknown_or_malformed_key_is_401(anon):
    for headers in (_key("fsk_not-a-key"), {"Authorization": "Bearer fsk_nope"}, {"Authorization": "Basic eDp5"},
                    {"Authorization": "Bearer "}, _key("")):
        resp = await anon.post("/v1/predict", json=PREDICT, headers=headers)
        assert resp.status == 401, headers


async def test_scopes_decide_what_a_key_may_do(anon, aredis):
    reader = await make_key(aredis, "reader", ("read",))
    submitter = await make_key(aredis, "submitter", ("submit",))
    resp = await anon.post("/v1/predict", json=PREDICT, headers=_key(reader))
    assert resp.status == 403
    error = (await resp.json())["error"]
    assert error["type"] == "PermissionDeniedError" and "'submit'" in error["message"] and error["field"] == "scope"
    resp = await anon.post("/v1/predict", json=PREDICT, headers={"Authorization": f"Bearer {submitter}"})
    assert resp.status == 202
    assert (await anon.get("/v1/models", headers=_key(submitter))).status == 403
    assert (await anon.get("/v1/models", headers=_key(reader))).status == 200
    # loading models and managing keys are admin business; metrics have their own scope
    assert (await anon.post("/v1/models/load", json={"symbol": "AAPL", "timeframe": "1h", "model_type": "patchtst"},
                            headers=_key(submitter))).status == 403
    assert (await anon.get("/v1/keys", headers=_key(reader))).status == 403
    assert (await anon.get("/metrics", headers=_key(reader))).status == 403
    scraper = await make_key(aredis, "scraper", ("metrics",))
    assert (await anon.get("/metrics", headers=_key(scraper))).status == 200


def test_every_route_is_public_or_has_a_scope(settings, aredis, celery):
    app = create_app(settings, redis=aredis, celery_app=celery)
    found = set()
    for resource in app.router.resources():
        for route in resource:
            if route.method in ("HEAD", "*"):
                continue
            found.add((route.method, resource.canonical))
    missing = sorted(found - PUBLIC - set(ROUTE_SCOPES))
    assert not missing, f"routes with no scope decided (they would need admin): {missing}"
    assert not (set(ROUTE_SCOPES) | PUBLIC) - found, "the scope table names routes that do not exist"


async def test_a_revoked_key_stops_working_within_the_cache_ttl(aiohttp_client, settings, aredis, celery):
    app = create_app(settings.model_copy(update={"api_key_cache_seconds": 0.3}), redis=aredis, celery_app=celery)
    client = await aiohttp_client(app)
    secret = await make_key(aredis, "short-lived", ("read",))
    assert (await client.get("/v1/models", headers=_key(secret))).status == 200
    assert await KeyStore(aredis, KEYS).revoke("short-lived")
    started = time.monotonic()

    async def refused() -> bool:
        return (await client.get("/v1/models", headers=_key(secret))).status == 401

    await wait_for_async(refused, 3, "the revoked key to be refused")
    assert time.monotonic() - started < 2


async def test_keys_are_stored_only_as_hashes_with_their_metadata(aredis, sredis):
    store = KeyStore(aredis, KEYS, cache_seconds=0)
    secret = await store.create("ci", ["read", "submit"], "50/minute")
    assert secret.startswith("fsk_") and len(secret) >= 40
    dump = json.dumps({k.decode(): {f.decode(): v.decode() for f, v in sredis.hgetall(k).items()}
                       for k in sredis.keys(f"{KEYS.prefix}:api-key*") if sredis.type(k) == b"hash"})
    assert secret not in dump and digest(secret) in dump
    assert (await store.authenticate(secret)).scopes == frozenset({"read", "submit"})
    (info,) = await store.list()
    assert info.name == "ci" and info.scopes == ("submit", "read") and info.rate_limit == "50/minute"
    assert info.created_at == pytest.approx(time.time(), abs=5) and info.last_used_at is not None
    with pytest.raises(KeyExistsError):
        await store.create("ci", ["read"])
    for bad in ({"name": "has space", "scopes": ["read"]}, {"name": "x", "scopes": ["root"]},
                {"name": "x", "scopes": []}, {"name": "x", "scopes": ["read"], "rate_limit": "lots"},
                {"name": "anonymous", "scopes": ["read"]}):
        with pytest.raises(InvalidInputError):
            await store.create(**bad)
    assert await store.revoke("ci") and not await store.revoke("ci")
    assert await store.authenticate(secret) is None


async def test_keys_over_http_admin_only(client, anon, aredis):
    resp = await client.post("/v1/keys", json={"name": "svc", "scopes": ["submit", "read"]})
    assert resp.status == 201
    made = await resp.json()
    assert made["name"] == "svc" and made["key"].startswith("fsk_")
    assert (await anon.post("/v1/predict", json=PREDICT, headers=_key(made["key"]))).status == 202
    assert (await client.post("/v1/keys", json={"name": "svc", "scopes": ["read"]})).status == 409
    bad = await client.post("/v1/keys", json={"name": "svc2", "scopes": ["root"]})
    assert bad.status == 422 and (await bad.json())["error"]["field"].startswith("scopes")
    listed = (await (await client.get("/v1/keys")).json())["keys"]
    assert {k["name"] for k in listed} == {"tester", "svc"} and all("key" not in k for k in listed)
    assert (await client.delete("/v1/keys/svc")).status == 200
    assert (await client.delete("/v1/keys/svc")).status == 404


def test_static_keys_file(tmp_path):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps([
        {"name": "ops", "key": "fsk_static-secret-of-the-ops-team", "scopes": ["admin"]},
        {"name": "ci", "key_sha256": digest("fsk_another-static-secret-1234"), "scopes": ["read"],
         "rate_limit": "5/second"},
    ]))
    found = load_static_keys(path)
    assert found[digest("fsk_static-secret-of-the-ops-team")].is_admin
    assert found[digest("fsk_another-static-secret-1234")].rate_limit == "5/second"
    for bad in ('{"not": "a list"}', '[{"name": "x", "scopes": ["read"]}]', "[{",
                '[{"name": "x", "key": "fsk_aaaaaaaaaaaaaaaaaaaaaaaaaaa", "scopes": ["god"]}]',
                json.dumps([{"name": "x", "key": "fsk_aaaaaaaaaaaaaaaaaaaaaaaaaaaa", "scopes": ["read"]}] * 2)):
        path.write_text(bad)
        with pytest.raises(ValueError, match="API_KEYS_FILE"):
            load_static_keys(path)


async def test_static_keys_authenticate_without_redis_records(aiohttp_client, settings, aredis, celery, tmp_path):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps([{"name": "ops", "key": "fsk_static-secret-of-the-ops-team", "scopes": ["read"]}]))
    app = create_app(settings.model_copy(update={"api_keys_file": path}), redis=aredis, celery_app=celery)
    client = await aiohttp_client(app)
    assert (await client.get("/v1/models", headers=_key("fsk_static-secret-of-the-ops-team"))).status == 200
    assert (await client.post("/v1/predict", json=PREDICT,
                              headers=_key("fsk_static-secret-of-the-ops-team"))).status == 403


async def test_the_metrics_key_file_reads_metrics_and_nothing_else(aiohttp_client, settings, aredis, celery,
                                                                    tmp_path):
    # the Helm chart's PodMonitor sends this file's key as its bearer token (a scrape config cannot send more)
    path = tmp_path / "metrics-key"
    path.write_text("fsk_the-scrapers-own-secret-0123456789\n")  # as a Secret mounted from a file holds it
    app = create_app(settings.model_copy(update={"api_metrics_key_file": path}), redis=aredis, celery_app=celery)
    client = await aiohttp_client(app)
    bearer = {"Authorization": "Bearer fsk_the-scrapers-own-secret-0123456789"}
    resp = await client.get("/metrics", headers=bearer)
    assert resp.status == 200 and "fleet_pool_backlog_total" in await resp.text()
    for method, path_ in (("get", "/v1/models"), ("get", "/v1/stats"), ("post", "/v1/predict"), ("get", "/v1/keys")):
        resp = await getattr(client, method)(path_, json=PREDICT if method == "post" else None, headers=bearer)
        assert resp.status == 403, (method, path_)
    assert (await client.get("/metrics", headers={"Authorization": "Bearer fsk_a-wrong-secret-0123456789"})
            ).status == 401


def test_the_metrics_key_file_is_checked_at_start(tmp_path):
    keys_file, metrics_file = tmp_path / "keys.json", tmp_path / "metrics-key"
    keys_file.write_text(json.dumps([{"name": "ops", "key": "fsk_static-secret-of-the-ops-team", "scopes": ["admin"]}]))
    metrics_file.write_text("fsk_the-scrapers-own-secret-0123456789")
    found = static_keys(keys_file, metrics_file)
    assert found[digest("fsk_the-scrapers-own-secret-0123456789")].scopes == frozenset({"metrics"})
    assert found[digest("fsk_static-secret-of-the-ops-team")].is_admin
    assert static_keys(None, None) == {}
    for bad in ("", "short", "fsk_two secrets-on-one-line-0123456789"):
        metrics_file.write_text(bad)
        with pytest.raises(ValueError, match="API_METRICS_KEY_FILE"):
            static_keys(None, metrics_file)
    with pytest.raises(ValueError, match="API_METRICS_KEY_FILE"):
        static_keys(None, tmp_path / "missing")
    metrics_file.write_text("fsk_the-scrapers-own-secret-0123456789")
    keys_file.write_text(json.dumps([{"name": "prometheus", "key": "fsk_static-secret-of-the-ops-team",
                                      "scopes": ["read"]}]))
    with pytest.raises(ValueError, match="metrics key"):
        static_keys(keys_file, metrics_file)


async def test_auth_can_be_switched_off(aiohttp_client, settings, aredis, celery):
    app = create_app(settings.model_copy(update={"api_auth_enabled": False}), redis=aredis, celery_app=celery)
    client = await aiohttp_client(app)
    assert (await client.post("/v1/predict", json=PREDICT)).status == 202


# --- rate limits ---------------------------------------------------------------------------------------------


@pytest.fixture
async def limited(aiohttp_client, settings, aredis, celery):
    app = create_app(settings.model_copy(update={"api_rate_limit": "20/minute",
                                                 "api_rate_limits": {"metrics": "3/minute"}}),
                     redis=aredis, celery_app=celery)
    return await aiohttp_client(app)


async def test_the_21st_request_in_a_minute_is_429_with_retry_after(limited, aredis):
    secret = await make_key(aredis, "busy", ("read", "submit", "metrics"), rate_limit=None)
    other = await make_key(aredis, "calm", ("read",), rate_limit=None)
    for i in range(20):
        assert (await limited.get("/v1/models", headers=_key(secret))).status == 200, i
    resp = await limited.get("/v1/models", headers=_key(secret))
    assert resp.status == 429
    error = (await resp.json())["error"]
    assert error["type"] == "RateLimitedError" and error["retryable"] is True and "20/minute" in error["message"]
    assert 1 <= int(resp.headers["Retry-After"]) <= 60
    assert resp.headers["RateLimit-Limit"] == "20" and resp.headers["RateLimit-Remaining"] == "0"
    assert resp.headers["RateLimit-Reset"] == resp.headers["Retry-After"]
    # submits count in the same bucket; another key has its own
    assert (await limited.post("/v1/predict", json=PREDICT, headers=_key(secret))).status == 429
    assert (await limited.get("/v1/models", headers=_key(other))).status == 200
    # a scope with its own limit has its own bucket
    for _ in range(3):
        assert (await limited.get("/metrics", headers=_key(secret))).status == 200
    assert (await limited.get("/metrics", headers=_key(secret))).status == 429


async def test_a_key_with_its_own_limit_and_limits_shared_by_replicas(aiohttp_client, settings, aredis, celery):
    one = settings.model_copy(update={"api_rate_limit": "5/minute"})
    first = await aiohttp_client(create_app(one, redis=aredis, celery_app=celery))
    second = await aiohttp_client(create_app(one, redis=aredis, celery_app=celery))  # another replica, same Redis
    secret = await make_key(aredis, "shared", ("read",), rate_limit=None)
    for replica in (first, second, first, second, first):
        assert (await replica.get("/v1/models", headers=_key(secret))).status == 200
    assert (await second.get("/v1/models", headers=_key(secret))).status == 429
    roomy = await make_key(aredis, "roomy", ("read",), rate_limit="50/minute")
    for _ in range(10):
        assert (await first.get("/v1/models", headers=_key(roomy))).status == 200


def test_a_bad_rate_limit_setting_fails_at_start_up(settings, aredis, celery):
    with pytest.raises(ValueError):
        create_app(settings.model_copy(update={"api_rate_limit": "often"}), redis=aredis, celery_app=celery)


async def test_auth_errors_under_v2_answer_in_the_protocol_s_shape(anon):
    resp = await anon.post("/v2/models/AAPL_1h_patchtst/infer", json={"inputs": []})
    body = await resp.json()
    assert resp.status == 401 and body["type"] == "AuthenticationError" and isinstance(body["error"], str)
