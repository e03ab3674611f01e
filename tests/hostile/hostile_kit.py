"""What the hostile-guest tests share: the fake agent as a process, an engine whose
backend hands out connections to it, tree snapshots, a memory guard and a bounded runner.

The fake agent always runs as a separate process (a socketpair to it, or its Unix socket
inside a real container), so what the host process holds and how long it waits is the
host's doing alone.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiva import agent_client, paths
from aiva.agent_client import SocketTransport, Transport
from aiva.backends.base import LogLine, Observed
from aiva.backends.docker import DockerBackend
from aiva.errors import AivaError
from aiva.models import SandboxInfo, State

HERE = Path(__file__).resolve().parent
AGENT = HERE / "agent.py"
SRC = HERE.parents[1] / "src"
#: The agent's call deadline in these tests (the contract's knob, patched in-process).
CALL_TIMEOUT = 2.0
#: How long any one host call may take against a hostile agent before it counts as hung:
#: the deadline plus generous slack for a loaded 2-core machine.
LIMIT = 15.0
#: How much a host process may grow while an agent floods it.
MEMORY_BOUND = 200 << 20
UMASK_MODE = 0o777


def load_agent_module() -> Any:
    """tests/hostile/agent.py as a module (its script builders), with the real framing."""
    spec = importlib.util.spec_from_file_location("hostile_agent", AGENT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.p = mod.load_protocol([])
    return mod


ha = load_agent_module()


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---------------------------------------------------------------------- the fake agent


class FakeAgents:
    """One fake agent process serving a Unix socket; every connection reads the current
    script (and again for every request), so a test changes the script between calls."""

    def __init__(self, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.script_file = workdir / "script.json"
        self.socket_path = workdir / "agent.sock"
        self.socks: list[socket.socket] = []
        self.connects = 0
        self.play(ha.script())
        env = {**os.environ, "PYTHONPATH": str(SRC)}
        self.proc = subprocess.Popen(
            [sys.executable, "-S", str(AGENT), "--listen", str(self.socket_path),
             "--script-file", str(self.script_file)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env=env)
        deadline = time.monotonic() + 30
        while not self.socket_path.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the fake agent did not start")
            time.sleep(0.01)

    def play(self, script: dict[str, Any]) -> None:
        tmp = self.script_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(script))
        os.replace(tmp, self.script_file)

    def connect(self) -> Transport:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(self.socket_path))
        self.socks.append(sock)
        self.connects += 1
        return SocketTransport(sock)

    def kill_all(self) -> None:
        """Cut every connection to the fake agent, as if it had died: the host side sees
        the stream end, and the agent's side stops sending."""
        for sock in self.socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self.socks.clear()

    def stop(self) -> None:
        self.kill_all()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


class HostileBackend(DockerBackend):
    """The Docker backend's host side (run dir, syslog path) with a fake agent behind
    ``connect_agent``; lifecycle calls do nothing. Registered into one Engine only."""

    def __init__(self, agents: FakeAgents) -> None:
        super().__init__()
        self.agents = agents

    def check(self) -> None:
        return None

    def create(self, sb: SandboxInfo) -> dict[str, Any]:
        paths.run_dir(sb.id).mkdir(parents=True, exist_ok=True)
        return {"fake": True}

    def start(self, sb: SandboxInfo) -> dict[str, Any]:
        return {"started_at": "2026-01-01T00:00:00Z", "ports": []}

    def stop(self, sb: SandboxInfo, *, force: bool = False, timeout: float = 10.0) -> None:
        return None

    def pause(self, sb: SandboxInfo) -> None:
        return None

    def resume(self, sb: SandboxInfo) -> None:
        return None

    def delete(self, sb: SandboxInfo, *, volumes: bool = False) -> None:
        shutil.rmtree(paths.run_dir(sb.id), ignore_errors=True)

    def observe(self, sb: SandboxInfo) -> Observed:
        return Observed(State.RUNNING)

    def reap(self, live_ids: set[str]) -> list[str]:
        return []

    def connect_agent(self, sb: SandboxInfo, *, timeout: float = 10.0) -> Transport:
        return self.agents.connect()

    def engine_logs(self, sb: SandboxInfo, *, tail: int | None = None,
                    follow: bool = False) -> Iterator[LogLine]:
        return iter(())


