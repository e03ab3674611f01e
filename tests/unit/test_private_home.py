"""AIVA_HOME is private (0700, files 0600), the peer check's cgroup matching, and the run
dir's tmpfs (as root)."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from aiva.errors import ProtocolError
from aiva.guard import peer, private, runmount


def mode(p: Path) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    h = tmp_path / "h" / "home"  # neither exists yet
    monkeypatch.setenv("AIVA_HOME", str(h))
    return h


def test_a_new_home_is_private_whatever_the_umask(home: Path) -> None:
    old = os.umask(0o002)  # a permissive umask must not matter
    try:
        private.ensure_home()
        from aiva.engine.store import Store

        store = Store(home / "state.db")
        store.close()
        fd = private.open_private(home / "logs" / "x" / "commands.jsonl",
                                  os.O_WRONLY | os.O_CREAT)
        os.close(fd)
        private.write_private(home / "daemon.json", "{}")
        acl = private._has_default_acl(home)
        # a writer that knows nothing of this (a library, another module)
        (home / "sync" / "id").mkdir(parents=True)
        (home / "sync" / "id" / "state.json").write_text("{}")
    finally:
        os.umask(old)
    assert mode(home) == 0o700
    assert mode(home / "state.db") == 0o600
    assert mode(home / "logs") == mode(home / "logs" / "x") == 0o700
    assert mode(home / "logs" / "x" / "commands.jsonl") == 0o600
    assert mode(home / "daemon.json") == 0o600
    if acl:  # ext4 and most filesystems have ACLs; where not, only aiva's own writers count
        assert mode(home / "sync") == mode(home / "sync" / "id") == 0o700
        assert mode(home / "sync" / "id" / "state.json") == 0o600
    for public in private.PUBLIC:  # the agent bundle and caches stay readable
        assert mode(home / public) == 0o755


def test_an_open_home_is_tightened_once_with_a_note(home: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    home.mkdir(parents=True, mode=0o755)
    home.chmod(0o755)
    (home / "state.db").write_text("")
    (home / "state.db").chmod(0o644)
    (home / "logs" / "a").mkdir(parents=True)
    (home / "logs" / "a").chmod(0o755)
    (home / "logs" / "a" / "commands.jsonl").write_text("")
    (home / "logs" / "a" / "commands.jsonl").chmod(0o664)
    target = home.parent / "outside"
    target.write_text("")
    target.chmod(0o644)
    (home / "logs" / "link").symlink_to(target)  # never followed
    (home / "run" / "abc").mkdir(parents=True)  # a sandbox writes below run/: left alone
    (home / "run" / "abc" / "syslog.jsonl").write_text("")
    (home / "run" / "abc" / "syslog.jsonl").chmod(0o644)
    private.ensure_home()
    assert "was open to other users" in caplog.text
    assert mode(home) == 0o700
    assert mode(home / "state.db") == 0o600
    assert mode(home / "logs" / "a") == 0o700
    assert mode(home / "logs" / "a" / "commands.jsonl") == 0o600
    assert mode(target) == 0o644
    assert mode(home / "run") == 0o700
    assert mode(home / "run" / "abc" / "syslog.jsonl") == 0o644
    caplog.clear()
    private._ready.clear()
    private.ensure_home()
    assert "was open" not in caplog.text  # once


def test_open_private_refuses_a_link_and_tightens_an_old_file(home: Path,
                                                              tmp_path: Path) -> None:
    private.ensure_home()
    other = tmp_path / "other"
    other.write_text("x")
    (home / "aiva.log").symlink_to(other)
    with pytest.raises(OSError):
        private.open_private(home / "aiva.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    old = home / "events.jsonl"
    old.write_text("")
    old.chmod(0o644)
    os.close(private.open_private(old, os.O_WRONLY | os.O_APPEND))
    assert mode(old) == 0o600


# ---------------------------------------------------------------------- peer

CID = "2a3982e683ffd234f227e9ff1d6413055a3736fc02bf350784641477b2756112"


@pytest.mark.parametrize("paths", [
    [f"/docker/{CID}"],  # cgroupfs driver, v1 line or v2
    ["/", f"/docker/{CID}"],  # hybrid: the v2 line at the root, the v1 lines in it
    [f"/system.slice/docker-{CID}.scope"],  # systemd driver
    [f"/docker/{'1' * 64}/docker/{CID}"],  # Docker in Docker
    [f"/docker/{CID}/init.scope"],  # below it (systemd inside the container)
])
def test_a_container_cgroup_is_recognised(paths: list[str]) -> None:
    assert peer.in_container(paths, CID)


@pytest.mark.parametrize("paths", [
    ["/", "/user.slice/user-0.slice/session-1.scope"],  # the host
    [f"/docker/{'f' * 64}"],  # another container
    [f"/docker/{CID}ab"],  # a longer id that merely starts with ours
    [f"/docker/ab{CID}"],
    [],  # nothing visible
])
def test_anything_else_is_not(paths: list[str]) -> None:
    assert not peer.in_container(paths, CID)


def test_a_peer_outside_the_container_is_refused() -> None:
    a, b = socket.socketpair(socket.AF_UNIX)
    try:
        assert peer.peer_pid(a) == os.getpid()
        assert peer.cgroup_paths(os.getpid())
        with pytest.raises(ProtocolError, match="outside its container"):
            peer.check_container_peer(a, CID, "box")
        with pytest.raises(ProtocolError, match="not a full Docker id"):
            peer.check_container_peer(a, "abc", "box")
    finally:
        a.close()
        b.close()


# ---------------------------------------------------------------------- run dir


def test_mountinfo_escapes_are_read() -> None:
    assert runmount._unescape(b"/a\\040b\\134c") == b"/a b\\c"


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_the_run_dir_is_a_bounded_tmpfs_without_suid_dev_or_exec(tmp_path: Path) -> None:
    run = tmp_path / "run" / "0123456789ab"
    assert runmount.ensure(run)
    try:
        assert runmount.is_private_mount(run)
        assert os.statvfs(run).f_flag & os.ST_NOSUID
        assert run in runmount.mounts_under(tmp_path / "run")
        assert mode(run) == 0o700
        (run / "syslog.jsonl").write_text("kept")
        assert runmount.ensure(run)  # again (a start): the same mount, files kept
        assert (run / "syslog.jsonl").read_text() == "kept"
        out = subprocess.run(["findmnt", "-n", "-o", "FSTYPE,OPTIONS", str(run)],
                             capture_output=True, text=True, check=True).stdout
        assert out.startswith("tmpfs") and "nosuid" in out and "nodev" in out \
            and "noexec" in out and "size=32768k" in out
        with pytest.raises(OSError, match="No space"), open(run / "big", "wb") as f:
            for _ in range(40):  # bounded: ENOSPC past 32 MiB
                f.write(b"\0" * (1 << 20))
                f.flush()
    finally:
        runmount.release(run)
    assert not run.exists()
    assert run not in runmount.mounts_under(tmp_path / "run")


def test_without_root_the_run_dir_is_a_plain_private_directory(
        home: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(runmount, "_warned", False)
    run = home / "run" / "0123456789ab"
    assert runmount.ensure(run) is False
    assert run.is_dir() and not os.path.ismount(run) and mode(run) == 0o700
    assert "not root" in caplog.text and "nosuid" in caplog.text
    caplog.clear()
    assert runmount.ensure(run) is False
    assert "not root" not in caplog.text  # said once per process
    (run / "syslog.jsonl").write_text("x")
    runmount.release(run)
    assert not run.exists()


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None
                    or not any(os.path.exists(p) for p in runmount.DOCKER_PID_FILES),
                    reason="needs root, unshare and a local Docker engine")
def test_a_mount_the_docker_engine_cannot_see_is_not_used(tmp_path: Path) -> None:
    """In a private mount namespace the tmpfs would hide the directory Docker binds:
    the run dir stays a plain directory, with a warning."""
    run = tmp_path / "run" / "0123456789ab"
    code = ("import logging, sys; logging.basicConfig(); from pathlib import Path; "
            "from aiva.guard import runmount; "
            "print(runmount.ensure(Path(sys.argv[1])), runmount.is_private_mount("
            "Path(sys.argv[1])))")
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable,
                        "-c", code, str(run)], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "False"]
    assert "does not see mounts" in r.stderr
    assert run.is_dir() and not os.path.ismount(run)


def test_an_existing_database_is_never_opened_only_chmodded(
        home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Closing any descriptor of a SQLite file drops the POSIX locks this process holds on
    it through its other connections (the daemon's store and collector share one db)."""
    private.ensure_home()
    db = home / "state.db"
    private.make_private_file(db)
    assert mode(db) == 0o600
    db.chmod(0o644)
    real_open = os.open

    def no_reopen(path: Any, flags: int, *a: Any, **kw: Any) -> int:
        fd = real_open(path, flags, *a, **kw)  # a refused O_EXCL makes no descriptor
        assert str(path) != str(db), "an existing database was opened"
        return fd

    monkeypatch.setattr(os, "open", no_reopen)
    private.make_private_file(db)
    assert mode(db) == 0o600
