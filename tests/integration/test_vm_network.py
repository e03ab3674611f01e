"""VM networking on the real host, with network namespaces standing in for guests.

No VM boots here. Every test has its own bridge (``aiva-t<pid><n>``) and an unused
10.213.<n>.0/24 subnet, so a real aiva setup is never touched, and traffic goes only
between the host and namespaces the test made: nothing leaves the machine. Whatever a
test creates is removed in ``finally``, pass or fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from aiva.config import Networking
from aiva.errors import BackendError, BackendUnavailable, InvalidValue
from aiva.models import PortSpec
from aiva.network import vm_bridge as network

pytestmark = pytest.mark.vm
_count = iter(range(10**6))


def _sh(*argv: str, check: bool = True) -> str:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise AssertionError(f"{argv} failed: {r.stderr}")
    return r.stdout


def _links() -> dict[str, dict[str, Any]]:
    return {x["ifname"]: x for x in json.loads(_sh("ip", "-j", "-d", "link", "show"))}


def _ruleset() -> str:
    nft = _sh("nft", "list", "ruleset", check=False) if shutil.which("nft") else ""
    ipt = "".join(_sh("iptables", "-w", "-t", t, "-S", check=False) for t in ("nat", "filter")
                  ) if shutil.which("iptables") else ""
    return nft + ipt


def _leases() -> dict[str, Any]:
    try:
        return dict(json.loads((network.net_dir() / "leases.json").read_text())["leases"])
    except FileNotFoundError:
        return {}


@pytest.fixture(scope="module")
def host_ok() -> None:
    why = ("not root" if os.geteuid() != 0 else
           "no `ip`" if shutil.which("ip") is None else "")
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"CI needs root and iproute2 for the VM network tests ({why})")
        pytest.skip(f"VM network tests need root and iproute2 ({why})")


def _free_subnet(prefix: int) -> str:
    """A 10.213.n.0 network no route of this host touches (a real setup or another run)."""
    routes = json.loads(_sh("ip", "-j", "-4", "route", "show", "table", "all"))
    taken = [ipaddress.ip_network(r["dst"], strict=False) for r in routes
             if r.get("dst", "default") != "default"]
    start = os.getpid() % 250
    for i in range(250):
        net = ipaddress.ip_network(f"10.213.{(start + i) % 250 + 1}.0/{prefix}")
        if not any(net.overlaps(t) for t in taken):
            return str(net)
    raise AssertionError("no free 10.213.x.0 test subnet")


class Lab:
    """One test's bridge and subnet, and everything made on them, removed at the end."""

    def __init__(self, prefix: int = 24) -> None:
        n = next(_count)
        self.tag = f"{os.getpid() % 100000}{n}"
        self.cfg = Networking(bridge_name=f"aiva-t{self.tag}", subnet=_free_subnet(prefix))
        self.netns: list[str] = []
        self.links: list[str] = []
        self.procs: list[subprocess.Popen[str]] = []

    @property
    def bridge(self) -> str:
        return self.cfg.bridge_name

    def guest(self, sid: str, net: network.VmNetwork) -> str:
        """A namespace wired like a VM: a veth on the bridge (labelled as the VM's link),
        the leased address, and the default route via the gateway."""
        n = len(self.netns)
        ns, host_end = f"aiva-tns{self.tag}-{n}", f"aiva-tv{self.tag}{n}"
        _sh("ip", "netns", "add", ns)
        self.netns.append(ns)
        _sh("ip", "link", "add", host_end, "type", "veth", "peer", "name", f"{host_end}g")
        self.links.append(host_end)
        _sh("ip", "link", "set", "dev", host_end, "alias", f"aiva tap {sid} {self.bridge}")
        _sh("ip", "link", "set", "dev", host_end, "master", self.bridge, "up")
        _sh("ip", "link", "set", "dev", f"{host_end}g", "netns", ns, "name", "eth0")
        for cmd in (["addr", "add", f"{net.address}/{net.prefix}", "dev", "eth0"],
                    ["link", "set", "eth0", "up"], ["link", "set", "lo", "up"],
                    ["route", "add", "default", "via", net.gateway]):
            _sh("ip", "-n", ns, *cmd)
        return ns

    def run_in(self, ns: str, code: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", code],
                                stdout=subprocess.PIPE, text=True)
        self.procs.append(proc)
        return proc

    def cleanup(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()
        with contextlib.suppress(Exception):
            network.reap_stale([], self.cfg)
        for ns in self.netns:
            _sh("ip", "netns", "del", ns, check=False)
        for name, link in _links().items():
            if name in self.links or self.bridge in str(link.get("ifalias", "")).split() \
                    or name == self.bridge:
                _sh("ip", "link", "del", "dev", name, check=False)
        if shutil.which("nft"):
            _sh("nft", "delete", "table", "ip", f"aiva-{self.bridge}", check=False)
        for table in ("nat", "filter"):
            network._ipt_purge(table, f"aiva:{self.bridge}")


@pytest.fixture
def lab(host_ok: None) -> Iterator[Lab]:
    lab = Lab()
    try:
        yield lab
    finally:
        lab.cleanup()


def _assert_gone(lab: Lab, *sids: str) -> None:
    links = _links()
    assert lab.bridge not in links
    assert not [n for n, x in links.items() if lab.bridge in str(x.get("ifalias", ""))]
    assert not [s for s in sids if s in _leases()]
    rules = _ruleset()
    assert f"aiva-{lab.bridge}" not in rules and f"aiva:{lab.bridge}" not in rules


# ---------------------------------------------------------------- no root needed


def test_plan_without_network_and_names() -> None:
    sid = str(uuid.uuid4())
    none = network.setup_vm_network(sid, "none")
    assert none.qemu_args() == [] and none.kernel_args() == []
    with pytest.raises(InvalidValue):
        network.setup_vm_network(sid, "none", [PortSpec(guest_port=80)])
    with pytest.raises(InvalidValue):
        network.setup_vm_network(sid, "bridge")
    network.teardown_vm_network(sid)  # nothing of ours: a no-op, even twice
    network.teardown_vm_network(sid)
    mac = network.guest_mac(sid)
    first = int(mac[:2], 16)
    assert mac == network.guest_mac(sid) and first & 0b10 and not first & 0b01
    assert network.tap_name(sid) == f"aiva-{sid[:8]}" and len(network.tap_name(sid)) <= 15


def test_not_root_is_unavailable_with_a_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(BackendUnavailable) as exc:
        network.setup_vm_network(str(uuid.uuid4()), "nat")
    assert exc.value.hint and "--network none" in exc.value.hint


# ---------------------------------------------------------------- real host


def test_tap_made_attached_and_removed(lab: Lab) -> None:
    sid = str(uuid.uuid4())
    net = network.setup_vm_network(sid, "nat", [], lab.cfg)
    gw = str(next(ipaddress.ip_network(lab.cfg.subnet).hosts()))
    assert net.gateway == gw and net.address != gw and net.tap == network.tap_name(sid)
    assert net.kernel_args() == [f"aiva.ip={net.address}/24,{gw}"]
    assert net.qemu_args() == [
        "-netdev", f"tap,id=net0,ifname={net.tap},script=no,downscript=no",
        "-device", f"virtio-net-device,netdev=net0,mac={network.guest_mac(sid)}"]
    assert network.VmNetwork.from_dict(json.loads(json.dumps(net.to_dict()))) == net
    tap = _links()[net.tap]
    assert tap["linkinfo"]["info_kind"] == "tun" and tap["master"] == lab.bridge
    assert _leases()[sid]["ip"] == net.address
    addrs = json.loads(_sh("ip", "-j", "addr", "show", "dev", lab.bridge))[0]["addr_info"]
    assert f"{gw}/24" in [f"{a['local']}/{a['prefixlen']}" for a in addrs]
    rules = _ruleset()
    assert f"ip saddr {lab.cfg.subnet}" in rules and "masquerade" in rules
    if shutil.which("iptables") and "-P FORWARD DROP" in _sh("iptables", "-w", "-S", "FORWARD"):
        rule = f"-A FORWARD -i {lab.bridge} -m comment --comment aiva:{lab.bridge} -j ACCEPT"
        assert rule in rules.replace('"', "")
    assert network.setup_vm_network(sid, "nat", [], lab.cfg).address == net.address  # again
    with socket.create_server(("127.0.0.1", 0)) as busy, pytest.raises(BackendError):
        network.setup_vm_network(sid, "nat", [PortSpec(host_port=busy.getsockname()[1],
                                                       guest_port=80)], lab.cfg)

    network.teardown_vm_network(sid, lab.cfg)
    _assert_gone(lab, sid)
    network.teardown_vm_network(sid, lab.cfg)  # idempotent


def test_guest_traffic_and_port_forward(lab: Lab) -> None:
    sid = str(uuid.uuid4())
    net = network.setup_vm_network(sid, "nat", [PortSpec(guest_port=8080)], lab.cfg)
    (fwd,) = net.ports
    assert fwd.host_ip == "127.0.0.1" and fwd.host_port
    ns = lab.guest(sid, net)

    # guest -> gateway: a server of the test on the bridge address
    with socket.create_server((net.gateway, 0)) as srv:
        port = srv.getsockname()[1]
        client = lab.run_in(ns, f"import socket; socket.create_connection("
                                f"({net.gateway!r}, {port}), timeout=10).sendall(b'hi')")
        srv.settimeout(10)
        conn, peer = srv.accept()
        assert conn.recv(10) == b"hi" and peer[0] == net.address
        conn.close()
        assert client.wait(10) == 0

    # host -> guest, directly and through 127.0.0.1:HOST_PORT
    server = lab.run_in(ns, (
        "import socket\ns = socket.create_server(('0.0.0.0', 8080))\nprint('ready', flush=True)\n"
        "while True:\n c, a = s.accept(); c.sendall(b'guest got ' + c.recv(64)); c.close()\n"))
    assert server.stdout is not None and server.stdout.readline() == "ready\n"

    def ask(addr: tuple[str, int], msg: bytes) -> bytes:
        with socket.create_connection(addr, timeout=10) as c:
            c.sendall(msg)
            c.shutdown(socket.SHUT_WR)
            return b"".join(iter(lambda: c.recv(4096), b""))

    assert ask((net.address, 8080), b"direct") == b"guest got direct"
    started, stop = threading.Event(), threading.Event()

    async def forwards() -> None:  # as the VM's supervisor runs them
        servers = await network.start_forwards(net)
        started.set()
        while not stop.is_set():
            await asyncio.sleep(0.02)
        for s in servers:
            s.close()

    thread = threading.Thread(target=asyncio.run, args=(forwards(),))
    thread.start()
    try:
        assert started.wait(10) and fwd.host_port is not None
        for i in range(3):
            assert ask(("127.0.0.1", fwd.host_port), b"fwd%d" % i) == b"guest got fwd%d" % i
    finally:
        stop.set()
        thread.join(10)
    with pytest.raises(OSError):  # the forward is closed with its owner
        socket.create_connection(("127.0.0.1", fwd.host_port), timeout=2)

    network.teardown_vm_network(sid, lab.cfg)
    _assert_gone(lab, sid)
    assert not [x for x in lab.links if x in _links()]  # the veth went with the VM


_SETUP = """
import json, sys, time
from aiva.config import Networking
from aiva.network import vm_bridge as network
cfg = Networking(**json.loads(sys.argv[1]))
while time.time() < float(sys.argv[2]):
    time.sleep(0.001)
for sid in sys.argv[3:]:
    print(network.setup_vm_network(sid, "nat", [], cfg).address, flush=True)
"""


def _setup_in_processes(lab: Lab, groups: list[list[str]], *, crash: bool = False) -> list[str]:
    code = _SETUP + ("import os; os._exit(9)\n" if crash else "")
    at = str(time.time() + 1.5)  # all start together, after their imports
    procs = [subprocess.Popen([sys.executable, "-c", code, lab.cfg.model_dump_json(), at,
                               *sids], stdout=subprocess.PIPE, text=True) for sids in groups]
    outs = [p.communicate(timeout=60)[0] for p in procs]
    assert all(p.returncode == (9 if crash else 0) for p in procs)
    return [line for out in outs for line in out.split()]


def test_leases_unique_across_processes_and_exhaustion(host_ok: None) -> None:
    lab = Lab(prefix=29)  # 6 hosts: the gateway and exactly 5 guests
    sids = [str(uuid.uuid4()) for _ in range(5)]
    try:
        addrs = _setup_in_processes(lab, [[s] for s in sids])
        net = ipaddress.ip_network(lab.cfg.subnet)
        assert len(set(addrs)) == 5 and all(ipaddress.ip_address(a) in net for a in addrs)
        assert str(next(net.hosts())) not in addrs
        assert {_leases()[s]["ip"] for s in sids} == set(addrs)
        links = _links()
        assert all(links[network.tap_name(s)]["master"] == lab.bridge for s in sids)
        with pytest.raises(BackendError, match="no free address"):
            network.setup_vm_network(str(uuid.uuid4()), "nat", [], lab.cfg)
        for i, sid in enumerate(sids):
            network.teardown_vm_network(sid, lab.cfg)
            assert network.tap_name(sid) not in _links()
            assert (lab.bridge in _links()) == (i < 4)  # the bridge goes with the last VM
        _assert_gone(lab, *sids)
    finally:
        lab.cleanup()


def test_reap_stale_after_a_crash(lab: Lab) -> None:
    alive, dead = str(uuid.uuid4()), str(uuid.uuid4())
    _setup_in_processes(lab, [[alive, dead]], crash=True)
    dead_net = network.VmNetwork(dead, "nat", network.tap_name(dead), lab.bridge,
                                 _leases()[dead]["ip"], 24,
                                 str(next(ipaddress.ip_network(lab.cfg.subnet).hosts())))
    lab.guest(dead, dead_net)  # a second link of the dead VM
    assert network.reap_stale([alive], lab.cfg) == [dead]
    links = _links()
    assert network.tap_name(dead) not in links and dead not in _leases()
    assert not [x for x in lab.links if x in links]
    assert network.tap_name(alive) in links and alive in _leases() and lab.bridge in links
    assert network.reap_stale([], lab.cfg) == [alive]
    _assert_gone(lab, alive, dead)


def test_iptables_when_nft_is_missing(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    if shutil.which("iptables") is None:
        pytest.skip("no iptables here")
    which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda cmd, *a: None if cmd == "nft" else which(cmd, *a))
    sid = str(uuid.uuid4())
    network.setup_vm_network(sid, "nat", [], lab.cfg)
    nat = _sh("iptables", "-w", "-t", "nat", "-S", "POSTROUTING").replace('"', "")
    assert (f"-A POSTROUTING -s {lab.cfg.subnet} ! -o {lab.bridge} -m comment --comment "
            f"aiva:{lab.bridge} -j MASQUERADE") in nat
    assert f"aiva-{lab.bridge}" not in _sh("nft", "list", "tables")
    network.teardown_vm_network(sid, lab.cfg)
    monkeypatch.undo()
    _assert_gone(lab, sid)


def test_refuses_foreign_bridge_and_overlapping_subnet(lab: Lab) -> None:
    _sh("ip", "link", "add", lab.bridge, "type", "bridge")  # not ours: no aiva alias
    with pytest.raises(BackendError, match="did not make it"):
        network.ensure_bridge(lab.cfg)
    assert lab.bridge in _links()  # untouched
    _sh("ip", "link", "del", "dev", lab.bridge)

    other = f"aiva-td{lab.tag}"
    lab.links.append(other)
    _sh("ip", "link", "add", other, "type", "bridge")
    gw = next(ipaddress.ip_network(lab.cfg.subnet).hosts())
    _sh("ip", "addr", "add", f"{gw}/24", "dev", other)
    _sh("ip", "link", "set", "dev", other, "up")
    with pytest.raises(BackendError, match="overlaps"):
        network.setup_vm_network(str(uuid.uuid4()), "nat", [], lab.cfg)
    assert lab.bridge not in _links()
