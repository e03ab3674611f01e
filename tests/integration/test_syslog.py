"""The guest's syslog in the unified logs, on a real Docker sandbox: ``logger`` and libc's
syslog(3) in the container reach ``engine.logs``, ``follow_logs``, ``query_logs`` and
``aiva logs --source syslog``, also once the container has stopped."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from typing import Any

import pytest

from aiva import paths
from aiva.backends.base import LogLine
from aiva.observe.collector import query_logs

pytestmark = pytest.mark.docker


def wait_for(cond: Any, timeout: float = 20.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def syslog_texts(engine: Any, name: str) -> list[str]:
    return [x.text for x in engine.logs(name) if x.source == "syslog"]


def test_guest_syslog_reaches_the_unified_logs(make_sandbox: Any, engine: Any) -> None:
    sb = make_sandbox()
    word = f"hello-{uuid.uuid4().hex}"
    r = sb.commands.run(["logger", "-t", "aivatest", word])
    assert r.exit_code == 0, r.stderr

    wait_for(lambda: f"aivatest: {word}" in syslog_texts(engine, sb.name),
             what="the logger line in engine.logs")
    found = wait_for(lambda: query_logs(engine, sb.name, source="syslog"),
                     what="the logger line in query_logs")
    assert [(e.sandbox, e.source, e.text) for e in found] == [
        (sb.name, "syslog", f"aivatest: {word}")]
    assert abs(found[0].ts.timestamp() - time.time()) < 60
    assert all(e.source != "syslog" for e in query_logs(engine, sb.name, source="commands"))
    assert (paths.run_dir(sb.id) / "syslog.jsonl").is_file()  # read on the host directly

    # libc's syslog(3) from a user that is not root: /dev/log takes anyone's lines
    r = sb.commands.run(["python3", "-c", "import syslog; syslog.openlog('pyapp'); "
                         f"syslog.syslog(syslog.LOG_ERR, 'as nobody {word}')"],
                        user="nobody")
    assert r.exit_code == 0, r.stderr
    wait_for(lambda: any(t.startswith("pyapp") and t.endswith(f": as nobody {word}")
                         for t in syslog_texts(engine, sb.name)),
             what="the syslog(3) line of nobody")

    # follow_logs: a line logged after it started arrives
    seen: list[LogLine] = []

    def follow() -> None:
        for line in engine.follow_logs(sb.name):
            seen.append(line)

    threading.Thread(target=follow, daemon=True).start()
    later = f"later-{uuid.uuid4().hex}"

    def logged_and_seen() -> bool:  # follow_logs may start after the first logger ran
        sb.commands.run(["logger", "-t", "aivatest", later])
        deadline = time.monotonic() + 1
        while time.monotonic() < deadline:
            if any(x.source == "syslog" and x.text == f"aivatest: {later}" for x in seen):
                return True
            time.sleep(0.05)
        return False

    wait_for(logged_and_seen, what="the new line in follow_logs")

    # the CLI, in its own process, with the source filter
    r = subprocess.run([sys.executable, "-m", "aiva.cli.main", "logs", sb.name, "--source",
                        "syslog"], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ))
    assert r.returncode == 0, r.stderr
    assert f"[syslog] aivatest: {word}" in r.stdout
    assert "$ " not in r.stdout  # no command lines
    r = subprocess.run([sys.executable, "-m", "aiva.cli.main", "logs", sb.name, "--source",
                        "kernel"], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ))
    assert r.returncode != 0 and "syslog" in r.stderr and "Traceback" not in r.stderr

    # the file lives on the host: still there once the container has stopped
    sb.stop()
    assert f"aivatest: {word}" in syslog_texts(engine, sb.name)
    assert [x.text for x in engine.logs(sb.name, tail=1)]  # tail works across sources
