"""Egress allow-lists on the real host: sandboxes reach what ``--network allow=...`` lists
and nothing else, on Docker and on a QEMU microVM, with the rules on the host.

Traffic goes only to loopback and to addresses this test made: its own HTTP servers
(containers on Docker's default bridge, labelled ``aiva.test.egress``), network
namespaces on a bridge of its own, the host side of the sandboxes' own networks, and the
sandboxes. No name is looked up in DNS: host names come from a hosts file the test
writes, which an ``aiva`` CLI run in a mount namespace of its own sees as /etc/hosts.
A dropped connection shows as a timeout; a reachable port with no listener as "refused".
Everything made is removed in ``finally``, pass or fail.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from aiva.config import Networking
from aiva.engine import lifetimes
from aiva.network import egress
from aiva.network import vm_bridge as network

pytestmark = pytest.mark.docker

AIVA = [sys.executable, "-m", "aiva.cli.main"]
LABEL = "aiva.test.egress"

#: An HTTP server on port 8000 that answers every GET with its name (argv[1]).
SERVER = (
    "import http.server, sys\n"
    "name = sys.argv[1].encode()\n"
    "class H(http.server.BaseHTTPRequestHandler):\n"
    "    def do_GET(self):\n"
    "        self.send_response(200)\n"
    "        self.send_header('Content-Length', str(len(name)))\n"
    "        self.end_headers()\n"
    "        self.wfile.write(name)\n"
    "    def log_message(self, *args):\n"
    "        pass\n"
    "http.server.HTTPServer(('0.0.0.0', int(sys.argv[2])), H).serve_forever()\n")

#: Run in a sandbox: tries every HOST:PORT (TCP, an HTTP GET) at once, 3 s each, and
#: sends one UDP datagram to each of ``udp``; prints {target: ok:BODY|refused|timeout|...}.
PROBE = r"""
import json, socket, sys, threading
tcp, udp = json.loads(sys.argv[1]), json.loads(sys.argv[2])
out = {}
def get(t):
    host, port = t.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=3) as c:
            c.sendall(b"GET / HTTP/1.0\r\nHost: " + host.encode() + b"\r\n\r\n")
            data = b""
            while True:
                chunk = c.recv(4096)
                if not chunk:
                    break
                data += chunk
        out[t] = "ok:" + data.split(b"\r\n\r\n", 1)[-1].decode()
    except ConnectionRefusedError:
        out[t] = "refused"
    except socket.timeout:
        out[t] = "timeout"
    except OSError as e:
        out[t] = "error:" + (e.strerror or str(e))
for t in udp:
    host, port = t.rsplit(":", 1)
    try:
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"ping", (host, int(port)))
    except OSError:
        pass
threads = [threading.Thread(target=get, args=(t,)) for t in tcp]
for th in threads:
    th.start()
for th in threads:
    th.join()
