"""The Firecracker backend, checked against Firecracker's published API description.

No Firecracker binary runs here, so the backend's API client goes to a recording
``httpx.MockTransport`` and every request is validated with the validator of
``test_firecracker_api`` (the spec in tests/data). The supervisor is replaced by a stub
in the backend tests; the supervisor's vsock handshake and stdout console are tested with
a stand-in VMM process; the vmlinux extraction runs on made-up bzImages and, where one
is cached, on the real Debian kernel. A real boot runs only where firecracker and KVM are.
"""

from __future__ import annotations

import bz2
import errno
import gzip
import json
import lzma
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from test_firecracker_api import GET_ANSWERS, FakeFirecracker  # the spec validator, reused

import aiva.agent
from aiva.agent_client import AgentClient, SocketTransport, connect_unix
from aiva.backends import firecracker as fcb
from aiva.backends import make_backend
from aiva.backends.firecracker import FirecrackerBackend, Layout
from aiva.errors import AgentUnreachable, BackendError, BackendUnavailable
from aiva.models import SandboxInfo, SandboxSpec, State
from aiva.paths import aiva_home
from aiva.vm import artifacts, vmlinux
from aiva.vm import firecracker_api as fcvm

MIB = 1 << 20


# ---------------------------------------------------------------------- harness


@dataclass
class Fake(FakeFirecracker):
    """The recording fake VMM, plus the state GET / reports and snapshot files written
    where a real VMM would write them (``root`` stands for the jail's /)."""

    state: str = "Not started"
    root: Path | None = None
    files: list[Path] = field(default_factory=list)

    def handle(self, request: httpx.Request) -> httpx.Response:
        resp = super().handle(request)
        body = self.sent[-1].body
        if resp.status_code >= 400:
            return resp
        if request.url.path == "/vm":
            self.state = "Paused" if body["state"] == "Paused" else "Running"
        if request.url.path == "/actions" and body["action_type"] == "InstanceStart":
            self.state = "Running"
        if request.url.path == "/snapshot/load":
            self.state = "Running" if body.get("resume_vm") else "Paused"
        if request.url.path == "/snapshot/create":
            for key in ("snapshot_path", "mem_file_path"):
                path = Path(body[key]) if self.root is None else self.root / body[key][1:]
                path.write_bytes(key.encode())
                self.files.append(path)
        if request.method == "GET" and request.url.path == "/":
            return httpx.Response(200, json={**GET_ANSWERS["/"], "state": self.state})
        return resp

    def requests(self, since: int = 0) -> list[tuple[str, str]]:
        """Validate everything sent; return (method, path) from ``since`` on."""
        return self.validated()[since:]


class _Proc:
    pid = 4242

    def poll(self) -> int | None:
        return None


class Harness(FirecrackerBackend):
    """The backend with the supervisor and the agent wait stubbed out."""

    def __init__(self, fake: Fake) -> None:
        super().__init__(lambda sock: fcvm.FirecrackerAPI(
            sock, transport=httpx.MockTransport(fake.handle)))
        self.fake, self.running, self.kills = fake, False, 0
        self.layouts: list[Layout] = []

    def _spawn(self, d: Path, lay: Layout) -> subprocess.Popen[bytes]:
        lay.api_sock.parent.mkdir(parents=True, exist_ok=True)
        lay.api_sock.touch()  # what firecracker does first
        self.layouts.append(lay)
        self.running = True
        return cast("subprocess.Popen[bytes]", _Proc())

    def _wait_agent(self, sb: SandboxInfo, sup: subprocess.Popen[bytes]) -> None:
        return None

    def _running(self, sb: SandboxInfo) -> bool:
        return self.running

    def _kill(self, sb: SandboxInfo) -> None:
        self.kills += int(self.running)
        self.running = False

    def connect_agent(self, sb: SandboxInfo, *, timeout: float = 10.0) -> Any:
        raise AgentUnreachable("no agent in the unit tests")


def _exe(path: Path) -> str:
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)
    return str(path)


@pytest.fixture
def host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """A host with fake firecracker and jailer binaries on PATH and KVM said usable."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    found = {"firecracker": _exe(bin_dir / "firecracker"), "jailer": _exe(bin_dir / "jailer")}
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin:/usr/sbin:/sbin")
    monkeypatch.setattr(fcvm, "kvm_usable", lambda device="/dev/kvm": (True, ""))
    yield found


@pytest.fixture
def art(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> artifacts.VmArtifacts:
    """Stand-ins for the template's kernel (already an ELF), initramfs and system image."""
    d = tmp_path / "art"
    d.mkdir()
    (d / "vmlinuz-test").write_bytes(b"\x7fELF" + bytes(60))
    (d / "initramfs.cpio.gz").write_bytes(b"initramfs")
    (d / "rootfs.ext4").write_bytes(b"rootfs")
    made = artifacts.VmArtifacts(d / "vmlinuz-test", d / "initramfs.cpio.gz",
                                 d / "rootfs.ext4", "test")
    monkeypatch.setattr(artifacts, "ensure_vm_artifacts", lambda template, progress=None: made)
    return made


