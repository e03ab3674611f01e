"""Host directories in sandboxes (--mount): parsing, validation, and what reaches the
backends, without Docker or QEMU (tests/integration/test_mounts.py runs them for real)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from aiva.errors import InvalidValue
from aiva.models import MountSpec, SandboxSpec

SPEC: dict[str, Any] = {"image": "aiva/python", "cpus": 1, "memory": 1 << 29, "disk": 1 << 30}


@pytest.fixture
def d(tmp_path: Path) -> Path:
    (tmp_path / "proj").mkdir()
    return (tmp_path / "proj").resolve()


@pytest.mark.parametrize(("suffix", "guest", "ro"), [
    ("", None, False), (":ro", None, True), (":rw", None, False),
    (":/src", "/src", False), (":/src:ro", "/src", True), (":/opt/x/../y:rw", "/opt/y", False),
])
def test_parse_forms(d: Path, suffix: str, guest: str | None, ro: bool) -> None:
    m = MountSpec.parse(f"{d}{suffix}")
    assert (m.host_path, m.guest_path, m.read_only) == (str(d), guest or str(d), ro)


def test_parse_resolves_relative_dirs_and_symlinks(d: Path, monkeypatch: pytest.MonkeyPatch
                                                   ) -> None:
    (d.parent / "link").symlink_to(d)
    monkeypatch.chdir(d.parent)
    assert MountSpec.parse("proj:ro") == MountSpec(host_path=str(d), guest_path=str(d),
                                                   read_only=True)
    assert MountSpec.parse("./link:/w/p").host_path == str(d)
    weird = d.parent / "a:b"  # a ':' that belongs to the directory's name
    weird.mkdir()
    assert MountSpec.parse("a:b:/x").host_path == str(weird)
    with pytest.raises(InvalidValue, match="has a blank or one of") as exc:
        MountSpec.parse("a:b")  # as the default path in the sandbox, the ':' cannot be
    assert "DIR:/path/in/sandbox" in (exc.value.hint or "")


@pytest.mark.parametrize(("text", "message"), [
    ("{d}/missing", "does not exist"),
    ("{d}/file.txt", "is not a directory"),
    ("{d}:guest", "must be absolute"),
    ("{d}:/.aiva/x", "would hide"),
    ("{d}:/.aiva", "would hide"),
    ("{d}:/proc/x", "would hide"),
    ("{d}:/dev", "would hide"),
    ("{d}:/", "would hide"),
    ("{d}:/usr", "would hide"),
    ("{d}:/a/../etc", "would hide"),
    ("{d}:/a b", "has a blank"),
    ("{d}:/a*", "has a blank"),
    (":ro", "is not a mount"),
])
def test_parse_errors_are_one_line(d: Path, text: str, message: str) -> None:
    (d / "file.txt").write_text("x")
    with pytest.raises(InvalidValue, match=message) as exc:
        MountSpec.parse(text.format(d=d))
    assert "\n" not in str(exc.value)


def test_spec_refuses_mounts_over_the_workdir_or_twice(d: Path) -> None:
    ok = SandboxSpec(**SPEC, mounts=[MountSpec.parse(f"{d}:/workspace/src:ro"),
                                     MountSpec.parse(f"{d}:/data")])
    assert [m.guest_path for m in ok.mounts] == ["/workspace/src", "/data"]
    for bad, message in (([f"{d}:/workspace"], "workdir"),
                         ([f"{d}:/data", f"{d}:/data:ro"], "two mounts")):
        with pytest.raises(ValueError, match=message):
            SandboxSpec(**SPEC, mounts=[MountSpec.parse(x) for x in bad])
    with pytest.raises(ValueError, match="not an absolute"):
        MountSpec(host_path="rel", guest_path="/x")


def test_old_stored_specs_load_and_new_ones_round_trip(d: Path) -> None:
    old = SandboxSpec.model_validate(SPEC)  # a spec stored before mounts existed
    assert old.mounts == []
    spec = SandboxSpec(**SPEC, mounts=[MountSpec.parse(f"{d}:/src:ro")])
    again = SandboxSpec.model_validate_json(spec.model_dump_json())
    assert again == spec and again.mounts[0].read_only
    # a directory removed since: the stored spec still loads (start says what is wrong)
    gone = spec.model_dump(mode="json")
    gone["mounts"][0]["host_path"] = str(d / "gone")
    assert SandboxSpec.model_validate(gone).mounts[0].host_path == str(d / "gone")


def test_build_spec_takes_strings_and_specs(d: Path) -> None:
    from aiva.engine import Engine

    eng = Engine()
    try:
        spec = eng.build_spec(backend="docker", mounts=[f"{d}:ro", MountSpec(
            host_path=str(d), guest_path="/w/two")])
        assert [(m.guest_path, m.read_only) for m in spec.mounts] == [(str(d), True),
                                                                     ("/w/two", False)]
        assert eng.build_spec(backend="docker").mounts == []
        with pytest.raises(InvalidValue, match="does not exist"):
            eng.build_spec(backend="docker", mounts=[MountSpec(host_path=str(d / "no"),
                                                               guest_path="/x")])
        with pytest.raises(InvalidValue, match="workdir") as exc:
            eng.build_spec(backend="docker", mounts=[f"{d}:/workspace"])
        assert exc.value.hint and "/workspace/proj" in exc.value.hint
    finally:
        eng.close()


@pytest.fixture(scope="module")
def api() -> Iterator[Any]:
    from aiva.daemon.app import Gate, create_app
    from aiva.engine import Engine

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from starlette.testclient import TestClient

    engine = Engine()
    yield TestClient(Gate(create_app(engine), token=None))
    engine.close()


def test_remote_build_spec_resolves_paths_on_the_caller_side(
        api: Any, d: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from aiva.daemon.client import RemoteEngine

    class Via:
        def call(self, method: str, path: str, **kw: Any) -> Any:
            r = api.request(method, path, **kw)
            assert r.status_code == 200, r.text
            return r.json()

    remote = RemoteEngine.__new__(RemoteEngine)
    remote._api = Via()  # type: ignore[assignment]
    monkeypatch.chdir(d.parent)
    spec = remote.build_spec(backend="docker", mounts=["proj:/src:ro"])
    assert spec.mounts == [MountSpec(host_path=str(d), guest_path="/src", read_only=True)]
    r = api.post("/v1/spec", json={"backend": "docker", "mounts": [f"{d}/nope"]})
    assert r.status_code == 400 and "does not exist" in r.json()["error"]["message"]


def test_qemu_command_line_and_kernel_args(d: Path, tmp_path: Path) -> None:
    from aiva.backends.qemu import _qemu_argv
    from aiva.models import SandboxInfo
    from aiva.network.vm_bridge import VmNetwork
    from aiva.vm import hostfs

    mounts = [MountSpec.parse(f"{d}:/a/b/c"), MountSpec.parse(f"{d}:/a:ro")]
    assert hostfs.kernel_args(mounts) == ["aiva.mount=1:/a:ro", "aiva.mount=0:/a/b/c:rw"]
    spec = SandboxSpec(**SPEC, backend="qemu", network="none", mounts=mounts)
    sb = SandboxInfo(name="m", spec=spec, runtime={
        "kernel": "k", "initramfs": "i", "rootfs": "r", "data_disk": "d",
        "vm_dir": str(tmp_path)})
    argv = _qemu_argv(sb, "tcg", tmp_path, VmNetwork(sb.id))
    text = " ".join(argv)
    assert "microvm,memory-backend=mem" in argv
    assert "memory-backend-memfd,id=mem,size=512M,share=on" in argv
    assert f"vhost-user-fs-device,chardev=hostfs,tag={hostfs.TAG}" in argv
    assert "virtio-mmio.force-legacy=false" in argv
    assert "aiva.mount=1:/a:ro aiva.mount=0:/a/b/c:rw" in text
    plain = SandboxInfo(name="p", spec=SandboxSpec(**SPEC, backend="qemu", network="none"),
                        runtime=sb.runtime)
    argv = _qemu_argv(plain, "tcg", tmp_path, VmNetwork(sb.id))
    assert "microvm" in argv and "aiva.mount" not in " ".join(argv)
    assert not any("vhost-user" in a or "memory-backend" in a for a in argv)


def test_hostfs_helper_serves_a_tree_with_ro_binds(d: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from aiva.models import SandboxInfo
    from aiva.vm import hostfs

    monkeypatch.setattr(hostfs, "check_host", lambda: "/usr/lib/qemu/virtiofsd")
    spec = SandboxSpec(**SPEC, backend="qemu", mounts=[MountSpec.parse(f"{d}:/x:ro")])
    sb = SandboxInfo(name="m", spec=spec)
    h = hostfs.helper(sb, tmp_path / "vm", tmp_path / "run")
    assert h["argv"][:5] == ["unshare", "--mount", "--propagation", "private", "--"]
    assert h["argv"][-3:] == ["0", str(d), "ro"] and h["socket"].endswith("/fs.sock")
    assert (tmp_path / "vm" / hostfs.TREE).is_dir()
    assert not any((tmp_path / "vm" / hostfs.TREE).iterdir())  # mounts live in a namespace
    d.rmdir()
    with pytest.raises(InvalidValue, match=r"cannot start m: host directory .* does not exist"):
        hostfs.helper(sb, tmp_path / "vm", tmp_path / "run")


def test_the_mount_modules_come_after_the_base_ones(tmp_path: Path) -> None:
    from aiva.vm.initramfs import MOUNT_MODULES, module_files
    from aiva.vm.kernel import KernelFiles

    mdir = tmp_path / "lib" / "modules" / "6.1"
    mdir.mkdir(parents=True)
    v = "kernel/drivers/virtio/"
    (mdir / "modules.dep").write_text(
        f"{v}virtio.ko:\n{v}virtio_ring.ko:\n{v}virtio_mmio.ko: {v}virtio.ko {v}virtio_ring.ko\n"
        f"kernel/drivers/block/virtio_blk.ko: {v}virtio.ko {v}virtio_ring.ko\n"
        "kernel/drivers/char/virtio_console.ko:\nkernel/fs/ext4/ext4.ko:\n"
        "kernel/fs/overlayfs/overlay.ko:\nkernel/fs/fuse/fuse.ko:\n"
        f"kernel/fs/fuse/virtiofs.ko: {v}virtio.ko {v}virtio_ring.ko kernel/fs/fuse/fuse.ko\n")
    kernel = KernelFiles(tmp_path / "vmlinuz", mdir, "6.1")
    base = module_files(kernel)
    assert "kernel/fs/fuse/fuse.ko" not in base
    extra = module_files(kernel, MOUNT_MODULES, required=(), skip=base)
    assert extra == ["kernel/fs/fuse/fuse.ko", "kernel/fs/fuse/virtiofs.ko"]


def test_firecracker_refuses_mounts_before_doing_anything(d: Path) -> None:
    from aiva.backends.firecracker import FirecrackerBackend
    from aiva.errors import BackendUnavailable
    from aiva.models import SandboxInfo

    sb = SandboxInfo(name="f", spec=SandboxSpec(**SPEC, backend="firecracker",
                                                mounts=[MountSpec.parse(str(d))]))
    with pytest.raises(BackendUnavailable, match="no virtio-fs") as exc:
        FirecrackerBackend().create(sb)
    assert "--backend qemu or docker" in (exc.value.hint or "")


def test_qemu_mounts_need_root_and_say_so(monkeypatch: pytest.MonkeyPatch) -> None:
    from aiva.errors import BackendUnavailable
    from aiva.vm import hostfs

    monkeypatch.setattr(hostfs.os, "geteuid", lambda: 1000)
    with pytest.raises(BackendUnavailable, match="needs root") as exc:
        hostfs.check_host()
    assert "--backend docker" in (exc.value.hint or "")
