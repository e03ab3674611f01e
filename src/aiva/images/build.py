"""Sandbox images, built locally from Debian packages with mmdebstrap.

There is no registry to pull from, so aiva makes its own root filesystems: mmdebstrap
writes a tarball (kept under ``AIVA_HOME/cache/images`` so a rebuild only re-imports it)
and ``docker import`` turns it into an image labelled ``aiva.managed=true``. Other images
may be used too, as long as they hold the python3 >= 3.8 the in-sandbox agent needs.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import secrets
import shutil
import subprocess
import tarfile
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import docker
import docker.errors
from docker.models.images import Image

from aiva import paths
from aiva.errors import BackendUnavailable, ImageError, ImageNotFound, ImageUnsupported
from aiva.paths import aiva_home

TEMPLATES: dict[str, list[str]] = {
    "minimal": ["python3"],
    "python": ["python3", "python3-venv", "git", "ca-certificates"],
    # a desktop to watch (seed 003 phase 2): X on a frame buffer, shared over VNC and
    # noVNC, XFCE, a browser and a terminal; ffmpeg records the screen
    "desktop": ["python3", "xvfb", "x11vnc", "novnc", "python3-websockify", "xfce4-session",
                "xfwm4", "xfce4-panel", "xfdesktop4", "xfce4-settings", "dbus-x11",
                "firefox-esr", "xterm", "ffmpeg", "x11-utils", "procps", "fonts-dejavu-core",
                "ca-certificates"],
}
FORMAT_VERSION = 1  # bump when the mmdebstrap options or image changes change
DEFAULT_SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
MIN_PYTHON = (3, 8)
MANAGED, TEMPLATE, CACHE_KEY = "aiva.managed", "aiva.template", "aiva.cache_key"
PYTHON = "aiva.python"
NOPYTHON_TAG = "aiva-test/nopython:latest"
PATH_ENV = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_SLIM_OPTS = [
    "--aptopt=Acquire::Languages \"none\"",
    *(f"--dpkgopt=path-exclude=/usr/share/{d}/*" for d in ("doc", "man", "locale")),
    "--dpkgopt=path-include=/usr/share/doc/*/copyright",  # licences stay with the binaries
    "--dpkgopt=path-include=/usr/share/locale/locale.alias",
]
_PROBE = "import sys;print(sys.version_info[:2])"

Progress = Callable[[str], None]


@dataclass(frozen=True)
class ImageInfo:
    tag: str
    id: str
    size: int
    created: datetime
    template: str | None
    managed: bool

    @classmethod
    def from_image(cls, image: Image, tag: str | None = None) -> ImageInfo:
        labels: dict[str, str] = image.labels or {}
        tags: list[str] = image.tags
        return cls(
            tag=tag or (tags[0] if tags else "<none>"),
            id=str(image.id).split(":")[-1][:12],
            size=int(image.attrs.get("Size", 0)),
            created=datetime.fromisoformat(str(image.attrs["Created"])),
            template=labels.get(TEMPLATE),
            managed=labels.get(MANAGED) == "true",
        )


def template_tag(template: str) -> str:
    return f"aiva/{template}:latest"


def _template_of(ref: str) -> str | None:
    """'aiva/python:latest' or 'aiva/python' -> 'python', so errors can name the fix."""
    m = re.fullmatch(r"aiva/([a-z0-9_-]+)(?::latest)?", ref)
    return m.group(1) if m and m.group(1) in TEMPLATES else None


def check_template(template: str) -> None:
    """ImageNotFound (with the names there are) unless ``template`` is one."""
    _packages(template)


def _packages(template: str) -> list[str]:
    try:
        return sorted(TEMPLATES[template])
    except KeyError:
        raise ImageNotFound(
            f"unknown image template '{template}'",
            hint=f"use one of: {', '.join(sorted(TEMPLATES))}",
        ) from None


def cache_key(template: str, suite: str, mirror: str) -> str:
    """Everything that changes the root filesystem, hashed; names the tarball and labels the
    image so a stale image is never mistaken for a fresh one."""
    blob = json.dumps([FORMAT_VERSION, template, _packages(template), suite, mirror])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _mirror_in(text: str) -> str | None:
    """First Debian archive URI of a one-line or deb822 sources file (security excluded)."""
    uris: list[str] = []
    for line in text.splitlines():
        parts = line.split("#", 1)[0].split()
        if parts and parts[0] == "deb":
            uris += [p for p in parts[1:] if "://" in p][:1]
    for para in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        for line in para.splitlines():
            key, sep, value = line.partition(":")
            if sep and not line.startswith(("#", " ", "\t")):
                fields[key.strip().lower()] = value.strip()
        if "deb" in fields.get("types", "").split() and fields.get("enabled") != "no":
            uris += fields.get("uris", "").split()
    return next((u.rstrip("/") for u in uris if u.rstrip("/").endswith("/debian")), None)


def default_mirror(apt_dir: Path = Path("/etc/apt")) -> str:
    """The host's own Debian mirror (it is known to be reachable), else deb.debian.org."""
    files = [apt_dir / "sources.list", *sorted((apt_dir / "sources.list.d").glob("*.sources"))]
    for path in files:
        with suppress(OSError):
            if found := _mirror_in(path.read_text()):
                return found
    return DEFAULT_MIRROR


