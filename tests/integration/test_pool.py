"""The warm pool against real Docker: warming, claims, resets, growth, exhaustion,
shrinking and replacing dead sandboxes. Every pool sandbox a test makes is deleted in
the fixture's ``finally``, pass or fail."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from aiva.config import PoolSettings
from aiva.models import State
from aiva.tasks.pool import LABEL, Lease, PoolExhausted, WarmPool

pytestmark = pytest.mark.docker

T = "python"


@pytest.fixture
def make_pool(engine: Any) -> Iterator[Callable[..., WarmPool]]:
    """WarmPools over the session's engine with small sandboxes; afterwards every pool
    sandbox and the pool's stored limits are gone."""
    pools: list[WarmPool] = []

    def make(**kw: Any) -> WarmPool:
        kw = {"cpus": 1, "memory": "512MB", **kw}
        pool = WarmPool(engine, PoolSettings(**kw))
        pools.append(pool)
        return pool

    try:
        yield make
    finally:
        for pool in pools:
            pool.close()
        for sb in engine.store.all():
            if LABEL in sb.spec.labels:
                try:
                    engine.delete(sb.name, volumes=True)
                except Exception as exc:  # keep cleaning the rest
                    print(f"cleanup of {sb.name} failed: {exc}")
        with sqlite3.connect(engine.store.path) as db:
            db.execute("DELETE FROM pool_templates")
            db.execute("DELETE FROM pool_pending")
        leftover = [sb.name for sb in engine.store.all() if LABEL in sb.spec.labels]
        assert not leftover, f"pool sandboxes left behind: {leftover}"


def _status(pool: WarmPool) -> dict[str, Any]:
    return next(s for s in pool.status() if s["template"] == T)


def test_warm_to_min_then_claim_at_once(engine: Any, make_pool: Any) -> None:
    pool = make_pool(min_warm=2, max=4)
    done = pool.warm(T)
    assert len(done["created"]) == 2 and not done["errors"]
    st = _status(pool)
    assert (st["warm"], st["busy"], st["warming"]) == (2, 0, 0)
    assert pool.warm(T)["created"] == []  # already at min

    t0 = time.perf_counter()
    lease = pool.claim(T)
    claimed = time.perf_counter() - t0
    out = engine.exec(lease.name, ["python3", "-c", "print(1)"])
    first_exec = time.perf_counter() - t0
    print(f"\nclaim {claimed * 1e3:.1f} ms, claim -> first exec {first_exec * 1e3:.1f} ms")
    assert lease.warm and out.exit_code == 0 and out.stdout.strip() == "1"
    assert engine.get(lease.name).state == State.RUNNING
    st = _status(pool)
    assert (st["warm"], st["busy"]) == (1, 1)
    assert any(e.kind == "pool_claimed" for e in engine.store.events(
        sandbox_id=engine.get(lease.name).id))
    pool.release(lease)
    st = _status(pool)
    assert (st["warm"], st["busy"]) == (2, 0) and lease.name not in st["sandboxes"]


@pytest.mark.parametrize("reset", ["recreate", "restore"])
def test_a_released_sandbox_comes_back_clean(engine: Any, make_pool: Any, reset: str) -> None:
    pool = make_pool(min_warm=1, max=2, reset=reset)
    pool.warm(T)
    lease = pool.claim(T)
    engine.exec(lease.name, "echo dirty > /workspace/dirt && echo dirty > /tmp/dirt")
    assert engine.exec(lease.name, ["cat", "/workspace/dirt"]).stdout.strip() == "dirty"
    pool.release(lease)
    st = _status(pool)
    assert (st["warm"], st["busy"]) == (1, 0)
    if reset == "restore":
        assert st["sandboxes"] == [lease.name]  # the same sandbox, back to its snapshot
    else:
        assert lease.name not in st["sandboxes"]  # a fresh one in its place
    again = pool.claim(T)
    check = engine.exec(again.name, "ls /workspace/dirt /tmp/dirt")
    assert check.exit_code != 0, check.stdout
    pool.release(again, reset=False)  # destroyed, not reused
    assert not engine.exists(again.name)


def test_grows_to_max_under_concurrent_claims_then_exhausts(engine: Any,
                                                            make_pool: Any) -> None:
    pool = make_pool(min_warm=1, max=3)
    other = make_pool(min_warm=1, max=3)  # a second pool object: its own lock files
    pool.warm(T)
    leases: list[Lease] = []
    errors: list[BaseException] = []

    def claim(p: WarmPool) -> None:
        try:
            leases.append(p.claim(T, timeout=60))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=claim, args=(p,)) for p in (pool, other, pool)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len({lease.name for lease in leases}) == 3
    assert sum(lease.warm for lease in leases) == 1  # one warm, two grown for the claims
    st = _status(pool)
    assert (st["warm"], st["busy"], len(st["sandboxes"])) == (0, 3, 3)

    t0 = time.monotonic()
    with pytest.raises(PoolExhausted) as info:
        pool.claim(T, timeout=0.5)
    assert time.monotonic() - t0 >= 0.5
    assert "all 3 of the pool's sandboxes are busy" in str(info.value)
    assert "aiva pool resize python --max" in (info.value.hint or "")

    # a claim waiting at max gets the first one given back
    got: list[Lease] = []
    waiter = threading.Thread(target=lambda: got.append(other.claim(T, timeout=60)))
    waiter.start()
    time.sleep(0.3)
    assert not got
    pool.release(leases[0])
    waiter.join(60)
    assert got and got[0].name not in {lease.name for lease in leases}
    for lease in [*leases[1:], *got]:
        pool.release(lease, reset=False)
    st = _status(pool)
    assert st["busy"] == 0 and len(st["sandboxes"]) <= 3


