"""The DataCollector without Docker: a real Store in a tmp dir, events put in with chosen
times, and a fake engine whose metrics and logs the test decides."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import typer
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from aiva.backends.base import LogLine
from aiva.cli import observe_cmd, observe_output
from aiva.engine.store import Store
from aiva.errors import AivaError, InvalidValue, SandboxNotFound
from aiva.models import Event, SandboxInfo, SandboxSpec, State
from aiva.observe import collector, prometheus
from aiva.observe.collector import Collector, Price
from aiva.observe.metrics import SandboxMetrics

GiB = 1 << 30
T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def _spec(backend: str = "docker", cpus: float = 2, memory: int = 4 * GiB) -> SandboxSpec:
    return SandboxSpec(backend=backend, image="img", cpus=cpus, memory=memory, disk=GiB)


def _figures(cpu: float = 12.5, used: int = 100, total: int = 1000) -> SandboxMetrics:
    return SandboxMetrics(cpu_percent=cpu, cpus=2, memory={"total": total, "used": used,
                                                          "available": 0, "cache": 0},
                          disk={"read_bytes": 11, "write_bytes": 22},
                          net={"rx_bytes": 33, "tx_bytes": 44}, uptime=55.0)


class FakeEngine:
    """Engine-shaped: a real Store; metrics and logs from dicts (an exception raises)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.config = SimpleNamespace(cost=SimpleNamespace(
            currency="EUR", docker=SimpleNamespace(cpu_hour=0.36, gb_hour=0.09)))
        self.figures: dict[str, Any] = {}
        self.lines: dict[str, Any] = {}

    def list_all(self, *, reconcile: bool = True) -> list[SandboxInfo]:
        return self.store.all()

    def get(self, name: str) -> SandboxInfo:
        return self.store.get(name)

    def reconcile(self, sb: SandboxInfo) -> SandboxInfo:
        return sb

    def metrics(self, name: str) -> SandboxMetrics:
        got = self.figures[name]
        if isinstance(got, BaseException):
            raise got
        if isinstance(got, threading.Event):  # hangs until the test lets it go
            got.wait(10)
            return _figures()
        return got  # type: ignore[no-any-return]

    def logs(self, name: str, *, tail: int | None = None) -> list[LogLine]:
        got = self.lines[name]
        if isinstance(got, BaseException):
            raise got
        return got  # type: ignore[no-any-return]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "state.db")
    yield s
    s.close()


def _box(store: Store, name: str, state: State = State.RUNNING, **kw: Any) -> SandboxInfo:
    return store.add(SandboxInfo(name=name, spec=_spec(**kw), state=state))


def _event(store: Store, kind: str, sb: SandboxInfo | None, at: float, **data: Any) -> Event:
    """Record an event ``at`` seconds after T0 (store.record stamps it now)."""
    ev = store.record(kind, sb, **data)
    ev.ts = T0 + timedelta(seconds=at)
    with sqlite3.connect(store.path) as db:
        db.execute("UPDATE events SET ts = ? WHERE id = ?", (ev.ts.isoformat(), ev.id))
    return ev


def _ev(kind: str, at: float, i: int, **data: Any) -> Event:
    return Event(id=i, kind=kind, ts=T0 + timedelta(seconds=at), data=data)


# --------------------------------------------------------------------------- cost


def test_running_time_counts_only_running_stretches_across_pause_and_resume() -> None:
    sb = SandboxInfo(name="a", spec=_spec(), state=State.STOPPED)
    evs = [_ev("created", 0, 1), _ev("started", 10, 2), _ev("command", 20, 3, exit_code=0),
           _ev("paused", 70, 4), _ev("stopped", 80, 5),  # a close while closed: no-op
           _ev("resumed", 100, 6), _ev("started", 110, 7),  # an open while open: no-op
           _ev("stopped", 160, 8)]
    assert collector.running_seconds(sb, reversed(evs)) == 120  # sorted by id, not given order
    price = Price(cpu_hour=0.36, gb_hour=0.09)  # 2 CPUs, 4 GiB: 1.08 an hour
    assert collector.cost_of(sb, evs, price) == pytest.approx(120 / 3600 * 1.08)
    assert collector.cost_of(sb, evs, Price()) == 0


