"""The model store and serving stats."""

from __future__ import annotations

import asyncio

from aiohttp import web

from pathlib import Path
from typing import Any

from producer_api import fleetview, oip
from producer_api.context import ctx
from producer_api.responses import ModelList, StatsResponse, StoredModel
from shared import store_layout
from shared.errors import FleetError
from shared.schemas import ModelKey

routes = web.RouteTableDef()


def _with_signatures(root: Path) -> list[dict[str, Any]]:
    """Every stored model, with the signature of its newest version (None when that version vanished meanwhile)."""
    found = store_layout.list_models(root)
    for entry in found:
        key = ModelKey(symbol=entry["symbol"], timeframe=entry["timeframe"], model_type=entry["model_type"])
        try:
            entry["signature"] = oip.read_model(root, key, entry["latest"]).signature
        except FleetError:
            entry["signature"] = None
    return found


@routes.get("/v1/models")
async def list_models(request: web.Request) -> web.Response:
    c = ctx(request)
    # NOTE: walking the store is blocking file IO; keep it off the event loop.
    stored = await asyncio.get_running_loop().run_in_executor(None, _with_signatures, c.settings.model_store_dir)
    held = await fleetview.models_held(c.redis, c.keys, await fleetview.live_workers(c.redis, c.keys))
    models = [StoredModel(**entry, loaded_on=sorted(held.get(entry["model_id"], ()))) for entry in stored]
    return web.json_response(ModelList(models=models).model_dump(mode="json"))


@routes.get("/v1/stats")
async def stats(request: web.Request) -> web.Response:
    c = ctx(request)
    body = StatsResponse(**await fleetview.serving_stats(c.redis, c.keys))
    return web.json_response(body.model_dump(mode="json"))
