"""Sandboxes and their events in SQLite (WAL), safe for several aiva processes at once.

Every state change goes through :meth:`Store.transition`, which re-reads the row inside
an immediate (write-locked) transaction, checks the state machine and writes, so two
CLI processes racing on one sandbox cannot both win.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from aiva.errors import InvalidTransition, SandboxExists, SandboxNotFound
from aiva.guard.private import make_private_file
from aiva.models import Event, SandboxInfo, SandboxSpec, State, can_move, utcnow

SCHEMA = """
CREATE TABLE IF NOT EXISTS sandboxes (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL,
    error TEXT,
    spec TEXT NOT NULL,
    runtime TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts TEXT NOT NULL,
    sandbox_id TEXT,
    sandbox TEXT,
    kind TEXT NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_sandbox ON events (sandbox_id, id);
CREATE TABLE IF NOT EXISTS snapshots (
    sandbox_id TEXT NOT NULL,
    tag TEXT NOT NULL,
    created_at TEXT NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (sandbox_id, tag)
);
"""


class SqliteFile:
    """One SQLite file in WAL mode: a connection per thread, and write transactions that
    take the write lock up front (``BEGIN IMMEDIATE``), so two writers never both win a
    read-then-write race. The stores of aiva's parts share the state db through it."""

    def __init__(self, path: Path, schema: str) -> None:
        make_private_file(path)  # 0600: SQLite gives its -wal and -shm files the db's mode
        self.path = path
        self._local = threading.local()
        self._db.executescript(schema)

    @property
    def _db(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None,
                                 check_same_thread=False)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA busy_timeout=30000")
            self._local.db = db
        return db

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None


class Store(SqliteFile):
    def __init__(self, path: Path) -> None:
        super().__init__(path, SCHEMA)

    # ------------------------------------------------------------------ sandboxes

    @staticmethod
    def _row(row: sqlite3.Row) -> SandboxInfo:
        return SandboxInfo(
            id=row["id"],
            name=row["name"],
            state=State(row["state"]),
            error=row["error"],
            spec=SandboxSpec.model_validate_json(row["spec"]),
            runtime=json.loads(row["runtime"]),
            created_at=datetime.fromisoformat(row["created_at"]),
            updated_at=datetime.fromisoformat(row["updated_at"]),
        )

    def add(self, sb: SandboxInfo) -> SandboxInfo:
        try:
            with self._tx() as db:
                db.execute(
                    "INSERT INTO sandboxes VALUES (?,?,?,?,?,?,?,?)",
                    (sb.id, sb.name, sb.state.value, sb.error, sb.spec.model_dump_json(),
                     json.dumps(sb.runtime), sb.created_at.isoformat(),
                     sb.updated_at.isoformat()),
                )
        except sqlite3.IntegrityError as exc:
            raise SandboxExists(sb.name) from exc
        return sb

    def get(self, name: str) -> SandboxInfo:
        row = self._db.execute("SELECT * FROM sandboxes WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise SandboxNotFound(name)
        return self._row(row)

    def find(self, name: str) -> SandboxInfo | None:
        try:
            return self.get(name)
        except SandboxNotFound:
            return None

    def all(self) -> list[SandboxInfo]:
        rows = self._db.execute("SELECT * FROM sandboxes ORDER BY created_at").fetchall()
        return [self._row(r) for r in rows]

    def transition(
        self,
        name: str,
        to: State,
        *,
        expect: set[State] | frozenset[State] | None = None,
        error: str | None = None,
        runtime: dict[str, Any] | None = None,
        spec: SandboxSpec | None = None,
        action: str | None = None,
    ) -> SandboxInfo:
        """Move a sandbox to ``to`` if the state machine (and ``expect``) allow it."""

        def move(sb: SandboxInfo) -> None:
            if (expect is not None and sb.state not in expect) or (
                sb.state != to and not can_move(sb.state, to)
            ):
                raise InvalidTransition(name, sb.state.value, action or f"move to {to.value}")
            sb.state = to
            sb.error = error if to == State.ERROR else None

        return self._change(name, move, runtime=runtime, spec=spec)

    def update(self, name: str, *, runtime: dict[str, Any] | None = None,
               spec: SandboxSpec | None = None) -> SandboxInfo:
        return self._change(name, None, runtime=runtime, spec=spec)

    def _change(self, name: str, move: Callable[[SandboxInfo], None] | None, *,
                runtime: dict[str, Any] | None, spec: SandboxSpec | None) -> SandboxInfo:
        """Read, change and write one row inside a write-locked transaction."""
        with self._tx() as db:
            row = db.execute("SELECT * FROM sandboxes WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise SandboxNotFound(name)
            sb = self._row(row)
            if move is not None:
                move(sb)
            if runtime is not None:
                sb.runtime.update(runtime)
            if spec is not None:
                sb.spec = spec
            sb.updated_at = utcnow()
            db.execute(
                "UPDATE sandboxes SET state=?, error=?, runtime=?, spec=?, updated_at=? "
                "WHERE id=?",
                (sb.state.value, sb.error, json.dumps(sb.runtime), sb.spec.model_dump_json(),
                 sb.updated_at.isoformat(), sb.id),
            )
        return sb

    def remove(self, sandbox_id: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM sandboxes WHERE id = ?", (sandbox_id,))

    # ------------------------------------------------------------------ snapshots

    def add_snapshot(self, sb: SandboxInfo, tag: str, data: dict[str, Any]) -> dict[str, Any]:
        record = {"tag": tag, "sandbox": sb.name, "created_at": utcnow().isoformat(), **data}
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO snapshots VALUES (?,?,?,?)",
                       (sb.id, tag, record["created_at"], json.dumps(record)))
        return record

    def snapshots(self, sandbox_id: str) -> list[dict[str, Any]]:
        rows = self._db.execute(
            "SELECT data FROM snapshots WHERE sandbox_id = ? ORDER BY created_at",
            (sandbox_id,)).fetchall()
        return [json.loads(r["data"]) for r in rows]

    def remove_snapshots(self, sandbox_id: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM snapshots WHERE sandbox_id = ?", (sandbox_id,))

    # ------------------------------------------------------------------ events

    def record(self, kind: str, sb: SandboxInfo | None = None, **data: Any) -> Event:
        ev = Event(kind=kind, sandbox_id=sb.id if sb else None, sandbox=sb.name if sb else None,
                   data=data)
        cur = self._db.execute(
            "INSERT INTO events (ts, sandbox_id, sandbox, kind, data) VALUES (?,?,?,?,?)",
            (ev.ts.isoformat(), ev.sandbox_id, ev.sandbox, ev.kind, json.dumps(data)),
        )
        ev.id = cur.lastrowid
        return ev

    def events(self, *, sandbox_id: str | None = None, after: int = 0,
               limit: int | None = None) -> list[Event]:
        sql = "SELECT * FROM events WHERE id > ?"
        args: list[Any] = [after]
        if sandbox_id is not None:
            sql += " AND sandbox_id = ?"
            args.append(sandbox_id)
        sql += " ORDER BY id"
        if limit is not None:
            sql = f"SELECT * FROM ({sql.replace('ORDER BY id', 'ORDER BY id DESC')} LIMIT ?) " \
                  "ORDER BY id"
            args.append(limit)
        rows = self._db.execute(sql, args).fetchall()
        return [
            Event(id=r["id"], ts=datetime.fromisoformat(r["ts"]), sandbox_id=r["sandbox_id"],
                  sandbox=r["sandbox"], kind=r["kind"], data=json.loads(r["data"]))
            for r in rows
        ]

    def newest_event(self, sandbox_id: str, kinds: tuple[str, ...]) -> Event | None:
        """The sandbox's newest event of these kinds (one query on the sandbox index)."""
        row = self._db.execute(
            f"SELECT * FROM events WHERE sandbox_id = ? AND kind IN "
            f"({','.join('?' * len(kinds))}) ORDER BY id DESC LIMIT 1",
            (sandbox_id, *kinds)).fetchone()
        if row is None:
            return None
        return Event(id=row["id"], ts=datetime.fromisoformat(row["ts"]),
                     sandbox_id=row["sandbox_id"], sandbox=row["sandbox"], kind=row["kind"],
                     data=json.loads(row["data"]))

