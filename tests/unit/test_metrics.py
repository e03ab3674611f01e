"""Sandbox metrics: Docker stats payloads in both cgroup shapes, guest CPU from the real
agent, and the QEMU host view against real processes (a busy loop, a real QEMU's QMP).

Nothing sleeps for luck: the only sleeps are CPU sample windows.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import aiva.agent
from aiva.agent_client import AgentClient, ProcessTransport
from aiva.errors import BackendError
from aiva.observe import metrics
from aiva.observe.metrics import (
    SandboxMetrics,
    docker_from_stats,
    guest_cpu_percent,
    merge,
    qemu_host_metrics,
)

pytestmark = pytest.mark.timeout(60)
MiB = 1 << 20

# --------------------------------------------------------------------------- payloads

# cgroup v1, as recorded from Docker 20.10 (`container.stats(stream=False)`), with the
# blkio entries Docker documents for v1: per device, capitalised ops, plus Sync/Total.
V1_STATS: dict[str, Any] = {
    "read": "2026-11-23T16:03:51.693639735Z",
    "preread": "2026-11-23T16:03:50.680266446Z",
    "pids_stats": {"current": 1},
    "blkio_stats": {"io_service_bytes_recursive": [
        {"major": 8, "minor": 0, "op": "Read", "value": 1048576},
        {"major": 8, "minor": 0, "op": "Write", "value": 20971520},
        {"major": 8, "minor": 0, "op": "Sync", "value": 20971520},
        {"major": 8, "minor": 0, "op": "Async", "value": 1048576},
        {"major": 8, "minor": 0, "op": "Total", "value": 22020096},
        {"major": 8, "minor": 16, "op": "Read", "value": 4096},
        {"major": 8, "minor": 16, "op": "Write", "value": 8192},
        {"major": 8, "minor": 16, "op": "Total", "value": 12288},
    ], "io_serviced_recursive": [], "io_queue_recursive": [], "sectors_recursive": []},
    "num_procs": 0,
    "storage_stats": {},
    "cpu_stats": {
        "cpu_usage": {"total_usage": 2793231053, "percpu_usage": [287848918, 2505382135],
                      "usage_in_kernelmode": 20000000, "usage_in_usermode": 2760000000},
        "system_cpu_usage": 7309400000000, "online_cpus": 2,
        "throttling_data": {"periods": 38, "throttled_periods": 0, "throttled_time": 0},
    },
    "precpu_stats": {
        "cpu_usage": {"total_usage": 2116721837, "percpu_usage": [203000617, 1913721220],
                      "usage_in_kernelmode": 10000000, "usage_in_usermode": 2100000000},
        "system_cpu_usage": 7307390000000, "online_cpus": 2,
        "throttling_data": {"periods": 28, "throttled_periods": 0, "throttled_time": 0},
    },
    "memory_stats": {
        "usage": 552960, "max_usage": 3813376, "limit": 536870912,
        "stats": {"active_anon": 4096, "active_file": 28672, "cache": 114688, "dirty": 0,
                  "hierarchical_memory_limit": 536870912, "inactive_anon": 110592,
                  "inactive_file": 86016, "mapped_file": 0, "rss": 114688,
                  "total_active_file": 28672, "total_cache": 114688,
                  "total_inactive_anon": 110592, "total_inactive_file": 86016,
                  "total_rss": 114688, "unevictable": 0, "writeback": 0},
    },
    "name": "/aiva-box-1",
    "id": "4859aa5610a275c4dccd68ed5f8d157a472370955298c48413c20b4405fe6218",
    "networks": {"eth0": {"rx_bytes": 516, "rx_packets": 6, "rx_errors": 0, "rx_dropped": 0,
                          "tx_bytes": 0, "tx_packets": 0, "tx_errors": 0, "tx_dropped": 0}},
}

# cgroup v2, in the shape of Docker's API reference (ContainerStatsResponse): no
# percpu_usage, no max_usage, memory.stat keys (anon, file, inactive_file, ...), blkio
# ops in lower case, and two interfaces.
V2_STATS: dict[str, Any] = {
    "read": "2026-11-23T10:00:11.500000000Z",
    "preread": "2026-11-23T10:00:10.500000000Z",
    "pids_stats": {"current": 3, "limit": 512},
    "blkio_stats": {"io_service_bytes_recursive": [
        {"major": 254, "minor": 0, "op": "read", "value": 7593984},
        {"major": 254, "minor": 0, "op": "write", "value": 25165824},
    ], "io_serviced_recursive": None, "io_queue_recursive": None,
        "io_service_time_recursive": None, "io_wait_time_recursive": None,
        "io_merged_recursive": None, "io_time_recursive": None, "sectors_recursive": None},
    "num_procs": 0,
    "storage_stats": {},
    "cpu_stats": {
        "cpu_usage": {"total_usage": 5_400_000_000, "usage_in_kernelmode": 400_000_000,
                      "usage_in_usermode": 5_000_000_000},
        "system_cpu_usage": 104_000_000_000, "online_cpus": 4,
        "throttling_data": {"periods": 100, "throttled_periods": 40, "throttled_time": 9},
    },
    "precpu_stats": {
        "cpu_usage": {"total_usage": 4_000_000_000, "usage_in_kernelmode": 300_000_000,
                      "usage_in_usermode": 3_700_000_000},
        "system_cpu_usage": 100_000_000_000, "online_cpus": 4,
        "throttling_data": {"periods": 90, "throttled_periods": 35, "throttled_time": 8},
    },
    "memory_stats": {
        "usage": 104_857_600, "limit": 1_073_741_824,
        "stats": {"anon": 60_000_000, "file": 40_000_000, "kernel_stack": 65536,
                  "active_anon": 59_000_000, "inactive_anon": 1_000_000,
                  "active_file": 10_000_000, "inactive_file": 30_000_000,
                  "shmem": 0, "file_dirty": 0, "file_writeback": 0, "pgfault": 4200},
    },
    "name": "/aiva-box-2",
    "id": "b2c3",
    "networks": {"eth0": {"rx_bytes": 5338, "tx_bytes": 648, "rx_packets": 36},
                 "eth5": {"rx_bytes": 4641, "tx_bytes": 1010, "rx_packets": 26}},
}

ATTRS_V1 = {"State": {"Running": True, "Pid": 0,
                      "StartedAt": "2026-11-23T16:03:48.016079313Z"},
            "HostConfig": {"NanoCpus": 0, "CpuPeriod": 100_000, "CpuQuota": 100_000}}
ATTRS_V2 = {"State": {"Running": True, "Pid": 0,
                      "StartedAt": "2026-11-23T10:00:00.500000000Z"},
            "HostConfig": {"NanoCpus": 1_500_000_000, "CpuPeriod": 0, "CpuQuota": 0}}


def payload(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    import copy

    out = copy.deepcopy(base)
    out.update(changes)
    return out


# --------------------------------------------------------------------------- docker


def test_docker_cgroup_v1_payload() -> None:
    m = docker_from_stats(V1_STATS, ATTRS_V1)
    # (2793231053 - 2116721837) ns of 2010000000 ns summed over 2 host CPUs
    assert m.cpu_percent == pytest.approx(676509216 / 2010000000 * 2 * 100)
    assert m.cpus == 1.0  # the quota aiva sets, not the host's 2 CPUs
    assert m.memory == {"total": 536870912, "used": 552960 - 86016,
                        "available": 536870912 - (552960 - 86016), "cache": 114688}
    assert m.disk == {"read_bytes": 1048576 + 4096, "write_bytes": 20971520 + 8192}
    assert m.net == {"rx_bytes": 516, "tx_bytes": 0}
    assert m.uptime == pytest.approx(3.6776, abs=1e-3)  # read - StartedAt
    assert m.source == {"cpu": "cgroup", "memory": "cgroup", "disk": "cgroup",
                        "net": "docker", "uptime": "docker"}
    assert m.sampled_at == pytest.approx(1795449831.6936, abs=1e-3)


def test_docker_cgroup_v2_payload() -> None:
    m = docker_from_stats(V2_STATS, ATTRS_V2)
    assert m.cpu_percent == pytest.approx(1.4e9 / 4e9 * 4 * 100)  # 140: 1.4 CPUs busy
    assert m.cpus == 1.5  # `docker run --cpus 1.5` sets NanoCpus
    assert m.memory["used"] == 104_857_600 - 30_000_000
    assert m.memory["cache"] == 40_000_000  # v2 "file"
    assert m.memory["available"] == 1_073_741_824 - m.memory["used"]
    assert m.disk == {"read_bytes": 7593984, "write_bytes": 25165824}
    assert m.net == {"rx_bytes": 5338 + 4641, "tx_bytes": 648 + 1010}
    assert m.uptime == pytest.approx(11.0)


@pytest.mark.parametrize("blkio", [None, []], ids=["v2-null", "v1-empty"])
def test_docker_silent_blkio_falls_back_to_proc_or_says_none(blkio: Any) -> None:
    stats = payload(V2_STATS, blkio_stats={"io_service_bytes_recursive": blkio})
    m = docker_from_stats(stats, ATTRS_V2, proc_io=(4096, 21 * MiB))
    assert m.disk == {"read_bytes": 4096, "write_bytes": 21 * MiB}
    assert m.source["disk"] == "proc"
    m = docker_from_stats(stats, ATTRS_V2)
    assert m.disk == {"read_bytes": 0, "write_bytes": 0}
    assert m.source["disk"] == "none"


def test_docker_first_sample_has_empty_precpu() -> None:
    """One-shot stats (or a container seconds old): no previous sample, so the CPU is the
    mean since start, and says so."""
    stats = payload(V2_STATS, preread="0001-01-01T00:00:00Z", precpu_stats={
        "cpu_usage": {"total_usage": 0, "usage_in_kernelmode": 0, "usage_in_usermode": 0},
        "throttling_data": {"periods": 0, "throttled_periods": 0, "throttled_time": 0}})
    m = docker_from_stats(stats, ATTRS_V2)  # 5.4 CPU-seconds in 11 s of life
    assert m.cpu_percent == pytest.approx(5.4 / 11.0 * 100)
    assert m.source["cpu"] == "cgroup-avg"
    stats["precpu_stats"] = {}
    assert docker_from_stats(stats, ATTRS_V2).cpu_percent == pytest.approx(5.4 / 11.0 * 100)


def test_docker_stopped_container_without_network() -> None:
    stats = payload(V1_STATS, networks=None, memory_stats={})
    attrs = {"State": {"Running": False, "StartedAt": "0001-01-01T00:00:00Z"}}
    m = docker_from_stats(stats, attrs)
    assert m.net == {"rx_bytes": 0, "tx_bytes": 0} and m.source["net"] == "none"
    assert m.uptime == 0.0 and m.source["uptime"] == "none"
    assert m.memory["used"] == 0 and m.source["memory"] == "none"
    assert m.cpus == 2.0  # online_cpus when there is no limit


def test_container_io_refuses_a_pid_of_another_container() -> None:
    """A remote or stale pid must not be read as the container's I/O."""
    assert metrics._container_io(os.getpid(), "0" * 64) is None
    assert metrics._container_io(2**22 + 7, "0" * 64) is None  # no such process


