"""The host directories an MCP client may touch: none unless the user grants them.

An MCP client is an agent, and an agent is not the user: ``aiva mcp serve --allow-dir DIR``
(repeatable), ``aiva daemon start --mcp-allow-dir DIR`` and the config key
``mcp.allow_dirs`` are the only ways a host path becomes reachable through MCP. Each grant
is resolved (symlinks followed) once, at startup. A requested path must be absolute, hold
no NUL and no ``..``, and, after the symlinks of its existing part are resolved, lie at
or below a granted directory: a link inside a grant that leads out of it is refused.

This is the policy check; the writes below the checked directory are made through
directory descriptors with ``O_NOFOLLOW`` by the sync code itself.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from aiva.errors import InvalidValue

HOW_TO_GRANT = ("the user grants a directory with `aiva mcp serve --allow-dir DIR` "
                "(`aiva daemon start --mcp-allow-dir DIR` for the daemon's /mcp) or the "
                "config key mcp.allow_dirs")


@dataclass(frozen=True)
class Grants:
    """Resolved host directories, each existing at startup."""

    dirs: tuple[Path, ...] = ()

    @classmethod
    def resolve(cls, *sources: Iterable[str]) -> Grants:
        """Every given directory made absolute and resolved; InvalidValue unless each is
        an existing directory (a grant that silently meant nothing would mislead)."""
        out: list[Path] = []
        for source in sources:
            for raw in source:
                if "\0" in raw or not raw:
                    raise InvalidValue(f"granted directory {raw!r} is not a path")
                try:
                    real = Path(raw).expanduser().resolve(strict=True)
                except (OSError, RuntimeError):
                    raise InvalidValue(f"granted directory '{raw}' does not exist",
                                       hint="create it first, or fix --allow-dir / "
                                            "mcp.allow_dirs") from None
                if not real.is_dir():
                    raise InvalidValue(f"granted path '{raw}' is not a directory",
                                       hint="grant a directory")
                if real not in out:
                    out.append(real)
        return cls(tuple(out))

    def describe(self) -> str:
        """For tool descriptions: what the client may touch."""
        if not self.dirs:
            return "No host directory is granted to this server, so sync is refused."
        return "Granted host directories (local must be at or below one): " + ", ".join(
            str(d) for d in self.dirs) + "."

    def check(self, local: str) -> Path:
        """``local`` as a resolved path inside a grant, or InvalidValue saying why not."""
        if not self.dirs:
            raise InvalidValue("no host directory is granted to this MCP server",
                               hint=HOW_TO_GRANT)
        if not isinstance(local, str) or "\0" in local:
            raise InvalidValue("the local path holds a NUL byte", hint=self._where())
        path = os.path.expanduser(local)
        if not os.path.isabs(path):
            raise InvalidValue(f"local path '{local}' is not absolute", hint=self._where())
        if ".." in Path(path).parts:
            raise InvalidValue(f"local path '{local}' contains '..'", hint=self._where())
        try:
            real = Path(path).resolve(strict=False)  # symlinks of the existing part
        except (OSError, RuntimeError):  # a symlink loop
            raise InvalidValue(f"local path '{local}' cannot be resolved (a symlink loop?)",
                               hint=self._where()) from None
        if not any(real == d or d in real.parents for d in self.dirs):
            what = "leads out of" if Path(path) != real and _lexically_inside(
                Path(path), self.dirs) else "is not inside"
            raise InvalidValue(f"local path '{local}' {what} the granted directories",
                               hint=self._where())
        if real.exists() and not real.is_dir():
            raise InvalidValue(f"local path '{local}' is not a directory",
                               hint="sync takes a directory")
        return real

    def _where(self) -> str:
        return ("give an absolute path at or below a granted directory: "
                + ", ".join(str(d) for d in self.dirs))


def _lexically_inside(path: Path, dirs: tuple[Path, ...]) -> bool:
    return any(path == d or d in path.parents for d in dirs)
