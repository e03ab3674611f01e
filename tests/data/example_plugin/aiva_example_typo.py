"""An aiva plugin with a misspelt hook name, which aiva should report."""

from __future__ import annotations

from aiva.models import SandboxInfo
from aiva.plugins import hookimpl


@hookimpl
def on_vm_strat(sandbox: SandboxInfo) -> None:
    pass
