"""A hostile Docker sandbox against the host, for real: the run dir is a nosuid,nodev,noexec
tmpfs, the container has no CAP_MKNOD and no-new-privileges, a syslog swapped for links
or a FIFO leaks nothing and hangs nothing, an agent socket replaced by a link to a host
socket is refused, AIVA_HOME is private, and 100 MB of output stay out of the command log."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from aiva import paths
from aiva.guard import runmount
from aiva.observe.logs import read_command_log

pytestmark = pytest.mark.docker

AIVA = [sys.executable, "-m", "aiva.cli.main"]
RUN = "/.aiva/run"  # the run dir inside the container


def aiva(*args: str, env: dict[str, str] | None = None, timeout: float = 120
         ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*AIVA, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def sh(sb: Any, script: str, **kw: Any) -> Any:
    return sb.commands.run(["sh", "-c", script], **kw)


@pytest.fixture
def hostdir() -> Iterator[Path]:
    """A root-only host directory with a short path (a socket lives in it)."""
    d = Path(tempfile.mkdtemp(prefix="aiva-h"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_run_dir_mount_and_container_hardening(make_sandbox: Any, docker_ok: Any) -> None:
    sb = make_sandbox()
    run = paths.run_dir(sb.id)
    flags = os.statvfs(run).f_flag
    assert flags & os.ST_NOSUID and flags & os.ST_NODEV and flags & os.ST_NOEXEC
    out = subprocess.run(["findmnt", "-n", "-o", "FSTYPE,OPTIONS", str(run)],
                         capture_output=True, text=True, check=True).stdout
    assert out.startswith("tmpfs") and all(f in out for f in ("nosuid", "nodev", "noexec"))

    attrs = docker_ok.containers.get(sb.info.runtime["container_id"]).attrs["HostConfig"]
    assert "no-new-privileges" in attrs["SecurityOpt"]
    assert {"MKNOD", "NET_RAW"} <= set(attrs["CapDrop"])

    # inside: the bind mount keeps the flags, device nodes cannot be made
    r = sh(sb, f"grep ' {RUN} ' /proc/self/mountinfo; grep NoNewPrivs /proc/self/status")
    assert r.exit_code == 0, r.stderr
    assert all(f in r.stdout.split(" - ")[0] for f in ("nosuid", "nodev", "noexec"))
    assert "NoNewPrivs:\t1" in r.stdout
    for where in ("/tmp/null", f"{RUN}/null"):
        r = sb.commands.run(["mknod", where, "c", "1", "3"])
        assert r.exit_code != 0 and "Operation not permitted" in r.stderr, r
    assert not (run / "null").exists()

    # a setuid root binary planted in the run dir: inert on the host and in the container
    r = sh(sb, f"cp /usr/bin/id {RUN}/id && chmod 4755 {RUN}/id && {RUN}/id -u")
    assert r.exit_code != 0 and "Permission denied" in r.stderr  # noexec inside too
    planted = run / "id"
    st = os.lstat(planted)
    assert stat.S_ISREG(st.st_mode) and st.st_mode & stat.S_ISUID and st.st_uid == 0
    with pytest.raises(PermissionError):  # noexec on the host: not even root runs it
        subprocess.run([str(planted), "-u"], capture_output=True, check=False)
    setpriv = shutil.which("setpriv")
    if setpriv is not None:  # an unprivileged host user cannot reach it at all
        r2 = subprocess.run([setpriv, "--reuid=65534", "--regid=65534", "--clear-groups",
                             str(planted), "-u"], capture_output=True, text=True)
        assert r2.returncode != 0 and r2.stdout.strip() != "0"

    # no-new-privileges: a setuid binary on the (suid-capable) volume gives nobody nothing
    r = sh(sb, "cp /usr/bin/id ./id-suid && chmod 4755 ./id-suid && ls -l ./id-suid")
    assert r.exit_code == 0 and r.stdout.startswith("-rws"), r
    r = sb.commands.run(["./id-suid", "-u"], user="nobody")
    assert r.exit_code == 0, r.stderr
    assert r.stdout.strip() == "65534"  # not 0

    # the syslog stays readable once stopped; a start after the mount vanished (a host
    # reboot) makes it again; rm unmounts and removes it
    assert sb.commands.run(["logger", "-t", "hard", "before-stop"]).exit_code == 0
    sb.stop()
    assert runmount.is_private_mount(run)
    deadline = time.monotonic() + 20
    while not any(x.text == "hard: before-stop" for x in sb.logs() if x.source == "syslog"):
        assert time.monotonic() < deadline, "the syslog line never showed"
        time.sleep(0.05)
    runmount.release(run)  # what a reboot does to it
    assert not runmount.is_private_mount(run)
    sb.start()
    assert runmount.is_private_mount(run)
    assert sb.commands.run(["true"]).exit_code == 0
    sb.destroy()
    assert run not in runmount.mounts_under(run.parent)
    assert not run.exists()


def test_syslog_swapped_between_links_and_files_leaks_nothing(
        make_sandbox: Any, engine: Any, hostdir: Path) -> None:
    secret = hostdir / "secret.jsonl"
    word = f"SECRET-{uuid.uuid4().hex}"
    secret.write_text(json.dumps({"t": time.time(), "s": "syslog", "d": word}) + "\n")
    secret.chmod(0o600)
    nowhere = hostdir / "made-by-follow.jsonl"  # a link to where nothing is
    sb = make_sandbox()
    run = paths.run_dir(sb.id)
    log = f"{RUN}/syslog.jsonl"
    line = json.dumps({"t": time.time(), "s": "syslog", "d": "plain"})
    loop = (f"i=0; while [ $i -lt 1000 ]; do i=$((i+1)); "
            f"ln -sfn {secret} {log}; ln -sfn {secret} {log}.1; "
            f"ln -sfn {nowhere} {log}; rm -f {log} {log}.1; "
            f"echo '{line}' > {log}; done; echo '{line}' > {log}")
    follower = subprocess.Popen([*AIVA, "logs", "-f", sb.name], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    followed: list[str] = []
    threading.Thread(target=lambda: followed.extend(follower.stdout or []),
                     daemon=True).start()
    try:
        swapper = threading.Thread(target=lambda: sh(sb, loop, timeout=300))
        swapper.start()
        reads: list[str] = []
        cli_runs = 0
        while swapper.is_alive():  # read as often as we can while the guest swaps
            reads += [x.text for x in engine.logs(sb.name)]
            reads += [x.text for x in sb.logs()]
            if cli_runs < 3:
                r = aiva("logs", sb.name, "--source", "syslog")
                assert r.returncode == 0, r.stderr
                reads.append(r.stdout + r.stderr)
                cli_runs += 1
        swapper.join()
        assert cli_runs >= 1
        assert any("plain" in x for x in reads) or any(
            x.text == "plain" for x in engine.logs(sb.name))  # the file itself was read
    finally:
        follower.terminate()
        follower.wait(30)
    assert not any(word in x for x in reads)
    assert not any(word in x for x in followed)
    assert not os.path.lexists(nowhere)  # no file made through the link
    assert sorted(os.listdir(hostdir)) == ["secret.jsonl"]
    assert secret.read_text().count(word) == 1 and stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert run.is_dir()


def test_a_fifo_as_syslog_hangs_nothing(make_sandbox: Any, engine: Any) -> None:
    sb = make_sandbox()
    r = sh(sb, f"rm -f {RUN}/syslog.jsonl {RUN}/syslog.jsonl.1 && "
               f"mkfifo {RUN}/syslog.jsonl && mkfifo {RUN}/syslog.jsonl.1")
    assert r.exit_code == 0, r.stderr
    assert stat.S_ISFIFO(os.lstat(paths.run_dir(sb.id) / "syslog.jsonl").st_mode)
    r = aiva("logs", sb.name, "--source", "syslog", timeout=60)
    assert r.returncode == 0, r.stderr
    assert "not a regular file" in r.stderr and "Traceback" not in r.stderr
    r = aiva("logs", sb.name, timeout=60)
    assert r.returncode == 0, r.stderr
    assert [x for x in engine.logs(sb.name) if x.source == "syslog"] == []
    # following: the other logs still come through while the FIFO sits there
    seen: list[str] = []
    threading.Thread(target=lambda: [seen.append(x.text) for x in engine.follow_logs(sb.name)],
                     daemon=True).start()
    deadline = time.monotonic() + 30
    while "fifo-ok\n" not in seen:
        assert time.monotonic() < deadline, "follow_logs stalled"
        assert sb.commands.run(["echo", "fifo-ok"]).exit_code == 0


class HostSocket:
    """A Unix socket on the host that records every byte anyone sends it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(8)
        self.received = b""
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._drain, args=(conn,), daemon=True).start()

    def _drain(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(30)
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                self.received += data

    def close(self) -> None:
        self.sock.close()


def test_an_agent_socket_swapped_for_a_link_to_a_host_socket_is_refused(
        make_sandbox: Any, hostdir: Path) -> None:
    host = HostSocket(hostdir / "h.sock")
    try:
        sb = make_sandbox()
        r = sh(sb, f"ln -s {host.path} {RUN}/evil && mv -f {RUN}/evil {RUN}/agent.sock")
        assert r.exit_code == 0, r.stderr
        assert (paths.run_dir(sb.id) / "agent.sock").is_symlink()
        r = aiva("exec", sb.name, "--", "echo", "hi")  # a new process: a new connection
        assert r.returncode != 0, r.stdout
        assert r.stderr.startswith("error:") and "Traceback" not in r.stderr
        assert "hi" not in r.stdout
        assert host.received == b""
        # a restart brings the real agent back
        r = aiva("stop", sb.name)
        assert r.returncode == 0, r.stderr
        r = aiva("start", sb.name)
        assert r.returncode == 0, r.stderr
        r = aiva("exec", sb.name, "--", "echo", "hi")
        assert r.returncode == 0 and r.stdout.strip() == "hi", r.stderr
    finally:
        host.close()
    assert host.received == b""


def test_command_log_keeps_at_most_the_cap_of_100_mb_of_output(make_sandbox: Any,
                                                              engine: Any) -> None:
    sb = make_sandbox()
    total = 100_000_000
    res = engine.exec(sb.name, f"head -c {total} /dev/zero | tr '\\0' a",
                      keep_output=False, timeout=300)
    assert res.exit_code == 0
    log = paths.logs_dir(sb.id) / "commands.jsonl"
    cap = 8 << 20
    assert log.stat().st_size < cap * 1.2
    lines = read_command_log(sb.id)
    kept = sum(len(x.text) for x in lines if x.source == "stdout")
    assert kept == cap
    cut = [json.loads(raw) for raw in log.read_text().splitlines() if '"s": "cut"' in raw]
    assert len(cut) == 1 and cut[0]["n"] == total - cap
    assert [x.source for x in lines][-2:] == ["cut", "exit"]


def test_a_fresh_home_keeps_everything_private(python_image: str, docker_ok: Any) -> None:
    home = Path(tempfile.mkdtemp(prefix="aiva-p"))
    home.chmod(0o755)  # as if made by hand: aiva tightens it
    (home / "cache").symlink_to(Path(os.environ["AIVA_HOME"]) / "cache",
                                target_is_directory=True)
    env = {"AIVA_HOME": str(home)}
    name = f"priv-{uuid.uuid4().hex[:6]}"
    local = home.parent / f"{home.name}-data"
    local.mkdir()
    (local / "f.txt").write_text("data")
    try:
        for args in (("start", name, "-e", "API_KEY=sk-secret"),
                     ("exec", name, "--", "sh", "-c", "echo out; logger hi"),
                     ("data", name, "sync", str(local), "/workspace/d"),
                     ("logs", name), ("ls",)):
            r = aiva(*args, env=env)
            assert r.returncode == 0, (args, r.stderr)
        assert stat.S_IMODE(home.stat().st_mode) == 0o700
        found = subprocess.run(["find", str(home), "-perm", "/077", "-not", "-type", "l"],
                               capture_output=True, text=True, check=True).stdout.split()
        # public on purpose: the agent bundle (mounted into containers); the guest's own
        # files: its socket and syslog in its run dir (a 0700 tmpfs), its file tree on its
        # disk and the image's seed below it (both in 0700 directories)
        disks = home / "disks"
        guest = [d for d in disks.glob("*/mnt")] + list(disks.glob(".seed/*"))
        allowed = [p for p in found if p.startswith(f"{home}/agent")
                   or Path(p).parent.parent == home / "run"
                   or any(d == Path(p) or d in Path(p).parents for d in guest)]
        assert sorted(set(found) - set(allowed)) == []
        for d in [disks, *disks.iterdir()]:  # what holds them
            assert stat.S_IMODE(d.lstat().st_mode) == 0o700, d
        assert any(p.endswith("agent.sock") for p in allowed)  # the check saw the run dir
        assert stat.S_IMODE((home / "state.db").stat().st_mode) == 0o600
    finally:
        aiva("rm", "-v", name, env=env)
        for c in docker_ok.containers.list(all=True, filters={"label": f"aiva.home={home}"}):
            c.remove(force=True)
        for v in docker_ok.volumes.list(filters={"label": f"aiva.home={home}"}):
            v.remove(force=True)
        for m in runmount.mounts_under(home / "run"):
            runmount.release(m)
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(local, ignore_errors=True)


def test_orphan_run_dirs_of_this_home_are_reaped_and_nothing_else(
        make_sandbox: Any, engine: Any, monkeypatch: pytest.MonkeyPatch, hostdir: Path
        ) -> None:
    from aiva.backends import docker as docker_backend
    from aiva.engine import lifetimes

    live = make_sandbox()
    live_run = paths.run_dir(live.id)
    orphan = paths.run_dir(str(uuid.uuid4()))  # a sandbox gone without its rm
    other_home = hostdir / "run" / str(uuid.uuid4())[:12]  # another AIVA_HOME's
    plain = paths.run_dir(str(uuid.uuid4()))  # a VM's run dir: a plain directory
    plain.mkdir(parents=True)
    try:
        assert runmount.ensure(orphan) and runmount.ensure(other_home)
        (orphan / "syslog.jsonl").write_text("left behind")
        def known() -> set[str]:
            return {sb.id for sb in engine.store.all()}

        assert orphan.name not in engine.backend("docker").reap_run_dirs(known)  # too fresh
        monkeypatch.setattr(docker_backend, "ORPHAN_AGE", -1.0)

        assert lifetimes.reap_run_dirs(engine, known) == [orphan.name]
        assert not orphan.exists()
        assert runmount.is_private_mount(live_run)  # its sandbox is known
        assert runmount.is_private_mount(other_home)
        assert plain.is_dir()
        assert live.commands.run(["true"]).exit_code == 0
    finally:
        for d in (orphan, other_home):
            runmount.release(d)
        plain.rmdir()


def test_a_socket_served_from_outside_the_container_is_refused(make_sandbox: Any) -> None:
    """What the link refusal cannot see: a real socket at the path whose server is not
    in the container (here the test itself, on the host) fails the SO_PEERCRED check."""
    sb = make_sandbox()
    path = paths.run_dir(sb.id) / "agent.sock"
    path.unlink()
    host = HostSocket(path)
    try:
        r = aiva("exec", sb.name, "--", "echo", "hi")
        assert r.returncode != 0, r.stdout
        assert "outside its container" in r.stderr and "Traceback" not in r.stderr
        deadline = time.monotonic() + 10
        while not host.accepted:  # it did connect (our accept may lag), then sent nothing
            assert time.monotonic() < deadline, "aiva never connected"
            time.sleep(0.02)
        assert host.received == b""
    finally:
        host.close()
    sb.stop()
    sb.start()
    assert sb.commands.run(["echo", "back"]).stdout == "back\n"
    assert host.received == b""


def test_what_a_sandbox_writes_to_the_container_log_is_bounded(make_sandbox: Any,
                                                                docker_ok: Any) -> None:
    """Root in the sandbox can write to its first process's stdout (Docker's log of the
    container): 60 MB there leave at most two 8 MB files on the host."""
    sb = make_sandbox()
    c = docker_ok.containers.get(sb._info.runtime["container_id"])
    assert c.attrs["HostConfig"]["LogConfig"] == {
        "Type": "json-file", "Config": {"max-size": "8m", "max-file": "2"}}
    res = sb.commands.run("head -c 60000000 /dev/zero | tr '\\0' 'a' | fold -w 1000 "
                          "> /proc/1/fd/1", timeout=300)
    assert res.exit_code == 0, res.stderr
    log_dir = Path(c.attrs["LogPath"]).parent

    def logs() -> tuple[list[Path], int]:
        sizes = {}
        for p in log_dir.iterdir():
            if p.name.startswith(c.id + "-json.log"):
                with contextlib.suppress(FileNotFoundError):  # rotated away meanwhile
                    sizes[p] = p.stat().st_size
        return list(sizes), sum(sizes.values())

    # Docker's log driver writes behind the command: wait until it has rotated once
    deadline = time.monotonic() + 120
    files, total = logs()
    while not (len(files) == 2 and total >= 8_000_000) and time.monotonic() < deadline:
        time.sleep(0.2)
        files, total = logs()
    assert files and total <= 2 * (8 << 20) + (1 << 20), (files, total)
    # the flood did reach the log and rotate it: the cap is what held it
    assert len(files) == 2 and total >= 8_000_000, (files, total)
