"""grpc.health.v1.Health for this server: Check, List and Watch, with no lock held while a watcher is written to.

grpc_health's asyncio servicer holds a condition's lock around every write to a watcher, so one client
that stops reading (a zero HTTP/2 window) blocks every later status change: the server could never
report SERVING, nor drain. Here a status change only replaces an event the watchers wait on, and a
write to a client that reads nothing ends its stream (server/transport/guards.py `timed_write`).
"""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2

from server.transport.guards import timed_write

SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class HealthService:
    """Statuses by service name ("" is the whole server); served through the guards like every other service."""

    def __init__(self) -> None:
        self._status: dict[str, int] = {"": health_pb2.HealthCheckResponse.SERVING}
        self._changed: dict[str, asyncio.Event] = {}
        self._final = False

    async def set(self, service: str, status: int) -> None:
        if self._final:
            return  # after enter_graceful_shutdown nothing turns SERVING again
        self._status[service] = status
        if event := self._changed.pop(service, None):
            event.set()

    async def enter_graceful_shutdown(self) -> None:
        for service in list(self._status):
            await self.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        self._final = True

    async def Check(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext):  # noqa: N802
        status = self._status.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def List(self, request: health_pb2.HealthListRequest, context: grpc.aio.ServicerContext):  # noqa: N802
        return health_pb2.HealthListResponse(
            statuses={name: health_pb2.HealthCheckResponse(status=status) for name, status in self._status.items()}
        )

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext) -> None:  # noqa: N802
        """The current status at once, then every change; an unknown service is SERVICE_UNKNOWN until it is set."""
        sent = None
        while True:
            status = self._status.get(request.service, SERVICE_UNKNOWN)
            if status != sent:
                await timed_write(context, health_pb2.HealthCheckResponse(status=status))
                sent = status
            if self._status.get(request.service, SERVICE_UNKNOWN) == sent:
                await self._changed.setdefault(request.service, asyncio.Event()).wait()