def test_an_open_stretch_ends_now_if_running_else_at_the_last_change() -> None:
    evs = [_ev("started", 0, 1)]
    running = SandboxInfo(name="a", spec=_spec(), state=State.RUNNING)
    assert collector.running_seconds(running, evs, now=T0 + timedelta(hours=1)) == 3600
    gone = SandboxInfo(name="a", spec=_spec(), state=State.STOPPED,
                       updated_at=T0 + timedelta(seconds=600))
    assert collector.running_seconds(gone, evs, now=T0 + timedelta(hours=1)) == 600


def test_reconciled_events_open_and_close_by_their_state() -> None:
    sb = SandboxInfo(name="a", spec=_spec(), state=State.STOPPED)
    evs = [_ev("started", 0, 1), _ev("reconciled", 30, 2, state="stopped"),
           _ev("reconciled", 100, 3, state="running"), _ev("error", 150, 4, state="error")]
    assert collector.running_seconds(sb, evs) == 80


def test_price_for_reads_the_config_and_defaults_to_free() -> None:
    cfg = SimpleNamespace(cost=SimpleNamespace(qemu=SimpleNamespace(cpu_hour=1, gb_hour=2)))
    assert collector.price_for("qemu", cfg) == Price(1.0, 2.0)
    assert collector.price_for("docker", cfg) == Price()
    assert collector.price_for("qemu", SimpleNamespace()) == Price()


def test_costs_per_sandbox_from_the_stored_events(store: Store) -> None:
    a = _box(store, "a", State.STOPPED)
    b = _box(store, "b", State.STOPPED, backend="qemu")
    for kind, at in (("started", 0), ("paused", 1800), ("resumed", 2400), ("stopped", 4200)):
        _event(store, kind, a, at)
    _event(store, "command", a, 100, exit_code=0, cmd=["true"])
    _event(store, "started", b, 0)
    _event(store, "stopped", b, 60)
    rows = {r["sandbox"]: r for r in collector.costs(FakeEngine(store))}
    assert rows["a"]["running_seconds"] == 3600
    assert rows["a"]["cost"] == pytest.approx(1.08) and rows["a"]["currency"] == "EUR"
    assert rows["b"]["running_seconds"] == 60 and rows["b"]["cost"] == 0  # no qemu price
    assert rows["b"]["backend"] == "qemu" and rows["a"]["id"] == a.id


# --------------------------------------------------------------------------- metrics


def test_sample_all_stores_running_sandboxes_and_skips_the_ones_that_fail(
        store: Store, caplog: pytest.LogCaptureFixture) -> None:
    eng = FakeEngine(store)
    ok = _box(store, "ok")
    _box(store, "broken")
    _box(store, "crashy")
    _box(store, "off", State.STOPPED)
    eng.figures = {"ok": _figures(), "broken": AivaError("no agent"),
                   "crashy": RuntimeError("bug"), "off": _figures()}
    coll = Collector(store)
    with caplog.at_level(logging.WARNING, "aiva.collector"):
        assert coll.sample_all(eng) == 1
    assert "broken" in caplog.text and "crashy" in caplog.text
    [row] = coll.history(ok.id)
    assert row | {"ts": 0} == {"ts": 0, "sandbox_id": ok.id, "cpu_percent": 12.5,
                               "mem_used": 100, "mem_total": 1000, "disk_read": 11,
                               "disk_write": 22, "net_rx": 33, "net_tx": 44, "uptime": 55.0}
    assert abs(row["ts"] - time.time()) < 60


def test_a_sandbox_that_hangs_is_skipped_at_the_deadline(store: Store) -> None:
    eng = FakeEngine(store)
    boxes = [_box(store, "fast"), _box(store, "stuck")]
    release = threading.Event()
    eng.figures = {"fast": _figures(), "stuck": release}
    coll = Collector(store)
    began = time.monotonic()
    got = coll.sample(eng, boxes, timeout=0.3)
    release.set()
    assert set(got) == {boxes[0].id} and time.monotonic() - began < 5
    assert coll.history(boxes[1].id) == []


def test_history_since_limit_latest_and_prune(store: Store) -> None:
    coll = Collector(store.path)
    now = time.time()
    for age in (7200, 3600, 60, 10):
        coll.sample(_Const(_figures(cpu=age, used=age), now - age), [_fake_box("x")])
    assert [r["cpu_percent"] for r in coll.history("x")] == [7200, 3600, 60, 10]
    assert [r["cpu_percent"] for r in coll.history("x", since=now - 120)] == [60, 10]
    assert [r["cpu_percent"] for r in coll.history("x", limit=3)] == [3600, 60, 10]
    assert coll.latest(30)["x"]["cpu_percent"] == 10
    assert coll.latest(5) == {}
    assert coll.prune(1800) == 2
    assert [r["cpu_percent"] for r in coll.history("x")] == [60, 10]