def test_to_dict_is_plain_data() -> None:
    import json

    d = SandboxMetrics(cpu_percent=12.345, uptime=1.23456, source={"cpu": "proc"}).to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["cpu_percent"] == 12.3 and d["uptime"] == 1.23
    assert set(d["memory"]) == {"total", "used", "available", "cache"}


# --------------------------------------------------------------------------- guest


def sample(jiffies: list[int], uptime: float) -> dict[str, Any]:
    return {"cpu_jiffies": jiffies, "uptime": uptime}


def test_guest_cpu_percent_from_jiffies() -> None:
    #        user nice sys idle iowait irq softirq steal guest guest_nice
    a = sample([1000, 0, 500, 8000, 100, 0, 0, 0, 300, 0], 100.0)
    b = sample([1150, 0, 550, 8150, 150, 0, 0, 0, 400, 0], 102.0)
    # 400 jiffies in 2 s (2 CPUs), 200 of them idle or iowait; guest time is inside user
    assert guest_cpu_percent(a, b, cpus=2) == pytest.approx(100.0)
    assert guest_cpu_percent(a, b) == pytest.approx(100.0)
    assert guest_cpu_percent(a, a) == 0.0


def test_guest_cpu_count_is_inferred_from_uptime() -> None:
    a = sample([0, 0, 0, 0, 0, 0, 0, 0], 10.0)
    b = sample([40, 0, 10, 350, 0, 0, 0, 0], 11.0)  # 400 jiffies in 1 s: 4 CPUs
    assert guest_cpu_percent(a, b) == pytest.approx(50 / 400 * 400)
    assert guest_cpu_percent(a, b, cpus=1) == pytest.approx(50 / 400 * 100)


