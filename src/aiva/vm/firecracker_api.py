"""Firecracker driver: its REST API over a Unix socket, the jailer's argv, host checks.

The backend builds on this and never speaks HTTP itself. Every request body here is
checked in the unit tests against Firecracker's published API description (Swagger 2.0,
see docs/FIRECRACKER.md), because no Firecracker binary runs on the machines this was
written on.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any, Literal, TypedDict

import httpx
from pydantic import BaseModel, ConfigDict, Field, field_validator

from aiva.config import Config
from aiva.errors import BackendError, BackendUnavailable, InvalidValue

CacheType = Literal["Unsafe", "Writeback"]
IoEngine = Literal["Sync", "Async"]
LogLevel = Literal["Error", "Warning", "Info", "Debug", "Trace", "Off"]
SnapshotType = Literal["Full", "Diff"]

DEFAULT_API_SOCK = "/run/firecracker.socket"
# Writing guest memory to disk can take far longer than a config call.
SNAPSHOT_TIMEOUT = 300.0
# The ASCII part of Firecracker's rule for ids in a path (checked_id): alphanumeric or '_'.
_DEVICE_ID = re.compile(r"[A-Za-z0-9_]+")


class InstanceInfo(TypedDict):
    app_name: str
    id: str
    state: Literal["Not started", "Running", "Paused"]
    vmm_version: str


def _device_id(kind: str, value: str) -> str:
    """Ids go into the URL path, so refuse what Firecracker would refuse anyway."""
    if not _DEVICE_ID.fullmatch(value):
        raise InvalidValue(f"'{value}' is not a valid Firecracker {kind}", hint="use [A-Za-z0-9_]")
    return value


def _body(**fields: Any) -> dict[str, Any]:
    """Leave unset options out: Firecracker applies its own defaults to absent fields."""
    return {k: v for k, v in fields.items() if v is not None}


class FirecrackerAPI:
    """One Firecracker process's API socket. Small typed methods, one per endpoint."""

    def __init__(
        self, socket_path: str, *, transport: httpx.BaseTransport | None = None, timeout: float = 10
    ) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self._client = httpx.Client(
            transport=transport or httpx.HTTPTransport(uds=socket_path),
            base_url="http://localhost",
            timeout=timeout,
        )

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> FirecrackerAPI:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        self.close()

    def _call(
        self, method: str, path: str, body: dict[str, Any] | None = None, timeout: float = 0
    ) -> Any:
        """Send one request; map transport failures and fault messages to aiva errors."""
        op, timeout = f"{method} {path}", timeout or self.timeout
        try:
            resp = self._client.request(method, path, json=body, timeout=timeout)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise BackendUnavailable(
                f"cannot reach firecracker at {self.socket_path} ({op}): {exc}",
                hint="is the firecracker process running? it creates this socket from "
                "--api-sock at start; check its log and that the path is right",
            ) from exc
        except httpx.TimeoutException as exc:
            raise BackendError(
                f"firecracker did not answer {op} within {timeout:g}s",
                hint="the VMM may be stuck: check its log, then kill and restart it",
            ) from exc
        except httpx.TransportError as exc:
            raise BackendUnavailable(
                f"connection to firecracker at {self.socket_path} failed ({op}): {exc}",
                hint="the firecracker process may have exited: check its log",
            ) from exc
        if resp.status_code >= 400:
            raise BackendError(
                f"firecracker {op} failed ({resp.status_code}): {_fault(resp)}",
                hint="Firecracker refused the request; its log (put_logger) says more",
            )
        if not resp.content:
            return None
        try:
            return resp.json()
        except ValueError as exc:
            raise BackendError(f"firecracker {op} answered with non-JSON: {resp.text!r}") from exc

    # ------------------------------------------------------------------ pre-boot config

    def describe_instance(self) -> InstanceInfo:
        info: InstanceInfo = self._call("GET", "/")
        return info

    def version(self) -> str:
        return str(self._call("GET", "/version")["firecracker_version"])

    def put_logger(self, log_path: str, level: LogLevel = "Info") -> None:
        self._call("PUT", "/logger", {"log_path": log_path, "level": level})

    def put_metrics(self, metrics_path: str) -> None:
        self._call("PUT", "/metrics", {"metrics_path": metrics_path})

    def put_machine_config(
        self,
        vcpu_count: int,
        mem_size_mib: int,
        smt: bool = False,
        track_dirty_pages: bool = False,
    ) -> None:
        body = {"vcpu_count": vcpu_count, "mem_size_mib": mem_size_mib, "smt": smt}
        self._call("PUT", "/machine-config", {**body, "track_dirty_pages": track_dirty_pages})

    def put_boot_source(
        self, kernel_image_path: str, boot_args: str | None = None, initrd_path: str | None = None
    ) -> None:
        body = _body(
            kernel_image_path=kernel_image_path, boot_args=boot_args, initrd_path=initrd_path
        )
        self._call("PUT", "/boot-source", body)

    def put_drive(
        self,
        drive_id: str,
        path_on_host: str,
        *,
        is_root_device: bool,
        is_read_only: bool,
        cache_type: CacheType = "Unsafe",
        io_engine: IoEngine | None = None,
    ) -> None:
        """A virtio-block drive. The spec makes path_on_host and is_read_only optional only
        for vhost-user drives, so both are always sent here."""
        body = _body(drive_id=_device_id("drive id", drive_id), path_on_host=path_on_host)
        body.update(is_root_device=is_root_device, is_read_only=is_read_only)
        body.update(_body(cache_type=cache_type, io_engine=io_engine))
        self._call("PUT", f"/drives/{drive_id}", body)

    def put_network_interface(
        self, iface_id: str, host_dev_name: str, guest_mac: str | None = None
    ) -> None:
        body = _body(iface_id=_device_id("interface id", iface_id), host_dev_name=host_dev_name)
        body.update(_body(guest_mac=guest_mac))
        self._call("PUT", f"/network-interfaces/{iface_id}", body)

    def put_vsock(self, guest_cid: int, uds_path: str) -> None:
        """vsock_id is deprecated in the spec and not required, so it is not sent."""
        self._call("PUT", "/vsock", {"guest_cid": guest_cid, "uds_path": uds_path})

    def put_balloon(
        self, amount_mib: int, deflate_on_oom: bool = True, stats_polling_interval_s: int = 1
    ) -> None:
        body = {"amount_mib": amount_mib, "deflate_on_oom": deflate_on_oom}
        body["stats_polling_interval_s"] = stats_polling_interval_s
        self._call("PUT", "/balloon", body)

    # ------------------------------------------------------------------ running VM

    def patch_balloon(self, amount_mib: int) -> None:
        self._call("PATCH", "/balloon", {"amount_mib": amount_mib})

    def balloon_stats(self) -> dict[str, int]:
        stats: dict[str, int] = self._call("GET", "/balloon/statistics")
        return stats

    def _action(self, action_type: str) -> None:
        self._call("PUT", "/actions", {"action_type": action_type})

    def start(self) -> None:
        self._action("InstanceStart")

    def send_ctrl_alt_del(self) -> None:
        """x86 only: the guest reboots, and Firecracker, which cannot reboot, exits."""
        self._action("SendCtrlAltDel")

    def flush_metrics(self) -> None:
        self._action("FlushMetrics")

    def pause(self) -> None:
        self._call("PATCH", "/vm", {"state": "Paused"})

    def resume(self) -> None:
        self._call("PATCH", "/vm", {"state": "Resumed"})

    def create_snapshot(
        self, snapshot_path: str, mem_file_path: str, snapshot_type: SnapshotType = "Full"
    ) -> None:
        """The VM must be paused first."""
        body = {"snapshot_path": snapshot_path, "mem_file_path": mem_file_path}
        body["snapshot_type"] = snapshot_type
        self._call("PUT", "/snapshot/create", body, max(self.timeout, SNAPSHOT_TIMEOUT))

    def load_snapshot(
        self, snapshot_path: str, mem_file_path: str, resume_vm: bool = False
    ) -> None:
        """Only on a fresh process. Uses mem_backend: mem_file_path is deprecated for load."""
        memory = {"backend_type": "File", "backend_path": mem_file_path}
        body = {"snapshot_path": snapshot_path, "mem_backend": memory, "resume_vm": resume_vm}
        self._call("PUT", "/snapshot/load", body, max(self.timeout, SNAPSHOT_TIMEOUT))