@contextmanager
def _docker(what: str) -> Iterator[None]:
    """Map engine failures to aiva errors at the boundary."""
    try:
        yield
    except docker.errors.NotFound as exc:
        raise ImageNotFound(f"{what}: {exc.explanation or exc}") from exc
    except docker.errors.APIError as exc:
        raise ImageError(f"{what}: {exc.explanation or exc}") from exc
    except (docker.errors.DockerException, OSError) as exc:
        raise BackendUnavailable(
            f"{what}: the Docker engine does not answer ({exc})",
            hint="start Docker (e.g. `systemctl start docker`) and check `docker info`",
        ) from exc


def _get(client: docker.DockerClient, ref: str) -> Image | None:
    with _docker(f"cannot inspect image '{ref}'"):
        try:
            return client.images.get(ref)
        except docker.errors.NotFound:
            return None


def _mmdebstrap(pkgs: list[str], suite: str, mirror: str, dest: Path, say: Progress) -> None:
    """Build into a temp name and rename, so an interrupted build leaves no half tarball."""
    exe = shutil.which("mmdebstrap")
    if exe is None:
        raise BackendUnavailable(
            "mmdebstrap is not installed; aiva builds its images with it",
            hint="apt-get install mmdebstrap",
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.stem}.{os.getpid()}-{secrets.token_hex(4)}.partial.tar")
    cmd = [exe, "--variant=minbase", "--format=tar", f"--include={','.join(pkgs)}",
           *_SLIM_OPTS, suite, str(tmp), mirror]
    tail: deque[str] = deque(maxlen=15)
    try:
        with subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, errors="replace") as proc:
            try:
                assert proc.stdout is not None
                for raw in proc.stdout:
                    if line := raw.rstrip():
                        tail.append(line)
                        say(line)
                code = proc.wait()
            finally:
                if proc.poll() is None:  # interrupted: let mmdebstrap clean its tempdir
                    proc.terminate()
                    try:
                        proc.wait(timeout=15)
                    except subprocess.TimeoutExpired:
                        proc.kill()
        if code != 0:
            raise ImageError(
                f"mmdebstrap failed (exit {code}) for {suite} from {mirror}:\n"
                + "\n".join(tail),
                hint="check that the mirror is reachable, or pass another mirror",
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _python_in_tar(path: Path) -> str | None:
    """The python3.X the rootfs ships, read from the tarball (cheaper than a probe run)."""
    with tarfile.open(path) as tar:
        for member in tar:
            if m := re.fullmatch(r"(?:\./)?usr/bin/python(3\.\d+)", member.name):
                return m.group(1)
    return None


def _import(client: docker.DockerClient, src: str | bytes, tag: str, changes: list[str]) -> Image:
    """``docker import``; the image it untags is removed too, unless something still uses it."""
    old = _get(client, tag)
    repo, _, version = tag.rpartition(":")
    with _docker(f"cannot import image {tag}"):
        out = client.api.import_image(src=src, repository=repo, tag=version, changes=changes)
    for line in str(out).splitlines():
        with suppress(ValueError):
            msg: dict[str, Any] = json.loads(line)
            if "error" in msg:
                raise ImageError(f"cannot import image {tag}: {msg['error']}")
    with _docker(f"cannot inspect image {tag}"):
        new = client.images.get(tag)
    if old is not None and old.id != new.id:
        with suppress(docker.errors.APIError):
            if not client.images.get(old.id).tags:
                client.images.remove(old.id)
    return new


def ensure_rootfs_tar(template: str, *, suite: str = DEFAULT_SUITE, mirror: str | None = None,
                      progress: Progress | None = None) -> Path:
    """The template's root filesystem as a tar: the one source of containers and VMs."""
    say: Progress = progress or (lambda _msg: None)
    pkgs = _packages(template)
    mirror = mirror or default_mirror()
    tar = paths.images_cache() / f"{template}-{cache_key(template, suite, mirror)}.tar"
    if tar.is_file():
        say(f"cached rootfs {tar}: skipping mmdebstrap")
    else:
        say(f"building rootfs: {' '.join(pkgs)} from {suite} at {mirror}")
        _mmdebstrap(pkgs, suite, mirror, tar, say)
    return tar


def build_image(
    template: str,
    *,
    client: docker.DockerClient,
    force: bool = False,
    progress: Progress | None = None,
    suite: str = DEFAULT_SUITE,
    mirror: str | None = None,
) -> ImageInfo:
    """Build (or return the up-to-date) ``aiva/<template>:latest`` image."""
    say: Progress = progress or (lambda _msg: None)
    mirror = mirror or default_mirror()
    key = cache_key(template, suite, mirror)
    tag = template_tag(template)
    current = _get(client, tag)
    if current is not None and not force and (current.labels or {}).get(CACHE_KEY) == key:
        say(f"cached: {tag} is up to date (key {key})")
        return ImageInfo.from_image(current, tag)
    tar = ensure_rootfs_tar(template, suite=suite, mirror=mirror, progress=say)
    python = _python_in_tar(tar)
    labels = f"{MANAGED}=true {TEMPLATE}={template} {CACHE_KEY}={key}"
    say(f"importing {tar.name} as {tag}")
    image = _import(client, str(tar), tag, [
        f"LABEL {labels}" + (f" {PYTHON}={python}" if python else ""),
        'CMD ["/bin/sh"]', "WORKDIR /", "ENV LANG=C.UTF-8", f"ENV PATH={PATH_ENV}",
    ])
    return ImageInfo.from_image(image, tag)


def list_images(client: docker.DockerClient) -> list[ImageInfo]:
    """Every image aiva built, one row per tag (untagged leftovers show as '<none>').
    Template and derived images are shared by every AIVA_HOME; a snapshot's image belongs
    to the home of its sandbox, so another home's are not listed."""
    home = str(aiva_home())
    with _docker("cannot list images"):
        images = client.images.list(filters={"label": f"{MANAGED}=true"})
    images = [img for img in images if (img.labels or {}).get("aiva.home", home) == home]
    rows = [ImageInfo.from_image(img, tag) for img in images for tag in img.tags or ["<none>"]]
    return sorted(rows, key=lambda r: (r.tag, r.id))


def resolve_image(client: docker.DockerClient, ref: str) -> Image:
    """A template name or any local image reference -> the image; never pulls."""
    name = template_tag(ref) if ref in TEMPLATES else ref
    image = _get(client, name)
    if image is not None:
        return image
    template = _template_of(name)
    hint = (f"build it with `aiva image build {template}`" if template else
            "build it locally or load it with `docker load -i FILE.tar` "
            "(aiva never pulls: there is no registry)")
    raise ImageNotFound(f"image '{ref}' not found", hint=hint)


def _check_cache() -> Path:
    return paths.python_check_cache()


def _load_checks() -> dict[str, str]:
    try:
        data = json.loads(_check_cache().read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def _save_check(image_id: str, version: str) -> None:
    path = _check_cache()
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {**_load_checks(), image_id: version}
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _probe(client: docker.DockerClient, image: Image) -> str:
    """Run python3 in a throwaway container: '3.11', or '' when there is none."""
    with _docker(f"cannot probe image {image.id}"):
        box = client.containers.create(
            image.id, entrypoint=["python3"], command=["-c", _PROBE], network_disabled=True,
            labels={MANAGED: "true", "aiva.purpose": "probe"},
        )
    try:
        with _docker(f"cannot probe image {image.id}"):
            try:
                box.start()
            except docker.errors.APIError as exc:
                if re.search(r"not found|no such file", str(exc), re.IGNORECASE):
                    return ""
                raise
            code = int(box.wait(timeout=60).get("StatusCode", 1))
            out = box.logs(stdout=True, stderr=False).decode(errors="replace")
    finally:
        with suppress(docker.errors.APIError):
            box.remove(force=True)
    m = re.search(r"\((\d+), (\d+)\)", out)
    return f"{m.group(1)}.{m.group(2)}" if code == 0 and m else ""


def check_python(client: docker.DockerClient, image: Image) -> str:
    """The image's python3 version ('3.11'); ImageUnsupported if missing or older than 3.8.

    aiva's own template images are trusted; other answers are cached by image id, since a
    probe container costs about 0.4 s and an image id never changes content.
    """
    labels: dict[str, str] = image.labels or {}
    if labels.get(MANAGED) == "true" and labels.get(TEMPLATE) in TEMPLATES:
        return labels.get(PYTHON, "3")
    image_id = str(image.id)
    version = _load_checks().get(image_id)
    if version is None:
        version = _probe(client, image)
        _save_check(image_id, version)
    name = image.tags[0] if image.tags else image_id.split(":")[-1][:12]
    if not version or tuple(int(p) for p in version.split(".")) < MIN_PYTHON:
        found = f"python {version}" if version else "no python3"
        raise ImageUnsupported(
            f"image '{name}' has {found}; the aiva agent needs python3 >= 3.8",
            hint="build one with `aiva image build python`, "
                 "or use an image that has python3 >= 3.8",
        )
    return version


def busybox_rootfs() -> bytes:
    """A tarball with the host's static /bin/busybox as sh, sleep, cat and echo; no python3."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for d, mode in (("bin", 0o755), ("tmp", 0o1777), ("etc", 0o755)):
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, mode
            tar.addfile(info)
        busybox = os.path.realpath("/bin/busybox")
        with open(busybox, "rb") as f:
            tar.addfile(tar.gettarinfo(busybox, arcname="bin/busybox"), f)
        for name in ("sh", "sleep", "cat", "echo"):
            link = tarfile.TarInfo(f"bin/{name}")
            link.type, link.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(link)
    return buf.getvalue()


def build_test_image_without_python(client: docker.DockerClient) -> str:
    """A busybox-only image, for testing the unsupported-image path; returns its tag."""
    _import(client, busybox_rootfs(), NOPYTHON_TAG, [
        f"LABEL {MANAGED}=true aiva.purpose=test", 'CMD ["/bin/sh"]', "ENV PATH=/bin",
    ])
    return NOPYTHON_TAG
