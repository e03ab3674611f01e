"""The dashboard without Docker or a browser: what the TCP gate lets through, the static
files and their headers, the observe routes, and ``aiva dashboard``'s URL and errors."""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import Iterator, MutableMapping
from datetime import UTC, datetime, timedelta
from importlib.resources import files
from typing import Any

import pytest

from aiva.cli import dashboard_cmd
from aiva.daemon import control, wire
from aiva.daemon.app import Gate, create_app
from aiva.daemon.routes import observe
from aiva.engine import Engine
from aiva.errors import AivaError
from aiva.models import Event, PortSpec, SandboxInfo, SandboxSpec, State

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

TOKEN = "s3cret"


@pytest.fixture(scope="module")
def app() -> Iterator[Any]:
    engine = Engine()
    yield create_app(engine, port=1)
    engine.close()


def test_the_files_ship_in_the_package() -> None:
    folder = files("aiva.daemon") / "dashboard"
    for name in ("index.html", "app.js", "style.css"):
        assert (folder / name).is_file(), name
    page = (folder / "index.html").read_text()
    assert "http://" not in page and "https://" not in page  # nothing from elsewhere
    assert 'src="app.js"' in page and 'href="style.css"' in page


def test_tcp_gate_opens_only_get_of_the_ui(app: Any) -> None:
    tcp = TestClient(Gate(app, token=TOKEN))
    r = tcp.get("/", follow_redirects=False)
    assert (r.status_code, r.headers["location"]) == (307, "/ui/")
    assert tcp.get("/ui", follow_redirects=False).headers["location"] == "/ui/"
    for path, kind in (("/ui/", "text/html"), ("/ui/app.js", "javascript"),
                       ("/ui/style.css", "text/css")):
        r = tcp.get(path)
        assert r.status_code == 200 and kind in r.headers["content-type"], path
        assert r.headers["cache-control"] == "no-cache"
        assert r.headers["x-content-type-options"] == "nosniff"
        assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
    assert tcp.get("/ui/missing.js").status_code == 404
    for method, path in (("GET", "/v1/overview"), ("GET", "/v1/sandboxes"), ("GET", "/docs"),
                         ("GET", "/openapi.json"), ("GET", "/health"), ("POST", "/ui/"),
                         ("PUT", "/ui/app.js"), ("HEAD", "/ui/"), ("GET", "/uix"),
                         ("GET", "/ui.js")):
        assert tcp.request(method, path).status_code == 401, (method, path)
    authed = TestClient(Gate(app, token=TOKEN), headers={"authorization": f"Bearer {TOKEN}"})
    assert authed.get("/v1/overview").status_code == 200
    assert TestClient(Gate(app, token=None)).get("/v1/overview").status_code == 200


def _raw_get(app: Any, path: str) -> tuple[int, bytes]:
    """One request with ``path`` exactly as given (HTTP clients would normalise it)."""
    sent: list[MutableMapping[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "GET", "scheme": "http", "path": path, "raw_path": path.encode(),
             "root_path": "", "query_string": b"", "headers": [(b"host", b"x")],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2)}
    asyncio.run(Gate(app, token=TOKEN)(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


@pytest.mark.parametrize("path", ["/ui/../v1/sandboxes", "/ui/../../etc/passwd",
                                  "/ui//v1/overview", "/ui/%2e%2e/v1/overview"])
def test_a_ui_path_never_reaches_the_api_or_other_files(app: Any, path: str) -> None:
    status, body = _raw_get(app, path)
    assert status == 404, (path, status, body)
    assert b"root:" not in body and b"sandboxes" not in body


def test_observe_routes_are_typed_in_openapi(app: Any) -> None:
    schema = TestClient(Gate(app, token=None)).get("/openapi.json").json()
    paths = schema["paths"]
    for route, model in (("/v1/overview", "Overview"),
                         ("/v1/sandboxes/{name}/metrics/history", "MetricsHistory")):
        ok = paths[route]["get"]["responses"]["200"]["content"]["application/json"]
        assert ok["schema"]["$ref"].endswith(model), route
    assert not any(p.startswith("/ui") or p == "/" for p in paths)
    assert "SandboxRow" in schema["components"]["schemas"]


def test_history_of_a_missing_sandbox_is_a_404(app: Any) -> None:
    r = TestClient(Gate(app, token=None)).get("/v1/sandboxes/nope/metrics/history")
    assert r.status_code == 404 and r.json()["error"]["type"] == "SandboxNotFound"


def _box(state: State, **runtime: Any) -> SandboxInfo:
    spec = SandboxSpec(image="img", cpus=1, memory=1 << 29, disk=1 << 30,
                       ports=[PortSpec(guest_port=80, host_port=8080)])
    return SandboxInfo(name="b", state=state, spec=spec, runtime=runtime)


def test_uptime_and_ports_of_a_row() -> None:
    t0 = datetime(2025, 1, 1, tzinfo=UTC)
    evs = [Event(id=1, ts=t0, kind="started"), Event(id=2, ts=t0 + timedelta(60), kind="stopped"),
           Event(id=3, ts=t0 + timedelta(61), kind="started")]
    assert observe._running_since(_box(State.RUNNING), evs) == t0 + timedelta(61)
    assert observe._running_since(_box(State.STOPPED), evs) is None
    docker = _box(State.RUNNING, started_at="2025-01-02T03:04:05.123456789Z",
                  ports=["127.0.0.1:32768->80/tcp"])
    assert observe._running_since(docker, evs) == datetime(2025, 1, 2, 3, 4, 5, 123456,
                                                           tzinfo=UTC)
    assert observe._ports(docker) == ["127.0.0.1:32768->80/tcp"]
    assert observe._ports(_box(State.STOPPED)) == ["127.0.0.1:8080->80/tcp"]


def test_dashboard_url_and_its_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    status: dict[str, Any] = {"running": False, "pid": None}
    monkeypatch.setattr(control, "status", lambda: status)
    with pytest.raises(AivaError) as exc:
        dashboard_cmd.dashboard_url()
    assert "no aiva daemon is running" in exc.value.message
    assert "aiva daemon start --port N" in (exc.value.hint or "")
    status.update(running=True, pid=42, port=None)
    with pytest.raises(AivaError) as exc:
        dashboard_cmd.dashboard_url()
    assert "Unix socket only" in exc.value.message and "--port N" in (exc.value.hint or "")
    status["port"] = 8123
    monkeypatch.setattr(wire, "read_token", lambda: "a/b+c")
    assert dashboard_cmd.dashboard_url() == "http://127.0.0.1:8123/ui/#token=a%2Fb%2Bc"
