"""VM disks: the read-only system image (ext4, from the same tar Docker imports) and the
per-VM data disk (ext4 in qcow2, so QEMU can snapshot it)."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from aiva.errors import BackendError, BackendUnavailable, InvalidValue

Progress = Callable[[str], None]
MIB = 1 << 20
MIN_DATA_DISK = 16 * MIB  # ext4 with a journal needs some room


def _tool(name: str, package: str) -> str:
    exe = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if exe is None:
        raise BackendUnavailable(f"{name} is not installed; aiva makes VM disks with it",
                                 hint=f"apt-get install {package}")
    return exe


def _run(argv: list[str], what: str) -> None:
    res = subprocess.run(argv, capture_output=True, text=True, check=False,
                         stdin=subprocess.DEVNULL)
    if res.returncode != 0:
        raise BackendError(f"{what} failed (exit {res.returncode}):\n"
                           f"{(res.stderr or res.stdout).strip()[-2000:]}")


def _tmp_beside(path: Path, suffix: str) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}{suffix}")


def _tree_size(root: Path) -> tuple[int, int]:
    """Bytes the tree takes on disk (allocated blocks, as du counts) and its inode count."""
    size, count = 0, 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            size += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            count += 1
    return size, count


def build_rootfs(tar: Path, out: Path, *, progress: Progress | None = None) -> Path:
    """``out`` (ext4, label aiva-root) made from ``tar`` unless it exists; returns it.

    The tar is unpacked as root, so ownership, modes and device nodes come through, and
    ``mkfs.ext4 -d`` copies the tree in. There is no journal: the image is mounted ro.
    """
    if out.is_file():
        return out
    say: Progress = progress or (lambda _msg: None)
    if os.geteuid() != 0:
        raise BackendUnavailable(
            "building a VM system image needs root (to keep file owners and device nodes)",
            hint="run this once as root (e.g. `sudo aiva image build ...`); the image is cached",
        )
    mkfs = _tool("mkfs.ext4", "e2fsprogs")
    tar_exe = _tool("tar", "tar")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_img = _tmp_beside(out, ".ext4")
    tree = Path(tempfile.mkdtemp(prefix=f".{out.stem}-", dir=out.parent))
    try:
        say(f"unpacking {tar.name}")
        _run([tar_exe, "--numeric-owner", "--same-owner", "-xpf", str(tar), "-C", str(tree),
              "--xattrs", "--xattrs-include=*"], f"unpacking {tar}")
        used, inodes = _tree_size(tree)
        size_mib = (used + used // 5 + 64 * MIB + MIB - 1) // MIB
        say(f"making {out.name}: {size_mib} MiB ext4")
        _run([mkfs, "-q", "-F", "-t", "ext4", "-L", "aiva-root", "-b", "4096", "-O", "^has_journal",
              "-m", "0", "-N", str(inodes + inodes // 5 + 4096), "-d", str(tree),
              str(tmp_img), f"{size_mib}M"], f"mkfs.ext4 for {out.name}")
        os.replace(tmp_img, out)
    finally:
        shutil.rmtree(tree, ignore_errors=True)
        tmp_img.unlink(missing_ok=True)
    return out


def create_data_disk(path: Path, size_bytes: int) -> Path:
    """An empty ext4 data disk (label aiva-data) of ``size_bytes``, as qcow2 at ``path``.

    mkfs writes a sparse raw file; ``qemu-img convert`` keeps only the written blocks, so
    a new 10 GiB disk takes a few MiB on the host.
    """
    if size_bytes < MIN_DATA_DISK:
        raise InvalidValue(f"a data disk of {size_bytes} bytes is too small",
                           hint=f"use at least {MIN_DATA_DISK // MIB} MiB")
    mkfs = _tool("mkfs.ext4", "e2fsprogs")
    qemu_img = _tool("qemu-img", "qemu-utils")
    path.parent.mkdir(parents=True, exist_ok=True)
    raw, tmp = _tmp_beside(path, ".raw"), _tmp_beside(path, ".qcow2")
    try:
        with open(raw, "wb") as f:
            f.truncate(size_bytes - size_bytes % 4096)
        # the lazy-init work is done here, on a sparse file, not by the guest at first boot
        _run([mkfs, "-q", "-F", "-t", "ext4", "-L", "aiva-data", "-b", "4096", "-m", "0",
              "-E", "lazy_itable_init=0,lazy_journal_init=0", str(raw)], "mkfs.ext4 (data)")
        _run([qemu_img, "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(tmp)],
             "qemu-img convert")
        os.replace(tmp, path)
    finally:
        raw.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)
    return path
