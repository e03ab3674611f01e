"""``aiva task`` and ``aiva eval`` as a user runs them: separate processes, no Docker (the
queue is the state db; running tasks is the daemon's part, tests/integration/test_tasks.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from aiva.tasks.models import TaskState
from aiva.tasks.store import TaskStore

AIVA = [sys.executable, "-m", "aiva.cli.main"]


def aiva(*args: str, input: str | None = None, env: dict[str, str] | None = None
         ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*AIVA, *args], capture_output=True, text=True, timeout=60,
                          input=input, env={**os.environ, **(env or {})})


def clean_error(r: subprocess.CompletedProcess[str], code: int, text: str) -> None:
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    assert r.stderr.startswith("error:"), r.stderr
    assert text in r.stderr.splitlines()[0], r.stderr


@pytest.fixture
def added() -> Iterator[list[str]]:
    """Ids a test queues in the session's AIVA_HOME; cancelled afterwards, so no later
    test's daemon runs them."""
    ids: list[str] = []
    yield ids
    store = TaskStore()
    try:
        for task_id in ids:
            task = store.find(task_id)
            if task is not None and task.state in (TaskState.queued, TaskState.running,
                                                   TaskState.awaiting_approval):
                store.cancel(task_id)
    finally:
        store.close()


def add(added: list[str], *args: str) -> str:
    r = aiva("task", "add", *args)
    assert r.returncode == 0, r.stderr
    task_id = r.stdout.strip()
    assert task_id.startswith("t-") and len(task_id) == 10
    added.append(task_id)
    return task_id


def test_add_ls_show_cancel(added: list[str], tmp_path: Path) -> None:
    r = aiva("task", "add", "--", "echo", "hello world")
    assert r.returncode == 0 and "Traceback" not in r.stderr
    low = r.stdout.strip()
    added.append(low)
    assert "aiva daemon start" in r.stderr  # no daemon here: say where tasks run
    crit = add(added, "--priority", "critical", "--template", "python", "--gate", "true",
               "--workspace", str(tmp_path), "--approve", "--max-attempts", "2",
               "--timeout", "30", "--name", "cli-crit", "--", "python3", "-c", "print(1)")

    r = aiva("task", "ls", "--state", "queued", "--format", "json")
    assert r.returncode == 0, r.stderr
    mine = [t for t in json.loads(r.stdout) if t["id"] in (low, crit)]
    assert [t["id"] for t in mine] == [crit, low]  # critical first
    assert mine[0]["command"] == ["python3", "-c", "print(1)"]
    assert mine[1]["command"] == ["echo", "hello world"]

    r = aiva("task", "ls", env={"COLUMNS": "250"})
    assert r.returncode == 0 and crit in r.stdout and "critical" in r.stdout
    row = next(line for line in r.stdout.splitlines() if crit in line)
    assert "python3 -c 'print(1)'" in row and "cli-crit" in row  # the command, and the name
    assert "NAME" in r.stdout.splitlines()[0]

    r = aiva("task", "show", crit, "--format", "yaml")
    shown = yaml.safe_load(r.stdout)
    assert shown["priority"] == "critical" and shown["approve"] is True
    assert shown["workspace"] == str(tmp_path.resolve()) and shown["gate"] == "true"
    assert (shown["max_attempts"], shown["timeout"], shown["name"]) == (2, 30.0, "cli-crit")
    r = aiva("task", "show", crit)
    assert r.returncode == 0 and "queued" in r.stdout and "python3 -c print(1)" in r.stdout

    r = aiva("task", "logs", low)
    assert r.returncode == 0 and "has not run yet" in r.stderr

    r = aiva("task", "cancel", low)
    assert r.returncode == 0 and "cancelled" in r.stderr
    assert json.loads(aiva("task", "show", low, "-o", "json").stdout)["state"] == "cancelled"
    clean_error(aiva("task", "cancel", low), 1, f"cannot cancel task {low}: it is cancelled")
    clean_error(aiva("task", "approve", crit), 1, "cannot approve task")

    r = aiva("task", "ls", "--state", "cancelled", "-o", "json")
    assert low in [t["id"] for t in json.loads(r.stdout)]


def test_export_import_round_trip(added: list[str], tmp_path: Path) -> None:
    a = add(added, "-p", "low", "--", "sh", "-c", "echo 'quoted arg' > out.txt")
    b = add(added, "-p", "high", "--image", "aiva/python:latest", "--", "true")
    out = tmp_path / "tasks.jsonl"
    r = aiva("task", "export", str(out))
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert {a, b} <= {x["id"] for x in lines}
    r = aiva("task", "export")
    assert r.stdout == out.read_text()

    # into a fresh AIVA_HOME: the same tasks, and the same export
    home = {"AIVA_HOME": str(tmp_path / "home")}
    r = aiva("task", "import", str(out), env=home)
    assert r.returncode == 0, r.stderr
    assert f"imported {len(lines)} task" in r.stderr
    assert aiva("task", "export", env=home).stdout == out.read_text()
    # stdin works too, and a second import of the same ids is refused with the line
    clean_error(aiva("task", "import", "-", input=out.read_text(), env=home), 2,
                "line 1: a task")


