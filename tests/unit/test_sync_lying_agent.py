"""sync/pull and copy-out against an agent that lies (tests/unit/lying_agent.py), a real
process over stdio: whatever it says, nothing outside the destination changes, no file
with setuid/setgid bits appears, and the call ends in an AivaError."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import aiva
import aiva.agent
from aiva.agent_client import AgentClient, ProcessTransport
from aiva.agent_client.sync import pull, pull_file, push, sync
from aiva.errors import AivaError, HostFileError, ProtocolError, SyncError

LIAR = Path(__file__).with_name("lying_agent.py")
ROOT = "/r"
T0 = 1_700_000_000 * 10**9
Liar = Callable[..., AgentClient]


@pytest.fixture(autouse=True)
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def liar() -> Iterator[Liar]:
    clients: list[AgentClient] = []

    def start(files: dict[str, dict[str, Any]] | None = None, **cfg: Any) -> AgentClient:
        cfg = dict(cfg, root=ROOT, files=files or {})
        env = dict(os.environ, PYTHONPATH=str(Path(aiva.__file__).parent.parent))
        proc = subprocess.Popen([sys.executable, str(LIAR), json.dumps(cfg)], env=env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        client = AgentClient(ProcessTransport(proc), label="liar")
        clients.append(client)
        return client

    yield start
    for c in clients:
        c.close()


@pytest.fixture
def real_agent() -> Iterator[AgentClient]:
    proc = subprocess.Popen([sys.executable, str(Path(aiva.agent.__file__).parent), "--stdio"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    client = AgentClient(ProcessTransport(proc), label="test-agent")
    try:
        yield client
    finally:
        client.close()


def snapshot(root: Path) -> dict[str, tuple[int, int, str]]:
    out: dict[str, tuple[int, int, str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            st = path.lstat()
            body = os.readlink(path) if path.is_symlink() else \
                path.read_bytes().hex() if stat.S_ISREG(st.st_mode) else ""
            out[str(path.relative_to(root))] = (st.st_mode, st.st_size, body)
    return out


def no_powers(root: Path) -> None:
    """No setuid/setgid/sticky file, no device, FIFO or socket anywhere under ``root``."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            st = Path(dirpath, name).lstat()
            assert not st.st_mode & 0o7000, f"{dirpath}/{name} has mode {st.st_mode:o}"
            assert stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode) or \
                stat.S_ISLNK(st.st_mode), f"{dirpath}/{name} is a special file"


@pytest.fixture
def box(tmp_path: Path) -> tuple[Path, Path]:
    """(destination, a sibling directory the sandbox must never reach)."""
    dest, outside = tmp_path / "dest", tmp_path / "outside"
    dest.mkdir()
    outside.mkdir()
    (outside / "victim").write_text("keep me")
    return dest, outside


def climb(dest: Path, target: Path) -> str:
    """A relative path that, joined to ``dest``, lands on the absolute ``target``."""
    return "../" * (len(dest.parts) + 3) + str(target).lstrip("/")


def outside_untouched(tmp_path: Path, dest: Path, before: dict[str, Any]) -> None:
    after = {k: v for k, v in snapshot(tmp_path).items()
             if k != "dest" and not k.startswith("dest/")}
    assert after == {k: v for k, v in before.items()
                     if k != "dest" and not k.startswith("dest/")}
    no_powers(tmp_path)


def test_a_walk_climbing_out_with_dotdot_is_refused(liar: Liar, box: tuple[Path, Path],
                                                    tmp_path: Path) -> None:
    dest, outside = box
    evil = climb(dest, outside / "evil")
    client = liar({evil: {"size": 4, "mode": 0o6777}, "ok": {"size": 2}})
    before = snapshot(tmp_path)
    with pytest.raises(ProtocolError, match=r"\.\."):  # (checked here or by the client)
        pull(client, dest, ROOT)
    outside_untouched(tmp_path, dest, before)
    assert not (outside / "evil").exists()
    assert os.listdir(dest) == []  # refused before any transfer


@pytest.mark.parametrize("direction", ["pull", "both"])
def test_an_absolute_walk_path_is_a_protocol_error_not_a_crash(
        liar: Liar, box: tuple[Path, Path], tmp_path: Path, direction: str) -> None:
    dest, outside = box
    client = liar({str(outside / "abs-evil"): {"size": 4, "mode": 0o4755}})
    before = snapshot(tmp_path)
    with pytest.raises(ProtocolError):
        sync(client, dest, ROOT, direction=direction)  # type: ignore[arg-type]
    outside_untouched(tmp_path, dest, before)


@pytest.mark.parametrize("entry", [[1, 2], ["1", 0, 0], [1, 0, -5], {"size": 1}, None,
                                   [True, 0, 0]])
