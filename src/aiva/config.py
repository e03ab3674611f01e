"""``$AIVA_HOME/config.yaml`` (default ``~/.aiva``): defaults, platform and networking.

Loaded once per process through :func:`load_config`; everything else aiva keeps (state,
logs, caches, sockets) lives under the same ``AIVA_HOME`` so one variable moves it all.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
)

from aiva.errors import ConfigError, InvalidValue
from aiva.models import OnTimeout, RestartPolicy
from aiva.paths import config_path

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(value: str | int) -> int:
    """'512MB', '8g', '2GiB', 1048576 -> bytes (binary units, as Docker counts them)."""
    if isinstance(value, int):
        if value < 0:
            raise InvalidValue(f"size must not be negative: {value}")
        return value
    m = _SIZE.match(str(value))
    if not m:
        raise InvalidValue(
            f"'{value}' is not a size", hint="write it like 512MB, 2GB or 1.5g"
        )
    number, unit = float(m.group(1)), m.group(2).lower()
    if not unit and m.group(3) and m.group(3).lower() != "b":
        raise InvalidValue(f"'{value}' is not a size", hint="write it like 512MB, 2GB or 1.5g")
    return int(number * _UNITS[unit])


def format_size(n: int) -> str:
    for unit in ("TB", "GB", "MB", "KB"):
        size = _UNITS[unit[0].lower()]
        if n >= size:
            return f"{n / size:.4g}{unit}"
    return f"{n}B"


def _size_text(value: Any) -> Any:
    if isinstance(value, str | int):
        parse_size(value)  # validate early, keep the user's spelling
        return str(value)
    return value


Size = Annotated[str, BeforeValidator(_size_text)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Profile(_Section):
    cpus: float = Field(gt=0)
    memory: Size
    disk: Size


PROFILES: dict[str, Profile] = {
    "minimal": Profile(cpus=2, memory="4GB", disk="20GB"),
    "standard": Profile(cpus=4, memory="8GB", disk="50GB"),
    "performance": Profile(cpus=8, memory="16GB", disk="100GB"),
}


class Defaults(_Section):
    backend: Literal["auto", "docker", "qemu"] = "auto"
    profile: str = "standard"
    cpus: float | None = Field(default=None, gt=0)
    memory: Size | None = None
    disk: Size | None = None
    pids_limit: int = Field(default=4096, gt=0)
    image: str = "aiva/python:latest"
    cache_strategy: Literal["writeback", "writethrough", "none", "unsafe"] = "writeback"
    stop_timeout: float = Field(default=10.0, ge=0)
    timeout: float | None = Field(default=None, gt=0)
    idle_timeout: float | None = Field(default=None, gt=0)
    on_timeout: OnTimeout = "stop"
    restart: RestartPolicy = "no"
    # Docker: a read-only root and the writable paths on an ext4 image of --disk bytes
    # (backends/docker_disk.py); false gives a writable root with no disk limit
    enforce_docker_disk: bool = True


class LinuxPlatform(_Section):
    accel: Literal["auto", "kvm", "tcg"] = "auto"
    firecracker_binary: str = "/usr/bin/firecracker"
    jailer_binary: str = "/usr/bin/jailer"


class MacPlatform(_Section):
    lima_instance: str = "aiva-host"
    lima_cpus: int = 8
    lima_memory: Size = "16GB"


class WindowsPlatform(_Section):
    wsl_distro: str = "aiva-wsl"
    nested_virtualization: bool = True


class Platform(_Section):
    linux: LinuxPlatform = LinuxPlatform()
    macos: MacPlatform = MacPlatform()
    windows: WindowsPlatform = WindowsPlatform()


class Networking(_Section):
    bridge_name: str = "mcp-br0"
    subnet: str = "172.16.0.0/24"
    dns_servers: list[str] = ["8.8.8.8", "1.1.1.1"]
    default_bind: str = "127.0.0.1"


class BackendPrice(_Section):
    """What a sandbox costs per hour it runs: per CPU, and per GB (GiB) of memory."""

    cpu_hour: float = Field(default=0.0, ge=0)
    gb_hour: float = Field(default=0.0, ge=0)


class Cost(_Section):
    """Prices for `aiva cost` and the aiva_sandbox_cost_total metric. Local backends
    cost nothing unless priced; e.g. ``digitalocean: {cpu_hour: 0.009, gb_hour: 0.0045}``
    (illustrative figures, in ``currency``)."""

    currency: str = "USD"
    docker: BackendPrice = BackendPrice()
    qemu: BackendPrice = BackendPrice()
    firecracker: BackendPrice = BackendPrice()
    digitalocean: BackendPrice = BackendPrice()


class CollectorSettings(_Section):
    """The daemon's metrics sampler: how often, and how long samples are kept."""

    interval: float = Field(default=5.0, gt=0)  # seconds between samples
    retention: float = Field(default=86400.0, gt=0)  # seconds a sample is kept


def _host_dir(value: str) -> str:
    if not os.path.isabs(os.path.expanduser(value)):
        raise ValueError(f"'{value}' is not an absolute path (the server's directory "
                         "is not yours)")
    return value


HostDir = Annotated[str, AfterValidator(_host_dir)]


