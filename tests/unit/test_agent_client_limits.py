"""The ``limits`` config section and how the engine hands it to its agent connections."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import aiva.agent
from aiva import agent_client
from aiva.agent_client import AgentClient, ProcessTransport
from aiva.config import Config, ConfigError, load_config
from aiva.engine import Engine

AGENT_DIR = Path(aiva.agent.__file__).parent


def test_limits_defaults_match_the_client_defaults() -> None:
    lim = Config().limits
    assert lim.call_timeout == agent_client.DEFAULT_CALL_TIMEOUT == 60.0
    assert lim.exec_output == "16MiB" and lim.channel_buffer == "8MiB"
    assert lim.command_log == "8MiB" and lim.log_read == "64MiB"
    assert lim.walk_entries == agent_client.DEFAULT_WALK_ENTRIES


@pytest.mark.parametrize("text", ["limits: {call_timeout: 0}", "limits: {exec_output: lots}",
                                  "limits: {walk_entries: -1}", "limits: {nope: 1}"])
def test_bad_limits_are_config_errors(tmp_path: Path, text: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError, match="limits"):
        load_config(path)


def test_the_engine_connects_with_the_configured_limits(tmp_path: Path) -> None:
    cfg = Config.model_validate({"limits": {"call_timeout": 7, "exec_output": "1MB",
                                            "channel_buffer": "2MB", "walk_entries": 99}})
    eng = Engine(cfg)
    proc = subprocess.Popen([sys.executable, str(AGENT_DIR), "--stdio"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    backend = SimpleNamespace(connect_agent=lambda sb, timeout: ProcessTransport(proc))
    eng._backend_of = lambda sb: backend  # type: ignore[method-assign,assignment,return-value]
    client: AgentClient | None = None
    try:
        client = eng._agent(SimpleNamespace(id="sb-1", name="box"))  # type: ignore[arg-type]
        assert (client.call_timeout, client.exec_output, client.channel_buffer,
                client.walk_entries) == (7, 1 << 20, 2 << 20, 99)
        assert client.transport.send_timeout == 7  # type: ignore[attr-defined]
        assert client.ping()["version"]
    finally:
        if client is not None:
            client.close()
        eng.close()
        proc.wait(timeout=10)


def test_a_non_regular_file_is_its_own_error_with_a_hint() -> None:
    from aiva.errors import RemoteError, SandboxFileUnsupported, remote_error

    err = remote_error("UnsupportedFileType", "/tmp/p is a FIFO, not a regular file")
    assert isinstance(err, SandboxFileUnsupported) and isinstance(err, RemoteError)
    assert err.kind == "UnsupportedFileType" and "regular files" in (err.hint or "")
