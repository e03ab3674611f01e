"""How the CLI shows things: tables for people, JSON/YAML for programs."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import StrEnum
from typing import Any

import yaml
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
from rich.status import Status
from rich.table import Table

from aiva.backends.base import LogLine
from aiva.config import format_size
from aiva.models import SandboxInfo
from aiva.network import egress
from aiva.observe.metrics import SandboxMetrics

console = Console()
err_console = Console(stderr=True)

_STATE_STYLE = {"running": "green", "paused": "yellow", "stopped": "dim", "error": "red",
                "creating": "cyan", "stopping": "cyan"}


class Fmt(StrEnum):
    table = "table"
    json = "json"
    yaml = "yaml"


#: -p of start, init and deploy (no square brackets: help text is rich markup)
PORT_HELP = ("HOST:GUEST or IP:HOST:GUEST (/udp at the end for UDP); GUEST alone takes a "
             "free host port, which `aiva status` shows. Binds 127.0.0.1 unless an IP is "
             "given")

def ok(msg: str) -> None:
    err_console.print(f"[green]✓[/] {escape(msg)}", highlight=False)


def warning(msg: str) -> None:
    """Plain text on stderr, like :func:`error`: something legal the user should know."""
    sys.stderr.write(f"warning: {msg}\n")
    sys.stderr.flush()


def error(msg: str, hint: str | None = None) -> None:
    """Plain text on purpose: scripts and tests read it, and messages may hold brackets."""
    sys.stderr.write(f"error: {msg}\n")
    if hint:
        sys.stderr.write(f"hint: {hint}\n")
    sys.stderr.flush()


def size(n: int) -> str:
    return format_size(n)


def value(v: Any) -> None:
    if isinstance(v, dict | list):
        print(json.dumps(v, indent=2))
    else:
        print("" if v is None else v)


def _dump(data: Any, fmt: Fmt) -> None:
    if fmt == Fmt.json:
        print(json.dumps(data, indent=2, default=str))
    else:
        print(yaml.safe_dump(data, sort_keys=False), end="")


def _record(sb: SandboxInfo) -> dict[str, Any]:
    return sb.model_dump(mode="json")


def cpus_text(cpus: float) -> str:
    """What the CPU limit really is: a share of the host, or none (all of its CPUs)."""
    import os

    host = os.cpu_count() or 1
    return f"all {host} (no limit)" if cpus >= host else f"{cpus:g}"


def sandboxes(boxes: list[SandboxInfo], fmt: Fmt) -> None:
    if fmt != Fmt.table:
        _dump([_record(sb) for sb in boxes], fmt)
        return
    if not boxes:
        err_console.print("no sandboxes; create one with `aiva start NAME`")
        return
    table = Table(box=None, header_style="bold")
    for col in ("NAME", "STATE", "BACKEND", "IMAGE", "CPUS", "MEMORY", "PORTS", "CREATED"):
        table.add_column(col)
    for sb in boxes:
        style = _STATE_STYLE.get(sb.state.value, "")
        state = escape(sb.state.value + (f" ({sb.error})" if sb.error else ""))
        table.add_row(sb.name, f"[{style}]{state}[/]", _backend(sb), escape(sb.spec.image),
                      cpus_text(sb.spec.cpus), format_size(sb.spec.memory),
                      ", ".join(sb.runtime.get("ports") or []) or "-",
                      sb.created_at.strftime("%Y-%m-%d %H:%M"))
    console.print(table)


def leftovers(items: list[Any], fmt: Fmt, *, empty: str) -> None:
    """What `aiva prune` and `aiva volume ls` found."""
    if fmt != Fmt.table:
        _dump([x.to_dict() for x in items], fmt)
        return
    if not items:
        err_console.print(empty, highlight=False)
        return
    table = Table(box=None, header_style="bold")
    for col in ("KIND", "NAME", "SANDBOX", "SIZE"):
        table.add_column(col, overflow="fold")
    for x in items:
        table.add_row(x.kind, escape(x.name), escape(x.sandbox or (x.sandbox_id or "-")[:12]),
                      format_size(x.size) if x.size is not None else "-")
    console.print(table)


_RUNTIME_NOTE = {"runc": "runc (the host's kernel)",
                 "gvisor": "gvisor (runsc: gVisor's kernel between it and the host's)"}


def _backend(sb: SandboxInfo) -> str:
    """The BACKEND column: docker+gvisor for a container under gVisor."""
    return sb.spec.backend + ("+gvisor" if sb.spec.runtime == "gvisor" else "")


def sandbox(sb: SandboxInfo, fmt: Fmt, metrics: SandboxMetrics | None = None) -> None:
    if fmt != Fmt.table:
        _dump(_record(sb) | ({"metrics": metrics.to_dict()} if metrics else {}), fmt)
        return
    table = Table(box=None, show_header=False)
    table.add_column(style="bold")
    table.add_column()
    style = _STATE_STYLE.get(sb.state.value, "")
    rows = [
        ("name", sb.name), ("id", sb.id), ("state", f"[{style}]{sb.state.value}[/]"),
        ("error", escape(sb.error or "-")), ("backend", sb.spec.backend),
        *([("runtime", _RUNTIME_NOTE[sb.spec.runtime])] if sb.spec.backend == "docker" else []),
        ("image", escape(sb.spec.image)),
        ("profile", sb.spec.profile), ("cpus", cpus_text(sb.spec.cpus)),
        ("memory", format_size(sb.spec.memory)),
        ("disk", _disk(sb)),
        ("workdir", sb.spec.workdir),
        ("ports", ", ".join(sb.runtime.get("ports") or []) or "-"),
        ("network", escape(sb.spec.network if "egress" not in sb.runtime else
                           "allow " + egress.describe(sb.runtime["egress"]))),
        ("mounts", escape(", ".join(f"{m.host_path} -> {m.guest_path}"
                                    + (" (ro)" if m.read_only else "")
                                    for m in sb.spec.mounts) or "-")),
        ("env", escape(", ".join(f"{k}={v}" for k, v in sb.spec.env.items()) or "-")),
        ("labels", escape(", ".join(f"{k}={v}" for k, v in sb.spec.labels.items()) or "-")),
        ("created", sb.created_at.isoformat(timespec="seconds")),
        ("updated", sb.updated_at.isoformat(timespec="seconds")),
    ]
    if sb.runtime.get("accel"):
        rows.append(("accel", f"{sb.runtime['accel']} (boot {sb.runtime.get('boot_seconds')} s)"))
    if metrics is not None:
        rows += _metric_rows(metrics)
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)


def snapshots(items: list[dict[str, Any]], fmt: Fmt) -> None:
    if fmt != Fmt.table:
        _dump(items, fmt)
        return
    table = Table(box=None, header_style="bold")
    for col in ("TAG", "CONTENT", "CREATED"):
        table.add_column(col)
    for snap in items:
        table.add_row(snap["tag"], "disk + memory" if snap.get("memory") else "disk",
                      snap["created_at"][:19])
    console.print(table)


def _metric_rows(m: SandboxMetrics) -> list[tuple[str, str]]:
    mem, src, fs = m.memory, m.source, format_size
    return [
        ("cpu now", f"{m.cpu_percent:.1f}% of {m.cpus:g} CPU  [dim]({src.get('cpu')})[/]"),
        ("mem used", f"{fs(mem['used'])} of {fs(mem['total'])}, {fs(mem['available'])} "
                     f"available, {fs(mem['cache'])} cache  [dim]({src.get('memory')})[/]"),
        ("disk io", f"{fs(m.disk['read_bytes'])} read, {fs(m.disk['write_bytes'])} written"
                    f"  [dim]({src.get('disk')})[/]"),
        ("net io", f"{fs(m.net['rx_bytes'])} in, {fs(m.net['tx_bytes'])} out"
                   f"  [dim]({src.get('net')})[/]"),
        ("uptime", f"{m.uptime:.0f} s  [dim]({src.get('uptime')})[/]"),
    ]


def image_table(items: list[Any], fmt: Fmt) -> None:
    if fmt != Fmt.table:
        _dump([{"tag": i.tag, "id": i.id, "size": i.size, "template": i.template,
                "created": str(i.created)} for i in items], fmt)
        return
    table = Table(box=None, header_style="bold")
    for col in ("TAG", "ID", "TEMPLATE", "SIZE", "CREATED"):
        table.add_column(col)
    for i in items:
        table.add_row(i.tag, i.id, i.template or "-", format_size(i.size), str(i.created)[:19])
    console.print(table)


def sync_report(report: Any, fmt: Fmt) -> None:
    if fmt != Fmt.table:
        _dump(report.to_dict(), fmt)
        return
    err_console.print(escape(report.summary()), highlight=False, soft_wrap=True)
    for line in report.crossings():
        err_console.print(f"  {escape(line)}", highlight=False, soft_wrap=True)
    for path in report.conflicts:
        err_console.print(f"[yellow]conflict:[/] {path} changed on both sides; kept both "
                          "(use --prefer local|remote|newer)", highlight=False)


def log_line(line: LogLine) -> None:
    stream = sys.stderr if line.source == "stderr" else sys.stdout
    stamp = line.ts.strftime("%H:%M:%S.%f")[:-3]
    if line.source == "cmd":
        text = f"{stamp} $ {line.text}\n"
    elif line.source == "exit":
        text = f"{stamp} exit {line.text}\n"
    elif line.source in ("engine", "syslog", "aiva"):
        text = f"{stamp} [{line.source}] {line.text}\n"
    else:
        text = f"{stamp} {line.text}" + ("" if line.text.endswith("\n") else "\n")
    stream.write(text)
    stream.flush()


@contextmanager
def status(text: str) -> Iterator[Status | LineStatus]:
    """A spinner on a terminal; elsewhere (a pipe, a CI log) each step as a line, so long
    work is never silent there either."""
    if not err_console.is_terminal:
        yield LineStatus(err_console)
        return
    with err_console.status(text) as st:
        yield st


class LineStatus:
    """``Status.update`` for a console that is not a terminal: one line per step, at most
    two a second (a chatty step, such as mmdebstrap's output, is thinned out)."""

    MIN_GAP = 0.5

    def __init__(self, console: Console) -> None:
        self.console = console
        self.last = 0.0
        self.shown = ""

    def update(self, text: str) -> None:
        import time

        now = time.monotonic()
        if text == self.shown or now - self.last < self.MIN_GAP:
            return
        self.last, self.shown = now, text
        self.console.print(f"… {escape(text)}", highlight=False, soft_wrap=True)


@contextmanager
def transfer_progress() -> Iterator[Callable[[str, int, int], None]]:
    """A progress bar on a terminal; elsewhere thinned lines (no bar, no stray newline)."""
    if not err_console.is_terminal:
        lines = LineStatus(err_console)
        yield lambda phase, done, total: lines.update(
            f"{phase}: {size(done)}" + (f" of {size(total)}" if total else ""))
        return
    progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                        TransferSpeedColumn(), console=err_console, transient=True)
    task = progress.add_task("sync", total=None)

    def update(phase: str, done: int, total: int) -> None:
        progress.update(task, description=phase, completed=done, total=total or None)

    with progress:
        yield update


def _disk(sb: SandboxInfo) -> str:
    """The limit; on Docker, whether it holds (a sandbox with a volume has no limit)."""
    limit = format_size(sb.spec.disk)
    if sb.spec.backend != "docker":
        return limit
    if "volume" in sb.runtime and "disk" not in sb.runtime:
        return f"{limit} (not enforced: writable root; enforce_docker_disk was off)"
    return f"{limit}{_disk_used(sb.id)} (enforced: its own ext4 disk, read-only root)"


def _disk_used(sandbox_id: str) -> str:
    """", N used" while the disk is mounted on this host (after a reboot it may not be)."""
    import os

    from aiva.backends import docker_disk
    from aiva.errors import AivaError

    try:
        if not docker_disk.is_mounted(sandbox_id):
            return ""
        st = os.statvfs(docker_disk.mount_point(sandbox_id))
    except (OSError, AivaError):
        return ""
    return f", {format_size((st.f_blocks - st.f_bfree) * st.f_frsize)} used"
