"""The VM artifact pipeline end to end: build kernel, initramfs and system image for the
``minimal`` template, boot them in raw QEMU (TCG) and talk to the agent.

Two boots share one data disk, to prove that /workspace survives a clean shutdown.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from aiva.agent_client import AgentClient, ExecResult, connect_unix
from aiva.vm.artifacts import VmArtifacts, ensure_vm_artifacts
from aiva.vm.disks import create_data_disk
from aiva.vm.kernel import tcg_kernel_args

pytestmark = pytest.mark.vm

QEMU = "qemu-system-x86_64"
BOOT_TIMEOUT = 120.0  # TCG on a busy 2-core machine; a hang still ends here
EXIT_TIMEOUT = 60.0


def _need(ok: bool, reason: str) -> None:
    if not ok:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the VM tests: {reason}")
        pytest.skip(reason)


@pytest.fixture(scope="module")
def artifacts() -> VmArtifacts:
    _need(shutil.which(QEMU) is not None, f"{QEMU} is not installed (apt-get install "
          "qemu-system-x86 qemu-utils)")
    _need(os.geteuid() == 0, "building the VM system image needs root")
    return ensure_vm_artifacts("minimal", progress=print)


@pytest.fixture
def vm_dir() -> Iterator[Path]:
    """Short, because QEMU's Unix socket path must fit in 108 bytes."""
    d = Path(tempfile.mkdtemp(prefix="aiva-vm"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@contextmanager
def boot(art: VmArtifacts, data: Path, d: Path) -> Iterator[tuple[subprocess.Popen[bytes],
                                                                   AgentClient, float]]:
    """Start QEMU and connect to the agent; QEMU is killed by its PID whatever happens."""
    sock, console = d / "agent.sock", d / "console.log"
    sock.unlink(missing_ok=True)
    cmdline = " ".join(["console=ttyS0 quiet panic=-1 aiva.root=/dev/vda aiva.data=/dev/vdb",
                        "aiva.hostname=vmtest", *tcg_kernel_args()])
    argv = [
        QEMU, "-M", "microvm", "-accel", "tcg", "-m", "512", "-smp", "1",
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-kernel", str(art.kernel), "-initrd", str(art.initramfs), "-append", cmdline,
        "-drive", f"id=root,file={art.rootfs},format=raw,if=none,readonly=on",
        "-device", "virtio-blk-device,drive=root",
        "-drive", f"id=data,file={data},format=qcow2,if=none",
        "-device", "virtio-blk-device,drive=data",
        "-device", "virtio-serial-device",
        "-chardev", f"socket,id=agent,path={sock},server=on,wait=off",
        "-device", "virtserialport,chardev=agent,name=aiva.agent",
        "-serial", f"file:{console}",
    ]
    with open(d / "qemu.log", "wb") as log:
        started = time.monotonic()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    client: AgentClient | None = None
    try:
        client = AgentClient(connect_unix(str(sock), timeout=30,
                                          alive=lambda: proc.poll() is None))
        yield proc, client, started
    finally:
        if client is not None:
            client.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        print(f"console:\n{console.read_text(errors='replace') if console.exists() else ''}")


def _wait_exit(proc: subprocess.Popen[bytes]) -> int:
    """The VM powers itself off once the agent's host side goes away."""
    try:
        return proc.wait(timeout=EXIT_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the VM did not power off within {EXIT_TIMEOUT}s of the agent exiting")


def _journal_clean(data: Path, d: Path) -> bool:
    raw = d / "data.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(data), str(raw)], check=True)
    out = subprocess.run(["dumpe2fs", "-h", str(raw)], capture_output=True, text=True,
                         check=True).stdout
    raw.unlink()
    return "needs_recovery" not in out and "clean" in out


def test_artifacts_are_cached(artifacts: VmArtifacts) -> None:
    again = ensure_vm_artifacts("minimal")
    assert again == artifacts
    assert artifacts.rootfs.suffix == ".ext4" and artifacts.modules_version in str(
        artifacts.kernel)


@pytest.mark.timeout(600)
def test_boot_exec_and_persist(artifacts: VmArtifacts, vm_dir: Path) -> None:
    data = create_data_disk(vm_dir / "data.qcow2", 1 << 30)

    with boot(artifacts, data, vm_dir) as (proc, client, started):
        assert client.ping(timeout=BOOT_TIMEOUT)["version"]
        res = client.exec(["python3", "-c", "print(1+1)"], timeout=60)
        print(f"boot -> first exec: {time.monotonic() - started:.2f} s wall (TCG)")
        assert isinstance(res, ExecResult)
        assert (res.exit_code, res.stdout) == (0, "2\n")
        res = client.exec(["sh", "-c", "hostname; stat -f -c %T / /.aiva /.aiva/agent"])
        assert isinstance(res, ExecResult)
        assert res.stdout.split() == ["vmtest", "overlayfs", "tmpfs", "tmpfs"]
        client.write_file("/workspace/hello.txt", "kept across boots\n")
        client.close()  # the agent sees EOF and exits; /init shuts the VM down
        assert _wait_exit(proc) == 0
    console = (vm_dir / "console.log").read_text(errors="replace")
    assert "AIVA-AGENT-START" in console and "AIVA-INIT-ERROR" not in console
    assert _journal_clean(data, vm_dir), "the data disk was not unmounted cleanly"

    with boot(artifacts, data, vm_dir) as (proc, client, _):
        assert client.read_file("/workspace/hello.txt", timeout=BOOT_TIMEOUT) == \
            b"kept across boots\n"
        client.close()
        assert _wait_exit(proc) == 0
