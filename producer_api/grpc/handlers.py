"""Every gRPC method the API serves goes through one wrapper: who is calling, may they, and typed errors.

:func:`generic_handler` builds a service's handlers from a servicer's coroutine methods (only the methods given:
the rest answer UNIMPLEMENTED, as gRPC does for any unknown method). Each call first authenticates the key in
its metadata (``x-api-key: <key>`` or ``authorization: Bearer <key>``) and admits it with the scope and rate limit
of the method's REST twin (:data:`producer_api.security.middleware.GRPC_ROUTES`), then runs the method with a
:class:`Call` that carries the principal. Whatever the method raises becomes a status
(:mod:`producer_api.grpc.status`): fleet errors with their code and typed metadata, Redis outages UNAVAILABLE,
anything else INTERNAL without details (logged with its traceback), just as the REST error middleware answers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor

from producer_api.context import ApiContext
from producer_api.errors import UNAVAILABLE
from producer_api.grpc.status import code_of, trailing_metadata
from producer_api.security.middleware import GRPC_ROUTES, PUBLIC, admit, authenticate
from producer_api.security.principal import ANONYMOUS, Principal
from shared.errors import BrokerUnavailableError, FleetError, InternalError

log = logging.getLogger(__name__)


def presented_key(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    """The key in ``x-api-key`` or in a Bearer ``authorization`` entry of the call's metadata."""
    found = {name.lower(): value for name, value in (metadata or ())}
    key = str(found.get("x-api-key", "")).strip()
    if key:
        return key
    scheme, _, token = str(found.get("authorization", "")).partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


@dataclass
class Call:
    """One call's caller, for the method: who it is, and a check of the scope of a route known only later."""

    api: ApiContext
    principal: Principal
    context: grpc.aio.ServicerContext

    async def admit(self, route: tuple[str, str]) -> None:
        """Check the caller against ``route``'s scope and rate limit (the job service's ``Submit``, by kind)."""
        if self.api.guard is not None and route not in PUBLIC:
            await admit(self.api.guard, self.principal, route)


async def _caller(api: ApiContext, method: str, context: grpc.aio.ServicerContext) -> Call:
    route = GRPC_ROUTES.get(method)
    guard = api.guard
    if guard is None or route in PUBLIC:
        return Call(api, ANONYMOUS, context)
    principal = await authenticate(guard, presented_key(context.invocation_metadata()))
    if route is not None:  # None: the method admits itself once it knows what is asked (Submit)
        await admit(guard, principal, route)
    return Call(api, principal, context)


def as_fleet_error(exc: Exception, method: str) -> FleetError:
    """The typed error a failed call answers with (logging the ones that are bugs)."""
    if isinstance(exc, FleetError):
        return exc
    if isinstance(exc, UNAVAILABLE):
        log.warning("%s: Redis or the broker is unreachable: %s", method, exc)
        return BrokerUnavailableError(f"Redis or the broker cannot be reached now: {exc}")
    log.error("unhandled error in %s", method, exc_info=exc)
    return InternalError("internal error; the API logged the details")


async def _abort(context: grpc.aio.ServicerContext, err: FleetError) -> None:
    await context.abort(code_of(err), err.message, trailing_metadata(err))


UnaryMethod = Callable[[Any, Call], Awaitable[Any]]
StreamMethod = Callable[[Any, Call], AsyncIterator[Any]]


def _unary(api: ApiContext, method: str, fn: UnaryMethod) -> Callable[..., Awaitable[Any]]:
    async def behavior(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await fn(request, await _caller(api, method, context))
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort(context, as_fleet_error(exc, method))
    return behavior


def _stream(api: ApiContext, method: str, fn: StreamMethod) -> Callable[..., AsyncIterator[Any]]:
    async def behavior(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            async for item in fn(request, await _caller(api, method, context)):
                yield item
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort(context, as_fleet_error(exc, method))
    return behavior


def generic_handler(api: ApiContext, service: ServiceDescriptor, servicer: Any,
                    methods: Iterable[str]) -> grpc.GenericRpcHandler:
    """Handlers of ``service``'s ``methods``, each running ``servicer.<Method>(request, call)`` guarded."""
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for name in methods:
        desc = service.methods_by_name[name]
        full = f"/{service.full_name}/{name}"
        request_cls = message_factory.GetMessageClass(desc.input_type)
        response_cls = message_factory.GetMessageClass(desc.output_type)
        fn = getattr(servicer, name)
        codec = {"request_deserializer": request_cls.FromString,
                 "response_serializer": response_cls.SerializeToString}
        if desc.server_streaming:
            handlers[name] = grpc.unary_stream_rpc_method_handler(_stream(api, full, fn), **codec)
        else:
            handlers[name] = grpc.unary_unary_rpc_method_handler(_unary(api, full, fn), **codec)
    return grpc.method_handlers_generic_handler(service.full_name, handlers)
