"""``aiva deploy``: a directory with an aiva.yaml becomes a running service on 127.0.0.1;
the lifetimes pass (what the daemon runs every 2 s) restarts it under the restart
policy, a redeploy swaps the code in place, and on-failure:N gives up with an event."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest

from aiva import errors
from aiva.deploy.push import deploy
from aiva.desktop import published_port
from aiva.engine import lifetimes

pytestmark = pytest.mark.docker
T = TypeVar("T")
AIVA = [sys.executable, "-m", "aiva.cli.main"]

SERVER = """
import http.server, os
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = (open("message.txt").read() + " pid=" + str(os.getpid())).encode()
        self.send_response(200); self.end_headers(); self.wfile.write(body)
    def log_message(self, *a):
        print("served", self.path, flush=True)
http.server.HTTPServer(("0.0.0.0", 8000), H).serve_forever()
"""


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = 30.0) -> T:
    deadline = time.monotonic() + timeout
    while True:
        got = probe()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def get(port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
            return str(r.read().decode())
    except OSError:
        return None


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    (tmp_path / "control.py").write_text(SERVER)
    (tmp_path / "message.txt").write_text("hello one")
    (tmp_path / "aiva.yaml").write_text("entry: python3 -u control.py\nports: [8000]\n")
    return tmp_path


@pytest.fixture
def name(engine: Any) -> Iterator[str]:
    name = f"deploy-{uuid.uuid4().hex[:6]}"
    try:
        yield name
    finally:
        if engine.exists(name):
            engine.delete(name, volumes=True)


def kill_service(engine: Any, name: str) -> int:
    pid = int(engine.get(name).runtime["service_pid"])
    engine.agent(name).signal(pid, 9)
    return pid


def test_deploy_serves_restarts_and_redeploys(engine: Any, python_image: str,
                                              app_dir: Path, name: str) -> None:
    sb = deploy(engine, name, str(app_dir))
    assert sb.spec.service is not None and sb.spec.restart == "always"
    ports = sb.runtime["ports"]
    assert all(p.startswith("127.0.0.1:") for p in ports)
    port = published_port(ports, 8000)
    assert port is not None
    first = wait_for("the service to answer", lambda: get(port))
    assert first.startswith("hello one")

    old = kill_service(engine, name)
    done = wait_for("the lifetimes pass to restart it",
                    lambda: [d for d in lifetimes.tick(engine) if d["sandbox"] == name])
    assert done[0]["event"] == "service_started"
    new = int(engine.get(name).runtime["service_pid"])
    assert new != old
    assert wait_for("the restarted service", lambda: get(port)).endswith(f"pid={new}")
    kinds = [ev.kind for ev in engine.store.events(sandbox_id=sb.id)]
    assert "service_exited" in kinds and kinds.count("service_started") >= 2

    (app_dir / "message.txt").write_text("hello two")  # a redeploy swaps the code
    deploy(engine, name, str(app_dir))
    assert wait_for("the new code", lambda: (get(port) or "").startswith("hello two") or None)
    logs = "".join(line.text for line in engine.logs(name))
    assert "served /" in logs  # the program's output is in the sandbox's logs

    with pytest.raises(errors.InvalidValue, match="other ports"):
        deploy(engine, name, str(app_dir), ports=["9000"])


def test_on_failure_gives_up_and_entry_is_needed(engine: Any, python_image: str,
                                                 app_dir: Path, name: str) -> None:
    (app_dir / "aiva.yaml").write_text("entry: [python3, -c, 'import sys; sys.exit(3)']\n"
                                       "restart: on-failure:1\n")
    sb = deploy(engine, name, str(app_dir))
    assert sb.spec.restart == "on-failure:1"

    def gave_up() -> bool:
        lifetimes.tick(engine)
        return bool(engine.get(name).runtime.get("service_gave_up"))

    wait_for("on-failure:1 to give up", gave_up)
    events = engine.store.events(sandbox_id=sb.id)
    assert [ev.kind for ev in events].count("service_started") == 2  # first run + 1 retry
    assert any(ev.kind == "error" and "gave up" in ev.data.get("message", "") for ev in events)

    (app_dir / "aiva.yaml").unlink()
    with pytest.raises(errors.InvalidValue, match="no entry command"):
        deploy(engine, name, str(app_dir))
    r = subprocess.run([*AIVA, "deploy", name, str(app_dir / "nope")], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode != 0 and "Traceback" not in r.stderr


def test_the_daemon_keeps_a_deployed_program_running(engine: Any, python_image: str,
                                                     app_dir: Path, name: str) -> None:
    """Through a real daemon: deployed with the daemon's engine, killed, and started again
    by the daemon's own lifetimes loop, with nobody calling tick by hand."""
    import os
    import signal
    import socket

    from aiva.daemon import control
    from aiva.daemon.client import connect

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    pid = int(control.start(port, timeout=60)["pid"])
    try:
        with connect() as remote:
            sb = deploy(cast(Any, remote), name, str(app_dir))
            host_port = published_port(sb.runtime["ports"], 8000)
            assert host_port is not None
            wait_for("the service", lambda: get(host_port))
            old = int(sb.runtime["service_pid"])
            remote.agent(name).signal(old, 9)
            new = wait_for("the daemon to restart it", lambda: (
                p if (p := remote.get(name).runtime.get("service_pid")) not in (None, old)
                else None))
            assert wait_for("the restarted service", lambda: get(host_port)).endswith(
                f"pid={new}")
    finally:
        control.stop()
        if control.is_daemon(pid):
            os.kill(pid, signal.SIGKILL)
