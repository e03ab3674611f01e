"""``aiva task ...`` (the task queue) and ``aiva eval report`` (how tasks did).

The queue lives in this ``AIVA_HOME``'s state db, so these commands work on it directly,
with or without a daemon; the scheduler that runs queued tasks lives in the daemon.
See docs/TASKS.md.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from aiva.cli import output
from aiva.cli.output import Fmt, console, err_console
from aiva.errors import AivaError, InvalidValue, SandboxNotFound
from aiva.tasks.models import BudgetExceeded, Priority, Task, TaskState

task_app = typer.Typer(help="The task queue: commands run in warm sandboxes, with gates "
                            "and budgets (run by the daemon).", no_args_is_help=True)
eval_app = typer.Typer(help="How tasks did: success rate, durations, cost.",
                       no_args_is_help=True)

Format = Annotated[Fmt, typer.Option("--format", "-o", help="table, json or yaml")]
TaskId = Annotated[str, typer.Argument(help="the task's id (t-xxxxxxxx)")]

_STATE_STYLE = {"queued": "cyan", "running": "green", "awaiting_approval": "yellow",
                "succeeded": "green", "failed": "red", "rolled_back": "red",
                "cancelled": "dim"}


def _store() -> Any:
    from aiva.tasks.store import TaskStore

    return TaskStore()


def _engine() -> Any:
    from aiva.cli import main

    return main._engine()


def _dump(data: Any, fmt: Fmt) -> None:
    if fmt == Fmt.json:
        print(json.dumps(data, indent=2, default=str))
    else:
        print(yaml.safe_dump(data, sort_keys=False), end="")


def _daemon_running() -> bool:
    from aiva.daemon.wire import daemon_running

    try:
        return bool(daemon_running())
    except Exception:
        return False


def _ok(msg: str) -> None:
    """output.ok, but never wrapped: scripts read these lines."""
    err_console.print(f"[green]✓[/] {escape(msg)}", highlight=False, soft_wrap=True)


def _short(text: str, width: int = 48) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _state(task: Task) -> str:
    style = _STATE_STYLE.get(task.state.value, "")
    extra = f" ({task.decision})" if task.decision else ""
    return f"[{style}]{task.state.value}{extra}[/]"


# ---------------------------------------------------------------------- add


@task_app.command("add", context_settings={"allow_interspersed_args": False})
def add(
    command: Annotated[list[str] | None, typer.Argument(
        help="the command and its arguments")] = None,
    priority: Annotated[Priority, typer.Option(
        "--priority", "-p", help="critical, high, normal or low")] = Priority.normal,
    template: Annotated[str | None, typer.Option(
        "--template", "-t", help="the pool's template (default: tasks.default_template)")
    ] = None,
    image: Annotated[str | None, typer.Option("--image", help="any local image")] = None,
    workspace: Annotated[Path | None, typer.Option(
        "--workspace", help="a host directory: pushed to /workspace/task before, "
        "pulled back after success")] = None,
    gate: Annotated[str | None, typer.Option(
        "--gate", help="a shell command run after the task in its sandbox; exit 0 passes")
    ] = None,
    metrics_file: Annotated[str | None, typer.Option(
        "--metrics-file", help="a JSON file the task writes (relative to /workspace/task); "
        "a metric that regresses fails the task")] = None,
    approve: Annotated[bool, typer.Option(
        "--approve", help="hold the result for `aiva task approve|reject ID`")] = False,
    max_attempts: Annotated[int, typer.Option(
        "--max-attempts", help="attempts when the sandbox dies mid-run")] = 3,
    timeout: Annotated[float | None, typer.Option(
        "--timeout", help="seconds the command may run")] = None,
    name: Annotated[str | None, typer.Option(
        "--name", help="groups runs in `aiva eval report` (default: the command)")] = None,
) -> None:
    """Queue a command: aiva task add [OPTIONS] -- CMD ARGS... (prints the task's id)."""
    from aiva.config import load_config
    from aiva.tasks.budget import Budget

    argv = command[1:] if command and command[0] == "--" else command
    if not argv:
        raise InvalidValue("no command given", hint="aiva task add [OPTIONS] -- CMD ARGS...")
    if template and image:
        raise InvalidValue("give --template or --image, not both")
    if max_attempts < 1:
        raise InvalidValue(f"--max-attempts must be at least 1, not {max_attempts}")
    if timeout is not None and timeout <= 0:
        raise InvalidValue(f"--timeout must be positive, not {timeout:g}")
    ws = None
    if workspace is not None:
        if not workspace.is_dir():
            raise InvalidValue(f"--workspace {workspace} is not a directory")
        ws = str(workspace.resolve())
    task = Task(command=argv, priority=priority, template=template, image=image,
                workspace=ws, gate=gate, metrics_file=metrics_file, approve=approve,
                max_attempts=max_attempts, timeout=timeout, name=name)
    store = _store()
    try:
        ok, reason = Budget(load_config(), store).allow(task)
        if not ok:
            raise BudgetExceeded(
                f"not queued: {reason}",
                hint="raise tasks.daily_budget / tasks.task_budget in config.yaml, or wait "
                     "for the next (UTC) day")
        store.add(task)
    finally:
        store.close()
    print(task.id)
    if _daemon_running():
        _ok(f"queued {task.id} ({priority.value}); follow it with "
                  f"`aiva task show {task.id}`")
    else:
        _ok(f"queued {task.id} ({priority.value}); queued tasks run while the daemon "
                  "runs: `aiva daemon start`")


# ---------------------------------------------------------------------- read


@task_app.command("ls")
def ls_(
    state: Annotated[TaskState | None, typer.Option(
        "--state", "-s", help="only tasks in this state")] = None,
    fmt: Format = Fmt.table,
) -> None:
    """List tasks in queue order (priority, then oldest first)."""
    store = _store()
    try:
        tasks = store.list(state)
    finally:
        store.close()
    if fmt != Fmt.table:
        _dump([t.model_dump(mode="json") for t in tasks], fmt)
        return
    if not tasks:
        err_console.print("no tasks" + (f" {state.value}" if state else "")
                          + "; queue one with `aiva task add -- CMD ARGS...`", highlight=False)
        return
    named = any(t.name for t in tasks)  # a NAME column only when some task has one
    rows = [(t.id, t.priority.value, _state(t), f"{t.attempts}/{t.max_attempts}",
             f"{t.cost:.4g}", t.created_at.strftime("%m-%d %H:%M"),
             *((escape(t.name or "-"),) if named else ()),
             escape(shlex.join(t.command)), escape(t.sandbox or "-")) for t in tasks]
    table = Table(box=None, header_style="bold")
    heads = ("ID", "PRIORITY", "STATE", "TRIES", "COST", "CREATED", *(("NAME",) if named
             else ()), "COMMAND", "SANDBOX")
    for i, col in enumerate(heads):
        if col in ("NAME", "COMMAND", "SANDBOX"):  # these give way on a narrow screen
            table.add_column(col, no_wrap=True, overflow="ellipsis", min_width=7)
        else:
            width = max(len(col), *(len(Text.from_markup(r[i]).plain) for r in rows))
            table.add_column(col, no_wrap=True, min_width=width)
    for row in rows:
        table.add_row(*row)
    console.print(table)


@task_app.command("show")
def show(task_id: TaskId, fmt: Format = Fmt.table) -> None:
    """Everything about one task."""
    store = _store()
    try:
        task = store.get(task_id)
    finally:
        store.close()
    data = task.model_dump(mode="json")
    if fmt != Fmt.table:
        _dump(data, fmt)
        return
    table = Table(box=None, show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in data.items():
        if key == "state":
            text = _state(task)
        elif key == "command":
            text = escape(" ".join(value))
        elif key == "duration":
            continue
        else:
            text = escape("-" if value is None else str(value))
        table.add_row(key, text)
    if task.duration is not None:
        table.add_row("duration", f"{task.duration:.3f} s")
    kept = _kept_sandbox(task)
    if kept:
        table.add_row("kept sandbox", escape(kept))
    console.print(table)


def _kept_sandbox(task: Task) -> str | None:
    """After a gate's rollback the sandbox leaves the pool, stopped, with its pre-task
    snapshot: say which one and how to look inside."""
    if task.state != TaskState.rolled_back or not task.sandbox:
        return None
    try:
        if not _engine().exists(task.sandbox):
            return None
    except AivaError:
        return None
    return (f"{task.sandbox} (stopped, restored to snapshot pre-{task.id}): "
            f"`aiva start {task.sandbox}`, then `aiva exec {task.sandbox} -- sh`; "
            f"`aiva rm {task.sandbox} --volumes` when done")


@task_app.command("logs")
def logs(task_id: TaskId) -> None:
    """What the task printed: its command's output and exit code, and its gate's, kept
    with the task (also once its sandbox is reset or gone)."""
    from aiva.tasks.output import read_task_output

    store = _store()
    try:
        task = store.get(task_id)
    finally:
        store.close()
    kept = read_task_output(task.id)
    if kept is not None:
        for line in kept:
            output.log_line(_task_line(line))
        return
    if task.sandbox is None:
        err_console.print(f"task {task.id} has not run yet; its output shows here once it "
                          "runs" if task.state == TaskState.queued else
                          f"task {task.id} never ran ({task.state.value})", highlight=False)
        return
    try:  # a task run before outputs were kept with tasks: its sandbox's log
        lines = _engine().logs(task.sandbox)
    except SandboxNotFound:
        raise AivaError(f"task {task.id} kept no output, and its sandbox ({task.sandbox}) "
                        "is gone",
                        hint=f"its events remain: `aiva events --sandbox {task.sandbox}`"
                        ) from None
    # a pool sandbox runs many tasks: keep this task's stretch of its log
    start, end = task.started_at, task.finished_at
    mine = [ln for ln in lines
            if (start is None or ln.ts >= start) and (end is None or ln.ts <= end)]
    if not mine:
        err_console.print(f"no output from task {task.id} in {task.sandbox}'s log",
                          highlight=False)
    for line in mine:
        output.log_line(line)


def _task_line(line: Any) -> Any:
    """Gate lines shown like the command's: ``$ gate``, its output, ``exit N``."""
    source = {"gate": "cmd", "gate-stdout": "stdout", "gate-stderr": "stderr",
              "gate-exit": "exit"}.get(line.source, line.source)
    text = f"(gate) {line.text}" if line.source == "gate" else line.text
    return dataclasses.replace(line, source=source, text=text)


# ---------------------------------------------------------------------- change


@task_app.command("cancel")
def cancel(task_id: TaskId) -> None:
    """Cancel a queued, running or held task (a running one is stopped by its runner)."""
    store = _store()
    try:
        before = store.get(task_id)
        task = store.cancel(task_id)
    finally:
        store.close()
    if before.state == TaskState.running:
        _ok(f"cancelled {task.id}; the runner stops its command")
    else:
        _ok(f"cancelled {task.id} (it was {before.state.value})")


@task_app.command("approve")
def approve(task_id: TaskId) -> None:
    """Approve a task awaiting approval: the runner keeps its result."""
    store = _store()
    try:
        task = store.decide(task_id, "approve")
    finally:
        store.close()
    _ok(f"approved {task.id}; the runner pulls its results back"
              + ("" if _daemon_running() else " once the daemon runs (`aiva daemon start`)"))


@task_app.command("reject")
def reject(
    task_id: TaskId,
    reason: Annotated[str | None, typer.Option("--reason", help="why (kept as a lesson)")
                      ] = None,
) -> None:
    """Reject a task awaiting approval: the runner rolls its sandbox back."""
    store = _store()
    try:
        task = store.decide(task_id, "reject", reason)
    finally:
        store.close()
    _ok(f"rejected {task.id}; the runner rolls it back"
              + ("" if _daemon_running() else " once the daemon runs (`aiva daemon start`)"))


# ---------------------------------------------------------------------- JSONL


@task_app.command("import")
def import_(file: Annotated[str, typer.Argument(help="a JSONL file, or - for stdin")]) -> None:
    """Add tasks from JSON lines (one task per line, as `aiva task export` writes)."""
    if file == "-":
        text = sys.stdin.read()
    else:
        try:
            text = Path(file).read_text()
        except OSError as exc:
            raise InvalidValue(f"cannot read {file}: {exc.strerror}") from None
    store = _store()
    try:
        tasks = store.import_jsonl(text)
    finally:
        store.close()
    queued = sum(t.state == TaskState.queued for t in tasks)
    _ok(f"imported {len(tasks)} task{'s' if len(tasks) != 1 else ''} ({queued} queued)")


@task_app.command("export")
def export(file: Annotated[str | None, typer.Argument(
        help="write here instead of stdout")] = None) -> None:
    """Every task as JSON lines (re-read by `aiva task import`)."""
    store = _store()
    try:
        text = store.export_jsonl()
    finally:
        store.close()
    if file is None or file == "-":
        sys.stdout.write(text)
        return
    try:
        Path(file).write_text(text)
    except OSError as exc:
        raise InvalidValue(f"cannot write {file}: {exc.strerror}") from None
    _ok(f"exported {text.count(chr(10))} tasks to {file}")


# ---------------------------------------------------------------------- eval


@eval_app.command("report")
def report(
    by: Annotated[str, typer.Option("--by", help="task (its name or command) or template")
                  ] = "task",
    fmt: Format = Fmt.table,
) -> None:
    """Per kind of task or per template: runs, success rate, p50/p95 duration, cost."""
    from aiva.config import load_config
    from aiva.tasks import evaluator

    config = load_config()
    store = _store()
    try:
        rows = evaluator.report(store, by, default=config.tasks.default_template)
    finally:
        store.close()
    if fmt != Fmt.table:
        _dump(rows, fmt)
        return
    if not rows:
        err_console.print("no finished tasks yet", highlight=False)
        return
    cur = config.cost.currency
    table = Table(box=None, header_style="bold")
    for col in ("TASK" if by == "task" else "TEMPLATE", "RUNS", "SUCCESS", "P50", "P95",
                f"COST ({cur})", "PER SUCCESS"):
        table.add_column(col)

    def secs(v: float | None) -> str:
        return "-" if v is None else f"{v:.3g} s"

    for r in rows:
        table.add_row(escape(_short(r["key"])), str(r["count"]),
                      f"{100 * r['success_rate']:.0f}%", secs(r["p50_seconds"]),
                      secs(r["p95_seconds"]), f"{r['cost']:.4g}",
                      "-" if r["cost_per_success"] is None else f"{r['cost_per_success']:.4g}")
    console.print(table)
