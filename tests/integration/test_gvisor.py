"""Docker sandboxes under gVisor (``--runtime gvisor``) on the real engine and runsc: the
agent is reached on its socket as under runc, and the rest of aiva works the same, or
says clearly what gVisor cannot do."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from aiva import errors
from aiva.backends.docker import GVISOR_RUNTIME
from aiva.models import State

pytestmark = pytest.mark.docker

AIVA = [sys.executable, "-m", "aiva.cli.main"]


def aiva(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*AIVA, *args], capture_output=True, text=True, timeout=300,
                          env=os.environ | {"COLUMNS": "200"})  # no cut columns


def test_a_gvisor_sandbox_runs_on_gvisors_kernel(make_sandbox: Any, docker_ok: Any,
                                                 gvisor_ok: None, tmp_path: Path) -> None:
    sb = make_sandbox(runtime="gvisor", memory="256MB")
    assert sb.state == State.RUNNING and sb.info.spec.runtime == "gvisor"
    container = docker_ok.containers.get(sb.info.runtime["container_id"])
    assert container.attrs["HostConfig"]["Runtime"] == GVISOR_RUNTIME
    assert sb.commands.run(["uname", "-r"]).stdout.strip() == "4.4.0"
    assert "gVisor" in sb.commands.run(["dmesg"]).stdout

    # files through the agent both ways, binary and a few MB
    blob = os.urandom(3 << 20) + bytes(range(256))
    sb.files.write("/workspace/blob.bin", blob)
    assert sb.files.read("/workspace/blob.bin", format="bytes") == blob
    digest = sb.commands.run(["sha256sum", "/workspace/blob.bin"]).stdout.split()[0]
    assert digest == hashlib.sha256(blob).hexdigest()

    # sync: a local tree in, changed inside, pulled back
    local = tmp_path / "proj"
    (local / "sub").mkdir(parents=True)
    (local / "a.txt").write_text("one")
    (local / "sub" / "b.txt").write_text("two")
    sb.sync(str(local), "/workspace/proj", direction="push")
    r = sb.commands.run("cat /workspace/proj/a.txt /workspace/proj/sub/b.txt; "
                        "echo three > /workspace/proj/sub/c.txt")
    assert r.stdout == "onetwo"
    sb.sync(str(local), "/workspace/proj", direction="pull")
    assert (local / "sub" / "c.txt").read_text() == "three\n"

    # status shows the runtime; ls marks it
    status = aiva("status", sb.name)
    assert status.returncode == 0, status.stderr
    assert "gvisor" in status.stdout and "runtime" in status.stdout
    listing = aiva("ls")
    assert "docker+gvisor" in listing.stdout, listing

    # pause/resume (runsc pause: the sandbox's processes are stopped, then go on)
    sb.pause()
    assert sb.state == State.PAUSED
    sb.resume()
    assert sb.commands.run(["true"]).exit_code == 0

    # the guest's syslog reaches the host as under runc (the agent is its /dev/log)
    sb.commands.run(["logger", "-t", "gv", "hello from gvisor"], check=True)
    deadline = time.monotonic() + 30
    while not any(line.source == "syslog" and "hello from gvisor" in line.text
                  for line in sb._engine.logs(sb.name)):
        assert time.monotonic() < deadline, "the syslog line did not arrive"
        time.sleep(0.1)

    # stop/start: the agent comes back on a fresh socket; the data volume is kept
    sb.stop()
    assert sb.state == State.STOPPED
    sb.start()
    assert sb.files.read("/workspace/blob.bin", format="bytes") == blob
    assert sb.commands.run(["uname", "-r"]).stdout.strip() == "4.4.0"

    # a live limit change is something runsc cannot do: refused, the record unchanged
    with pytest.raises(errors.InvalidValue, match="while it runs"):
        sb._engine.set_setting(sb.name, "memory", "512MB")
    assert sb._engine.get(sb.name).spec.memory == 256 << 20
    sb.stop()
    sb._engine.set_setting(sb.name, "memory", "512MB")
    sb.start()
    mem = sb.commands.run(["python3", "-c", "import os; print(os.sysconf('SC_PHYS_PAGES')"
                           " * os.sysconf('SC_PAGE_SIZE'))"]).stdout
    assert int(mem) == 512 << 20  # gVisor shows the container's limit as its memory

    # metrics: the container's cgroups are the host's, as under runc
    m = sb.metrics()
    assert m.memory["used"] > 0 and m.source["memory"] == "cgroup", m

    # rm: container and disk gone
    from aiva.backends import docker_disk

    cid = sb.info.runtime["container_id"]
    sb._engine.delete(sb.name, volumes=True)
    assert not docker_ok.containers.list(all=True, filters={"id": cid})
    assert not docker_disk.disk_dir(sb.id).exists()


def test_the_disk_limit_holds_under_gvisor(make_sandbox: Any, gvisor_ok: None) -> None:
    """--disk is the sandbox's ext4 image, reached through gVisor's gofer: a sandbox that
    fills it gets ENOSPC, as under runc."""
    sb = make_sandbox(runtime="gvisor", memory="256MB", disk="128MB")
    r = sb.commands.run("dd if=/dev/zero of=/workspace/fill bs=1M count=400 2>&1; "
                        "echo rc=$?; touch /x 2>&1 || echo root-ro")
    assert "No space left on device" in r.stdout and "rc=1" in r.stdout, r.stdout
    assert "root-ro" in r.stdout  # the root file system is read-only here too
    size = sb.commands.run(["python3", "-c", "import os; print(os.path.getsize("
                            "'/workspace/fill'))"]).stdout  # (coreutils' stat fails here)
    assert int(size) < 128 << 20


def test_mounts_and_ports_under_gvisor(make_sandbox: Any, gvisor_ok: None,
                                      tmp_path: Path) -> None:
    """A read-only --mount stays read-only (the gofer enforces Docker's bind flags), a
    read-write one is written through to the host, a published port answers."""
    ro, rw = tmp_path / "ro", tmp_path / "rw"
    ro.mkdir()
    rw.mkdir()
    (ro / "f").write_text("host")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sb = make_sandbox(runtime="gvisor", memory="256MB", ports=[f"{port}:8080"],
                      mounts=[f"{ro}:/mnt/ro:ro", f"{rw}:/mnt/rw"])
    r = sb.commands.run("cat /mnt/ro/f; echo x > /mnt/ro/g; echo in > /mnt/rw/h")
    assert r.stdout == "host" and "Read-only file system" in r.stderr
    assert not (ro / "g").exists() and (rw / "h").read_text() == "in\n"
    sb.commands.run(["python3", "-m", "http.server", "8080", "--directory", "/mnt/ro"],
                    background=True)
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/f", timeout=2) as resp:
                assert resp.read() == b"host"
                break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_a_fork_keeps_gvisor(make_sandbox: Any, engine: Any, gvisor_ok: None) -> None:
    src = make_sandbox(runtime="gvisor", memory="256MB")
    src.files.write("/workspace/k.txt", "kept")
    engine.snapshot(src.name, "s1")
    engine.fork(f"{src.name}-f", src.name, "s1")
    try:
        fork = engine.get(f"{src.name}-f")
        assert fork.spec.runtime == "gvisor"
        r = engine.exec(fork.name, ["sh", "-c", "uname -r; cat /workspace/k.txt"], timeout=60)
        assert r.stdout == "4.4.0\nkept"
        engine.restore(src.name, "s1")
        assert engine.exec(src.name, ["uname", "-r"], timeout=60).stdout.strip() == "4.4.0"
    finally:
        engine.delete(f"{src.name}-f", volumes=True)


def test_denied_combinations_are_one_clear_line(gvisor_ok: None) -> None:
    r = aiva("init", "gv-vm", "--backend", "qemu", "--runtime", "gvisor")
    assert r.returncode != 0
    assert "--runtime gvisor is for the Docker backend, not qemu" in r.stderr
    assert "Traceback" not in r.stderr
    r = aiva("init", "gv-x", "--runtime", "runsc")
    assert r.returncode != 0 and "'runsc' is not a runtime" in r.stderr
    r = aiva("init", "gv-d", "--template", "desktop", "--runtime", "gvisor")
    assert r.returncode != 0 and "desktop sandbox cannot run under gVisor" in r.stderr
    r = aiva("start", "gv-f", "--from-snapshot", "gv-src:s1", "--runtime", "gvisor")
    assert r.returncode != 0 and "--from-snapshot takes SOURCE:TAG" in r.stderr  # kept
    assert "gv-" not in aiva("ls").stdout + aiva("ls").stderr