def _info(name: str = "fc-unit", cpus: float = 2, memory: int = 512 * MIB) -> SandboxInfo:
    spec = SandboxSpec(backend="firecracker", image="aiva/minimal:latest", template="minimal",
                       cpus=cpus, memory=memory, disk=64 * MIB)
    return SandboxInfo(name=name, spec=spec)


needs_mkfs = pytest.mark.skipif(
    shutil.which("mkfs.ext4", path="/usr/sbin:/sbin:/usr/bin:/bin") is None,
    reason="mkfs.ext4 (e2fsprogs) is not installed")


@pytest.fixture
def made(host: dict[str, str], art: artifacts.VmArtifacts, monkeypatch: pytest.MonkeyPatch,
         ) -> Iterator[tuple[Harness, SandboxInfo]]:
    """An unjailed backend (a non-root caller) and a created sandbox; removed afterwards."""
    if shutil.which("mkfs.ext4", path="/usr/sbin:/sbin:/usr/bin:/bin") is None:
        pytest.skip("mkfs.ext4 (e2fsprogs) is not installed")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    backend = Harness(Fake())
    sb = _info()
    sb = sb.model_copy(update={"runtime": backend.create(sb)})
    yield backend, sb
    backend.delete(sb, volumes=True)


def _started(backend: Harness, sb: SandboxInfo) -> SandboxInfo:
    return sb.model_copy(update={"runtime": sb.runtime | backend.start(sb),
                                 "state": State.RUNNING})


def _bodies(fake: Fake, path: str) -> list[Any]:
    return [s.body for s in fake.sent if s.path == path]


# ---------------------------------------------------------------------- check


def test_registered_by_name_but_not_auto() -> None:
    from aiva import backends

    assert "firecracker" in backends.KNOWN and "firecracker" not in backends.AUTO_ORDER
    assert isinstance(make_backend("firecracker"), FirecrackerBackend)


@pytest.mark.skipif(shutil.which("firecracker") is not None, reason="firecracker is installed")
def test_check_here_says_why_firecracker_is_unavailable() -> None:
    with pytest.raises(BackendUnavailable) as info:
        FirecrackerBackend().check()
    assert "no firecracker binary" in info.value.message
    assert info.value.hint and "platform.linux.firecracker_binary" in info.value.hint


def test_check_without_binaries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(BackendUnavailable, match="no firecracker binary"):
        FirecrackerBackend().check()


def test_check_without_kvm(host: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fcvm, "kvm_usable", lambda device="/dev/kvm": (False, "no /dev/kvm"))
    with pytest.raises(BackendUnavailable, match="Firecracker needs KVM: no /dev/kvm") as info:
        FirecrackerBackend().check()
    assert info.value.hint


def test_the_jailer_is_optional(host: dict[str, str]) -> None:
    backend = FirecrackerBackend()
    assert backend._binaries() == (host["firecracker"], host["jailer"])
    os.unlink(host["jailer"])
    backend.check()
    assert backend._binaries() == (host["firecracker"], None)


# ---------------------------------------------------------------------- create and boot


def test_create_makes_a_sparse_raw_ext4_data_disk(made: tuple[Harness, SandboxInfo],
                                                  art: artifacts.VmArtifacts) -> None:
    backend, sb = made
    rt = sb.runtime
    data = Path(rt["data_disk"])
    assert data == aiva_home() / "vms" / sb.id / "data.ext4"
    raw = data.read_bytes()
    assert len(raw) == 64 * MIB and struct.unpack_from("<H", raw, 1024 + 0x38)[0] == 0xEF53
    assert raw[1024 + 0x78:1024 + 0x78 + 9] == b"aiva-data"  # the ext4 volume label
    assert data.stat().st_blocks * 512 < 16 * MIB, "the data disk is not sparse"
    assert rt["vmlinux"] == str(art.kernel)  # an ELF kernel is used as it is
    assert rt["rootfs"] == str(art.rootfs) and rt["initramfs"] == str(art.initramfs)
    assert backend.fake.sent == []  # nothing runs before start


