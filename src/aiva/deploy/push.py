"""``aiva deploy NAME SOURCE``: an agent or MCP server kept running in a sandbox (000 §2.1.2).

SOURCE is a directory (pushed to ``/app`` in the sandbox; its ``aiva.yaml`` may give
``entry``, ``ports``, ``template``/``image``, ``env`` and ``restart``) or an image (its
own command is the entry unless ``--entry``). The program becomes the sandbox's service
(:mod:`aiva.deploy.services`): started now and after every boot, restarted by the daemon under
the restart policy (``always`` unless told), its ports published on 127.0.0.1. Deploying
again to the same name pushes the new code and restarts the program in place.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import yaml

from aiva.engine import Engine
from aiva.errors import InvalidValue
from aiva.models import PortSpec, SandboxInfo, ServiceSpec

MANIFEST = "aiva.yaml"
APP_DIR = "/app"
MANIFEST_KEYS = {"entry", "ports", "template", "image", "env", "restart"}


def load_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise InvalidValue(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict) or set(data) - MANIFEST_KEYS:
        unknown = sorted(set(data) - MANIFEST_KEYS) if isinstance(data, dict) else data
        raise InvalidValue(f"{path}: unknown keys {unknown}",
                           hint=f"it may hold {', '.join(sorted(MANIFEST_KEYS))}")
    return data


def _argv(entry: str | list[str] | None) -> list[str]:
    if entry is None:
        return []
    return shlex.split(entry) if isinstance(entry, str) else [str(a) for a in entry]


def _image_command(engine: Engine, ref: str) -> list[str]:
    from aiva.images import build as images

    image = images.resolve_image(engine.backend("docker").client, ref)  # type: ignore[attr-defined]
    config = image.attrs.get("Config") or {}
    return [*(config.get("Entrypoint") or []), *(config.get("Cmd") or [])]


def deploy(engine: Engine, name: str, source: str, *, entry: str | None = None,
           ports: list[str] | None = None, env: dict[str, str] | None = None,
           restart: str | None = None, template: str | None = None,
           replace: bool = False, say: Any = None) -> SandboxInfo:
    tell = say or (lambda msg: None)
    src = Path(source).expanduser()
    manifest = load_manifest(src) if src.is_dir() else {}
    image = None if src.is_dir() else source
    if src.is_dir():
        image = manifest.get("image")
        template = template or manifest.get("template") or (None if image else "python")
    command = _argv(entry) or _argv(manifest.get("entry"))
    if not command and image is not None and not src.is_dir():
        command = _image_command(engine, image)
    if not command or command == ["/bin/sh"]:
        raise InvalidValue(f"no entry command for {source}",
                           hint=f"pass --entry 'python3 server.py', or put `entry:` in "
                                f"{MANIFEST}")
    ports = list(ports or []) or [str(p) for p in manifest.get("ports") or []]
    env = {**{str(k): str(v) for k, v in (manifest.get("env") or {}).items()}, **(env or {})}
    restart = restart or manifest.get("restart") or "always"

    if replace and engine.exists(name):
        tell(f"removing the old {name}")
        engine.delete(name, volumes=True)
    if engine.exists(name):
        sb = engine.get(name)
        wanted = {str(PortSpec.parse(p)) for p in ports}
        have = {str(p) for p in sb.spec.ports}
        if ports and wanted != have:
            raise InvalidValue(f"{name} exists with other ports ({', '.join(have) or 'none'})",
                               hint="pass --replace to make it anew")
        if sb.state.value != "running":
            engine.start(name)
    else:
        spec = engine.build_spec(template=template, image=image, ports=ports, env=env,
                                 restart=restart)
        tell(f"creating {name} from {spec.image}")
        engine.create(name, spec)
    cwd = "/"
    if src.is_dir():
        report = engine.sync(name, src, APP_DIR, direction="push", delete=True)
        tell(f"pushed {src} to {APP_DIR} ({len(report.pushed)} files changed)")
        cwd = APP_DIR
    return engine.set_service(name, ServiceSpec(command=command, cwd=cwd, env=env))