class _Const:
    def __init__(self, m: SandboxMetrics, at: float) -> None:
        m.sampled_at = at
        self.m = m

    def metrics(self, name: str) -> SandboxMetrics:
        return self.m


def _fake_box(sid: str) -> SandboxInfo:
    return SandboxInfo(id=sid, name=sid, spec=_spec(), state=State.RUNNING)


def test_run_sampler_samples_every_interval_and_stops_at_once(store: Store) -> None:
    eng = FakeEngine(store)
    sb = _box(store, "a")
    eng.figures = {"a": _figures()}
    old = Collector(store)
    old.sample(_Const(_figures(cpu=99), time.time() - 3600), [sb])

    async def main() -> float:
        stop = asyncio.Event()
        task = asyncio.create_task(collector.run_sampler(eng, 0.05, 600, stop))
        await asyncio.sleep(0.6)
        stop.set()
        began = time.monotonic()
        await asyncio.wait_for(task, 2)
        return time.monotonic() - began

    assert asyncio.run(main()) < 0.5
    rows = old.history(sb.id)
    assert len(rows) >= 3 and 99 not in [r["cpu_percent"] for r in rows]  # pruned


# --------------------------------------------------------------------------- events


def test_export_jsonl_writes_events_that_read_back(store: Store) -> None:
    a, b = _box(store, "a"), _box(store, "b")
    first = store.record("created", a, image="img")
    store.record("started", b)
    store.record("command", a, cmd=["true"], exit_code=0)
    out = io.StringIO()
    assert collector.export_jsonl(store, out) == 3
    back = [Event.model_validate_json(line) for line in out.getvalue().splitlines()]
    assert [(e.kind, e.sandbox) for e in back] == [("created", "a"), ("started", "b"),
                                                   ("command", "a")]
    assert back[0].data == {"image": "img"} and back[0].id == first.id
    out = io.StringIO()
    assert collector.export_jsonl(store, out, sandbox_id=a.id, after=first.id or 0) == 1
    assert json.loads(out.getvalue())["kind"] == "command"


class _Spy:
    """A store that says when the follower has looked up where "now" is."""

    def __init__(self, store: Store) -> None:
        self.store, self.ready = store, threading.Event()

    def events(self, *, sandbox_id: str | None = None, after: int = 0,
               limit: int | None = None) -> list[Event]:
        got = self.store.events(sandbox_id=sandbox_id, after=after, limit=limit)
        if limit == 1:
            self.ready.set()
        return got


def test_follow_events_sees_new_events_from_another_connection(store: Store) -> None:
    a, b = _box(store, "a"), _box(store, "b")
    store.record("created", a)  # before following: not shown
    reader = Store(store.path)  # as another process would: its own connection
    spy, seen = _Spy(reader), []

    def follow() -> None:
        for ev in collector.follow_events(spy, sandbox_id=a.id, poll=0.01):
            seen.append(ev)
            if len(seen) == 2:
                return

    t = threading.Thread(target=follow, daemon=True)
    t.start()
    assert spy.ready.wait(5)
    store.record("started", a)
    store.record("started", b)  # another sandbox: filtered out
    store.record("command", a, exit_code=0)
    t.join(5)
    assert not t.is_alive(), "follow_events did not deliver within the deadline"
    assert [e.kind for e in seen] == ["started", "command"]
    assert all(e.sandbox_id == a.id for e in seen)
    reader.close()


# --------------------------------------------------------------------------- logs