def _fault(resp: httpx.Response) -> str:
    try:
        data = resp.json()
    except ValueError:
        return resp.text.strip() or resp.reason_phrase
    if isinstance(data, dict) and isinstance(data.get("fault_message"), str):
        return str(data["fault_message"])
    return resp.text.strip()


# ---------------------------------------------------------------------- jailer


class JailerConfig(BaseModel):
    """What the jailer needs for one VM; field names follow its flags."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=r"^[A-Za-z0-9-]{1,64}$")
    exec_file: str
    uid: int = Field(ge=0)
    gid: int = Field(ge=0)
    chroot_base_dir: Path = Path("/srv/jailer")
    netns: str | None = None
    # the jailer itself defaults to v1; current distributions mount only v2
    cgroup_version: Literal[1, 2] = 2
    cgroups: dict[str, str] = Field(default_factory=dict)
    daemonize: bool = False
    new_pid_ns: bool = False

    @field_validator("exec_file")
    @classmethod
    def _named_firecracker(cls, value: str) -> str:
        if "firecracker" not in Path(value).name:
            raise ValueError("the jailer only runs a file whose name contains 'firecracker'")
        return value

    @field_validator("cgroups")
    @classmethod
    def _cgroup_files(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if not re.fullmatch(r"[a-z_]+\.[A-Za-z0-9_.]+", key):
                raise ValueError(f"'{key}' is not a cgroup file name like cpu.max")
        return value


def chroot_path(cfg: JailerConfig) -> Path:
    """The jail's root: kernel, drives and sockets must be linked or copied in here."""
    return cfg.chroot_base_dir / Path(cfg.exec_file).name / cfg.id / "root"


