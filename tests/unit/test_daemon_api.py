"""The daemon's contract without Docker: RemoteEngine mirrors Engine, errors survive the
wire as the same classes with their hints, and the listener gates hold."""

from __future__ import annotations

import inspect
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from aiva import errors
from aiva.daemon import wire
from aiva.daemon.app import Gate, create_app
from aiva.daemon.client import RemoteEngine
from aiva.engine import Engine
from aiva.tasks.models import TaskNotFound, TaskStateError

with warnings.catch_warnings():  # newer Starlette nags about httpx; it still works
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

SRC = Path(__file__).resolve().parents[2] / "src" / "aiva"
CALL = re.compile(r"(?:\b_engine|\bengine|\b_e|default_engine\(\)|_engine\(\))\.([a-z][a-z_]*)\(")


def _used_engine_methods() -> set[str]:
    """Every Engine method the SDK and the CLI call, found by scanning their source."""
    used: set[str] = set()
    for path in [*sorted((SRC / "sdk").glob("*.py")), SRC / "cli" / "main.py"]:
        used |= set(CALL.findall(path.read_text()))
    return used


def test_the_scan_finds_the_engine_calls() -> None:
    used = _used_engine_methods()
    assert {"exec", "create", "build_spec", "read_file", "write_file", "sync", "status",
            "list_all", "delete", "snapshot", "restore", "fork", "logs"} <= used


def test_remote_engine_has_every_method_the_sdk_and_cli_use() -> None:
    for name in sorted(_used_engine_methods()):
        assert hasattr(Engine, name), f"the scan found {name}, which Engine lacks"
        assert hasattr(RemoteEngine, name), f"RemoteEngine lacks {name}"
        want = [(p.name, p.kind) for p in inspect.signature(getattr(Engine, name))
                .parameters.values()]
        got = [(p.name, p.kind) for p in inspect.signature(getattr(RemoteEngine, name))
               .parameters.values()]
        assert got == want, f"{name}: {got} != {want}"


def _sample(cls: type[errors.AivaError]) -> errors.AivaError:
    if cls in (errors.SandboxNotFound, errors.SandboxExists, errors.NotADesktop):
        return cls("box")
    if cls is TaskNotFound:
        return TaskNotFound("t-0000beef")
    if cls is TaskStateError:
        return TaskStateError("t-0000beef", "queued", "approve", hint="wait for it")
    if cls is errors.InvalidTransition:
        return errors.InvalidTransition("box", "paused", "use", "resume it")
    if cls is errors.CommandFailed:
        return errors.CommandFailed("exit 3", exit_code=3, stderr="boom")
    if issubclass(cls, errors.RemoteError):
        return cls("no such file", kind="FileNotFoundError")
    return cls(f"a {cls.__name__}", hint="do this")


@pytest.mark.parametrize("cls", list(wire.ERRORS.values()), ids=list(wire.ERRORS))
def test_every_error_comes_back_as_itself(cls: type[errors.AivaError]) -> None:
    exc = _sample(cls)
    back = wire.error_from_body(wire.error_body(exc), wire.status_of(exc))
    assert type(back) is cls
    assert (back.message, back.hint, str(back)) == (exc.message, exc.hint, str(exc))
    for attr in ("name", "state", "action", "kind", "exit_code", "stderr"):
        assert getattr(back, attr, None) == getattr(exc, attr, None)


def test_statuses_and_no_tracebacks() -> None:
    expect = {errors.SandboxNotFound("x"): 404, errors.SandboxExists("x"): 409,
              errors.InvalidTransition("x", "stopped", "pause"): 409,
              errors.InvalidValue("v"): 400, errors.ConfigError("c"): 400,
              errors.BackendUnavailable("b"): 503, errors.CommandTimeout("t"): 504,
              errors.SyncError("s"): 500, errors.SandboxFileNotFound("f"): 404}
    for exc, status in expect.items():
        assert wire.status_of(exc) == status, type(exc).__name__
    body = wire.error_body(KeyError("oops"))
    assert body["error"]["type"] == "AivaError"
    assert "Traceback" not in str(body) and "KeyError" in body["error"]["message"]
    odd = wire.error_from_body({"error": {"type": "os.system", "message": "m"}}, 500)
    assert type(odd) is errors.AivaError  # unknown names never pick a class by path