def test_boot_sequence_is_valid_and_ordered(made: tuple[Harness, SandboxInfo],
                                            host: dict[str, str]) -> None:
    backend, sb = made
    sb = _started(backend, sb)
    fake, d, rt = backend.fake, aiva_home() / "vms" / sb.id, sb.runtime
    sent = fake.requests()
    assert sent == [("PUT", "/logger"), ("PUT", "/machine-config"), ("PUT", "/boot-source"),
                    ("PUT", "/drives/rootfs"), ("PUT", "/drives/data"), ("PUT", "/vsock"),
                    ("PUT", "/actions")]
    bodies = [s.body for s in fake.sent]
    assert bodies[0] == {"log_path": "firecracker.log", "level": "Info"}
    assert bodies[1] == {"vcpu_count": min(2, os.cpu_count() or 1), "mem_size_mib": 512,
                         "smt": False, "track_dirty_pages": False}
    boot = bodies[2]
    assert boot["kernel_image_path"] == "vmlinux" and boot["initrd_path"] == "initrd.img"
    args = boot["boot_args"].split()
    for want in ("console=ttyS0", "reboot=k", "panic=1", "pci=off", "aiva.root=/dev/vda",
                 "aiva.data=/dev/vdb", "aiva.agent=vsock:1024", "aiva.hostname=fc-unit",
                 "aiva.halt=reboot"):
        assert want in args, want
    assert bodies[3] == {"drive_id": "rootfs", "path_on_host": "rootfs.ext4",
                         "is_root_device": False, "is_read_only": True, "cache_type": "Unsafe"}
    assert bodies[4] == {"drive_id": "data", "path_on_host": "data.ext4",
                         "is_root_device": False, "is_read_only": False,
                         "cache_type": "Writeback"}
    assert bodies[5] == {"guest_cid": 3, "uds_path": "v.sock"}
    assert bodies[6] == {"action_type": "InstanceStart"}
    # the relative paths resolve in the VM dir, the VMM's working directory
    assert backend.layouts[-1].root == d and backend.layouts[-1].jail is None
    assert (d / "vmlinux").resolve() == Path(rt["vmlinux"]).resolve()
    assert (d / "initrd.img").resolve() == Path(rt["initramfs"]).resolve()
    assert (d / "rootfs.ext4").resolve() == Path(rt["rootfs"]).resolve()
    assert (d / "firecracker.log").exists() and not (d / "v.sock").exists()
    launch = json.loads((d / "launch.json").read_text())
    assert launch["argv"] == [host["firecracker"], "--api-sock", rt["api_socket"]]
    assert launch["console"] == "stdout" and launch["agent_upstream"] == "v.sock"
    assert launch["agent_handshake"] == "CONNECT 1024\n"
    assert launch["agent_listen"] == rt["agent_socket"]
    assert rt["jailed"] is False and rt["pending_snapshot"] is None
    assert len(rt["api_socket"]) < 100  # a Unix socket path must fit


def test_balloon_is_optional(made: tuple[Harness, SandboxInfo]) -> None:
    backend, sb = made
    backend.balloon = True
    _started(backend, sb)
    assert backend.fake.requests()[-2:] == [("PUT", "/balloon"), ("PUT", "/actions")]
    assert _bodies(backend.fake, "/balloon") == [
        {"amount_mib": 0, "deflate_on_oom": True, "stats_polling_interval_s": 1}]


def test_cpus_and_memory_come_from_the_spec(made: tuple[Harness, SandboxInfo]) -> None:
    backend, sb = made
    sb = sb.model_copy(update={"spec": _info(cpus=1, memory=2048 * MIB).spec})
    _started(backend, sb)
    assert _bodies(backend.fake, "/machine-config")[0]["vcpu_count"] == 1
    assert _bodies(backend.fake, "/machine-config")[0]["mem_size_mib"] == 2048


def test_a_refused_start_kills_the_vm_and_says_why(made: tuple[Harness, SandboxInfo]) -> None:
    backend, sb = made
    fault = "Cannot load kernel: Invalid Elf magic number"
    backend.fake.fail["PUT", "/actions"] = httpx.Response(400, json={"fault_message": fault})
    with pytest.raises(BackendError, match="did not come up") as info:
        backend.start(sb)
    assert fault in info.value.message and info.value.hint
    assert backend.kills == 1 and not backend.running


