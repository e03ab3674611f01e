"""Pool benchmark: tasks from the warm pool vs a cold sandbox per task, in one run.

The pool's claim is that a task starts in milliseconds, because a clean sandbox is
already running: claim -> first exec, not create -> first exec. And that short tasks
go through far faster, because making sandboxes clean again happens off the task's path.
Each figure puts the pool next to the cold way on the same image, host and run:

1. claim -> first exec (``true``) from a warm pool vs ``create`` -> first exec
   (target: warm <= 20 ms, p50).
2. N short tasks (``python3 -c 'print(1)'``), one after another: claim, exec, release
   through the pool (release in the background, as the daemon's runner does; and waited
   for, as a caller that resets inline would) vs create, exec, delete for each.
3. reset of a used sandbox: restore its ``clean`` snapshot vs delete + create (the two
   ways ``pool.reset`` offers; the faster one is the default).

Run: ``.venv/bin/python bench/pool.py [--quick]``. Results go to bench/results/pool.json.
Every sandbox, container, volume and snapshot image it makes is removed at the end, also
on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HOME = tempfile.mkdtemp(prefix="aiva-b")
os.environ["AIVA_HOME"] = HOME
os.environ["AIVA_NO_DAEMON"] = "1"

import docker  # noqa: E402

from aiva.config import PoolSettings  # noqa: E402
from aiva.engine import Engine  # noqa: E402
from aiva.tasks.pool import WarmPool  # noqa: E402
from common import (  # noqa: E402
    Report,
    Row,
    console,
    no_sigint,
    pct,
    progress,
    ratio,
    render,
    write_json,
)

IMAGE = "aiva/python:latest"
TEMPLATE = "python"
RESULTS = Path(__file__).resolve().parent / "results"
SIZE = {"cpus": 1.0, "memory": "512MB"}


@dataclass(frozen=True)
class Counts:
    claims: int = 20
    tasks: int = 100
    resets: int = 5
    min_warm: int = 2
    max: int = 6


FULL = Counts()
QUICK = Counts(claims=5, tasks=20, resets=2)


def ms(xs: list[float]) -> list[float]:
    return [round(x * 1e3, 3) for x in xs]


class Cold:
    """Plain sandboxes, one per task, named so the cleanup finds them."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.spec = engine.build_spec(image=IMAGE, **SIZE)  # type: ignore[arg-type]
        self.n = 0

    def create(self) -> str:
        self.n += 1
        name = f"cold-{self.n}"
        self.engine.create(name, self.spec)
        return name

    def delete(self, name: str) -> None:
        self.engine.delete(name, volumes=True)


def run_ok(engine: Engine, name: str, argv: list[str]) -> None:
    out = engine.exec(name, argv)
    if out.exit_code != 0:  # type: ignore[union-attr]
        raise RuntimeError(f"{argv} failed in {name}")


# ---------------------------------------------------------------------- figures


def fig_claim(c: Counts, engine: Engine, pool: WarmPool, cold: Cold, rep: Report) -> None:
    progress(f"[bold]1. claim -> first exec[/bold] vs create -> first exec, {c.claims} runs")
    pool.warm(TEMPLATE)
    run_ok(engine, cold_name := cold.create(), ["true"])  # warm-up, not counted
    cold.delete(cold_name)
    claim_only: list[float] = []
    warm: list[float] = []
    fresh: list[float] = []
    for i in range(c.claims):  # interleaved, so drift on the host hits both alike
        pool.maintain(TEMPLATE)  # back to min_warm idle ones (not timed)
        t0 = time.perf_counter()
        lease = pool.claim(TEMPLATE)
        t1 = time.perf_counter()
        run_ok(engine, lease.name, ["true"])
        t2 = time.perf_counter()
        if not lease.warm:
            raise RuntimeError("the pool had no warm sandbox for a timed claim")
        pool.release(lease)
        claim_only.append(t1 - t0)
        warm.append(t2 - t0)
        t0 = time.perf_counter()
        name = cold.create()
        run_ok(engine, name, ["true"])
        fresh.append(time.perf_counter() - t0)
        cold.delete(name)
        progress(f"   run {i + 1}/{c.claims}: warm {warm[-1] * 1e3:.1f} ms "
                 f"(claim {claim_only[-1] * 1e3:.1f}), cold {fresh[-1] * 1e3:.0f} ms")
    w50 = pct(warm, 50) * 1e3
    for q in (50, 95):
        w, f = pct(warm, q) * 1e3, pct(fresh, q) * 1e3
        rep.rows.append(Row("1 ->first exec", f"p{q}", "ms", w, "create -> first exec", f,
                            ratio(f, w), "cold/pool", "<= 20 ms" if q == 50 else None,
                            w50 <= 20 if q == 50 else None))
    rep.rows.append(Row("1 ->first exec", "claim alone p50", "ms", pct(claim_only, 50) * 1e3))
    rep.samples["first_exec_ms"] = {"warm": ms(warm), "claim": ms(claim_only),
                                    "cold": ms(fresh)}