def fresh_connection(engine: Any, name: str) -> None:
    """Make the engine's next call connect again (and so read the current script)."""
    engine._drop_agent(engine.get(name))  # no public way to forget a cached connection


# ---------------------------------------------------------------------- tree snapshots

Entry = tuple[int, int, int, int, int]


def entries(root: Path) -> Iterator[tuple[str, os.stat_result]]:
    """(path, lstat) of everything under ``root``, links not followed; iterative, so a
    tree thousands of levels deep is no problem."""
    stack = [str(root)]
    while stack:
        top = stack.pop()
        try:
            it = os.scandir(top)
        except OSError:
            continue
        with it:
            for e in it:
                try:
                    st = e.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                yield e.path, st
                if stat.S_ISDIR(st.st_mode):
                    stack.append(e.path)


def snapshot(root: Path) -> dict[str, Entry]:
    """Every path under ``root`` (links not followed): type, mode, size, mtime, uid."""
    out: dict[str, Entry] = {}
    top = os.lstat(root)
    out["."] = (stat.S_IFMT(top.st_mode), stat.S_IMODE(top.st_mode), 0, top.st_mtime_ns,
                top.st_uid)
    for full, st in entries(root):
        size = 0 if stat.S_ISDIR(st.st_mode) else st.st_size
        out[os.path.relpath(full, root)] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode),
                                            size, st.st_mtime_ns, st.st_uid)
    return out


def changed_outside(before: dict[str, Entry], after: dict[str, Entry],
                    inside: str) -> list[str]:
    """Paths that appeared, vanished or changed, other than ``inside`` and below it."""
    def out(rel: str) -> bool:
        return rel != inside and not rel.startswith(inside + os.sep)

    keys = {k for k in before.keys() | after.keys() if out(k)}
    return sorted(k for k in keys if before.get(k) != after.get(k))


def powers(root: Path) -> list[str]:
    """Files under ``root`` that give something away: setuid, setgid, sticky, devices,
    FIFOs, sockets."""
    bad = []
    for full, st in entries(root):
        m = st.st_mode
        if m & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX) or stat.S_ISCHR(m) \
                or stat.S_ISBLK(m) or stat.S_ISFIFO(m) or stat.S_ISSOCK(m):
            bad.append(f"{full} {stat.filemode(m)}")
    return bad


def wide_modes(root: Path) -> list[str]:
    """Regular files under ``root`` with bits beyond 0o777 & ~umask."""
    allowed = 0o777 & ~current_umask()
    return [f"{full} {stat.filemode(st.st_mode)}" for full, st in entries(root)
            if stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) & ~allowed]


def leftovers(root: Path) -> list[str]:
    """Temp files a failed transfer left behind (aiva's own naming: .NAME.*aiva*)."""
    return [full for full, st in entries(root) if not stat.S_ISDIR(st.st_mode)
            and os.path.basename(full).startswith(".") and "aiva" in os.path.basename(full)]


def biggest_file(root: Path) -> int:
    return max((st.st_size for _, st in entries(root) if stat.S_ISREG(st.st_mode)),
               default=0)