class McpSettings(_Section):
    """``aiva mcp serve`` and the daemon's ``/mcp``: what one tool call may return or take."""

    max_output: Size = "64KB"  # kept per exec stream and per file_read; the rest is cut
    exec_timeout: float = Field(default=120.0, gt=0)  # seconds, when a call gives none
    max_exec_timeout: float = Field(default=600.0, gt=0)  # a larger timeout is cut to this
    # host directories the sync tool may touch (with --allow-dir / --mcp-allow-dir); none:
    # MCP clients reach no host path at all (aiva.mcp.grants)
    allow_dirs: list[HostDir] = Field(default_factory=list)
    # False: a session sees and changes only the sandboxes it created (aiva.mcp.scope)
    all_sandboxes: bool = False


class TaskSettings(_Section):
    """The task pool's queue (docs/TASKS.md): budgets in the ``cost`` currency, and how
    many tasks run at once."""

    daily_budget: float | None = Field(default=None, ge=0)  # per UTC day; None: no cap
    task_budget: float | None = Field(default=None, ge=0)  # per task estimate; None: no cap
    alert_at: float = Field(default=0.8, gt=0, le=1)  # budget_alert past this fraction
    concurrency: int = Field(default=2, ge=1)  # tasks running at once
    regression_threshold: float = Field(default=0.1, ge=0)  # L1 gate: a 10% drop fails
    default_template: str = "python"  # for a task with neither template nor image


class PoolTemplate(_Section):
    """One template's pool limits; a key left out takes the ``pool`` section's value."""

    min_warm: int | None = Field(default=None, ge=0)
    max: int | None = Field(default=None, ge=1)
    idle_shrink: float | None = Field(default=None, gt=0)


class PoolSettings(_Section):
    """The warm pool of sandboxes tasks run in (``aiva pool``, src/aiva/tasks/pool.py).
    ``aiva pool resize`` stores per-template limits in the state db; they win over these."""

    min_warm: int = Field(default=2, ge=0)  # idle, ready sandboxes kept per template
    max: int = Field(default=6, ge=1)  # pool sandboxes per template, busy or idle
    idle_shrink: float = Field(default=300.0, gt=0)  # seconds idle before one beyond min goes
    reset: Literal["recreate", "restore"] = "recreate"  # how a used sandbox comes back clean
    claim_timeout: float = Field(default=60.0, gt=0)  # seconds a claim waits at max
    cpus: float | None = Field(default=None, gt=0)  # None: the default profile's
    memory: Size | None = None
    templates: dict[str, PoolTemplate] = Field(default_factory=dict)  # kept warm always


class Limits(_Section):
    """Bounds on what one sandbox's agent can make the host hold or wait for: the agent
    is untrusted, so every wait has a deadline and every buffer a cap."""

    call_timeout: float = Field(default=60.0, gt=0)  # s an agent call waits for its answer
    exec_output: Size = "16MiB"  # output kept in memory per stream per command; rest cut
    channel_buffer: Size = "8MiB"  # bytes queued per agent channel before backpressure
    command_log: Size = "8MiB"  # output per command kept in commands.jsonl
    log_read: Size = "64MiB"  # max bytes read from a sandbox-writable log per request
    walk_entries: int = Field(default=1_000_000, gt=0)  # files+dirs one fs.walk may return


class Config(_Section):
    version: str = "1.0"
    defaults: Defaults = Defaults()
    platform: Platform = Platform()
    networking: Networking = Networking()
    cost: Cost = Cost()
    collector: CollectorSettings = CollectorSettings()
    mcp: McpSettings = McpSettings()
    tasks: TaskSettings = TaskSettings()
    pool: PoolSettings = PoolSettings()
    limits: Limits = Limits()
    profiles: dict[str, Profile] = Field(default_factory=lambda: dict(PROFILES))

    def profile(self, name: str | None = None) -> Profile:
        name = name or self.defaults.profile
        try:
            return self.profiles[name]
        except KeyError:
            known = ", ".join(sorted(self.profiles))
            raise InvalidValue(
                f"unknown profile '{name}'", hint=f"use one of: {known}"
            ) from None


def _describe(exc: ValidationError, path: Path, raw: dict[str, Any]) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        value: Any = raw
        for part in err["loc"]:
            if isinstance(value, list) and isinstance(part, int) and part < len(value):
                value = value[part]
            else:
                value = value.get(part) if isinstance(value, dict) else None
        if err["type"] == "extra_forbidden":
            lines.append(f"{key}: unknown key")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"{key} = {value!r}: {msg}")
    return f"{path}: " + "; ".join(lines)


def load_config(path: Path | None = None) -> Config:
    """Read the config file; a missing file means all defaults."""
    path = path or config_path()
    try:
        text = path.read_text()
    except FileNotFoundError:
        return Config()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(
            _describe(exc, path, raw), hint=f"fix or remove the key in {path}"
        ) from exc
    except InvalidValue as exc:
        raise ConfigError(f"{path}: {exc}", hint=exc.hint) from exc


def write_default_config(path: Path | None = None) -> Path:
    """Write a commented default config if none exists, so users can see every key."""
    from aiva.guard.private import write_private  # it builds on this module

    path = path or config_path()
    if path.exists():
        return path
    data = Config().model_dump(mode="json", exclude={"profiles"})
    data["profiles"] = {k: v.model_dump() for k, v in PROFILES.items()}
    write_private(path, "# aiva configuration\n" + yaml.safe_dump(data, sort_keys=False))
    return path
