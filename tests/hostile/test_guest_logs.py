"""The guest's syslog file sits where the sandbox writes: whatever it puts there (a FIFO,
a link to a host file, a huge sparse file), `logs` ends, stays bounded and shows nothing
of the host. The file is made by the test in the fake sandbox's run dir."""

from __future__ import annotations

import contextlib
import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest
from hostile_kit import Area, MemoryGuard, bounded
from surfaces import daemon_json

from aiva.observe.logquery import query_logs

SECRET = "HOST-SECRET-7f3a"


def _syslog(hostile: Any) -> Path:
    path = hostile.engine.backend("docker").syslog_path(hostile.engine.get(hostile.name))
    assert path is not None
    path.parent.mkdir(parents=True, exist_ok=True)
    return Path(path)


LOG_READERS = {
    "Engine.logs": lambda box: box.engine.logs(box.name, tail=10),
    "query_logs(syslog)": lambda box: query_logs(box.engine, box.name, source="syslog",
                                                 limit=10),
    "daemon GET logs": lambda box: daemon_json(box, "GET", "/logs", params={"tail": 10}),
}


def _unblock(fifo: Path) -> None:
    """Let a reader stuck opening the FIFO go: open its write end, then close it."""
    with contextlib.suppress(OSError):
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


@pytest.mark.parametrize(("reader", "which"), [
    *((r, "syslog.jsonl") for r in LOG_READERS), ("Engine.logs", "syslog.jsonl.1")])
def test_a_fifo_as_the_syslog_does_not_hang_logs(hostile: Any, reader: str, which: str) -> None:
    fifo = _syslog(hostile).with_name(which)
    os.mkfifo(fifo)
    out = bounded(lambda: LOG_READERS[reader](hostile), limit=6,
                  on_overrun=lambda: _unblock(fifo))
    out.ended()


@pytest.mark.parametrize("reader", LOG_READERS)
def test_a_link_to_a_host_file_shows_nothing_of_it(hostile: Any, reader: str) -> None:
    area = Area.make(hostile.tmp / "area")
    secret = area.canary / "secret.jsonl"
    secret.write_text(json.dumps({"t": 1700000000, "s": "syslog", "d": SECRET}) + "\n")
    secret.chmod(0o600)
    log = _syslog(hostile)
    log.symlink_to(secret)
    log.with_name("syslog.jsonl.1").symlink_to(secret)
    out = bounded(lambda: LOG_READERS[reader](hostile), on_overrun=hostile.kill)
    out.ended()
    assert SECRET not in repr(out.value)


def test_a_huge_sparse_syslog_is_read_with_a_cap(hostile: Any) -> None:
    """256 MiB of NULs with no newline: tail=10 must not pull it all into memory."""
    log = _syslog(hostile)
    with log.open("wb") as f:
        f.truncate(256 << 20)
    with MemoryGuard() as mem:
        out = bounded(lambda: hostile.engine.logs(hostile.name, tail=10), limit=30)
    mem.check()
    out.ended()


def test_following_a_dangling_link_creates_nothing(hostile: Any) -> None:
    """`aiva logs -f` once made a root-owned file wherever the guest's link pointed."""
    area = Area.make(hostile.tmp / "area")
    _syslog(hostile).symlink_to(area.canary / "created-by-follow")
    streams = hostile.engine.log_streams(hostile.name)

    def first(it: Any) -> None:
        with contextlib.suppress(Exception):
            next(it)

    for it in streams:
        threading.Thread(target=first, args=(it,), daemon=True).start()
    threading.Event().wait(1.0)  # give each follower time to open its file
    area.check()
