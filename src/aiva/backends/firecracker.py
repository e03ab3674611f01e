"""Sandboxes as Firecracker microVMs: QEMU's guest (kernel, initramfs, system image, agent)
on a smaller VMM, run by the same supervisor, so exec and files work unchanged.

Differences from QEMU: Firecracker boots an ELF ``vmlinux`` (extracted once from Debian's
bzImage); the data disk is raw ext4 (no qcow2), and a snapshot copies it beside the VMM's
state and memory files; the VM is configured over the API socket; the agent listens on
vsock, which the supervisor reaches through Firecracker's Unix socket (``CONNECT 1024``).
Every path the VM state keeps (drives, vsock) is relative to the VMM's working directory
(the VM dir, or the jail's root), so a snapshot loads in another VM's directory unchanged.
As root with a jailer binary the VMM runs jailed (chroot, a uid of its own). No network yet.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiva import paths, progress
from aiva.agent_client import AgentClient, connect_unix
from aiva.backends.base import Observed
from aiva.backends.supervised import (
    SOCKET_NAME,
    SupervisedVM,
    hostname_of,
    read_pid,
    template_of,
    vm_dir,
)
from aiva.config import Config, load_config
from aiva.errors import AgentError, AivaError, BackendError, BackendUnavailable
from aiva.models import SandboxInfo, State
from aiva.vm import firecracker_api as fcvm
from aiva.vm.vmlinux import ensure_vmlinux

AGENT_PORT, GUEST_CID = 1024, 3
BOOT_TIMEOUT = 60.0  # KVM only: a healthy boot takes about a second
KERNEL, INITRD, ROOTFS, DATA = "vmlinux", "initrd.img", "rootfs.ext4", "data.ext4"
VSOCK, FC_LOG, STATE, MEM = "v.sock", "firecracker.log", "vm.state", "vm.mem"
JAIL_UID_BASE = 1_000_000_000  # per-VM ids, above what distributions hand to users
ApiFactory = Callable[[str], fcvm.FirecrackerAPI]


@dataclass(frozen=True)
class Layout:
    root: Path  # the VMM's working directory on the host
    api_sock: Path
    jail: fcvm.JailerConfig | None


class FirecrackerBackend(SupervisedVM):
    name = "firecracker"

    def __init__(self, api_factory: ApiFactory | None = None, *, balloon: bool = False) -> None:
        self.api_factory: ApiFactory = api_factory or fcvm.FirecrackerAPI
        self.balloon = balloon  # off: the initramfs loads no virtio_balloon driver yet

    def check(self) -> None:
        self._binaries()
        ok, why = fcvm.kvm_usable()
        if not ok:
            raise BackendUnavailable(f"Firecracker needs KVM: {why}", hint="use a Linux host "
                                     "(or a VM with nested virtualization) whose /dev/kvm works")

    def _binaries(self) -> tuple[str, str | None]:
        """(firecracker, jailer or None): find_binaries wants both, the jailer is optional."""
        config = load_config()
        try:
            return fcvm.find_binaries(config)
        except BackendUnavailable as exc:
            if "no jailer" not in exc.message:
                raise BackendUnavailable(exc.message, hint=f"{exc.hint}; Firecracker releases "
                                         "are static binaries (firecracker, jailer)") from None
        fc = config.platform.linux.firecracker_binary
        alone = {"platform": {"linux": {"firecracker_binary": fc, "jailer_binary": fc}}}
        return fcvm.find_binaries(Config.model_validate(alone))[0], None

    # ------------------------------------------------------------------ lifecycle

    def create(self, sb: SandboxInfo) -> dict[str, Any]:
        from aiva.vm import artifacts

        if sb.spec.mounts:
            raise BackendUnavailable(
                "Firecracker VMs cannot mount host directories: Firecracker has no "
                "virtio-fs (nor 9p)", hint="use --backend qemu or docker for --mount")
        self.check()
        art = artifacts.ensure_vm_artifacts(template_of(sb), progress=progress.say)
        d = vm_dir(sb)
        d.mkdir(parents=True, exist_ok=True)
        if not (d / DATA).exists():
            make_data_disk(d / DATA, sb.spec.disk)
        return {"vm_dir": str(d), "kernel": str(art.kernel), "vmlinux": str(ensure_vmlinux(
                art.kernel)), "initramfs": str(art.initramfs), "rootfs": str(art.rootfs),
                "data_disk": str(d / DATA), "agent_socket": str(paths.run_dir(sb.id) / SOCKET_NAME)}

    def start(self, sb: SandboxInfo) -> dict[str, Any]:
        self.check()
        fc, jailer = self._binaries()
        d, run = vm_dir(sb), paths.run_dir(sb.id)
        run.mkdir(parents=True, exist_ok=True)
        (d / "exit.json").unlink(missing_ok=True)
        lay = self._layout(sb, fc, jailer)
        _stage(sb, lay)
        argv = (fcvm.jailer_command(lay.jail, jailer, fcvm.DEFAULT_API_SOCK) if lay.jail and jailer
                else fcvm.firecracker_command(fc, str(lay.api_sock)))
        launch = {"argv": argv, "console": "stdout", "agent_upstream": VSOCK,  # in lay.root
                  "agent_handshake": f"CONNECT {AGENT_PORT}\n", "connect_timeout": BOOT_TIMEOUT,
                  "agent_listen": str(run / SOCKET_NAME)}
        (d / "launch.json").write_text(json.dumps(launch, indent=1))
        started, pending = time.monotonic(), sb.runtime.get("pending_snapshot")
        sup = self._spawn(d, lay)
        try:
            _wait(lambda: lay.api_sock.exists() or sup.poll() is not None, 10)
            with self.api_factory(str(lay.api_sock)) as api:
                api.put_logger(FC_LOG, "Info")
                if pending:  # a restored or forked VM goes on from its snapshot
                    api.load_snapshot(*_snapshot_in(sb, lay, str(pending)), resume_vm=True)
                else:
                    self._boot(api, sb)
            self._wait_agent(sb, sup)
        except AivaError as exc:
            self._kill(sb)
            raise BackendError(f"the VM {sb.name} did not come up: {self._why(sb) or exc}",
                               hint=f"see `aiva logs {sb.name}`, {d}/qemu.log (the VMM's "
                               f"output) and {lay.root / FC_LOG}") from None
        return {"supervisor_pid": sup.pid, "vmm_root": str(lay.root), "jailed": bool(lay.jail),
                "accel": "kvm", "api_socket": str(lay.api_sock), "pending_snapshot": None,
                "network": None,  # no NIC yet
                "boot_seconds": round(time.monotonic() - started, 3),
                "started_at": datetime.now(UTC).isoformat()}

    def boot_args(self, sb: SandboxInfo) -> str:
        return (f"console=ttyS0 quiet reboot=k panic=1 pci=off aiva.root=/dev/vda "
                f"aiva.data=/dev/vdb aiva.agent=vsock:{AGENT_PORT} aiva.halt=reboot "
                f"aiva.hostname={hostname_of(sb.name)}")  # x86 Firecracker ends only on reboot

    def _boot(self, api: fcvm.FirecrackerAPI, sb: SandboxInfo) -> None:
        """A fresh VMM: every device before InstanceStart, in the order the guest names them."""
        cpus = max(1, min(int(sb.spec.cpus), os.cpu_count() or 1, 32))
        api.put_machine_config(vcpu_count=cpus, mem_size_mib=max(128, sb.spec.memory >> 20))
        api.put_boot_source(KERNEL, boot_args=self.boot_args(sb), initrd_path=INITRD)
        # not is_root_device, which adds root=/dev/vda: the initramfs mounts it itself
        api.put_drive("rootfs", ROOTFS, is_root_device=False, is_read_only=True)
        api.put_drive("data", DATA, is_root_device=False, is_read_only=False,
                      cache_type="Writeback")  # the guest's flushes reach the host disk
        api.put_vsock(GUEST_CID, VSOCK)
        if self.balloon:
            api.put_balloon(0, deflate_on_oom=True)
        api.start()

    def _spawn(self, d: Path, lay: Layout) -> subprocess.Popen[bytes]:
        """The supervisor, and so the VMM, runs in ``lay.root``: relative paths mean it."""
        with (d / "supervisor.log").open("ab") as log:
            sup = subprocess.Popen([sys.executable, "-m", "aiva.vm.supervisor", str(d)],
                                   cwd=lay.root, stdin=subprocess.DEVNULL, stdout=log,
                                   stderr=log, start_new_session=True, close_fds=True)
        (d / "supervisor.pid").write_text(str(sup.pid))
        return sup

    def _wait_agent(self, sb: SandboxInfo, sup: subprocess.Popen[bytes]) -> None:
        exited = vm_dir(sb) / "exit.json"
        try:
            client = AgentClient(connect_unix(
                str(paths.run_dir(sb.id) / SOCKET_NAME), timeout=BOOT_TIMEOUT,
                alive=lambda: sup.poll() is None and not exited.exists()))
            client.ping(timeout=BOOT_TIMEOUT)
            client.close()
        except AgentError as exc:
            raise BackendError(str(exc)) from None

    def _layout(self, sb: SandboxInfo, fc: str, jailer: str | None) -> Layout:
        """Jailed only as root (the jailer chroots and changes uid) and with a jailer."""
        if jailer is None or os.geteuid() != 0:
            return Layout(vm_dir(sb), paths.run_dir(sb.id) / "fc.sock", None)
        uid = JAIL_UID_BASE + zlib.crc32(sb.id.encode()) % (1 << 24)
        try:
            jail = fcvm.JailerConfig(id=sb.id, exec_file=fc, uid=uid, gid=uid,
                                     chroot_base_dir=paths.jail_dir())
        except ValueError as exc:  # e.g. the jailer runs only files named *firecracker*
            raise BackendUnavailable(f"cannot jail {fc}: {exc}", hint="rename the binary "
                                     "to firecracker, or run aiva as a non-root user") from None
        root = fcvm.chroot_path(jail)
        return Layout(root, root / fcvm.DEFAULT_API_SOCK.lstrip("/"), jail)

    def stop(self, sb: SandboxInfo, *, force: bool = False, timeout: float = 10.0) -> None:
        """The agent's sys.shutdown (the guest syncs and reboots, which ends Firecracker),
        else Ctrl-Alt-Del, else SIGKILL."""
        exited = (vm_dir(sb) / "exit.json").exists
        if not force and self._running(sb):
            try:
                with self._api(sb) as api:
                    if api.describe_instance()["state"] == "Paused":
                        api.resume()
                client = AgentClient(self.connect_agent(sb, timeout=5))
                client.call("sys.shutdown", timeout=5)
                client.close()
            except Exception:
                pass  # the next steps stop it anyway
            if not _wait(exited, timeout):
                try:
                    with self._api(sb) as api:
                        api.send_ctrl_alt_del()
                except AivaError:
                    pass
                _wait(exited, min(timeout, 5.0))
        self._kill(sb)

    def pause(self, sb: SandboxInfo) -> None:
        with self._api(sb) as api:
            api.pause()

    def resume(self, sb: SandboxInfo) -> None:
        with self._api(sb) as api:
            api.resume()

    def delete(self, sb: SandboxInfo, *, volumes: bool = False) -> None:
        self._kill(sb)
        d = vm_dir(sb)
        for gone in (paths.run_dir(sb.id), *paths.jail_dir().glob(f"*/{sb.id}")):
            shutil.rmtree(gone, ignore_errors=True)
        if volumes:
            shutil.rmtree(d, ignore_errors=True)
        elif d.exists():  # keep the data disk and its snapshots, as Docker keeps the volume
            for child in d.iterdir():
                if child.is_dir() and child.name != "snapshots":
                    shutil.rmtree(child)
                elif not child.is_dir() and child.name != DATA:
                    child.unlink()

    def delete_snapshots(self, sb: SandboxInfo, snaps: list[dict[str, Any]]) -> None:
        for snap in snaps:
            shutil.rmtree(vm_dir(sb) / "snapshots" / str(snap["tag"]), ignore_errors=True)

    def observe(self, sb: SandboxInfo) -> Observed:
        gone = self._observe_down(sb, "firecracker")
        if gone is not None:
            return gone
        try:
            with self._api(sb) as api:
                state = api.describe_instance()["state"]
        except BackendError:
            return Observed(State.RUNNING)  # starting: no API socket yet
        return Observed(State.PAUSED if state == "Paused" else State.RUNNING)

    # ------------------------------------------------------------------ snapshots

    def snapshot(self, sb: SandboxInfo, tag: str) -> dict[str, Any]:
        """Running: pause, a Full snapshot and a copy of the data disk, resume. Stopped:
        the disk alone."""
        d = vm_dir(sb)
        snap = d / "snapshots" / tag
        snap.mkdir(parents=True, exist_ok=True)
        if not self._running(sb):
            copy_sparse(d / DATA, snap / DATA)
            return {"memory": False}
        started, root = time.monotonic(), Path(sb.runtime["vmm_root"])
        out = root if sb.runtime.get("jailed") else snap
        for name in (STATE, MEM):  # new files: the old may back a loaded VM's memory
            (out / name).unlink(missing_ok=True)
        with self._api(sb) as api:
            api.pause()
            try:
                api.create_snapshot(*((f"/{STATE}", f"/{MEM}") if out == root else
                                      (str(snap / STATE), str(snap / MEM))))
                copy_sparse(d / DATA, snap / DATA)  # paused: the disk matches the memory
            finally:
                api.resume()
        for name in (STATE, MEM) if out == root else ():
            os.replace(root / name, snap / name)
        return {"memory": True, "seconds": round(time.monotonic() - started, 3)}

    def restore(self, sb: SandboxInfo, tag: str, snap: dict[str, Any]) -> dict[str, Any]:
        """A snapshot loads only into a fresh VMM: stop, put the disk back, start anew."""
        was_running = self._running(sb)
        if was_running:
            self._kill(sb)
        copy_sparse(vm_dir(sb) / "snapshots" / tag / DATA, vm_dir(sb) / DATA)
        runtime: dict[str, Any] = {"pending_snapshot": tag if snap.get("memory") else None}
        if was_running:
            runtime |= self.start(sb.model_copy(update={"runtime": sb.runtime | runtime}))
        return runtime

    def create_from_snapshot(self, sb: SandboxInfo, source: SandboxInfo, tag: str,
                             snap: dict[str, Any]) -> dict[str, Any]:
        """A new VM with a copy of the snapshot's disk and links to its state and memory
        (the VMM maps memory privately and never writes it)."""
        src, mine = vm_dir(source) / "snapshots" / tag, vm_dir(sb) / "snapshots" / tag
        mine.mkdir(parents=True, exist_ok=True)
        copy_sparse(src / DATA, vm_dir(sb) / DATA)  # create() keeps it
        for name in (STATE, MEM) if snap.get("memory") else ():
            _link(src / name, mine / name)
        return self.create(sb) | {"pending_snapshot": tag if snap.get("memory") else None}

    # ------------------------------------------------------------------ helpers

    def _api(self, sb: SandboxInfo) -> fcvm.FirecrackerAPI:
        if not sb.runtime.get("api_socket"):
            raise BackendError(f"the VM {sb.name} has not been started")
        return self.api_factory(str(sb.runtime["api_socket"]))

    def _kill(self, sb: SandboxInfo) -> None:
        """The VMM first, so the supervisor records the exit; the supervisor if it stays."""
        sup = read_pid(vm_dir(sb) / "supervisor.pid")
        if not sup or not self._running(sb):
            return
        for pid in [*_children(sup), sup]:
            if pid == sup and _wait(lambda: not self._running(sb), 2):
                break
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _wait(lambda: not self._running(sb), 10)
        try:
            os.waitpid(sup, os.WNOHANG)  # reap if it was our child
        except ChildProcessError:
            pass


# ---------------------------------------------------------------------- files


def _stage(sb: SandboxInfo, lay: Layout) -> None:
    """Put what the VMM opens in its working directory, under the names it is given."""
    rt, d = sb.runtime, vm_dir(sb)
    shared = {KERNEL: rt["vmlinux"], INITRD: rt["initramfs"], ROOTFS: rt["rootfs"]}
    lay.api_sock.unlink(missing_ok=True)  # Firecracker will not bind over an old socket
    if lay.jail is None:
        for name, target in shared.items():
            (d / name).unlink(missing_ok=True)
            (d / name).symlink_to(target)
        (d / VSOCK).unlink(missing_ok=True)
        (d / FC_LOG).touch()  # the logger opens its file, it does not create it
        return
    shutil.rmtree(lay.root.parent, ignore_errors=True)  # the jailer sets it up anew
    (lay.root / "run").mkdir(parents=True)
    for name, target in shared.items():
        _link(Path(target), lay.root / name)
    _link(d / DATA, lay.root / DATA, copy=False)  # a copy would lose the guest's writes
    (lay.root / FC_LOG).touch()
    for path in (lay.root, lay.root / "run", lay.root / DATA, lay.root / FC_LOG):
        os.chown(path, lay.jail.uid, lay.jail.gid)


def _snapshot_in(sb: SandboxInfo, lay: Layout, tag: str) -> tuple[str, str]:
    """The snapshot's state and memory files as the VMM names them."""
    snap = vm_dir(sb) / "snapshots" / tag
    if lay.jail is None:
        return str(snap / STATE), str(snap / MEM)
    for name in (STATE, MEM):
        _link(snap / name, lay.root / name, copy=False)
        os.chown(lay.root / name, lay.jail.uid, lay.jail.gid)  # a VMM that has them keeps them
    return f"/{STATE}", f"/{MEM}"


