"""The auth middleware: who is calling, may they call this route, and are they within their rate limit.

Which scope each route needs is decided here, in :data:`ROUTE_SCOPES`, for the whole API; a route missing from
the table needs ``admin`` (a new route is closed until someone decides otherwise, and a unit test lists every
route against the table). Keys come as ``X-API-Key: <key>`` or ``Authorization: Bearer <key>``.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from producer_api.errors import Handler
from producer_api.security.keystore import KeyStore
from producer_api.security.principal import ANONYMOUS, PRINCIPAL_KEY, Scope
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


def auth_middleware(guard: Guard | None) -> web.middleware:
    """The middleware; with ``guard`` None (``API_AUTH_ENABLED=false``) every caller is :data:`ANONYMOUS`."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        route = route_of(request)
        if guard is None or route is None or route in PUBLIC:
            # NOTE: an unmatched path goes on to its plain 404 / 405; it reaches no handler of ours.
            request[PRINCIPAL_KEY] = ANONYMOUS
            return await handler(request)
        secret = presented_key(request)
        if secret is None:
            raise AuthenticationError("this route needs an API key: send 'X-API-Key: <key>' or "
                                      "'Authorization: Bearer <key>'")
        principal = await guard.keys.authenticate(secret)
        if principal is None:
            raise AuthenticationError("the API key is not valid (unknown or revoked)")
        scope = ROUTE_SCOPES.get(route, "admin")
        if not principal.allows(scope):
            raise PermissionDeniedError(f"API key {principal.name!r} lacks the {scope!r} scope that "
                                        f"{route[0]} {route[1]} needs", field="scope")
        if guard.limits is not None:
            await guard.limits.hit(principal, scope)
        request[PRINCIPAL_KEY] = principal
        return await handler(request)

    return middleware
