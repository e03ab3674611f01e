"""Prometheus text for ``GET /metrics`` on the daemon.

A fresh registry per render with one custom collector: every figure is read at scrape
time from the store and the engine, so nothing is kept between scrapes and a deleted
sandbox's series simply end. Per-sandbox figures come from the sampler's newest stored
sample when it is recent; a sandbox without one is measured now (all in parallel), so a
scrape stays near one Docker stats call however many sandboxes there are.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from aiva.models import State
from aiva.observe.collector import Collector, EngineLike, as_sample, costs, reconciled

__all__ = ["CONTENT_TYPE", "render"]

CONTENT_TYPE = CONTENT_TYPE_LATEST

#: (name, help, sample column, counter?) for the per-sandbox figures.
FIGURES = (
    ("aiva_sandbox_cpu_percent", "CPU busy, 100 per fully used CPU", "cpu_percent", False),
    ("aiva_sandbox_memory_used_bytes", "Memory in use", "mem_used", False),
    ("aiva_sandbox_memory_total_bytes", "Memory the sandbox may use", "mem_total", False),
    ("aiva_sandbox_disk_read_bytes", "Bytes read from disk", "disk_read", True),
    ("aiva_sandbox_disk_write_bytes", "Bytes written to disk", "disk_write", True),
    ("aiva_sandbox_net_rx_bytes", "Bytes received", "net_rx", True),
    ("aiva_sandbox_net_tx_bytes", "Bytes sent", "net_tx", True),
    ("aiva_sandbox_uptime_seconds", "Seconds since the sandbox booted", "uptime", False),
)


def render(engine: EngineLike, *, max_age: float = 30.0, collector: Collector | None = None,
           config: Any = None, now: datetime | None = None) -> bytes:
    """The exposition text; samples older than ``max_age`` seconds are measured anew."""
    own = collector is None
    coll = collector or Collector(engine.store)
    try:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Figures(engine, coll, max_age, config, now))
        return generate_latest(registry)
    finally:
        if own:
            coll.close()


class _Figures:
    def __init__(self, engine: EngineLike, collector: Collector, max_age: float,
                 config: Any, now: datetime | None) -> None:
        self.engine, self.collector = engine, collector
        self.max_age, self.config, self.now = max_age, config, now

    def collect(self) -> Iterator[Metric]:
        boxes = reconciled(self.engine)
        counts = GaugeMetricFamily("aiva_sandboxes", "Sandboxes by state and backend",
                                   labels=["state", "backend"])
        for backend in sorted({sb.spec.backend for sb in boxes}):
            for state in State:
                n = sum(1 for sb in boxes if sb.spec.backend == backend and sb.state == state)
                counts.add_metric([state.value, backend], n)
        yield counts

        running = [sb for sb in boxes if sb.state == State.RUNNING]
        samples = self.collector.latest(self.max_age)
        stale = [sb for sb in running if sb.id not in samples]
        if stale:
            fresh = self.collector.sample(self.engine, stale)
            samples |= {sid: as_sample(sid, m) for sid, m in fresh.items()}
        for name, text, column, counter in FIGURES:
            family: GaugeMetricFamily | CounterMetricFamily = (
                CounterMetricFamily(name, text, labels=["sandbox"]) if counter
                else GaugeMetricFamily(name, text, labels=["sandbox"]))
            for sb in running:
                if sb.id in samples:
                    family.add_metric([sb.name], float(samples[sb.id][column]))
            yield family

        names = {sb.id: sb.name for sb in boxes}
        commands = CounterMetricFamily("aiva_commands", "Commands run, by exit code",
                                       labels=["sandbox", "exit"])
        for (sid, code), n in sorted(self.collector.command_counts().items()):
            if sid in names:
                commands.add_metric([names[sid], code], n)
        yield commands

        cost = CounterMetricFamily("aiva_sandbox_cost", "Cost so far, from the config's "
                                   "cost prices", labels=["sandbox", "currency"])
        for row in costs(self.engine, collector=self.collector, config=self.config,
                         boxes=boxes, now=self.now):
            cost.add_metric([row["sandbox"], row["currency"]], row["cost"])
        yield cost