@dataclass
class Area:
    """A destination beside a canary tree, inside one snapshot root."""

    root: Path
    dest: Path
    canary: Path
    before: dict[str, Entry] = field(default_factory=dict)

    @classmethod
    def make(cls, base: Path, *, dest_exists: bool = True) -> Area:
        root = base
        root.mkdir(parents=True, exist_ok=True)
        canary = root / "canary"
        (canary / "sub").mkdir(parents=True)
        (canary / "secret.txt").write_text("root only\n")
        (canary / "secret.txt").chmod(0o600)
        (canary / "sub" / "keep.txt").write_text("keep\n")
        os.utime(canary / "sub" / "keep.txt", ns=(1_600_000_000 * 10**9,) * 2)
        dest = root / "dest"
        if dest_exists:
            dest.mkdir()
            (dest / "mine.txt").write_text("mine\n")
        area = cls(root, dest, canary)
        area.before = snapshot(root)
        return area

    def escapes(self) -> list[str]:
        """Relative walk names that, joined to ``dest``, land in the canary."""
        up = os.path.relpath(self.canary, self.dest)
        return [f"{up}/evil", "../" * 40 + str(self.canary / "evil_deep").lstrip("/"),
                f"sub/../{up}/evil_mid", f"{up}/sub/keep.txt"]

    def absolutes(self) -> list[str]:
        """Absolute walk names in the canary."""
        return [str(self.canary / "evil_abs"), str(self.canary / "sub" / "evil_abs2")]

    def check(self) -> None:
        """Nothing outside dest changed; nothing anywhere has powers or wide modes."""
        after = snapshot(self.root)
        moved = changed_outside(self.before, after, "dest")
        assert not moved, f"changed outside the destination: {moved}"
        bad = powers(self.root)
        assert not bad, f"files with powers: {bad}"
        wide = wide_modes(self.dest)
        assert not wide, f"modes beyond 0o777 & ~umask: {wide}"


# ---------------------------------------------------------------------- memory


def _rss(field_name: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field_name} in /proc/self/status")


class MemoryGuard:
    """Peak RSS growth of this process during a block; past ``bound`` it calls
    ``on_breach`` (stop the flood) so a host bug fails the test instead of the machine."""

    def __init__(self, bound: int = MEMORY_BOUND,
                 on_breach: Callable[[], None] | None = None) -> None:
        self.bound, self.on_breach = bound, on_breach
        self.base = 0
        self.peak = 0
        self.breached = False
        self._stop = threading.Event()

    def __enter__(self) -> MemoryGuard:
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM
        self.base = _rss()
        self.peak = self.base
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.01):
            rss = _rss()
            self.peak = max(self.peak, rss)
            if rss - self.base > self.bound and not self.breached:
                self.breached = True
                if self.on_breach is not None:
                    self.on_breach()

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        with contextlib.suppress(RuntimeError):
            self.peak = max(self.peak, _rss("VmHWM"))

    @property
    def growth(self) -> int:
        return self.peak - self.base

    def check(self) -> None:
        assert not self.breached and self.growth <= self.bound, (
            f"the host process grew by {self.growth >> 20} MiB "
            f"(bound {self.bound >> 20} MiB)")


# ---------------------------------------------------------------------- bounded calls


@dataclass
class Outcome:
    value: Any = None
    error: BaseException | None = None
    elapsed: float = 0.0
    overran: bool = False
    limit: float = LIMIT

    def describe(self) -> str:
        if self.overran:
            return f"still running after {self.limit:g}s"
        if self.error is None:
            return f"returned {self.value!r:.200} in {self.elapsed:.1f}s"
        tb = "".join(traceback.format_exception(self.error))
        return f"raised {type(self.error).__name__} in {self.elapsed:.1f}s:\n{tb[-3000:]}"

    def ended(self, *, must_fail: bool = False) -> None:
        """Ended in time, and with an AivaError if anything (or an AivaError, if told)."""
        assert not self.overran, f"no end by the deadline: {self.describe()}"
        if self.error is not None:
            assert isinstance(self.error, AivaError), f"not an AivaError: {self.describe()}"
        if must_fail:
            assert self.error is not None, f"expected an AivaError: {self.describe()}"


def bounded(fn: Callable[[], Any], *, limit: float = LIMIT,
            on_overrun: Callable[[], None] | None = None) -> Outcome:
    """Run ``fn`` on a thread; past ``limit`` call ``on_overrun`` (which must make it
    end: kill the fake agent) and report the overrun."""
    out = Outcome(limit=limit)
    done = threading.Event()

    def run() -> None:
        started = time.monotonic()
        try:
            out.value = fn()
        except BaseException as exc:
            out.error = exc
        out.elapsed = time.monotonic() - started
        done.set()

    threading.Thread(target=run, daemon=True, name="hostile-call").start()
    if not done.wait(limit):
        out.overran = True
        if on_overrun is not None:
            on_overrun()
        done.wait(30)
    return out


