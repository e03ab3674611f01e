"""Sandboxes as Docker containers, through the Docker SDK.

Each sandbox is one container whose main process (under Docker's init) is the aiva agent,
mounted read-only from ``AIVA_HOME/agent``; the agent listens on a Unix socket in a
per-sandbox host directory bind-mounted into the container, so every aiva process talks
to it directly with no ``docker exec`` (and no dockerd) on the path. The agent is also the
container's /dev/log and writes the guest's syslog to ``syslog.jsonl`` in that directory.
Its root filesystem is read-only; the workdir and the other writable paths live on an
ext4 image of ``spec.disk`` bytes (``docker_disk``), so a sandbox that fills its disk gets
ENOSPC and the host's free space moves by at most that much. The disk holds the data
across stop/start. (Sandboxes made before, or with ``enforce_docker_disk: false``, have
a writable root and a named volume at the workdir instead: both still work.)

The sandbox is hostile (docs/SECURITY.md): its run dir is a nosuid,nodev,noexec tmpfs of
its own (``aiva.guard.runmount``), its container runs without CAP_MKNOD and CAP_NET_RAW and with
``no-new-privileges``, and a connection to its agent socket is used only if the process
listening there is in its container (``aiva.guard.peer``).

Everything aiva creates carries ``aiva.managed=true`` and ``aiva.sandbox_id``; aiva never
touches a container or volume without them.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiva import paths
from aiva.agent_client import SocketTransport, Transport, bundle, connect_unix
from aiva.backends import docker_disk
from aiva.backends.base import Backend, LogLine, Observed
from aiva.errors import (
    BackendError,
    BackendUnavailable,
    ImageError,
    InvalidValue,
    ProtocolError,
)
from aiva.guard import runmount
from aiva.images import build as images
from aiva.models import SandboxInfo, State
from aiva.network import egress
from aiva.observe.metrics import SandboxMetrics, docker_metrics
from aiva.paths import aiva_home

AGENT_IN_SANDBOX = "/.aiva/agent"
RUN_IN_SANDBOX = "/.aiva/run"
SOCKET_NAME = "agent.sock"
SYSLOG_NAME = "syslog.jsonl"  # the guest's syslog, written by the agent into the run dir
ORPHAN_AGE = 60.0  # s: a run dir this fresh may belong to a create still under way
_ID12 = re.compile(r"[0-9a-f-]{12}")  # run dirs are named by the id's first 12

#: Every container aiva runs sandbox code in. Dropped: MKNOD (no device nodes, which on a
#: shared mount would be the host's devices) and NET_RAW (no raw or packet sockets: no
#: forged packets or ARP games on a bridge shared with other containers; ping still
#: works, through the ICMP datagram sockets Docker's ping_group_range allows). Kept, for
#: what sandboxes are for: CHOWN, DAC_OVERRIDE, FOWNER, FSETID, SETUID/SETGID, SETPCAP,
#: SETFCAP, KILL (apt and dpkg: its _apt user, file owners; pip; `exec --user`),
#: NET_BIND_SERVICE (services on low ports), SYS_CHROOT (build tools, debootstrap) and
#: AUDIT_WRITE (login tools). ``no-new-privileges``: no setuid binary or file capability
#: raises a process's privileges (root stays root; a user cannot become root via sudo).
HARDENING: dict[str, Any] = {"cap_drop": ["MKNOD", "NET_RAW"],
                             "security_opt": ["no-new-privileges"]}
#: Docker keeps what the container's first process prints, and a sandbox can write there
#: (root opens /proc/1/fd/1): at most two 8 MB files of it, never the host's whole disk.
LOG_LIMIT = {"type": "json-file", "config": {"max-size": "8m", "max-file": "2"}}

#: The Docker runtime scripts/setup.sh registers for ``--runtime gvisor``: runsc with the
#: flags these hosts need (its own name, so a user's ``runsc`` entry is never touched).
GVISOR_RUNTIME = "aiva-runsc"

_STATES = {
    "running": State.RUNNING,
    "paused": State.PAUSED,
    "restarting": State.RUNNING,
    "created": State.STOPPED,
    "exited": State.STOPPED,
    "dead": State.ERROR,
    "removing": State.STOPPING,
}


def labels_for(sb: SandboxInfo) -> dict[str, str]:
    return {
        "aiva.managed": "true",
        "aiva.sandbox_id": sb.id,
        "aiva.name": sb.name,
        "aiva.home": str(aiva_home()),
    }


class DockerBackend(Backend):
    name = "docker"

    def __init__(self) -> None:
        self._client: Any = None

    # ------------------------------------------------------------------ connection

    @property
    def client(self) -> Any:
        if self._client is None:
            import docker

            try:
                client = docker.from_env(timeout=120)
                client.ping()
            except docker.errors.DockerException as exc:
                raise self._unavailable(exc) from exc
            self._client = client
        return self._client

    @staticmethod
    def _unavailable(exc: Exception) -> BackendUnavailable:
        if shutil.which("dockerd") is None and shutil.which("docker") is None:
            return BackendUnavailable(
                "Docker is not installed",
                hint="install it: `sudo apt-get install docker.io`, then start it",
            )
        return BackendUnavailable(
            f"the Docker engine is not running or not reachable ({_short(exc)})",
            hint="start it: `sudo systemctl start docker` (or `sudo dockerd &`); "
            "check DOCKER_HOST and that you may use /var/run/docker.sock",
        )

    def check(self) -> None:
        self.client  # noqa: B018 - connects and pings

    def _container(self, sb: SandboxInfo) -> Any:
        import docker

        cid = sb.runtime.get("container_id")
        if not cid:
            return None
        try:
            c = self.client.containers.get(cid)
        except docker.errors.NotFound:
            return None
        except docker.errors.APIError as exc:
            raise BackendError(f"Docker failed to look up {sb.name}: {_short(exc)}") from exc
        if c.labels.get("aiva.sandbox_id") != sb.id:
            return None  # not ours: never touch it
        return c

    # ------------------------------------------------------------------ lifecycle

    def create(self, sb: SandboxInfo) -> dict[str, Any]:
        self._check_runtime(sb)
        image = images.resolve_image(self.client, sb.spec.image)
        images.check_python(self.client, image)
        return self._create(sb, image.id)

    def _check_runtime(self, sb: SandboxInfo) -> None:
        """``--runtime gvisor`` needs aiva's runsc entry in the engine's runtimes."""
        if sb.spec.runtime != "gvisor":
            return
        runtimes = self.client.info().get("Runtimes") or {}
        if GVISOR_RUNTIME not in runtimes:
            raise BackendUnavailable(
                f"gVisor is not set up: the Docker engine has no '{GVISOR_RUNTIME}' runtime",
                hint="run scripts/setup.sh as root (it installs runsc and registers it "
                "in /etc/docker/daemon.json), or drop --runtime gvisor")

    def _create(self, sb: SandboxInfo, image_id: str, *,
                copy_from: dict[str, Any] | None = None) -> dict[str, Any]:
        """Disk (seeded from the image, or a copy of the snapshot ``copy_from``) and
        container; undone on failure."""
        import docker

        volume = None
        disk = False
        pinned = None
        if egress.mode_of(sb.spec.network) == "allow":  # names resolved now, then pinned
            egress.check_host()
            pinned = egress.pin(sb.spec.network)
            sb = sb.model_copy(update={"runtime": sb.runtime | {"egress": pinned}})
        try:
            if pinned is not None:
                self._make_network(sb)
            if docker_disk.enforced():
                disk = True
                self._make_disk(sb, image_id, copy_from)
            else:
                volume = self.client.volumes.create(name=f"aiva-{sb.name}-{sb.short_id}",
                                                    labels=labels_for(sb))
                if copy_from is not None:
                    self._copy_volume(sb, copy_from["volume"], volume.name, image_id)
            container = self._make_container(sb, image_id,
                                             None if volume is None else volume.name)
        except BaseException as exc:
            if volume is not None:
                volume.remove(force=True)
            if disk:
                docker_disk.remove(sb.id)
            if pinned is not None:
                self._remove_network(sb)
            if isinstance(exc, docker.errors.ImageNotFound):
                raise ImageError(f"image {sb.spec.image} vanished: {_short(exc)}") from exc
            if isinstance(exc, docker.errors.APIError):
                raise BackendError(f"Docker could not create {sb.name}: {_short(exc)}") from exc
            raise
        return {
            "container_id": container.id,
            **({"volume": volume.name} if volume is not None else {"disk": sb.spec.disk}),
            "image_id": image_id,
            "agent_socket": str(paths.run_dir(sb.id) / SOCKET_NAME),
            **({"egress": pinned} if pinned is not None else {}),
        }

    def _make_disk(self, sb: SandboxInfo, image_id: str,
                   copy_from: dict[str, Any] | None) -> None:
        """The sandbox's ext4 disk under the image's files at the writable paths, then
        filled from the snapshot ``copy_from`` if any."""
        pairs = docker_disk.layout(sb.spec)
        docker_disk.make(sb.id, sb.spec.disk)
        docker_disk.populate(sb.id, pairs, docker_disk.seed(
            self.client, image_id, pairs, labels_for(sb)))
        if copy_from is not None:
            self._fill_disk(sb, copy_from, image_id)

    def _fill_disk(self, sb: SandboxInfo, snap: dict[str, Any], image_id: str) -> None:
        """The disk as the snapshot saved it (through the overlays, so files of the image
        deleted before the snapshot stay deleted); a snapshot of a volume sandbox fills
        only the workdir."""
        import docker

        src = docker.types.Mount("/from", snap["volume"], type="volume", read_only=True)
        dst = docker_disk.copy_mounts(sb.id, sb.spec, "/to", read_only=False)
        if snap.get("layout") != "disk":
            dst = [m for m in dst if m["Target"] == f"/to/{docker_disk.WORK}"]
            src = docker.types.Mount(f"/from/{docker_disk.WORK}", snap["volume"],
                                     type="volume", read_only=True)
        self._copy(sb, [src], dst, image_id, clear=True)

    # ------------------------------------------------------------------ egress allow-list

    def _network_name(self, sb: SandboxInfo) -> str:
        return f"aiva-{sb.name}-{sb.short_id}"

    def _make_network(self, sb: SandboxInfo) -> Any:
        """The sandbox's own Docker network, whose bridge (named by aiva) it alone is on:
        the key of its nft rules. An earlier one of this sandbox is reused."""
        import docker

        name = self._network_name(sb)
        try:
            net = self.client.networks.get(name)
        except docker.errors.NotFound:
            return self.client.networks.create(
                name, driver="bridge", labels=labels_for(sb) | {"aiva.purpose": "egress"},
                options={"com.docker.network.bridge.name": egress.docker_bridge(sb.id)})
        if (net.attrs.get("Labels") or {}).get("aiva.sandbox_id") != sb.id:
            raise BackendError(f"a Docker network named {name} exists and is not {sb.name}'s",
                               hint="remove it, or give the sandbox another name")
        return net

    def _networks_of(self, home: str) -> list[Any]:
        flt = {"label": ["aiva.managed=true", f"aiva.home={home}", "aiva.purpose=egress"]}
        return [n for n in self.client.networks.list(filters=flt)
                if (n.attrs.get("Labels") or {}).get("aiva.home") == home]

    def _remove_network(self, sb: SandboxInfo) -> None:
        """The sandbox's nft table, DOCKER-USER rules and network; idempotent."""
        import docker

        if os.geteuid() == 0:
            egress.remove_docker(sb.id)
        for net in self._networks_of(str(aiva_home())):
            if (net.attrs.get("Labels") or {}).get("aiva.sandbox_id") == sb.id:
                try:
                    net.remove()
                except docker.errors.NotFound:
                    pass

    def reap(self, live_ids: set[str]) -> list[str]:
        """Allow-list leftovers of this AIVA_HOME's sandboxes that are gone: those neither
        live nor with a container (a stopped sandbox keeps its network and rules). On
        every start, so cheap: one listing when this home has no allow-list network
        (rules go before their network; the daemon's ``reap_egress`` finds any others).
        Their run dirs' tmpfs too (read from /proc: no Docker call unless one is there)."""

        def known() -> set[str]:
            flt = {"label": ["aiva.managed=true", f"aiva.home={aiva_home()}"]}
            return set(live_ids) | {c.labels.get("aiva.sandbox_id", "") for c in
                                    self.client.containers.list(all=True, filters=flt)}

        runs = self.reap_run_dirs(known)
        if not self._networks_of(str(aiva_home())):
            return runs
        return sorted(set(self.reap_egress(known)) | set(runs))

    def reap_run_dirs(self, known: Callable[[], set[str]]) -> list[str]:
        """Unmount and remove the run-dir tmpfs mounts of this AIVA_HOME whose sandbox is
        not in ``known()`` (read after listing) and that are older than ``ORPHAN_AGE`` (a
        create in another process mounts its run dir before its container exists).
        Nothing of another AIVA_HOME, nothing that is not a tmpfs aiva would have made
        (a VM's run dir is a plain directory). Returns the short ids (12 characters)."""
        found = [p for p in runmount.mounts_under(paths.run_root())
                 if _ID12.fullmatch(p.name) and runmount.age(p) > ORPHAN_AGE]
        if not found:
            return []
        ids = {i[:12] for i in known()}
        gone = []
        for path in found:
            if path.name not in ids:
                runmount.release(path)
                gone.append(path.name)
        return gone

    def reap_egress(self, known: Callable[[], set[str]]) -> list[str]:
        """Remove the egress networks and rules of this AIVA_HOME whose sandbox is not in
        ``known()`` (read after listing, so one being made now is never hit); nothing of
        any other AIVA_HOME. Returns the sandbox ids (short ones for rules alone)."""
        import docker

        nets = self._networks_of(str(aiva_home()))
        ids = known()
        gone: set[str] = set()
        for net in nets:
            sid = (net.attrs.get("Labels") or {}).get("aiva.sandbox_id")
            if not sid or sid in ids:
                continue
            if os.geteuid() == 0:
                egress.remove_docker(sid)
            try:
                net.remove()
            except docker.errors.NotFound:
                pass
            except docker.errors.APIError:
                continue  # still in use: its orphan container goes first
            gone.add(sid)
        rules = egress.reap_docker(lambda: {i[:8] for i in ids})
        return sorted(gone | {s for s in rules if not any(g.startswith(s) for g in gone)})

    def reap_disks(self, known: Callable[[], set[str]]) -> list[str]:
        """Unmount the disks of this AIVA_HOME whose sandbox is gone (orphan containers
        go first); their images stay, as kept volumes do."""
        return docker_disk.reap(known)

    def _make_container(self, sb: SandboxInfo, image_id: str, volume: str | None) -> Any:
        """The container; ``volume`` None: on the sandbox's disk with a read-only root."""
        import docker

        spec = sb.spec
        run = paths.run_dir(sb.id)
        self._run_dir(sb)  # a failed create leaves it to the reaper (no container, old)
        ports: dict[str, Any] = {}
        for port in spec.ports:
            key = f"{port.guest_port}/{port.protocol}"
            binding = (port.host_ip, port.host_port) if port.host_port else (port.host_ip,)
            ports.setdefault(key, []).append(binding)
        return self.client.containers.create(
            image_id,
            name=f"aiva-{sb.name}-{sb.short_id}",
            hostname=sb.name[:63],
            entrypoint=["python3", "-B", "-S", AGENT_IN_SANDBOX, "--listen",
                        f"unix:{RUN_IN_SANDBOX}/{SOCKET_NAME}",
                        "--syslog", f"{RUN_IN_SANDBOX}/{SYSLOG_NAME}"],
            command=[],
            init=True,
            labels=labels_for(sb) | {f"aiva.label.{k}": v for k, v in spec.labels.items()},
            environment=spec.env,
            working_dir=spec.workdir,
            read_only=volume is None,
            tmpfs=docker_disk.RUN_TMPFS if volume is None else None,
            mounts=[
                *(docker_disk.docker_mounts(sb.id, spec) if volume is None else
                  [docker.types.Mount(spec.workdir, volume, type="volume")]),
                docker.types.Mount(RUN_IN_SANDBOX, str(run), type="bind"),
                docker.types.Mount(AGENT_IN_SANDBOX, str(bundle.agent_bundle()),
                                   type="bind", read_only=True),
                # host directories (--mount); read_only is the kernel's, outside the guest
                *(docker.types.Mount(m.guest_path, m.host_path, type="bind",
                                     read_only=m.read_only) for m in spec.mounts),
            ],
            **_cpu(spec.cpus),
            mem_limit=spec.memory,
            memswap_limit=spec.memory,
            pids_limit=spec.pids_limit,
            ports=ports,
            network_mode="none" if spec.network == "none" else None,
            # allow=...: its own network, and the pinned names in its /etc/hosts
            network=self._network_name(sb) if "egress" in sb.runtime else None,
            extra_hosts=[f"{name}:{addr}" for name, addr
                         in egress.hosts_lines(sb.runtime.get("egress"))] or None,
            stop_signal="SIGTERM",
            **HARDENING,
            log_config=docker.types.LogConfig(**LOG_LIMIT),
            runtime=GVISOR_RUNTIME if spec.runtime == "gvisor" else None,
        )

    def _run_dir(self, sb: SandboxInfo) -> None:
        """The run dir as its own nosuid,nodev,noexec tmpfs (see aiva.guard.runmount), made if
        missing: at create, and at every start (a host reboot took it away)."""
        try:
            runmount.ensure(paths.run_dir(sb.id))
        except OSError as exc:
            raise BackendError(f"cannot prepare the run dir of {sb.name}: {exc}",
                               hint="aiva mounts a tmpfs there as root; see `findmnt "
                                    f"{paths.run_dir(sb.id)}`") from exc

    def start(self, sb: SandboxInfo) -> dict[str, Any]:
        import docker

        c = self._require(sb)
        if "disk" in sb.runtime:  # after a reboot its mount is gone: first mount it again
            docker_disk.ensure_mounted(sb.id)
        self._run_dir(sb)
        sock = paths.run_dir(sb.id) / SOCKET_NAME
        sock.unlink(missing_ok=True)  # a stale socket from the last run must not fool us
        if "egress" in sb.runtime:  # rules first: the sandbox never runs without them
            egress.apply_docker(sb.id, sb.runtime["egress"])
        try:
            c.start()
        except docker.errors.APIError as exc:
            raise BackendError(f"Docker could not start {sb.name}: {_short(exc)}") from exc
        try:
            self.connect_agent(sb, timeout=30).close()
        except ProtocolError:
            raise  # something else answers there: say that, not "did not come up"
        except Exception:
            logs = self._tail(c)
            raise BackendError(
                f"the agent in {sb.name} did not come up" + (f": {logs}" if logs else ""),
                hint=f"see `aiva logs {sb.name}`",
            ) from None
        c.reload()
        return {"started_at": c.attrs["State"]["StartedAt"], "ports": _ports(c)}

    def stop(self, sb: SandboxInfo, *, force: bool = False, timeout: float = 10.0) -> None:
        import docker

        c = self._container(sb)
        if c is None:
            return
        try:
            if force:
                if c.status in ("running", "paused"):
                    c.kill()
            else:
                if c.status == "paused":
                    c.unpause()
                c.stop(timeout=int(timeout))
            c.wait(timeout=timeout + 30)
        except docker.errors.NotFound:
            return
        except docker.errors.APIError as exc:
            if "is not running" in str(exc):
                return
            raise BackendError(f"Docker could not stop {sb.name}: {_short(exc)}") from exc

    def pause(self, sb: SandboxInfo) -> None:
        self._call(sb, "pause")

    def resume(self, sb: SandboxInfo) -> None:
        self._call(sb, "unpause")

    def delete(self, sb: SandboxInfo, *, volumes: bool = False) -> None:
        self._cleanup(sb, volumes=volumes)

    def _cleanup(self, sb: SandboxInfo, *, volumes: bool) -> None:
        import docker

        c = self._container(sb)
        try:
            if c is not None:
                try:
                    c.remove(force=True)
                except docker.errors.NotFound:
                    pass
                except docker.errors.APIError as exc:
                    if "already in progress" not in str(exc):
                        raise
                    c.wait(condition="removed", timeout=60)  # an earlier rm is finishing
            if "disk" in sb.runtime:  # unmounted (the loop device goes); kept unless volumes
                if volumes:
                    docker_disk.remove(sb.id)
                else:
                    docker_disk.unmount(sb.id)
            if volumes and "volume" in sb.runtime:
                try:
                    vol = self.client.volumes.get(sb.runtime.get("volume") or "-")
                    if vol.attrs.get("Labels", {}).get("aiva.sandbox_id") == sb.id:
                        vol.remove(force=True)
                except docker.errors.NotFound:
                    pass
            if "egress" in sb.runtime or egress.mode_of(sb.spec.network) == "allow":
                self._remove_network(sb)
        except docker.errors.APIError as exc:
            raise BackendError(f"Docker could not remove {sb.name}: {_short(exc)}",
                               hint="retry `aiva rm`; see `docker ps -a`") from exc
        try:
            runmount.release(paths.run_dir(sb.id))
        except OSError as exc:
            raise BackendError(f"cannot remove the run dir of {sb.name}: {exc}",
                               hint="retry `aiva rm`; see `findmnt`") from exc

    def observe(self, sb: SandboxInfo) -> Observed:
        c = self._container(sb)
        if c is None:
            return Observed(None, "the container was removed outside aiva")
        st = c.attrs["State"]
        state = _STATES.get(st["Status"], State.ERROR)
        reason = None
        code = st.get("ExitCode")
        if st["Status"] in ("exited", "dead"):
            reason = f"the container exited with code {code}"
            if st.get("OOMKilled"):
                reason += " (out of memory)"
            if st.get("Error"):
                reason += f": {st['Error']}"
        return Observed(state, reason, code)

    def connect_agent(self, sb: SandboxInfo, *, timeout: float = 10.0) -> Transport:
        """A connection to the agent, used only once the process listening is known to be
        in this sandbox's container (the sandbox can replace what is at the path)."""
        path = str(paths.run_dir(sb.id) / SOCKET_NAME)
        if timeout <= 5:
            return self._checked(sb, connect_unix(path, timeout=timeout))
        c = self._container(sb)

        def alive() -> bool:
            if c is None:
                return False
            c.reload()
            return bool(c.status == "running")

        return self._checked(sb, connect_unix(path, timeout=timeout, alive=alive))

    def _checked(self, sb: SandboxInfo, transport: SocketTransport) -> SocketTransport:
        from aiva.guard.peer import check_container_peer

        try:
            check_container_peer(transport.sock, str(sb.runtime.get("container_id") or ""),
                                 sb.name)
        except BaseException:
            transport.close()
            raise
        return transport

    def engine_logs(self, sb: SandboxInfo, *, tail: int | None = None,
                    follow: bool = False) -> Iterator[LogLine]:
        c = self._container(sb)
        if c is None:
            return
        stream = c.logs(stream=True, follow=follow, timestamps=True,
                        tail="all" if tail is None else tail)
        pending = b""
        for chunk in stream:
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                yield _parse_log(line)
        if pending:
            yield _parse_log(pending)

    def syslog_path(self, sb: SandboxInfo) -> Path | None:
        """The agent, as the container's /dev/log, appends to this file in the run dir
        bind-mounted into the container: readable also once the container stopped."""
        return paths.run_dir(sb.id) / SYSLOG_NAME

    def metrics(self, sb: SandboxInfo) -> SandboxMetrics:
        return docker_metrics(self._require(sb))

    # ------------------------------------------------------------------ snapshots

    def snapshot(self, sb: SandboxInfo, tag: str) -> dict[str, Any]:
        """The container's filesystem (docker commit) and a copy of its data volume.
        Docker cannot save memory: processes do not come back on restore."""
        import docker

        c = self._require(sb)
        marks = labels_for(sb) | {"aiva.snapshot": tag}
        volume = None
        try:
            image = c.commit(repository=f"aiva-snapshot/{sb.name}-{sb.short_id}", tag=tag,
                             conf={"Labels": c.labels | marks})
            volume = self.client.volumes.create(name=f"aiva-snap-{sb.short_id}-{tag}",
                                                labels=marks)
            if "disk" in sb.runtime:  # all of the disk: the root is read-only
                docker_disk.ensure_mounted(sb.id)
                self._copy(sb, docker_disk.copy_mounts(sb.id, sb.spec, "/from",
                                                       read_only=True),
                           [docker.types.Mount("/to", volume.name, type="volume")], image.id)
            else:
                self._copy_volume(sb, sb.runtime["volume"], volume.name, image.id)
        except (docker.errors.APIError, BackendError) as exc:
            if volume is not None:
                volume.remove(force=True)
            if isinstance(exc, BackendError):
                raise
            raise BackendError(f"Docker could not snapshot {sb.name}: {_short(exc)}") from exc
        layout = {"layout": "disk"} if "disk" in sb.runtime else {}
        return {"memory": False, "image": image.id, "volume": volume.name, **layout}

    def restore(self, sb: SandboxInfo, tag: str, snap: dict[str, Any]) -> dict[str, Any]:
        """A new container from the snapshot's image over the data volume as saved."""
        old = self._require(sb)
        was_running = old.status in ("running", "paused")
        old.remove(force=True)
        if "disk" in sb.runtime:
            docker_disk.ensure_mounted(sb.id)
            self._fill_disk(sb, snap, snap["image"])
        else:
            self._copy_volume(sb, snap["volume"], sb.runtime["volume"], snap["image"],
                              clear=True)
        container = self._make_container(sb, snap["image"], sb.runtime.get("volume"))
        runtime: dict[str, Any] = {"container_id": container.id}
        if was_running:
            runtime |= self.start(sb.model_copy(update={"runtime": sb.runtime | runtime}))
        return runtime

    def create_from_snapshot(self, sb: SandboxInfo, source: SandboxInfo, tag: str,
                             snap: dict[str, Any]) -> dict[str, Any]:
        self._check_runtime(sb)
        return self._create(sb, snap["image"], copy_from=snap)

    def delete_snapshots(self, sb: SandboxInfo, snaps: list[dict[str, Any]]) -> None:
        import docker

        for snap in snaps:
            try:
                vol = self.client.volumes.get(snap["volume"])
                if vol.attrs.get("Labels", {}).get("aiva.sandbox_id") == sb.id:
                    vol.remove(force=True)
            except docker.errors.NotFound:
                pass
            try:
                img = self.client.images.get(snap["image"])
                if (img.labels or {}).get("aiva.snapshot") == snap["tag"]:
                    self.client.images.remove(img.id, force=True)
            except docker.errors.NotFound:
                pass
            except docker.errors.APIError:
                pass  # still used by a fork: it goes with that fork's image

    def _copy_volume(self, sb: SandboxInfo, src: str, dst: str, image_id: str,
                     clear: bool = False) -> None:
        """Copy one volume into another with a throwaway container of a known image."""
        import docker

        self._copy(sb, [docker.types.Mount("/from", src, type="volume", read_only=True)],
                   [docker.types.Mount("/to", dst, type="volume")], image_id, clear=clear)

    def _copy(self, sb: SandboxInfo, src: list[Any], dst: list[Any], image_id: str,
              clear: bool = False) -> None:
        """Copy the tree under /from (mounts ``src``) into /to (mounts ``dst``: one at /to,
        or one per directory below it, whose contents ``clear`` empties) with a throwaway
        container of a known image; on a disk, a copy too big ends in ENOSPC."""
        depth = 1 if [m["Target"] for m in dst] == ["/to"] else 2
        script = (f"find /to -mindepth {depth} -delete && " if clear else "") \
            + "cp -a /from/. /to/"
        helper = self.client.containers.run(
            image_id, entrypoint=["/bin/sh", "-c", script], command=[], detach=True,
            labels=labels_for(sb) | {"aiva.purpose": "volume-copy"}, network_mode="none",
            # the tree is the sandbox's: no device nodes made from it, no setuid gained
            cap_drop=["MKNOD"], security_opt=["no-new-privileges"], mounts=[*src, *dst])
        try:
            result = helper.wait(timeout=600)
            if result.get("StatusCode") != 0:
                logs = helper.logs().decode(errors="replace").strip()[-300:]
                raise BackendError(f"copying the data of {sb.name} failed: {logs}")
        finally:
            helper.remove(force=True)

    def update_resources(self, sb: SandboxInfo) -> None:
        import docker

        c = self._require(sb)
        spec = sb.spec
        if spec.runtime == "gvisor" and c.status in ("running", "paused"):
            raise InvalidValue(f"gVisor cannot change the limits of {sb.name} while it runs",
                               hint=f"stop it, set the value, start it: `aiva stop {sb.name}`")
        try:
            c.update(**_cpu(spec.cpus), mem_limit=spec.memory, memswap_limit=spec.memory)
        except docker.errors.APIError as exc:
            raise BackendError(f"Docker could not update {sb.name}: {_short(exc)}") from exc

    # ------------------------------------------------------------------ helpers

    def _require(self, sb: SandboxInfo) -> Any:
        c = self._container(sb)
        if c is None:
            raise BackendError(
                f"the container of {sb.name} is gone (removed outside aiva)",
                hint=f"remove the record with `aiva rm {sb.name}` and create it again",
            )
        return c

    def _call(self, sb: SandboxInfo, method: str) -> None:
        import docker

        try:
            getattr(self._require(sb), method)()
        except docker.errors.APIError as exc:
            raise BackendError(f"Docker could not {method} {sb.name}: {_short(exc)}") from exc

    def _tail(self, c: Any) -> str:
        try:
            text = c.logs(tail=5).decode(errors="replace").strip()
        except Exception:
            return ""
        return " | ".join(text.splitlines()[-5:])


def _cpu(cpus: float) -> dict[str, int]:
    """CPU quota per 100 ms period (settable live, unlike NanoCpus), capped at the host."""
    return {"cpu_period": 100_000,
            "cpu_quota": int(min(cpus, os.cpu_count() or 1) * 100_000)}


def _short(exc: Exception) -> str:
    explanation = getattr(exc, "explanation", None)
    return str(explanation or exc).strip()


def _ports(c: Any) -> list[str]:
    out = []
    for key, binds in (c.attrs["NetworkSettings"].get("Ports") or {}).items():
        for b in binds or []:
            out.append(f"{b['HostIp']}:{b['HostPort']}->{key}")
    return out


def _parse_log(line: bytes) -> LogLine:
    text = line.decode("utf-8", "replace")
    stamp, _, rest = text.partition(" ")
    try:
        head, _, frac = stamp.rstrip("Z").partition(".")
        ts = datetime.fromisoformat(f"{head}.{(frac + '000000')[:6]}").replace(tzinfo=UTC)
    except ValueError:
        return LogLine(datetime.now(UTC), "engine", text)
    return LogLine(ts, "engine", rest)
