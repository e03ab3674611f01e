"""The guest kernel: Debian's cloud kernel, fetched with apt and cached per version.

The cloud flavour is small and boots fast on ``-M microvm``; the drivers the VM needs
(virtio-mmio, virtio-blk, virtio-console, overlay ...) are modules, which the initramfs
loads. The package ships no ``modules.dep`` (``depmod`` makes it at install time, and kmod
may be missing here), so it is generated from each module's own ``depends=`` field.
"""

from __future__ import annotations

import gzip
import lzma
import os
import re
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from aiva import paths
from aiva.errors import BackendError, BackendUnavailable

Progress = Callable[[str], None]
METAPACKAGE = "linux-image-cloud-amd64"
_CURRENT = "current"  # names the version a cache hit returns without asking apt


@dataclass(frozen=True)
class KernelFiles:
    vmlinuz: Path
    modules_dir: Path  # .../lib/modules/<version>, with modules.dep
    version: str


def kernel_cache() -> Path:
    return paths.kernel_cache()


def _cached(version: str) -> KernelFiles | None:
    root = kernel_cache() / version
    vmlinuz = root / f"vmlinuz-{version}"
    modules = root / "lib" / "modules" / version
    if vmlinuz.is_file() and (modules / "modules.dep").is_file():
        return KernelFiles(vmlinuz, modules, version)
    return None


class _AptStale(BackendUnavailable):
    """apt could not find or fetch the kernel: its package lists may be missing or old."""


def ensure_kernel(progress: Progress | None = None, *, refresh: bool = False) -> KernelFiles:
    """The cached kernel, or fetch the one apt offers now. ``refresh`` asks apt again.

    A machine whose package lists were never downloaded (or are stale) makes apt fail:
    as root, ``apt-get update`` runs once and the fetch is retried; otherwise the error
    says what to run.
    """
    say: Progress = progress or (lambda _msg: None)
    marker = kernel_cache() / _CURRENT
    if not refresh and marker.is_file() and (hit := _cached(marker.read_text().strip())):
        return hit
    for last in (os.geteuid() != 0, True):
        try:
            package = _resolve_package()
            version = package.removeprefix("linux-image-")
            if _cached(version) is None:
                _fetch(package, version, say)
            break
        except _AptStale:
            if last:
                raise
            say("apt cannot get the kernel package: running apt-get update once")
            upd = _run([_tool("apt-get"), "update"])
            if upd.returncode != 0:
                raise BackendError(f"apt-get update failed:\n{upd.stderr.strip()[-2000:]}",
                                   hint="check the machine's apt sources and network") from None
    hit = _cached(version)
    assert hit is not None
    _write_atomic(marker, version)
    return hit


