"""Which sandboxes an MCP session may see and change: by default only those it created.

An MCP client is an agent, not the user: it must not list, read or destroy the user's own
sandboxes (or another session's). Each sandbox made through ``sandbox_create`` carries
the label ``aiva.mcp.session`` with the id of the session that made it; every tool that
names a sandbox checks it first, and ``sandbox_list`` shows only the session's own.
``aiva mcp serve --all-sandboxes`` (``mcp.all_sandboxes`` for the daemon's ``/mcp``)
widens a server to every sandbox of the AIVA_HOME.

A session is one ``aiva mcp serve`` process on stdio, and one ``Mcp-Session-Id`` on the
daemon's streamable HTTP (HTTP clients that send none share the daemon's one id: they see
each other's sandboxes, never the user's).
"""

from __future__ import annotations

import secrets
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from aiva.errors import SandboxNotFound

if TYPE_CHECKING:
    from aiva.models import SandboxInfo

LABEL = "aiva.mcp.session"
_current: ContextVar[str | None] = ContextVar("aiva_mcp_session", default=None)


class Scope:
    """The rule of one MCP server; ``session_of`` names the session of a tool call."""

    def __init__(self, *, all_sandboxes: bool = False) -> None:
        self.all_sandboxes = all_sandboxes
        self.fallback = f"mcp-{secrets.token_hex(6)}"  # no session object: this server
        self._ids: dict[str, str] = {}  # transport session id -> ours (never the raw id)

    def session_of(self, ctx: Any) -> str:
        """The id of the session of ``ctx`` (the SDK's request context): the transport's
        session id when it has one (streamable HTTP's ``Mcp-Session-Id``), else this
        server's own (stdio: one client per process)."""
        try:
            sid = ctx.session._connection.session_id
        except (AttributeError, ValueError):
            sid = None
        if not isinstance(sid, str) or not sid:
            return self.fallback
        found = self._ids.get(sid)
        if found is None:
            found = self._ids[sid] = f"mcp-{secrets.token_hex(6)}"
        return found

    def one_session(self) -> bool:
        """Whether every call so far came without a transport session of its own (stdio):
        then a call with no context at all (a static resource) is that same client's."""
        return not self._ids

    @staticmethod
    def enter(session: str) -> Any:
        return _current.set(session)

    @staticmethod
    def leave(token: Any) -> None:
        _current.reset(token)

    def current(self) -> str:
        return _current.get() or self.fallback

    def labels(self) -> dict[str, str]:
        """The labels a sandbox made in this session gets."""
        return {LABEL: self.current()}

    def sees(self, sb: SandboxInfo) -> bool:
        return self.all_sandboxes or sb.spec.labels.get(LABEL) == self.current()

    def check(self, sb: SandboxInfo) -> SandboxInfo:
        """``sb`` if this session may use it; else the same error as a missing one (a
        session learns nothing about sandboxes that are not its own)."""
        if not self.sees(sb):
            raise SandboxNotFound(sb.name)
        return sb
