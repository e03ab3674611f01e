"""Bad input never reaches the filesystem, and MCP clients reach only granted host paths.

Real processes throughout: the ``aiva`` CLI as a user runs it, ``aiva mcp serve`` over
stdio driven by the official MCP client in a real Docker sandbox, and a real daemon's
``/mcp``. Each "nothing was made" claim compares a tree snapshot taken before and after
(of a private root holding AIVA_HOME, its parents and the working directory).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from aiva.daemon import control, wire
from aiva.engine import spec_rules

pytestmark = pytest.mark.docker

AIVA = [sys.executable, "-m", "aiva.cli.main"]
TIMEOUT = 180.0
#: Files aiva keeps in AIVA_HOME whatever a command does (the state db's journal ...).
VOLATILE = ("state.db", "aiva.log", "events.jsonl")


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")
            if not p.name.startswith(VOLATILE)}


def _aiva(*args: str, home: Path | None = None, cwd: Path | None = None
          ) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **({"AIVA_HOME": str(home)} if home else {})}
    return subprocess.run([*AIVA, *args], capture_output=True, text=True, timeout=120,
                          env=env, cwd=cwd)


def _one_line_error(r: subprocess.CompletedProcess[str], text: str, code: int = 2) -> None:
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    assert r.stderr.startswith("error: ") and text in r.stderr.splitlines()[0], r.stderr


@pytest.fixture
def root(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(root, AIVA_HOME three levels down, a working directory beside it)."""
    home = tmp_path / "p" / "q" / "h"
    work = tmp_path / "work"
    home.mkdir(parents=True)
    work.mkdir()
    return tmp_path, home, work


# ---------------------------------------------------------------------- names


def test_bad_names_from_the_cli_create_nothing(docker_ok: Any,
                                               root: tuple[Path, Path, Path]) -> None:
    top, home, work = root
    assert _aiva("ls", home=home, cwd=work).returncode == 0  # AIVA_HOME's own files
    before = _tree(top)
    for args in (["rm", "../../../x/y"], ["init", "a/b"], ["start", "../up"],
                 ["stop", "a/../../b"], ["snapshot", ".."],
                 ["config", "x/y", "set", "cpus", "1"],
                 ["start", "../new", "--from-snapshot", "src:t"]):
        r = _aiva(*args, home=home, cwd=work)
        _one_line_error(r, "is not a valid sandbox name")
        assert "hint:" in r.stderr
    r = _aiva("start", "../w", "-p", "0.0.0.0::80", home=home, cwd=work)
    _one_line_error(r, "is not a valid sandbox name")
    assert "warning" not in r.stderr  # the name is refused before the spec is looked at
    assert _tree(top) == before
    for args in (["start", "new", "--from-snapshot", "../src:t"],
                 ["start", "new", "--from-snapshot", "src:../t"]):
        r = _aiva(*args, home=home, cwd=work)
        assert r.returncode != 0 and r.stderr.startswith("error: "), r.stderr
    # only the new name's own lock (by hash, in AIVA_HOME) may have appeared
    assert {p for p in _tree(top) - before if not p.startswith("p/q/h/run")} == set()


def test_values_the_host_cannot_honour_are_one_line_errors(
        docker_ok: Any, root: tuple[Path, Path, Path]) -> None:
    _, home, work = root
    name = f"v-{uuid.uuid4().hex[:6]}"
    cases = {("--memory", "0"): "memory 0B is below the minimum of 16MB",
             ("--cpus", "999"): f"cpus 999 is more than this host has ({os.cpu_count()})",
             ("--disk", "1KB"): "disk 1KB is below the minimum of 64MB"}
    for (opt, value), text in cases.items():
        for cmd in ("init", "start"):
            _one_line_error(_aiva(cmd, name, opt, value, home=home, cwd=work), text)
    assert name not in _aiva("ls", "-o", "json", home=home).stdout


