"""Files coming out of a real Docker sandbox onto the host: no powers, no links followed,
no disk filled (the host side of issue "hostile sandboxes")."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from aiva import errors

pytestmark = pytest.mark.docker

AIVA = [sys.executable, "-m", "aiva.cli.main"]


def powers(root: Path) -> list[str]:
    """Entries under ``root`` with setuid/setgid/sticky bits or of a special type."""
    bad = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            st = Path(dirpath, name).lstat()
            if st.st_mode & 0o7000 or not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)
                                           or stat.S_ISLNK(st.st_mode)):
                bad.append(f"{dirpath}/{name} {st.st_mode:o}")
    return bad


def tree(root: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(root)): (p.lstat().st_mode, p.read_bytes() if p.is_file() else b"")
            for p in sorted(root.rglob("*"))}


def test_setuid_files_come_out_without_their_bits(make_sandbox: Any, tmp_path: Path) -> None:
    sb = make_sandbox()
    r = sb.commands.run("mkdir -p /workspace/out/bin && cp /bin/true /workspace/out/bin/t && "
                        "chmod 6755 /workspace/out/bin/t && chmod 1777 /workspace/out && "
                        "stat -c %a /workspace/out/bin/t")
    assert r.stdout.strip() == "6755"

    one = tmp_path / "one"
    sb.files.download("/workspace/out/bin/t", one)  # Engine.copy_out, a single file
    assert stat.S_IMODE(one.stat().st_mode) & 0o7000 == 0
    assert one.stat().st_mode & 0o111  # still executable: only the powers went

    pulled = tmp_path / "pulled"
    sb.sync(pulled, "/workspace/out", direction="pull")  # `aiva data pull`, a directory
    assert (pulled / "bin/t").is_file()
    assert powers(tmp_path) == []

    cli = tmp_path / "cli"
    cli.mkdir()
    r2 = subprocess.run([*AIVA, "cp", f"{sb.name}:/workspace/out/bin/t", str(cli)],
                        capture_output=True, text=True, timeout=120)
    assert r2.returncode == 0, r2.stderr
    assert (cli / "t").is_file() and powers(tmp_path) == []

    (tmp_path / "victim").write_text("keep me")
    (cli / "link").symlink_to(tmp_path / "victim")
    r3 = subprocess.run([*AIVA, "cp", f"{sb.name}:/workspace/out/bin/t", str(cli / "link")],
                        capture_output=True, text=True, timeout=120)
    assert r3.returncode != 0 and "Traceback" not in r3.stderr
    assert r3.stderr.startswith("error:") and "symbolic link" in r3.stderr
    assert (tmp_path / "victim").read_text() == "keep me"


def test_setuid_bits_do_not_go_in_either(make_sandbox: Any, tmp_path: Path) -> None:
    sb = make_sandbox()
    tool = tmp_path / "tool"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o6755)
    sb.files.upload(tool, "/workspace/tool")
    assert sb.commands.run("stat -c %a /workspace/tool").stdout.strip() == "755"


def test_two_way_sync_does_not_write_through_a_local_link(make_sandbox: Any,
                                                          tmp_path: Path) -> None:
    """The local sync directory holds a link to another host directory; the sandbox puts
    files under that name. The sync refuses instead of writing into the other directory,
    and it never reads through the link either."""
    sb = make_sandbox()
    local, other = tmp_path / "local", tmp_path / "other"
    local.mkdir()
    other.mkdir()
    (other / "precious").write_text("keep me")
    (local / "mine.txt").write_text("mine")
    (local / "shared").symlink_to(other)
    before = tree(other)

    sb.sync(local, "/workspace/proj")  # first sync: the link is not followed for a push
    assert sb.commands.run("ls /workspace/proj").stdout.split() == ["mine.txt"]

    sb.commands.run("mkdir -p /workspace/proj/shared && echo evil > /workspace/proj/shared/x"
                    " && echo overwritten > /workspace/proj/shared/precious")
    with pytest.raises(errors.SyncError, match="symbolic link") as exc:
        sb.sync(local, "/workspace/proj")
    assert exc.value.hint
    assert tree(other) == before
    assert (local / "shared").is_symlink()


def test_a_sparse_terabyte_is_refused_before_it_fills_the_disk(make_sandbox: Any,
                                                               tmp_path: Path) -> None:
    sb = make_sandbox()
    sb.commands.run("mkdir -p /workspace/big && truncate -s 1T /workspace/big/sparse.img "
                    "&& echo hi > /workspace/big/small.txt", timeout=60)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(errors.HostFileError, match="not enough space"):
        sb.files.download("/workspace/big/sparse.img", out)
    with pytest.raises(errors.SyncError, match="not enough space"):
        sb.sync(out, "/workspace/big", direction="pull")
    assert os.listdir(out) == []
