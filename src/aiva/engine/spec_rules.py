"""What a sandbox may ask of this host, and what a spec gives away.

Limits: an explicit value the host cannot honour is an error (``--memory 0`` is not "no
limit", ``--cpus 999`` is not "all of them"); a profile's or the config's default above
the host is clamped to the host, so the stock profiles work on a small machine.

Warnings: settings that are legal but hand something of the host to the sandbox or to
the network. One function, :func:`spec_warnings`, so the CLI (stderr), the API and MCP
(the create result) and the ``created`` event all say the same thing.
"""

from __future__ import annotations

import ipaddress
import math
import os
import stat
from pathlib import Path

from aiva.config import format_size
from aiva.errors import InvalidValue
from aiva.models import MountSpec, PortSpec, SandboxSpec
from aiva.paths import aiva_home

#: Below these a sandbox cannot run its agent (memory) or hold its own files (disk).
MIN_MEMORY = 16 << 20
MIN_DISK = 64 << 20


def host_cpus() -> int:
    return os.cpu_count() or 1


def host_memory() -> int:
    """Physical memory in bytes (0 if the host does not say)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError):
        return 0


# ---------------------------------------------------------------------- limits


def check_cpus(cpus: float) -> float:
    """An explicit CPU count: positive, and no more than this host has."""
    if not (isinstance(cpus, int | float) and math.isfinite(cpus) and cpus > 0):
        raise InvalidValue(f"cpus must be a positive number, not {cpus}",
                           hint="e.g. --cpus 1 or --cpus 0.5")
    n = host_cpus()
    if cpus > n:
        raise InvalidValue(f"cpus {cpus:g} is more than this host has ({n})",
                           hint=f"give at most --cpus {n}")
    return float(cpus)


def check_memory(size: int) -> int:
    """Memory in bytes: at least 16 MiB (0 is not "no limit")."""
    if size < MIN_MEMORY:
        raise InvalidValue(f"memory {format_size(size)} is below the minimum of "
                           f"{format_size(MIN_MEMORY)}",
                           hint="give a size like --memory 512MB; there is no unlimited")
    return size


def check_disk(size: int) -> int:
    """Disk in bytes: at least 64 MiB."""
    if size < MIN_DISK:
        raise InvalidValue(f"disk {format_size(size)} is below the minimum of "
                           f"{format_size(MIN_DISK)}", hint="give a size like --disk 10GB")
    return size


def check_limits(spec: SandboxSpec) -> SandboxSpec:
    """Every limit of a finished spec (one from an API client, say) within the rules."""
    check_cpus(spec.cpus)
    check_memory(spec.memory)
    check_disk(spec.disk)
    return spec


def clamp_cpus(cpus: float) -> float:
    """A default CPU count, cut to the host's."""
    return min(float(cpus), float(host_cpus()))


def clamp_memory(size: int) -> int:
    """A default memory size, cut to the host's physical memory."""
    total = host_memory()
    return min(size, total) if total >= MIN_MEMORY else size


# ---------------------------------------------------------------------- warnings


def spec_warnings(spec: SandboxSpec) -> list[str]:
    """One sentence per setting that gives something of the host away (none: [])."""
    out = [w for p in spec.ports if (w := _port_warning(p))]
    out += [w for m in spec.mounts if (w := _mount_warning(m))]
    return out


def _port_warning(port: PortSpec) -> str | None:
    try:
        ip = ipaddress.ip_address(port.host_ip)
    except ValueError:
        return None
    if ip.is_loopback:
        return None
    where = "every address of this host" if ip.is_unspecified else f"{ip}"
    return (f"port {port}: published on {where}, so it is reachable from the network, "
            "not only from this machine (bind 127.0.0.1 to keep it local)")


def _mount_warning(mount: MountSpec) -> str | None:
    host = Path(mount.host_path)
    access = "read" if mount.read_only else "read and change"
    if host == Path("/"):
        return (f"--mount /: the sandbox can {access} this host's whole filesystem, "
                "the Docker socket and aiva's state included")
    given = []
    sock = _docker_socket_under(host)
    if sock is not None:
        given.append(f"the Docker socket ({sock}): whoever can talk to it is root on this "
                     "host, read-only mount or not")
    home = _resolved(aiva_home())
    if _inside(home, host) or _inside(host, home):
        given.append(f"aiva's own state ({home}): other sandboxes' settings and "
                     "environment, their agent sockets and the daemon's token")
    if not given:
        return None
    return f"--mount {mount.host_path}: gives the sandbox " + "; and ".join(given)


def _docker_socket_under(dir_: Path) -> Path | None:
    """The Docker socket if it is at or below ``dir_`` (the usual places, where
    DOCKER_HOST points, or a ``docker.sock`` socket right in ``dir_``)."""
    candidates = [Path("/var/run/docker.sock"), Path("/run/docker.sock"), dir_ / "docker.sock"]
    docker_host = os.environ.get("DOCKER_HOST", "")
    if docker_host.startswith("unix://"):
        candidates.append(Path(docker_host.removeprefix("unix://")))
    for cand in candidates:
        real = _resolved(cand)
        try:
            is_socket = stat.S_ISSOCK(real.stat().st_mode)
        except OSError:
            continue
        if is_socket and _inside(real, dir_):
            return real
    return None


def _resolved(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError):
        return path


def _inside(path: Path, dir_: Path) -> bool:
    return path == dir_ or dir_ in path.parents