def pool_tasks(c: Counts, engine: Engine, pool: WarmPool, *, wait: bool
               ) -> tuple[float, float, int]:
    """(seconds until the last task's exec returned, until the pool was clean again,
    claims that had to grow the pool)."""
    pool.maintain(TEMPLATE)
    pool.flush()
    grown = 0
    t0 = time.perf_counter()
    for _ in range(c.tasks):
        lease = pool.claim(TEMPLATE)
        grown += not lease.warm
        run_ok(engine, lease.name, ["python3", "-c", "print(1)"])
        pool.release(lease, wait=wait)
    done = time.perf_counter() - t0
    pool.flush()
    return done, time.perf_counter() - t0, grown


def cold_tasks(c: Counts, engine: Engine, cold: Cold) -> float:
    t0 = time.perf_counter()
    for _ in range(c.tasks):
        name = cold.create()
        run_ok(engine, name, ["python3", "-c", "print(1)"])
        cold.delete(name)
    return time.perf_counter() - t0


def fig_tasks(c: Counts, engine: Engine, pool: WarmPool, cold: Cold, rep: Report) -> None:
    n = c.tasks
    progress(f"[bold]2. {n} short tasks[/bold], one after another")
    bg, bg_settled, bg_grown = pool_tasks(c, engine, pool, wait=False)
    progress(f"   pool, background reset: {bg:.2f} s ({bg_settled:.2f} s until clean), "
             f"{bg_grown} claims grew the pool")
    cd = cold_tasks(c, engine, cold)
    progress(f"   cold sandbox per task: {cd:.2f} s")
    fg, _, fg_grown = pool_tasks(c, engine, pool, wait=True)
    progress(f"   pool, reset waited for: {fg:.2f} s, {fg_grown} claims grew the pool")
    peer = "create, exec, delete"
    rep.rows += [
        Row(f"2 {n} tasks", "total, background reset", "s", bg, peer, cd, ratio(cd, bg),
            "cold/pool"),
        Row(f"2 {n} tasks", "total incl. last reset", "s", bg_settled, peer, cd,
            ratio(cd, bg_settled), "cold/pool"),
        Row(f"2 {n} tasks", "total, reset waited for", "s", fg, peer, cd, ratio(cd, fg),
            "cold/pool"),
        Row(f"2 {n} tasks", "per task, background reset", "ms", bg / n * 1e3, peer,
            cd / n * 1e3, ratio(cd, bg), "cold/pool"),
    ]
    rep.samples["tasks_s"] = {"pool_background": round(bg, 4),
                              "pool_background_settled": round(bg_settled, 4),
                              "pool_background_grown": bg_grown,
                              "pool_waited": round(fg, 4), "pool_waited_grown": fg_grown,
                              "cold": round(cd, 4)}


def fig_reset(c: Counts, engine: Engine, cold: Cold, rep: Report) -> None:
    progress(f"[bold]3. reset a used sandbox[/bold]: restore vs delete + create, "
             f"{c.resets} runs")
    dirty = "echo dirty > /workspace/dirt; echo dirty > /tmp/dirt"
    name = cold.create()
    engine.snapshot(name, "clean")
    restore: list[float] = []
    recreate: list[float] = []
    snap: list[float] = []
    for _ in range(c.resets):
        engine.exec(name, dirty)
        t0 = time.perf_counter()
        engine.restore(name, "clean")
        run_ok(engine, name, ["true"])
        restore.append(time.perf_counter() - t0)
        other = cold.create()
        engine.exec(other, dirty)
        t0 = time.perf_counter()
        cold.delete(other)
        run_ok(engine, fresh := cold.create(), ["true"])
        recreate.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        engine.snapshot(fresh, "clean")  # what restore costs per sandbox warmed
        snap.append(time.perf_counter() - t0)
        cold.delete(fresh)
    cold.delete(name)
    r, d = statistics.median(restore), statistics.median(recreate)
    rep.rows += [
        Row("3 reset", "restore clean snapshot (median)", "s", r, "delete + create", d,
            ratio(r, d), "restore/recreate"),
        Row("3 reset", "snapshot when warming (median)", "s", statistics.median(snap)),
    ]
    rep.samples["reset_s"] = {"restore": [round(x, 4) for x in restore],
                              "recreate": [round(x, 4) for x in recreate],
                              "snapshot": [round(x, 4) for x in snap]}