def jailer_command(
    cfg: JailerConfig, jailer_binary: str, api_sock: str = DEFAULT_API_SOCK
) -> list[str]:
    """The jailer argv; api_sock is a path inside the jail (under chroot_path on the host)."""
    argv = [
        jailer_binary,
        "--id", cfg.id,
        "--exec-file", cfg.exec_file,
        "--uid", str(cfg.uid),
        "--gid", str(cfg.gid),
        "--chroot-base-dir", str(cfg.chroot_base_dir),
    ]  # fmt: skip
    if cfg.netns:
        argv += ["--netns", cfg.netns]
    argv += ["--cgroup-version", str(cfg.cgroup_version)]
    for name, value in cfg.cgroups.items():
        argv += ["--cgroup", f"{name}={value}"]
    if cfg.daemonize:
        argv.append("--daemonize")
    if cfg.new_pid_ns:
        argv.append("--new-pid-ns")
    # after "--" everything goes to firecracker; the jailer adds --id itself
    return [*argv, "--", "--api-sock", api_sock]


def firecracker_command(binary: str, api_sock: str) -> list[str]:
    """Unjailed firecracker, for development hosts."""
    return [binary, "--api-sock", api_sock]


# ---------------------------------------------------------------------- host checks


def _resolve(configured: str) -> str | None:
    if os.sep in configured:
        if os.path.isfile(configured) and os.access(configured, os.X_OK):
            return configured
        return shutil.which(Path(configured).name)
    return shutil.which(configured)


def find_binaries(config: Config) -> tuple[str, str]:
    """(firecracker, jailer): the configured paths, else the same names on PATH."""
    linux = config.platform.linux
    found = []
    pairs = [("firecracker_binary", linux.firecracker_binary)]
    for key, configured in [*pairs, ("jailer_binary", linux.jailer_binary)]:
        path = _resolve(configured)
        if path is None:
            name = key.removesuffix("_binary")
            raise BackendUnavailable(
                f"no {name} binary: not at {configured} and not on PATH",
                hint=f"install it and set platform.linux.{key}",
            )
        found.append(path)
    return found[0], found[1]


def kvm_usable(device: str = "/dev/kvm") -> tuple[bool, str]:
    """(True, "") when KVM can be used; else False and why, in words a person can act on."""
    if not os.path.exists(device):
        return False, (
            f"{device} does not exist: enable virtualization (VT-x/AMD-V, or nested "
            "virtualization in a VM) and load the kvm module"
        )
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except PermissionError:
        return False, f"{device} is not readable and writable by this user: add it to group kvm"
    except OSError as exc:
        return False, f"cannot open {device}: {exc.strerror}"
    os.close(fd)
    return True, ""
