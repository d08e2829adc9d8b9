"""API key management over HTTP (``admin`` scope): create, list, revoke. ``fleet keys`` does the same on Redis."""

from __future__ import annotations

from aiohttp import web
from pydantic import ValidationError

from producer_api.body import read_body
from producer_api.context import ctx
from producer_api.errors import validation_error
from producer_api.responses import json_document
from producer_api.security.schemas import KeyCreated, KeyList, KeyRequest, KeyRevoked, KeyView
from shared.errors import FleetError

routes = web.RouteTableDef()


class KeyNotFoundError(FleetError):
    """No stored key has that name."""

    http_status = 404


@routes.post("/v1/keys")
async def create_key(request: web.Request) -> web.Response:
    c = ctx(request)
    try:
        wanted = KeyRequest.model_validate(await read_body(request))
    except ValidationError as exc:
        raise validation_error(exc) from None
    secret = await c.keystore.create(wanted.name, wanted.scopes, wanted.rate_limit)
    return json_document(KeyCreated(name=wanted.name, scopes=list(wanted.scopes), rate_limit=wanted.rate_limit,
                                    key=secret), status=201)


@routes.get("/v1/keys")
async def list_keys(request: web.Request) -> web.Response:
    return json_document(KeyList(keys=[KeyView.of(k) for k in await ctx(request).keystore.list()]))


@routes.delete("/v1/keys/{name}")
async def revoke_key(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if not await ctx(request).keystore.revoke(name):
        raise KeyNotFoundError(f"no stored key named {name!r}", field="name")
    return json_document(KeyRevoked(name=name, revoked=True))
