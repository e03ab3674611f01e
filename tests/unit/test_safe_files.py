"""aiva.safe_files on the real filesystem: links at every component, swaps, lies, nodes."""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from aiva.errors import HostFileError, ProtocolError
from aiva.guard.files import (
    MAX_DEPTH,
    MAX_NAME,
    MAX_PATH,
    DestDir,
    check_name,
    check_relpath,
    file_meta,
    safe_mode,
    umask,
)


@pytest.fixture(autouse=True)
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def snapshot(root: Path) -> dict[str, tuple[int, int, str]]:
    """Every entry under ``root`` (links not followed): mode, size, link target or bytes."""
    out: dict[str, tuple[int, int, str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            st = path.lstat()
            body = os.readlink(path) if path.is_symlink() else \
                path.read_bytes().hex() if stat.S_ISREG(st.st_mode) else ""
            out[str(path.relative_to(root))] = (st.st_mode, st.st_size, body)
    return out


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    d = tmp_path / "dest"
    d.mkdir()
    return d


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    d = tmp_path / "outside"
    d.mkdir()
    (d / "victim").write_text("keep me")
    return d


def write(d: DestDir, rel: str, data: bytes, mode: int = 0o644) -> None:
    d.write_file(rel, [data], size=len(data), mode=mode, mtime_ns=10**18)


# ---------------------------------------------------------------------- names

@pytest.mark.parametrize("rel", ["a", "a/b.c", "..a", "a..b/c", ".hidden/x", "é/ü",
                                 "caf\udce9"])  # a raw latin-1 byte, as os.listdir gives it
def test_plain_relative_paths_pass(rel: str) -> None:
    assert check_relpath(rel) == rel


@pytest.mark.parametrize("rel", [
    "", ".", "..", "../x", "a/../../x", "a/./b", "/etc/passwd", "a//b", "a/", "a\0b",
    "x" * (MAX_PATH + 1), "a/" + "y" * (MAX_NAME + 1), "/".join(["d"] * (MAX_DEPTH + 1)),
    "\ud800", 7, None, b"a",
])
def test_bad_paths_are_protocol_errors_naming_them(rel: object) -> None:
    with pytest.raises(ProtocolError, match="bad path"):
        check_relpath(rel)


def test_check_name_wants_one_component() -> None:
    assert check_name("f.txt") == "f.txt"
    with pytest.raises(ProtocolError):
        check_name("a/b")


def test_modes_lose_setuid_setgid_sticky_and_the_umask() -> None:
    assert umask() == 0o022
    assert safe_mode(0o6777) == 0o755
    assert safe_mode(0o7777, 0o077) == 0o700
    assert safe_mode(0o1644) == 0o644


@pytest.mark.parametrize("meta", [
    None, [], {"size": -1, "mode": 0, "mtime_ns": 0}, {"size": "1", "mode": 0, "mtime_ns": 0},
    {"size": 1, "mode": True, "mtime_ns": 0}, {"size": 1, "mode": 0, "mtime_ns": 1 << 64},
    {"size": 1, "mode": 0o644}, {"size": 1.5, "mode": 0, "mtime_ns": 0},
])
def test_bad_read_headers_are_protocol_errors(meta: object) -> None:
    with pytest.raises(ProtocolError, match="/f"):
        file_meta(meta, path="/f")


# ---------------------------------------------------------------------- writes

def test_write_puts_exactly_the_bytes_with_a_masked_mode(dest: Path) -> None:
    with DestDir(dest) as d:
        done = d.write_file("a/b/f", [b"he", b"llo"], size=5, mode=0o6777, mtime_ns=10**18)
    f = dest / "a/b/f"
    assert f.read_bytes() == b"hello" and done.size == 5
    assert stat.S_IMODE(f.stat().st_mode) == 0o755
    assert f.stat().st_mtime_ns == 10**18 == done.mtime_ns
    assert stat.S_IMODE((dest / "a").stat().st_mode) == 0o755
    assert sorted(os.listdir(dest / "a/b")) == ["f"]  # no temp file left


@pytest.mark.parametrize("link_at", ["a", "a/b"])
def test_a_link_at_any_directory_component_is_refused(dest: Path, outside: Path,
                                                      tmp_path: Path, link_at: str) -> None:
    (dest / link_at).parent.mkdir(parents=True, exist_ok=True)
    (dest / link_at).symlink_to(outside)
    before = snapshot(tmp_path)
    with DestDir(dest) as d, pytest.raises(HostFileError, match="symbolic link"):
        write(d, "a/b/c/f", b"evil", 0o6777)
    assert snapshot(tmp_path) == before


def test_a_link_at_the_final_name_is_refused_and_kept(dest: Path, outside: Path,
                                                      tmp_path: Path) -> None:
    (dest / "f").symlink_to(outside / "victim")
    before = snapshot(tmp_path)
    with DestDir(dest) as d, pytest.raises(HostFileError, match="symbolic link"):
        write(d, "f", b"evil")
    assert snapshot(tmp_path) == before


def test_a_file_where_a_directory_must_be_is_refused(dest: Path) -> None:
    (dest / "a").write_text("file")
    with DestDir(dest) as d, pytest.raises(HostFileError, match="not a directory"):
        write(d, "a/f", b"x")


@pytest.mark.parametrize("kind", ["dir", "fifo", "socket"])
def test_non_files_at_the_target_are_never_replaced_or_opened(dest: Path, tmp_path: Path,
                                                              kind: str) -> None:
    target = dest / "t"
    sock = None
    if kind == "dir":
        target.mkdir()
    elif kind == "fifo":
        os.mkfifo(target)
    else:
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(target))
    before = snapshot(tmp_path)
    try:
        with DestDir(dest) as d, pytest.raises(HostFileError, match="refusing"):
            write(d, "t", b"x")
    finally:
        if sock is not None:
            sock.close()
    assert snapshot(tmp_path) == before


def test_a_hard_linked_target_is_replaced_not_written_into(dest: Path, outside: Path) -> None:
    os.link(outside / "victim", dest / "f")
    with DestDir(dest) as d:
        write(d, "f", b"new")
    assert (dest / "f").read_bytes() == b"new"
    assert (outside / "victim").read_text() == "keep me"


def test_a_directory_swapped_for_a_link_mid_write_is_not_followed(dest: Path, outside: Path,
                                                                  tmp_path: Path) -> None:
    (dest / "a").mkdir()
    before = snapshot(outside)

    def chunks() -> Iterator[bytes]:
        yield b"first "
        (dest / "a").rename(dest / "a.moved")  # what an attacker racing us would do
        (dest / "a").symlink_to(outside)
        yield b"second"

    with DestDir(dest) as d:
        d.write_file("a/f", chunks(), size=12, mode=0o644)
    assert snapshot(outside) == before
    assert (dest / "a.moved/f").read_bytes() == b"first second"  # where it was opened


def test_a_directory_swapped_for_a_link_between_files_is_not_followed(
        dest: Path, outside: Path) -> None:
    before = snapshot(outside)
    with DestDir(dest) as d:
        write(d, "a/f1", b"1")
        (dest / "a").rename(dest / "a.moved")
        (dest / "a").symlink_to(outside)
        write(d, "a/f2", b"2")  # lands in the directory "a" was when it was opened
        write(d, "a/sub/f3", b"3")
    assert snapshot(outside) == before
    assert sorted(os.listdir(dest / "a.moved")) == ["f1", "f2", "sub"]
    with DestDir(dest) as d, pytest.raises(HostFileError, match="symbolic link"):
        write(d, "a/f4", b"4")  # looked up afresh: the link is refused
    assert snapshot(outside) == before


def test_more_bytes_than_declared_stop_at_once_and_leave_nothing(dest: Path) -> None:
    sent: list[int] = []

    def chunks() -> Iterator[bytes]:
        for i in range(1000):
            sent.append(i)
            yield b"y" * 4096

    with DestDir(dest) as d, pytest.raises(ProtocolError, match="more than the 10 bytes"):
        d.write_file("f", chunks(), size=10, mode=0o644)
    assert len(sent) == 1  # the first oversized chunk stops it
    assert os.listdir(dest) == []


def test_fewer_bytes_than_declared_fail_and_leave_nothing(dest: Path) -> None:
    (dest / "f").write_text("old")
    with DestDir(dest) as d, pytest.raises(ProtocolError, match="sent 3 of the 10 bytes"):
        d.write_file("f", [b"abc"], size=10, mode=0o644)
    assert os.listdir(dest) == ["f"] and (dest / "f").read_text() == "old"


def test_a_failing_source_leaves_no_temp_file(dest: Path) -> None:
    def chunks() -> Iterator[bytes]:
        yield b"a"
        raise OSError("link dropped")

    with DestDir(dest) as d, pytest.raises(OSError, match="link dropped"):
        d.write_file("sub/f", chunks(), size=2, mode=0o644)
    assert os.listdir(dest / "sub") == []


def test_no_space_is_refused_before_writing(dest: Path) -> None:
    with DestDir(dest) as d:
        free = d.free_bytes()
        assert free > 0
        d.check_space(1)
        with pytest.raises(HostFileError, match="not enough space") as exc:
            d.check_space(free + (1 << 40), what="big.img")
    assert "big.img" in str(exc.value) and exc.value.hint


def test_a_missing_root_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(HostFileError, match="cannot open directory"):
        DestDir(tmp_path / "nope")


# ---------------------------------------------------------------------- reads, deletes, walks

def test_open_file_never_follows_links_or_opens_fifos(dest: Path, outside: Path) -> None:
    (dest / "f").write_text("mine")
    (dest / "link").symlink_to(outside / "victim")
    (dest / "dirlink").symlink_to(outside)
    os.mkfifo(dest / "fifo")
    with DestDir(dest) as d:
        fd = d.open_file("f")
        assert fd is not None
        assert os.read(fd, 10) == b"mine"
        os.close(fd)
        assert d.open_file("link") is None
        assert d.open_file("dirlink/victim") is None
        assert d.open_file("fifo") is None  # and it did not block
        assert d.open_file("missing") is None


def test_remove_file_unlinks_files_only_and_prunes_empty_dirs(dest: Path, outside: Path,
                                                              tmp_path: Path) -> None:
    (dest / "a/b").mkdir(parents=True)
    (dest / "a/b/f").write_text("x")
    (dest / "keep").mkdir()
    (dest / "keep/link").symlink_to(outside / "victim")
    (dest / "dirlink").symlink_to(outside)
    with DestDir(dest) as d:
        assert d.remove_file("a/b/f")
        assert not (dest / "a").exists() and dest.is_dir()
        before = snapshot(tmp_path)
        assert not d.remove_file("dirlink/victim")
        assert not d.remove_file("keep/link")
        assert not d.remove_file("keep")
        assert not d.remove_file("missing/f")
    assert snapshot(tmp_path) == before


def test_walk_lists_regular_files_only_and_never_enters_links(dest: Path,
                                                              outside: Path) -> None:
    (dest / "d/e").mkdir(parents=True)
    (dest / "d/e/f").write_text("1")
    (dest / "top").write_text("2")
    (dest / "skipme").mkdir()
    (dest / "skipme/x").write_text("3")
    (dest / "link").symlink_to(outside / "victim")
    (dest / "dirlink").symlink_to(outside)
    os.mkfifo(dest / "fifo")
    with DestDir(dest) as d:
        files = d.walk_files(lambda rel: rel == "skipme", lambda rel: False)
    assert sorted(files) == ["d/e/f", "top"]
    assert files["top"].st_size == 1


def test_walk_refuses_trees_deeper_than_the_bound(dest: Path) -> None:
    deep = dest
    for _ in range(MAX_DEPTH + 2):
        deep = deep / "d"
    deep.mkdir(parents=True)
    with DestDir(dest) as d, pytest.raises(HostFileError, match="deep"):
        d.walk_files(lambda rel: False, lambda rel: False)
