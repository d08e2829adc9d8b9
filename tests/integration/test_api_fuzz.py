"""Property-based fuzzing of the API from its own OpenAPI document (schemathesis): no input answers 5xx.

The API runs as shipped (``fleet api``, keys and rate limits on) against the real Redis with a real worker, so
that jobs the fuzzer manages to enqueue (an unload of any model, say) run and ``?wait`` returns. Every operation
is fuzzed twice: with a valid admin key, checking ``not_a_server_error`` and ``ignored_auth`` (a request
without the key or with a wrong one must be refused), and without any key (everything but the probes and the docs
must be 401, never a 5xx).
"""

from __future__ import annotations

import json
from typing import Iterator

import msgpack
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase
from hypothesis import settings as fuzz_settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import ignored_auth

from producer_api.openapi import build_spec
from shared.settings import FleetSettings
from tests.integration.conftest import ApiProcess, WorkerProcess

#: Examples per operation and key state: bounded so that the run fits CI (~30 s for the two passes here).
EXAMPLES_PER_OPERATION = 40
SCHEMA = schemathesis.openapi.from_dict(build_spec())


@schemathesis.serializer("application/msgpack")
def _msgpack(ctx: object, value: object) -> bytes:
    # The API reads msgpack bodies as well as JSON; fuzz both encodings of every body. Integers beyond 64 bits
    # have no msgpack form: they go as JSON text under the msgpack type (a malformed body to the API).
    try:
        return msgpack.packb(value)
    except (OverflowError, TypeError, ValueError):
        return json.dumps(value).encode()


#: Cases run, by pass: the closing notes quote them.
CASES = {"with key": 0, "without key": 0}
FUZZ = fuzz_settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True, database=None,
                     phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def live_api(fleet_settings: FleetSettings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    logs = tmp_path_factory.mktemp("fuzz")
    worker = WorkerProcess(fleet_settings, logs / "worker.log")
    try:
        api = ApiProcess(fleet_settings, logs / "api.log")
    except BaseException:
        worker.stop()
        raise
    try:
        yield api.url
    finally:
        api.stop()
        worker.stop()
        print(f"\nschemathesis cases run: {CASES} ({sum(CASES.values())} in all)")
        server_errors = api.unhandled_errors()
        assert not server_errors, "the API logged unhandled errors:\n" + "\n".join(server_errors[:20])


@SCHEMA.parametrize()
@FUZZ
def test_no_input_is_a_server_error_with_a_key(case, live_api: str, api_key: str) -> None:
    CASES["with key"] += 1
    case.call_and_validate(base_url=live_api, headers={"X-API-Key": api_key}, timeout=70,
                           checks=[not_a_server_error, ignored_auth])


@SCHEMA.parametrize()
@FUZZ
def test_no_input_is_a_server_error_without_a_key(case, live_api: str) -> None:
    CASES["without key"] += 1
    response = case.call(base_url=live_api, timeout=70)
    public = not case.operation.definition.raw.get("security", True)
    assert response.status_code < 500, (case.method, case.formatted_path, response.status_code, response.text[:300])
    # NOTE: schemathesis also tries methods the route lacks (TRACE, say): no handler matches them, and they
    # answer 405 to anyone; everything a handler would serve needs the key.
    if not public and case.method.upper() == case.operation.method.upper():
        assert response.status_code == 401, (case.method, case.formatted_path, response.status_code)
