"""Resource figures for one sandbox (seed 000 §5.1), measured from the host and from inside.

A name means different things depending on who measured it, so each figure has a source:
``cgroup`` (Docker's stats; ``cgroup-avg``: CPU averaged since start, when Docker had no
previous sample), ``proc`` (host /proc: the QEMU process, or a container's processes' I/O
when its blkio cgroup is silent), ``qmp`` (QEMU's disk counters), ``sysfs`` (a TAP's
counters, turned to the guest's view), ``docker`` (interface counters, start time),
``guest`` (the agent's /proc: what the VM's kernel sees), ``none`` (nobody reports it: 0).

``cpu_percent`` is on the ``top`` scale: 100 is one CPU fully busy, up to 100 * cpus.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from aiva.errors import BackendError

MEMORY_KEYS = ("total", "used", "available", "cache")
USER_HZ = 100  # the unit of /proc/stat and /proc/<pid>/stat on Linux, whatever the kernel HZ
QMP_TIMEOUT = 2.0
SYS_NET = Path("/sys/class/net")


def _zeros(*keys: str) -> dict[str, int]:
    return dict.fromkeys(keys, 0)

@dataclass
class SandboxMetrics:
    cpu_percent: float = 0.0
    cpus: float = 0.0  # CPUs the sandbox may use; 0 when unknown
    memory: dict[str, int] = field(default_factory=lambda: _zeros(*MEMORY_KEYS))
    disk: dict[str, int] = field(default_factory=lambda: _zeros("read_bytes", "write_bytes"))
    net: dict[str, int] = field(default_factory=lambda: _zeros("rx_bytes", "tx_bytes"))
    uptime: float = 0.0
    source: dict[str, str] = field(default_factory=dict)  # cpu, memory, disk, net, uptime
    sampled_at: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["cpu_percent"] = round(self.cpu_percent, 1)
        d["uptime"] = round(self.uptime, 2)
        return d


# --------------------------------------------------------------------------- guest


def guest_cpu_percent(first: dict[str, Any], second: dict[str, Any],
                      cpus: float | None = None) -> float:
    """CPU busy between two ``sys.metrics`` answers, from the /proc/stat jiffies.

    Without ``cpus`` the CPU count is inferred from jiffies per second of uptime (good for
    a handful of CPUs; pass it when known). In a container /proc/stat is the host's.
    """
    d = [b - a for a, b in zip(first["cpu_jiffies"][:8], second["cpu_jiffies"][:8],
                               strict=False)]  # guest/guest_nice are inside user/nice
    total = sum(d)
    if total <= 0:
        return 0.0
    idle = d[3] + (d[4] if len(d) > 4 else 0)  # idle + iowait
    if cpus is None:
        dt = float(second["uptime"]) - float(first["uptime"])
        cpus = max(1, round(total / (dt * USER_HZ))) if dt > 0 else 1
    return float((total - idle) / total * 100.0 * cpus)


def merge(host: SandboxMetrics, guest: dict[str, Any]) -> SandboxMetrics:
    """The host's CPU and I/O with the guest's memory and uptime, which only the VM's
    kernel knows (a VM's RSS on the host says little about its free memory).

    Not for containers: their /proc/meminfo and /proc/uptime are the host's.
    """
    out = dataclasses.replace(host, memory=dict(host.memory), source=dict(host.source))
    mem = guest.get("memory")
    if isinstance(mem, dict) and mem.get("total"):
        out.memory = {k: int(mem.get(k, 0)) for k in MEMORY_KEYS}
        out.source["memory"] = "guest"
    if isinstance(guest.get("uptime"), int | float):
        out.uptime = float(guest["uptime"])
        out.source["uptime"] = "guest"
    return out


# --------------------------------------------------------------------------- docker


def docker_metrics(container: Any) -> SandboxMetrics:
    """One ``stats(stream=False)`` call; Docker itself waits ~1 s for its second sample."""
    stats = container.stats(stream=False)
    attrs = container.attrs
    pid = int(attrs.get("State", {}).get("Pid") or 0)
    io = _container_io(pid, container.id) if pid else None
    return docker_from_stats(stats, attrs, proc_io=io)


def docker_from_stats(stats: dict[str, Any], attrs: dict[str, Any],
                      proc_io: tuple[int, int] | None = None) -> SandboxMetrics:
    """The figures from one stats payload (cgroup v1 or v2 shape) and the inspect data."""
    read_at = _ts(stats.get("read")) or time.time()
    started = _ts(attrs.get("State", {}).get("StartedAt"))
    m = SandboxMetrics(source={}, sampled_at=read_at)

    cpu, pre = stats.get("cpu_stats") or {}, stats.get("precpu_stats") or {}
    used_ns = int((cpu.get("cpu_usage") or {}).get("total_usage", 0))
    pre_ns = int((pre.get("cpu_usage") or {}).get("total_usage", 0))
    online = cpu.get("online_cpus") or len((cpu.get("cpu_usage") or {}).get("percpu_usage")
                                           or []) or 1
    sys_delta = int(cpu.get("system_cpu_usage", 0)) - int(pre.get("system_cpu_usage", 0))
    if pre.get("system_cpu_usage") and sys_delta > 0:
        # system_cpu_usage sums all host CPUs: scale back to "100 per CPU"
        m.cpu_percent = max(0, used_ns - pre_ns) / sys_delta * online * 100.0
        m.source["cpu"] = "cgroup"
    else:  # first sample (one-shot, or just started): the mean since start
        elapsed = read_at - started if started else 0.0
        m.cpu_percent = used_ns / 1e9 / elapsed * 100.0 if elapsed > 0 else 0.0
        m.source["cpu"] = "cgroup-avg"
    hc = attrs.get("HostConfig") or {}
    quota, period, nano = hc.get("CpuQuota") or 0, hc.get("CpuPeriod") or 0, hc.get("NanoCpus")
    m.cpus = quota / period if quota > 0 and period > 0 else nano / 1e9 if nano else online

    mem = stats.get("memory_stats") or {}
    ms = mem.get("stats") or {}
    usage = int(mem.get("usage", 0))
    # as `docker stats` does: v1 total_inactive_file, v2 inactive_file is reclaimable
    inactive = int(ms.get("total_inactive_file", ms.get("inactive_file", 0)))
    used = usage - inactive if inactive < usage else usage
    total = int(mem.get("limit", 0))
    m.memory = {"total": total, "used": used, "available": max(0, total - used),
                "cache": int(ms.get("total_cache", ms.get("cache", ms.get("file", 0))))}
    m.source["memory"] = "cgroup" if mem else "none"

    entries = (stats.get("blkio_stats") or {}).get("io_service_bytes_recursive")
    if entries:  # v1 ops are "Read"/"Write", v2 "read"/"write"; one entry per device
        m.disk = {f"{op}_bytes": sum(int(e.get("value", 0)) for e in entries
                                     if str(e.get("op", "")).lower() == op)
                  for op in ("read", "write")}
        m.source["disk"] = "cgroup"
    elif proc_io is not None:
        m.disk = {"read_bytes": proc_io[0], "write_bytes": proc_io[1]}
        m.source["disk"] = "proc"
    else:
        m.source["disk"] = "none"

    nets = stats.get("networks") or {}
    m.net = {k: sum(int(n.get(k, 0)) for n in nets.values()) for k in ("rx_bytes", "tx_bytes")}
    m.source["net"] = "docker" if nets else "none"

    running = (attrs.get("State") or {}).get("Running", True)
    m.uptime = max(0.0, read_at - started) if started and running else 0.0
    m.source["uptime"] = "docker" if started else "none"
    return m


def _container_io(pid: int, container_id: str) -> tuple[int, int] | None:
    """Storage bytes of the container's processes, from /proc/<pid>/io, for hosts whose
    blkio cgroup reports nothing (cgroup v1 misses buffered writes). A reaped process
    counts in its parent, so exited commands stay counted. None unless ``pid`` is this
    container's process on this host (a remote Docker's pids mean nothing here)."""
    try:
        if container_id not in Path(f"/proc/{pid}/cgroup").read_text():
            return None
        ns = os.readlink(f"/proc/{pid}/ns/pid")
        own = ns == os.readlink("/proc/self/ns/pid")
    except OSError:
        return None
    pids = [str(pid)] if own else [p for p in os.listdir("/proc") if p.isdigit()]
    rd = wr = seen = 0
    for p in pids:
        try:
            if not own and os.readlink(f"/proc/{p}/ns/pid") != ns:
                continue
            io = _fields(Path(f"/proc/{p}/io").read_text())
        except OSError:  # gone meanwhile, or not ours to read
            continue
        rd, wr = rd + io.get("read_bytes", 0), wr + io.get("write_bytes", 0)
        seen += 1
    return (rd, wr) if seen else None


def _ts(value: Any) -> float | None:
    """Docker's RFC 3339 times (nanoseconds, ``Z``); its zero time means none."""
    try:
        dt = datetime.fromisoformat(str(value))
    except ValueError:
        return None
    return dt.timestamp() if dt.year > 1970 else None