def test_query_logs_merges_commands_engine_and_aiva_log(
        store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIVA_HOME", str(tmp_path))
    eng = FakeEngine(store)
    _box(store, "a")
    b = _box(store, "b")

    def t(seconds: float) -> datetime:
        return T0 + timedelta(seconds=seconds)

    eng.lines = {
        "a": [LogLine(t(1), "cmd", "echo hi"), LogLine(t(2), "stdout", "hi\n"),
              LogLine(t(3), "exit", "0"), LogLine(t(5), "engine", "booted")],
        "b": [LogLine(t(4), "stderr", "oops\n")],
    }
    logger = logging.getLogger("aiva.test_collector")
    handler = collector.log_handler()
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("sandbox a (%s) started", "x")
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("sandbox %s failed", b.name)
    finally:
        logger.removeHandler(handler)
        handler.close()
    with collector.aiva_log_path().open("a") as f:  # the daemon's default format: local time
        f.write(f"{(T0 + timedelta(seconds=6)).astimezone().strftime('%Y-%m-%d %H:%M:%S')},5"
                " INFO aiva.daemon: listening\n")

    everything = collector.query_logs(eng)
    assert [(e.sandbox, e.source) for e in everything[:6]] == [
        ("a", "cmd"), ("a", "stdout"), ("a", "exit"), ("b", "stderr"), ("a", "engine"),
        (None, "aiva")]
    assert everything[5].text == "INFO aiva.daemon: listening"
    aiva = collector.query_logs(eng, source="aiva")
    assert [e.text.split(":")[0] for e in aiva] == [
        "INFO aiva.daemon", "WARNING aiva.test_collector", "ERROR aiva.test_collector"]
    assert "Traceback" in aiva[-1].text and "ValueError: boom" in aiva[-1].text
    assert abs((aiva[-1].ts - datetime.now(UTC)).total_seconds()) < 60

    only_b = collector.query_logs(eng, sandbox="b")
    assert [e.source for e in only_b] == ["stderr", "aiva"]  # the aiva line naming b
    assert [e.text for e in collector.query_logs(eng, source="commands", since=t(2),
                                                 until=t(4))] == ["hi\n", "0", "oops\n"]
    assert [e.text for e in collector.query_logs(eng, source="stdout")] == ["hi\n"]
    assert [e.source for e in collector.query_logs(eng, source="commands", limit=2)] == [
        "exit", "stderr"]
    assert collector.query_logs(eng, source="engine", since=T0.timestamp() + 4.5)[0].text \
        == "booted"
    with pytest.raises(InvalidValue, match="unknown log source"):
        collector.query_logs(eng, source="kernel")
    eng.lines["b"] = AivaError("docker is down")
    assert {e.sandbox for e in collector.query_logs(eng, source="commands")} == {"a"}
    with pytest.raises(AivaError, match="docker is down"):
        collector.query_logs(eng, sandbox="b")
    with pytest.raises(SandboxNotFound):
        collector.query_logs(eng, sandbox="nope")


# --------------------------------------------------------------------------- prometheus


def test_prometheus_text_has_every_figure(store: Store) -> None:
    eng = FakeEngine(store)
    a = _box(store, "a")
    b = _box(store, "b")
    _box(store, "c", State.STOPPED)
    gone = _box(store, "gone")
    eng.figures = {"b": _figures(cpu=50, used=7 * GiB)}  # measured live: no fresh sample
    coll = Collector(store)
    coll.sample(_Const(_figures(), time.time() - 2), [a])
    for code in (0, 0, 1):
        store.record("command", a, cmd=["x"], exit_code=code)
    store.record("command", a, cmd=["x"], background=True, pid=7)
    store.record("command", gone, cmd=["x"], exit_code=0)
    store.remove(gone.id)
    _event(store, "started", a, 0)
    now = T0 + timedelta(hours=2)

    text = prometheus.render(eng, collector=coll, now=now).decode()
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value
           for fam in text_string_to_metric_families(text) for s in fam.samples}

    def val(name: str, **labels: str) -> float:
        return got[(name, tuple(sorted(labels.items())))]

    assert val("aiva_sandboxes", state="running", backend="docker") == 2
    assert val("aiva_sandboxes", state="stopped", backend="docker") == 1
    assert val("aiva_sandboxes", state="paused", backend="docker") == 0
    assert val("aiva_sandbox_cpu_percent", sandbox="a") == 12.5
    assert val("aiva_sandbox_cpu_percent", sandbox="b") == 50
    assert val("aiva_sandbox_memory_used_bytes", sandbox="b") == 7 * GiB
    assert val("aiva_sandbox_disk_read_bytes_total", sandbox="a") == 11
    assert val("aiva_sandbox_disk_write_bytes_total", sandbox="a") == 22
    assert val("aiva_sandbox_net_rx_bytes_total", sandbox="a") == 33
    assert val("aiva_sandbox_net_tx_bytes_total", sandbox="a") == 44
    assert val("aiva_sandbox_uptime_seconds", sandbox="a") == 55
    assert val("aiva_commands_total", sandbox="a", exit="0") == 2
    assert val("aiva_commands_total", sandbox="a", exit="1") == 1
    assert val("aiva_commands_total", sandbox="a", exit="background") == 1
    assert not [k for k in got if ("sandbox", "gone") in k[1]]
    assert val("aiva_sandbox_cost_total", sandbox="a", currency="EUR") == pytest.approx(2.16)
    assert ("aiva_sandbox_cpu_percent", (("sandbox", "c"),)) not in got
    assert coll.latest(30).keys() == {a.id, b.id}  # the live measurement was stored


