"""Image builds against the real Docker engine.

mmdebstrap takes ~40 s, so one session fixture builds ``minimal`` into a shared tarball
cache and every test points its own throwaway ``AIVA_HOME`` at that cache.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest

from aiva.errors import BackendUnavailable, ImageError, ImageNotFound, ImageUnsupported
from aiva.images import build as images
from aiva.images.build import (
    NOPYTHON_TAG,
    ImageInfo,
    build_image,
    build_test_image_without_python,
    check_python,
    list_images,
    resolve_image,
)

pytestmark = pytest.mark.docker

Built = tuple[ImageInfo, list[str]]


@pytest.fixture(scope="session")
def client() -> Iterator[docker.DockerClient]:
    try:
        c = docker.from_env()
        c.ping()
    except Exception as exc:
        pytest.skip(f"no Docker engine answers ({exc}); start dockerd to run these tests")
    yield c
    c.close()


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("aiva-image-cache")


def _use_home(home: Path, cache: Path) -> None:
    (home / "cache").mkdir(parents=True, exist_ok=True)
    (home / "cache" / "images").symlink_to(cache, target_is_directory=True)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shared_cache: Path) -> Path:
    monkeypatch.setenv("AIVA_HOME", str(tmp_path))
    _use_home(tmp_path, shared_cache)
    return tmp_path


@pytest.fixture(scope="session")
def minimal(
    client: docker.DockerClient, shared_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> Built:
    """Build ``aiva/minimal`` once per session (instantly, if the engine has it already)."""
    home = tmp_path_factory.mktemp("aiva-home")
    _use_home(home, shared_cache)
    messages: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AIVA_HOME", str(home))
        info = build_image("minimal", client=client, progress=messages.append)
    return info, messages


def _run(client: docker.DockerClient, image: str, *cmd: str) -> tuple[int, str]:
    box = client.containers.create(image, command=list(cmd), labels={"aiva.purpose": "test"})
    try:
        box.start()
        code = int(box.wait(timeout=60)["StatusCode"])
        return code, box.logs().decode()
    finally:
        box.remove(force=True)


def test_build_creates_labelled_runnable_image(
    client: docker.DockerClient, minimal: Built, home: Path
) -> None:
    info, _ = minimal
    assert info.tag == "aiva/minimal:latest"
    assert info.template == "minimal" and info.managed and info.size > 0
    labels = client.images.get(info.tag).labels
    assert labels["aiva.managed"] == "true"
    assert labels["aiva.template"] == "minimal"
    assert labels["aiva.cache_key"] == images.cache_key(
        "minimal", images.DEFAULT_SUITE, images.default_mirror()
    )
    listed = list_images(client)
    assert info.tag in {i.tag for i in listed}
    assert all(i.managed for i in listed)
    code, out = _run(client, info.tag, "python3", "--version")
    assert code == 0 and out.startswith("Python 3."), out
    # aiva's own images are trusted without a probe container
    version = check_python(client, resolve_image(client, "minimal"))
    assert tuple(map(int, version.split("."))) >= (3, 8)
    assert not (home / "cache" / "python-check.json").exists()


def test_second_build_is_cached(client: docker.DockerClient, minimal: Built, home: Path) -> None:
    messages: list[str] = []
    info = build_image("minimal", client=client, progress=messages.append)
    assert info.id == minimal[0].id
    assert any(m.startswith("cached:") for m in messages), messages
    assert not any(m.startswith("I:") for m in messages), "mmdebstrap ran again"


@pytest.fixture
def seeded_tar(
    client: docker.DockerClient, home: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[str, str]]:
    """A cached rootfs tarball (busybox, so it is small) under a mirror nobody uses, imported
    under a test tag, so neither mmdebstrap nor the real aiva/minimal image is touched."""
    tag, mirror = "aiva-test/minimal:latest", "http://tar-cache.invalid/debian"
    monkeypatch.setattr(images, "template_tag", lambda template: tag)
    key = images.cache_key("minimal", images.DEFAULT_SUITE, mirror)
    (home / "cache" / "images" / f"minimal-{key}.tar").write_bytes(images.busybox_rootfs())
    try:
        yield tag, mirror
    finally:
        (home / "cache" / "images" / f"minimal-{key}.tar").unlink()
        with contextlib.suppress(docker.errors.ImageNotFound):
            client.images.remove(tag)


def test_cached_tarball_skips_mmdebstrap(
    client: docker.DockerClient, seeded_tar: tuple[str, str]
) -> None:
    tag, mirror = seeded_tar
    for force in (False, True):
        messages: list[str] = []
        info = build_image(
            "minimal", client=client, mirror=mirror, force=force, progress=messages.append
        )
        assert any(m.startswith("cached rootfs") for m in messages), messages
        assert not any(m.startswith("I:") for m in messages), "mmdebstrap ran"
        assert info.tag == tag and info.template == "minimal" and info.managed
    # the force rebuild replaced the first import; the untagged one is gone
    assert [i.tag for i in list_images(client) if i.tag == tag or i.id == info.id] == [tag]


def test_resolve_missing_image(client: docker.DockerClient, home: Path) -> None:
    with pytest.raises(ImageNotFound) as err:
        resolve_image(client, "aiva-test/does-not-exist:never")
    assert err.value.hint and "docker load" in err.value.hint
    try:
        client.images.get("aiva/python:latest")
    except docker.errors.ImageNotFound:  # only checkable where nobody built it yet
        with pytest.raises(ImageNotFound) as err:
            resolve_image(client, "python")
        assert err.value.hint and "aiva image build python" in err.value.hint


def test_busybox_image_fails_check_python(client: docker.DockerClient, home: Path) -> None:
    existed = bool(client.images.list(name=NOPYTHON_TAG))  # others' tests may share the tag
    tag = build_test_image_without_python(client)
    try:
        image = resolve_image(client, tag)
        assert image.labels["aiva.managed"] == "true"
        for _ in range(2):  # the second answer comes from the JSON cache
            with pytest.raises(ImageUnsupported) as err:
                check_python(client, image)
            assert tag in str(err.value)
            assert err.value.hint and "aiva image build python" in err.value.hint
        assert image.id in (home / "cache" / "python-check.json").read_text()
        probes = client.containers.list(
            all=True, filters={"label": "aiva.purpose=probe", "ancestor": image.id}
        )
        assert probes == [], "probe container was not removed"
    finally:
        if not existed:
            with contextlib.suppress(docker.errors.APIError):
                client.images.remove(NOPYTHON_TAG)


def test_foreign_image_is_probed_once(
    client: docker.DockerClient, minimal: Built, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the same rootfs without aiva's trust label stands in for an image from elsewhere
    box = client.containers.create(minimal[0].tag, command=["true"])
    try:
        image = box.commit("aiva-test/foreign", "latest", changes=["LABEL aiva.managed=false"])
    finally:
        box.remove(force=True)
    try:
        version = check_python(client, image)
        assert version.startswith("3.")
        assert image.id in (home / "cache" / "python-check.json").read_text()
        monkeypatch.setattr(images, "_probe", lambda *a: pytest.fail("probed again"))
        assert check_python(client, image) == version
    finally:
        client.images.remove(image.id, force=True)


def test_unknown_template(client: docker.DockerClient, home: Path) -> None:
    with pytest.raises(ImageNotFound) as err:
        build_image("no-such-template", client=client)
    assert err.value.hint and "minimal" in err.value.hint and "python" in err.value.hint


def test_missing_mmdebstrap(
    client: docker.DockerClient, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(BackendUnavailable) as err:
        build_image("minimal", client=client, mirror="http://mirror.invalid/debian", force=True)
    assert err.value.hint == "apt-get install mmdebstrap"


@pytest.mark.slow  # apt retries the dead mirror for ~7 s
def test_failing_mmdebstrap_leaves_no_tarball(
    client: docker.DockerClient, home: Path, shared_cache: Path
) -> None:
    mirror = "http://127.0.0.1:9/debian"  # nothing listens on the discard port
    messages: list[str] = []
    with pytest.raises(ImageError) as err:
        build_image("minimal", client=client, mirror=mirror, progress=messages.append)
    assert "mmdebstrap failed" in str(err.value) and "E:" in str(err.value)
    key = images.cache_key("minimal", images.DEFAULT_SUITE, mirror)
    assert not (shared_cache / f"minimal-{key}.tar").exists()
    assert not list(shared_cache.glob(".*partial*")), "temp tarball left behind"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("deb [arch=amd64] http://ftp.de.debian.org/debian/ bookworm main\n",
         "http://ftp.de.debian.org/debian"),
        ("Types: deb\nURIs: http://deb.debian.org/debian-security\nSuites: bookworm-security\n"
         "\nTypes: deb-src deb\nURIs: https://mirror.example/debian\nSuites: bookworm\n",
         "https://mirror.example/debian"),
        ("deb http://archive.ubuntu.com/ubuntu noble main\n", None),
    ],
)
def test_mirror_from_sources(text: str, expected: str | None) -> None:
    assert images._mirror_in(text) == expected


def test_image_ls_lists_this_homes_snapshot_images_only(make_sandbox: Any, docker_ok: Any,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        tmp_path: Path) -> None:
    sb = make_sandbox()
    sb.snapshot("s1")
    snap = f"aiva-snapshot/{sb.name}-{sb.id[:8]}:s1"
    tags = {i.tag for i in list_images(docker_ok)}
    assert snap in tags and "aiva/python:latest" in tags
    monkeypatch.setenv("AIVA_HOME", str(tmp_path / "other-home"))
    tags = {i.tag for i in list_images(docker_ok)}
    assert snap not in tags and "aiva/python:latest" in tags  # templates are shared
