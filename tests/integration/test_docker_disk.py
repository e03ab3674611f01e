"""The Docker disk limit on a real engine: a sandbox that fills its ext4 disk gets ENOSPC
wherever it may write, EROFS everywhere else, and the host's free space does not move
past the limit; the disk survives stop/start, snapshots, forks and a lost mount."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from aiva import errors
from aiva.backends import docker_disk
from aiva.cli import output

pytestmark = pytest.mark.docker

LIMIT = 100 * 1024 * 1024
# Writes at most CAP bytes to a file, then prints the errno it stopped on ("0": none).
FILL = """
import errno, sys
path, cap = sys.argv[1], int(sys.argv[2])
block = b"x" * (1 << 20)
done, code = 0, 0
try:
    with open(path, "wb") as f:
        while done < cap:
            f.write(block)
            f.flush()
            done += len(block)
        import os
        os.fsync(f.fileno())
except OSError as exc:
    code = exc.errno
print(code, done)
"""


def fill(sb: Any, path: str, cap: int = 3 * LIMIT) -> tuple[int, int]:
    r = sb.commands.run(["python3", "-c", FILL, path, str(cap)])
    assert r.exit_code == 0, r.stderr
    code, done = r.stdout.split()
    return int(code), int(done)


def free(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def loops_of(image: Path) -> list[str]:
    out = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if str(image) in line]


def gone_soon(cond: Any, timeout: float = 15.0) -> None:
    """The kernel frees a lazily unmounted loop device once its last user is gone."""
    import time

    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "the loop device stayed attached"
        time.sleep(0.1)


def test_a_full_disk_is_enospc_everywhere_writable_and_the_host_keeps_its_space(
        make_sandbox: Any, docker_ok: Any) -> None:
    sb = make_sandbox(disk="100MB")
    image = docker_disk.image_path(sb.id)
    home = str(image.parent)
    before = {p: free(p) for p in (home, "/var/lib/docker")}
    for where in ("/workspace/fill", "/tmp/fill", "/usr/local/fill", "/root/fill", "/app/fill",
                  "/home/fill", "/var/tmp/fill", "/opt/fill",
                  "/run/fill", "/dev/shm/fill"):  # two small tmpfs, counted as memory
        code, done = fill(sb, where)
        assert code == errno.ENOSPC, f"{where}: stopped with errno {code} after {done} B"
        assert done <= LIMIT
        if where == "/root/fill":  # the host measures while the disk is full
            for path, was in before.items():
                assert was - free(path) < LIMIT + 64 * 1024 * 1024, path
            assert image.stat().st_blocks * 512 <= LIMIT + 1024 * 1024
            api = docker_ok.api
            url = api._url("/containers/{0}/json", sb.info.runtime["container_id"])
            size_rw = api._result(api._get(url, params={"size": 1}), True).get("SizeRw") or 0
            assert size_rw < 1024 * 1024  # nothing in the container's writable layer
        assert sb.commands.run(["rm", "-f", where]).exit_code == 0
    # freed again: the sandbox goes on working
    assert sb.commands.run("python3 -m venv --without-pip /tmp/venv && "
                           "/tmp/venv/bin/python -c 'print(1)'").stdout == "1\n"
    assert "(enforced" in output._disk(sb.info) and " used" in output._disk(sb.info)


def test_the_system_image_is_read_only(make_sandbox: Any) -> None:
    sb = make_sandbox(disk="100MB")
    for path in ("/etc/evil", "/usr/bin/evil", "/var/lib/evil", "/evil"):
        r = sb.commands.run(["python3", "-c", "import sys\ntry:\n open(sys.argv[1], 'w')\n"
                             "except OSError as e:\n print(e.errno)", path])
        assert r.stdout.strip() == str(errno.EROFS), path
    # what the image had in the writable paths is still there
    assert sb.commands.run("test -f /root/.bashrc && stat -c %a /tmp /root").stdout.split() \
        == ["1777", "700"]


def test_data_survives_stop_start_and_a_lost_mount(make_sandbox: Any, docker_ok: Any,
                                                   engine: Any) -> None:
    sb = make_sandbox(disk="100MB")
    sb.commands.run("echo work > /workspace/a; echo local > /usr/local/b; echo home > ~/c")
    sb.stop()
    # a reboot: the mount and its loop device are gone
    image = docker_disk.image_path(sb.id)
    docker_disk.unmount(sb.id)
    assert not docker_disk.is_mounted(sb.id) and not loops_of(image)
    # the container cannot start on the host's disk instead of its own
    with pytest.raises(Exception, match=r"(?i)no such file|not exist"):
        docker_ok.containers.get(sb.info.runtime["container_id"]).start()
    sb.start()
    assert docker_disk.is_mounted(sb.id)
    assert sb.commands.run("cat /workspace/a /usr/local/b ~/c").stdout == "work\nlocal\nhome\n"


def test_snapshot_restore_and_fork_keep_the_data_and_the_limit(make_sandbox: Any,
                                                               engine: Any) -> None:
    sb = make_sandbox(disk="100MB")
    sb.commands.run("echo v1 > /workspace/f; mkdir -p /usr/local/lib/x && echo lib > "
                    "/usr/local/lib/x/y; truncate -s 1T /workspace/sparse; rm /root/.bashrc")
    snap = sb.snapshot("s1")  # the 1 TB hole stays a hole on the host and back
    assert snap.get("layout") == "disk"
    sb.commands.run("echo v2 > /workspace/f; rm -r /usr/local/lib/x; echo new > /tmp/n")
    sb.restore("s1")
    assert sb.commands.run("cat /workspace/f /usr/local/lib/x/y; test -e /tmp/n"
                           ).stdout == "v1\nlib\n"
    assert sb.commands.run("stat -c '%s %b' /workspace/sparse").stdout == f"{1 << 40} 0\n"
    # a file of the image deleted before the snapshot stays deleted; one kept stays
    assert sb.commands.run("test ! -e /root/.bashrc && test -f /root/.profile").exit_code == 0
    assert fill(sb, "/workspace/big")[0] == errno.ENOSPC
    sb.commands.run("rm /workspace/big")

    fresh = make_sandbox(disk="100MB")
    assert fresh.commands.run("test -f /root/.bashrc").exit_code == 0  # the seed is intact
    fork = engine.fork(f"{sb.name}-fork", sb.name, "s1")
    try:
        from aiva.sdk import Sandbox

        f = Sandbox.connect(fork.name, engine=engine)
        assert f.commands.run("cat /workspace/f /usr/local/lib/x/y").stdout == "v1\nlib\n"
        assert f.commands.run("test ! -e /root/.bashrc && test -f /root/.profile"
                              ).exit_code == 0
        assert fill(f, "/tmp/big")[0] == errno.ENOSPC
        assert docker_disk.image_path(fork.id) != docker_disk.image_path(sb.id)
    finally:
        engine.delete(fork.name, volumes=True)
    assert not docker_disk.disk_dir(fork.id).exists()


def test_rm_detaches_the_loop_and_keeps_or_removes_the_image(make_sandbox: Any,
                                                             engine: Any) -> None:
    kept = make_sandbox(disk="100MB")
    gone = make_sandbox(disk="100MB")
    kept.commands.run("echo keep > /workspace/k")
    kept_image, gone_image = (docker_disk.image_path(s.id) for s in (kept, gone))
    assert loops_of(kept_image) and loops_of(gone_image)

    engine.delete(kept.name)  # the data stays, as a kept volume does
    assert kept_image.is_file()
    gone_soon(lambda: not loops_of(kept_image))
    assert not docker_disk.is_mounted(kept.id)
    subprocess.run(["rm", "-r", str(kept_image.parent)], check=True)  # removable by hand

    engine.delete(gone.name, volumes=True)
    assert not gone_image.parent.exists()
    gone_soon(lambda: not loops_of(gone_image))


def test_orphan_disks_of_this_home_are_unmounted(engine: Any) -> None:
    from aiva.engine import lifetimes

    sid = "0123abcd-0000-4000-8000-00000000d15c"
    try:
        docker_disk.make(sid, 64 * 1024 * 1024)
        assert docker_disk.is_mounted(sid)
        gone = lifetimes.reap_disks(engine, lambda: {s.id for s in engine.store.all()})
        assert sid in gone and not docker_disk.is_mounted(sid)
        assert docker_disk.image_path(sid).is_file()  # kept, as rm without --volumes
    finally:
        docker_disk.remove(sid)


def test_a_tiny_disk_is_a_clear_error(make_sandbox: Any) -> None:
    with pytest.raises(errors.AivaError):
        make_sandbox(disk="1KB")


def test_with_enforcement_off_a_sandbox_has_a_volume_and_a_writable_root(
        make_sandbox: Any, engine: Any, docker_ok: Any, monkeypatch: Any) -> None:
    """``enforce_docker_disk: false``: the earlier layout, which old sandboxes keep."""
    monkeypatch.setattr(docker_disk, "enforced", lambda: False)
    sb = make_sandbox()
    volume = sb.info.runtime["volume"]
    assert "disk" not in sb.info.runtime and not docker_disk.disk_dir(sb.id).exists()
    assert "not enforced" in output._disk(sb.info)
    sb.commands.run("echo v1 > /workspace/f; echo r1 > /etc/marker")
    sb.snapshot("s1")
    sb.commands.run("echo v2 > /workspace/f; echo r2 > /etc/marker")
    sb.restore("s1")
    assert sb.commands.run("cat /workspace/f /etc/marker").stdout == "v1\nr1\n"
    monkeypatch.undo()  # a fork of it gets a disk, the workdir filled from the volume
    fresh = make_sandbox(disk="100MB")
    assert fresh.commands.run("test -f /root/.bashrc").exit_code == 0  # the seed is intact
    fork = engine.fork(f"{sb.name}-fork", sb.name, "s1")
    try:
        assert "disk" in fork.runtime
        from aiva.sdk import Sandbox

        f = Sandbox.connect(fork.name, engine=engine)
        assert f.commands.run("cat /workspace/f").stdout == "v1\n"
    finally:
        engine.delete(fork.name, volumes=True)
    engine.delete(sb.name, volumes=True)
    assert not docker_ok.volumes.list(filters={"name": volume})


def test_apt_get_says_the_root_is_read_only_and_how_to_derive(make_sandbox: Any) -> None:
    import sys

    sb = make_sandbox(disk="100MB")
    r = subprocess.run([sys.executable, "-m", "aiva.cli.main", "exec", sb.name, "--",
                        "sh", "-c", "echo x > /usr/bin/tool"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "Read-only file system" in r.stderr
    assert "hint:" in r.stderr and "aiva image derive" in r.stderr
    apt = subprocess.run([sys.executable, "-m", "aiva.cli.main", "exec", sb.name, "--",
                          "apt-get", "install", "-y", "--no-download", "curl"],
                         capture_output=True, text=True, timeout=120)
    assert apt.returncode != 0 and "aiva image derive" in apt.stderr
    ok = subprocess.run([sys.executable, "-m", "aiva.cli.main", "exec", sb.name, "--",
                         "sh", "-c", "echo x > /usr/local/bin/tool"],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "hint" not in ok.stderr


def test_after_a_reboot_the_daemon_loop_mounts_the_disk_again(
        engine: Any, make_sandbox: Any, docker_ok: Any) -> None:
    """The container died with the host and the mount went with it: the restart policy
    brings the sandbox back on its own disk, data and all."""
    import time

    from aiva.engine import lifetimes
    from aiva.models import State

    name = make_sandbox(disk="100MB").name
    spec = engine.get(name).spec.model_copy(update={"restart": "always"})
    sb = engine.store.update(name, spec=spec, runtime=lifetimes.boot_runtime(spec))
    engine.exec(name, "echo before > /workspace/kept")
    docker_ok.containers.get(sb.runtime["container_id"]).kill(signal="SIGKILL")
    docker_ok.containers.get(sb.runtime["container_id"]).wait(timeout=30)
    docker_disk.unmount(sb.id)
    assert not loops_of(docker_disk.image_path(sb.id))
    deadline = time.monotonic() + 60
    while engine.get(name).state != State.RUNNING or not engine.get(name).runtime.get(
            "restarts"):
        assert time.monotonic() < deadline, "the sandbox did not come back"
        lifetimes.tick(engine)
        time.sleep(0.2)
    assert docker_disk.is_mounted(sb.id)
    assert engine.exec(name, "cat /workspace/kept").stdout == "before\n"