def test_merge_takes_memory_and_uptime_from_the_guest() -> None:
    host = SandboxMetrics(cpu_percent=150.0, cpus=2, uptime=30.0,
                          memory={"total": 512 * MiB, "used": 300 * MiB,
                                  "available": 212 * MiB, "cache": 0},
                          disk={"read_bytes": 1, "write_bytes": 2},
                          net={"rx_bytes": 3, "tx_bytes": 4},
                          source={"cpu": "proc", "memory": "proc", "disk": "qmp",
                                  "net": "sysfs", "uptime": "proc"})
    guest = {"memory": {"total": 480 * MiB, "available": 400 * MiB, "used": 80 * MiB,
                        "cache": 50 * MiB}, "cpu_jiffies": [1, 2, 3, 4], "uptime": 28.5,
             "loadavg": [0.5, 0.2, 0.1]}
    m = merge(host, guest)
    assert m.memory == {"total": 480 * MiB, "used": 80 * MiB, "available": 400 * MiB,
                        "cache": 50 * MiB}
    assert m.uptime == 28.5
    assert (m.cpu_percent, m.disk, m.net) == (150.0, host.disk, host.net)
    assert m.source == {"cpu": "proc", "memory": "guest", "disk": "qmp", "net": "sysfs",
                        "uptime": "guest"}
    assert host.source["memory"] == "proc" and host.memory["used"] == 300 * MiB  # untouched
    # an agent that could not read /proc leaves the host's figures
    assert merge(host, {"error": "no /proc"}) == host


