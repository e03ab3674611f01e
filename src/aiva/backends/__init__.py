"""Engines that run sandboxes. One module per engine; each imports its SDK lazily, so a
missing optional engine costs nothing until it is asked for."""

from __future__ import annotations

from aiva.backends.base import Backend
from aiva.errors import BackendUnavailable, InvalidValue

KNOWN = ("docker", "qemu", "firecracker")
#: Tried in this order by ``backend: auto``. QEMU joins once it is the better default
#: (KVM present); under TCG a container starts ~10x faster.
AUTO_ORDER = ("docker",)


def make_backend(name: str) -> Backend:
    if name == "docker":
        from aiva.backends.docker import DockerBackend

        return DockerBackend()
    if name == "qemu":
        from aiva.backends.qemu import QemuBackend

        return QemuBackend()
    if name == "firecracker":  # explicit only: it runs for real only where KVM boots it
        from aiva.backends.firecracker import FirecrackerBackend

        return FirecrackerBackend()
    raise InvalidValue(f"unknown backend '{name}'", hint=f"use one of: {', '.join(KNOWN)}")


def detect_backend() -> Backend:
    """The best engine that answers here (microVM engines will rank first once they land)."""
    problems: list[BackendUnavailable] = []
    for name in AUTO_ORDER:
        backend = make_backend(name)
        try:
            backend.check()
        except BackendUnavailable as exc:
            problems.append(exc)
            continue
        return backend
    if len(problems) == 1:
        raise problems[0]
    raise BackendUnavailable(
        "no sandbox engine is available: " + "; ".join(p.message for p in problems),
        hint="install and start Docker: `sudo apt-get install docker.io && sudo dockerd &`",
    )
