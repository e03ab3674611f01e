"""The daemon's background loop: passes, failing steps, ``every``, and a stop mid-pass."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest

from aiva.periodic import Periodic, Step

log = logging.getLogger("test-periodic")


async def _until(cond: object, deadline: float = 10.0) -> None:
    end = time.monotonic() + deadline
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < end, "condition not met before the deadline"
        await asyncio.sleep(0.01)


def test_a_failing_step_is_logged_and_the_loop_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    ran: list[str] = []

    def boom() -> None:
        ran.append("boom")
        raise RuntimeError("kaput")

    async def main() -> None:
        stop = asyncio.Event()
        steps = [Step(boom, "boom failed"), Step(lambda: ran.append("ok"), "x")]
        loop = Periodic("t", 0.01, steps, log)
        task = asyncio.create_task(loop.run(stop))
        await _until(lambda: ran.count("ok") >= 3)
        stop.set()
        await asyncio.wait_for(task, 5)

    with caplog.at_level(logging.ERROR, logger="test-periodic"):
        asyncio.run(main())
    assert ran[:2] == ["boom", "ok"]  # in order, and the second runs though the first raised
    assert any(r.message == "boom failed" and r.exc_info for r in caplog.records)


def test_a_step_with_every_runs_in_the_first_pass_and_then_less_often() -> None:
    fast: list[float] = []
    slow: list[float] = []

    async def main() -> None:
        stop = asyncio.Event()
        steps = [Step(lambda: fast.append(time.monotonic()), "f"),
                 Step(lambda: slow.append(time.monotonic()), "s", every=3600)]
        task = asyncio.create_task(Periodic("t", 0.01, steps, log).run(stop))
        await _until(lambda: len(fast) >= 5)
        stop.set()
        await asyncio.wait_for(task, 5)

    asyncio.run(main())
    assert len(slow) == 1 and len(fast) >= 5


def test_a_stop_ends_the_loop_while_a_pass_is_stuck() -> None:
    release = threading.Event()
    started = threading.Event()

    def stuck() -> None:
        started.set()
        release.wait(30)

    async def main() -> tuple[float, bool, bool]:
        stop = asyncio.Event()
        loop = Periodic("t", 0.01, [Step(stuck, "s")], log)
        task = asyncio.create_task(loop.run(stop))
        await _until(started.is_set)
        t0 = time.monotonic()
        stop.set()
        await asyncio.wait_for(task, 5)
        took = time.monotonic() - t0
        busy_then = loop.busy
        release.set()
        await _until(lambda: not loop.busy)
        return took, busy_then, loop.busy

    took, busy_then, busy_after = asyncio.run(main())
    assert busy_then and not busy_after
    assert took < 10  # a poll or so (POLL), not the stuck step's 30 s
