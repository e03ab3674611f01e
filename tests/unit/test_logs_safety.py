"""Logs read from places a sandbox writes: no link followed, no FIFO waited on, no file
created, a size cap; rotation noticed. And the command log's cap per command."""

from __future__ import annotations

import json
import os
import stat
import threading
import time
from pathlib import Path

import pytest

from aiva.observe import logs
from aiva.observe.logs import CommandLog, _Follower, read_jsonl, read_tail_bytes


def rec(text: str, t: float | None = None) -> str:
    return json.dumps({"t": time.time() if t is None else t, "s": "syslog", "d": text}) + "\n"


def secret_file(tmp_path: Path) -> Path:
    """A root-only host file whose content would parse as a log line."""
    d = tmp_path / "private"
    d.mkdir(mode=0o700)
    f = d / "secret.jsonl"
    f.write_text(rec("SECRET-4711"))
    f.chmod(0o600)
    return f


def test_read_jsonl_skips_links_fifos_and_directories(tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture
                                                      ) -> None:
    secret = secret_file(tmp_path)
    link = tmp_path / "syslog.jsonl"
    link.symlink_to(secret)
    assert read_jsonl(link) == []
    assert "symbolic link" in caplog.text

    link.unlink()
    os.mkfifo(link)
    done = threading.Event()
    result: list[object] = []

    def read() -> None:
        result.append(read_jsonl(link))
        done.set()

    threading.Thread(target=read, daemon=True).start()
    assert done.wait(10), "reading a FIFO blocked"
    assert result == [[]]
    assert "FIFO" in caplog.text

    link.unlink()
    link.mkdir()
    assert read_jsonl(link) == []
    assert read_jsonl(tmp_path / "missing") == []


def test_read_jsonl_reads_at_most_the_cap_newest_first(tmp_path: Path) -> None:
    path = tmp_path / "big.jsonl"
    lines = [rec(f"line {i:04d}", t=1000.0 + i) for i in range(200)]
    path.write_text("".join(lines))
    cap = len(lines[0]) * 10 + 5  # ten lines and a bit: the bit is a partial line
    got = read_jsonl(path, cap=cap)
    assert [x.text for x in got] == [f"line {i:04d}" for i in range(190, 200)]
    assert len(read_tail_bytes(path, cap) or b"") <= cap
    assert [x.text for x in read_jsonl(path, tail=3)] == ["line 0197", "line 0198",
                                                          "line 0199"]
    assert read_jsonl(path, tail=0) == []


@pytest.mark.parametrize("bad", [
    '{"t": 1e300, "s": "syslog", "d": "x"}',  # a time out of range
    '{"t": "now", "s": "syslog", "d": "x"}',
    '{"t": true, "s": "syslog", "d": "x"}',
    '{"t": 1.0, "s": "syslog", "d": {"not": "text"}}',
    '{"t": 1.0, "s": 7, "d": "x"}',
    '[1, 2]',
    'not json',
])
def test_malformed_lines_are_skipped(tmp_path: Path, bad: str) -> None:
    path = tmp_path / "l.jsonl"
    path.write_text(bad + "\n" + rec("good"))
    assert [x.text for x in read_jsonl(path)] == ["good"]


def test_follow_never_creates_the_file_and_reads_one_that_appears(tmp_path: Path) -> None:
    path = tmp_path / "syslog.jsonl"
    f = _Follower(path, "syslog")
    assert f.poll() == []
    assert not path.exists() and not os.path.lexists(path)
    path.write_text(rec("first") + rec("second"))  # appeared after the start: from its start
    assert [x.text for x in f.poll()] == ["first", "second"]
    with path.open("a") as out:
        out.write(rec("third"))
    assert [x.text for x in f.poll()] == ["third"]
    f.close()


def test_follow_starts_at_the_end_of_a_file_already_there(tmp_path: Path) -> None:
    path = tmp_path / "syslog.jsonl"
    path.write_text(rec("old"))
    f = _Follower(path, None)
    assert f.poll() == []
    with path.open("a") as out:
        out.write(rec("new"))
    assert [x.text for x in f.poll()] == ["new"]
    f.close()


def test_follow_notices_rotation_and_truncation(tmp_path: Path) -> None:
    path = tmp_path / "syslog.jsonl"
    path.write_text("")
    f = _Follower(path, None)
    with path.open("a") as out:
        out.write(rec("a"))
    assert [x.text for x in f.poll()] == ["a"]
    # the agent's rotation: a last line into the old file, rename to .1, a new file
    with path.open("a") as out:
        out.write(rec("b"))
    os.replace(path, path.with_name(path.name + ".1"))
    path.write_text(rec("c"))
    texts = [x.text for _ in range(3) for x in f.poll()]
    assert texts == ["b", "c"]
    # truncated in place: read again from the start
    path.write_text("")
    assert f.poll() == []
    path.write_text(rec("d"))
    assert [x.text for _ in range(2) for x in f.poll()] == ["d"]
    f.close()


