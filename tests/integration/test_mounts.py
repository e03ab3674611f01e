"""Host directories in sandboxes (--mount), for real: Docker bind mounts, and virtio-fs in
a QEMU microVM (one boot). Read-only must hold even against root in the guest."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

# errno of a write attempt, from inside: EROFS, EACCES ... or OK
TRY_WRITE = ("import errno, os, sys\n"
             "for p in sys.argv[1:]:\n"
             "    try:\n"
             "        if p.startswith('rm:'): os.remove(p[3:])\n"
             "        else: open(p, 'w').write('x')\n"
             "        print('OK')\n"
             "    except OSError as e: print(errno.errorcode[e.errno])\n")


def _dirs(tmp_path: Path) -> tuple[Path, Path]:
    rw, ro = tmp_path / "rw", tmp_path / "ro"
    rw.mkdir()
    ro.mkdir()
    (rw / "from-host.txt").write_text("hello from the host")
    (ro / "keep.txt").write_text("must not change")
    return rw.resolve(), ro.resolve()


def _wait_for(what: str, check: Any, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _check_mounts(sb: Any, rw: Path, ro: Path, ro_guest: str) -> None:
    """rw both ways; ro refuses writes and deletes; the host's ro dir is unchanged."""
    assert sb.commands.run(["cat", f"{rw}/from-host.txt"]).stdout == "hello from the host"
    r = sb.commands.run(["sh", "-c", f"echo from the guest > {rw}/from-guest.txt"])
    assert r.exit_code == 0, r.stderr
    assert (rw / "from-guest.txt").read_text() == "from the guest\n"
    (rw / "later.txt").write_text("written while it runs")
    _wait_for("the host's new file in the sandbox", lambda: sb.commands.run(
        ["cat", f"{rw}/later.txt"]).stdout == "written while it runs")

    assert sb.commands.run(["cat", f"{ro_guest}/keep.txt"]).stdout == "must not change"
    r = sb.commands.run(["python3", "-c", TRY_WRITE, f"{ro_guest}/new.txt",
                         f"{ro_guest}/keep.txt", f"rm:{ro_guest}/keep.txt"])
    assert r.stdout.split() == ["EROFS"] * 3, (r.stdout, r.stderr)
    assert sorted(p.name for p in ro.iterdir()) == ["keep.txt"]
    assert (ro / "keep.txt").read_text() == "must not change"


@pytest.mark.docker
def test_docker_bind_mounts_rw_and_ro(make_sandbox: Any, tmp_path: Path) -> None:
    rw, ro = _dirs(tmp_path)
    sb = make_sandbox(mounts=[str(rw), f"{ro}:/data/ro:ro"])
    info = sb.status()
    assert [(m.host_path, m.guest_path, m.read_only) for m in info.spec.mounts] == [
        (str(rw), str(rw), False), (str(ro), "/data/ro", True)]
    _check_mounts(sb, rw, ro, "/data/ro")
    # the guest's root cannot undo it: no CAP_SYS_ADMIN for a remount
    r = sb.commands.run(["sh", "-c", "mount -o remount,rw /data/ro; echo x > /data/ro/k"])
    assert r.exit_code != 0 and not (ro / "k").exists()


@pytest.mark.docker
def test_cli_mount_option_and_status(python_image: str, engine: Any, tmp_path: Path) -> None:
    rw, ro = _dirs(tmp_path)
    name = f"mnt-{uuid.uuid4().hex[:6]}"
    aiva = [sys.executable, "-m", "aiva.cli.main"]
    try:
        r = subprocess.run([*aiva, "init", name, "--mount", f"{ro}:/data:ro", "--mount",
                            str(rw)], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        r = subprocess.run([*aiva, "status", name], capture_output=True, text=True,
                           timeout=60, env={**os.environ, "COLUMNS": "300"})
        assert f"{ro} -> /data (ro)" in r.stdout and f"{rw} -> {rw}" in r.stdout, r.stdout
        r = subprocess.run([*aiva, "init", f"{name}x", "--mount", f"{tmp_path}/none"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode != 0 and r.stderr.startswith("error:")
        assert "does not exist" in r.stderr and "Traceback" not in r.stderr
        assert not engine.exists(f"{name}x")
    finally:
        if engine.exists(name):
            engine.delete(name, volumes=True)


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        try:
            if pid.isdigit() and text.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(int(pid))
        except OSError:
            continue
    return found


@pytest.mark.vm
@pytest.mark.slow
def test_qemu_virtio_fs_rw_and_ro_in_one_boot(docker_ok: Any, engine: Any,
                                              make_sandbox: Any, tmp_path: Path) -> None:
    if shutil.which("qemu-system-x86_64") is None:
        if os.environ.get("CI"):
            pytest.fail("CI needs QEMU: scripts/setup.sh installs qemu-system-x86")
        pytest.skip("qemu-system-x86_64 is not installed")
    if os.geteuid() != 0:
        pytest.skip("--mount on QEMU needs root (virtiofsd and its mount namespace)")
    from aiva.paths import aiva_home

    rw, ro = _dirs(tmp_path)
    # the rw mount lands below the guest's /tmp (a tmpfs /init mounts first)
    sb = make_sandbox(backend="qemu", template="minimal", memory="512MB", disk="1GB",
                      network="none", mounts=[str(rw), f"{ro}:/data/ro:ro"])
    print(f"boot to agent with 2 mounts: {sb.status().runtime['boot_seconds']} s")
    _check_mounts(sb, rw, ro, "/data/ro")
    mounts = sb.commands.run(["cat", "/proc/mounts"]).stdout
    assert f" {rw} virtiofs rw," in mounts and " /data/ro virtiofs ro," in mounts
    assert "/.aiva/host" not in mounts  # the shared tree itself is detached
    # root in the guest remounts it rw: the host's read-only bind mount still refuses
    r = sb.commands.run(["sh", "-c", "mount -o remount,rw /data/ro && echo x > /data/ro/k"])
    assert r.exit_code != 0 and "Read-only file system" in r.stderr, r.stderr
    assert sorted(p.name for p in ro.iterdir()) == ["keep.txt"]
    # the bind mounts live only in virtiofsd's namespace, never in the host's
    assert str(aiva_home() / "vms" / sb.id) not in Path("/proc/self/mountinfo").read_text()

    from aiva import errors

    with pytest.raises(errors.BackendError, match="cannot save its memory"):
        sb.snapshot("s1")
    sb.stop()
    assert not _processes_mentioning(sb.id), "virtiofsd or QEMU outlived the VM"
    assert (rw / "from-guest.txt").read_text() == "from the guest\n"
