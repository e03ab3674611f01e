"""Egress allow-lists: ``--network allow=HOST[,HOST...]``.

A sandbox in ``allow`` mode may open connections only to the listed destinations (and get
the replies); everything else it sends is dropped by the host, outside its reach: other
addresses, the host itself (its gateway, and so DNS), other sandboxes, IPv6.

- Parsing is pure (``check_network``: the spec's ``network`` string, validated and
  normalized). HOST is a host name, an IPv4 address or an IPv4 CIDR, each optionally
  with ``:PORT`` (TCP and UDP to that port only).
- Host names are resolved on the host when the sandbox is created, and pinned
  (:func:`pin`): the addresses go into the rules and into the sandbox's /etc/hosts, and
  stay the same for the sandbox's life, so a changed DNS answer never widens what it may
  reach. ``runtime["egress"]`` records them.
- Enforcement is nftables on the host: a table of aiva's own per sandbox. Drops there are
  final whatever any other table accepts. Docker (:func:`docker_ruleset`): the sandbox has
  a Docker network of its own whose bridge it alone is on, so ``iifname <bridge>`` is the
  sandbox. VMs (:func:`vm_ruleset`): the TAP is a port of aiva's bridge; a ``bridge``
  table pins the TAP to the VM's MAC and leased address (no spoofing, no IPv6 or other
  protocols) and filters what it sends to other ports of the bridge; an ``inet`` table
  filters, statefully, what it sends through the host (keyed by that pinned address).
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import shlex
import shutil
import socket
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from aiva.errors import BackendError, BackendUnavailable, InvalidValue

ALLOW = "allow="
HINT = ("write nat, none, or allow=HOST[,HOST...]: HOST a host name, an IPv4 address or "
        "CIDR, optionally :PORT")
_LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
_HOSTNAME = re.compile(rf"^{_LABEL}(\.{_LABEL})*$")
_NUMERIC = re.compile(r"^[0-9./]+$")
#: nft priorities: before the default filter chains (not that it matters for drops).
PRIORITY = "filter - 10"

Resolver = Callable[[str], list[str]]
Rule = tuple[ipaddress.IPv4Network, int | None]  # destination, port (None: any)


@dataclass(frozen=True)
class AllowEntry:
    """One HOST[:PORT] of an allow-list: a host name, or an IPv4 network (/32: one address)."""

    host: str
    port: int | None = None

    @property
    def is_name(self) -> bool:
        return not _NUMERIC.match(self.host)

    def __str__(self) -> str:
        return self.host + (f":{self.port}" if self.port else "")


@dataclass(frozen=True)
class NetworkPolicy:
    mode: Literal["nat", "none", "allow"]
    allow: tuple[AllowEntry, ...] = ()

    def __str__(self) -> str:
        return self.mode if self.mode != "allow" else ALLOW + ",".join(map(str, self.allow))


def _bad(entry: str, why: str) -> InvalidValue:
    return InvalidValue(f"--network allow: '{entry}' {why}", hint=HINT)


def parse_entry(text: str) -> AllowEntry:
    """'pypi.org', '10.1.2.3', '192.168.0.0/24:443' -> an entry (CIDRs normalized)."""
    entry = text.strip()
    if entry.startswith("[") or entry.count(":") > 1:
        raise _bad(entry, "is IPv6: allow-lists take IPv4 addresses and host names only")
    host, sep, port_text = entry.partition(":")
    port = None
    if sep:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise _bad(entry, f"has no valid port ('{port_text}'; 1-65535)")
        port = int(port_text)
    host = host.lower().rstrip(".")
    if not host:
        raise _bad(entry, "names no host")
    if _NUMERIC.match(host):
        try:
            net = ipaddress.IPv4Network(host)  # strict: 10.1.2.3/24 is refused
        except ValueError as exc:
            raise _bad(entry, f"is not an IPv4 address or CIDR ({exc})") from None
        return AllowEntry(str(net.network_address) if net.prefixlen == 32 else str(net), port)
    if len(host) > 253 or not _HOSTNAME.match(host):
        raise _bad(entry, "is not a host name, an IPv4 address or CIDR")
    return AllowEntry(host, port)


def parse_network(text: str) -> NetworkPolicy:
    """``nat``, ``none`` or ``allow=HOST[,HOST...]``; a bad one is a one-line InvalidValue."""
    text = text.strip()
    if text in ("nat", "none"):
        return NetworkPolicy(text)  # type: ignore[arg-type]
    if not text.startswith(ALLOW):
        raise InvalidValue(f"unknown network mode '{text}'", hint=HINT)
    entries: list[AllowEntry] = []
    for part in text.removeprefix(ALLOW).split(","):
        if part.strip():
            entry = parse_entry(part)
            if entry not in entries:
                entries.append(entry)
    if not entries:
        raise InvalidValue("--network allow= names no host",
                           hint="list at least one, or use `--network none` for no network")
    return NetworkPolicy("allow", tuple(entries))


def check_network(text: str) -> str:
    """The spec's ``network``, validated and normalized."""
    return str(parse_network(text))