def test_follow_skips_a_link_or_fifo_in_place_and_comes_back(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    secret = secret_file(tmp_path)
    nowhere = tmp_path / "elsewhere" / "created.jsonl"
    nowhere.parent.mkdir()
    path = tmp_path / "syslog.jsonl"
    path.write_text("")
    f = _Follower(path, "syslog")
    seen: list[str] = []
    for _ in range(50):  # the guest's loop: link to a secret, link to nowhere, FIFO, file
        path.unlink()
        path.symlink_to(secret)
        seen += [x.text for x in f.poll()]
        path.unlink()
        path.symlink_to(nowhere)
        seen += [x.text for x in f.poll()]
        path.unlink()
        os.mkfifo(path)
        seen += [x.text for x in f.poll()]
        path.unlink()
        path.write_text(rec("plain"))
        seen += [x.text for _ in range(2) for x in f.poll()]
    f.close()
    assert "SECRET-4711" not in seen
    assert seen.count("plain") == 50
    assert not nowhere.exists()
    assert "symbolic link" in caplog.text and "FIFO" in caplog.text


def test_follow_drops_an_endless_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                      ) -> None:
    monkeypatch.setattr(logs, "MAX_LINE", 100)
    path = tmp_path / "l.jsonl"
    path.write_text("")
    f = _Follower(path, None)
    with path.open("a") as out:
        out.write("x" * 500)
    assert f.poll() == []
    assert len(f.partial) <= 100
    with path.open("a") as out:
        out.write("yyy\n" + rec("after"))
    assert [x.text for x in f.poll()] == ["after"]
    f.close()


def open_fds_of(path: Path) -> int:
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += os.readlink(f"/proc/self/fd/{fd}") == str(path)
        except OSError:
            pass
    return n


def test_follow_jsonl_yields_new_lines_and_closes_its_file(tmp_path: Path) -> None:
    path = tmp_path / "l.jsonl"
    path.write_text("")
    got: list[str] = []
    done = threading.Event()

    def consume() -> None:
        it = logs.follow_jsonl(path, poll=0.01)
        for line in it:
            got.append(line.text)
            break
        it.close()
        done.set()

    threading.Thread(target=consume, daemon=True).start()
    deadline = time.monotonic() + 10
    while not done.is_set():  # lines written before the follow began are not new: repeat
        assert time.monotonic() < deadline, "follow_jsonl yielded nothing"
        with path.open("a") as out:
            out.write(rec("one"))
        done.wait(0.05)
    assert got == ["one"]
    assert open_fds_of(path) == 0


def test_command_log_caps_each_command_and_says_how_much_was_cut(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIVA_HOME", str(tmp_path / "home"))
    log = CommandLog("sb-1", cap=100)
    a, b = log.new_command(), log.new_command()
    log.write(a, "cmd", "yes")
    for _ in range(5):
        log.write(a, "stdout", "x" * 30)
    log.write(b, "stderr", "é" * 10)  # another command: a budget of its own (20 bytes)
    log.write(a, "stderr", "late")
    log.write(a, "exit", "0")
    log.write(b, "stdout", "z" * 200)
    log.close()  # b never exited: its cut line comes at close
    recs = [json.loads(line) for line in log.path.read_text().splitlines()]
    out_a = "".join(r["d"] for r in recs if r["c"] == a and r["s"] in ("stdout", "stderr"))
    assert out_a == "x" * 100
    cut_a = [r for r in recs if r["c"] == a and r["s"] == "cut"]
    assert len(cut_a) == 1 and cut_a[0]["n"] == 50 + 4 and "54 bytes" in cut_a[0]["d"]
    assert [r["s"] for r in recs if r["c"] == a][-2:] == ["cut", "exit"]
    out_b = "".join(r["d"] for r in recs if r["c"] == b and r["s"] != "cut")
    assert len(out_b.encode()) == 100 and out_b.startswith("é" * 10)
    assert [r["n"] for r in recs if r["c"] == b and r["s"] == "cut"] == [120]
    assert stat.S_IMODE(log.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(log.path.parent.stat().st_mode) == 0o700
    assert [x.source for x in read_jsonl(log.path)].count("cut") == 2


def test_command_log_default_cap_is_the_config_limit(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    (home / "config.yaml").write_text("limits:\n  command_log: 1KB\n")
    monkeypatch.setenv("AIVA_HOME", str(home))
    assert CommandLog("x").cap == 1024