def _link(src: Path, dst: Path, *, copy: bool = True) -> None:
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError as exc:
        if exc.errno != errno.EXDEV or not copy:
            raise BackendError(f"cannot link {src} to {dst}: {exc.strerror}",
                               hint="keep AIVA_HOME on one file system") from None
        copy_sparse(src, dst)


def copy_sparse(src: Path, dst: Path) -> None:
    """Copy keeping holes (a new 10 GiB disk takes a few MiB), by reflink where possible."""
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}")
    res = subprocess.run(["cp", "--reflink=auto", str(src), str(tmp)], capture_output=True,
                         text=True, stdin=subprocess.DEVNULL)
    if res.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise BackendError(f"cannot copy {src}: {res.stderr.strip()}")
    os.replace(tmp, dst)


def make_data_disk(path: Path, size: int) -> None:
    """Raw sparse ext4, formatted as ``disks.create_data_disk`` formats its qcow2."""
    from aiva.vm import disks

    if size < disks.MIN_DATA_DISK:
        raise BackendError(f"a data disk of {size} bytes is too small",
                           hint=f"use at least {disks.MIN_DATA_DISK >> 20} MiB")
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.truncate(size - size % 4096)
        disks._run([disks._tool("mkfs.ext4", "e2fsprogs"), "-q", "-F", "-t", "ext4", "-L",
                    "aiva-data", "-b", "4096", "-m", "0", "-E",
                    "lazy_itable_init=0,lazy_journal_init=0", str(tmp)], "mkfs.ext4 (data)")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rpartition(")")[2].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return found


def _wait(done: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not done():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True