def test_user_mistakes_are_one_line(added: list[str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"command": ["ok"]}\n\n{"command": ["x"], "priority": "urgent"}\n')
    r = aiva("task", "import", str(bad))
    clean_error(r, 2, "line 3: priority")
    assert "hint:" in r.stderr
    bad.write_text('{"command": ["ok"]}\nnot json\n')
    clean_error(aiva("task", "import", str(bad)), 2, "line 2: not valid JSON")
    clean_error(aiva("task", "import", str(tmp_path / "missing.jsonl")), 2, "cannot read")

    clean_error(aiva("task", "show", "t-00000000"), 1, "no task 't-00000000'")
    clean_error(aiva("task", "cancel", "t-00000000"), 1, "no task")
    clean_error(aiva("task", "add", "--"), 2, "no command given")
    clean_error(aiva("task", "add", "--template", "python", "--image", "x", "--", "true"), 2,
                "not both")
    clean_error(aiva("task", "add", "--workspace", str(tmp_path / "nope"), "--", "true"), 2,
                "is not a directory")
    clean_error(aiva("task", "add", "--max-attempts", "0", "--", "true"), 2,
                "--max-attempts")
    clean_error(aiva("eval", "report", "--by", "colour"), 2, "cannot report by 'colour'")
    r = aiva("task", "add", "--priority", "urgent", "--", "true")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "urgent" in r.stderr


def test_budget_refuses_add(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.yaml").write_text("tasks:\n  daily_budget: 0\n")
    env = {"AIVA_HOME": str(home)}
    r = aiva("task", "add", "--", "true", env=env)
    clean_error(r, 1, "not queued: the daily budget is spent")
    assert "hint:" in r.stderr
    assert aiva("task", "export", env=env).stdout == ""
    r = aiva("events", "-o", "json", env=env)
    assert [e["kind"] for e in json.loads(r.stdout)] == ["budget_refused"]
    (home / "config.yaml").write_text("tasks:\n  daily_budget: -1\n")
    clean_error(aiva("task", "add", "--", "true", env=env), 1, "tasks.daily_budget")


def test_eval_report(tmp_path: Path) -> None:
    home = {"AIVA_HOME": str(tmp_path / "home")}
    lines = []
    for i, state in enumerate(["succeeded", "failed", "succeeded"]):
        lines.append(json.dumps({
            "id": f"t-0000000{i}", "command": ["make"], "state": state, "cost": 0.5,
            "attempts": 1, "created_at": "2026-03-01T12:00:00Z",
            "started_at": "2026-03-01T12:00:00Z",
            "finished_at": f"2026-03-01T12:00:{10 * (i + 1)}Z"}))
    r = aiva("task", "import", "-", input="\n".join(lines), env=home)
    assert r.returncode == 0, r.stderr
    r = aiva("eval", "report", "--format", "json", env=home)
    (row,) = json.loads(r.stdout)
    assert row["key"] == "make" and row["count"] == 3 and row["success_rate"] == 0.6667
    assert (row["p50_seconds"], row["cost"], row["cost_per_success"]) == (20, 1.5, 0.75)
    r = aiva("eval", "report", "--by", "template", env=home)
    assert r.returncode == 0 and "python" in r.stdout and "67%" in r.stdout


@pytest.mark.docker
def test_logs_show_the_tasks_stretch_of_its_sandbox(make_sandbox: Any, added: list[str]
                                                    ) -> None:
    from aiva.models import utcnow
    from aiva.tasks.models import Task

    sb = make_sandbox()
    sb.commands.run(["echo", "before the task"])
    store = TaskStore()
    try:
        task = store.add(Task(command=["echo", "during the task"]))
        added.append(task.id)
        store.claim(task.id)
        store.update(task.id, sandbox=sb.name, started_at=utcnow())
        sb.commands.run(["echo", "during the task"])
        store.update(task.id, state=TaskState.succeeded, finished_at=utcnow())
        sb.commands.run(["echo", "after the task"])
    finally:
        store.close()
    r = aiva("task", "logs", task.id)
    assert r.returncode == 0, r.stderr
    assert "during the task" in r.stdout
    assert "before the task" not in r.stdout and "after the task" not in r.stdout
    sb.destroy()
    clean_error(aiva("task", "logs", task.id), 1, "is gone")
