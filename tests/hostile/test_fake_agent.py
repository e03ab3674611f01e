"""The double itself: its named scenarios are scripts, it serves stdio and a Unix socket,
and it speaks the real framing (an honest client can talk to it)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from typing import Any

import pytest
from hostile_kit import AGENT, SRC, ha

from aiva.agent_client import AgentClient, SocketTransport
from aiva.errors import AivaError, CommandTimeout


@pytest.mark.parametrize("name", sorted(ha.SCENARIOS))
def test_every_scenario_is_a_script(name: str) -> None:
    sc = ha.SCENARIOS[name](None)
    assert set(sc) >= {"ops", "default", "greeting"}
    assert sc["default"] in ("sane", "hang", "close")


def _stdio_agent(*args: str) -> tuple[AgentClient, subprocess.Popen[bytes]]:
    host, guest = socket.socketpair()
    proc = subprocess.Popen([sys.executable, "-S", str(AGENT), "--stdio", *args],
                            stdin=guest, stdout=guest, env={**os.environ,
                                                            "PYTHONPATH": str(SRC)})
    guest.close()
    return AgentClient(SocketTransport(host), label="double", call_timeout=2), proc


def _stop(client: AgentClient, proc: subprocess.Popen[Any]) -> None:
    client.close()
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)


def test_the_sane_scenario_answers_like_an_empty_agent() -> None:
    client, proc = _stdio_agent("--scenario", "sane")
    try:
        assert client.ping(timeout=5)["version"] == ha.HOSTILE_VERSION
        assert client.walk("/workspace") == ({}, [])
        assert client.write_file("/workspace/x", b"12345") == 5
        res = client.exec(["true"])
        assert res.exit_code == 0  # type: ignore[union-attr]
    finally:
        _stop(client, proc)


def test_the_never_answer_scenario_is_silent() -> None:
    client, proc = _stdio_agent("--scenario", "never-answer")
    try:
        with pytest.raises(CommandTimeout):
            client.ping(timeout=0.5)
    finally:
        _stop(client, proc)


def test_a_script_given_inline_is_played() -> None:
    reply = {"version": "x", "pid": 1, "uid": 0, "python": "3.11.0"}
    client, proc = _stdio_agent("--script", json.dumps({"ops": {"ping": [{"result": reply}]}}))
    try:
        assert client.ping(timeout=5)["version"] == "x"
    finally:
        _stop(client, proc)


def test_close_at_once_ends_the_stream() -> None:
    client, proc = _stdio_agent("--scenario", "close-at-once")
    try:
        with pytest.raises(AivaError):
            client.ping(timeout=5)
    finally:
        _stop(client, proc)