def test_idle_ones_beyond_min_shrink(engine: Any, make_pool: Any) -> None:
    pool = make_pool(min_warm=1, max=3, idle_shrink=60)
    pool.warm(T)
    leases = [pool.claim(T) for _ in range(3)]
    for lease in leases:
        pool.release(lease)  # each comes back as a fresh idle one
    st = _status(pool)
    assert st["warm"] == 3
    assert pool.maintain(T)[T]["shrunk"] == []  # not idle long enough yet
    # idle for longer than idle_shrink, oldest first (set, not slept: releases take
    # a varying fraction of a second each on a busy host)
    for age, name in zip((300, 200, 100), st["sandboxes"], strict=True):
        engine.store.update(name, runtime={"pool_idle_since": time.time() - age})
    done = pool.maintain(T)[T]
    assert done["shrunk"] == st["sandboxes"][:2] and done["created"] == []
    st = _status(pool)
    assert st["warm"] == 1 and st["sandboxes"] == [st["sandboxes"][-1]]


def test_maintain_replaces_a_dead_sandbox_and_a_leaked_lease(
        engine: Any, make_pool: Any, docker_ok: Any) -> None:
    pool = make_pool(min_warm=2, max=4)
    pool.warm(T)
    dead, idle = _status(pool)["sandboxes"]
    ctr = docker_ok.containers.get(engine.get(dead).runtime["container_id"])
    ctr.kill()
    deadline = time.monotonic() + 30  # a kill is sent at once, seen as exited a bit later
    while ctr.reload() or ctr.status == "running":
        assert time.monotonic() < deadline, "the killed container still runs"
        time.sleep(0.05)
    leaked = pool.claim(T)
    assert leaked.name == idle
    # its holder "dies": a process that no longer exists
    engine.store.update(idle, runtime={"pool_busy": {"holder": "999999999:1", "since": 0}})
    done = pool.maintain(T)[T]
    # the dead one goes either when a claim picks it (it does not answer: replaced at
    # once) or here; which one a claim picks first is the pool's choice
    replaced = [e for e in engine.store.events()
                if e.kind == "pool_replaced" and e.sandbox == dead]
    assert sorted(done["reaped"]) == sorted([idle] + ([] if replaced else [dead]))
    assert len(done["created"]) == 2 and not done["errors"]
    st = _status(pool)
    assert (st["warm"], st["busy"]) == (2, 0)
    assert not engine.exists(dead) and not engine.exists(idle)


def test_a_kept_lease_survives_maintain(engine: Any, make_pool: Any) -> None:
    pool = make_pool(min_warm=0, max=2)
    lease = pool.claim(T)
    assert not lease.warm
    pool.keep(lease)
    busy = engine.get(lease.name).runtime["pool_busy"]
    engine.store.update(lease.name, runtime={"pool_busy": {**busy, "holder": "999999999:1"}})
    assert pool.maintain(T)[T]["reaped"] == []
    pool.release(lease)
    assert not engine.exists(lease.name)


def test_drain_destroys_idle_ones_and_stops_warming(engine: Any, make_pool: Any) -> None:
    pool = make_pool(min_warm=2, max=3)
    pool.warm(T)
    lease = pool.claim(T)
    gone = pool.drain(T)
    assert len(gone) == 1 and lease.name not in gone
    st = _status(pool)
    assert (st["warm"], st["busy"], st["active"]) == (0, 1, False)
    assert pool.maintain(T)[T]["created"] == []  # inactive: not topped up
    pool.release(lease, reset=False)
    assert _status(pool)["sandboxes"] == []


def test_daemon_stop_drains_the_idle_pool_unless_kept(engine: Any, make_pool: Any) -> None:
    """Only the daemon shrinks the pool: stopping it must not leave idle sandboxes
    running that nobody owns (`--keep-pool` keeps them, and says how to drain)."""
    import subprocess
    import sys

    pool = make_pool(min_warm=1, max=1)
    pool.warm(T)
    names = _status(pool)["sandboxes"]
    assert len(names) == 1
    cli = [sys.executable, "-m", "aiva.cli.main", "daemon", "stop"]
    r = subprocess.run([*cli, "--keep-pool"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"`aiva pool drain {T}`" in r.stderr and engine.exists(names[0])
    r = subprocess.run(cli, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"drained the warm pool of {T}: 1 idle sandbox removed" in r.stderr
    assert not engine.exists(names[0])