print(json.dumps(out))
"""


def _sh(*argv: str, check: bool = True) -> str:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if check and r.returncode != 0:
        raise AssertionError(f"{argv} failed: {r.stderr}")
    return r.stdout


def wait_for(cond: Callable[[], Any], timeout: float = 30, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or cond}")
        time.sleep(0.05)


def _http(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return str(resp.read().decode())
    except OSError:
        return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tables() -> list[str]:
    return [f"{f} {n}" for f, n in egress.tables()]


def _docker_user() -> str:
    return _sh("iptables", "-w", "-S", "DOCKER-USER", check=False)


@pytest.fixture(scope="module")
def root_ok() -> None:
    why = ("not root" if os.geteuid() != 0 else
           "no nft" if shutil.which("nft") is None else "")
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"CI needs root and nftables for the allow-list tests ({why})")
        pytest.skip(f"allow-lists need root and nftables ({why})")


@pytest.fixture(scope="module")
def servers(docker_ok: Any, python_image: str, root_ok: None) -> Iterator[dict[str, str]]:
    """Two HTTP servers of the test's own, A and B, on Docker's default bridge: name ->
    address. Removed at the end whatever happened."""
    made: list[Any] = []
    try:
        for name in ("A", "B"):
            made.append(docker_ok.containers.run(
                python_image, entrypoint=["python3", "-c", SERVER, name, "8000"], command=[],
                detach=True, labels={LABEL: str(os.getpid())},
                name=f"aiva-test-egress-{name}-{uuid.uuid4().hex[:6]}"))
        addrs = {}
        for name, c in zip(("A", "B"), made, strict=True):
            c.reload()
            addrs[name] = c.attrs["NetworkSettings"]["IPAddress"]
            wait_for(functools.partial(_http, f"http://{addrs[name]}:8000/"),
                     what=f"server {name}")
        yield addrs
    finally:
        for c in made:
            c.remove(force=True)


class HostListener:
    """A TCP and a UDP socket of the test on one host address: what reaches the host."""

    def __init__(self, address: str) -> None:
        self.tcp = socket.create_server((address, 0))
        self.port = self.tcp.getsockname()[1]
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind((address, self.port))
        self.address, self.hits = address, {"tcp": 0, "udp": 0}
        self._stop = False
        self._threads = [threading.Thread(target=self._serve, args=(k,), daemon=True)
                         for k in ("tcp", "udp")]
        for t in self._threads:
            t.start()

    @property
    def target(self) -> str:
        return f"{self.address}:{self.port}"

    def _serve(self, kind: str) -> None:
        sock = self.tcp if kind == "tcp" else self.udp
        sock.settimeout(0.2)
        while not self._stop:
            try:
                if kind == "tcp":
                    conn, _ = sock.accept()
                else:
                    sock.recvfrom(64)
            except OSError:
                continue
            self.hits[kind] += 1  # counted on arrival, whatever happens next
            if kind == "tcp":
                with conn, contextlib.suppress(OSError):  # read the request: closing on
                    conn.settimeout(5)                     # it unread would reset
                    conn.recv(1024)
                    conn.sendall(b"HTTP/1.0 200 OK\r\n\r\nhost")

    def close(self) -> None:
        self._stop = True
        for t in self._threads:
            t.join(5)
        self.tcp.close()
        self.udp.close()


@contextlib.contextmanager
def host_listener(address: str) -> Iterator[HostListener]:
    listener = HostListener(address)
    try:
        yield listener
    finally:
        listener.close()


def probe(run: Callable[[list[str]], str], tcp: list[str],
          udp: list[str] | None = None) -> dict[str, str]:
    out = run(["python3", "-c", PROBE, json.dumps(tcp), json.dumps(udp or [])])
    return dict(json.loads(out))


def in_sandbox(engine: Any, name: str) -> Callable[[list[str]], str]:
    def run(argv: list[str]) -> str:
        r = engine.exec(name, argv, timeout=60)
        assert r.exit_code == 0, r.stderr
        return str(r.stdout)
    return run


def _gateway(docker_ok: Any, sb: Any) -> str:
    c = docker_ok.containers.get(sb.info.runtime["container_id"])
    (net,) = c.attrs["NetworkSettings"]["Networks"].values()
    return str(net["Gateway"])


@contextlib.contextmanager
def no_disk_limit() -> Iterator[None]:
    """The CLI in a private mount namespace (for its own /etc/hosts) makes mounts the
    Docker engine cannot see, so aiva refuses to make a bounded disk there: for that run,
    the session's config says not to enforce one (restored after)."""
    import yaml

    cfg = Path(os.environ["AIVA_HOME"]) / "config.yaml"
    before = cfg.read_text() if cfg.exists() else None
    data = yaml.safe_load(before or "") or {}
    data.setdefault("defaults", {})["enforce_docker_disk"] = False
    cfg.write_text(yaml.safe_dump(data))
    try:
        yield
    finally:
        if before is None:
            cfg.unlink(missing_ok=True)
        else:
            cfg.write_text(before)


