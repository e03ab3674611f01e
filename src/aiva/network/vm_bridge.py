"""VM networking (seed 000 §2.3): a bridge with NAT, one TAP per VM, host->guest forwards.

- The bridge (``networking.bridge_name``) holds the subnet's first host address, which is
  every guest's gateway; outgoing guest traffic is masqueraded by an nftables table of
  its own (``ip aiva-<bridge>``), or by iptables rules commented ``aiva:<bridge>``.
- Guest addresses are leases in ``AIVA_HOME/run/net/leases.json``, changed only under an
  ``flock``, so concurrent aiva processes never hand out one address twice.
- Everything aiva makes is labelled (link alias ``aiva ...``, table name, rule comment), so
  :func:`reap_stale` can remove what a crashed process left, and nothing else is touched.
- Ports are forwarded in user space (:func:`forward_port`, run by the VM's supervisor):
  binding 127.0.0.1 needs no ``route_localnet`` and no NAT rule in the host's OUTPUT path.
- Mode ``allow`` (``--network allow=...``) is ``nat`` plus the VM's egress allow-list:
  nft tables ``bridge``/``inet aiva-<bridge>-<sid8>`` (:func:`aiva.network.egress.vm_ruleset`),
  made before the VM boots and removed with its TAP.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import ipaddress
import json
import os
import shlex
import shutil
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiva import paths
from aiva.config import Networking, load_config
from aiva.errors import BackendError, BackendUnavailable, InvalidValue
from aiva.models import PortSpec
from aiva.network import egress

MODES = ("none", "nat", "allow")
BRIDGE_ALIAS = "aiva bridge"
IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")
State = dict[str, dict[str, dict[str, Any]]]


def net_dir() -> Path:
    return paths.net_dir()


def tap_name(sandbox_id: str) -> str:
    return f"aiva-{sandbox_id[:8]}"  # interface names are at most 15 characters


def egress_table(bridge: str, sandbox_id: str) -> str:
    """The name of a VM's allow-list tables (one ``bridge``, one ``inet``)."""
    return f"aiva-{bridge}-{sandbox_id[:8]}"


def guest_mac(sandbox_id: str) -> str:
    """Stable across restarts (the guest keeps its ARP identity); locally administered."""
    h = hashlib.sha256(sandbox_id.encode()).digest()
    return ":".join(f"{b:02x}" for b in ((h[0] & 0xFC) | 0x02, *h[1:6]))