def test_walk_entries_of_the_wrong_shape_are_protocol_errors(
        liar: Liar, box: tuple[Path, Path], entry: Any) -> None:
    client = liar(walk={"f": entry})
    with pytest.raises(ProtocolError):
        pull(client, box[0], ROOT)


def test_a_setuid_mode_arrives_without_its_powers(liar: Liar, box: tuple[Path, Path],
                                                  tmp_path: Path) -> None:
    dest, _ = box
    client = liar({"bin/sh": {"size": 3, "mode": 0o6777, "mtime_ns": T0},
                   "sticky": {"size": 1, "mode": 0o1777}})
    report = pull(client, dest, ROOT)
    assert sorted(report.pulled) == ["bin/sh", "sticky"]
    assert stat.S_IMODE((dest / "bin/sh").stat().st_mode) == 0o755
    assert stat.S_IMODE((dest / "sticky").stat().st_mode) == 0o755
    assert (dest / "bin/sh").stat().st_mtime_ns == T0
    no_powers(tmp_path)


def test_more_bytes_than_declared_fail_and_leave_no_file(liar: Liar, box: tuple[Path, Path],
                                                         tmp_path: Path) -> None:
    dest, _ = box
    client = liar({"f": {"size": 10, "send": 10 << 20}})
    before = snapshot(tmp_path)
    with pytest.raises(AivaError) as exc:
        pull(client, dest, ROOT)
    assert isinstance(exc.value, ProtocolError), exc.value
    assert os.listdir(dest) == []
    outside_untouched(tmp_path, dest, before)


def test_fewer_bytes_than_declared_fail_and_leave_no_file(liar: Liar,
                                                          box: tuple[Path, Path]) -> None:
    dest, _ = box
    client = liar({"f": {"size": 10, "send": 5}})
    with pytest.raises(ProtocolError):
        pull(client, dest, ROOT)
    assert os.listdir(dest) == []


def test_a_read_header_that_lies_about_its_size_is_capped(liar: Liar,
                                                          box: tuple[Path, Path]) -> None:
    """The walk said 4 bytes; the read's own header says 8 and sends 8: the header is what
    is checked against, consistently; a bad header type is a ProtocolError."""
    dest, _ = box
    client = liar({"f": {"size": 4, "read_size": 8}})
    assert pull(client, dest, ROOT).bytes_received == 8
    client = liar({"g": {"size": 4, "read_size": -1, "send": 0}})
    with pytest.raises(ProtocolError, match="size"):
        pull(client, dest, ROOT)


def test_a_huge_declared_size_is_refused_before_a_byte_lands(liar: Liar,
                                                             box: tuple[Path, Path]) -> None:
    """A 1 PB (sparse, say) file in the sandbox must not fill the host's disk."""
    dest, _ = box
    client = liar({"small": {"size": 3}, "sparse.img": {"size": 1 << 50, "send": 0}})
    with pytest.raises(SyncError, match="not enough space") as exc:
        pull(client, dest, ROOT)
    assert exc.value.hint
    assert os.listdir(dest) == []


def test_a_read_header_bigger_than_the_disk_is_refused(liar: Liar,
                                                       box: tuple[Path, Path]) -> None:
    dest, _ = box
    client = liar({"f": {"size": 1, "read_size": 1 << 50, "send": 0}})
    with pytest.raises(SyncError, match="not enough space"):
        pull(client, dest, ROOT)
    assert os.listdir(dest) == []


def test_copy_out_masks_caps_and_refuses_links(liar: Liar, box: tuple[Path, Path],
                                               tmp_path: Path) -> None:
    dest, outside = box
    client = liar({"tool": {"size": 5, "mode": 0o6755}, "big": {"size": 10, "send": 1 << 20},
                   "huge": {"size": 1 << 50, "send": 0}})
    assert pull_file(client, f"{ROOT}/tool", dest).size == 5  # into the directory
    assert stat.S_IMODE((dest / "tool").stat().st_mode) == 0o755
    pull_file(client, f"{ROOT}/tool", dest / "renamed")
    assert (dest / "renamed").read_bytes() == b"xxxxx"
    (dest / "link").symlink_to(outside / "victim")
    before = snapshot(tmp_path)
    with pytest.raises(HostFileError, match="symbolic link"):
        pull_file(client, f"{ROOT}/tool", dest / "link")
    with pytest.raises(ProtocolError):
        pull_file(client, f"{ROOT}/big", dest / "big")
    with pytest.raises(HostFileError, match="not enough space"):
        pull_file(client, f"{ROOT}/huge", dest / "huge")
    assert snapshot(tmp_path) == before
    no_powers(tmp_path)


