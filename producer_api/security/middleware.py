"""The auth middleware: who is calling, may they call this route, and are they within their rate limit.

Which scope each route needs is decided here, in :data:`ROUTE_SCOPES`, for the whole API; a route missing from
the table needs ``admin`` (a new route is closed until someone decides otherwise, and a unit test lists every
route against the table). Keys come as ``X-API-Key: <key>`` or ``Authorization: Bearer <key>`` (gRPC: the
same names as metadata; :mod:`producer_api.grpc.auth` checks gRPC methods against the same table through
:data:`GRPC_ROUTES`).
"""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from producer_api.errors import Handler
from producer_api.security.keystore import KeyStore
from producer_api.security.principal import ANONYMOUS, PRINCIPAL_KEY, Principal, Scope
from producer_api.security.ratelimit import RateLimits
from shared.errors import AuthenticationError, PermissionDeniedError

#: Routes anyone may call: probes must not need a secret, and the docs describe how to get one.
PUBLIC: frozenset[tuple[str, str]] = frozenset({
    ("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/docs"), ("GET", "/openapi.json"),
    ("GET", "/v2/health/live"), ("GET", "/v2/health/ready"),  # the Open Inference Protocol's probes
})
#: (method, route pattern) -> the scope a key needs. ``admin`` keys may call everything.
ROUTE_SCOPES: dict[tuple[str, str], Scope] = {
    ("POST", "/v1/predict"): "submit",
    ("POST", "/v1/predict/batch"): "submit",
    ("DELETE", "/v1/jobs/{id}"): "submit",  # cancelling: only the submitter (or an admin) owns the job
    ("GET", "/v1/jobs/{id}"): "read",
    ("GET", "/v1/jobs/{id}/events"): "read",
    ("GET", "/v1/models"): "read",
    ("GET", "/v1/stats"): "read",
    ("POST", "/v1/models/load"): "admin",
    ("POST", "/v1/models/unload"): "admin",
    ("POST", "/v1/keys"): "admin",
    ("GET", "/v1/keys"): "admin",
    ("DELETE", "/v1/keys/{name}"): "admin",
    ("GET", "/v1/dead-letters"): "admin",
    ("POST", "/v1/dead-letters"): "admin",
    ("GET", "/metrics"): "metrics",
    # The Open Inference Protocol (KServe v2): metadata and readiness read, an infer submits a predict job.
    ("GET", "/v2"): "read",
    ("GET", "/v2/models/{name}"): "read",
    ("GET", "/v2/models/{name}/versions/{version}"): "read",
    ("GET", "/v2/models/{name}/ready"): "read",
    ("GET", "/v2/models/{name}/versions/{version}/ready"): "read",
    ("POST", "/v2/models/{name}/infer"): "submit",
    ("POST", "/v2/models/{name}/versions/{version}/infer"): "submit",
}
#: gRPC method -> the REST route it is the twin of, whose scope (or publicity) it takes: one table decides both.
#: The job service's ``Submit`` takes the route of the job's kind (:data:`SUBMIT_ROUTES`), known once its request
#: is read; every method the gRPC server serves is listed here or there (a unit test checks).
GRPC_ROUTES: dict[str, tuple[str, str]] = {
    "/inference.GRPCInferenceService/ServerLive": ("GET", "/v2/health/live"),
    "/inference.GRPCInferenceService/ServerReady": ("GET", "/v2/health/ready"),
    "/inference.GRPCInferenceService/ServerMetadata": ("GET", "/v2"),
    "/inference.GRPCInferenceService/ModelMetadata": ("GET", "/v2/models/{name}"),
    "/inference.GRPCInferenceService/ModelReady": ("GET", "/v2/models/{name}/ready"),
    "/inference.GRPCInferenceService/ModelInfer": ("POST", "/v2/models/{name}/infer"),
    "/finsight.fleet.v1.JobService/GetJob": ("GET", "/v1/jobs/{id}"),
    "/finsight.fleet.v1.JobService/WatchJob": ("GET", "/v1/jobs/{id}/events"),
    "/finsight.fleet.v1.JobService/CancelJob": ("DELETE", "/v1/jobs/{id}"),
}
#: Job kind -> the submission route whose scope a gRPC ``Submit`` of that kind needs.
SUBMIT_ROUTES: dict[str, tuple[str, str]] = {
    "load": ("POST", "/v1/models/load"),
    "unload": ("POST", "/v1/models/unload"),
    "predict": ("POST", "/v1/predict"),
    "batch_predict": ("POST", "/v1/predict/batch"),
}


def route_of(request: web.Request) -> tuple[str, str] | None:
    """``(method, pattern)`` of the route ``request`` matched (HEAD as GET); None when none matched."""
    route = request.match_info.route
    resource = route.resource
    if resource is None or request.match_info.http_exception is not None:
        return None
    method = "GET" if route.method == "HEAD" else route.method
    return method, resource.canonical


def presented_key(request: web.Request) -> str | None:
    """The key in ``X-API-Key`` or in a Bearer ``Authorization`` header; None when neither holds one."""
    key = request.headers.get("X-API-Key", "").strip()
    if key:
        return key
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


@dataclass
class Guard:
    """What the middleware checks with: the key store and the rate limits (None: no limits)."""

    keys: KeyStore
    limits: RateLimits | None


async def authenticate(guard: Guard, secret: str | None) -> Principal:
    """The principal a presented key stands for.

    Raises:
        AuthenticationError: no key, or an unknown or revoked one (401).
    """
    if secret is None:
        raise AuthenticationError("this route needs an API key: send 'X-API-Key: <key>' or "
                                  "'Authorization: Bearer <key>'")
    principal = await guard.keys.authenticate(secret)
    if principal is None:
        raise AuthenticationError("the API key is not valid (unknown or revoked)")
    return principal


async def admit(guard: Guard, principal: Principal, route: tuple[str, str]) -> None:
    """Let ``principal`` call ``route`` (or the gRPC method that is its twin): its scope, then its rate limit.

    Raises:
        PermissionDeniedError: the key lacks the route's scope (403).
        RateLimitedError: the key is over its rate limit (429).
    """
    scope = ROUTE_SCOPES.get(route, "admin")
    if not principal.allows(scope):
        raise PermissionDeniedError(f"API key {principal.name!r} lacks the {scope!r} scope that "
                                    f"{route[0]} {route[1]} needs", field="scope")
    if guard.limits is not None:
        await guard.limits.hit(principal, scope)


def auth_middleware(guard: Guard | None) -> web.middleware:
    """The middleware; with ``guard`` None (``API_AUTH_ENABLED=false``) every caller is :data:`ANONYMOUS`."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        route = route_of(request)
        if guard is None or route is None or route in PUBLIC:
            # NOTE: an unmatched path goes on to its plain 404 / 405; it reaches no handler of ours.
            request[PRINCIPAL_KEY] = ANONYMOUS
            return await handler(request)
        principal = await authenticate(guard, presented_key(request))
        await admit(guard, principal, route)
        request[PRINCIPAL_KEY] = principal
        return await handler(request)

    return middleware
