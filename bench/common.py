"""Helpers both benchmarks use: timing samples, percentiles, ratios, number format."""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


def sample(fn: Callable[[], object], n: int, *, warm: int = 0) -> list[float]:
    """Wall time of ``n`` calls of ``fn`` (after ``warm`` untimed ones), in seconds."""
    for _ in range(warm):
        fn()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def pct(xs: list[float], q: float) -> float:
    """The q-th percentile, linearly interpolated between closest ranks."""
    s = sorted(xs)
    k = (len(s) - 1) * q / 100
    lo = math.floor(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def ratio(a: float, b: float) -> float:
    return a / b if b else math.inf


@contextmanager
def no_sigint() -> Iterator[None]:
    """Let cleanup finish even if Ctrl-C is pressed again."""
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def fmt(x: float | None) -> str:
    if x is None:
        return "-"
    if math.isinf(x):
        return "inf"
    return f"{x:.3g}" if abs(x) < 10 else f"{x:,.0f}"
