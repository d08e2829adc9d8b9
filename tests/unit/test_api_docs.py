"""The OpenAPI document (generated, valid 3.1) and the docs page; and the API's imports stay torch-free."""

from __future__ import annotations

import subprocess
import sys

from openapi_spec_validator import validate

from tests.unit.test_api_helpers import aredis, celery, client, server, settings  # noqa: F401


async def test_openapi_is_valid_and_covers_every_route(client):
    resp = await client.get("/openapi.json")
    assert resp.status == 200
    spec = await resp.json()
    validate(spec)
    assert spec["openapi"].startswith("3.1")
    expected = {"/v1/models/load", "/v1/models/unload", "/v1/predict", "/v1/predict/batch", "/v1/jobs/{id}",
                "/v1/jobs/{id}/events", "/v1/models", "/v1/stats", "/healthz", "/readyz", "/metrics",
                "/openapi.json", "/docs", "/v1/keys", "/v1/keys/{name}", "/v1/dead-letters",
                # the Open Inference Protocol (KServe v2)
                "/v2/health/live", "/v2/health/ready", "/v2", "/v2/models/{name}",
                "/v2/models/{name}/versions/{version}", "/v2/models/{name}/ready",
                "/v2/models/{name}/versions/{version}/ready", "/v2/models/{name}/infer",
                "/v2/models/{name}/versions/{version}/infer"}
    assert expected == set(spec["paths"])
    # every route but the probes and the docs names how a key is sent, and answers 401 / 403 / 429
    assert set(spec["components"]["securitySchemes"]) == {"ApiKey", "Bearer"}
    assert spec["paths"]["/healthz"]["get"]["security"] == [] and "security" not in predict_op(spec)
    assert {"401", "403", "429"} <= set(predict_op(spec)["responses"]) and "`submit`" in predict_op(spec)["description"]
    schemas = spec["components"]["schemas"]
    assert {"PredictJob", "JobDocument", "ErrorResponse", "ServingStats", "EncodedTensor"} <= set(schemas)
    predict = spec["paths"]["/v1/predict"]["post"]
    assert set(predict["requestBody"]["content"]) >= {"application/json", "application/msgpack"}
    assert predict["responses"]["202"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Accepted"}
    assert "cache_hit_ratio" in schemas["ServingStats"]["properties"]


async def test_the_oip_routes_document_the_protocols_bodies_and_errors(client):
    spec = await (await client.get("/openapi.json")).json()
    paths = spec["paths"]
    assert paths["/v2/health/live"]["get"]["security"] == [] and paths["/v2/health/ready"]["get"]["security"] == []
    assert "content" not in paths["/v2/health/live"]["get"]["responses"]["200"]  # an empty body
    infer = paths["/v2/models/{name}/infer"]["post"]
    assert "`submit`" in infer["description"] and "`read`" in paths["/v2/models/{name}"]["get"]["description"]
    assert set(infer["requestBody"]["content"]) == {"application/json", "application/octet-stream"}
    assert infer["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/InferenceRequest"}
    assert "Inference-Header-Content-Length" in {p["name"] for p in infer["parameters"]}
    for status in ("404", "422", "504"):
        assert infer["responses"][status]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/OipError"}
    metadata = paths["/v2/models/{name}"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert metadata == {"$ref": "#/components/schemas/ModelMetadata"}
    assert "signature" in spec["components"]["schemas"]["StoredModel"]["properties"]


def predict_op(spec: dict) -> dict:
    return spec["paths"]["/v1/predict"]["post"]


async def test_every_route_of_the_app_is_documented(client):
    spec = await (await client.get("/openapi.json")).json()
    for route in client.app.router.routes():
        path = route.resource.canonical
        if route.method == "HEAD":
            continue
        assert route.method.lower() in spec["paths"][path], (route.method, path)


async def test_docs_page_is_served(client):
    resp = await client.get("/docs")
    assert resp.status == 200 and resp.content_type == "text/html"
    assert "/openapi.json" in await resp.text()


def test_the_api_never_imports_torch_or_workers():
    code = ("import sys; import producer_api.app, producer_api.cli.serve; producer_api.app.create_app(); "
            "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'workers'))); "
            "print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


async def test_the_docs_say_what_the_bounds_and_the_cancel_answer(client):
    spec = await (await client.get("/openapi.json")).json()
    cancel = spec["paths"]["/v1/jobs/{id}"]["delete"]["responses"]
    assert cancel["202"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/CancelRequested"}
    assert cancel["200"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/JobDocument"}
    assert spec["components"]["schemas"]["CancelRequested"]["properties"]["cancel_requested"]["default"] is True
    assert "owner" not in spec["components"]["schemas"]["JobDocument"]["properties"]
    events = spec["paths"]["/v1/jobs/{id}/events"]["get"]
    assert {"404", "422", "429", "503"} <= set(events["responses"])
    assert events["parameters"][0]["schema"]["pattern"] == "^[A-Za-z0-9._:-]{1,128}$"
    predict = spec["paths"]["/v1/predict"]["post"]
    assert {"413", "415", "422"} <= set(predict["responses"])
    assert "gzip" in predict["requestBody"]["description"]
    row = spec["components"]["schemas"]["PredictInputs"]["properties"]["series"]["anyOf"][0]["items"]
    assert row["maxItems"] == 256
