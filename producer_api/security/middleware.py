"""The auth middleware: who is calling, and may they call this route.

(First step: every request is the anonymous caller; API keys follow.)
"""

from __future__ import annotations

from aiohttp import web

from producer_api.errors import Handler
from producer_api.security.principal import ANONYMOUS, PRINCIPAL_KEY


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    request[PRINCIPAL_KEY] = ANONYMOUS
    return await handler(request)
