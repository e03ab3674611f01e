"""What a sandbox is: its spec, its state machine, its runtime facts, and its events.

The state machine is the single place that decides which action is legal in which state;
the engine asks it before touching a backend, so an illegal action is a clear error and
never a silent no-op.
"""

from __future__ import annotations

import ipaddress
import posixpath
import re
import uuid
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal, cast

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from aiva.errors import InvalidTransition, InvalidValue
from aiva.network.egress import check_network

_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}$")


def utcnow() -> datetime:
    return datetime.now(UTC)


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise InvalidValue(
            f"'{name}' is not a valid sandbox name",
            hint="use letters, digits, '_', '.', '-' (up to 63), starting with a letter or digit",
        )
    return name


_RESTART = re.compile(r"^(no|always|on-failure(:[1-9][0-9]*)?)$")


def check_restart(policy: str) -> str:
    if not _RESTART.match(policy):
        raise InvalidValue(f"'{policy}' is not a restart policy",
                           hint="use no, on-failure, on-failure:N or always")
    return policy


RestartPolicy = Annotated[str, AfterValidator(check_restart)]
OnTimeout = Literal["stop", "pause", "destroy"]
#: What runs a Docker sandbox: Docker's default runc (the host's kernel, namespaces and
#: cgroups), or gVisor's runsc (a user-space kernel between the sandbox and the host's).
Runtime = Literal["runc", "gvisor"]


def check_tag(tag: str) -> str:
    if not _NAME.match(tag):
        raise InvalidValue(f"'{tag}' is not a valid snapshot tag",
                           hint="use letters, digits, '_', '.', '-'")
    return tag


class State(StrEnum):
    CREATING = "creating"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPING = "stopping"
    STOPPED = "stopped"
    ERROR = "error"


#: Legal moves. ERROR is reachable from anywhere (a backend can always fail).
TRANSITIONS: dict[State, frozenset[State]] = {
    State.CREATING: frozenset({State.RUNNING, State.STOPPED}),
    State.RUNNING: frozenset({State.PAUSED, State.STOPPING, State.STOPPED}),
    State.PAUSED: frozenset({State.RUNNING, State.STOPPING, State.STOPPED}),
    State.STOPPING: frozenset({State.STOPPED}),
    State.STOPPED: frozenset({State.RUNNING}),
    State.ERROR: frozenset({State.RUNNING, State.STOPPING, State.STOPPED}),
}

#: For each user action: the states it may start from, and the hint when it may not.
ACTIONS: dict[str, tuple[frozenset[State], str]] = {
    "start": (frozenset({State.STOPPED, State.ERROR}), "it is already up; see `aiva status`"),
    "stop": (
        frozenset({State.RUNNING, State.PAUSED, State.ERROR, State.STOPPING}),
        "it is not running",
    ),
    "pause": (frozenset({State.RUNNING}), "only a running sandbox can be paused"),
    "resume": (frozenset({State.PAUSED}), "only a paused sandbox can be resumed"),
    "use": (frozenset({State.RUNNING}), "start it with `aiva start NAME`"),
}


def can_move(src: State, dst: State) -> bool:
    return dst == State.ERROR or dst in TRANSITIONS[src]


def check_action(name: str, state: State, action: str) -> None:
    allowed, hint = ACTIONS[action]
    if state not in allowed:
        if state == State.PAUSED and action == "use":
            hint = f"resume it with `aiva resume {name}`"
        raise InvalidTransition(name, state.value, action if action != "use" else "use", hint)


class PortSpec(BaseModel):
    model_config = ConfigDict(frozen=True)
    host_ip: str = "127.0.0.1"
    host_port: int | None = None  # None: the engine picks a free one
    guest_port: int
    protocol: str = "tcp"

    @classmethod
    def parse(cls, text: str, default_bind: str = "127.0.0.1") -> PortSpec:
        """'80', '8080:80', '127.0.0.1:8080:80', '0.0.0.0:53:53/udp'."""
        spec, _, proto = text.partition("/")
        proto = proto or "tcp"
        parts = spec.rsplit(":", 2)
        try:
            if proto not in ("tcp", "udp"):
                raise ValueError
            if len(parts) == 1:
                return cls(host_ip=default_bind, guest_port=_port(parts[0]), protocol=proto)
            if len(parts) == 2:
                return cls(
                    host_ip=default_bind,
                    host_port=_port(parts[0]) if parts[0] else None,
                    guest_port=_port(parts[1]),
                    protocol=proto,
                )
            ip = parts[0].strip("[]") or default_bind
            ipaddress.ip_address(ip)
            return cls(
                host_ip=ip,
                host_port=_port(parts[1]) if parts[1] else None,
                guest_port=_port(parts[2]),
                protocol=proto,
            )
        except ValueError:
            raise InvalidValue(
                f"'{text}' is not a port mapping",
                hint="write HOST_PORT:GUEST_PORT, IP:HOST_PORT:GUEST_PORT or GUEST_PORT[/udp]",
            ) from None

    def __str__(self) -> str:
        host = f"{self.host_ip}:{self.host_port or ''}"
        return f"{host}->{self.guest_port}/{self.protocol}"