# --------------------------------------------------------------------------- qemu


def qemu_host_metrics(qemu_pid: int, qmp_sock: str | Path | None, *, tap: str | None = None,
                      interval: float = 0.2, qmp_timeout: float | None = None
                      ) -> SandboxMetrics:
    """The VM as the host sees it: its QEMU process and QEMU's device counters.

    CPU is sampled twice ``interval`` apart within this call (no state between calls);
    the QMP query runs inside that window. ``qmp_sock=None`` skips disk stats, and so
    does a QEMU that does not answer within ``qmp_timeout`` (default ``QMP_TIMEOUT``: a
    sampler must not hang).
    """
    t0, ticks0 = time.monotonic(), _proc_stat(qemu_pid)
    qmp = _qmp_facts(qmp_sock, qmp_timeout) if qmp_sock else None
    time.sleep(max(0.0, interval - (time.monotonic() - t0)))
    t1, ticks1 = time.monotonic(), _proc_stat(qemu_pid)
    m = SandboxMetrics(source={"cpu": "proc", "memory": "proc", "uptime": "proc"})
    m.cpu_percent = (ticks1[0] - ticks0[0]) / USER_HZ / (t1 - t0) * 100.0
    try:
        status = _fields(Path(f"/proc/{qemu_pid}/status").read_text())
        host_uptime = float(Path("/proc/uptime").read_text().split()[0])
    except OSError as exc:
        raise BackendError(f"QEMU process {qemu_pid} is gone: {exc}") from exc
    m.memory["used"] = status.get("VmRSS", 0) * 1024  # what the VM costs the host
    m.uptime = max(0.0, host_uptime - ticks1[1] / USER_HZ)
    if qmp is not None:
        m.disk = {"read_bytes": qmp["rd"], "write_bytes": qmp["wr"]}
        m.cpus = float(qmp["cpus"])
        m.memory["total"] = qmp["ram"]
        m.memory["available"] = max(0, qmp["ram"] - m.memory["used"])
    m.source["disk"] = "qmp" if qmp is not None else "none"
    m.net, m.source["net"] = _tap_counters(tap) if tap else (m.net, "none")
    return m