def host_tsc_khz(cpuinfo: str | None = None) -> int | None:
    """The host's TSC rate, which a TCG guest's TSC runs at too (QEMU reads the host's).

    On ``-M microvm`` with ACPI (needed: it is how the guest finds its virtio-mmio
    devices, this kernel has no virtio_mmio.device= support) Linux skips the PIT, cannot
    calibrate the TSC under TCG and hangs; ``tsc_early_khz=`` on the kernel command line
    avoids that (harmless under KVM). bogomips is derived from the TSC, unlike "cpu MHz",
    which follows frequency scaling on bare metal.
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
    if m := re.search(r"^bogomips\s*:\s*([\d.]+)", cpuinfo, re.MULTILINE):
        return round(float(m.group(1)) * 500)
    if m := re.search(r"^cpu MHz\s*:\s*([\d.]+)", cpuinfo, re.MULTILINE):
        return round(float(m.group(1)) * 1000)
    return None


def tcg_kernel_args() -> list[str]:
    """Kernel command-line arguments a microvm guest needs to boot under TCG."""
    khz = host_tsc_khz()
    return [f"tsc_early_khz={khz}"] if khz else []


def _tool(name: str) -> str:
    exe = shutil.which(name)
    if exe is None:
        raise BackendUnavailable(
            f"{name} is not available; aiva fetches the VM kernel as a Debian package",
            hint="run on Debian or Ubuntu, where apt and dpkg are installed",
        )
    return exe


def _run(argv: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False,
                          stdin=subprocess.DEVNULL)


def _resolve_package() -> str:
    """The versioned package the metapackage depends on, e.g. linux-image-6.1.0-28-cloud-amd64."""
    res = _run([_tool("apt-cache"), "depends", METAPACKAGE])
    if found := re.findall(r"Depends:\s*(linux-image-\S+)", res.stdout):
        return str(found[0])
    raise _AptStale(
        f"apt cannot resolve {METAPACKAGE}: {(res.stderr or res.stdout).strip()[-500:]}",
        hint="run `sudo apt-get update` (the package lists may never have been downloaded)",
    )


def _fetch(package: str, version: str, say: Progress) -> None:
    """Download and unpack in a temp dir beside the cache, then rename into place."""
    base = kernel_cache()
    base.mkdir(parents=True, exist_ok=True)
    dpkg_deb = _tool("dpkg-deb")
    with tempfile.TemporaryDirectory(dir=base, prefix=".fetch-") as tmp_s:
        tmp = Path(tmp_s)
        say(f"downloading {package}")
        argv = [_tool("apt-get"), "download", package]
        if os.geteuid() == 0:  # _apt cannot write into a root-only temp dir: no sandbox
            argv[1:1] = ["-o", "APT::Sandbox::User=root"]
        res = _run(argv, cwd=tmp)
        debs = list(tmp.glob("*.deb"))
        if res.returncode != 0 or not debs:
            raise _AptStale(f"apt-get download {package} failed:\n{res.stderr.strip()[-2000:]}",
                            hint="run `sudo apt-get update` and check the network")
        say(f"unpacking {debs[0].name}")
        unpacked = tmp / "x"
        res = _run([dpkg_deb, "-x", str(debs[0]), str(unpacked)])
        if res.returncode != 0:
            raise BackendError(f"dpkg-deb -x failed: {res.stderr.strip()}")
        dest = tmp / "k"
        src_modules = unpacked / "lib" / "modules" / version
        if not src_modules.is_dir():  # merged-/usr packages may put them under usr/lib
            src_modules = unpacked / "usr" / "lib" / "modules" / version
        vmlinuz = unpacked / "boot" / f"vmlinuz-{version}"
        if not (vmlinuz.is_file() and src_modules.is_dir()):
            raise BackendError(f"{package} holds no vmlinuz-{version} and modules")
        modules = dest / "lib" / "modules" / version
        modules.parent.mkdir(parents=True)
        src_modules.rename(modules)
        vmlinuz.rename(dest / vmlinuz.name)
        write_modules_dep(modules)
        try:
            dest.rename(base / version)
        except OSError:  # another process finished first; theirs is as good
            if _cached(version) is None:
                raise


def write_modules_dep(modules: Path) -> None:
    """``modules.dep`` as depmod writes it: each module, then everything it needs, in an
    order that loads correctly read from the end (so modprobe and busybox agree)."""
    paths: dict[str, str] = {}
    direct: dict[str, list[str]] = {}
    for ko in sorted(modules.rglob("*.ko*")):
        rel = ko.relative_to(modules).as_posix()
        name = module_name(rel)
        paths[name] = rel
        direct[name] = [module_name(d) for d in modinfo(ko).get("depends", "").split(",") if d]
    lines = []
    for name, rel in paths.items():
        needed = [d for d in load_order(name, direct) if d != name and d in paths]
        lines.append(f"{rel}: {' '.join(paths[d] for d in reversed(needed))}".rstrip() + "\n")
    _write_atomic(modules / "modules.dep", "".join(lines))


def load_order(name: str, deps: dict[str, list[str]]) -> list[str]:
    """``name`` and everything it needs, dependencies first (a depth-first post-order)."""
    order: list[str] = []
    stack: list[tuple[str, int]] = [(name, 0)]
    seen = {name}
    while stack:
        mod, i = stack.pop()
        kids = deps.get(mod, [])
        if i < len(kids):
            stack.append((mod, i + 1))
            if kids[i] not in seen:
                seen.add(kids[i])
                stack.append((kids[i], 0))
        else:
            order.append(mod)
    return order


def module_name(path: str) -> str:
    """'kernel/fs/overlayfs/overlay.ko' or 'virtio-rng' -> the kernel's name for it."""
    base = path.rsplit("/", 1)[-1]
    base = re.sub(r"\.ko(\.(xz|zst|gz))?$", "", base)
    return base.replace("-", "_")


def modinfo(ko: Path) -> dict[str, str]:
    """The key=value strings of a module's ``.modinfo`` ELF section (64-bit little endian)."""
    data = read_module(ko)
    if data[:6] != b"\x7fELF\x02\x01":
        raise BackendError(f"{ko} is not a 64-bit little-endian ELF module")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        name, _t, _f, _a, off, size = struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize)
        return name, off, size

    _, stroff, _ = section(shstrndx)
    for i in range(shnum):
        name, off, size = section(i)
        if data[stroff + name:data.index(b"\0", stroff + name)] == b".modinfo":
            fields = data[off:off + size].split(b"\0")
            pairs = (f.decode(errors="replace").partition("=") for f in fields if b"=" in f)
            return {k: v for k, _, v in pairs}
    return {}


def read_module(ko: Path) -> bytes:
    """A module's ELF bytes; compressed modules are unpacked, since busybox insmod (and this
    module's own reader) want plain ELF."""
    if ko.name.endswith(".ko.xz"):
        return lzma.decompress(ko.read_bytes())
    if ko.name.endswith(".ko.gz"):
        return gzip.decompress(ko.read_bytes())
    if ko.name.endswith(".ko.zst"):
        zstd = shutil.which("zstd")
        if zstd is None:
            raise BackendUnavailable("this kernel's modules are zstd-compressed",
                                     hint="apt-get install zstd")
        return subprocess.run([zstd, "-dc", str(ko)], capture_output=True, check=True).stdout
    return ko.read_bytes()


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
