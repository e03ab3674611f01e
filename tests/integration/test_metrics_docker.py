"""Metrics of a real Docker sandbox: a busy loop, a 20 MB write and some UDP traffic must
show in what `docker_metrics` reports. Two stats calls (Docker samples for ~1 s each)."""

from __future__ import annotations

import os
from typing import Any

import pytest

from aiva.observe.metrics import docker_metrics

pytestmark = [pytest.mark.docker, pytest.mark.timeout(120)]
MiB = 1 << 20

# 200 datagrams of 1000 bytes to the default gateway: they leave through eth0 whether
# anyone listens or not
UDP_OUT = """python3 -c '
import socket, struct
for line in open("/proc/net/route").read().splitlines()[1:]:
    f = line.split()
    if f[1] == "00000000":
        gw = socket.inet_ntoa(struct.pack("<L", int(f[2], 16)))
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(200):
    s.sendto(b"x" * 1000, (gw, 9))
'"""


def test_docker_metrics_see_cpu_memory_disk_and_network(docker_ok: Any,
                                                         make_sandbox: Any) -> None:
    sb = make_sandbox(cpus=1, memory="512MB")
    container = docker_ok.containers.get(sb.info.runtime["container_id"])
    before = docker_metrics(container)
    assert before.cpus == 1.0
    assert before.memory["total"] == sb.info.spec.memory == 512 * MiB
    assert 0 < before.memory["used"] < before.memory["total"]

    busy = sb.commands.run("while :; do :; done", background=True)
    sb.commands.run("dd if=/dev/zero of=/workspace/m.bin bs=1M count=20 conv=fsync",
                    check=True)
    sb.commands.run(UDP_OUT, check=True)
    after = docker_metrics(container)  # Docker's ~1 s window, the loop still running
    busy.kill()

    assert after.source["cpu"] == "cgroup"  # Docker had a previous sample
    assert 20 < after.cpu_percent <= 100 * after.cpus + 5  # --cpus 1 caps it
    assert after.memory["used"] > 0 and after.source["memory"] == "cgroup"
    assert after.uptime > before.uptime > 0

    # This host (cgroup v1) reports an empty blkio list even for O_DIRECT and fsync'd
    # writes; then the figure comes from the container's processes' /proc/<pid>/io.
    # Only a non-root user, who cannot read those, is left with "none".
    if after.source["disk"] == "none":
        assert os.geteuid() != 0, "as root the /proc fallback must report the write"
        assert after.disk == {"read_bytes": 0, "write_bytes": 0}
    else:
        assert after.source["disk"] in ("cgroup", "proc")
        assert after.disk["write_bytes"] - before.disk["write_bytes"] >= 20 * MiB

    assert after.source["net"] == "docker"
    assert after.net["tx_bytes"] - before.net["tx_bytes"] >= 200 * 1000