# --------------------------------------------------------------------------- real processes


@pytest.fixture
def busy() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    yield proc
    proc.kill()
    proc.wait()


def test_qemu_host_metrics_of_a_busy_process(busy: subprocess.Popen[bytes]) -> None:
    """The host view works on any process: a busy loop stands in for QEMU."""
    m = qemu_host_metrics(busy.pid, None, interval=0.3)
    assert m.cpu_percent > 20
    assert m.cpu_percent < 100 * (os.cpu_count() or 1) + 10
    rss = int(next(line.split()[1] for line in
                   Path(f"/proc/{busy.pid}/status").read_text().splitlines()
                   if line.startswith("VmRSS:"))) * 1024
    assert m.memory["used"] > 0 and abs(m.memory["used"] - rss) < 8 * MiB
    assert 0 < m.uptime < 30
    assert m.disk == {"read_bytes": 0, "write_bytes": 0}
    assert m.source == {"cpu": "proc", "memory": "proc", "uptime": "proc", "disk": "none",
                        "net": "none"}


def test_qemu_host_metrics_of_an_idle_process() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                            stdin=subprocess.PIPE)
    try:
        assert qemu_host_metrics(proc.pid, None, interval=0.3).cpu_percent < 20
    finally:
        proc.kill()
        proc.wait()


def test_qemu_host_metrics_of_a_gone_process() -> None:
    proc = subprocess.Popen(["true"])
    proc.wait()
    with pytest.raises(BackendError, match="gone"):
        qemu_host_metrics(proc.pid, None)


def test_tap_counters_are_turned_to_the_guest_view(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, busy: subprocess.Popen[bytes]) -> None:
    """What the host's TAP transmits, the guest receives."""
    stats = tmp_path / "aiva-tap0" / "statistics"
    stats.mkdir(parents=True)
    (stats / "rx_bytes").write_text("7000\n")  # host received = the guest sent
    (stats / "tx_bytes").write_text("123456\n")
    monkeypatch.setattr(metrics, "SYS_NET", tmp_path)
    m = qemu_host_metrics(busy.pid, None, tap="aiva-tap0", interval=0.05)
    assert m.net == {"rx_bytes": 123456, "tx_bytes": 7000} and m.source["net"] == "sysfs"
    m = qemu_host_metrics(busy.pid, None, tap="aiva-gone0", interval=0.05)
    assert m.net == {"rx_bytes": 0, "tx_bytes": 0} and m.source["net"] == "none"


