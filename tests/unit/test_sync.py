"""aiva.sync against the real agent, run locally over stdio: the "remote" tree is a tmp dir."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import aiva.agent
from aiva.agent_client import AgentClient, ProcessTransport
from aiva.agent_client.sync import pull, push, sync
from aiva.errors import SyncError

T0 = 1_700_000_000 * 10**9  # a fixed base mtime: tests never depend on clock resolution


@pytest.fixture
def client() -> Iterator[AgentClient]:
    proc = subprocess.Popen(
        [sys.executable, str(Path(aiva.agent.__file__).parent), "--stdio"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )
    agent = AgentClient(ProcessTransport(proc), label="test-agent")
    try:
        yield agent
    finally:
        agent.close()


@pytest.fixture
def local(tmp_path: Path) -> Path:
    d = tmp_path / "local"
    d.mkdir()
    return d


@pytest.fixture
def remote(tmp_path: Path) -> Path:
    d = tmp_path / "remote"
    d.mkdir()
    return d


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "home" / "sync" / "state.json"


def put(root: Path, rel: str, data: bytes | str, mtime_s: int = 0, mode: int = 0o644) -> Path:
    """Write a file with an explicit mtime (T0 + mtime_s seconds) and mode."""
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    path.chmod(mode)
    os.utime(path, ns=(T0 + mtime_s * 10**9, T0 + mtime_s * 10**9))
    return path


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def seed(root: Path) -> None:
    put(root, "a.txt", "alpha")
    put(root, "sub/b.bin", b"\x00\x01" * 100)
    put(root, "sub/deep/c.md", "# c")


# ---------------------------------------------------------------------- push / pull


def test_first_push_copies_all_then_nothing(client: AgentClient, local: Path,
                                            remote: Path) -> None:
    seed(local)
    first = push(client, local, str(remote))
    assert first.pushed == ["a.txt", "sub/b.bin", "sub/deep/c.md"]
    assert first.bytes_sent == 5 + 200 + 3
    assert first.summary().startswith("pushed 3 (208 B), pulled 0 (0 B)")
    assert tree(remote) == tree(local)

    second = push(client, local, str(remote))
    assert second.pushed == [] and second.bytes_sent == 0
    assert second.unchanged == 3
    assert "pushed 0" in second.summary()
    assert second.to_dict()["unchanged"] == 3


def test_only_the_changed_file_moves(client: AgentClient, local: Path, remote: Path) -> None:
    seed(local)
    push(client, local, str(remote))
    put(local, "sub/b.bin", b"\x07\x08" * 100, mtime_s=60)  # same size, new content
    report = push(client, local, str(remote))
    assert report.pushed == ["sub/b.bin"]
    assert report.bytes_sent == 200
    assert (remote / "sub/b.bin").read_bytes() == b"\x07\x08" * 100


def test_touched_but_equal_file_is_hashed_not_sent(client: AgentClient, local: Path,
                                                    remote: Path, state: Path) -> None:
    seed(local)
    push(client, local, str(remote))
    put(local, "a.txt", "alpha", mtime_s=120)  # new mtime, same bytes
    report = push(client, local, str(remote), state_file=state)
    assert report.pushed == [] and report.unchanged == 3
    assert os.stat(remote / "a.txt").st_mtime_ns == T0  # untouched
    entry = json.loads(state.read_text())["files"]["a.txt"]
    assert entry == {"size": 5, "local_mtime_ns": T0 + 120 * 10**9,
                     "remote_mtime_ns": T0, "sha256": sha(b"alpha")}


def test_unchanged_files_are_not_even_hashed(client: AgentClient, local: Path, remote: Path,
                                             state: Path) -> None:
    seed(local)
    push(client, local, str(remote))
    put(local, "a.txt", "alpha", mtime_s=120)  # equal bytes, so only a hash can tell
    calls: list[list[str]] = []
    real = client.hash_files

    def counting(root: str, paths: list[str]) -> dict[str, str | None]:
        calls.append(paths)
        return real(root, paths)

    client.hash_files = counting  # type: ignore[method-assign]
    push(client, local, str(remote), state_file=state)
    assert calls == [["a.txt"]]  # one batched request, only for the ambiguous file
    push(client, local, str(remote), state_file=state)
    assert calls == [["a.txt"]]  # the state now vouches for it


def test_mtime_and_mode_preserved_both_ways(client: AgentClient, local: Path,
                                            remote: Path, tmp_path: Path) -> None:
    put(local, "run.sh", "#!/bin/sh\necho hi\n", mtime_s=5, mode=0o755)
    put(local, "secret", "s", mtime_s=7, mode=0o600)
    push(client, local, str(remote))
    for name in ("run.sh", "secret"):
        a, b = os.stat(local / name), os.stat(remote / name)
        assert (b.st_mtime_ns, stat.S_IMODE(b.st_mode)) == (a.st_mtime_ns,
                                                             stat.S_IMODE(a.st_mode))
    back = tmp_path / "back"
    pull(client, back, str(remote))
    st = os.stat(back / "run.sh")
    assert st.st_mtime_ns == T0 + 5 * 10**9 and stat.S_IMODE(st.st_mode) == 0o755
    assert stat.S_IMODE(os.stat(back / "secret").st_mode) == 0o600
    again = sync(client, back, str(remote))  # no base, but size + mtime agree everywhere
    assert (again.pushed, again.pulled, again.conflicts, again.unchanged) == ([], [], [], 2)


def test_pull_into_missing_local_dir(client: AgentClient, remote: Path,
                                     tmp_path: Path) -> None:
    seed(remote)
    dest = tmp_path / "new" / "deeper"
    report = pull(client, dest, str(remote))
    assert report.pulled == ["a.txt", "sub/b.bin", "sub/deep/c.md"]
    assert report.bytes_received == 208
    assert tree(dest) == tree(remote)
    assert not list(dest.rglob(".aiva-*"))  # no temp files left behind


def test_push_creates_missing_remote_dir(client: AgentClient, local: Path,
                                         tmp_path: Path) -> None:
    seed(local)
    target = tmp_path / "r" / "nested"
    report = sync(client, local, str(target))
    assert len(report.pushed) == 3 and tree(target) == tree(local)


def test_push_delete_removes_extras_only_when_asked(client: AgentClient, local: Path,
                                                    remote: Path) -> None:
    seed(local)
    put(remote, "old/stale.txt", "stale")
    report = push(client, local, str(remote))
    assert report.deleted_remote == [] and (remote / "old/stale.txt").exists()
    report = push(client, local, str(remote), delete=True)
    assert report.deleted_remote == ["old/stale.txt"]
    assert tree(remote) == tree(local)
    assert not (remote / "old").exists()  # the emptied directory went too


def test_pull_delete_removes_local_extras(client: AgentClient, local: Path,
                                          remote: Path) -> None:
    seed(remote)
    put(local, "mine.txt", "keep me?")
    assert pull(client, local, str(remote)).deleted_local == []
    assert (local / "mine.txt").exists()
    report = pull(client, local, str(remote), delete=True)
    assert report.deleted_local == ["mine.txt"]
    assert tree(local) == tree(remote)


def test_large_file_round_trip_with_progress(client: AgentClient, local: Path, remote: Path,
                                             tmp_path: Path) -> None:
    data = os.urandom(20 << 20)
    put(local, "big.bin", data)
    calls: list[tuple[str, int, int]] = []
    report = push(client, local, str(remote), progress=lambda *a: calls.append(a))
    assert report.bytes_sent == len(data) and "(20.0 MB)" in report.summary()
    assert sha((remote / "big.bin").read_bytes()) == sha(data)
    assert calls[-1] == ("push", len(data), len(data))
    assert [c[1] for c in calls] == sorted(c[1] for c in calls) and len(calls) > 1

    back = tmp_path / "back"
    calls.clear()
    report = pull(client, back, str(remote), progress=lambda *a: calls.append(a))
    assert report.bytes_received == len(data)
    assert sha((back / "big.bin").read_bytes()) == sha(data)
    assert calls[-1] == ("pull", len(data), len(data))


# ---------------------------------------------------------------------- two-way


def test_two_way_changes_move_each_way(client: AgentClient, local: Path, remote: Path,
                                       state: Path) -> None:
    seed(local)
    put(remote, "from-remote.txt", "r")
    first = sync(client, local, str(remote), state_file=state)
    assert first.pushed == ["a.txt", "sub/b.bin", "sub/deep/c.md"]
    assert first.pulled == ["from-remote.txt"]
    assert tree(local) == tree(remote)

    put(local, "a.txt", "alpha, edited locally", mtime_s=10)
    put(remote, "sub/deep/c.md", "# c, edited remotely", mtime_s=20)
    report = sync(client, local, str(remote), state_file=state)
    assert (report.pushed, report.pulled, report.conflicts) == (
        ["a.txt"], ["sub/deep/c.md"], [])
    assert (remote / "a.txt").read_text() == "alpha, edited locally"
    assert (local / "sub/deep/c.md").read_text() == "# c, edited remotely"

    quiet = sync(client, local, str(remote), state_file=state)
    assert (quiet.pushed, quiet.pulled, quiet.unchanged) == ([], [], 4)


def test_conflict_is_reported_and_left_alone(client: AgentClient, local: Path, remote: Path,
                                             state: Path) -> None:
    seed(local)
    sync(client, local, str(remote), state_file=state)
    put(local, "a.txt", "local version", mtime_s=30)
    put(remote, "a.txt", "remote version", mtime_s=40)
    for _ in range(2):  # stays a conflict until resolved
        report = sync(client, local, str(remote), state_file=state)
        assert report.conflicts == ["a.txt"]
        assert (report.pushed, report.pulled) == ([], [])
        assert (local / "a.txt").read_text() == "local version"
        assert (remote / "a.txt").read_text() == "remote version"

    resolved = sync(client, local, str(remote), state_file=state, prefer="local")
    assert resolved.pushed == ["a.txt"] and resolved.conflicts == []
    assert (remote / "a.txt").read_text() == "local version"
    assert sync(client, local, str(remote), state_file=state).conflicts == []


def test_conflict_prefer_newer_and_remote(client: AgentClient, local: Path, remote: Path,
                                          state: Path) -> None:
    seed(local)
    sync(client, local, str(remote), state_file=state)
    put(local, "a.txt", "older local", mtime_s=30)
    put(remote, "a.txt", "newer remote", mtime_s=40)
    put(local, "sub/b.bin", "newer local", mtime_s=50)
    put(remote, "sub/b.bin", "older remote", mtime_s=45)
    report = sync(client, local, str(remote), state_file=state, prefer="newer")
    assert (report.pushed, report.pulled) == (["sub/b.bin"], ["a.txt"])
    assert (local / "a.txt").read_text() == "newer remote"
    assert (remote / "sub/b.bin").read_text() == "newer local"

    put(local, "a.txt", "L", mtime_s=90)
    put(remote, "a.txt", "R", mtime_s=10)
    report = sync(client, local, str(remote), state_file=state, prefer="remote")
    assert report.pulled == ["a.txt"] and (local / "a.txt").read_text() == "R"


def test_first_sync_without_base(client: AgentClient, local: Path, remote: Path) -> None:
    put(local, "same.txt", "equal bytes", mtime_s=1)
    put(remote, "same.txt", "equal bytes", mtime_s=2)
    put(local, "diff.txt", "mine", mtime_s=1)
    put(remote, "diff.txt", "theirs", mtime_s=2)
    report = sync(client, local, str(remote))
    assert report.conflicts == ["diff.txt"]
    assert report.unchanged == 1 and (report.pushed, report.pulled) == ([], [])
    assert (local / "diff.txt").read_text() == "mine"
    assert (remote / "diff.txt").read_text() == "theirs"


def test_deletions_are_restored_without_delete(client: AgentClient, local: Path,
                                               remote: Path, state: Path) -> None:
    seed(local)
    sync(client, local, str(remote), state_file=state)
    (local / "a.txt").unlink()
    (remote / "sub/b.bin").unlink()
    report = sync(client, local, str(remote), state_file=state)
    assert (report.pulled, report.pushed) == (["a.txt"], ["sub/b.bin"])
    assert report.deleted_local == report.deleted_remote == []
    assert tree(local) == tree(remote) and len(tree(local)) == 3


def test_deletions_propagate_with_delete(client: AgentClient, local: Path, remote: Path,
                                         state: Path) -> None:
    seed(local)
    put(local, "keep.txt", "k")
    sync(client, local, str(remote), state_file=state)
    (local / "a.txt").unlink()
    (remote / "sub/deep/c.md").unlink()
    (remote / "keep.txt").unlink()
    put(local, "keep.txt", "edited after the other side deleted it", mtime_s=99)
    report = sync(client, local, str(remote), state_file=state, delete=True)
    assert report.deleted_remote == ["a.txt"]
    assert report.deleted_local == ["sub/deep/c.md"]
    assert report.pushed == ["keep.txt"]  # an edit beats a deletion
    assert not (remote / "a.txt").exists() and not (local / "sub/deep").exists()
    assert tree(local) == tree(remote) == {
        "keep.txt": b"edited after the other side deleted it", "sub/b.bin": b"\x00\x01" * 100}


def test_dry_run_changes_nothing(client: AgentClient, local: Path, remote: Path,
                                 state: Path) -> None:
    seed(local)
    put(remote, "extra.txt", "x")
    report = sync(client, local, str(remote), state_file=state, dry_run=True)
    assert report.pushed == ["a.txt", "sub/b.bin", "sub/deep/c.md"]
    assert report.pulled == ["extra.txt"] and report.bytes_received == 1
    assert tree(remote) == {"extra.txt": b"x"} and not state.exists()
    assert report.summary().startswith("dry run")


# ---------------------------------------------------------------------- filters, errors


def test_excludes_and_gitignore(client: AgentClient, local: Path, remote: Path,
                                state: Path) -> None:
    put(local, ".gitignore", "*.log\nbuild/\n")
    put(local, "keep.txt", "k")
    put(local, "x.log", "log")
    put(local, "sub/y.log", "log")
    put(local, "build/out.o", "obj")
    put(local, "secret.env", "pw")
    put(remote, "remote.log", "remote log")
    put(remote, "build/remote.o", "remote obj")
    report = sync(client, local, str(remote), exclude=["*.env"], state_file=state,
                  delete=True)
    assert report.pushed == [".gitignore", "keep.txt"]
    assert report.pulled == [] and report.deleted_remote == []
    assert tree(remote) == {".gitignore": b"*.log\nbuild/\n", "keep.txt": b"k",
                            "remote.log": b"remote log", "build/remote.o": b"remote obj"}
    push(client, local, str(remote), exclude=["*.env"], delete=True)
    assert (remote / "remote.log").exists() and (remote / "build/remote.o").exists()
    assert set(json.loads(state.read_text())["files"]) == {".gitignore", "keep.txt"}


def test_state_file_inside_tree_is_never_synced(client: AgentClient, local: Path,
                                                remote: Path) -> None:
    put(local, "a.txt", "a")
    inside = local / ".aiva-sync.json"
    sync(client, local, str(remote), state_file=inside)
    sync(client, local, str(remote), state_file=inside)
    assert inside.exists() and tree(remote) == {"a.txt": b"a"}


def test_symlinks_are_skipped(client: AgentClient, local: Path, remote: Path) -> None:
    put(local, "real.txt", "r")
    (local / "link.txt").symlink_to(local / "real.txt")
    (local / "linkdir").symlink_to(local)
    assert push(client, local, str(remote)).pushed == ["real.txt"]
    assert sorted(p.name for p in remote.iterdir()) == ["real.txt"]


def test_missing_local_source_is_a_sync_error(client: AgentClient, tmp_path: Path,
                                              remote: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(SyncError, match=r"nothing to push.*nope"):
        push(client, missing, str(remote))
    with pytest.raises(SyncError, match="nothing to pull"):
        pull(client, tmp_path / "dest", str(tmp_path / "no-remote"))
    assert not (tmp_path / "dest").exists()


def test_a_missing_root_is_not_read_as_all_deleted(client: AgentClient, local: Path,
                                                   remote: Path, state: Path) -> None:
    seed(local)
    sync(client, local, str(remote), state_file=state)
    shutil.rmtree(local)
    # a two-way sync from a local directory that is not there is a mistake, not a wish
    # to delete everything (nor to make empty directories on both sides)
    with pytest.raises(SyncError, match="does not exist") as err:
        sync(client, local, str(remote), state_file=state, delete=True)
    assert "pull" in (err.value.hint or "") and not local.exists()
    assert len(tree(remote)) == 3
    report = pull(client, local, str(remote), state_file=state, delete=True)
    assert report.deleted_remote == [] and len(report.pulled) == 3
    assert tree(local) == tree(remote) and len(tree(remote)) == 3


def test_build_litter_stays_put_unless_asked_for(client: AgentClient, local: Path,
                                                 remote: Path) -> None:
    put(local, "app.py", "x = 1\n")
    put(local, "__pycache__/app.cpython-311.pyc", "bytecode")
    put(local, "pkg/mod.pyc", "bytecode")
    put(remote, ".pytest_cache/v/cache/lastfailed", "{}")
    put(remote, "pkg/__pycache__/m.pyc", "bytecode")
    put(remote, "result.json", "{}")
    report = sync(client, local, str(remote))
    assert report.pushed == ["app.py"] and report.pulled == ["result.json"]
    assert not (local / ".pytest_cache").exists() and not (local / "pkg/__pycache__").exists()
    assert not (remote / "__pycache__").exists() and not (remote / "pkg/mod.pyc").exists()
    assert report.crossings() == ["to the sandbox: app.py", "to this machine: result.json"]
    report = sync(client, local, str(remote), litter=True)
    assert (local / ".pytest_cache/v/cache/lastfailed").exists()
    assert (remote / "pkg/mod.pyc").exists() and "pkg/mod.pyc" in report.pushed


def test_local_failure_is_a_sync_error_naming_the_file(client: AgentClient, local: Path,
                                                       remote: Path) -> None:
    put(remote, "d/x.txt", "x")
    put(local, "d", "a file where the remote has a directory")
    with pytest.raises(SyncError, match=r"d/x\.txt"):
        pull(client, local, str(remote))
    assert (local / "d").read_text() == "a file where the remote has a directory"
