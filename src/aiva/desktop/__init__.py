"""Desktop sandboxes (seed 003 phase 2): a screen you can watch, share and record.

A desktop sandbox runs the ``desktop`` image (Xvfb, XFCE, x11vnc, noVNC, Firefox ESR,
xterm, ffmpeg). After every boot the engine writes a fresh copy of ``session.sh`` and a
VNC password into the guest and starts the session in the background; noVNC listens on
guest port 6080, which the spec publishes on the host's 127.0.0.1 only. The password is
generated once per sandbox and kept in ``AIVA_HOME/desktops/ID.password`` (mode 0600),
never in the spec, so ``aiva status`` and the event stream do not show it.
"""

from __future__ import annotations

import os
import secrets
import string
import time
from contextlib import suppress
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiva import paths
from aiva.errors import DesktopError, NotADesktop, SandboxFileNotFound
from aiva.models import PortSpec, SandboxInfo, State

if TYPE_CHECKING:
    from aiva.engine import Engine

TEMPLATE = "desktop"
NOVNC_PORT = 6080
#: image references that mean the desktop template
IMAGES = frozenset({"desktop", "aiva/desktop", "aiva/desktop:latest"})
DIR_IN_SANDBOX = "/run/aiva-desktop"
READY, FAILED = f"{DIR_IN_SANDBOX}/ready", f"{DIR_IN_SANDBOX}/failed"
#: VNC passwords are 8 characters at most (the DES key of RFB's VNC authentication)
PASSWORD_LEN = 8
START_TIMEOUT = 120.0


def wanted(template: str | None, image: str | None) -> bool:
    """Does this request make a desktop sandbox?"""
    return template == TEMPLATE or (image or "") in IMAGES


def novnc_port() -> PortSpec:
    """The published noVNC port: loopback only, a free host port picked at start."""
    return PortSpec(host_ip="127.0.0.1", guest_port=NOVNC_PORT)


@dataclass(frozen=True)
class DesktopInfo:
    """How to watch a running desktop sandbox."""

    url: str
    port: int
    password: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------- password


def password_path(sandbox_id: str) -> Path:
    return paths.desktop_password(sandbox_id)


def password(sb: SandboxInfo) -> str:
    """The sandbox's VNC password, made on first use (0600, created atomically)."""
    path = password_path(sb.id)
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    alphabet = string.ascii_letters + string.digits
    secret = "".join(secrets.choice(alphabet) for _ in range(PASSWORD_LEN))
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it first: use theirs
        return path.read_text().strip()
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    return secret


def forget(sb: SandboxInfo) -> None:
    """Drop the password of a deleted sandbox."""
    password_path(sb.id).unlink(missing_ok=True)


# ---------------------------------------------------------------------- session


def session_script() -> bytes:
    return resources.files("aiva.desktop").joinpath("session.sh").read_bytes()


def start_session(engine: Engine, sb: SandboxInfo, *, timeout: float = START_TIMEOUT) -> None:
    """Start the desktop session in a freshly booted sandbox and wait until it is watchable.
    Raises DesktopError (the sandbox keeps running) if it does not come up in time."""
    name = sb.name
    engine.mkdir(name, DIR_IN_SANDBOX)
    for marker in (READY, FAILED):  # a filesystem snapshot may hold the last boot's
        with suppress(SandboxFileNotFound):
            engine.remove(name, marker)
    engine.write_file(name, f"{DIR_IN_SANDBOX}/password", password(sb) + "\n", mode=0o600)
    engine.write_file(name, f"{DIR_IN_SANDBOX}/session.sh", session_script(), mode=0o755)
    proc = engine.exec(name, ["/bin/sh", f"{DIR_IN_SANDBOX}/session.sh"], cwd="/",
                       background=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _exists(engine, name, READY):
            return
        if _exists(engine, name, FAILED):
            why = engine.read_file(name, FAILED).decode(errors="replace").strip()
            raise DesktopError(f"the desktop of {name} did not start: {why}",
                               hint=f"see `aiva logs {name} --source syslog`")
        if getattr(proc, "done", False):
            break
        time.sleep(0.2)
    raise DesktopError(f"the desktop of {name} was not ready after {timeout:.0f}s",
                       hint=f"see `aiva logs {name} --source syslog`; "
                            f"`aiva restart {name}` tries again")


def _exists(engine: Engine, name: str, path: str) -> bool:
    try:
        engine.stat(name, path)
        return True
    except SandboxFileNotFound:
        return False


def info(sb: SandboxInfo) -> DesktopInfo:
    """The noVNC URL of a running desktop sandbox. The password travels in the URL's
    fragment, which browsers never send to the server, so it stays out of request logs."""
    if not sb.spec.desktop:
        raise NotADesktop(sb.name)
    if sb.state != State.RUNNING:
        raise DesktopError(f"{sb.name} is {sb.state.value}; its desktop shows only while it runs",
                           hint=f"start it with `aiva start {sb.name}`")
    port = published_port(sb.runtime.get("ports") or [], NOVNC_PORT)
    if port is None:
        raise DesktopError(f"{sb.name} publishes no noVNC port",
                           hint="desktop sandboxes need a network; do not use `--network none`")
    secret = password(sb)
    url = (f"http://127.0.0.1:{port}/vnc.html?autoconnect=1&resize=scale&reconnect=1"
           f"#password={secret}")
    return DesktopInfo(url=url, port=port, password=secret)


def published_port(ports: list[str], guest_port: int) -> int | None:
    """The host port of ``guest_port``/tcp in a runtime's ``ip:port->guest/proto`` list."""
    for entry in ports:
        host, _, guest = entry.partition("->")
        if guest in (f"{guest_port}/tcp", str(guest_port)):
            try:
                return int(host.rsplit(":", 1)[1])
            except (IndexError, ValueError):
                continue
    return None
