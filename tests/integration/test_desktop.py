"""Desktop sandboxes on Docker: the session comes up after every boot, noVNC is published
on 127.0.0.1 only behind a VNC password, the screen records to a real video, and the
errors for non-desktop or stopped sandboxes are clear. The browser view is checked in
test_dashboard_desktop.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from aiva import errors
from aiva.desktop import DIR_IN_SANDBOX, PASSWORD_LEN
from aiva.sdk import Sandbox

pytestmark = pytest.mark.docker

AIVA = [sys.executable, "-m", "aiva.cli.main"]

RFB_PROBE = """
import socket
s = socket.create_connection(("127.0.0.1", 5900), 5)
version = s.recv(12)
s.sendall(version)
n = s.recv(1)[0]
print(version.decode().strip(), sorted(s.recv(n)))
"""


@pytest.fixture(scope="module")
def desk(desktop_image: str, engine: Any) -> Iterator[Sandbox]:
    sb = Sandbox.create(f"desk-{uuid.uuid4().hex[:6]}", template="desktop", engine=engine,
                        cpus=2, memory="2GB")
    try:
        yield sb
    finally:
        engine.delete(sb.name, volumes=True)


def probe(sb: Sandbox, path: str) -> dict[str, Any]:
    res = sb.commands.run(["ffprobe", "-v", "error", "-print_format", "json", "-show_format",
                           "-show_streams", path], check=True)
    out: dict[str, Any] = json.loads(res.stdout)
    return out


def test_session_novnc_and_password(desk: Sandbox, engine: Any) -> None:
    info = desk.desktop()
    assert info.url.startswith(f"http://127.0.0.1:{info.port}/vnc.html?")
    assert info.url.endswith(f"#password={info.password}")  # a fragment: never sent
    assert len(info.password) == PASSWORD_LEN and info.password.isalnum()
    ports = desk.status().runtime["ports"]
    assert f"127.0.0.1:{info.port}->6080/tcp" in ports
    assert all(p.startswith("127.0.0.1:") for p in ports)

    with urllib.request.urlopen(f"http://127.0.0.1:{info.port}/vnc.html", timeout=10) as r:
        assert r.status == 200 and b"noVNC" in r.read()
    desk.commands.run("pgrep -x xfwm4 && pgrep -x xfce4-panel && pgrep -x xfdesktop",
                      check=True)
    # VNC offers only VNC authentication (security type 2), never "none" (1)
    res = desk.commands.run(["python3", "-c", RFB_PROBE], check=True)
    assert res.stdout.split() == ["RFB", "003.008", "[2]"]
    # the password lives only in the host's 0600 file and the guest's hashed copy
    assert not desk.files.exists(f"{DIR_IN_SANDBOX}/password")
    assert info.password not in desk.status().model_dump_json()
    assert all(info.password not in ev.model_dump_json()
               for ev in engine.store.events(sandbox_id=desk.id))


def test_record_screen_to_a_real_video(desk: Sandbox, tmp_path: Path) -> None:
    dest = tmp_path / "screen.mp4"
    written = desk.record_screen(dest, duration=3)
    assert written == dest.stat().st_size > 1000
    assert dest.read_bytes()[4:8] == b"ftyp"
    desk.files.upload(dest, "/tmp/check.mp4")
    info = probe(desk, "/tmp/check.mp4")
    video = info["streams"][0]
    assert (video["codec_name"], video["width"], video["height"]) == ("h264", 1280, 800)
    assert float(info["format"]["duration"]) >= 2.0
    # the recorder is gone and left no file behind
    assert desk.commands.run("pgrep -x ffmpeg").exit_code == 1
    assert not [e for e in desk.files.list(DIR_IN_SANDBOX) if e["name"].startswith("record-")]

    with pytest.raises(errors.InvalidValue, match="unknown video format"):
        desk.record_screen(tmp_path / "screen.gif", duration=1)


def test_cli_vnc_and_webm_recording(desk: Sandbox, tmp_path: Path) -> None:
    r = subprocess.run([*AIVA, "vnc", desk.name], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == desk.desktop().url
    # no browser here: the URL is still printed and it is not a failure (as `dashboard`)
    r = subprocess.run([*AIVA, "vnc", desk.name, "--open"], capture_output=True, text=True,
                       timeout=60, env={**os.environ, "BROWSER": "false"})
    assert (r.returncode, r.stdout.strip()) == (0, desk.desktop().url), r.stderr
    assert "no browser" in r.stderr
    dest = tmp_path / "screen.webm"
    r = subprocess.run([*AIVA, "vnc", desk.name, "--record", str(dest), "--duration", "2"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert dest.read_bytes()[:4] == b"\x1a\x45\xdf\xa3"  # EBML: a Matroska/WebM file
    desk.files.upload(dest, "/tmp/check.webm")
    assert probe(desk, "/tmp/check.webm")["streams"][0]["codec_name"] == "vp8"


def test_desktop_comes_back_after_a_restart(desk: Sandbox, engine: Any) -> None:
    desk.stop()
    with pytest.raises(errors.DesktopError, match="stopped"):
        desk.desktop()
    desk.start()
    info = desk.desktop()
    with urllib.request.urlopen(f"http://127.0.0.1:{info.port}/vnc.html", timeout=10) as r:
        assert r.status == 200
    desk.commands.run("pgrep -x xfwm4", check=True)
    ready = [ev for ev in engine.store.events(sandbox_id=desk.id) if ev.kind == "desktop_ready"]
    assert len(ready) >= 2


def test_not_a_desktop(make_sandbox: Any, engine: Any) -> None:
    sb = make_sandbox(template="python")
    assert not sb.info.spec.desktop
    with pytest.raises(errors.NotADesktop, match="has no desktop"):
        sb.desktop()
    with pytest.raises(errors.NotADesktop):
        sb.record_screen("/tmp/never.mp4", duration=1)
    with pytest.raises(errors.InvalidValue, match="needs a network"):
        engine.build_spec(template="desktop", network="none")
    r = subprocess.run([*AIVA, "vnc", sb.name], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "has no desktop" in r.stderr and "Traceback" not in r.stderr
