"""aiva: isolated machines for AI agents and MCP servers.

Names are imported on first use, so ``import aiva`` (and every CLI command) stays fast.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_HOMES = {
    "ExecResult": "aiva.agent_client",
    "ProcessHandle": "aiva.agent_client",
    "AivaError": "aiva.errors",
    "BackendUnavailable": "aiva.errors",
    "CommandFailed": "aiva.errors",
    "CommandTimeout": "aiva.errors",
    "InvalidTransition": "aiva.errors",
    "SandboxExists": "aiva.errors",
    "SandboxNotFound": "aiva.errors",
    "Sandbox": "aiva.sdk.sandbox",
    "AsyncSandbox": "aiva.sdk.async_sandbox",
    **{name: "aiva.sdk.controller" for name in (
        "create_vm", "start_vm", "stop_vm", "delete_vm", "list_vms", "get_vm_status",
        "execute_in_vm", "sync_files", "get_logs")},
}

__all__ = [
    "AivaError",
    "AsyncSandbox",
    "BackendUnavailable",
    "CommandFailed",
    "CommandTimeout",
    "ExecResult",
    "InvalidTransition",
    "ProcessHandle",
    "Sandbox",
    "SandboxExists",
    "SandboxNotFound",
    "create_vm",
    "delete_vm",
    "execute_in_vm",
    "get_logs",
    "get_vm_status",
    "list_vms",
    "start_vm",
    "stop_vm",
    "sync_files",
]


def __getattr__(name: str) -> Any:
    try:
        module = _HOMES[name]
    except KeyError:
        raise AttributeError(f"module 'aiva' has no attribute {name!r}") from None
    return getattr(import_module(module), name)


def __dir__() -> list[str]:
    return [*globals(), *__all__]


if TYPE_CHECKING:
    from aiva.agent_client import ExecResult, ProcessHandle
    from aiva.errors import (
        AivaError,
        BackendUnavailable,
        CommandFailed,
        CommandTimeout,
        InvalidTransition,
        SandboxExists,
        SandboxNotFound,
    )
    from aiva.sdk.async_sandbox import AsyncSandbox
    from aiva.sdk.controller import (
        create_vm,
        delete_vm,
        execute_in_vm,
        get_logs,
        get_vm_status,
        list_vms,
        start_vm,
        stop_vm,
        sync_files,
    )
    from aiva.sdk.sandbox import Sandbox