def mode_of(text: str) -> Literal["nat", "none", "allow"]:
    return parse_network(text).mode


# ---------------------------------------------------------------------- pinning


def system_resolver(name: str) -> list[str]:
    """The host's answer (its resolver: /etc/hosts, DNS ...), IPv4 only."""
    infos = socket.getaddrinfo(name, None, socket.AF_INET, socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def pin(network: str, resolver: Resolver | None = None) -> dict[str, Any] | None:
    """Resolve the host names of an allow-list now: ``{"allow": ["NET[:PORT]", ...],
    "hosts": {name: [addresses]}}``, what the rules and /etc/hosts are made of (None
    unless ``network`` is an allow-list)."""
    policy = parse_network(network)
    if policy.mode != "allow":
        return None
    resolve = resolver or system_resolver
    hosts: dict[str, list[str]] = {}
    allow: list[str] = []
    for entry in policy.allow:
        if entry.is_name:
            if entry.host not in hosts:
                try:
                    found = resolve(entry.host)
                except (OSError, UnicodeError) as exc:
                    raise InvalidValue(f"--network allow: cannot resolve '{entry.host}' on "
                                       f"the host ({exc})",
                                       hint="check the name, or give its address") from None
                addrs = sorted({str(ipaddress.IPv4Address(a)) for a in found},
                               key=ipaddress.IPv4Address)
                if not addrs:
                    raise InvalidValue(f"--network allow: '{entry.host}' has no IPv4 address",
                                       hint="give an IPv4 address instead")
                hosts[entry.host] = addrs
            targets = hosts[entry.host]
        else:
            targets = [entry.host]
        for target in targets:
            rule = str(AllowEntry(target, entry.port))
            if rule not in allow:
                allow.append(rule)
    return {"allow": allow, "hosts": hosts}


def rules_of(pinned: dict[str, Any] | None) -> list[Rule]:
    """The pinned ``allow`` strings as (network, port) pairs."""
    rules: list[Rule] = []
    for text in (pinned or {}).get("allow", []):
        entry = parse_entry(text)
        rules.append((ipaddress.IPv4Network(entry.host), entry.port))
    return rules


def hosts_lines(pinned: dict[str, Any] | None) -> list[tuple[str, str]]:
    """(name, address) pairs for the sandbox's /etc/hosts."""
    return [(name, addr) for name, addrs in sorted((pinned or {}).get("hosts", {}).items())
            for addr in addrs]


def describe(pinned: dict[str, Any] | None) -> str:
    """One line for ``aiva status``: what the sandbox may reach, names with their pins."""
    if not pinned:
        return "-"
    names = [f"{n}={'|'.join(a)}" for n, a in sorted(pinned.get("hosts", {}).items())]
    return ", ".join(pinned.get("allow", [])) + (f" (pinned: {', '.join(names)})"
                                                 if names else "")


HOSTS_MARK = "# aiva allow-list"


def hosts_file(current: str, pinned: dict[str, Any] | None) -> str:
    """``current`` (an /etc/hosts) with aiva's pinned lines replaced by this pinning's."""
    kept = [ln for ln in current.splitlines() if not ln.endswith(HOSTS_MARK)]
    ours = [f"{addr}\t{name}\t{HOSTS_MARK}" for name, addr in hosts_lines(pinned)]
    return "\n".join(kept + ours) + "\n"


# ---------------------------------------------------------------------- nft rules


def _dest(net: ipaddress.IPv4Network) -> str:
    return str(net.network_address) if net.prefixlen == 32 else str(net)


def _accepts(match: str, rules: Iterable[Rule]) -> list[str]:
    out = []
    for net, port in rules:
        ports = f" meta l4proto {{ tcp, udp }} th dport {port}" if port else ""
        out.append(f"{match} ip daddr {_dest(net)}{ports} accept")
    return out


def _chain(name: str, hook: str, body: list[str], family: str = "inet") -> str:
    prio = PRIORITY if family == "inet" else "filter"
    lines = "".join(f"  {line}\n" for line in body)
    return (f" chain {name} {{\n  type filter hook {hook} priority {prio}; policy accept;\n"
            f"{lines} }}\n")


def _table(family: str, name: str, chains: list[str]) -> str:
    """Replace the table atomically (one transaction: never a moment without rules)."""
    return (f"add table {family} {name}\ndelete table {family} {name}\n"
            f"table {family} {name} {{\n{''.join(chains)}}}\n")


def _stateful(table: str, match: str, rules: list[Rule]) -> str:
    """What ``match`` sends through the host: replies, then the allowed, else dropped; and
    nothing to the host itself but replies (to its port forwards, for instance)."""
    est = f"{match} ct state established,related accept"
    return _table("inet", table, [
        _chain("forward", "forward", [est, *_accepts(match, rules), f"{match} drop"]),
        _chain("input", "input", [est, f"{match} drop"]),
    ])


def docker_ruleset(table: str, bridge: str, rules: list[Rule]) -> str:
    """A container alone on ``bridge``: everything it sends arrives on that interface."""
    return _stateful(table, f'iifname "{bridge}"', rules)


def vm_ruleset(table: str, bridge: str, tap: str, mac: str, address: str,
               rules: list[Rule]) -> str:
    """A VM on a port (``tap``) of aiva's ``bridge``, leased ``address``."""
    port = f'iifname "{tap}"'
    l2 = _table("bridge", table, [
        _chain("prerouting", "prerouting", [  # the TAP speaks as the VM only, IPv4 and ARP
            f"{port} ether saddr != {mac} drop",
            f"{port} ether type arp arp saddr ip != {address} drop",
            f"{port} ether type != {{ ip, arp }} drop",
            f"{port} ip saddr != {address} drop",
        ], "bridge"),
        _chain("forward", "forward", [  # to other ports of the bridge: stateless
            f"{port} ether type arp accept", *_accepts(port, rules), f"{port} drop",
        ], "bridge"),
    ])
    return l2 + _stateful(table, f'iifname "{bridge}" ip saddr {address}', rules)


# ---------------------------------------------------------------------- host side


def _run(*argv: str, stdin: str | None = None, check: bool = True) -> str:
    try:
        r = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BackendError(f"`{shlex.join(argv)}` failed: {exc}") from None
    if check and r.returncode != 0:
        raise BackendError(f"`{shlex.join(argv)}` failed: {r.stderr.strip()}")
    return r.stdout


def check_host() -> None:
    """Allow-lists are nftables rules: they need root and ``nft``."""
    import os

    if os.geteuid() != 0:
        raise BackendUnavailable("`--network allow=...` needs root: aiva enforces it with "
                                 "nftables rules on the host",
                                 hint="run aiva as root, or use `--network nat` / `none`")
    if shutil.which("nft") is None:
        raise BackendUnavailable("`nft` is missing: `--network allow=...` needs nftables",
                                 hint="install it: `sudo apt-get install nftables`")


def apply(ruleset: str) -> None:
    _run("nft", "-f", "-", stdin=ruleset)


def tables() -> list[tuple[str, str]]:
    """(family, name) of every nft table on the host ([] without nft)."""
    if shutil.which("nft") is None:
        return []
    found = []
    for line in _run("nft", "list", "tables", check=False).splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "table":
            found.append((parts[1], parts[2]))
    return found


def delete_tables(name: str) -> None:
    """Delete the tables called ``name`` (of any family); nothing else. Idempotent."""
    for family, table in tables():
        if table == name:
            _run("nft", "delete", "table", family, table, check=False)


def home_tag() -> str:
    """Six hex digits of this AIVA_HOME: names on the host say whose they are."""
    from aiva.paths import aiva_home

    return hashlib.sha256(str(aiva_home()).encode()).hexdigest()[:6]


# ---------------------------------------------------------------------- Docker's part


def docker_bridge(sandbox_id: str) -> str:
    return f"aivae{sandbox_id[:8]}"  # interface names are at most 15 characters


def docker_table(sandbox_id: str, tag: str | None = None) -> str:
    return f"aiva-eg-{tag or home_tag()}-{sandbox_id[:8]}"


def docker_comment(sandbox_id: str, tag: str | None = None) -> str:
    return f"aiva-eg:{tag or home_tag()}:{sandbox_id[:8]}"


def docker_user_rules(bridge: str, rules: list[Rule], comment: str) -> list[list[str]]:
    """``iptables -I DOCKER-USER`` arguments that let the allowed traffic (and its
    replies) pass Docker's isolation between its networks; they accept nothing the nft
    table drops, since that drop is final."""
    out = [["-o", bridge, "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED"]]
    for net, port in rules:
        if port is None:
            out.append(["-i", bridge, "-d", str(net)])
        else:
            out += [["-i", bridge, "-d", str(net), "-p", proto, "--dport", str(port)]
                    for proto in ("tcp", "udp")]
    return [[*r, "-m", "comment", "--comment", comment, "-j", "ACCEPT"] for r in out]


def _docker_user_exists() -> bool:
    return shutil.which("iptables") is not None and not subprocess.run(
        ["iptables", "-w", "-S", "DOCKER-USER"], capture_output=True, timeout=30).returncode


def purge_iptables(match: Callable[[str], bool]) -> None:
    """Delete the DOCKER-USER rules whose comment ``match`` accepts."""
    if not _docker_user_exists():
        return
    for line in _run("iptables", "-w", "-S", "DOCKER-USER", check=False).splitlines():
        args = shlex.split(line)
        if args[:1] == ["-A"] and "--comment" in args \
                and match(args[args.index("--comment") + 1]):
            _run("iptables", "-w", "-D", *args[1:], check=False)


def apply_docker(sandbox_id: str, pinned: dict[str, Any] | None) -> None:
    """(Re)make a Docker sandbox's rules; the same result however often it runs."""
    check_host()
    bridge, rules, comment = docker_bridge(sandbox_id), rules_of(pinned), \
        docker_comment(sandbox_id)
    apply(docker_ruleset(docker_table(sandbox_id), bridge, rules))
    purge_iptables(lambda c: c == comment)
    if _docker_user_exists():
        for args in reversed(docker_user_rules(bridge, rules, comment)):
            _run("iptables", "-w", "-I", "DOCKER-USER", "1", *args)


def remove_docker(sandbox_id: str) -> None:
    delete_tables(docker_table(sandbox_id))
    comment = docker_comment(sandbox_id)
    purge_iptables(lambda c: c == comment)


def reap_docker(known_short_ids: Callable[[], set[str]]) -> list[str]:
    """Remove the rules of this AIVA_HOME's sandboxes whose short id is not known (read
    after listing, so rules being made now are never hit); those of any other AIVA_HOME
    are never touched. Returns the short ids cleaned up."""
    import os

    if os.geteuid() != 0:
        return []
    prefix, cprefix = f"aiva-eg-{home_tag()}-", f"aiva-eg:{home_tag()}:"
    found = {name.removeprefix(prefix) for _, name in tables() if name.startswith(prefix)}
    if _docker_user_exists():
        for line in _run("iptables", "-w", "-S", "DOCKER-USER", check=False).splitlines():
            args = shlex.split(line)
            if "--comment" in args and args[args.index("--comment") + 1].startswith(cprefix):
                found.add(args[args.index("--comment") + 1].removeprefix(cprefix))
    gone = found - known_short_ids() if found else set()
    for short in gone:
        delete_tables(prefix + short)
    purge_iptables(lambda c: c.startswith(cprefix) and c.removeprefix(cprefix) in gone)
    return sorted(gone)
