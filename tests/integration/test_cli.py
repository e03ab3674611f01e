"""The ``aiva`` command line as a user runs it: separate processes, real Docker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.docker

AIVA = [sys.executable, "-m", "aiva.cli.main"]


def aiva(*args: str, env: dict[str, str] | None = None, input: str | None = None,
         timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*AIVA, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, input=input)


def assert_clean_error(r: subprocess.CompletedProcess[str], code: int, text: str) -> None:
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    assert text in r.stderr
    assert r.stderr.startswith("error:")


@pytest.fixture
def names(engine: Any) -> Iterator[list[str]]:
    """Sandbox names a CLI test uses; removed afterwards whatever happened."""
    made: list[str] = []
    yield made
    for name in made:
        if engine.exists(name):
            engine.delete(name, volumes=True)


def _name(names: list[str]) -> str:
    name = f"cli-{uuid.uuid4().hex[:6]}"
    names.append(name)
    return name


def test_user_mistakes_are_one_line_with_a_hint(python_image: str, names: list[str]) -> None:
    r = aiva("status", "no-such-box")
    assert_clean_error(r, 1, "no sandbox named 'no-such-box'")
    assert "hint:" in r.stderr

    r = aiva("start", _name(names), "--memory", "lots")
    assert_clean_error(r, 2, "'lots' is not a size")

    r = aiva("exec", "no-such-box", "--", "true")
    assert_clean_error(r, 1, "no sandbox named")

    r = aiva("start", _name(names), "-p", "99999:80")
    assert_clean_error(r, 2, "not a port mapping")


def test_docker_not_running_is_explained(tmp_path: Path) -> None:
    r = aiva("start", "x", env={"DOCKER_HOST": f"unix://{tmp_path}/no.sock"})
    assert_clean_error(r, 1, "Docker engine is not running")
    assert "hint:" in r.stderr


def test_whole_flow(python_image: str, names: list[str], tmp_path: Path) -> None:
    name = _name(names)
    assert aiva("init", name, "--memory", "512MB", "--cpus", "1", "-e", "MODE=test"
                ).returncode == 0
    r = aiva("init", name)
    assert_clean_error(r, 1, "already exists")
    status = json.loads(aiva("status", name, "--format", "json").stdout)
    assert status["state"] == "stopped" and status["spec"]["env"] == {"MODE": "test"}

    r = aiva("start", name)
    assert r.returncode == 0, r.stderr
    r = aiva("exec", name, "--", "sh", "-c", "echo $MODE; echo oops >&2; exit 5")
    assert (r.returncode, r.stdout, r.stderr) == (5, "test\n", "oops\n")
    r = aiva("exec", "-i", name, "--", "wc", "-c", input="12345")
    assert r.stdout.strip() == "5"
    r = aiva("exec", "--timeout", "0.5", name, "--", "sleep", "20")
    assert r.returncode == 124 and "timed out" in r.stderr

    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("alpha")
    (src / "sub" / "b.txt").write_text("beta")
    (src / "skip.log").write_text("no")
    r = aiva("data", name, "sync", str(src), "/workspace/proj", "--exclude", "*.log")
    assert r.returncode == 0, r.stderr
    assert "pushed 2" in r.stderr
    r = aiva("data", name, "sync", str(src), "/workspace/proj", "--exclude", "*.log")
    assert "pushed 0" in r.stderr and "3 unchanged" not in r.stderr
    r = aiva("exec", name, "--", "sh", "-c", "echo gamma > /workspace/proj/c.txt")
    r = aiva("data", name, "pull", "/workspace/proj", str(tmp_path / "back"), "--format", "json")
    report = json.loads(r.stdout)
    assert sorted(report["pulled"]) == ["a.txt", "c.txt", "sub/b.txt"]

    (tmp_path / "one.txt").write_text("copied in")
    assert aiva("cp", str(tmp_path / "one.txt"), f"{name}:/workspace/").returncode == 0
    assert aiva("cp", f"{name}:/workspace/one.txt", str(tmp_path / "out.txt")).returncode == 0
    assert (tmp_path / "out.txt").read_text() == "copied in"

    assert aiva("config", name, "get", "env.MODE").stdout.strip() == "test"
    assert aiva("config", name, "set", "memory", "768MB").returncode == 0
    assert aiva("config", name, "get", "memory").stdout.strip() == str(768 << 20)
    assert_clean_error(aiva("config", name, "set", "image", "x"), 2, "cannot change")

    logs = aiva("logs", name, "--tail", "50").stdout
    assert "$ sh -c 'echo $MODE; echo oops >&2; exit 5'" in logs
    assert "exit 5" in logs

    listing = yaml.safe_load(aiva("ls", "--format", "yaml").stdout)
    assert {b["name"]: b["state"] for b in listing}[name] == "running"

    assert aiva("pause", name).returncode == 0
    assert_clean_error(aiva("exec", name, "--", "true"), 1, "paused")
    assert aiva("resume", name).returncode == 0
    assert aiva("stop", name).returncode == 0
    assert_clean_error(aiva("stop", name), 1, "cannot stop")
    r = aiva("rm", name, "--volumes")
    assert r.returncode == 0
    assert_clean_error(aiva("status", name), 1, "no sandbox")


def test_logs_follow_streams_new_output(python_image: str, names: list[str]) -> None:
    name = _name(names)
    assert aiva("start", name, "--memory", "256MB").returncode == 0
    proc = subprocess.Popen([*AIVA, "logs", name, "-f"], stdout=subprocess.PIPE, text=True)
    try:
        marker = f"marker-{uuid.uuid4().hex}"
        deadline = time.monotonic() + 30
        assert aiva("exec", name, "--", "echo", marker).returncode == 0
        assert proc.stdout is not None
        seen = ""
        while marker not in seen and time.monotonic() < deadline:
            seen += proc.stdout.readline()
        assert marker in seen
    finally:
        proc.kill()
        proc.wait(10)


def test_parallel_cli_processes(python_image: str, names: list[str]) -> None:
    """Several aiva processes at once share the state store without losing anything."""
    batch = [_name(names) for _ in range(3)]
    procs = [subprocess.Popen([*AIVA, "start", n, "--memory", "256MB"], stderr=subprocess.PIPE,
                              text=True) for n in batch]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    listing = json.loads(aiva("ls", "--format", "json").stdout)
    states = {b["name"]: b["state"] for b in listing}
    assert all(states[n] == "running" for n in batch)
    procs = [subprocess.Popen([*AIVA, "rm", n, "--volumes"]) for n in batch]
    for p in procs:
        assert p.wait(120) == 0
    listing = json.loads(aiva("ls", "--format", "json").stdout)
    assert not {b["name"] for b in listing} & set(batch)


def test_image_ls_shows_built_images(python_image: str) -> None:
    r = aiva("image", "ls", "--format", "json")
    tags = [i["tag"] for i in json.loads(r.stdout)]
    assert python_image in tags


def test_snapshot_commands(python_image: str, names: list[str]) -> None:
    name, fork = _name(names), _name(names)
    assert aiva("start", name, "--memory", "256MB").returncode == 0
    aiva("exec", name, "--", "sh", "-c", "echo one > /workspace/f")
    r = aiva("snapshot", name, "s1")
    assert r.returncode == 0 and "filesystem only" in r.stderr
    listing = json.loads(aiva("snapshot", name, "--list", "--format", "json").stdout)
    assert [s["tag"] for s in listing] == ["s1"] and listing[0]["memory"] is False
    aiva("exec", name, "--", "sh", "-c", "echo two > /workspace/f")
    assert aiva("restore", name, "s1").returncode == 0
    assert aiva("exec", name, "--", "cat", "/workspace/f").stdout == "one\n"
    r = aiva("start", fork, "--from-snapshot", f"{name}:s1")
    assert r.returncode == 0, r.stderr
    assert aiva("exec", fork, "--", "cat", "/workspace/f").stdout == "one\n"
    assert_clean_error(aiva("restore", name, "nope"), 2, "no snapshot 'nope'")
    assert_clean_error(aiva("start", _name(names), "--from-snapshot", "nocolon"), 2,
                       "SOURCE:TAG")
    assert aiva("rm", fork, "--volumes").returncode == 0


@pytest.mark.vm
def test_image_build_makes_vm_files_from_the_same_rootfs(python_image: str) -> None:
    r = aiva("image", "build", "minimal", "--vm", timeout=900)
    assert r.returncode == 0, r.stderr
    assert "image aiva/minimal:latest is ready" in r.stderr
    assert "VM files for minimal are ready" in r.stderr
    assert "… minimal VM: " in r.stderr  # its steps, as lines when not on a terminal
    r = aiva("image", "build", "minimal", timeout=900)  # a Docker user gets no VM files
    assert r.returncode == 0 and "VM files" not in r.stderr, r.stderr
    r = aiva("image", "build", "nonesuch", "--no-container")
    assert_clean_error(r, 1, "nonesuch")


def test_timeout_options_and_extend(python_image: str, names: list[str]) -> None:
    name = _name(names)
    r = aiva("start", name, "--memory", "256MB", "--timeout", "600", "--on-timeout", "pause",
             "--restart", "on-failure:3")
    assert r.returncode == 0, r.stderr
    spec = json.loads(aiva("status", name, "--format", "json").stdout)["spec"]
    assert (spec["timeout"], spec["on_timeout"], spec["restart"]) == (600, "pause",
                                                                     "on-failure:3")
    before = json.loads(aiva("status", name, "--format", "json").stdout)["runtime"]["deadline"]
    r = aiva("extend", name, "120")
    assert r.returncode == 0 and "deadline in" in r.stderr
    after = json.loads(aiva("status", name, "--format", "json").stdout)["runtime"]["deadline"]
    assert after >= before + 119
    assert_clean_error(aiva("start", _name(names), "--restart", "sometimes"), 2, "sometimes")


def test_exec_options_after_the_name(python_image: str, names: list[str]) -> None:
    """The README's form: `exec NAME [-i -e --cwd --user --timeout] -- CMD...`."""
    name = _name(names)
    assert aiva("start", name).returncode == 0
    r = aiva("exec", name, "--cwd", "/tmp", "-e", "WHO=me", "--", "sh", "-c", "pwd; echo $WHO")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["/tmp", "me"]
    r = aiva("exec", name, "-i", "--timeout", "30", "--", "cat", input="piped\n")
    assert (r.returncode, r.stdout) == (0, "piped\n")
    r = aiva("exec", name, "--user=nobody", "--", "id", "-un")
    assert r.stdout.strip() == "nobody"
    # a command without -- still works, its own options untouched
    r = aiva("exec", name, "python3", "-c", "print(6*7)")
    assert r.stdout == "42\n"
    # a dash word that is not one of exec's options is refused, with the right form
    r = aiva("exec", name, "--cdw", "/tmp", "--", "pwd")
    assert_clean_error(r, 2, "'--cdw' is not an option of aiva exec")
    assert "-- CMD" in r.stderr
    logs = aiva("logs", name).stdout
    assert "sh -c 'pwd; echo $WHO'" in logs and "--cwd" not in logs


