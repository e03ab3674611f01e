"""The microVM initramfs: busybox, the few kernel modules the VM needs, the agent, /init.

Written as a newc cpio by this module (no cpio or find needed) with fixed owners and
times, so the same inputs give the same bytes; the file is named by their hash and built
once. What /init does is in ``init.sh`` next to this file.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import secrets
import stat
import struct
from importlib import resources
from pathlib import Path

from aiva.agent_client.bundle import agent_bundle_files
from aiva.errors import BackendError, BackendUnavailable
from aiva.vm.kernel import KernelFiles, load_order, module_name, read_module

BUSYBOX = Path("/bin/busybox")
#: Drivers /init loads, in this order (each after what it depends on).
REQUIRED_MODULES = ("virtio_mmio", "virtio_blk", "virtio_console", "ext4", "overlay")
OPTIONAL_MODULES = ("virtio_net", "vsock", "vmw_vsock_virtio_transport", "virtio_rng")
#: Loaded only when the kernel command line has an ``aiva.mount=``: host directories come
#: in over virtio-fs (Debian's cloud kernel has no 9p, but has virtiofs).
MOUNT_MODULES = ("fuse", "virtiofs")
APPLETS = (
    "sh", "ash", "mount", "umount", "switch_root", "insmod", "mkdir", "cat", "ls", "sleep",
    "usleep", "poweroff", "reboot", "sync", "ip", "ifconfig", "route", "echo", "mknod", "cp",
    "grep", "ln", "mv", "rm", "test", "[", "env", "hostname", "kill", "dmesg", "uname",
    "chmod", "stat", "readlink", "sed", "head", "tail", "ps", "true", "false",
)


class Cpio:
    """A newc ("070701") archive writer; every entry is owned by root with mtime 0."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 0
        self.dirs: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0),
               nlink: int = 1) -> None:
        self.ino += 1
        encoded = name.encode() + b"\0"
        fields = (self.ino, mode, 0, 0, nlink, 0, len(data), 0, 0, *rdev, len(encoded), 0)
        self.buf.write(b"070701" + b"".join(b"%08X" % f for f in fields) + encoded)
        self.buf.write(b"\0" * (-self.buf.tell() % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-self.buf.tell() % 4))

    def dir(self, name: str) -> None:
        if not name.strip("/"):
            return
        parts = name.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            path = "/".join(parts[:i])
            if path not in self.dirs:
                self.dirs.add(path)
                self._entry(path, stat.S_IFDIR | 0o755, nlink=2)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self.dir(os.path.dirname(name.strip("/")))
        self._entry(name.strip("/"), stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self.dir(os.path.dirname(name.strip("/")))
        self._entry(name.strip("/"), stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self.dir(os.path.dirname(name.strip("/")))
        self._entry(name.strip("/"), stat.S_IFCHR | mode, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0, nlink=1)
        self.buf.write(b"\0" * (-self.buf.tell() % 512))
        return self.buf.getvalue()


def build_initramfs(kernel: KernelFiles, agent_dir: Path, out: Path) -> Path:
    """Write ``out/initramfs-<hash>.cpio.gz`` unless it exists already; return its path.

    ``out`` is a directory (normally ``AIVA_HOME/cache/vm``); the hash covers every byte
    that goes in, so a new kernel, agent or init script gives a new file.
    """
    archive = initramfs_bytes(kernel, agent_dir)
    digest = hashlib.sha256(archive).hexdigest()[:16]
    dest = out / f"initramfs-{digest}.cpio.gz"
    if dest.is_file():
        return dest
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{dest.name}.{os.getpid()}-{secrets.token_hex(4)}"
    try:
        with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0,
                                                   filename="") as gz:
            gz.write(archive)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def initramfs_bytes(kernel: KernelFiles, agent_dir: Path) -> bytes:
    """The uncompressed archive."""
    cpio = Cpio()
    for d in ("dev", "proc", "sys", "lower", "data", "newroot", "aiva/agent"):
        cpio.dir(d)
    cpio.chardev("dev/console", 5, 1)
    cpio.chardev("dev/null", 1, 3, 0o666)
    cpio.file("bin/busybox", static_busybox().read_bytes(), 0o755)
    for applet in APPLETS:
        cpio.symlink(f"bin/{applet}", "busybox")
    cpio.file("init", resources.files("aiva.vm").joinpath("init.sh").read_bytes(), 0o755)
    cpio.dir("aiva/agent/__pycache__")
    for name in agent_bundle_files(agent_dir):
        cpio.file(f"aiva/agent/{name}", (agent_dir / name).read_bytes())
    listed = []
    for rel in module_files(kernel):
        dest = f"lib/modules/{kernel.version}/{rel.split('.ko')[0]}.ko"
        cpio.file(dest, read_module(kernel.modules_dir / rel))
        listed.append(f"/{dest}\n")
    cpio.file("aiva/modules", "".join(listed).encode())
    listed = []
    for rel in module_files(kernel, MOUNT_MODULES, required=(), skip=module_files(kernel)):
        dest = f"lib/modules/{kernel.version}/{rel.split('.ko')[0]}.ko"
        cpio.file(dest, read_module(kernel.modules_dir / rel))
        listed.append(f"/{dest}\n")
    cpio.file("aiva/modules.mounts", "".join(listed).encode())
    return cpio.finish()


def module_files(kernel: KernelFiles, wanted: tuple[str, ...] | None = None, *,
                 required: tuple[str, ...] = REQUIRED_MODULES,
                 skip: list[str] | None = None) -> list[str]:
    """Paths (relative to the modules dir) of the modules to load, dependencies first.

    ``wanted`` defaults to the required and optional modules; ``skip`` lists paths loaded
    already. Drivers built into the kernel are skipped; a required one that is neither
    built in nor a module means this kernel cannot run aiva VMs.
    """
    mdir = kernel.modules_dir
    paths: dict[str, str] = {}
    deps: dict[str, list[str]] = {}
    for line in (mdir / "modules.dep").read_text().splitlines():
        rel, _, rest = line.partition(":")
        name = module_name(rel)
        paths[name] = rel
        deps[name] = [module_name(d) for d in rest.split()]
    builtin_file = mdir / "modules.builtin"
    builtin = {module_name(x) for x in builtin_file.read_text().split()} \
        if builtin_file.is_file() else set()
    order: list[str] = []
    done = {module_name(rel) for rel in skip or []}
    for want in wanted if wanted is not None else (*REQUIRED_MODULES, *OPTIONAL_MODULES):
        if want in builtin:
            continue
        if want not in paths:
            if want in required:
                raise BackendError(f"kernel {kernel.version} has no {want} driver",
                                   hint="aiva VMs need Debian's cloud kernel or one like it")
            continue
        order += [m for m in load_order(want, deps)
                  if m not in order and m not in builtin and m not in done]
    return [paths[m] for m in order]


def static_busybox(path: Path = BUSYBOX) -> Path:
    """The host's busybox, which must be static: the initramfs has no C library."""
    real = path.resolve()
    try:
        head = real.read_bytes()
    except OSError:
        head = b""
    if head[:6] != b"\x7fELF\x02\x01" or _has_interpreter(head):
        raise BackendUnavailable(
            f"{path} is missing or not a static 64-bit busybox",
            hint="apt-get install busybox-static",
        )
    return real


def _has_interpreter(elf: bytes) -> bool:
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    return any(struct.unpack_from("<I", elf, phoff + i * phentsize)[0] == 3  # PT_INTERP
               for i in range(phnum))