def test_warnings_say_what_a_spec_gives_away(python_image: str, engine: Any) -> None:
    """`-p 0.0.0.0:...`, `--mount /` and the Docker socket's directory: warned on stderr
    and kept in the `created` event; `aiva config set` checks limits like creation."""
    name = f"w-{uuid.uuid4().hex[:6]}"
    try:
        r = _aiva("init", name, "-p", "0.0.0.0::80", "--mount", "/:/host:ro",
                  "--mount", "/var/run:/hostrun:ro")
        assert r.returncode == 0, r.stderr
        warnings = [line for line in r.stderr.splitlines() if line.startswith("warning: ")]
        assert len(warnings) == 3, r.stderr
        assert "every address of this host" in warnings[0] and "network" in warnings[0]
        assert "--mount /: the sandbox can read this host's whole filesystem" in warnings[1]
        if Path("/run/docker.sock").is_socket():
            assert "Docker socket (/run/docker.sock)" in warnings[2]
            assert "root on this host" in warnings[2]
        sb = engine.get(name)
        [created] = [e for e in engine.store.events(sandbox_id=sb.id) if e.kind == "created"]
        assert created.data["warnings"] == spec_rules.spec_warnings(sb.spec)
        assert len(created.data["warnings"]) == 3

        _one_line_error(_aiva("config", name, "set", "memory", "0"), "below the minimum")
        _one_line_error(_aiva("config", name, "set", "cpus", "999"), "more than this host")
        assert engine.get(name).spec.memory == sb.spec.memory
        plain = _aiva("config", name, "set", "cpus", "1")
        assert plain.returncode == 0 and "warning" not in plain.stderr
    finally:
        if engine.exists(name):
            engine.delete(name, volumes=True)


# ---------------------------------------------------------------------- MCP over stdio


def _text(result: Any) -> str:
    return "\n".join(c.text for c in result.content if getattr(c, "type", "") == "text")


async def _call(client: Any, tool: str, **args: Any) -> dict[str, Any]:
    result = await client.call_tool(tool, args, read_timeout_seconds=TIMEOUT)
    assert not result.is_error, f"{tool} failed: {_text(result)}"
    data: dict[str, Any] = result.structured_content
    return data


async def _refused(client: Any, tool: str, text: str, **args: Any) -> dict[str, Any]:
    result = await client.call_tool(tool, args, read_timeout_seconds=TIMEOUT)
    assert result.is_error, f"{tool} {args} was not refused"
    assert "Traceback" not in _text(result)
    err: dict[str, Any] = result.structured_content["error"]
    assert text in err["message"], err
    return err


def test_a_hostile_mcp_client_reaches_only_the_granted_directory(
        python_image: str, engine: Any, tmp_path: Path) -> None:
    """The agent may sync inside its grant; it cannot push a root-only host file into its
    sandbox (by path, '..' or a link in the grant) nor pull files outside the grant."""
    from mcp import Client
    from mcp.client.stdio import StdioServerParameters

    grant = tmp_path / "grant"
    (grant / "proj").mkdir(parents=True)
    (grant / "proj" / "a.txt").write_text("from host\n")
    secret_dir = tmp_path / "secret"
    secret_dir.mkdir(mode=0o700)
    secret = secret_dir / "key"
    secret.write_text("root-only-" + uuid.uuid4().hex)
    secret.chmod(0o600)
    (grant / "link").symlink_to(secret_dir)  # a link inside the grant, leading out
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    outside_before = _tree(secret_dir) | {f"e/{p}" for p in _tree(elsewhere)}
    keep = ("AIVA_HOME", "DOCKER_HOST", "DOCKER_CONFIG", "PYTHONPATH")
    params = StdioServerParameters(
        command=sys.executable, args=["-m", "aiva.cli.main", "mcp", "serve",
                                      "--allow-dir", str(grant)],
        env={**{k: os.environ[k] for k in keep if k in os.environ}, "AIVA_NO_DAEMON": "1"})
    name = f"conf-{uuid.uuid4().hex[:6]}"

    async def session() -> None:
        async with Client(params, read_timeout_seconds=TIMEOUT) as client:
            tools = {t.name: t for t in (await client.list_tools()).tools}
            assert str(grant) in (tools["sync"].description or "")
            await _call(client, "sandbox_create", name=name, cpus=1, memory="512MB")
            # inside the grant: works both ways
            pushed = await _call(client, "sync", sandbox=name, local=str(grant / "proj"),
                                 remote="proj", direction="push")
            assert pushed["pushed"] == ["a.txt"]
            await _call(client, "exec", sandbox=name, command="echo made > proj/b.txt")
            pulled = await _call(client, "sync", sandbox=name, local=str(grant / "proj"),
                                 remote="proj", direction="pull")
            assert pulled["pulled"] == ["b.txt"]
            assert (grant / "proj" / "b.txt").read_text() == "made\n"
            # the root-only file, every way round
            for local, why in ((secret_dir, "is not inside"),
                               (f"{grant}/../secret", "'..'"),
                               (grant / "link", "leads out of"),
                               ("/", "is not inside")):
                await _refused(client, "sync", why, sandbox=name, local=str(local),
                               remote="loot", direction="push")
            await _refused(client, "sync", "is not inside", sandbox=name,
                           local=str(elsewhere), remote="proj", direction="pull")
            # the file tools are the sandbox's own: the host's file is not there
            await _refused(client, "file_read", "", sandbox=name, path=str(secret))
            found = await _call(client, "exec", sandbox=name,
                                command="grep -rl root-only- /workspace /tmp /root "
                                        f"2>/dev/null; ls {secret_dir} loot; true")
            assert "key" not in found["stdout"] and secret.read_text() not in found["stdout"]
            await _call(client, "sandbox_destroy", sandbox=name)

    try:
        asyncio.run(session())
    finally:
        if engine.exists(name):
            engine.delete(name, volumes=True)
    assert _tree(secret_dir) | {f"e/{p}" for p in _tree(elsewhere)} == outside_before


