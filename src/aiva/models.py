"""What a sandbox is: its spec, its state machine, its runtime facts, and its events.

The state machine is the single place that decides which action is legal in which state;
the engine asks it before touching a backend, so an illegal action is a clear error and
never a silent no-op.
"""

from __future__ import annotations

import ipaddress
import re
import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from aiva.errors import InvalidTransition, InvalidValue

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
    labels: dict[str, str] = Field(default_factory=dict)
    workdir: str = "/workspace"
    network: Literal["nat", "none"] = "nat"
    desktop: bool = False  # a screen to watch: noVNC published on 127.0.0.1 (aiva.desktop)
    timeout: float | None = Field(default=None, gt=0)  # seconds of life from each start
    idle_timeout: float | None = Field(default=None, gt=0)  # seconds without command/files
    on_timeout: OnTimeout = "stop"
    restart: RestartPolicy = "no"


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