def aiva_cli(*args: str, hosts: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The CLI as a user runs it; with ``hosts``, in a mount namespace where that file is
    /etc/hosts and the host's resolver reads files only: names resolve on "the host",
    and no name is ever asked of a DNS server."""
    argv = [*AIVA, *args]
    if hosts is not None:
        nss = hosts.with_name("nsswitch.conf")
        nss.write_text("passwd: files\ngroup: files\nhosts: files\n")
        argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                'mount --bind "$0" /etc/hosts && mount --bind "$1" /etc/nsswitch.conf && '
                'shift && exec "$@"', str(hosts), str(nss), *argv]
    return subprocess.run(argv, capture_output=True, text=True, timeout=300)


# ---------------------------------------------------------------- Docker


def test_docker_sandbox_reaches_only_its_list(engine: Any, make_sandbox: Any, docker_ok: Any,
                                              servers: dict[str, str]) -> None:
    a, b = servers["A"], servers["B"]
    fwd = _free_port()
    listed = make_sandbox(network=f"allow={a}", ports=[f"{fwd}:8080"], memory="256MB")
    port_only = make_sandbox(network=f"allow={a}:8000", memory="256MB")
    none = make_sandbox(network="none", memory="256MB")
    nat = make_sandbox(memory="256MB")  # the control: everything is reachable from here
    gw = _gateway(docker_ok, listed)
    assert listed.info.runtime["egress"] == {"allow": [a], "hosts": {}}
    assert port_only.info.runtime["egress"] == {"allow": [f"{a}:8000"], "hosts": {}}
    assert "egress" not in nat.info.runtime and "egress" not in none.info.runtime

    with host_listener(gw) as host:
        tcp = [f"{a}:8000", f"{a}:8001", f"{b}:8000", host.target]
        seen = probe(in_sandbox(engine, nat.name), tcp, [host.target])
        assert seen == {f"{a}:8000": "ok:A", f"{a}:8001": "refused", f"{b}:8000": "ok:B",
                        host.target: "ok:host"}
        wait_for(lambda: host.hits == {"tcp": 1, "udp": 1}, what="the control's packets")

        seen = probe(in_sandbox(engine, listed.name), tcp, [host.target])
        assert seen == {f"{a}:8000": "ok:A", f"{a}:8001": "refused",  # every port of A
                        f"{b}:8000": "timeout", host.target: "timeout"}
        seen = probe(in_sandbox(engine, port_only.name), tcp, [host.target])
        assert seen == {f"{a}:8000": "ok:A", f"{a}:8001": "timeout",
                        f"{b}:8000": "timeout", host.target: "timeout"}
        seen = probe(in_sandbox(engine, none.name), tcp, [host.target])
        assert all(v.startswith("error:") for v in seen.values()), seen
        # the datagrams were sent 3 s before (the probes' timeouts): none arrived
        assert host.hits == {"tcp": 1, "udp": 1}

    # a published port still works: the replies to the host are let through
    listed.commands.run(["python3", "-c", SERVER, "listed", "8080"], background=True)
    assert wait_for(lambda: _http(f"http://127.0.0.1:{fwd}/"), what="the forward") == "listed"

    # the rules: an nft table, DOCKER-USER accepts past Docker's isolation, own bridge
    sid, bridge = port_only.id, egress.docker_bridge(port_only.id)
    table, comment = egress.docker_table(sid), egress.docker_comment(sid)
    assert f"inet {table}" in _tables()
    assert _docker_user().count(comment) == 3  # replies in; TCP and UDP to A:8000
    assert Path(f"/sys/class/net/{bridge}").exists()
    status = aiva_cli("status", port_only.name)
    assert status.returncode == 0 and f"allow {a}:8000" in status.stdout, status

    # stopped, its table flushed behind aiva's back, started again: all back, once
    engine.stop(port_only.name)
    _sh("nft", "delete", "table", "inet", table)
    engine.start(port_only.name)
    assert f"inet {table}" in _tables() and _docker_user().count(comment) == 3
    seen = probe(in_sandbox(engine, port_only.name), [f"{a}:8000", f"{b}:8000"])
    assert seen == {f"{a}:8000": "ok:A", f"{b}:8000": "timeout"}

    # rm: the table, the DOCKER-USER rules, the network and its bridge all go
    for sb in (listed, port_only):
        engine.delete(sb.name, volumes=True)
        assert f"inet {egress.docker_table(sb.id)}" not in _tables()
        assert egress.docker_comment(sb.id) not in _docker_user()
        assert not docker_ok.networks.list(filters={"label": f"aiva.sandbox_id={sb.id}"})
        assert not Path(f"/sys/class/net/{egress.docker_bridge(sb.id)}").exists()


def test_gvisor_sandbox_reaches_only_its_list(engine: Any, make_sandbox: Any, docker_ok: Any,
                                             gvisor_ok: None, servers: dict[str, str]) -> None:
    """Under gVisor (runsc --network=host here: the container's own namespace), the
    packets still cross the sandbox's bridge, so the same nft rules hold."""
    a, b = servers["A"], servers["B"]
    sb = make_sandbox(network=f"allow={a}:8000", memory="256MB", runtime="gvisor")
    assert sb.commands.run(["uname", "-r"]).stdout.strip() == "4.4.0"  # gVisor's kernel
    with host_listener(_gateway(docker_ok, sb)) as host:
        seen = probe(in_sandbox(engine, sb.name), [f"{a}:8000", f"{a}:8001", f"{b}:8000",
                                                   host.target], [host.target])
        assert seen == {f"{a}:8000": "ok:A", f"{a}:8001": "timeout", f"{b}:8000": "timeout",
                        host.target: "timeout"}
        assert host.hits == {"tcp": 0, "udp": 0}


def test_docker_host_names_are_pinned_and_bad_lists_refused(
        engine: Any, servers: dict[str, str], tmp_path: Path) -> None:
    a, b = servers["A"], servers["B"]
    hosts = tmp_path / "hosts"
    hosts.write_text(f"127.0.0.1 localhost\n{a} svc-a.test\n{b} svc-b.test\n")
    name = f"egress-{uuid.uuid4().hex[:6]}"
    try:
        with no_disk_limit():
            r = aiva_cli("start", name, "--memory", "256MB", "--network",
                         "allow=svc-a.test:8000", hosts=hosts)
        assert r.returncode == 0, r.stderr
        sb = engine.get(name)
        assert sb.spec.network == "allow=svc-a.test:8000"
        assert sb.runtime["egress"] == {"allow": [f"{a}:8000"], "hosts": {"svc-a.test": [a]}}
        run = in_sandbox(engine, name)
        assert f"{a}\tsvc-a.test" in run(["cat", "/etc/hosts"])  # Docker's extra_hosts
        assert probe(run, ["svc-a.test:8000", f"{b}:8000"]) == {
            "svc-a.test:8000": "ok:A", f"{b}:8000": "timeout"}
        # the other name is unknown inside: the sandbox has no DNS to ask
        assert probe(run, ["svc-b.test:8000"])["svc-b.test:8000"].startswith("error:")
        status = aiva_cli("status", name)  # outside the namespace: the pin is recorded
        assert f"(pinned: svc-a.test={a})" in status.stdout, status
    finally:
        if engine.exists(name):
            engine.delete(name, volumes=True)

    for bad, says in (("allow=10.0.0.1:99999", "'10.0.0.1:99999' has no valid port"),
                      ("allow=no.such.test", "cannot resolve 'no.such.test' on the host"),
                      ("allow=", "names no host")):
        r = aiva_cli("start", f"egress-bad-{uuid.uuid4().hex[:6]}", "--network", bad,
                     hosts=hosts)
        assert r.returncode != 0 and r.stderr.startswith("error:"), r
        assert says in r.stderr and "Traceback" not in r.stderr
    assert not [x for x in engine.list_all(reconcile=False) if x.name.startswith("egress-bad")]


def test_leftovers_of_this_home_are_reaped_and_nothing_else(
        engine: Any, make_sandbox: Any, docker_ok: Any, servers: dict[str, str]) -> None:
    sb = make_sandbox(network=f"allow={servers['A']}", memory="256MB")
    sid, table, comment = sb.id, egress.docker_table(sb.id), egress.docker_comment(sb.id)
    foreign_sid = str(uuid.uuid4())
    assert egress.home_tag() != "000000"
    foreign_table = f"aiva-eg-000000-{foreign_sid[:8]}"  # another AIVA_HOME's
    foreign_net = None
    try:
        _sh("nft", "add", "table", "inet", foreign_table)
        foreign_net = docker_ok.networks.create(
            f"aiva-test-egress-foreign-{foreign_sid[:6]}", driver="bridge",
            labels={"aiva.managed": "true", "aiva.home": "/elsewhere",
                    "aiva.purpose": "egress", "aiva.sandbox_id": foreign_sid, LABEL: "1"})
        engine.store.remove(sid)  # as after a crash: the row is gone, the rest is not
        done = lifetimes.tick(engine)
        assert {"sandbox_id": sid, "event": "reaped"} in done
        assert f"inet {table}" not in _tables() and comment not in _docker_user()
        assert not docker_ok.networks.list(filters={"label": f"aiva.sandbox_id={sid}"})
        assert not docker_ok.containers.list(all=True,
                                             filters={"label": f"aiva.sandbox_id={sid}"})
        assert f"inet {foreign_table}" in _tables()  # not this home's: untouched
        foreign_net.reload()
    finally:
        _sh("nft", "delete", "table", "inet", foreign_table, check=False)
        if foreign_net is not None:
            foreign_net.remove()
        for vol in docker_ok.volumes.list(filters={"label": f"aiva.sandbox_id={sid}"}):
            vol.remove(force=True)  # volumes are data: reaping leaves them


# ---------------------------------------------------------------- VMs


def _free_subnet() -> str:
    routes = json.loads(_sh("ip", "-j", "-4", "route", "show", "table", "all"))
    taken = [ipaddress.ip_network(r["dst"], strict=False) for r in routes
             if r.get("dst", "default") != "default"]
    start = (os.getpid() + 97) % 250
    for i in range(250):
        net = ipaddress.ip_network(f"10.213.{(start + i) % 250 + 1}.0/24")
        if not any(net.overlaps(t) for t in taken):
            return str(net)
    raise AssertionError("no free 10.213.x.0 test subnet")


def test_vm_rules_hold_against_a_guest_that_lies(root_ok: None, tmp_path: Path) -> None:
    """No VM boots: a namespace wired as the VM (its TAP's name, MAC and leased address)
    is the guest, two namespaces on the same bridge are the servers. Changing its address
    or MAC does not get it past the rules."""
    tag = f"{os.getpid() % 10000}{uuid.uuid4().hex[:2]}"
    cfg = Networking(bridge_name=f"aiva-e{tag}", subnet=_free_subnet())
    net_ = ipaddress.ip_network(cfg.subnet)
    hosts = list(net_.hosts())
    a, b = str(hosts[-2]), str(hosts[-3])  # the top: never leased before these few
    sid = str(uuid.uuid4())
    spaces: list[str] = []
    procs: list[subprocess.Popen[str]] = []

    def netns(name: str, address: str, mac: str | None = None, link: str | None = None) -> str:
        ns = f"aiva-te{tag}-{name}"
        host_end = link or f"aiva-te{tag}{name}"
        _sh("ip", "netns", "add", ns)
        spaces.append(ns)
        _sh("ip", "link", "add", host_end, "type", "veth", "peer", "name", f"{host_end}g")
        _sh("ip", "link", "set", "dev", host_end, "alias", f"aiva tap {sid} {cfg.bridge_name}")
        _sh("ip", "link", "set", "dev", host_end, "master", cfg.bridge_name, "up")
        _sh("ip", "link", "set", "dev", f"{host_end}g", "netns", ns, "name", "eth0")
        if mac:
            _sh("ip", "-n", ns, "link", "set", "eth0", "address", mac)
        for cmd in (["addr", "add", f"{address}/{net_.prefixlen}", "dev", "eth0"],
                    ["link", "set", "eth0", "up"], ["link", "set", "lo", "up"]):
            _sh("ip", "-n", ns, *cmd)
        return ns

    def serve(ns: str, name: str, port: int) -> None:
        proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", SERVER,
                                 name, str(port)], text=True)
        procs.append(proc)

    def in_ns(ns: str) -> Callable[[list[str]], str]:
        def run(argv: list[str]) -> str:
            argv = [sys.executable if argv[0] == "python3" else argv[0], *argv[1:]]
            return _sh("ip", "netns", "exec", ns, *argv)
        return run

    try:
        pinned = egress.pin(f"allow={a}:8000")
        vm = network.setup_vm_network(sid, "allow", [], cfg, allow=pinned)
        assert vm.mode == "allow" and vm.allow == (f"{a}:8000",)
        table = network.egress_table(cfg.bridge_name, sid)
        assert {f"bridge {table}", f"inet {table}"} <= set(_tables())
        # the guest: the TAP's name, on a veth into a namespace, as the VM would be
        _sh("ip", "link", "del", "dev", vm.tap)
        guest = netns("g", vm.address, vm.mac, link=vm.tap)
        _sh("ip", "-n", guest, "route", "add", "default", "via", vm.gateway)
        for name, address in (("a", a), ("b", b)):
            serve(netns(name, address), name.upper(), 8000)
        for address in (a, b):
            wait_for(functools.partial(_http, f"http://{address}:8000/"),
                     what=f"server {address}")

        with host_listener(vm.gateway) as host:
            targets = [f"{a}:8000", f"{a}:8001", f"{b}:8000", host.target]
            assert probe(in_ns(guest), targets, [host.target]) == {
                f"{a}:8000": "ok:A", f"{a}:8001": "timeout", f"{b}:8000": "timeout",
                host.target: "timeout"}
            assert host.hits == {"tcp": 0, "udp": 0}
            # the host may still open connections to the guest (port forwards do)
            serve(guest, "guest", 9000)
            assert wait_for(lambda: _http(f"http://{vm.address}:9000/")) == "guest"

            # another address: the bridge drops it, allowed destination or not
            spoof = str(hosts[-10])
            _sh("ip", "-n", guest, "addr", "flush", "dev", "eth0")
            _sh("ip", "-n", guest, "addr", "add", f"{spoof}/{net_.prefixlen}", "dev", "eth0")
            _sh("ip", "-n", guest, "route", "add", "default", "via", vm.gateway)
            assert probe(in_ns(guest), [f"{a}:8000", host.target]) == {
                f"{a}:8000": "timeout", host.target: "timeout"}
            _sh("ip", "-n", guest, "addr", "flush", "dev", "eth0")
            _sh("ip", "-n", guest, "addr", "add", f"{vm.address}/{net_.prefixlen}", "dev",
                "eth0")
            _sh("ip", "-n", guest, "route", "add", "default", "via", vm.gateway)
            # another MAC: dropped too
            _sh("ip", "-n", guest, "link", "set", "eth0", "address", "02:00:00:00:00:42")
            _sh("ip", "netns", "exec", guest, "ip", "neigh", "flush", "all")
            assert probe(in_ns(guest), [f"{a}:8000"]) == {f"{a}:8000": "timeout"}
            _sh("ip", "-n", guest, "link", "set", "eth0", "address", vm.mac)
            assert probe(in_ns(guest), [f"{a}:8000"]) == {f"{a}:8000": "ok:A"}  # itself: fine
            assert host.hits == {"tcp": 0, "udp": 0}

        network.teardown_vm_network(sid, cfg)
        assert not [t for t in _tables() if cfg.bridge_name in t]
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        with contextlib.suppress(Exception):
            network.reap_stale([], cfg)
        for ns in spaces:
            _sh("ip", "netns", "del", ns, check=False)
        links = json.loads(_sh("ip", "-j", "link", "show"))
        for link in links:
            if link["ifname"].startswith(f"aiva-te{tag}") or link["ifname"] == cfg.bridge_name:
                _sh("ip", "link", "del", "dev", link["ifname"], check=False)
        for t in _tables():
            if cfg.bridge_name in t:
                _sh("nft", "delete", "table", *t.split(), check=False)
        for t in ("nat", "filter"):
            network._ipt_purge(t, f"aiva:{cfg.bridge_name}")