# ---------------------------------------------------------------------- subprocesses


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str
    maxrss: int  # bytes, the child's peak
    elapsed: float
    overran: bool

    def clean_failure(self) -> None:
        """A non-zero exit with one `error:` line and no traceback."""
        assert not self.overran, f"the CLI was still running: {self.stderr[-2000:]}"
        assert self.returncode != 0, (self.returncode, self.stdout[-500:], self.stderr[-2000:])
        assert "Traceback" not in self.stderr, self.stderr[-3000:]
        assert self.stderr.lstrip().startswith("error:"), self.stderr[-2000:]

    def clean(self) -> None:
        """Either success or a clean failure; never a traceback or a hang."""
        assert not self.overran, f"the CLI was still running: {self.stderr[-2000:]}"
        assert "Traceback" not in self.stderr, self.stderr[-3000:]
        if self.returncode != 0:
            self.clean_failure()


def run_cli(args: list[str], *, limit: float = LIMIT * 2,
            env: dict[str, str] | None = None) -> Ran:
    """``aiva ARGS`` as a separate process; its peak RSS (sampled), killed at ``limit``."""
    cmd = [sys.executable, "-m", "aiva.cli.main", *args]
    started = time.monotonic()
    with open(os.devnull, "rb") as null_in:
        proc = subprocess.Popen(cmd, stdin=null_in, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env={**os.environ, **(env or {})},
                                start_new_session=True)
    chunks: dict[str, list[bytes]] = {"out": [], "err": []}

    def drain(stream: Any, key: str) -> None:
        kept = 0
        for block in iter(lambda: stream.read1(1 << 16), b""):
            if kept < 1 << 20:  # a flood to the terminal is the CLI's right: keep a head
                chunks[key].append(block)
                kept += len(block)

    readers = [threading.Thread(target=drain, args=(proc.stdout, "out"), daemon=True),
               threading.Thread(target=drain, args=(proc.stderr, "err"), daemon=True)]
    for t in readers:
        t.start()
    overran = False
    status = None
    peak = 0
    while True:
        # the peak of the CLI's own memory: VmHWM of its process, sampled while it runs.
        # (wait4's ru_maxrss would not do: a child forked from this large test process
        # is charged this process's RSS before its exec.)
        peak = max(peak, _hwm(proc.pid))
        pid, status, _rusage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() - started > limit and not overran:
            overran = True
            os.kill(proc.pid, signal.SIGKILL)
        time.sleep(0.005)
    proc.returncode = os.waitstatus_to_exitcode(status)
    for t in readers:
        t.join(5)
    return Ran(proc.returncode, b"".join(chunks["out"]).decode(errors="replace"),
               b"".join(chunks["err"]).decode(errors="replace"), peak,
               time.monotonic() - started, overran)


def _hwm(pid: int) -> int:
    """Bytes of the process's resident high-water mark (0 once it has exited)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def set_call_timeout(monkeypatch: Any, seconds: float = CALL_TIMEOUT) -> None:
    """The contract's in-process knobs: every agent call's deadline, exec's grace."""
    monkeypatch.setattr(agent_client, "DEFAULT_CALL_TIMEOUT", seconds, raising=False)
    monkeypatch.setattr(agent_client, "TIMEOUT_GRACE", 1.0, raising=False)


def hostile_config() -> Any:
    """The test home's config with the contract's short call deadline, if it has one."""
    from aiva.config import load_config

    cfg = load_config()
    if "limits" in type(cfg).model_fields:
        short: dict[str, Any] = {"call_timeout": 2.0}
        if "walk_entries" in type(cfg.limits).model_fields:  # an endless walk stops sooner
            short["walk_entries"] = 100_000
        cfg = cfg.model_copy(update={"limits": cfg.limits.model_copy(update=short)})
    return cfg
