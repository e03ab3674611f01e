"""``aiva vnc NAME --record FILE``: the screen of a desktop sandbox, recorded to a video.

ffmpeg grabs the X display inside the sandbox, so nothing leaves the guest while it
records; on stop it gets SIGINT (ffmpeg then writes the file's index), and the finished
file is copied out and removed from the sandbox. Works through the daemon as well.
"""

from __future__ import annotations

import secrets
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from aiva.agent_client import ExecResult, ProcessHandle
from aiva.desktop import DIR_IN_SANDBOX
from aiva.errors import AivaError, CommandTimeout, DesktopError, InvalidValue, NotADesktop

if TYPE_CHECKING:
    from aiva.engine import Engine

#: container suffix -> the codec options ffmpeg gets (fast enough for software encoding)
CODECS: dict[str, list[str]] = {
    ".mp4": ["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p",
             "-movflags", "+faststart"],
    ".mkv": ["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p"],
    ".webm": ["-c:v", "libvpx", "-deadline", "realtime", "-cpu-used", "8", "-b:v", "1M"],
}
FRAMERATE = 10
FINISH_TIMEOUT = 60.0


def ffmpeg_command(remote: str, *, framerate: int = FRAMERATE) -> list[str]:
    suffix = Path(remote).suffix.lower()
    if suffix not in CODECS:
        raise InvalidValue(f"cannot record to '{remote}': unknown video format",
                           hint=f"name the file with one of {', '.join(sorted(CODECS))}")
    return ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y",
            "-f", "x11grab", "-draw_mouse", "1", "-framerate", str(framerate), "-i", ":0",
            *CODECS[suffix], remote]


def record(engine: Engine, name: str, dest: str | Path, *, duration: float | None = None,
           stop: threading.Event | None = None,
           on_started: Callable[[], None] | None = None) -> int:
    """Record until ``duration`` passes or ``stop`` is set (or KeyboardInterrupt); returns
    the bytes written to ``dest``."""
    dest = Path(dest)
    sb = engine.get(name)
    if not sb.spec.desktop:
        raise NotADesktop(name)
    remote = f"{DIR_IN_SANDBOX}/record-{secrets.token_hex(4)}{dest.suffix.lower()}"
    argv = ffmpeg_command(remote)
    proc = engine.exec(name, argv, cwd="/", background=True, env={"DISPLAY": ":0"})
    assert not isinstance(proc, ExecResult)
    try:
        _wait_started(engine, name, remote, proc)
        if on_started:
            on_started()
        deadline = None if duration is None else time.monotonic() + duration
        stop = stop or threading.Event()
        try:
            while not stop.is_set() and not _done(proc):
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                stop.wait(0.2 if left is None else min(0.2, left))
        except KeyboardInterrupt:
            pass  # Ctrl-C ends the recording, not the program
        result = _finish(proc)
        if result.exit_code not in (0, 255):  # 255: ffmpeg's exit after SIGINT
            raise DesktopError(f"ffmpeg failed (exit {result.exit_code}) recording {name}: "
                               f"{(result.stderr or result.stdout).strip()[-500:]}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        return engine.copy_out(name, remote, dest)
    finally:
        if not _done(proc):
            _kill(proc, signal.SIGKILL)
        try:
            engine.remove(name, remote)
        except AivaError:
            pass


def _done(proc: ProcessHandle) -> bool:
    return bool(proc.done)


def _wait_started(engine: Engine, name: str, remote: str, proc: ProcessHandle) -> None:
    """ffmpeg creates the file once it grabbed the display; fail fast if it cannot."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            res = proc.wait(timeout=0.2)
        except CommandTimeout:
            try:
                engine.stat(name, remote)
                return
            except AivaError:
                continue
        raise DesktopError(f"ffmpeg stopped before recording {name}: "
                           f"{(res.stderr or res.stdout).strip()[-500:] or 'no output'}",
                           hint=f"is the desktop up? see `aiva logs {name} --source syslog`")
    raise DesktopError(f"ffmpeg did not start recording {name} within 30s")


def _finish(proc: ProcessHandle) -> ExecResult:
    _kill(proc, signal.SIGINT)
    try:
        return proc.wait(timeout=FINISH_TIMEOUT)
    except CommandTimeout:
        _kill(proc, signal.SIGKILL)
        raise DesktopError(f"ffmpeg did not finish the video within {FINISH_TIMEOUT:.0f}s") \
            from None


def _kill(proc: ProcessHandle, sig: int) -> None:
    try:
        proc.kill(int(sig))
    except AivaError:
        pass