@pytest.mark.vm
@pytest.mark.slow
def test_vm_reaches_only_its_list(engine: Any, servers: dict[str, str],
                                  tmp_path: Path) -> None:
    """A real microVM, made by the CLI with a host name from the test's hosts file: it
    reaches server A on the listed port through aiva's bridge, and nothing else."""
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    a, b = servers["A"], servers["B"]
    hosts = tmp_path / "hosts"
    hosts.write_text(f"127.0.0.1 localhost\n{a} svc-a.test\n")
    name, fwd = f"egress-vm-{uuid.uuid4().hex[:6]}", _free_port()
    try:
        r = aiva_cli("start", name, "--backend", "qemu", "--template", "minimal", "--memory",
                     "512MB", "--disk", "1GB", "-p", f"{fwd}:8080", "--network",
                     "allow=svc-a.test:8000", hosts=hosts)
        assert r.returncode == 0, r.stderr
        sb = engine.get(name)
        assert sb.runtime["egress"] == {"allow": [f"{a}:8000"], "hosts": {"svc-a.test": [a]}}
        vm = sb.runtime["network"]
        assert vm["mode"] == "allow" and vm["allow"] == [f"{a}:8000"]
        table = network.egress_table(vm["bridge"], sb.id)
        assert {f"bridge {table}", f"inet {table}"} <= set(_tables())
        run = in_sandbox(engine, name)
        assert f"{a}\tsvc-a.test\t{egress.HOSTS_MARK}" in run(["cat", "/etc/hosts"])

        with host_listener(vm["gateway"]) as host:
            seen = probe(run, ["svc-a.test:8000", f"{a}:8001", f"{b}:8000", host.target],
                         [host.target])
            assert seen == {"svc-a.test:8000": "ok:A", f"{a}:8001": "timeout",
                            f"{b}:8000": "timeout", host.target: "timeout"}
            assert host.hits == {"tcp": 0, "udp": 0}
        # its published port still works (the supervisor's forward gets the replies)
        engine.exec(name, ["python3", "-c", SERVER, "vm", "8080"], background=True)
        assert wait_for(lambda: _http(f"http://127.0.0.1:{fwd}/"), timeout=60) == "vm"

        engine.delete(name, volumes=True)
        assert not [t for t in _tables() if t.endswith(table)]
        assert not Path(f"/sys/class/net/{vm['tap']}").exists()
    finally:
        if engine.exists(name):
            engine.delete(name, volumes=True)
