"""Progress told from deep inside the engine reaches the listener of its own context only."""

from __future__ import annotations

import threading

from aiva import progress


def test_say_reaches_the_listener_and_nothing_outside() -> None:
    heard: list[str] = []
    progress.say("before")  # nobody listens: nothing happens
    with progress.reporting(heard.append):
        progress.say("building the kernel")
        other: list[str] = []
        t = threading.Thread(target=lambda: (progress.say("other thread"), other.append("x")))
        t.start()
        t.join()
    progress.say("after")
    assert heard == ["building the kernel"] and other == ["x"]


def test_nested_reporting_restores_the_outer_listener() -> None:
    outer: list[str] = []
    inner: list[str] = []
    with progress.reporting(outer.append):
        with progress.reporting(inner.append):
            progress.say("a")
        progress.say("b")
    assert (outer, inner) == (["b"], ["a"])


def test_line_status_prints_steps_thinned_when_not_a_terminal(monkeypatch: object) -> None:
    import io

    from rich.console import Console

    from aiva.cli import output

    buf = io.StringIO()
    st = output.LineStatus(Console(file=buf, width=200))
    st.update("building the kernel")
    st.update("building the kernel")  # the same step again: once
    for i in range(100):  # a chatty step: thinned to at most two lines a second
        st.update(f"mmdebstrap line {i}")
    lines = buf.getvalue().splitlines()
    assert lines[0] == "… building the kernel"
    assert len(lines) <= 2