# ---------------------------------------------------------------------- output


def host_facts(client: Any, c: Counts, quick: bool) -> dict[str, Any]:
    info = client.info()
    others = [x for x in client.containers.list() if x.labels.get("aiva.home") != HOME]
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
        "mem_total_gb": round(info.get("MemTotal", 0) / 1e9, 1),
        "docker_server_version": client.version().get("Version"),
        "storage_driver": info.get("Driver"),
        "kernel": platform.release(),
        "python_version": platform.python_version(),
        "image": IMAGE,
        "sandbox_size": SIZE,
        "other_containers_running_at_start": len(others),
        "quick": quick,
        "counts": asdict(c),
    }


# ---------------------------------------------------------------------- cleanup


def cleanup(client: Any, engine: Engine, pool: WarmPool) -> int:
    """Remove everything of this run; returns how many things could not be."""
    failed = 0
    with no_sigint():
        progress("cleaning up")
        try:
            pool.flush(timeout=120)
            pool.drain(TEMPLATE)
        except Exception as exc:
            progress(f"[yellow]draining the pool failed (the sweep goes on): {exc}[/yellow]")
        pool.close()
        for sb in engine.list_all(reconcile=False):
            try:
                engine.delete(sb.name, volumes=True)
            except Exception as exc:
                progress(f"[yellow]could not delete {sb.name}: {exc}[/yellow]")
                failed += 1
        flt = {"label": f"aiva.home={HOME}"}
        for ctr in client.containers.list(all=True, filters=flt):
            ctr.remove(force=True, v=True)
        for vol in client.volumes.list(filters=flt):
            vol.remove(force=True)
        for img in client.images.list(filters=flt):
            try:
                client.images.remove(img.id, force=True)
            except docker.errors.APIError as exc:
                progress(f"[yellow]could not remove image {img.id}: {exc}[/yellow]")
                failed += 1
        engine.close()
        if failed:
            progress(f"[yellow]{failed} thing(s) left; AIVA_HOME {HOME} kept[/yellow]")
        else:
            shutil.rmtree(HOME, ignore_errors=True)
    return failed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="small counts, for a smoke run")
    ap.add_argument("--out", type=Path, help="JSON path (default bench/results/pool.json; "
                    "pool.quick.json with --quick)")
    args = ap.parse_args(argv)
    c = QUICK if args.quick else FULL
    out = args.out or RESULTS / ("pool.quick.json" if args.quick else "pool.json")
    try:
        client = docker.from_env(timeout=300)
        client.images.get(IMAGE)
    except docker.errors.DockerException as exc:
        shutil.rmtree(HOME, ignore_errors=True)
        console.print(f"[red]{exc}[/red]\nneeds a running Docker engine and {IMAGE}")
        return 1
    host = host_facts(client, c, args.quick)
    progress(f"AIVA_HOME={HOME}, {host['cpu_count']} CPUs, load {host['load_avg_at_start']}, "
             f"{host['other_containers_running_at_start']} other container(s) running")
    engine = Engine()
    pool = WarmPool(engine, PoolSettings(min_warm=c.min_warm, max=c.max, **SIZE))  # type: ignore[arg-type]
    cold = Cold(engine)
    rep = Report()
    steps: list[Callable[[], None]] = [
        lambda: fig_claim(c, engine, pool, cold, rep),
        lambda: fig_tasks(c, engine, pool, cold, rep),
        lambda: fig_reset(c, engine, cold, rep),
    ]
    try:
        for step in steps:
            step()
    except KeyboardInterrupt:
        console.print("[red]interrupted[/red]")
        return 130
    finally:
        cleanup(client, engine, pool)
    render(rep.rows, "warm pool vs a cold sandbox per task (same host, same run)",
           value="pool")
    write_json(out, host, rep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
