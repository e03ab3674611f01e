"""Images derived from another by running commands in it: ``aiva image derive``.

The way to put an MCP server or a toolchain into an image without a registry or a
Dockerfile: a build container runs the shell commands with network access, and the
result is committed as a local image labelled ``aiva.managed=true``. The commands, the
base image's id and the format make a content key kept as a label, so running the same
derive again returns at once. The host's CA bundle is given to the build
and named by the usual variables, so ``pip`` and ``npm`` work behind a TLS-inspecting
proxy exactly as they do on the host; it is copied into the build, and removed before
the commit, so it is not part of the image.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import docker
import docker.errors

from aiva.errors import ImageError, InvalidValue
from aiva.images import build as images
from aiva.images.build import ImageInfo

FORMAT = 3  # bump when how the build runs changes
DERIVED_FROM, RUN_KEY = "aiva.derived_from", "aiva.derive_key"
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
BUILD_DIR = "/run/aiva-build"  # removed by the build script itself, before the commit
CA_IN_BUILD = f"{BUILD_DIR}/host-ca.crt"
CA_VARS = ("SSL_CERT_FILE", "PIP_CERT", "REQUESTS_CA_BUNDLE", "NODE_EXTRA_CA_CERTS",
           "CURL_CA_BUNDLE", "GIT_SSL_CAINFO")
BUILD_TIMEOUT = 1800.0

Progress = Callable[[str], None]


def derive_key(base_id: str, run: list[str]) -> str:
    return hashlib.sha256(json.dumps([FORMAT, base_id, run]).encode()).hexdigest()[:16]


def derive(tag: str, *, base: str, run: list[str], client: docker.DockerClient,
           force: bool = False, progress: Progress | None = None,
           timeout: float = BUILD_TIMEOUT) -> ImageInfo:
    """``tag`` = ``base`` + the effect of ``run`` (shell commands, in order, as root)."""
    say: Progress = progress or (lambda _msg: None)
    if not run:
        raise InvalidValue("derive needs at least one --run command")
    if ":" not in tag.rsplit("/", 1)[-1]:
        tag += ":latest"
    base_image = images.resolve_image(client, base)
    key = derive_key(str(base_image.id), run)
    current = images._get(client, tag)
    if current is not None and not force and (current.labels or {}).get(RUN_KEY) == key:
        say(f"cached: {tag} is up to date (key {key})")
        return ImageInfo.from_image(current, tag)
    ca = HOST_CA.read_bytes() if HOST_CA.is_file() else None
    # exported by the script, not set on the container: the commit keeps no trace of them
    exports = "".join(f"export {var}={CA_IN_BUILD}\n" for var in CA_VARS) if ca else ""
    script = f"set -e\ntrap 'rm -rf {BUILD_DIR}' EXIT\n{exports}" + "\n".join(run) + "\n"
    labels = {images.MANAGED: "true", "aiva.build": "derive"}
    with images._docker(f"cannot start the build container for {tag}"):
        ctr = client.containers.create(base_image.id, ["/bin/sh", "-c", script],
                                       labels=labels, working_dir="/",
                                       entrypoint=[])
    try:
        if ca is not None:  # copied in, not mounted: no mount point is left in the image
            ctr.put_archive("/", _tar({CA_IN_BUILD.lstrip("/"): ca}))
        ctr.start()
        _follow(ctr, say, timeout)
        code = int(ctr.wait(timeout=30)["StatusCode"])
        if code != 0:
            tail = ctr.logs(tail=15).decode(errors="replace").strip()
            raise ImageError(f"building {tag} failed: a --run command exited {code}:\n{tail}",
                             hint="run the commands in a sandbox of the base image to see why")
        base_labels = dict(base_image.labels or {})
        new_labels = base_labels | {images.MANAGED: "true", images.TEMPLATE: "",
                                    DERIVED_FROM: base, RUN_KEY: key}
        repo, _, version = tag.rpartition(":")
        config = base_image.attrs.get("Config") or {}
        with images._docker(f"cannot commit {tag}"):
            ctr.commit(repository=repo, tag=version, conf={
                "Labels": new_labels, "Cmd": config.get("Cmd") or ["/bin/sh"],
                "Entrypoint": config.get("Entrypoint"), "Env": config.get("Env"),
                "WorkingDir": config.get("WorkingDir") or "/"})
    finally:
        try:
            ctr.remove(force=True)
        except docker.errors.APIError:
            pass
    new = client.images.get(tag)
    if current is not None and current.id != new.id:
        try:
            if not client.images.get(current.id).tags:
                client.images.remove(current.id)
        except docker.errors.APIError:
            pass
    return ImageInfo.from_image(new, tag)


def _follow(ctr: Any, say: Progress, timeout: float) -> None:
    """Pass the build's output on as progress, until it ends or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    pending = b""
    for chunk in ctr.logs(stream=True, follow=True):
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if text := line.decode(errors="replace").strip():
                say(text[-200:])
        if time.monotonic() > deadline:
            ctr.kill()
            raise ImageError(f"the build ran longer than {timeout:.0f}s and was stopped")


def _tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()