def test_data_sync_mistakes_and_litter(python_image: str, names: list[str],
                                       tmp_path: Path) -> None:
    name = _name(names)
    assert aiva("start", name).returncode == 0
    r = subprocess.run([*AIVA, "data", name, "sync", "./nope", "/workspace/x"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert_clean_error(r, 1, "does not exist")
    assert not (tmp_path / "nope").exists()
    assert aiva("exec", name, "--", "test", "-e", "/workspace/x").returncode == 1
    proj = tmp_path / "proj"
    (proj / "__pycache__").mkdir(parents=True)
    (proj / "__pycache__" / "m.cpython-311.pyc").write_bytes(b"x")
    (proj / "m.py").write_text("print(1)\n")
    r = aiva("data", name, "sync", str(proj), "/workspace/proj")
    assert r.returncode == 0, r.stderr
    assert "to the sandbox: m.py" in r.stderr
    assert aiva("exec", name, "--", "test", "-e", "/workspace/proj/__pycache__").returncode == 1
    assert aiva("exec", name, "--", "sh", "-c", "cd /workspace/proj && python3 -m pytest "
                "--version >/dev/null 2>&1; mkdir -p .pytest_cache && touch out.txt"
                ).returncode == 0
    r = aiva("data", name, "sync", str(proj), "/workspace/proj")
    assert "to this machine: out.txt" in r.stderr and not (proj / ".pytest_cache").exists()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_fork_starts_beside_its_source(python_image: str, names: list[str],
                                         docker_ok: Any) -> None:
    """The README's fork line while the source runs with -p: the fork takes free host
    ports (or the ones given), overrides apply, and a failed fork leaves nothing."""
    box, copy, copy2, bad = (_name(names) for _ in range(4))
    port = _free_port()
    assert aiva("start", box, "-p", f"{port}:80", "--memory", "256MB").returncode == 0
    assert aiva("snapshot", box, "s1").returncode == 0
    r = aiva("start", copy, "--from-snapshot", f"{box}:s1")
    assert r.returncode == 0, r.stderr
    ports = json.loads(aiva("status", copy, "--format", "json").stdout)["runtime"]["ports"]
    assert len(ports) == 1 and ports[0].endswith("->80/tcp")
    assert f":{port}->" not in ports[0]
    other = _free_port()
    r = aiva("start", copy2, "--from-snapshot", f"{box}:s1", "-p", f"{other}:80",
             "--memory", "300MB", "-e", "FORKED=yes")
    assert r.returncode == 0, r.stderr
    status = json.loads(aiva("status", copy2, "--format", "json").stdout)
    assert status["spec"]["memory"] == 300 << 20
    assert f":{other}->80" in status["runtime"]["ports"][0]
    assert aiva("exec", copy2, "--", "sh", "-c", "echo $FORKED").stdout == "yes\n"
    # the source's own port, asked for explicitly: the fork fails and nothing stays
    r = aiva("start", bad, "--from-snapshot", f"{box}:s1", "-p", f"{port}:80")
    assert r.returncode != 0 and "nothing of the sandbox was kept" in r.stderr, r.stderr
    assert aiva("status", bad).returncode != 0
    left = docker_ok.containers.list(all=True, filters={"label": "aiva.name=" + bad})
    vols = [v for v in docker_ok.volumes.list(filters={"label": "aiva.name=" + bad})]
    assert not left and not vols
    assert_clean_error(aiva("start", bad, "--from-snapshot", f"{box}:s1", "--template",
                            "python"), 2, "only -p")