def test_jailed_when_root_with_a_jailer(host: dict[str, str], art: artifacts.VmArtifacts,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    if shutil.which("mkfs.ext4", path="/usr/sbin:/sbin:/usr/bin:/bin") is None:
        pytest.skip("mkfs.ext4 (e2fsprogs) is not installed")
    chowned: dict[str, tuple[int, int]] = {}
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(os, "chown", lambda p, u, g: chowned.__setitem__(str(p), (u, g)))
    fake = Fake()
    backend, sb = Harness(fake), _info("fc-jail")
    sb = sb.model_copy(update={"runtime": backend.create(sb)})
    try:
        sb = _started(backend, sb)
        d, lay = aiva_home() / "vms" / sb.id, backend.layouts[-1]
        assert lay.jail is not None and lay.root == fcvm.chroot_path(lay.jail)
        assert lay.root == aiva_home() / "jail" / "firecracker" / sb.id / "root"
        uid = lay.jail.uid
        assert uid >= fcb.JAIL_UID_BASE and lay.jail.gid == uid
        launch = json.loads((d / "launch.json").read_text())
        assert launch["argv"] == fcvm.jailer_command(lay.jail, host["jailer"])
        assert launch["argv"][:3] == [host["jailer"], "--id", sb.id]
        assert launch["argv"][-2:] == ["--api-sock", "/run/firecracker.socket"]
        assert sb.runtime["api_socket"] == str(lay.root / "run" / "firecracker.socket")
        # the same relative paths as unjailed: a snapshot loads in either mode
        assert _bodies(fake, "/drives/data")[0]["path_on_host"] == "data.ext4"
        assert _bodies(fake, "/vsock")[0]["uds_path"] == "v.sock"
        assert os.stat(lay.root / "data.ext4").st_ino == os.stat(d / "data.ext4").st_ino
        for name, src in (("vmlinux", art.kernel), ("rootfs.ext4", art.rootfs)):
            assert (lay.root / name).read_bytes() == src.read_bytes()
        for name in ("", "run", "data.ext4", "firecracker.log"):
            assert chowned[str(lay.root / name) if name else str(lay.root)] == (uid, uid)

        # a memory snapshot: written in the jail, kept in the VM dir
        fake.root = lay.root
        assert backend.snapshot(sb, "j1") == {"memory": True, "seconds": pytest.approx(0, abs=5)}
        create = _bodies(fake, "/snapshot/create")[0]
        assert create == {"snapshot_path": "/vm.state", "mem_file_path": "/vm.mem",
                          "snapshot_type": "Full"}
        snap = d / "snapshots" / "j1"
        assert (snap / "vm.state").read_bytes() == b"snapshot_path"
        assert not (lay.root / "vm.state").exists()

        # restore: a fresh jail, the files linked in and given to the VM's uid
        sent = len(fake.sent)
        runtime = backend.restore(sb, "j1", {"memory": True})
        assert runtime["pending_snapshot"] is None and backend.kills == 1
        assert fake.requests(sent) == [("PUT", "/logger"), ("PUT", "/snapshot/load")]
        assert _bodies(fake, "/snapshot/load")[0]["snapshot_path"] == "/vm.state"
        assert os.stat(lay.root / "vm.mem").st_ino == os.stat(snap / "vm.mem").st_ino
        assert chowned[str(lay.root / "vm.mem")] == (uid, uid)
    finally:
        backend.delete(sb, volumes=True)
    assert not (aiva_home() / "jail" / "firecracker" / sb.id).exists()


# ---------------------------------------------------------------------- running VM


def test_pause_resume_and_observe(made: tuple[Harness, SandboxInfo]) -> None:
    backend, sb = made
    sb = _started(backend, sb)
    fake, sent = backend.fake, len(backend.fake.sent)
    assert backend.observe(sb).state == State.RUNNING
    backend.pause(sb)
    assert backend.observe(sb).state == State.PAUSED
    backend.resume(sb)
    assert backend.observe(sb).state == State.RUNNING
    assert fake.requests(sent) == [("GET", "/"), ("PATCH", "/vm"), ("GET", "/"),
                                   ("PATCH", "/vm"), ("GET", "/")]
    assert _bodies(fake, "/vm") == [{"state": "Paused"}, {"state": "Resumed"}]


def test_observe_without_a_vmm(made: tuple[Harness, SandboxInfo]) -> None:
    backend, sb = made
    running = sb.model_copy(update={"state": State.RUNNING})
    assert backend.observe(running).state == State.ERROR
    assert backend.observe(sb.model_copy(update={"state": State.STOPPED})).state == State.STOPPED
    d = aiva_home() / "vms" / sb.id
    (d / "exit.json").write_text(json.dumps({"code": 0, "at": 0, "reason": None}))
    obs = backend.observe(running)
    assert (obs.state, obs.exit_code) == (State.STOPPED, 0) and "firecracker" in str(obs.reason)
    (d / "exit.json").write_text(json.dumps({"code": 1, "reason": "cannot reach"}))
    assert backend.observe(running).reason == "cannot reach"
    assert backend.fake.sent == []


def test_stop_escalates_to_ctrl_alt_del_then_kill(made: tuple[Harness, SandboxInfo]) -> None:
    backend, sb = made
    sb = _started(backend, sb)
    backend.pause(sb)
    sent = len(backend.fake.sent)
    backend.stop(sb, timeout=0.1)  # no agent answers and nothing exits
    assert backend.fake.requests(sent) == [("GET", "/"), ("PATCH", "/vm"), ("PUT", "/actions")]
    assert _bodies(backend.fake, "/actions")[-1] == {"action_type": "SendCtrlAltDel"}
    assert _bodies(backend.fake, "/vm")[-1] == {"state": "Resumed"}  # paused guests can't stop
    assert backend.kills == 1


def test_forced_stop_only_kills(made: tuple[Harness, SandboxInfo]) -> None:
    backend, sb = made
    sb = _started(backend, sb)
    sent = len(backend.fake.sent)
    backend.stop(sb, force=True)
    assert backend.fake.sent[sent:] == [] and backend.kills == 1


def test_calls_before_start_are_refused(made: tuple[Harness, SandboxInfo]) -> None:
    backend, sb = made
    with pytest.raises(BackendError, match="has not been started"):
        backend.pause(sb)


# ---------------------------------------------------------------------- snapshots


def _mark(path: Path, text: bytes) -> None:
    with path.open("r+b") as f:
        f.seek(-len(text), os.SEEK_END)
        f.write(text)


def _marked(path: Path, text: bytes) -> bool:
    with path.open("rb") as f:
        f.seek(-len(text), os.SEEK_END)
        return f.read() == text


def test_snapshot_restore_and_fork(made: tuple[Harness, SandboxInfo],
                                   art: artifacts.VmArtifacts) -> None:
    backend, sb = made
    sb = _started(backend, sb)
    fake, d = backend.fake, aiva_home() / "vms" / sb.id
    _mark(d / "data.ext4", b"BEFORE")
    sent = len(fake.sent)
    snap = backend.snapshot(sb, "s1")
    assert snap["memory"] is True
    assert fake.requests(sent) == [("PATCH", "/vm"), ("PUT", "/snapshot/create"),
                                   ("PATCH", "/vm")]
    s1 = d / "snapshots" / "s1"
    assert fake.sent[sent].body == {"state": "Paused"}
    assert fake.sent[sent + 1].body == {"snapshot_path": str(s1 / "vm.state"),
                                        "mem_file_path": str(s1 / "vm.mem"),
                                        "snapshot_type": "Full"}
    assert fake.sent[sent + 2].body == {"state": "Resumed"}
    assert _marked(s1 / "data.ext4", b"BEFORE")
    assert (s1 / "data.ext4").stat().st_blocks * 512 < 16 * MIB, "the copy is not sparse"

    # in place: a new VMM loads the snapshot over the disk as it was
    _mark(d / "data.ext4", b"AFTER!")
    sent = len(fake.sent)
    runtime = backend.restore(sb, "s1", snap)
    assert backend.kills == 1 and runtime["pending_snapshot"] is None
    assert _marked(d / "data.ext4", b"BEFORE")
    assert fake.requests(sent) == [("PUT", "/logger"), ("PUT", "/snapshot/load")]
    assert fake.sent[-1].body == {
        "snapshot_path": str(s1 / "vm.state"), "resume_vm": True,
        "mem_backend": {"backend_type": "File", "backend_path": str(s1 / "vm.mem")}}

    # a second snapshot under the same tag writes new files, never into loaded memory
    old_mem = (s1 / "vm.mem").stat().st_ino
    backend.snapshot(sb, "s1")
    assert (s1 / "vm.mem").stat().st_ino != old_mem

    # a fork: its own disk copy, links to the state files, loaded on its first start
    fork = _info("fc-fork")
    rt = backend.create_from_snapshot(fork, sb, "s1", snap)
    try:
        fd = aiva_home() / "vms" / fork.id
        assert rt["pending_snapshot"] == "s1" and rt["data_disk"] == str(fd / "data.ext4")
        assert _marked(fd / "data.ext4", b"BEFORE")
        assert (fd / "snapshots/s1/vm.mem").stat().st_ino == (s1 / "vm.mem").stat().st_ino
        sent = len(fake.sent)
        backend.start(fork.model_copy(update={"runtime": rt}))
        assert fake.requests(sent) == [("PUT", "/logger"), ("PUT", "/snapshot/load")]
        assert fake.sent[-1].body["snapshot_path"] == str(fd / "snapshots/s1/vm.state")
    finally:
        backend.delete(fork, volumes=True)


def test_snapshot_of_a_stopped_vm_is_the_disk(made: tuple[Harness, SandboxInfo]) -> None:
    backend, sb = made
    d = aiva_home() / "vms" / sb.id
    _mark(d / "data.ext4", b"DISK")
    assert backend.snapshot(sb, "cold") == {"memory": False}
    _mark(d / "data.ext4", b"NEW!")
    assert backend.restore(sb, "cold", {"memory": False}) == {"pending_snapshot": None}
    assert _marked(d / "data.ext4", b"DISK") and backend.fake.sent == []
    fork = _info("fc-cold")
    rt = backend.create_from_snapshot(fork, sb, "cold", {"memory": False})
    try:
        assert rt["pending_snapshot"] is None and _marked(Path(rt["data_disk"]), b"DISK")
    finally:
        backend.delete(fork, volumes=True)


def test_delete_keeps_the_data_disk_and_snapshots(made: tuple[Harness, SandboxInfo]) -> None:
    backend, sb = made
    sb = _started(backend, sb)
    backend.snapshot(sb, "keep")
    backend.delete(sb)
    d = aiva_home() / "vms" / sb.id
    assert sorted(p.name for p in d.iterdir()) == ["data.ext4", "snapshots"]
    backend.delete_snapshots(sb, [{"tag": "keep"}])
    assert list((d / "snapshots").iterdir()) == []


# ---------------------------------------------------------------------- vmlinux

ELF = (b"\x7fELF\x02\x01\x01" + bytes(11) + struct.pack("<H", 62) + bytes(42)
       + b"kernel text " * 200)


def _lz4_literals(data: bytes) -> bytes:
    """One LZ4 sequence of literals only (a valid last sequence)."""
    n = len(data)
    if n < 15:
        return bytes([n << 4]) + data
    rest, ext = n - 15, b""
    while rest >= 255:
        ext, rest = ext + b"\xff", rest - 255
    return b"\xf0" + ext + bytes([rest]) + data


def _lz4_frame(*blocks: bytes) -> bytes:
    return b"\x02\x21\x4c\x18" + b"".join(struct.pack("<I", len(b)) + b for b in blocks)


def _bzimage(kind: str, elf: bytes = ELF, payload: bytes = b"") -> bytes:
    size = struct.pack("<I", len(elf))  # the kernel build appends it (gzip has it already)
    payload = payload or {
        "gzip": lambda: gzip.compress(elf, mtime=0),
        "xz": lambda: lzma.compress(elf, lzma.FORMAT_XZ, check=lzma.CHECK_CRC32) + size,
        "lzma": lambda: lzma.compress(elf, lzma.FORMAT_ALONE) + size,
        "bzip2": lambda: bz2.compress(elf) + size,
        "lz4": lambda: _lz4_frame(_lz4_literals(elf)) + size,
    }[kind]()
    image = bytearray(1024)  # boot sector and one setup sector
    image[0x1F1] = 1
    image[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", image, 0x206, 0x20F)
    struct.pack_into("<II", image, 0x248, 64, len(payload))
    return bytes(image) + b"\x90" * 64 + payload + b"trailing"


@pytest.mark.parametrize("kind", ["gzip", "xz", "lzma", "bzip2", "lz4"])
def test_extract_vmlinux(kind: str) -> None:
    assert vmlinux.extract_vmlinux(_bzimage(kind)) == ELF


def test_lz4_matches_overlap_and_extend() -> None:
    block = (bytes([0x3F]) + b"abc" + b"\x03\x00" + bytes([40 - 4 - 15])  # 40 from 3 back
             + bytes([0x20]) + b"xy" + b"\x0a\x00"  # 4 bytes from 10 back
             + _lz4_literals(b"END"))
    want = (b"abc" * 15)[:43] + b"xy" + (b"abc" * 15)[35:39] + b"END"
    assert vmlinux.lz4_legacy(_lz4_frame(block)) == want
    assert vmlinux.lz4_legacy(_lz4_frame(_lz4_literals(b"A" * 300), _lz4_literals(b"B"))) == \
        b"A" * 300 + b"B"


def test_extract_vmlinux_refuses_bad_kernels() -> None:
    with pytest.raises(BackendError, match="neither an ELF"):
        vmlinux.extract_vmlinux(b"MZ" + bytes(2000))
    not_elf = _bzimage("gzip", b"\x7fELF\x02\x01\x01" + bytes(11) + struct.pack("<H", 183))
    with pytest.raises(BackendError, match="not an x86-64 ELF"):
        vmlinux.extract_vmlinux(not_elf)
    back_too_far = _lz4_frame(bytes([0x10]) + b"a" + b"\x05\x00" + _lz4_literals(b"b"))
    with pytest.raises(BackendError, match="lz4 payload is corrupt"):
        vmlinux.extract_vmlinux(_bzimage("lz4", payload=back_too_far + bytes(4)))
    odd = bytearray(_bzimage("gzip"))
    odd[1024 + 64:1024 + 67] = b"\x89LZ"  # lzo: no decoder here
    with pytest.raises(BackendUnavailable, match="cannot decompress"):
        vmlinux.extract_vmlinux(bytes(odd))


def test_ensure_vmlinux_caches_beside_the_kernel(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinuz-6.1.0-test"
    kernel.write_bytes(_bzimage("xz"))
    out = vmlinux.ensure_vmlinux(kernel)
    assert out == tmp_path / "vmlinuz-6.1.0-test.vmlinux" and out.read_bytes() == ELF
    kernel.write_bytes(b"changed")  # cached: not read again
    assert vmlinux.ensure_vmlinux(kernel) == out
    elf = tmp_path / "vmlinux"
    elf.write_bytes(ELF)
    assert vmlinux.ensure_vmlinux(elf) == elf


def _cached_kernel() -> Path | None:
    marker = aiva_home() / "cache" / "vm" / "kernel" / "current"
    if not marker.is_file():
        return None
    version = marker.read_text().strip()
    kernel = marker.parent / version / f"vmlinuz-{version}"
    return kernel if kernel.is_file() else None


@pytest.mark.skipif(_cached_kernel() is None, reason="no Debian kernel in the VM cache "
                    "(scripts/setup.sh or a QEMU sandbox fetches it)")
def test_real_debian_kernel_extracts_to_what_firecracker_loads() -> None:
    """What Firecracker's ELF loader (linux-loader) checks: 64-bit little-endian x86-64,
    program headers of the right size, every PT_LOAD at or above 1 MiB."""
    kernel = _cached_kernel()
    assert kernel is not None
    elf = vmlinux.extract_vmlinux(kernel.read_bytes())
    assert elf[:6] == b"\x7fELF\x02\x01" and struct.unpack_from("<H", elf, 18)[0] == 62
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    assert phentsize == 56 and phnum > 0
    loads = [struct.unpack_from("<IIQQQ", elf, phoff + i * phentsize) for i in range(phnum)]
    paddrs = [ph[4] for ph in loads if ph[0] == 1]
    assert paddrs and min(paddrs) >= 0x100000
    assert f"Linux version {kernel.name.removeprefix('vmlinuz-')} ".encode() in elf


# ---------------------------------------------------------------------- supervisor

FAKE_VMM = textwrap.dedent("""
    import os, socket, sys
    agent_dir, refusals = sys.argv[1], int(sys.argv[2])
    print("booting\\r\\nAIVA-AGENT-START\\r", flush=True)  # the serial console is stdout
    s = socket.socket(socket.AF_UNIX)
    s.bind("v.sock")  # relative: the VMM runs in the VM dir
    s.listen(1)
    seen = []
    while True:
        c, _ = s.accept()
        seen.append(c.makefile("rb").readline().decode().strip())
        if len(seen) > refusals:
            break
        c.close()  # what Firecracker does while the guest does not listen yet
    open("handshakes.json", "w").write(repr(seen))
    c.sendall(b"OK 1073741824\\n")
    os.dup2(c.fileno(), 0)
    os.dup2(c.fileno(), 1)
    os.execv(sys.executable, [sys.executable, "-B", agent_dir, "--stdio"])
""")


@pytest.fixture
def vm_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="aiva-fc"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _supervise(d: Path, argv: list[str], timeout: float = 30) -> subprocess.Popen[bytes]:
    (d / "launch.json").write_text(json.dumps({
        "argv": argv, "console": "stdout", "agent_upstream": "v.sock",
        "agent_handshake": "CONNECT 1024\n", "agent_listen": str(d / "agent.sock"),
        "connect_timeout": timeout}))
    return subprocess.Popen([sys.executable, "-m", "aiva.vm.supervisor", str(d)], cwd=d)


def test_supervisor_vsock_handshake_and_stdout_console(vm_dir: Path) -> None:
    script = vm_dir / "fake_vmm.py"
    script.write_text(FAKE_VMM)
    agent_dir = str(Path(aiva.agent.__file__).parent)
    sup = _supervise(vm_dir, [sys.executable, str(script), agent_dir, "2"])
    try:
        client = AgentClient(connect_unix(str(vm_dir / "agent.sock"), timeout=20))
        assert client.ping()["version"]
        client.call("sys.shutdown")
        client.close()
        assert sup.wait(20) == 0
    finally:
        if sup.poll() is None:
            sup.kill()
            sup.wait()
    assert (vm_dir / "handshakes.json").read_text() == repr(["CONNECT 1024"] * 3)
    lines = [json.loads(x)["d"] for x in (vm_dir / "console.jsonl").read_text().splitlines()]
    assert lines == ["booting", "AIVA-AGENT-START"]
    assert json.loads((vm_dir / "exit.json").read_text())["code"] == 0


def test_supervisor_gives_up_when_the_vmm_dies(vm_dir: Path) -> None:
    started = time.monotonic()
    sup = _supervise(vm_dir, [sys.executable, "-c", "print('bad config'); raise SystemExit(3)"],
                     timeout=120)
    try:
        assert sup.wait(20) == 1
    finally:
        if sup.poll() is None:
            sup.kill()
    assert time.monotonic() - started < 20, "it waited for connect_timeout"
    info = json.loads((vm_dir / "exit.json").read_text())
    assert info["code"] == 3 and "cannot reach" in info["reason"]


# ---------------------------------------------------------------------- the agent on vsock


def _vsock_or_skip() -> None:
    if not hasattr(socket, "AF_VSOCK"):
        pytest.skip("this Python has no socket.AF_VSOCK")
    try:
        socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM).close()
    except OSError as exc:
        pytest.skip(f"the kernel has no AF_VSOCK ({exc.strerror}): load the vsock module")


def _agent_on_vsock(port: int) -> subprocess.Popen[bytes]:
    agent_dir = str(Path(aiva.agent.__file__).parent)
    return subprocess.Popen([sys.executable, "-B", agent_dir, "--vsock", str(port)],
                            stdin=subprocess.DEVNULL)


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((socket.VMADDR_CID_ANY, port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


def _until(check: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_agent_listens_on_vsock() -> None:
    """Binding the agent's port again fails: it listens there (no peer needed)."""
    _vsock_or_skip()
    port = 20000 + os.getpid() % 20000
    agent = _agent_on_vsock(port)
    try:
        assert _until(lambda: _port_in_use(port) or agent.poll() is not None, 10)
        assert agent.poll() is None, "the agent exited"
    finally:
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(10) == 0
    assert _until(lambda: not _port_in_use(port), 5)


def test_agent_serves_vsock_clients_like_unix_ones() -> None:
    _vsock_or_skip()
    if not Path("/sys/module/vsock_loopback").exists():
        pytest.skip("no vsock loopback here: the vsock_loopback module is not loaded "
                    "(`modprobe vsock_loopback`; this kernel has no modules to load)")
    port = 40000 + os.getpid() % 20000
    agent = _agent_on_vsock(port)
    try:
        assert _until(lambda: _port_in_use(port), 10)
        clients = []
        for _ in range(2):  # several at once, each with its own stream
            sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
            sock.settimeout(10)
            sock.connect((1, port))  # VMADDR_CID_LOCAL
            clients.append(AgentClient(SocketTransport(sock)))
        r = clients[0].exec(["sh", "-c", "echo over vsock"])
        assert getattr(r, "stdout", None) == "over vsock\n"
        assert clients[1].ping()["version"]
        for c in clients:
            c.close()
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(10)


# ---------------------------------------------------------------------- a real VM

FIRECRACKER = shutil.which("firecracker")
KVM_OK, KVM_WHY = fcvm.kvm_usable()
NO_REAL = ("no firecracker binary on PATH" if FIRECRACKER is None
           else f"KVM is not usable: {KVM_WHY}" if not KVM_OK else "")


SLEEPERS = ["python3", "-c", (  # the argument of each `sleep` in the guest
    "import glob\n"
    "for p in glob.glob('/proc/[0-9]*/cmdline'):\n"
    "    try: cmd = open(p, 'rb').read().split(b'\\0')\n"
    "    except OSError: continue\n"
    "    if cmd[0] == b'sleep': print(cmd[1].decode())\n")]


@pytest.mark.vm
@pytest.mark.slow
@pytest.mark.skipif(bool(NO_REAL), reason=NO_REAL or "runs")
def test_real_firecracker_sandbox() -> None:
    from aiva.sdk import Sandbox

    sb = Sandbox.create(backend="firecracker", template="minimal", cpus=1, memory="512MB",
                        disk="1GB")
    try:
        assert sb.status().state == State.RUNNING
        r = sb.commands.run("echo $((6*7)); cat /proc/cmdline")
        assert r.exit_code == 0 and r.stdout.startswith("42\n") and "aiva.agent=vsock" in r.stdout
        sb.files.write("/workspace/keep.txt", "kept")
        sb.pause()
        assert sb.status().state == State.PAUSED
        sb.resume()
        sleeper = sb.commands.run("sleep 1000", background=True)
        assert sb.snapshot("s1")["memory"] is True
        sb.files.write("/workspace/keep.txt", "changed")
        sb.commands.kill(sleeper.pid)
        sb.restore("s1")
        assert sb.files.read("/workspace/keep.txt") == "kept"
        assert "1000" in sb.commands.run(SLEEPERS).stdout, "the snapshot's process is gone"
        fork = Sandbox.from_snapshot(sb.name, "s1")
        try:
            assert fork.files.read("/workspace/keep.txt") == "kept"
        finally:
            fork.destroy()
        sb.stop()
        assert sb.status().state == State.STOPPED
        sb.start()
        assert sb.files.read("/workspace/keep.txt") == "kept"
        assert any("AIVA-AGENT-START" in line.text for line in sb.logs())
    finally:
        sb.destroy()
