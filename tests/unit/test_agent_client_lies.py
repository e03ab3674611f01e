"""The host's agent connection against a lying agent (tests/unit/scripted_liar.py): every
malformed reply is a ProtocolError, a silent agent ends every call by its deadline with an
AivaError, an agent answering forever is cut off at a bound, and floods of frames for
channels nobody opened change nothing.

The real agent's side of the same rules (backpressure, cancel, pings during a long
command) is in test_agent_client_real.py.
"""

from __future__ import annotations

import json
import math
import posixpath
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aiva.agent import protocol as p
from aiva.agent_client import AgentClient, ProcessTransport, replies, sync
from aiva.errors import AgentUnreachable, AivaError, CommandTimeout, ProtocolError

K = p.FrameKind
LIAR = Path(__file__).with_name("scripted_liar.py")
pytestmark = pytest.mark.timeout(60)


@dataclass
class Liar:
    proc: subprocess.Popen[bytes]
    client: AgentClient
    log_path: Path

    def received(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log_path.read_text().splitlines()]

    def cancels(self) -> set[int]:
        return {f["chan"] for f in self.received()
                if f["kind"] == K.SIGNAL and json.loads(f["payload"]).get("cancel")}


@contextmanager
def liar(tmp_path: Path, script: dict[str, Any], **client_kw: Any) -> Iterator[Liar]:
    log = tmp_path / "liar.log"
    log.touch()
    proc = subprocess.Popen([sys.executable, str(LIAR), json.dumps(script), str(log)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    client_kw.setdefault("call_timeout", 2.0)
    client = AgentClient(ProcessTransport(proc), label="liar", **client_kw)
    try:
        yield Liar(proc, client, log)
    finally:
        proc.kill()  # it may be reading nothing: do not wait for it to see EOF
        client.close()
        proc.wait(timeout=10)


def ends_by(fn: Callable[[], Any], seconds: float) -> BaseException | None:
    """Run ``fn`` on a thread; the error it ended with (None if it returned). Fails the
    test if it is still running after ``seconds`` (a hang, not a slow answer)."""
    out: list[BaseException | None] = []

    def run() -> None:
        try:
            fn()
            out.append(None)
        except BaseException as exc:
            out.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"the call was still waiting after {seconds}s"
    return out[0]


def wait_for(cond: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    import time

    deadline = time.monotonic() + timeout
    while not (value := cond()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)
    return value


def started(pid: Any = 4242) -> list[Any]:
    return [K.EVENT, {"started": pid}]


def result(**kw: Any) -> list[Any]:
    base = {"exit_code": 0, "duration": 0.1, "timed_out": False, "pid": 4242}
    return [K.RESULT, {k: v for k, v in (base | kw).items() if v is not ...}]


def header(**kw: Any) -> list[Any]:
    base = {"size": 3, "mode": 0o644, "mtime_ns": 1}
    return [K.EVENT, {k: v for k, v in (base | kw).items() if v is not ...}]


# --------------------------------------------------------------------------- exec


@pytest.mark.parametrize("pid", ["42", -1, 0, True, 1.5, None, 1 << 40])
def test_exec_start_with_a_bad_pid_is_a_protocol_error(tmp_path: Path, pid: Any) -> None:
    with (liar(tmp_path, {"exec": [started(pid), result()]}) as a,
          pytest.raises(ProtocolError, match="started")):
        a.client.exec(["true"])


@pytest.mark.parametrize("field", [
    {"exit_code": "0"}, {"exit_code": True}, {"exit_code": 1 << 40}, {"exit_code": ...},
    {"duration": -1}, {"duration": math.nan}, {"duration": math.inf}, {"duration": "1"},
    {"timed_out": "no"}, {"timed_out": 0}, {"pid": 7}, {"pid": "4242"},
])
def test_exec_result_fields_are_checked(tmp_path: Path, field: dict[str, Any]) -> None:
    with liar(tmp_path, {"exec": [started(), result(**field)]}) as a:
        with pytest.raises(ProtocolError):
            a.client.exec(["true"])
        assert a.client.ping()["version"] == "1"  # the connection is still usable


def test_a_background_process_with_a_bad_result_fails_its_wait(tmp_path: Path) -> None:
    with liar(tmp_path, {"exec": [started(), result(exit_code="x")]}) as a:
        h = a.client.exec(["true"], background=True)
        assert not isinstance(h, type(None))
        with pytest.raises(ProtocolError):
            h.wait(10)  # type: ignore[union-attr]


@pytest.mark.parametrize("reply", [
    {"exit_code": 0, "duration": 0, "timed_out": False, "pid": 9, "stdout": 5, "stderr": ""},
    {"exit_code": "0", "duration": 0, "timed_out": False, "pid": 9, "stdout": "", "stderr": ""},
])
def test_proc_wait_answers_are_checked(tmp_path: Path, reply: dict[str, Any]) -> None:
    with (liar(tmp_path, {"proc.wait": [[K.RESULT, reply]]}) as a,
          pytest.raises(ProtocolError)):
        a.client.wait_process(9, timeout=5)


@pytest.mark.parametrize("payload", [{"raw": "not json"}, {"raw": "[1, 2]"},
                                     {"kind": "no such name!", "message": "x"},
                                     {"kind": "OSError", "message": 5}])
def test_bad_error_reports_are_protocol_errors(tmp_path: Path, payload: Any) -> None:
    with (liar(tmp_path, {"fs.stat": [[K.ERROR, payload]]}) as a,
          pytest.raises(ProtocolError)):
        a.client.stat("/x")


@pytest.mark.parametrize("procs", ["x", [5], [{"pid": "1"}], [{"pid": 1, "exit_code": "0"}]])
def test_process_lists_are_checked(tmp_path: Path, procs: Any) -> None:
    with (liar(tmp_path, {"proc.list": [[K.RESULT, {"procs": procs}]]}) as a,
          pytest.raises(ProtocolError)):
        a.client.processes()


def test_a_good_error_report_is_the_remote_error(tmp_path: Path) -> None:
    with (liar(tmp_path, {"fs.stat": [[K.ERROR, {"kind": "FileNotFoundError",
                                                 "message": "gone"}]]}) as a,
          pytest.raises(FileNotFoundError, match="gone")):
        a.client.stat("/x")


def test_an_error_message_reaches_the_user_without_escapes_and_bounded(tmp_path: Path) -> None:
    message = "\x1b[2J\x1b[31mfake prompt$ " + "x" * 10000
    with (liar(tmp_path, {"fs.stat": [[K.ERROR, {"kind": "OSError", "message": message}]]}) as a,
          pytest.raises(AivaError) as err):
        a.client.stat("/x")
    assert "\x1b" not in str(err.value) and len(str(err.value)) <= 4096


def test_a_result_that_is_not_json_is_a_protocol_error(tmp_path: Path) -> None:
    with (liar(tmp_path, {"fs.mkdir": [[K.RESULT, {"raw": "\xff{"}]]}) as a,
          pytest.raises(ProtocolError, match="not valid JSON")):
        a.client.mkdir("/x")


# --------------------------------------------------------------------------- files


@pytest.mark.parametrize("field", [{"size": -1}, {"size": "3"}, {"size": 3.0}, {"mode": 0o17777},
                                   {"mode": -1}, {"mode": ...}, {"mtime_ns": 1.5},
                                   {"mtime_ns": -5}])
def test_read_headers_are_checked(tmp_path: Path, field: dict[str, Any]) -> None:
    with (liar(tmp_path, {"fs.read": [header(**field), [K.DATA, {"raw": "abc"}],
                                      [K.RESULT, {"bytes": 3}]]}) as a,
          pytest.raises(ProtocolError)):
        a.client.read_stream("/f")


def test_a_read_never_yields_more_than_the_declared_size(tmp_path: Path) -> None:
    with liar(tmp_path, {"fs.read": [header(size=3), [K.DATA, {"raw": "ab"}],
                                     [K.DATA, {"raw": "cd"}], [K.RESULT, {"bytes": 4}]]}) as a:
        meta, chunks = a.client.read_stream("/f")
        assert meta == {"size": 3, "mode": 0o644, "mtime_ns": 1}
        assert next(chunks) == b"ab"
        with pytest.raises(ProtocolError, match="more than the 3 bytes"):
            next(chunks)
        assert next(chunks, None) is None  # finished: no more, no hang


def test_a_read_whose_result_miscounts_is_a_protocol_error(tmp_path: Path) -> None:
    with (liar(tmp_path, {"fs.read": [header(size=3), [K.DATA, {"raw": "abc"}],
                                      [K.RESULT, {"bytes": "3"}]]}) as a,
          pytest.raises(ProtocolError)):
        a.client.read_file("/f")


def test_write_answers_are_checked(tmp_path: Path) -> None:
    with (liar(tmp_path, {"fs.write": [[K.RESULT, {"bytes": -3}]]}) as a,
          pytest.raises(ProtocolError)):
        a.client.write_file("/f", b"abc")


BAD_NAMES = ["../x", "../../../../tmp/evil", "/etc/passwd", "a//b", "a/./b", "a/../b", "",
             ".", "a\x00b", "a\\..\\b", "a/", "x" * 256, "/".join(["d"] * 2100)]


def walk_script(*batches: dict[str, Any], count: int | None = None) -> dict[str, Any]:
    files = sum(len(b.get("files", {})) for b in batches)
    frames = [[K.EVENT, b] for b in batches]
    return {"fs.walk": [*frames, [K.RESULT, {"count": files if count is None else count}]]}


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_walk_refuses_paths_that_leave_the_root(tmp_path: Path, bad: str) -> None:
    for batch in ({"files": {bad: [1, 1, 0o644]}}, {"files": {}, "dirs": [bad]}):
        with (liar(tmp_path, walk_script(batch)) as a,
          pytest.raises(ProtocolError)):
            a.client.walk("/src")


@pytest.mark.parametrize("batches", [
    ({"files": {"a": [1, 1, 0o644]}}, {"files": {"a": [1, 1, 0o644]}}),  # listed twice
    ({"files": {"a": [1, 1, 0o644], "a/b": [1, 1, 0o644]}},),  # below a file
    ({"files": {"a": [1, 1, 0o644]}, "dirs": ["a/sub"]},),
    ({"files": {"a": [1, 1, 0o644]}, "dirs": ["a"]},),  # file and directory
    ({"files": {}, "dirs": ["d", "d"]},),
    ({"files": {"a": [1, 1]}},), ({"files": {"a": [-1, 1, 0o644]}},),
    ({"files": {"a": [1, 1, 0o6777 | 0o10000]}},), ({"files": {"a": "big"}},),
    ({"files": {"a": [1, 1.5, 0o644]}},), ({"files": {"a": [True, 1, 0o644]}},),
    ({"files": ["a"]},), ({"files": {}, "dirs": "d"},), ({"files": {}, "dirs": [5]},),
])
def test_walk_batches_are_checked(tmp_path: Path, batches: tuple[dict[str, Any], ...]) -> None:
    with (liar(tmp_path, walk_script(*batches)) as a,
          pytest.raises(ProtocolError)):
        a.client.walk("/src")


def test_walk_count_must_match(tmp_path: Path) -> None:
    with (liar(tmp_path, walk_script({"files": {"a": [1, 1, 0o644]}}, count=2)) as a,
          pytest.raises(ProtocolError, match="counted")):
        a.client.walk("/src")


def test_a_good_walk_passes(tmp_path: Path) -> None:
    with liar(tmp_path, walk_script({"files": {"a/b": [1, 2, 0o755]}, "dirs": ["a"]})) as a:
        assert a.client.walk("/src") == ({"a/b": [1, 2, 0o755]}, ["a"])


def test_a_pull_of_an_escaping_walk_creates_nothing(tmp_path: Path) -> None:
    """The issue's attack: a walk naming ../../evil with a setuid mode."""
    dest = tmp_path / "deep" / "dest"
    dest.mkdir(parents=True)
    script = walk_script({"files": {"../../evil": [3, 1, 0o6777]}})
    script["fs.read"] = [header(mode=0o6777), [K.DATA, {"raw": "abc"}], [K.RESULT, {"bytes": 3}]]
    with liar(tmp_path, script) as a:
        before = sorted(tmp_path.rglob("*"))
        with pytest.raises(ProtocolError):
            sync.sync(a.client, dest, "/src", direction="pull",
                      state_file=tmp_path / "state.json")
        assert sorted(tmp_path.rglob("*")) == before
        assert not (tmp_path / "evil").exists()


@pytest.mark.parametrize("reply", [{"hashes": {"other": None}}, {"hashes": {"a": "xyz"}},
                                   {"hashes": {"a": 5}}, {"hashes": ["a"]}, {}])
def test_hash_answers_are_checked(tmp_path: Path, reply: dict[str, Any]) -> None:
    with (liar(tmp_path, {"fs.hash": [[K.RESULT, reply]]}) as a,
          pytest.raises(ProtocolError)):
        a.client.hash_files("/src", ["a"])


ENTRY = {"name": "f", "path": "/d/f", "type": "file", "size": 1, "mode": 0o644,
         "mtime": 1.0, "mtime_ns": 1, "uid": 0, "gid": 0}


@pytest.mark.parametrize("field", [{"type": "weird"}, {"size": -1}, {"mode": "644"},
                                   {"mode": 0o70000}, {"uid": -1}, {"mtime": math.nan},
                                   {"name": 3}])
def test_stat_answers_are_checked(tmp_path: Path, field: dict[str, Any]) -> None:
    with (liar(tmp_path, {"fs.stat": [[K.RESULT, ENTRY | field]]}) as a,
          pytest.raises(ProtocolError)):
        a.client.stat("/d/f")


@pytest.mark.parametrize("entries", [[ENTRY | {"name": "a/b"}], [ENTRY | {"name": ".."}],
                                     [ENTRY, ENTRY], "x", [5]])
def test_listings_are_checked(tmp_path: Path, entries: Any) -> None:
    with (liar(tmp_path, {"fs.list": [[K.RESULT, {"entries": entries}]]}) as a,
          pytest.raises(ProtocolError)):
        a.client.list_dir("/d")


def test_good_stat_and_listing_pass(tmp_path: Path) -> None:
    with liar(tmp_path, {"fs.stat": [[K.RESULT, ENTRY]],
                         "fs.list": [[K.RESULT, {"entries": [ENTRY]}]]}) as a:
        assert a.client.stat("/d/f") == ENTRY
        assert a.client.list_dir("/d") == [ENTRY]


@pytest.mark.parametrize("script", [
    {"ping": [[K.RESULT, {"version": "1", "pid": "1", "python": "3", "uid": 0}]]},
    {"sys.metrics": [[K.RESULT, {"memory": [1]}]]},
    {"sys.metrics": [[K.RESULT, {"loadavg": "high"}]]},
    {"sys.metrics": [[K.RESULT, {"cpu_jiffies": [-1]}]]},
    {"sys.metrics": [[K.RESULT, {"uptime": "long"}]]},
])
def test_system_answers_are_checked(tmp_path: Path, script: dict[str, Any]) -> None:
    with (liar(tmp_path, script) as a,
          pytest.raises(ProtocolError)):
        a.client.ping() if "ping" in script else a.client.metrics()


# --------------------------------------------------------------------------- deadlines


CALLS: dict[str, Callable[[AgentClient], Any]] = {
    "exec": lambda c: c.exec(["sleep", "1000"]),
    "exec with timeout": lambda c: c.exec(["sleep", "1000"], timeout=0.5),
    "background wait": lambda c: c.exec(["x"], background=True),
    "proc.wait": lambda c: c.wait_process(1),
    "read_stream": lambda c: c.read_stream("/f"),
    "read_file": lambda c: c.read_file("/f"),
    "write_file": lambda c: c.write_file("/f", b"x" * 100),
    "walk": lambda c: c.walk("/"),
    "hash_files": lambda c: c.hash_files("/", ["a"]),
    "stat": lambda c: c.stat("/"),
    "list_dir": lambda c: c.list_dir("/"),
    "mkdir": lambda c: c.mkdir("/x"),
    "ping": lambda c: c.ping(timeout=1),
    "metrics": lambda c: c.metrics(),
    "call without timeout": lambda c: c.call("proc.list", timeout=None),
}


@pytest.mark.parametrize("name", sorted(CALLS))
def test_a_silent_agent_ends_every_call_by_its_deadline(tmp_path: Path, name: str) -> None:
    with liar(tmp_path, {"*": "silent"}, call_timeout=0.5) as a:
        err = ends_by(lambda: CALLS[name](a.client), 30)
        assert isinstance(err, AivaError), err
        assert isinstance(err, CommandTimeout | AgentUnreachable), err


def test_a_stalled_stream_times_out_and_is_cancelled(tmp_path: Path) -> None:
    with liar(tmp_path, {"fs.read": [header(size=10), [K.DATA, {"raw": "ab"}]]},
              call_timeout=0.5) as a:
        _, chunks = a.client.read_stream("/f")
        assert next(chunks) == b"ab"
        assert isinstance(ends_by(lambda: next(chunks), 30), CommandTimeout)
        wait_for(lambda: a.cancels(), what="a cancel")


def test_an_agent_that_stops_reading_cannot_hold_a_sender(tmp_path: Path) -> None:
    with liar(tmp_path, {"stop_reading": True, "*": "silent"}, call_timeout=0.5) as a:
        err = ends_by(lambda: a.client.write_file("/f", bytes(8 << 20)), 30)
        assert isinstance(err, AgentUnreachable), err
        assert a.client.closed  # half a frame may be out: the connection is given up


def test_a_background_process_on_a_dead_link_ends(tmp_path: Path) -> None:
    with liar(tmp_path, {"exec": [started()], "*": "silent"}, call_timeout=0.5) as a:
        h = a.client.exec(["x"], background=True)
        err = ends_by(lambda: h.wait(), 30)  # type: ignore[union-attr]
        assert isinstance(err, AgentUnreachable), err


# --------------------------------------------------------------------------- answering forever


def test_a_walk_without_end_is_cut_off(tmp_path: Path) -> None:
    with liar(tmp_path, {"fs.walk": "walk_forever"}, walk_entries=5000) as a:
        err = ends_by(lambda: a.client.walk("/"), 30)
        assert isinstance(err, ProtocolError) and "5000 entries" in str(err), err
        wait_for(lambda: a.cancels(), what="the walk to be cancelled")
        assert a.client.ping()["version"] == "1"


def test_a_file_without_end_is_cut_off_at_its_declared_size(tmp_path: Path) -> None:
    with liar(tmp_path, {"fs.read": "data_forever"}) as a:
        err = ends_by(lambda: a.client.read_file("/dev/zero"), 30)
        assert isinstance(err, ProtocolError) and "more than" in str(err), err
        wait_for(lambda: a.cancels(), what="the read to be cancelled")


def test_endless_output_is_kept_capped_and_ends_by_the_timeout(tmp_path: Path) -> None:
    seen = [0]
    with liar(tmp_path, {"exec": "stdout_forever"}, exec_output=1 << 20,
              call_timeout=1) as a:
        err = ends_by(lambda: a.client.exec(
            ["yes"], timeout=0.5, on_bytes=lambda _k, d: seen.__setitem__(0, seen[0] + len(d))),
            60)
        assert isinstance(err, CommandTimeout), err
        assert seen[0] > 1 << 20  # the callback saw more than what would be kept
        wait_for(lambda: a.cancels(), what="the command to be cancelled")


def test_frames_for_channels_nobody_opened_are_dropped(tmp_path: Path) -> None:
    with liar(tmp_path, {"flood": 20000}) as a:
        assert a.client.ping(timeout=30)["version"] == "1"
        assert a.client.dropped_frames >= 20000
        assert all(ch % 2 == 1 for ch in a.client._channels)


# --------------------------------------------------------------------------- any reply at all


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                    lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
PATHS = st.lists(st.sampled_from(["a", "b", "..", ".", "", "/", "\\", "\0", "x" * 300]),
                 max_size=6).map("/".join) | st.text(max_size=20)


@given(PATHS)
@settings(max_examples=300, deadline=None)
def test_an_accepted_walk_path_stays_below_its_root(rel: str) -> None:
    try:
        out = replies.rel_path(rel, "walk")
    except ProtocolError:
        return
    joined = posixpath.normpath(posixpath.join("/root", out))
    assert joined.startswith("/root/") and ".." not in out.split("/")
    assert "\0" not in out and not out.startswith("/")


@given(st.lists(st.dictionaries(st.sampled_from(["files", "dirs", "x"]),
                                JSON | st.dictionaries(PATHS, JSON, max_size=4)
                                | st.lists(PATHS, max_size=4), max_size=3), max_size=4),
       JSON)
@settings(max_examples=300, deadline=None)
def test_any_walk_reply_is_a_walk_or_a_protocol_error(batches: list[Any], end: Any) -> None:
    walk = replies.WalkCollector(1000)
    try:
        for b in batches:
            walk.batch(b)
        files, dirs = walk.result(end if isinstance(end, dict) else {"count": end})
    except ProtocolError:
        return
    for rel in [*files, *dirs]:
        assert replies.rel_path(rel, "walk") == rel
    assert all(len(v) == 3 and 0 <= v[2] <= 0o7777 for v in files.values())


@given(JSON)
@settings(max_examples=300, deadline=None)
def test_any_reply_to_any_call_is_typed_or_a_protocol_error(reply: Any) -> None:
    obj = reply if isinstance(reply, dict) else {"value": reply}
    checks = [replies.started, replies.exec_result, replies.wait_result, replies.file_meta,
              replies.stat_entry, lambda o: replies.entries(o, 10), replies.written,
              replies.ping, replies.metrics, replies.error,
              lambda o: replies.hashes(o, ["a"]), lambda o: replies.processes(o, 10)]
    for check in checks:
        try:
            check(obj)
        except ProtocolError:
            pass