def _port(text: str) -> int:
    port = int(text)
    if not 0 < port < 65536:
        raise ValueError(text)
    return port


#: Guest paths a mount may not cover: aiva's own dir and the kernel's filesystems (at or
#: under), and the system dirs the sandbox cannot run without (exactly).
_GUEST_RESERVED_TREES = ("/.aiva", "/proc", "/sys", "/dev")
_GUEST_RESERVED_DIRS = ("/", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/usr",
                        "/etc")
#: Not in a guest path: ':' separates the parts of --mount, and the microVM's /init reads
#: the path from the kernel command line, split on blanks, with no quoting.
_GUEST_BAD_CHARS = frozenset(':"\\*?[]')


def check_guest_path(path: str) -> str:
    """A mount's path in the sandbox, normalized; one-line InvalidValue if unusable."""
    if not path.startswith("/"):
        raise InvalidValue(f"mount path '{path}' in the sandbox is not absolute",
                           hint="write DIR:/path/in/sandbox")
    if any(c in _GUEST_BAD_CHARS or not c.isprintable() or c.isspace() for c in path):
        raise InvalidValue(f"mount path '{path}' in the sandbox has a blank or one of "
                           f"{''.join(sorted(_GUEST_BAD_CHARS))}",
                           hint="pick a plain path with DIR:/path/in/sandbox")
    norm = posixpath.normpath(path)
    norm = "/" + norm.lstrip("/")  # normpath keeps a leading '//'
    if norm in _GUEST_RESERVED_DIRS or any(
            norm == t or norm.startswith(t + "/") for t in _GUEST_RESERVED_TREES):
        raise InvalidValue(f"a mount at '{norm}' would hide what the sandbox runs on",
                           hint="pick another path with DIR:/path/in/sandbox")
    return norm


def _check_host_path(path: str) -> str:
    if not path.startswith("/"):
        raise InvalidValue(f"host directory '{path}' is not an absolute path")
    return path


class MountSpec(BaseModel):
    """A host directory seen inside a sandbox: ``--mount DIR[:GUEST_PATH][:ro]``.

    The path in the sandbox defaults to the same path as on the host, so paths a tool is
    given on the host (an MCP client's file paths, say) mean the same file inside.
    ``read_only`` is enforced by the host (Docker's read-only bind mount; on QEMU a
    read-only bind mount in the file server's own mount namespace), never only by the
    guest's mount flags.
    """

    model_config = ConfigDict(frozen=True)
    host_path: Annotated[str, AfterValidator(_check_host_path)]
    guest_path: Annotated[str, AfterValidator(check_guest_path)]
    read_only: bool = False

    @classmethod
    def parse(cls, text: str) -> MountSpec:
        """'DIR', 'DIR:ro', 'DIR:/guest/path', 'DIR:/guest/path:ro' (or ':rw').

        DIR may be relative (to the current directory) or start with '~'; it must be an
        existing directory, and is stored resolved (symlinks followed).
        """
        parts = text.split(":")
        read_only = False
        if len(parts) > 1 and parts[-1] in ("ro", "rw"):
            read_only = parts.pop() == "ro"
        guest = parts.pop() if len(parts) > 1 and parts[-1].startswith("/") else None
        host = ":".join(parts)
        if not host:
            raise InvalidValue(f"'{text}' is not a mount",
                               hint="write DIR, DIR:ro, DIR:/path/in/sandbox[:ro]")
        # 'DIR:x', x neither a path nor a mode (unless DIR:x is a directory's own name)
        if len(parts) > 1 and guest is None and not Path(host).expanduser().exists():
            raise InvalidValue(f"'{text}' is not a mount: the path in the sandbox after "
                               "':' must be absolute, the mode ro or rw",
                               hint="write DIR, DIR:ro, DIR:/path/in/sandbox[:ro]")
        resolved = resolve_host_dir(host)
        return cls(host_path=resolved,
                   guest_path=check_guest_path(guest if guest is not None else resolved),
                   read_only=read_only)

    def check_host(self) -> MountSpec:
        """Raise InvalidValue unless the host directory exists now."""
        resolve_host_dir(self.host_path)
        return self

    def __str__(self) -> str:
        return f"{self.host_path}:{self.guest_path}:{'ro' if self.read_only else 'rw'}"


def resolve_host_dir(path: str) -> str:
    """``path`` made absolute and resolved; InvalidValue unless it is a directory."""
    p = Path(path).expanduser()
    try:
        real = p.resolve(strict=True)
    except (OSError, RuntimeError):
        raise InvalidValue(f"host directory '{path}' does not exist",
                           hint="create it, or check the path given to --mount") from None
    if not real.is_dir():
        raise InvalidValue(f"'{path}' is not a directory",
                           hint="--mount takes a directory (mount its parent instead)")
    return str(real)