@dataclass(frozen=True)
class VmNetwork:
    """What a VM needs to join the network; ``mode == "none"`` means no NIC at all."""

    sandbox_id: str
    mode: str = "none"
    tap: str = ""
    bridge: str = ""
    address: str = ""
    prefix: int = 0
    gateway: str = ""
    mac: str = ""
    ports: tuple[PortSpec, ...] = ()
    allow: tuple[str, ...] = ()  # mode "allow": the pinned destinations, NET[:PORT]

    def kernel_args(self) -> list[str]:
        return [f"aiva.ip={self.address}/{self.prefix},{self.gateway}"] if self.tap else []

    def qemu_args(self) -> list[str]:
        return ["-netdev", f"tap,id=net0,ifname={self.tap},script=no,downscript=no",
                "-device", f"virtio-net-device,netdev=net0,mac={self.mac}"] if self.tap else []

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__
             if k not in ("ports", "allow")}
        return {**d, "ports": [p.model_dump() for p in self.ports], "allow": list(self.allow)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VmNetwork:
        ports = tuple(PortSpec.model_validate(p) for p in data.get("ports", []))
        return cls(**{**data, "ports": ports, "allow": tuple(data.get("allow", ()))})


def check_host() -> None:
    """Fail early, with the fix, when this host cannot make bridges and TAPs."""
    for bad, what, hint in (
        (os.geteuid() != 0, "VM networking needs root (bridge, TAP devices, NAT rules)",
         "run aiva as root, or start the VM with `--network none`"),
        (shutil.which("ip") is None, "the `ip` command is missing",
         "install it: `sudo apt-get install iproute2`"),
        (not (shutil.which("nft") or shutil.which("iptables")),
         "neither `nft` nor `iptables` is installed (needed for NAT)",
         "install it: `sudo apt-get install nftables`"),
        (not Path("/dev/net/tun").exists(), "/dev/net/tun is missing", "run `modprobe tun`"),
    ):
        if bad:
            raise BackendUnavailable(what, hint=hint)


def _run(*argv: str, stdin: str | None = None, check: bool = True) -> str:
    r = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise BackendError(f"`{shlex.join(argv)}` failed: {r.stderr.strip()}")
    return r.stdout


def _links() -> dict[str, dict[str, Any]]:
    return {link["ifname"]: link for link in json.loads(_run("ip", "-j", "-d", "link", "show"))}


def _alias_owner(link: dict[str, Any]) -> tuple[str, str] | None:
    """(sandbox id, bridge) of a link labelled ``aiva tap SID BRIDGE``, else None."""
    parts = str(link.get("ifalias", "")).split()
    return (parts[2], parts[3]) if len(parts) == 4 and parts[:2] == ["aiva", "tap"] else None


def _ipt_purge(table: str, tag: str) -> None:
    """Delete the iptables rules carrying our comment tag, and only those."""
    if shutil.which("iptables") is None:
        return
    for rule in _run("iptables", "-w", "-t", table, "-S", check=False).splitlines():
        args = shlex.split(rule)
        if args[:1] == ["-A"] and tag in args:
            _run("iptables", "-w", "-t", table, "-D", *args[1:], check=False)


def _add_nat(bridge: str, net: ipaddress.IPv4Network) -> None:
    """Masquerade the subnet leaving by any interface but the bridge."""
    tag = f"aiva:{bridge}"
    if shutil.which("nft"):
        t = f"aiva-{bridge}"
        _run("nft", "-f", "-", stdin=(
            f"add table ip {t}\ndelete table ip {t}\ntable ip {t} {{\n"
            " chain postrouting {\n  type nat hook postrouting priority srcnat; policy accept;\n"
            f'  ip saddr {net} oifname != "{bridge}" masquerade comment "aiva"\n }}\n}}\n'))
    else:
        _ipt_purge("nat", tag)
        _run("iptables", "-w", "-t", "nat", "-A", "POSTROUTING", "-s", str(net), "!", "-o",
             bridge, "-m", "comment", "--comment", tag, "-j", "MASQUERADE")
    # A FORWARD policy of DROP (Docker sets one) would stop guest traffic whatever our
    # table says: accept the bridge's own traffic there, under our comment.
    if shutil.which("iptables") and "-P FORWARD DROP" in _run(
            "iptables", "-w", "-S", "FORWARD", check=False):
        _ipt_purge("filter", tag)
        for rule in (["-i", bridge], ["-o", bridge, "-m", "conntrack", "--ctstate",
                                      "RELATED,ESTABLISHED"]):
            _run("iptables", "-w", "-I", "FORWARD", "1", *rule, "-m", "comment",
                 "--comment", tag, "-j", "ACCEPT")


def _check_overlap(net: ipaddress.IPv4Network, bridge: str) -> None:
    """Never shadow a network the host already routes: that would break its networking."""
    for route in json.loads(_run("ip", "-j", "-4", "route", "show", "table", "all")):
        dst, dev = route.get("dst", "default"), route.get("dev")
        if dst != "default" and dev != bridge and ipaddress.ip_network(dst, False).overlaps(net):
            raise BackendError(f"the VM subnet {net} overlaps {dst} on {dev}",
                               hint="set networking.subnet to an unused range")


def _subnet(cfg: Networking) -> tuple[ipaddress.IPv4Network, str]:
    """The network and its gateway (the first host address)."""
    try:
        net = ipaddress.IPv4Network(cfg.subnet)
        return net, str(next(net.hosts()))
    except (ValueError, StopIteration):
        raise InvalidValue(f"networking.subnet = {cfg.subnet!r} is not an IPv4 network",
                           hint="write it like 172.16.0.0/24") from None


@contextlib.contextmanager
def _locked() -> Iterator[State]:
    """The lease state, held under an exclusive lock, written back atomically."""
    d = net_dir()
    d.mkdir(parents=True, exist_ok=True)
    path = d / "leases.json"
    with (d / "leases.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            state: State = json.loads(path.read_text())
        except (OSError, ValueError):
            state = {}
        state.setdefault("leases", {})
        state.setdefault("bridges", {})
        try:
            yield state
        finally:
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(state, indent=1))
            tmp.replace(path)


def _ensure_bridge(cfg: Networking, state: State) -> None:
    """Under the lock. A bridge of someone else's is refused; a half-made one removed."""
    bridge, (net, gw) = cfg.bridge_name, _subnet(cfg)
    link = _links().get(bridge)
    if link is not None and link.get("ifalias") != BRIDGE_ALIAS:
        raise BackendError(f"a link named {bridge} exists and aiva did not make it",
                           hint="set networking.bridge_name to another name")
    try:
        if link is None:
            _check_overlap(net, bridge)
            _run("ip", "link", "add", bridge, "type", "bridge")
            _run("ip", "link", "set", "dev", bridge, "alias", BRIDGE_ALIAS)
        _run("ip", "addr", "replace", f"{gw}/{net.prefixlen}", "dev", bridge)
        _run("ip", "link", "set", "dev", bridge, "up")
        info = state["bridges"].setdefault(bridge, {"subnet": str(net)})
        info.setdefault("ip_forward_prev", IP_FORWARD.read_text().strip())
        if IP_FORWARD.read_text().strip() != "1":
            IP_FORWARD.write_text("1")
        _add_nat(bridge, net)
    except BaseException:
        if not any(v["bridge"] == bridge for v in state["leases"].values()):
            with contextlib.suppress(Exception):
                _remove_bridge(bridge, state)
        raise


def ensure_bridge(cfg: Networking | None = None) -> None:
    """Create (or repair) the bridge, its gateway address, forwarding and NAT."""
    check_host()
    with _locked() as state:
        _ensure_bridge(cfg or load_config().networking, state)


def _remove_bridge(bridge: str, state: State) -> None:
    if shutil.which("nft") and f"table ip aiva-{bridge}\n" in _run("nft", "list", "tables"):
        _run("nft", "delete", "table", "ip", f"aiva-{bridge}")
    for table in ("nat", "filter"):
        _ipt_purge(table, f"aiva:{bridge}")
    link = _links().get(bridge)
    if link is not None and link.get("ifalias") == BRIDGE_ALIAS:
        _run("ip", "link", "del", "dev", bridge)
    info = state["bridges"].pop(bridge, {})
    if info.get("ip_forward_prev") == "0" and not state["bridges"]:
        IP_FORWARD.write_text("0")  # we turned it on; the last one out turns it off


def _allocate(state: State, sandbox_id: str, net: ipaddress.IPv4Network, gw: str) -> str:
    mine = state["leases"].get(sandbox_id)
    if mine and mine["subnet"] == str(net):
        return str(mine["ip"])
    used = {lease["ip"] for lease in state["leases"].values() if lease["subnet"] == str(net)}
    for host in net.hosts():
        if str(host) != gw and str(host) not in used:
            return str(host)
    raise BackendError(f"no free address left in {net}",
                       hint="remove stopped VMs, or set networking.subnet to a larger range")


def _host_side(p: PortSpec) -> PortSpec:
    """Fail now, not later in the supervisor, if the host side cannot be bound; pick a free
    port where none was given."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in p.host_ip else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((p.host_ip, p.host_port or 0))
            return p.model_copy(update={"host_port": s.getsockname()[1]})
    except OSError as exc:
        raise BackendError(f"cannot publish {p}: {exc.strerror}",
                           hint="pick another host port or address") from None


def setup_vm_network(sandbox_id: str, mode: str = "nat", ports: list[PortSpec] | None = None,
                     cfg: Networking | None = None, *,
                     allow: dict[str, Any] | None = None) -> VmNetwork:
    """Lease an address and make the VM's TAP on the bridge (idempotent per sandbox).
    Mode ``allow``: the same, plus the egress rules for ``allow`` (``egress.pin``'s
    record), in place before this returns, so before the VM boots."""
    ports = list(ports or [])
    if mode not in MODES:
        raise InvalidValue(f"unknown network mode '{mode}'",
                           hint="use one of: none, nat, allow")
    if mode == "none":
        if ports:
            raise InvalidValue("ports cannot be published with `--network none`",
                               hint="drop the -p options, or use `--network nat`")
        return VmNetwork(sandbox_id)
    if any(p.protocol != "tcp" for p in ports):
        raise InvalidValue("a VM can publish TCP ports only", hint="drop the /udp mappings")
    check_host()
    if mode == "allow":
        egress.check_host()
    resolved = tuple(_host_side(p) for p in ports)
    cfg = cfg or load_config().networking
    (net, gw), bridge, tap = _subnet(cfg), cfg.bridge_name, tap_name(sandbox_id)
    with _locked() as state:
        _ensure_bridge(cfg, state)
        try:
            ip = _allocate(state, sandbox_id, net, gw)
            state["leases"][sandbox_id] = {"ip": ip, "subnet": str(net), "bridge": bridge,
                                           "tap": tap}
            old = _links().get(tap)
            if old is not None:
                if _alias_owner(old) != (sandbox_id, bridge):
                    raise BackendError(f"a link named {tap} exists and is not this VM's",
                                       hint="remove it with `ip link del " + tap + "`")
                _run("ip", "link", "del", "dev", tap)
            _run("ip", "tuntap", "add", "dev", tap, "mode", "tap")
            _run("ip", "link", "set", "dev", tap, "alias", f"aiva tap {sandbox_id} {bridge}")
            mac, table = guest_mac(sandbox_id), egress_table(bridge, sandbox_id)
            if mode == "allow":  # before the TAP is up: no moment without the rules
                egress.apply(egress.vm_ruleset(table, bridge, tap, mac, ip,
                                               egress.rules_of(allow)))
            else:
                egress.delete_tables(table)
            _run("ip", "link", "set", "dev", tap, "master", bridge, "up")
        except BaseException:
            _teardown(sandbox_id, state, bridge)
            raise
    return VmNetwork(sandbox_id, mode, tap, bridge, ip, net.prefixlen, gw, mac, resolved,
                     tuple((allow or {}).get("allow", [])) if mode == "allow" else ())


def _teardown(sandbox_id: str, state: State, bridge: str) -> None:
    lease = state["leases"].pop(sandbox_id, None)
    bridge = lease["bridge"] if lease else bridge
    egress.delete_tables(egress_table(bridge, sandbox_id))
    for name, link in _links().items():
        owner = _alias_owner(link)
        if owner is not None and owner[0] == sandbox_id:
            _run("ip", "link", "del", "dev", name, check=False)
    if lease and not any(v["bridge"] == bridge for v in state["leases"].values()):
        _remove_bridge(bridge, state)


def teardown_vm_network(sandbox_id: str, cfg: Networking | None = None) -> None:
    """Remove the VM's TAP and lease, and the bridge and NAT with the last VM. Idempotent."""
    cfg = cfg or load_config().networking
    with _locked() as state:
        if sandbox_id in state["leases"] or (shutil.which("ip") and any(
                (_alias_owner(link) or ("",))[0] == sandbox_id for link in _links().values())):
            _teardown(sandbox_id, state, cfg.bridge_name)  # else nothing of ours: no root needed


def reap_stale(live_ids: set[str] | list[str], cfg: Networking | None = None) -> list[str]:
    """After a crash: drop the leases, TAPs and rules of sandboxes that no longer exist."""
    cfg, live = cfg or load_config().networking, set(live_ids)
    if shutil.which("ip") is None:
        return []  # no `ip`: aiva cannot have made any link here
    with _locked() as state:
        bridges, links = {cfg.bridge_name, *state["bridges"]}, _links()
        dead = {sid for sid in state["leases"] if sid not in live}
        for link in links.values():
            owner = _alias_owner(link)
            if owner is not None and owner[1] in bridges and owner[0] not in live:
                dead.add(owner[0])
        for sid in dead:
            _teardown(sid, state, cfg.bridge_name)
        short = {sid[:8] for sid in live}
        for family, table in egress.tables():  # allow-list rules whose VM is gone
            for bridge in bridges:
                rest = table.removeprefix(f"aiva-{bridge}-")
                if family in ("bridge", "inet") and rest != table and len(rest) == 8 \
                        and all(c in "0123456789abcdef" for c in rest) and rest not in short:
                    egress.delete_tables(table)
        for bridge in bridges:
            idle = not any(v["bridge"] == bridge for v in state["leases"].values())
            if idle and (bridge in state["bridges"] or bridge in links):
                _remove_bridge(bridge, state)
    return sorted(dead)


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                other: asyncio.StreamWriter) -> None:
    try:
        while data := await src.read(1 << 16):
            dst.write(data)
            await dst.drain()
        if dst.can_write_eof():
            dst.write_eof()  # half-close: the other direction may still be talking
    except (ConnectionError, OSError):
        dst.close()
        other.close()


async def forward_port(host_ip: str, host_port: int, guest_ip: str,
                       guest_port: int) -> asyncio.Server:
    """Listen on host_ip:host_port (TCP) and relay each connection to the guest."""

    async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        try:
            gr, gw = await asyncio.wait_for(asyncio.open_connection(guest_ip, guest_port), 10)
        except (OSError, TimeoutError):
            cw.close()  # the guest does not listen (yet): the client sees the close
            return
        try:
            await asyncio.gather(_pipe(cr, gw, cw), _pipe(gr, cw, gw))
        finally:
            gw.close()
            cw.close()

    return await asyncio.start_server(handle, host_ip, host_port, reuse_address=True)


async def start_forwards(net: VmNetwork) -> list[asyncio.Server]:
    """All of a VM's published ports (``close()`` each to stop); on a failure none stays."""
    started: list[asyncio.Server] = []
    try:
        for p in net.ports:
            started.append(await forward_port(p.host_ip, p.host_port or 0, net.address,
                                              p.guest_port))
    except BaseException:
        for server in started:
            server.close()
        raise
    return started