# ---------------------------------------------------------------------- the daemon's /mcp


@asynccontextmanager
async def _unix_client() -> AsyncIterator[Any]:
    import httpx2
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    async with httpx2.AsyncClient(transport=httpx2.AsyncHTTPTransport(
            uds=str(wire.socket_path())), timeout=httpx2.Timeout(30, read=TIMEOUT)) as http, \
            Client(streamable_http_client("http://localhost/mcp", http_client=http),
                   read_timeout_seconds=TIMEOUT) as client:
        yield client


@pytest.fixture
def daemon_home(docker_ok: Any, root: tuple[Path, Path, Path],
                monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, Path]]:
    """A daemon-to-be on its own AIVA_HOME (stopped, and checked, afterwards)."""
    top, home, work = root
    monkeypatch.setenv("AIVA_HOME", str(home))
    monkeypatch.chdir(work)
    try:
        yield top, home
    finally:
        control.stop()
    log = wire.log_path().read_text(errors="replace")
    assert "Traceback" not in log, log


def test_daemon_mcp_checks_names_and_grants(daemon_home: tuple[Path, Path],
                                            tmp_path: Path) -> None:
    top, home = daemon_home
    control.start(timeout=60)
    before = _tree(top)

    async def ungranted() -> None:
        async with _unix_client() as client:
            for bad in ("../../../x/y", "a/b", ".."):
                await _refused(client, "sandbox_create", "is not a valid sandbox name",
                               name=bad, cpus=1, memory="512MB")
            err = await _refused(client, "sync", "no host directory is granted",
                                 sandbox="any", local=str(top), remote="x")
            assert "--allow-dir" in err["hint"] and "mcp.allow_dirs" in err["hint"]

    asyncio.run(ungranted())
    assert _tree(top) == before
    control.stop()

    by_flag, by_config = top / "g1", top / "g2"
    by_flag.mkdir()
    by_config.mkdir()
    (by_config / "out").symlink_to(top / "work")
    (home / "config.yaml").write_text(f"mcp:\n  allow_dirs: [{by_config}]\n")
    r = subprocess.run([*AIVA, "daemon", "start", "--mcp-allow-dir", "g1"],
                       capture_output=True, text=True, timeout=120, cwd=top)
    assert r.returncode == 0, r.stderr

    async def granted() -> None:
        async with _unix_client() as client:
            tools = {t.name: t for t in (await client.list_tools()).tools}
            assert str(by_flag) in (tools["sync"].description or "")
            assert str(by_config) in (tools["sync"].description or "")
            for local, why in ((top / "work", "is not inside"),
                               (by_config / "out", "leads out of"),
                               (f"{by_flag}/../work", "'..'")):
                await _refused(client, "sync", why, sandbox="nobox", local=str(local),
                               remote="x")
            for local in (by_flag, by_config / "sub"):  # allowed: then the sandbox is missing
                err = await _refused(client, "sync", "no sandbox named 'nobox'",
                                     sandbox="nobox", local=str(local), remote="x")
                assert err["type"] == "SandboxNotFound"

    asyncio.run(granted())
    status = subprocess.run([*AIVA, "daemon", "status", "-o", "json"], capture_output=True,
                            text=True, timeout=60)
    assert json.loads(status.stdout)["mcp_allow_dirs"] == [str(by_flag), str(by_config)]
    table = subprocess.run([*AIVA, "daemon", "status"], capture_output=True, text=True,
                           timeout=60).stdout
    assert f"mcp dirs   {by_flag}, {by_config}" in table
    bad = subprocess.run([*AIVA, "daemon", "start", "--mcp-allow-dir", str(top / "nope")],
                         capture_output=True, text=True, timeout=60)
    _one_line_error(bad, "does not exist")
