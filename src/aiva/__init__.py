"""aiva: isolated machines for AI agents and MCP servers."""

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
from aiva.sdk import AsyncSandbox, Sandbox
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

__version__ = "0.1.0"

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
