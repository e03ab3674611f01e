"""The agent bundle: one content-named copy, also when many threads ask at once."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from aiva.agent_client import bundle


def test_agent_bundle_from_many_threads_at_once(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIVA_HOME", str(tmp_path))
    got: list[Path] = []
    errors: list[BaseException] = []
    go = threading.Barrier(8)

    def ask() -> None:
        go.wait()
        try:
            got.append(bundle.agent_bundle())
        except BaseException as exc:  # the old shared temp dir made threads collide
            errors.append(exc)

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert len(set(got)) == 1
    made = got[0]
    assert set(bundle.AGENT_FILES) <= set(bundle.agent_bundle_files(made))
    assert [p.name for p in (tmp_path / "agent").iterdir()] == [made.name]  # no leftovers
