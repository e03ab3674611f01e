"""Everything a template's microVM boots from, built once and cached.

The system image comes from the very tar ``aiva image build`` imports into Docker, so a
template is the same file system in a container and in a VM.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from aiva import paths
from aiva.agent_client import bundle
from aiva.images import build as images
from aiva.vm.disks import build_rootfs
from aiva.vm.initramfs import build_initramfs
from aiva.vm.kernel import ensure_kernel

Progress = Callable[[str], None]


@dataclass(frozen=True)
class VmArtifacts:
    kernel: Path
    initramfs: Path
    rootfs: Path
    modules_version: str


def vm_cache() -> Path:
    return paths.vm_cache()


def template_tar(template: str, *, progress: Progress | None = None) -> Path:
    """The template's rootfs tar: the same file its Docker image is imported from."""
    return images.ensure_rootfs_tar(template, progress=progress)


def ensure_vm_artifacts(template: str, *, progress: Progress | None = None) -> VmArtifacts:
    """Kernel, initramfs (with this aiva's agent) and system image for ``template``."""
    say: Progress = progress or (lambda _msg: None)
    tar = template_tar(template, progress=say)
    kernel = ensure_kernel(say)
    initramfs = build_initramfs(kernel, bundle.agent_bundle(), vm_cache())
    rootfs = build_rootfs(tar, tar.with_suffix(".ext4"), progress=say)
    return VmArtifacts(kernel.vmlinuz, initramfs, rootfs, kernel.version)