def test_qmp_that_never_greets_gives_up_in_time(monkeypatch: pytest.MonkeyPatch,
                                                busy: subprocess.Popen[bytes]) -> None:
    """A QEMU whose monitor is busy or wedged must not hang `aiva status`."""
    monkeypatch.setattr(metrics, "QMP_TIMEOUT", 0.3)
    d = tempfile.mkdtemp(prefix="aq")
    srv = socket.socket(socket.AF_UNIX)
    try:
        srv.bind(f"{d}/qmp.sock")
        srv.listen(1)  # never accepts, never greets
        t0 = time.monotonic()
        m = qemu_host_metrics(busy.pid, f"{d}/qmp.sock", interval=0.1)
        assert time.monotonic() - t0 < 2.0
        assert m.source["disk"] == "none" and m.cpu_percent > 0
    finally:
        srv.close()
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def qemu_none() -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A real QEMU with no machine (nothing boots) but a disk and a QMP monitor."""
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    d = tempfile.mkdtemp(prefix="aq")  # short: a socket path must fit in 108 bytes
    Path(d, "disk.img").write_bytes(b"\0" * MiB)
    sock = f"{d}/qmp.sock"
    proc = subprocess.Popen(
        ["qemu-system-x86_64", "-M", "none", "-nodefaults", "-display", "none", "-m", "64",
         "-qmp", f"unix:{sock},server=on,wait=off",
         "-drive", f"file={d}/disk.img,if=none,id=d0,format=raw"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while not os.path.exists(sock):
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
        assert time.monotonic() < deadline, "QEMU did not open its QMP socket"
        time.sleep(0.01)
    yield proc, sock
    proc.kill()
    proc.wait()
    if proc.stderr:
        proc.stderr.close()
    shutil.rmtree(d, ignore_errors=True)


def test_qemu_host_metrics_over_real_qmp(qemu_none: tuple[subprocess.Popen[bytes], str]) -> None:
    proc, sock = qemu_none
    # the default 2 s budget is for a sampler; a busy CI host may take longer to greet
    m = qemu_host_metrics(proc.pid, sock, qmp_timeout=30)
    assert m.source["disk"] == "qmp"
    assert m.disk == {"read_bytes": 0, "write_bytes": 0}  # nothing boots, nothing reads
    assert m.memory["total"] == 64 * MiB  # -m 64, from query-memory-size-summary
    assert m.memory["used"] > 0
    assert m.memory["available"] == max(0, 64 * MiB - m.memory["used"])
    assert 0 < m.uptime < 30


# --------------------------------------------------------------------------- real agent


@pytest.fixture
def agent_client(tmp_path: Path) -> Iterator[AgentClient]:
    with open(tmp_path / "agent.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, str(Path(aiva.agent.__file__).parent), "--stdio"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)
    client = AgentClient(ProcessTransport(proc), label="metrics-test")
    yield client
    client.close()
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_guest_cpu_percent_and_merge_from_a_real_agent(
        agent_client: AgentClient, busy: subprocess.Popen[bytes]) -> None:
    first = agent_client.metrics()
    time.sleep(0.5)  # the sample window
    second = agent_client.metrics()
    assert "error" not in second
    cpus = os.cpu_count() or 1
    pct = guest_cpu_percent(first, second, cpus=cpus)
    assert 20 < pct <= 100 * cpus + 1  # the busy loop alone is a whole CPU
    assert guest_cpu_percent(first, second) == pytest.approx(pct, rel=0.35)

    host = qemu_host_metrics(busy.pid, None, interval=0.1)
    m = merge(host, second)
    mem_total = int(Path("/proc/meminfo").read_text().split()[1]) * 1024  # MemTotal
    assert m.memory["total"] == mem_total and m.source["memory"] == "guest"
    assert 0 < m.memory["used"] < mem_total
    assert m.uptime == second["uptime"] and m.source["uptime"] == "guest"
    assert m.cpu_percent == host.cpu_percent and m.source["cpu"] == "proc"
