"""paths.py is the one place that names what lives under AIVA_HOME, and a base module:
the layout stays what it was, no other module spells a path below the home, and paths.py
needs nothing but the standard library."""

from __future__ import annotations

import ast
import inspect
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from aiva import paths

SRC = Path(paths.__file__).resolve().parent
SID = "0123456789abcdef-0123"

#: Every path function and where it points, relative to the home (the layout on disk;
#: changing one strands what older versions left there).
LAYOUT: dict[str, tuple[Callable[[], Path], str]] = {
    "config_path": (paths.config_path, "config.yaml"),
    "state_db": (paths.state_db, "state.db"),
    "events_jsonl": (paths.events_jsonl, "events.jsonl"),
    "aiva_log": (paths.aiva_log, "aiva.log"),
    "lessons_json": (paths.lessons_json, "lessons.json"),
    "agent_dir": (paths.agent_dir, "agent"),
    "logs_root": (paths.logs_root, "logs"),
    "logs_dir": (lambda: paths.logs_dir(SID), f"logs/{SID}"),
    "command_log": (lambda: paths.command_log(SID), f"logs/{SID}/commands.jsonl"),
    "sync_dir": (lambda: paths.sync_dir(SID), f"sync/{SID}"),
    "vms_dir": (paths.vms_dir, "vms"),
    "vm_dir": (lambda: paths.vm_dir(SID), f"vms/{SID}"),
    "jail_dir": (paths.jail_dir, "jail"),
    "disks_dir": (paths.disks_dir, "disks"),
    "desktops_dir": (paths.desktops_dir, "desktops"),
    "desktop_password": (lambda: paths.desktop_password(SID), f"desktops/{SID}.password"),
    "task_output": (lambda: paths.task_output("t-0123abcd"), "tasks/t-0123abcd/output.jsonl"),
    "run_root": (paths.run_root, "run"),
    "run_dir": (lambda: paths.run_dir(SID), f"run/{SID[:12]}"),
    "locks_dir": (paths.locks_dir, "run/locks"),
    "pool_lock": (lambda: paths.pool_lock("python"), "run/locks/pool/python.lock"),
    "net_dir": (paths.net_dir, "run/net"),
    "daemon_socket": (paths.daemon_socket, "daemon.sock"),
    "daemon_token": (paths.daemon_token, "daemon.token"),
    "mcp_token": (paths.mcp_token, "mcp.token"),
    "daemon_pid": (paths.daemon_pid, "daemon.pid"),
    "daemon_state": (paths.daemon_state, "daemon.json"),
    "daemon_log": (paths.daemon_log, "daemon.log"),
    "daemon_lock": (paths.daemon_lock, "daemon.lock"),
    "cache_dir": (paths.cache_dir, "cache"),
    "images_cache": (paths.images_cache, "cache/images"),
    "python_check_cache": (paths.python_check_cache, "cache/python-check.json"),
    "vm_cache": (paths.vm_cache, "cache/vm"),
    "accel_cache": (paths.accel_cache, "cache/vm/accel.json"),
    "kernel_cache": (paths.kernel_cache, "cache/vm/kernel"),
}


