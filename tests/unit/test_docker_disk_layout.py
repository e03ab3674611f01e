"""Which paths of a Docker sandbox live on its disk, and the exec hint's detector (fast;
the disk itself is tested on a real engine in tests/integration/test_docker_disk.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from aiva.backends import docker_disk
from aiva.cli.main import _ReadOnlyRootSeen
from aiva.errors import BackendError
from aiva.models import MountSpec, SandboxSpec


def spec(tmp_path: Path, workdir: str = "/workspace", mounts: tuple[str, ...] = ()
         ) -> SandboxSpec:
    return SandboxSpec(backend="docker", image="aiva/python", cpus=1, memory=1 << 29,
                       disk=1 << 30, workdir=workdir,
                       mounts=[MountSpec(host_path=str(tmp_path), guest_path=g)
                               for g in mounts])


def test_the_workdir_and_every_system_path_by_default(tmp_path: Path) -> None:
    pairs = docker_disk.layout(spec(tmp_path))
    assert pairs[0] == ("/workspace", docker_disk.WORK)
    assert [g for g, _ in pairs[1:]] == list(docker_disk.SYSTEM_PATHS)
    assert len({sub for _, sub in pairs}) == len(pairs)  # one directory each


def test_a_mount_or_the_workdir_at_or_above_a_system_path_wins(tmp_path: Path) -> None:
    guests = [g for g, _ in docker_disk.layout(spec(tmp_path, mounts=("/tmp", "/opt")))]
    assert "/tmp" not in guests and "/opt" not in guests and "/root" in guests
    guests = [g for g, _ in docker_disk.layout(spec(tmp_path, workdir="/opt"))]
    assert guests.count("/opt") == 1 and guests[0] == "/opt"
    # below a system path: both, nested on the same disk
    guests = [g for g, _ in docker_disk.layout(spec(tmp_path, workdir="/root/work"))]
    assert guests[0] == "/root/work" and "/root" in guests


@pytest.mark.parametrize("bad", ["", "..", "../x", "a/b", "ABC", "x" * 80, "/etc"])
def test_disk_paths_are_built_from_ids_only(bad: str) -> None:
    with pytest.raises(BackendError):
        docker_disk.disk_dir(bad)


def test_the_hint_sees_erofs_split_across_chunks() -> None:
    seen = _ReadOnlyRootSeen()
    for chunk in ["sh: 1: cannot create /usr/bin/x: Read-on", "ly file sys", "tem\n"]:
        seen.feed(chunk)
    assert seen.seen
    apt = _ReadOnlyRootSeen()
    apt.feed("W: Not using locking for read only lock file /var/lib/dpkg/lock\n")
    assert apt.seen
    other = _ReadOnlyRootSeen()
    other.feed("No space left on device\n")
    assert not other.seen