def _proc_stat(pid: int) -> tuple[int, int]:
    """(utime + stime of all threads, start time), in USER_HZ ticks."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError as exc:
        raise BackendError(f"QEMU process {pid} is gone: {exc}") from exc
    rest = text[text.rindex(")") + 2:].split()  # the name may hold spaces; rest[0] is field 3
    return int(rest[11]) + int(rest[12]), int(rest[19])


def _fields(text: str) -> dict[str, int]:
    """``key: 123 [kB]`` lines (/proc/<pid>/status, /proc/<pid>/io)."""
    out = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[key] = int(parts[0])
    return out


def _qmp_facts(sock: str | Path, timeout: float | None = None) -> dict[str, int] | None:
    """Disk bytes, vCPUs and RAM from QEMU; None if it does not answer in time."""
    from qemu.qmp import QMPClient, QMPError

    async def ask() -> dict[str, int]:
        qmp = QMPClient("aiva-metrics")
        await qmp.connect(str(sock))
        try:
            blocks: Any = await qmp.execute("query-blockstats")
            cpus: Any = await qmp.execute("query-cpus-fast")
            mem: Any = await qmp.execute("query-memory-size-summary")
        finally:
            await qmp.disconnect()
        # top-level entries only: a "parent" is the same I/O one layer down
        return {"rd": sum(int(b["stats"]["rd_bytes"]) for b in blocks),
                "wr": sum(int(b["stats"]["wr_bytes"]) for b in blocks),
                "cpus": len(cpus), "ram": int(mem.get("base-memory", 0))}

    loop = asyncio.new_event_loop()  # its own loop: never disturbs a caller's
    try:
        return loop.run_until_complete(asyncio.wait_for(ask(), timeout or QMP_TIMEOUT))
    except (OSError, QMPError, TimeoutError, KeyError, TypeError, ValueError):
        return None
    finally:
        loop.close()


def _tap_counters(tap: str) -> tuple[dict[str, int], str]:
    """A TAP's counters as the guest sees them: what the host sends, the guest receives."""
    stats = SYS_NET / tap / "statistics"
    try:
        host_rx, host_tx = (int((stats / k).read_text()) for k in ("rx_bytes", "tx_bytes"))
    except (OSError, ValueError):
        return _zeros("rx_bytes", "tx_bytes"), "none"
    return {"rx_bytes": host_tx, "tx_bytes": host_rx}, "sysfs"
