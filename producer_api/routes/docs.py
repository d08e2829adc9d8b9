"""The OpenAPI document and a static page that lists it."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from producer_api.openapi import build_spec

routes = web.RouteTableDef()
DOCS_PAGE = Path(__file__).resolve().parent.parent / "static" / "docs.html"


@routes.get("/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    return web.json_response(build_spec())


@routes.get("/docs")
async def docs(request: web.Request) -> web.FileResponse:
    return web.FileResponse(DOCS_PAGE, headers={"Content-Type": "text/html; charset=utf-8"})