class ServiceSpec(BaseModel):
    """A deployed program (``aiva deploy``): started after every boot, and restarted by the
    daemon under the sandbox's restart policy when it exits (aiva.deploy.services)."""

    model_config = ConfigDict(extra="forbid")
    command: list[str] = Field(min_length=1)
    cwd: str = "/app"
    env: dict[str, str] = Field(default_factory=dict)


class SandboxSpec(BaseModel):
    """What the user asked for; the backend turns it into a container or a VM."""

    model_config = ConfigDict(extra="forbid")
    backend: str = "docker"
    image: str
    template: str | None = None
    profile: str = "standard"
    cpus: float
    memory: int  # bytes
    disk: int  # bytes
    pids_limit: int = 4096
    env: dict[str, str] = Field(default_factory=dict)
    ports: list[PortSpec] = Field(default_factory=list)
    mounts: list[MountSpec] = Field(default_factory=list)  # host directories (--mount)
    labels: dict[str, str] = Field(default_factory=dict)
    workdir: str = "/workspace"
    # nat, none, or allow=HOST[,HOST...] (aiva.network.egress): stored normalized
    network: Annotated[str, AfterValidator(check_network)] = "nat"
    desktop: bool = False  # a screen to watch: noVNC published on 127.0.0.1 (aiva.desktop)
    service: ServiceSpec | None = None  # a deployed program (aiva deploy)
    timeout: float | None = Field(default=None, gt=0)  # seconds of life from each start
    idle_timeout: float | None = Field(default=None, gt=0)  # seconds without command/files
    on_timeout: OnTimeout = "stop"
    restart: RestartPolicy = "no"
    runtime: Runtime = "runc"  # Docker only: gvisor runs it under runsc (aiva.backends.docker)

    @model_validator(mode="after")
    def _mounts_fit(self) -> SandboxSpec:
        check_mounts(self.mounts, self.workdir)
        return self

    @model_validator(mode="after")
    def _runtime_fits(self) -> SandboxSpec:
        check_runtime(self.runtime, self.backend, desktop=self.desktop)
        return self


def parse_runtime(text: str | None) -> Runtime | None:
    """A runtime name as given on a command line (None: the default)."""
    if text is None:
        return None
    if text not in ("runc", "gvisor"):
        raise InvalidValue(f"'{text}' is not a runtime", hint="use runc or gvisor")
    return cast(Runtime, text)


def check_runtime(runtime: str, backend: str, *, desktop: bool = False) -> None:
    """gVisor wraps a container; a microVM is already its own kernel. The desktop's stack
    (X server, VNC, a browser) is not known to run under the 2022 runsc."""
    parse_runtime(runtime)
    if runtime != "gvisor":
        return
    if backend != "docker":
        raise InvalidValue(f"--runtime gvisor is for the Docker backend, not {backend}",
                           hint="a microVM already runs its own kernel: drop --runtime gvisor, "
                           "or use --backend docker")
    if desktop:
        raise InvalidValue("a desktop sandbox cannot run under gVisor",
                           hint="drop --runtime gvisor for the desktop")


def check_mounts(mounts: list[MountSpec], workdir: str) -> None:
    """No two mounts at one path; none over (or above) the workdir, which has its own
    volume (Docker) or lives on the data disk (VMs)."""
    seen: set[str] = set()
    work = posixpath.normpath(workdir)
    for m in mounts:
        if m.guest_path in seen:
            raise InvalidValue(f"two mounts at '{m.guest_path}' in the sandbox",
                               hint="give one of them another path: DIR:/path/in/sandbox")
        seen.add(m.guest_path)
        if work == m.guest_path or work.startswith(m.guest_path.rstrip("/") + "/"):
            raise InvalidValue(f"a mount at '{m.guest_path}' would hide the sandbox's "
                               f"workdir {workdir} (its data volume)",
                               hint="mount it below, e.g. "
                               f"DIR:{work.rstrip('/')}/{posixpath.basename(m.host_path)}")


class SandboxInfo(BaseModel):
    """A sandbox as the state store keeps it (seed 000 §2.2.1)."""

    id: str = Field(default_factory=lambda: str(uuid.uuid4()))
    name: str
    state: State = State.CREATING
    error: str | None = None
    spec: SandboxSpec
    runtime: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)

    @property
    def short_id(self) -> str:
        return self.id[:8]


class Event(BaseModel):
    id: int | None = None
    ts: datetime = Field(default_factory=utcnow)
    sandbox_id: str | None = None
    sandbox: str | None = None
    kind: str
    data: dict[str, Any] = Field(default_factory=dict)