# --------------------------------------------------------------------------- CLI


@pytest.fixture
def cli(store: Store, monkeypatch: pytest.MonkeyPatch) -> tuple[FakeEngine, Any]:
    eng = FakeEngine(store)
    monkeypatch.setattr("aiva.cli.main._engine", lambda: eng)
    app = typer.Typer()
    for fn in (observe_cmd.events, observe_cmd.metrics, observe_cmd.cost):
        app.command()(fn)
    runner = CliRunner()
    return eng, lambda *args: runner.invoke(app, [str(a) for a in args])


def test_cli_events_filters_by_sandbox_even_a_removed_one(cli: Any, store: Store) -> None:
    _, run = cli
    a, b = _box(store, "a"), _box(store, "b")
    store.record("created", a)
    store.record("command", b, cmd=["echo", "hi there"], exit_code=3, duration=0.5)
    store.record("deleted", b)
    store.remove(b.id)
    res = run("events", "--sandbox", "b", "--format", "jsonl")
    assert res.exit_code == 0, res.output
    assert [json.loads(x)["kind"] for x in res.stdout.splitlines()] == ["command", "deleted"]
    res = run("events", "--sandbox", "b", "--format", "jsonl", "--limit", "1")
    assert [json.loads(x)["kind"] for x in res.stdout.splitlines()] == ["deleted"]
    res = run("events", "-o", "table", "-n", "2")
    lines = res.stdout.splitlines()
    assert lines[0].split() == ["ID", "TIME", "(UTC)", "SANDBOX", "KIND", "DETAILS"]
    assert "exit 3 in 0.500s: echo 'hi there'" in lines[1] and "deleted" in lines[2]
    assert len(lines) == 3
    assert json.loads(run("events", "-o", "json", "-s", "a").stdout)[0]["kind"] == "created"


def test_cli_mistakes_are_aiva_errors(cli: Any) -> None:
    _, run = cli
    assert isinstance(run("events", "--sandbox", "nope").exception, SandboxNotFound)
    for args in (("events", "--limit", "0"), ("events", "-f", "-o", "json"),
                 ("metrics", "x", "--since", "1h"), ("metrics", "x", "--history",
                                                     "--since", "yesterday")):
        res = run(*args)
        assert isinstance(res.exception, InvalidValue), (args, res.output)


def test_cli_metrics_now_history_and_cost(cli: Any, store: Store) -> None:
    eng, run = cli
    a = _box(store, "a")
    eng.figures = {"a": _figures(cpu=42.0)}
    res = run("metrics", "a")
    assert res.exit_code == 0 and "42.0% of 2 CPU" in res.stdout
    assert json.loads(run("metrics", "a", "-o", "json").stdout)["cpu_percent"] == 42.0
    assert "no stored samples" in run("metrics", "a", "--history").stderr
    Collector(store).sample_all(eng)
    rows = json.loads(run("metrics", "a", "--history", "--since", "5m", "-o", "json").stdout)
    assert [r["cpu_percent"] for r in rows] == [42.0] and rows[0]["sandbox_id"] == a.id
    assert "42.0" in run("metrics", "a", "--history").stdout
    _event(store, "started", a, 0)
    _event(store, "stopped", a, 1800)
    [row] = json.loads(run("cost", "-o", "json").stdout)
    assert row["sandbox"] == "a" and row["cost"] == pytest.approx(0.54)
    table = run("cost").stdout
    assert "30m00s" in table and "0.5400 EUR" in table and "total" in table


def test_parse_since() -> None:
    assert abs(observe_output.parse_since("10m") - (time.time() - 600)) < 5
    assert observe_output.parse_since("2024-05-01T12:00") == T0.timestamp()
    assert observe_output.duration(3725) == "1h02m" and observe_output.duration(5) == "5s"