@pytest.fixture(scope="module")
def app() -> Iterator[Any]:
    engine = Engine()
    yield create_app(engine)
    engine.close()


def test_tcp_gate_needs_the_token_and_unix_gate_does_not(app: Any) -> None:
    tcp = TestClient(Gate(app, token="s3cret"))
    assert tcp.get("/health").status_code == 401
    bad = tcp.get("/health", headers={"authorization": "Bearer nope"})
    assert bad.status_code == 401 and bad.headers["www-authenticate"] == "Bearer"
    assert "token" in bad.json()["error"]["message"]
    assert tcp.get("/health", headers={"authorization": "Bearer s3cret"}).status_code == 200
    assert TestClient(Gate(app, token=None)).get("/health").status_code == 200
    # the app served with no gate at all (e.g. plain uvicorn) refuses everything
    assert TestClient(app).get("/health").status_code == 401


def test_the_mcp_token_opens_mcp_and_nothing_else(app: Any) -> None:
    tcp = TestClient(Gate(app, token="s3cret", mcp_token="mcp-only"))
    mcp = {"authorization": "Bearer mcp-only"}
    for method, path in (("GET", "/health"), ("GET", "/v1/sandboxes"),
                         ("POST", "/v1/sandboxes/box/sync"), ("GET", "/mcp/../v1/sandboxes"),
                         ("GET", "/mcpx"), ("GET", "/v1/daemon")):
        r = tcp.request(method, path, headers=mcp)
        assert r.status_code == 401, (method, path)
    # /mcp itself lets it in (406: the MCP server wants its own Accept header)
    assert tcp.get("/mcp", headers=mcp).status_code != 401
    assert tcp.get("/mcp", headers={"authorization": "Bearer nope"}).status_code == 401
    assert tcp.get("/health", headers={"authorization": "Bearer s3cret"}).status_code == 200


def test_errors_and_openapi_over_http(app: Any) -> None:
    client = TestClient(Gate(app, token=None))
    r = client.get("/v1/sandboxes/no-such-box")
    assert r.status_code == 404
    err = r.json()["error"]
    assert err["type"] == "SandboxNotFound" and "aiva ls" in err["hint"]
    r = client.post("/v1/sandboxes", json={"nme": "typo"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "InvalidValue"
    r = client.get("/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["type"] == "AivaError"
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/v1/sandboxes", "/v1/sandboxes/{name}", "/v1/sandboxes/{name}/exec",
                 "/v1/sandboxes/{name}/files/content", "/v1/events",
                 "/v1/sandboxes/{name}/snapshots/{tag}/restore"):
        assert path in paths, path


def test_daemon_running_is_quick_when_there_is_none(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import socket
    import time

    monkeypatch.setenv("AIVA_HOME", str(tmp_path))
    t = time.perf_counter()
    assert not wire.daemon_running()  # no socket file
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(wire.socket_path()))  # a socket file nobody listens on (a killed daemon)
    try:
        assert not wire.daemon_running()
    finally:
        stale.close()
    assert time.perf_counter() - t < 0.05


def test_an_unexpected_error_is_a_500_without_traceback() -> None:
    class Broken:
        def list_all(self, *, reconcile: bool = True) -> list[Any]:
            raise KeyError("state row vanished")

    app = create_app(Broken())  # type: ignore[arg-type]
    client = TestClient(Gate(app, token=None), raise_server_exceptions=False)
    r = client.get("/v1/sandboxes")
    assert r.status_code == 500
    err = r.json()["error"]
    assert err["type"] == "AivaError" and "KeyError" in err["message"]
    assert "Traceback" not in r.text and "daemon.log" in err["hint"]