@pytest.mark.parametrize("name", sorted(LAYOUT))
def test_layout_under_the_home(name: str, tmp_path: Path,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIVA_HOME", str(tmp_path))
    fn, rel = LAYOUT[name]
    assert fn() == tmp_path / rel


def test_every_path_function_is_in_the_layout() -> None:
    """A new path gets a row above, so its place on disk is stated once more, on purpose."""
    public = {name for name, obj in vars(paths).items()
              if inspect.isfunction(obj) and obj.__module__ == paths.__name__
              and not name.startswith("_")}
    assert public - {"aiva_home", "lock_path", "sync_state"} == set(LAYOUT)


def test_hashed_names_stay_below_their_directory(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIVA_HOME", str(tmp_path))
    lock = paths.lock_path("../../etc/passwd")
    assert lock.parent == tmp_path / "run" / "locks" and len(lock.stem) == 32
    state = paths.sync_state(SID, tmp_path, "/work")
    assert state.parent == tmp_path / "sync" / SID and state.suffix == ".json"
    assert state == paths.sync_state(SID, tmp_path, "/work") != paths.sync_state(
        SID, tmp_path, "/other")


def test_home_default_and_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIVA_HOME", str(tmp_path / "h"))
    assert paths.aiva_home() == tmp_path / "h"
    monkeypatch.setenv("AIVA_HOME", "")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert paths.aiva_home() == tmp_path / ".aiva"


# ---------------------------------------------------------------------- the rules


def _sources() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def _called(node: ast.expr, names: set[str]) -> bool:
    """``aiva_home()`` or ``anything.aiva_home()`` (likewise for each name)."""
    if not isinstance(node, ast.Call):
        return False
    fn = node.func
    return (isinstance(fn, ast.Name) and fn.id in names) or (
        isinstance(fn, ast.Attribute) and fn.attr in names)


def _home_joins(tree: ast.AST) -> list[int]:
    """Lines that join a path onto the home itself: ``aiva_home() / ...`` (and the same
    with ``ensure_home()``, which returns it)."""
    homes = {"aiva_home", "ensure_home"}
    return [node.lineno for node in ast.walk(tree)
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div)
            and _called(node.left, homes)]


def test_home_joins_catch_what_they_should() -> None:
    tree = ast.parse("a = aiva_home() / 'x'\nb = paths.aiva_home() / 'y'\n"
                     "c = ensure_home() / 'z'\nd = str(aiva_home())\ne = paths.run_root() / 'f'\n")
    assert _home_joins(tree) == [1, 2, 3]


def test_only_paths_py_builds_paths_under_the_home() -> None:
    found = [f"{path.relative_to(SRC)}:{line}"
             for path in _sources() if path.name != "paths.py" or path.parent != SRC
             for line in _home_joins(ast.parse(path.read_text(), str(path)))]
    assert found == [], "name the path in aiva/paths.py and call that instead"


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node, but not the bodies of ``if TYPE_CHECKING:`` (never imported)."""
    out: list[ast.AST] = []
    todo = [tree]
    while todo:
        node = todo.pop()
        out.append(node)
        if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING"):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))
    return out


def _imports(path: Path) -> set[str]:
    """Modules ``path`` imports when it runs, at any depth of its code."""
    tree = ast.parse(path.read_text(), str(path))
    package = ".".join(path.relative_to(SRC.parent).with_suffix("").parts)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    out: set[str] = set()
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            out.add(base)
            # ``from aiva import paths`` imports a module, not a name
            out.update(f"{base}.{a.name}" for a in node.names
                       if _module_file(f"{base}.{a.name}") is not None)
    return out


def _module_file(name: str) -> Path | None:
    if name.split(".")[0] != "aiva":
        return None
    rel = Path(*name.split(".")[1:])
    for candidate in (SRC / rel.with_suffix(".py"), SRC / rel / "__init__.py"):
        if rel.parts and candidate.is_file():
            return candidate
    return SRC / "__init__.py" if not rel.parts else None


def _non_stdlib(module: str, seen: set[str]) -> set[str]:
    """What ``module`` imports, transitively through aiva's modules, that is neither the
    standard library nor aiva."""
    if module in seen:
        return set()
    seen.add(module)
    file = _module_file(module)
    if file is None:
        top = module.split(".")[0]
        return set() if top in sys.stdlib_module_names or top == "__future__" else {module}
    bad: set[str] = set()
    for name in _imports(file):
        bad |= _non_stdlib(name, seen)
    return bad


def test_paths_py_needs_only_the_standard_library() -> None:
    assert _non_stdlib("aiva.paths", set()) == set()


def test_the_stdlib_check_sees_through_aiva_modules() -> None:
    """The check itself: config.py is pydantic and yaml, and paths.py must not be."""
    assert {"pydantic", "yaml"} <= _non_stdlib("aiva.config", set())