def test_two_way_sync_never_writes_through_a_local_link(real_agent: AgentClient,
                                                        tmp_path: Path) -> None:
    """The issue's scenario: the local tree holds a link to another host directory, and
    the sandbox puts a file under that name. The sync stops with a clear error instead
    of writing into the other directory."""
    local, remote, other = tmp_path / "local", tmp_path / "remote", tmp_path / "other"
    for d in (local, remote, other):
        d.mkdir()
    (other / "precious").write_text("keep me")
    (local / "mine.txt").write_text("mine")
    (local / "shared").symlink_to(other)
    (remote / "shared").mkdir()
    (remote / "shared" / "planted").write_text("evil")
    (remote / "shared" / "precious").write_text("overwritten")
    before = snapshot(other)
    with pytest.raises(SyncError, match="symbolic link") as exc:
        sync(real_agent, local, str(remote), state_file=tmp_path / "state.json")
    assert exc.value.hint
    assert snapshot(other) == before
    assert (local / "shared").is_symlink()


def test_delete_never_follows_a_link_swapped_into_the_local_tree(
        real_agent: AgentClient, tmp_path: Path) -> None:
    """A file the sandbox deleted is deleted here by name under the root's descriptor:
    when its directory became a link to elsewhere, nothing elsewhere is removed."""
    local, remote, other = tmp_path / "local", tmp_path / "remote", tmp_path / "other"
    for d in (local, remote, other):
        d.mkdir()
    (local / "d").mkdir()
    (local / "d" / "f").write_text("x")
    (remote / "d").mkdir()
    (remote / "d" / "f").write_text("x")
    state = tmp_path / "state.json"
    sync(real_agent, local, str(remote), state_file=state)
    (remote / "d" / "f").unlink()
    (other / "f").write_text("keep me")
    (local / "d").rename(local / "d.moved")
    (local / "d").symlink_to(other)
    report = sync(real_agent, local, str(remote), delete=True, state_file=state)
    assert (other / "f").read_text() == "keep me"
    assert report.deleted_local == []


def test_push_never_reads_through_a_local_link(real_agent: AgentClient,
                                               tmp_path: Path) -> None:
    local, remote, other = tmp_path / "local", tmp_path / "remote", tmp_path / "other"
    for d in (local, remote, other):
        d.mkdir()
    (other / "secret").write_text("root only")
    (local / "ok.txt").write_text("ok")
    (local / "s").symlink_to(other / "secret")
    (local / "dirlink").symlink_to(other)
    (local / "suid").write_text("#!/bin/sh\n")
    (local / "suid").chmod(0o4755)
    report = sync(real_agent, local, str(remote), direction="push")
    assert sorted(report.pushed) == ["ok.txt", "suid"]
    assert sorted(os.listdir(remote)) == ["ok.txt", "suid"]
    assert stat.S_IMODE((remote / "suid").stat().st_mode) == 0o755


def test_a_gitignore_fifo_or_link_is_not_followed_or_waited_on(real_agent: AgentClient,
                                                               tmp_path: Path) -> None:
    local, remote, other = tmp_path / "local", tmp_path / "remote", tmp_path / "other"
    for d in (local, remote, other):
        d.mkdir()
    (other / "ignore-all").write_text("*\n")
    (local / "f.txt").write_text("f")
    (local / ".gitignore").symlink_to(other / "ignore-all")
    assert push(real_agent, local, str(remote)).pushed == ["f.txt"]
    (local / ".gitignore").unlink()
    os.mkfifo(local / ".gitignore")
    (local / "g.txt").write_text("g")
    assert push(real_agent, local, str(remote)).pushed == ["g.txt"]


def test_a_local_name_of_raw_bytes_still_syncs(real_agent: AgentClient,
                                               tmp_path: Path) -> None:
    local, remote = tmp_path / "local", tmp_path / "remote"
    local.mkdir()
    remote.mkdir()
    (local / os.fsdecode(b"caf\xe9")).write_text("x")
    assert push(real_agent, local, str(remote)).pushed == [os.fsdecode(b"caf\xe9")]
    assert os.listdir(os.fsencode(remote)) == [b"caf\xe9"]


def test_a_state_file_with_bad_names_is_ignored_not_followed(real_agent: AgentClient,
                                                             tmp_path: Path) -> None:
    local, remote = tmp_path / "local", tmp_path / "remote"
    local.mkdir()
    remote.mkdir()
    (remote / "f").write_text("f")
    state = tmp_path / "state.json"
    entry = {"size": 1, "local_mtime_ns": 0, "remote_mtime_ns": 0}
    state.write_text(json.dumps({"version": 1, "local": str(local), "remote": str(remote),
                                 "files": {"/etc/x": entry, "../y": entry, "f": entry}}))
    assert sync(real_agent, local, str(remote), state_file=state).pulled == ["f"]
    assert sorted(json.loads(state.read_text())["files"]) == ["f"]
    assert stat.S_IMODE(state.stat().st_mode) == 0o600
