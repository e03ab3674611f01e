"""The agent as the guest's syslog (``--syslog``): a real agent process receiving real
datagrams on a temporary socket (``--syslog-socket`` stands in for /dev/log), and the
host side that reads what it wrote.

Nothing here sleeps for luck: every wait polls a condition against a deadline.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

import aiva.agent
from aiva.agent.server import SYSLOG_DGRAM_MAX, SYSLOG_ROTATE, parse_syslog
from aiva.agent_client import AgentClient, ProcessTransport
from aiva.backends.base import LogLine
from aiva.errors import InvalidValue
from aiva.models import SandboxInfo, SandboxSpec

AGENT_DIR = Path(aiva.agent.__file__).parent
pytestmark = pytest.mark.timeout(60)


def wait_for(cond: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(("datagram", "expected"), [
    # util-linux `logger -t mytag hello` and libc syslog(3) to /dev/log
    (b"<13>Nov 23 17:45:04 mytag: hello", ("user", "notice", "mytag: hello")),
    (b"<13>Nov  3 17:45:04 mytag[19617]: hi  there\n",
     ("user", "notice", "mytag[19617]: hi  there")),
    # logger --rfc3164: a HOSTNAME before the tag
    (b"<155>Nov 23 17:45:04 vm y: m3164", ("local3", "err", "y: m3164")),
    # logger --rfc5424, with and without structured data
    (b'<13>1 2026-11-23T17:45:04.868558+00:00 vm x - - [timeQuality tzKnown="1" '
     b'isSynced="0"] msg5424', ("user", "notice", "x: msg5424")),
    (b'<14>1 2026-11-23T17:45:04Z vm app 42 ID7 [a x="]\\" y"][b] two words',
     ("user", "info", "app[42]: two words")),
    (b"<14>1 2026-11-23T17:45:04Z vm - - - - \xef\xbb\xbfbom", ("user", "info", "bom")),
    (b"<0>kernel: oops", ("kern", "emerg", "kernel: oops")),
    # busybox-style or hand-made: no time stamp; "words then a colon" is not a host + tag
    (b"<30>no stamp tag[1]: m", ("daemon", "info", "no stamp tag[1]: m")),
    # no or a bad <PRI>: the datagram as text
    (b"plain text", (None, None, "plain text")),
    (b"<999>x", (None, None, "<999>x")),
    (b"<12", (None, None, "<12")),
    (b"<>", (None, None, "<>")),
    (b"\xff\xfe<13>bad utf-8\x00", (None, None, "\ufffd\ufffd<13>bad utf-8")),
    (b"", (None, None, "")),
    (b"<13>", ("user", "notice", "")),
    (b"<13>1 truncated", ("user", "notice", "1 truncated")),
])
def test_parse_syslog(datagram: bytes, expected: tuple[Any, ...]) -> None:
    assert parse_syslog(datagram) == expected


def test_parse_syslog_never_raises_on_random_bytes() -> None:
    rng = random.Random(7)
    prefixes = [b"", b"<13>", b"<13>1 ", b"<13>Nov 23 17:45:04 ", b"<1>1 a b c d e ["]
    for _ in range(2000):
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(40)))
        facility, severity, text = parse_syslog(rng.choice(prefixes) + data)
        assert isinstance(text, str) and (facility is None) == (severity is None)


# --------------------------------------------------------------------------- the agent


@dataclass
class SyslogAgent:
    proc: subprocess.Popen[bytes]
    client: AgentClient
    dir: Path
    sock: str
    out: Path
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def send(self, data: bytes) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
            s.sendto(data, self.sock)
        finally:
            s.close()

    def records(self, path: Path | None = None) -> list[dict[str, Any]]:
        try:
            text = (path or self.out).read_text()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines(keepends=True)
                if line.endswith("\n")]

    def texts(self, path: Path | None = None) -> list[str]:
        return [r["d"] for r in self.records(path)]

    def wait_texts(self, n: int, path: Path | None = None) -> list[str]:
        return list(wait_for(lambda: len(t := self.texts(path)) >= n and t,
                             what=f"{n} syslog lines in {path or self.out}"))


_made: list[Path] = []


@pytest.fixture(autouse=True)
def _remove_dirs() -> Iterator[None]:
    """The agents' directories go after the test, so it can look at them once the agent
    has exited."""
    yield
    while _made:
        shutil.rmtree(_made.pop(), ignore_errors=True)


@contextmanager
def syslog_agent(out: str | None = None, prepare: Callable[[Path, str], None] | None = None
                 ) -> Iterator[SyslogAgent]:
    """An agent over stdio that receives syslog at DIR/log and writes to ``out`` (default
    DIR/out/syslog.jsonl). ``prepare(dir, sock)`` runs before it starts."""
    d = Path(tempfile.mkdtemp(prefix="aiva-sl-"))  # short: sun_path is ~108 bytes
    _made.append(d)
    sock = str(d / "log")
    out_path = Path(out) if out else d / "out" / "syslog.jsonl"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if prepare is not None:
        prepare(d, sock)
    log_path = d / "agent.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, str(AGENT_DIR), "--stdio", "--syslog", str(out_path),
             "--syslog-socket", sock],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)
    client = AgentClient(ProcessTransport(proc), label="syslog-agent")
    try:
        client.ping()  # the receiver is set up before the agent serves anyone
        yield SyslogAgent(proc, client, d, sock, out_path, log_path)
    finally:
        client.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        for f in (proc.stdin, proc.stdout):
            if f is not None:
                f.close()


def test_logger_and_libc_style_datagrams_become_json_lines() -> None:
    with syslog_agent() as a:
        assert stat.S_ISSOCK(os.stat(a.sock).st_mode)
        assert stat.S_IMODE(os.stat(a.sock).st_mode) == 0o666  # any user may log
        before = time.time()
        if shutil.which("logger"):
            subprocess.run(["logger", "-u", a.sock, "-t", "mytag", "hello"], check=True)
        else:  # what logger sends
            a.send(b"<13>Nov 23 17:45:04 mytag: hello")
        a.send(b"<11>Nov 23 17:45:04 app[7]: it broke\n")
        a.send(b"")  # an empty datagram is not an end
        a.send(b"no priority at all")
        assert a.wait_texts(3) == ["mytag: hello", "app[7]: it broke", "no priority at all"]
        recs = a.records()
        assert all(r["s"] == "syslog" and before - 1 <= r["t"] <= time.time() for r in recs)
        assert (recs[0]["f"], recs[0]["p"]) == ("user", "notice")
        assert (recs[1]["f"], recs[1]["p"]) == ("user", "err")
        assert "f" not in recs[2]
        assert a.client.ping()["version"]
    assert not os.path.exists(a.sock), "the agent left its /dev/log behind"


def test_garbage_and_huge_datagrams_never_hurt_the_agent() -> None:
    with syslog_agent() as a:
        rng = random.Random(3)
        for _ in range(50):
            a.send(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))))
        a.send(b"<13>Nov 23 17:45:04 big: " + b"y" * 150_000)
        a.send(b"<13>Nov 23 17:45:04 after: the end")
        texts = a.wait_texts(52)
        assert texts[-1] == "after: the end"
        big = texts[-2]
        assert big.startswith("big: yyy") and len(big) <= SYSLOG_DGRAM_MAX
        assert a.client.ping()["version"]
        assert a.proc.poll() is None


def test_a_stale_socket_is_replaced() -> None:
    def stale(d: Path, sock: str) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        s.bind(sock)
        s.close()  # the file stays; nobody answers there

    with syslog_agent(prepare=stale) as a:
        a.send(b"<13>t: after a stale socket")
        assert a.wait_texts(1) == ["t: after a stale socket"]


def test_a_dangling_symlink_is_replaced() -> None:
    def dangling(d: Path, sock: str) -> None:
        os.symlink(str(d / "nowhere" / "journal.sock"), sock)

    with syslog_agent(prepare=dangling) as a:
        a.send(b"<13>t: instead of a dangling link")
        assert a.wait_texts(1) == ["t: instead of a dangling link"]


def test_a_live_syslog_daemon_is_left_alone() -> None:
    daemon = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)

    bound: list[int] = []

    def live(d: Path, sock: str) -> None:
        daemon.bind(sock)
        bound.append(os.stat(sock).st_ino)

    try:
        with syslog_agent(prepare=live) as a:
            assert "not receiving syslog" in a.log() and "daemon serves it" in a.log()
            a.send(b"<13>t: for the daemon")
            daemon.settimeout(5)
            assert daemon.recv(100) == b"<13>t: for the daemon"
            assert a.client.ping()["version"]
            assert a.texts() == []
        assert [os.stat(a.sock).st_ino] == bound  # the agent has gone, the daemon's stays
        assert a.proc.returncode == 0
    finally:
        daemon.close()


def test_a_path_that_is_no_socket_is_left_alone() -> None:
    def regular(d: Path, sock: str) -> None:
        Path(sock).write_text("not a socket")

    with syslog_agent(prepare=regular) as a:
        assert "not a socket" in a.log()
        assert Path(a.sock).read_text() == "not a socket"
        assert a.client.ping()["version"]


def test_a_vanished_log_path_comes_back() -> None:
    with syslog_agent() as a:
        a.send(b"<13>t: one")
        assert a.wait_texts(1) == ["t: one"]
        shutil.rmtree(a.out.parent)
        a.send(b"<13>t: lost")
        wait_for(lambda: "cannot write the syslog" in a.log(), what="a complaint")
        assert a.client.ping()["version"]
        a.out.parent.mkdir()
        a.send(b"<13>t: two")
        texts = a.wait_texts(2)
        assert texts[-1] == "t: two" and "t: one" not in texts
        assert "1 syslog messages were lost" in texts[0]


def test_a_regular_file_rotates() -> None:
    with syslog_agent() as a:
        chunk = b"<13>t: " + b"r" * 60_000
        n = SYSLOG_ROTATE // 60_000 + 10
        for i in range(n):
            a.send(chunk + b" %d" % i)
        older = a.out.with_name(a.out.name + ".1")
        wait_for(lambda: len(a.texts(older)) + len(a.texts()) >= n, what="every line")
        old, new = a.texts(older), a.texts()
        assert old and new
        assert [t.rsplit(" ", 1)[1] for t in old + new] == [str(i) for i in range(n)]
        assert older.stat().st_size <= SYSLOG_ROTATE
        assert a.out.stat().st_size < SYSLOG_ROTATE


def test_a_character_device_or_fifo_is_kept_open_and_never_blocks_the_agent() -> None:
    """A virtio-serial port stands as a FIFO here: not a regular file, so never rotated,
    and when it is full the agent keeps the lines and goes on serving."""
    d = Path(tempfile.mkdtemp(prefix="aiva-fifo-"))
    fifo = d / "port"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        with syslog_agent(out=str(fifo)) as a:
            n = 30  # ~300 KiB: far more than a pipe holds
            for i in range(n):
                a.send(b"<13>t: %d " % i + b"f" * 10_000)
            for _ in range(5):  # the agent still answers while the pipe is full
                assert a.client.ping(timeout=5)["version"]
            got = bytearray()

            def drained() -> bool:
                try:
                    while chunk := os.read(reader, 1 << 16):
                        got.extend(chunk)
                except BlockingIOError:
                    pass
                return got.count(b"\n") >= n

            wait_for(drained, what="every line through the fifo")
            lines = [json.loads(x) for x in bytes(got).splitlines()]
            assert [x["d"].split(" ")[1] for x in lines] == [str(i) for i in range(n)]
            assert stat.S_ISFIFO(os.stat(fifo).st_mode)
            assert not os.path.exists(str(fifo) + ".1")
    finally:
        os.close(reader)
        shutil.rmtree(d, ignore_errors=True)


def test_without_syslog_option_nothing_listens() -> None:
    d = Path(tempfile.mkdtemp(prefix="aiva-sl-"))
    try:
        proc = subprocess.Popen([sys.executable, str(AGENT_DIR), "--stdio",
                                 "--syslog-socket", str(d / "log")],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL)
        client = AgentClient(ProcessTransport(proc), label="no-syslog")
        try:
            assert client.ping()["version"]
            assert not (d / "log").exists()
        finally:
            client.close()
            proc.wait(timeout=10)
            for f in (proc.stdin, proc.stdout):
                if f is not None:
                    f.close()
    finally:
        shutil.rmtree(d, ignore_errors=True)


# --------------------------------------------------------------------------- the host side


def _sandbox() -> SandboxInfo:
    return SandboxInfo(name="box", spec=SandboxSpec(backend="docker", image="img", cpus=1,
                                                    memory=1 << 30, disk=1 << 30))


def _write(path: Path, *texts: str, start: float = 1_700_000_000.0) -> None:
    with path.open("a") as f:
        for i, text in enumerate(texts):
            # the guest writes the file: a wrong "s" must not pass as another source
            f.write(json.dumps({"t": start + i, "s": "stdout", "d": text}) + "\n")
        f.write('{"t": 1, "s": "syslog", "d": "half a li')  # a line still being written


def test_guest_syslog_reads_the_rotated_part_and_keeps_the_tail(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from aiva.backends.docker import DockerBackend

    monkeypatch.setenv("AIVA_HOME", str(tmp_path))
    backend, sb = DockerBackend(), _sandbox()
    path = backend.syslog_path(sb)
    assert path is not None
    assert backend.guest_syslog(sb) == []  # nothing logged yet
    path.parent.mkdir(parents=True)
    older = path.with_name(path.name + ".1")
    _write(older, "a", "b", "c", start=100.0)
    _write(path, "d", "e", start=200.0)
    lines = backend.guest_syslog(sb)
    assert [x.text for x in lines] == ["a", "b", "c", "d", "e"]
    assert {x.source for x in lines} == {"syslog"}
    assert lines[0].ts == datetime.fromtimestamp(100.0, UTC)
    assert [x.text for x in backend.guest_syslog(sb, tail=1)] == ["e"]
    assert [x.text for x in backend.guest_syslog(sb, tail=4)] == ["b", "c", "d", "e"]
    path.unlink()
    path.symlink_to(older)  # the guest could point the file anywhere on the host
    assert [x.text for x in backend.guest_syslog(sb)] == ["a", "b", "c"]


class _Engine:
    def __init__(self, sb: SandboxInfo, lines: list[LogLine]) -> None:
        self.sb, self.lines = sb, lines

    def get(self, name: str) -> SandboxInfo:
        return self.sb

    def list_all(self, *, reconcile: bool = True) -> list[SandboxInfo]:
        return [self.sb]

    def logs(self, name: str, *, tail: int | None = None) -> list[LogLine]:
        return self.lines


def test_query_logs_has_a_syslog_source(monkeypatch: pytest.MonkeyPatch,
                                        tmp_path: Path) -> None:
    from aiva.observe import collector, logquery

    monkeypatch.setenv("AIVA_HOME", str(tmp_path))
    t0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    eng = _Engine(_sandbox(), [LogLine(t0, "stdout", "out\n"),
                               LogLine(t0, "syslog", "mytag: hello"),
                               LogLine(t0, "engine", "booted")])
    only = collector.query_logs(eng, "box", source="syslog")  # type: ignore[arg-type]
    assert [(e.sandbox, e.source, e.text) for e in only] == [("box", "syslog", "mytag: hello")]
    assert len(collector.query_logs(eng, "box")) == 3  # type: ignore[arg-type]
    assert logquery.line_sources("syslog") == {"syslog"}
    with pytest.raises(InvalidValue) as err:
        logquery.line_sources("kernel")
    assert "syslog" in (err.value.hint or "")
