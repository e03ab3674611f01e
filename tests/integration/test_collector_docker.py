"""The DataCollector against a real Docker sandbox: samples land in the state db, the
observe commands read the real event log, and logs and Prometheus text see the sandbox."""

from __future__ import annotations

import json
from typing import Any

import pytest
import typer
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from aiva.cli import observe_cmd
from aiva.observe import collector, prometheus

pytestmark = [pytest.mark.docker, pytest.mark.timeout(180)]
MiB = 1 << 20


def _cli() -> Any:
    """The observe commands on an app of their own, until main.py registers them."""
    app = typer.Typer()
    for fn in (observe_cmd.events, observe_cmd.metrics, observe_cmd.cost):
        app.command()(fn)
    runner = CliRunner()
    return lambda *args: runner.invoke(app, list(args))


def test_sample_all_stores_a_running_sandbox(engine: Any, make_sandbox: Any) -> None:
    sb = make_sandbox(cpus=1, memory="512MB")
    coll = collector.Collector(engine.store)
    try:
        assert coll.sample_all(engine) >= 1
        [row] = coll.history(sb.info.id)
    finally:
        coll.close()
    assert row["mem_total"] == 512 * MiB
    assert 0 < row["mem_used"] < row["mem_total"]
    assert row["uptime"] > 0 and row["sandbox_id"] == sb.info.id


def test_observe_commands_on_a_real_sandbox(engine: Any, make_sandbox: Any) -> None:
    sb = make_sandbox()
    sb.commands.run("echo collected", check=True)
    run = _cli()

    res = run("events", "--sandbox", sb.name, "--format", "jsonl")
    assert res.exit_code == 0, res.output
    events = [json.loads(line) for line in res.stdout.splitlines()]
    kinds = [e["kind"] for e in events]
    assert kinds[:2] == ["created", "started"] and "command" in kinds
    assert {e["sandbox"] for e in events} == {sb.name}
    [cmd] = [e for e in events if e["kind"] == "command"]
    assert cmd["data"]["exit_code"] == 0 and "echo collected" in cmd["data"]["cmd"][-1]

    res = run("metrics", sb.name, "-o", "json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["memory"]["total"] == 512 * MiB

    res = run("cost", "-o", "json")
    [row] = [r for r in json.loads(res.stdout) if r["sandbox"] == sb.name]
    assert row["running_seconds"] > 0 and row["state"] == "running"


def test_logs_and_prometheus_see_a_real_sandbox(engine: Any, make_sandbox: Any) -> None:
    sb = make_sandbox(memory="512MB")
    sb.commands.run("echo to-the-log", check=True)
    lines = collector.query_logs(engine, sandbox=sb.name, source="commands")
    assert [e.text for e in lines if e.source == "stdout"] == ["to-the-log\n"]
    assert {e.sandbox for e in lines} == {sb.name}

    text = prometheus.render(engine).decode()
    got = {(s.name, s.labels.get("sandbox")): s.value
           for fam in text_string_to_metric_families(text) for s in fam.samples}
    assert got[("aiva_sandbox_memory_total_bytes", sb.name)] == 512 * MiB
    assert got[("aiva_sandbox_uptime_seconds", sb.name)] > 0
    assert got[("aiva_commands_total", sb.name)] == 1
