"""The public surface: sync/async parity and a complete ``__all__``."""

from __future__ import annotations

import inspect

import aiva
from aiva.sdk.async_sandbox import AsyncCommands, AsyncFiles, AsyncSandbox
from aiva.sdk.sandbox import Commands, Files, Sandbox


def _public(cls: type) -> set[str]:
    return {n for n in dir(cls) if not n.startswith("_")}


def test_async_sandbox_has_the_same_names() -> None:
    assert _public(Sandbox) == _public(AsyncSandbox)
    assert _public(Commands) == _public(AsyncCommands)
    assert _public(Files) == _public(AsyncFiles)


def test_same_parameters_and_async_methods() -> None:
    for sync_cls, async_cls in ((Sandbox, AsyncSandbox), (Commands, AsyncCommands),
                                (Files, AsyncFiles)):
        for name in _public(sync_cls):
            s, a = getattr(sync_cls, name), getattr(async_cls, name)
            if isinstance(inspect.getattr_static(sync_cls, name), property):
                continue
            assert inspect.iscoroutinefunction(a), f"{async_cls.__name__}.{name} is not async"
            sp = list(inspect.signature(s).parameters)
            ap = list(inspect.signature(a).parameters)
            assert sp == ap, f"{name}: {sp} != {ap}"


def test_all_is_complete() -> None:
    exported = set(aiva.__all__)
    assert exported == set(aiva._HOMES), "__all__ and the lazy import table disagree"
    for name in exported:
        assert hasattr(aiva, name)
    for facade in ("create_vm", "start_vm", "stop_vm", "delete_vm", "list_vms",
                   "get_vm_status", "execute_in_vm", "sync_files", "get_logs"):
        assert facade in exported
    assert {"Sandbox", "AsyncSandbox", "AivaError"} <= exported
