"""The MCP server over streamable HTTP, as the daemon's ``/mcp`` route.

The daemon serves one app on two listeners (Unix socket, TCP) with uvicorn's lifespan
off, so the SDK's session manager, which needs a running task group, is started here: by
the first request (the MCP SDK is imported then, keeping the daemon's start fast), in a
task that lives until :meth:`McpEndpoint.close`. Auth is the daemon's :class:`Gate`
around the whole app (bearer token on TCP, file mode on the socket), so the SDK's own
DNS-rebinding check is off: a browser page can neither send the token nor reach the
socket.

This module imports no MCP SDK at import time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from starlette.types import Receive, Scope, Send

    from aiva.engine import Engine
    from aiva.mcp.grants import Grants

log = logging.getLogger("aiva.mcp")


class McpEndpoint:
    """An ASGI app: the MCP server over ``engine``, its sessions started at first use.
    ``grants``: the host directories its sync tool may touch (none by default)."""

    def __init__(self, engine: Engine, grants: Grants | None = None) -> None:
        self.engine = engine
        self.grants = grants
        self._manager: Any = None  # StreamableHTTPSessionManager, once started
        self._lock: asyncio.Lock | None = None
        self._stop: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        manager = await self._started()
        if manager is None:
            await _unavailable(send)
            return
        await manager.handle_request(scope, receive, send)

    async def _started(self) -> Any:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._manager is None and not self._closed:
                from aiva.daemon.bridge import run_sync

                # the SDK's import takes a good part of a second: not on the event loop
                self._manager = await run_sync(self._build)
                ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                self._stop = asyncio.Event()
                self._task = asyncio.create_task(self._serve(self._manager, ready),
                                                 name="aiva-mcp-sessions")
                try:
                    await ready
                except BaseException:
                    self._manager = None  # the next request tries again
                    raise
        return None if self._closed else self._manager

    def _build(self) -> Any:
        from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
        from mcp.server.transport_security import TransportSecuritySettings

        from aiva.mcp.limits import Limits
        from aiva.mcp.scope import Scope
        from aiva.mcp.serve import build_server

        settings = self.engine.config.mcp
        server = build_server(self.engine, Limits.from_settings(settings), self.grants,
                              Scope(all_sandboxes=settings.all_sandboxes))
        server.streamable_http_app(  # makes the server's session manager
            transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False))
        manager: StreamableHTTPSessionManager = server.session_manager
        return manager

    async def _serve(self, manager: Any, ready: asyncio.Future[None]) -> None:
        """Hold the session manager's task group open until :meth:`close`."""
        assert self._stop is not None
        try:
            async with manager.run():
                ready.set_result(None)
                log.info("mcp: streamable HTTP sessions started")
                await self._stop.wait()
        except BaseException as exc:
            if not ready.done():
                if isinstance(exc, asyncio.CancelledError):
                    ready.cancel()
                else:
                    ready.set_exception(exc)
            raise
        log.info("mcp: streamable HTTP sessions ended")

    def close(self) -> None:
        """End every MCP session (their open streams close), so the servers can stop
        without waiting for them. Call on the event loop's thread."""
        self._closed = True
        if self._stop is not None:
            self._stop.set()

    async def wait_closed(self) -> None:
        self.close()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


async def _unavailable(send: Send) -> None:
    body = b'{"error": {"type": "BackendUnavailable", "message": "the aiva daemon is ' \
           b'shutting down", "hint": "start it again with `aiva daemon start`"}}'
    await send({"type": "http.response.start", "status": 503, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
