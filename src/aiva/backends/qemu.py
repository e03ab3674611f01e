"""Sandboxes as QEMU ``microvm`` VMs: hardware isolation, the same agent as containers.

Each VM lives in ``AIVA_HOME/vms/<id>/``: ``launch.json`` (the QEMU command), the
per-VM data disk (qcow2, survives stop/start), the console log, and the sockets; the
guest's syslog arrives through a second virtio-serial port in ``run/<id>/syslog.jsonl``. The
kernel, initramfs and the read-only system image are shared by every VM of a template
(``aiva.vm.artifacts``). A supervisor process (``aiva.vm.supervisor``) owns QEMU and
serves the agent on ``agent.sock``, so exec and file calls work exactly as for Docker.
Host directories (``--mount``) come in over virtio-fs, served by a virtiofsd the
supervisor runs beside QEMU (``aiva.vm.hostfs``).

KVM is used only where a bounded probe shows it can boot the kernel; otherwise TCG.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiva import paths, progress
from aiva.agent_client import AgentClient, connect_unix
from aiva.backends.base import Observed
from aiva.backends.supervised import (
    SOCKET_NAME,
    SYSLOG_NAME,
    SupervisedVM,
    hostname_of,
    pid_alive,
    read_pid,
    template_of,
    vm_dir,
)
from aiva.config import load_config
from aiva.errors import AgentError, BackendError, BackendUnavailable, InvalidValue
from aiva.models import SandboxInfo, State
from aiva.network import egress
from aiva.network import vm_bridge as network
from aiva.observe.metrics import SandboxMetrics, qemu_host_metrics
from aiva.vm import hostfs
from aiva.vm.kernel import tcg_kernel_args

QEMU = "qemu-system-x86_64"
BOOT_TIMEOUT = 120.0  # TCG on a busy 2-core host can be slow; a hang still ends here
KVM_PROBE_TIMEOUT = 15.0


class QemuBackend(SupervisedVM):
    name = "qemu"

    def check(self) -> None:
        if shutil.which(QEMU) is None:
            raise BackendUnavailable(
                "QEMU is not installed",
                hint="install it: `sudo apt-get install qemu-system-x86 qemu-utils`",
            )

    # ------------------------------------------------------------------ accel

    def accel(self, kernel: Path, initramfs: Path) -> str:
        """``kvm`` if configured or if a bounded probe boots the kernel under KVM, else ``tcg``."""
        wanted = load_config().platform.linux.accel
        if wanted != "auto":
            return wanted
        if not os.access("/dev/kvm", os.R_OK | os.W_OK):
            return "tcg"
        cache = paths.accel_cache()
        key = f"{kernel.name}:{os.stat(kernel).st_mtime_ns}"
        try:
            known = json.loads(cache.read_text())
        except (OSError, ValueError):
            known = {}
        if key not in known:
            known[key] = "kvm" if _kvm_boots(kernel, initramfs) else "tcg"
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(known))
        return str(known[key])

    # ------------------------------------------------------------------ lifecycle

    def create(self, sb: SandboxInfo) -> dict[str, Any]:
        from aiva.vm import artifacts, disks

        self.check()
        if sb.spec.mounts:
            hostfs.check_host()
        pinned = None
        if egress.mode_of(sb.spec.network) == "allow":  # names resolved now, then pinned
            network.check_host()
            egress.check_host()
            pinned = egress.pin(sb.spec.network)
        art = artifacts.ensure_vm_artifacts(template_of(sb), progress=progress.say)
        d = vm_dir(sb)
        d.mkdir(parents=True, exist_ok=True)
        data = d / "data.qcow2"
        if not data.exists():
            disks.create_data_disk(data, sb.spec.disk)
        return {
            "vm_dir": str(d),
            "kernel": str(art.kernel),
            "initramfs": str(art.initramfs),
            "rootfs": str(art.rootfs),
            "data_disk": str(data),
            "agent_socket": str(paths.run_dir(sb.id) / SOCKET_NAME),
            **({"egress": pinned} if pinned is not None else {}),
        }

    def start(self, sb: SandboxInfo) -> dict[str, Any]:
        self.check()
        d, run = vm_dir(sb), paths.run_dir(sb.id)
        run.mkdir(parents=True, exist_ok=True)
        for stale in ("exit.json", "qemu.pid", hostfs.PIDS):
            (d / stale).unlink(missing_ok=True)
        rt = sb.runtime
        accel = self.accel(Path(rt["kernel"]), Path(rt["initramfs"]))
        # host directories: virtiofsd, which the supervisor starts before QEMU
        helpers = [hostfs.helper(sb, d, run)] if sb.spec.mounts else []
        net = network.setup_vm_network(sb.id, egress.mode_of(sb.spec.network), sb.spec.ports,
                                       allow=rt.get("egress"))
        argv = _qemu_argv(sb, accel, run, net)
        if rt.get("pending_loadvm"):  # a restored or forked VM resumes its saved memory
            argv += ["-loadvm", rt["pending_loadvm"]]
        launch = {"argv": argv, "console": str(run / "console.sock"),
                  "agent_upstream": str(run / "agent-up.sock"),
                  "agent_listen": str(run / SOCKET_NAME), "network": net.to_dict(),
                  "syslog_upstream": str(run / "syslog-up.sock"),
                  "syslog_out": str(run / SYSLOG_NAME),
                  "helpers": helpers}
        (d / "launch.json").write_text(json.dumps(launch, indent=1))
        with (d / "supervisor.log").open("ab") as log:
            sup = subprocess.Popen([sys.executable, "-m", "aiva.vm.supervisor", str(d)],
                                   stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                   start_new_session=True, close_fds=True)
        (d / "supervisor.pid").write_text(str(sup.pid))
        marker = str(d)
        started = time.monotonic()
        progress.say(f"booting the VM ({accel}{', slow: no KVM here' if accel == 'tcg' else ''})")
        try:
            client = AgentClient(connect_unix(
                str(run / SOCKET_NAME), timeout=BOOT_TIMEOUT,
                alive=lambda: sup.poll() is None and not (d / "exit.json").exists()))
            client.ping(timeout=BOOT_TIMEOUT)
            if egress.hosts_lines(rt.get("egress")):
                _pin_hosts(client, rt["egress"])
            client.close()
        except AgentError as exc:
            self._kill(sb)
            raise BackendError(
                f"the VM {sb.name} did not come up: {self._why(sb) or exc}",
                hint=f"see `aiva logs {sb.name}` and {d}/qemu.log",
            ) from None
        return {"accel": accel, "supervisor_pid": sup.pid, "pending_loadvm": None,
                "network": net.to_dict(), "ports": _ports(net),
                "qemu_pid": read_pid(d / "qemu.pid"), "vm_marker": marker,
                "boot_seconds": round(time.monotonic() - started, 3),
                "started_at": datetime.now(UTC).isoformat()}

    def stop(self, sb: SandboxInfo, *, force: bool = False, timeout: float = 10.0) -> None:
        d = vm_dir(sb)
        if not force and self._running(sb):
            try:
                if self._qmp_status(sb) == "paused":
                    self._qmp(sb, "cont")
                client = AgentClient(self.connect_agent(sb, timeout=5))
                client.call("sys.shutdown", timeout=5)
                client.close()
            except Exception:
                pass  # fall through to the hard stop
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and not (d / "exit.json").exists():
                time.sleep(0.05)
        self._kill(sb)

    def pause(self, sb: SandboxInfo) -> None:
        self._qmp(sb, "stop")

    def resume(self, sb: SandboxInfo) -> None:
        self._qmp(sb, "cont")

    def delete(self, sb: SandboxInfo, *, volumes: bool = False) -> None:
        self._kill(sb)
        d = vm_dir(sb)
        shutil.rmtree(paths.run_dir(sb.id), ignore_errors=True)
        if volumes:
            shutil.rmtree(d, ignore_errors=True)
        elif d.exists():  # keep only the data disk, as Docker keeps the volume
            for child in d.iterdir():
                if child.name != "data.qcow2":
                    child.unlink(missing_ok=True) if child.is_file() else shutil.rmtree(child)

    def observe(self, sb: SandboxInfo) -> Observed:
        gone = self._observe_down(sb, "QEMU")
        if gone is not None:
            return gone
        try:
            status = self._qmp_status(sb)
        except BackendError:
            return Observed(State.RUNNING)  # booting: QMP not up yet
        return Observed(State.PAUSED if status == "paused" else State.RUNNING)

    def syslog_path(self, sb: SandboxInfo) -> Path | None:
        """The supervisor writes what the guest's agent sends on the port ``aiva.syslog``
        here (bounded, rotated to ``.1``, like the agent's own file on Docker)."""
        return paths.run_dir(sb.id) / SYSLOG_NAME

    def metrics(self, sb: SandboxInfo) -> SandboxMetrics:
        pid = read_pid(vm_dir(sb) / "qemu.pid")
        if pid is None or not pid_alive(pid, sb.id[:12]):
            raise BackendError(f"{sb.name} has no running QEMU", hint=f"aiva status {sb.name}")
        return qemu_host_metrics(pid, paths.run_dir(sb.id) / "qmp.sock",
                                 tap=(sb.runtime.get("network") or {}).get("tap") or None)

    def reap(self, live_ids: set[str]) -> list[str]:
        return network.reap_stale(live_ids) if os.geteuid() == 0 else []

    # ------------------------------------------------------------------ snapshots

    def snapshot(self, sb: SandboxInfo, tag: str) -> dict[str, Any]:
        """Running: ``savevm`` (disk and memory, inside the data disk's qcow2);
        stopped: a disk-only internal snapshot."""
        if self._running(sb) and sb.spec.mounts:
            raise BackendError(
                f"{sb.name} mounts host directories, so QEMU cannot save its memory "
                "(a virtio-fs device cannot be migrated)",
                hint=f"stop it first for a disk snapshot: `aiva stop {sb.name}`")
        if self._running(sb):
            started = time.monotonic()
            self._hmp(sb, f"savevm {tag}")
            return {"memory": True, "seconds": round(time.monotonic() - started, 3)}
        _qemu_img("snapshot", "-c", tag, sb.runtime["data_disk"])
        return {"memory": False}

    def restore(self, sb: SandboxInfo, tag: str, snap: dict[str, Any]) -> dict[str, Any]:
        if self._running(sb) and snap.get("memory"):
            self._hmp(sb, f"loadvm {tag}")  # in place: its processes go on from the save
            return {}
        was_running = self._running(sb)
        if was_running:
            self._kill(sb)
        _qemu_img("snapshot", "-a", tag, sb.runtime["data_disk"])
        runtime: dict[str, Any] = {"pending_loadvm": tag if snap.get("memory") else None}
        if was_running:
            runtime |= self.start(sb.model_copy(update={"runtime": sb.runtime | runtime}))
        return runtime

    def create_from_snapshot(self, sb: SandboxInfo, source: SandboxInfo, tag: str,
                             snap: dict[str, Any]) -> dict[str, Any]:
        """A new VM with a copy of the source's data disk, resumed from ``tag``."""
        runtime = self.create(sb)
        data = Path(runtime["data_disk"])
        paused = self._running(source) and self._qmp_status(source) == "running"
        if paused:
            self._qmp(source, "stop")  # drains and flushes the disk, so the copy is whole
        try:
            shutil.copyfile(source.runtime["data_disk"], data)
        finally:
            if paused:
                self._qmp(source, "cont")
        if snap.get("memory"):
            runtime["pending_loadvm"] = tag
        else:
            _qemu_img("snapshot", "-a", tag, str(data))
        return runtime

    def _hmp(self, sb: SandboxInfo, command: str) -> str:
        out = str(self._qmp(sb, "human-monitor-command", **{"command-line": command}) or "")
        if out.strip():  # savevm / loadvm print only on failure
            raise BackendError(f"QEMU: {command} failed: {out.strip()}")
        return out

    # ------------------------------------------------------------------ helpers

    def _kill(self, sb: SandboxInfo) -> None:
        """Hard stop: QEMU first (the supervisor then records the exit and leaves)."""
        d = vm_dir(sb)
        qemu_pid = read_pid(d / "qemu.pid")
        sup_pid = read_pid(d / "supervisor.pid")
        try:  # virtiofsd: it would exit once QEMU is gone; a stuck one must not stay
            helper_pids = [int(x) for x in (d / hostfs.PIDS).read_text().split()]
        except (OSError, ValueError):
            helper_pids = []
        for pid in (qemu_pid, sup_pid, *helper_pids):
            if pid and pid_alive(pid, str(d) if pid == sup_pid else sb.id[:12]):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self._running(sb):
            time.sleep(0.02)
        network.teardown_vm_network(sb.id)
        if sup_pid:
            try:
                os.waitpid(sup_pid, os.WNOHANG)  # reap if it was our child
            except ChildProcessError:
                pass

    def _qmp(self, sb: SandboxInfo, cmd: str, **args: Any) -> Any:
        from qemu.qmp.legacy import QEMUMonitorProtocol

        sock = str(paths.run_dir(sb.id) / "qmp.sock")
        qmp = QEMUMonitorProtocol(sock)
        try:
            qmp.connect()
            reply = qmp.cmd_raw(cmd, args or None)
        except (OSError, Exception) as exc:
            raise BackendError(f"QEMU of {sb.name} did not answer '{cmd}': {exc}") from exc
        finally:
            qmp.close()
        if "error" in reply:
            raise BackendError(f"QEMU refused '{cmd}': {reply['error'].get('desc')}")
        return reply.get("return")

    def _qmp_status(self, sb: SandboxInfo) -> str:
        return str(self._qmp(sb, "query-status")["status"])


def _qemu_img(*args: str) -> None:
    proc = subprocess.run(["qemu-img", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise BackendError(f"qemu-img {' '.join(args[:2])} failed: {proc.stderr.strip()}",
                           hint="is qemu-utils installed? is the VM stopped?")


def _pin_hosts(client: AgentClient, pinned: dict[str, Any]) -> None:
    """An allow-list's pinned names in the guest's /etc/hosts: a convenience only (the
    rules are on the host, whatever the guest does with this file)."""
    try:
        current = client.read_file("/etc/hosts").decode(errors="replace")
    except FileNotFoundError:
        current = ""
    client.write_file("/etc/hosts", egress.hosts_file(current, pinned), mode=0o644)


def _ports(net: network.VmNetwork) -> list[str]:
    return [f"{p.host_ip}:{p.host_port}->{p.guest_port}/{p.protocol}" for p in net.ports]


def _qemu_argv(sb: SandboxInfo, accel: str, run: Path, net: network.VmNetwork) -> list[str]:
    rt, spec = sb.runtime, sb.spec
    mem_mib = max(128, spec.memory >> 20)
    cpus = max(1, min(int(spec.cpus), os.cpu_count() or 1))
    cmdline = " ".join([
        "console=ttyS0 quiet panic=-1 pci=off",
        "aiva.root=/dev/vda aiva.data=/dev/vdb aiva.syslog=1",
        f"aiva.hostname={hostname_of(sb.name)}",
        *net.kernel_args(),
        *hostfs.kernel_args(spec.mounts),
        # under TCG microvm's PIT cannot calibrate the TSC: give the kernel its rate
        *(tcg_kernel_args() if accel == "tcg" else []),
    ])
    if len(cmdline) >= 2048:  # x86's COMMAND_LINE_SIZE: the rest would be cut off
        raise InvalidValue(f"the mounts of {sb.name} make the kernel command line too long "
                           f"({len(cmdline)} bytes, 2047 at most)",
                           hint="use fewer or shorter paths in the sandbox")
    machine = "microvm,memory-backend=mem" if spec.mounts else "microvm"
    return [
        QEMU, "-name", f"aiva-{sb.name},process=aiva-{sb.id[:12]}",
        "-M", machine, "-accel", accel, "-m", str(mem_mib), "-smp", str(cpus),
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-kernel", rt["kernel"], "-initrd", rt["initramfs"], "-append", cmdline,
        "-drive", f"id=root,file={rt['rootfs']},format=raw,if=none,readonly=on",
        "-device", "virtio-blk-device,drive=root",
        "-drive", f"id=data,file={rt['data_disk']},format=qcow2,if=none,cache=writeback",
        "-device", "virtio-blk-device,drive=data",
        "-device", "virtio-serial-device",
        "-chardev", f"socket,id=agent,path={run}/agent-up.sock,server=on,wait=off",
        "-device", "virtserialport,chardev=agent,name=aiva.agent",
        # the guest's syslog: the agent writes JSON lines to this port; the supervisor
        # reads them from this socket into run/syslog.jsonl, bounded and rotated
        "-chardev", f"socket,id=syslog,path={run}/syslog-up.sock,server=on,wait=off",
        "-device", "virtserialport,chardev=syslog,name=aiva.syslog",
        "-chardev", f"socket,id=con,path={run}/console.sock,server=on,wait=off",
        "-serial", "chardev:con",
        "-qmp", f"unix:{run}/qmp.sock,server=on,wait=off",
        *net.qemu_args(),
        *(hostfs.qemu_args(run, mem_mib) if spec.mounts else []),
        "-pidfile", str(Path(rt["vm_dir"]) / "qemu.pid"),
    ]


def _kvm_boots(kernel: Path, initramfs: Path) -> bool:
    """Boot the kernel under KVM with no disks: reaching /init (which then fails to find
    its disks and says so) proves KVM can run it. Bounded, never a hang."""
    proc = subprocess.Popen(
        [QEMU, "-M", "microvm", "-accel", "kvm", "-m", "256", "-nodefaults",
         "-no-user-config", "-nographic", "-no-reboot", "-kernel", str(kernel),
         "-initrd", str(initramfs), "-append", "console=ttyS0 aiva.root=/dev/none",
         "-serial", "stdio"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        out, _ = proc.communicate(timeout=KVM_PROBE_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return False
    return b"AIVA-INIT" in out
