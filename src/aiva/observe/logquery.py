"""One query over every log aiva has (seed 000 §5.2): command output, the engines' own
logs (container output, VM console), the guest's syslog and aiva's log file, filtered by
sandbox, source and time.

Each log stays where it is written; the query reads them and sorts by time, so there is
no second copy to keep in step. ``aiva.log`` is written through :func:`log_handler`,
whose UTC ISO stamps this module reads back.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from io import TextIOWrapper
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiva import paths
from aiva.errors import AivaError, InvalidValue
from aiva.guard.private import open_private
from aiva.models import SandboxInfo

if TYPE_CHECKING:
    from aiva.observe.collector import EngineLike

log = logging.getLogger("aiva.collector")

COMMAND_SOURCES = frozenset({"cmd", "stdout", "stderr", "exit", "cut"})
#: ``source=`` takes a group name or one line source.
GROUPS = {"commands": COMMAND_SOURCES, "engine": frozenset({"engine"}),
          "syslog": frozenset({"syslog"}), "aiva": frozenset({"aiva"})}
#: What an unknown ``source`` is told.
SOURCES_HINT = ("use commands, engine, syslog (the guest's) or aiva, or one of cmd, stdout, "
                "stderr, exit, cut")
_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d(?:[.,]\d+)?(?:Z|[+-]\d\d:?\d\d)?) ")


@dataclass(frozen=True)
class LogEntry:
    ts: datetime
    sandbox: str | None  # None: aiva's own log
    source: str  # cmd, stdout, stderr, exit, engine, syslog or aiva
    text: str

    def to_dict(self) -> dict[str, Any]:
        return {"ts": self.ts.isoformat(), "sandbox": self.sandbox, "source": self.source,
                "text": self.text}


def aiva_log_path() -> Path:
    return paths.aiva_log()


class _UTCFormatter(logging.Formatter):
    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return time.strftime(datefmt or "%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))


class _LazyFileHandler(logging.FileHandler):
    """Makes AIVA_HOME only when the first record arrives, not when the CLI starts; the
    file is born 0600 (AIVA_HOME is private)."""

    def _open(self) -> TextIOWrapper:
        fd = open_private(Path(self.baseFilename), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        return open(fd, "a", encoding=self.encoding, errors=self.errors)


def log_handler(path: Path | None = None, level: int = logging.INFO) -> logging.Handler:
    """Appends to ``AIVA_HOME/aiva.log`` in the form :func:`read_aiva_log` reads."""
    handler = _LazyFileHandler(path or aiva_log_path(), encoding="utf-8", delay=True)
    handler.setFormatter(_UTCFormatter(
        "%(asctime)s.%(msecs)03dZ %(levelname)s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S"))
    handler.setLevel(level)
    return handler


def read_aiva_log(path: Path | None = None) -> list[LogEntry]:
    """aiva.log's records; a line with no time stamp (a traceback) joins the one above.
    Stamps without a zone are taken as local time (``logging``'s default format)."""
    from aiva.observe.logs import read_tail_bytes  # it imports the backends

    data = read_tail_bytes(path or aiva_log_path())  # at most limits.log_read, the newest
    text = (data or b"").decode("utf-8", "replace")
    out: list[LogEntry] = []
    for line in text.splitlines():
        m = _STAMP.match(line)
        if m is None:
            if out:
                last = out[-1]
                out[-1] = LogEntry(last.ts, None, "aiva", f"{last.text}\n{line}")
            continue
        try:
            ts = _aware(datetime.fromisoformat(m[1].replace(",", ".")))
        except ValueError:
            continue
        out.append(LogEntry(ts, None, "aiva", line[m.end():]))
    return out


def line_sources(source: str | None) -> frozenset[str]:
    """The line sources that ``source`` (a group, one line source, or None: all) means."""
    if source is None:
        return frozenset().union(*GROUPS.values())
    if source in GROUPS:
        return GROUPS[source]
    if source in COMMAND_SOURCES:
        return frozenset({source})
    raise InvalidValue(f"unknown log source '{source}'", hint=SOURCES_HINT)


def _aware(ts: datetime) -> datetime:
    return ts.astimezone(UTC)  # a naive time is local time


def _when(value: datetime | float | None) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value if value is None else _aware(value)
    return datetime.fromtimestamp(value, UTC)


def _mentions(text: str, sb: SandboxInfo) -> bool:
    return re.search(rf"(?<![\w.-])({re.escape(sb.name)}|{sb.short_id})(?![\w.-])",
                     text) is not None


def query_logs(engine: EngineLike, sandbox: str | None = None, source: str | None = None,
               since: datetime | float | None = None, until: datetime | float | None = None,
               limit: int | None = None) -> list[LogEntry]:
    """Log lines of one sandbox (or all) and of aiva itself, oldest first; ``limit``
    keeps the newest. With ``sandbox``, aiva.log lines count only if they name it."""
    wanted, lo, hi = line_sources(source), _when(since), _when(until)
    boxes = [engine.get(sandbox)] if sandbox else engine.list_all(reconcile=False)
    entries: list[LogEntry] = []
    if wanted - GROUPS["aiva"]:
        for sb in boxes:
            try:
                lines = engine.logs(sb.name)
            except AivaError as exc:
                if sandbox:
                    raise
                log.warning("cannot read the logs of %s: %s", sb.name, exc)
                continue
            entries += [LogEntry(_aware(x.ts), sb.name, x.source, x.text) for x in lines]
    if "aiva" in wanted:
        entries += [e for e in read_aiva_log()
                    if sandbox is None or _mentions(e.text, boxes[0])]
    keep = [e for e in entries if e.source in wanted and (lo is None or e.ts >= lo)
            and (hi is None or e.ts <= hi)]
    keep.sort(key=lambda e: e.ts)  # stable: lines of one instant keep their order
    return keep[-limit:] if limit else keep
