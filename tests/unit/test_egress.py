"""Egress allow-lists without touching the host: parsing and validation, pinning with an
injected resolver (no name is ever looked up here), and the nft rules aiva would load
(checked by ``nft -c``, which changes nothing, where root and nft are at hand)."""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import subprocess

import pytest
from pydantic import ValidationError

from aiva.engine import Engine
from aiva.errors import InvalidValue
from aiva.models import SandboxSpec
from aiva.network import egress
from aiva.network import vm_bridge as network

SPEC = {"image": "aiva/python:latest", "cpus": 1, "memory": 1 << 29, "disk": 1 << 30}


@pytest.mark.parametrize(("given", "stored"), [
    ("nat", "nat"),
    ("none", "none"),
    ("allow=10.1.2.3", "allow=10.1.2.3"),
    ("allow=10.1.2.3/32", "allow=10.1.2.3"),
    ("allow=PyPI.org.,10.1.2.3,192.168.0.0/24:443", "allow=pypi.org,10.1.2.3,192.168.0.0/24:443"),
    ("allow= a.example , b-1.example:8080 ,", "allow=a.example,b-1.example:8080"),
    ("allow=10.1.2.3,10.1.2.3,10.1.2.3:80", "allow=10.1.2.3,10.1.2.3:80"),
    ("allow=0.0.0.0/0:443", "allow=0.0.0.0/0:443"),
    ("allow=db", "allow=db"),
])
def test_network_is_validated_and_normalized(given: str, stored: str) -> None:
    assert egress.check_network(given) == stored
    assert SandboxSpec.model_validate({**SPEC, "network": given}).network == stored
    assert egress.check_network(stored) == stored  # a stored spec reads back the same


@pytest.mark.parametrize(("given", "says"), [
    ("bridge", "unknown network mode 'bridge'"),
    ("allow", "unknown network mode 'allow'"),
    ("allow=", "names no host"),
    ("allow=,,", "names no host"),
    ("allow=10.1.2.300", "'10.1.2.300' is not an IPv4 address or CIDR"),
    ("allow=10.1.2.3/24", "'10.1.2.3/24' is not an IPv4 address or CIDR"),  # host bits
    ("allow=10.0.0.0/33", "'10.0.0.0/33' is not an IPv4"),
    ("allow=a.example:0", "'a.example:0' has no valid port"),
    ("allow=a.example:65536", "has no valid port"),
    ("allow=a.example:http", "has no valid port"),
    ("allow=a.example:", "has no valid port"),
    ("allow=:80", "':80' names no host"),
    ("allow=::1", "is IPv6"),
    ("allow=[2001:db8::1]:443", "is IPv6"),
    ("allow=-bad.example", "is not a host name"),
    ("allow=a..example", "is not a host name"),
    ("allow=under_score.example", "is not a host name"),
    ("allow=a.example/24", "is not a host name"),
    ("allow=" + "a" * 64 + ".example", "is not a host name"),
])
def test_bad_network_is_one_clear_line(given: str, says: str) -> None:
    with pytest.raises(InvalidValue) as exc:
        egress.check_network(given)
    assert says in str(exc.value) and "\n" not in str(exc.value)
    assert exc.value.hint
    with pytest.raises((ValidationError, InvalidValue)):
        SandboxSpec.model_validate({**SPEC, "network": given})


def test_build_spec_takes_the_string_form() -> None:
    """What the CLI, the daemon's API and `aiva mcp run` pass: one string."""
    eng = Engine()
    try:
        spec = eng.build_spec(backend="docker", network="allow=B.example:443,10.0.0.1")
        assert spec.network == "allow=b.example:443,10.0.0.1"
        assert eng.build_spec(backend="docker", network="none").network == "none"
        with pytest.raises(InvalidValue) as exc:
            eng.build_spec(backend="docker", network="allow=10.0.0.1:99999")
        assert str(exc.value) == "--network allow: '10.0.0.1:99999' has no valid port " \
                                 "('99999'; 1-65535)"
        with pytest.raises(InvalidValue, match="desktop sandbox needs a network"):
            eng.build_spec(backend="docker", template="desktop", network="none")
        assert eng.build_spec(backend="docker", template="desktop",
                              network="allow=10.0.0.1").network == "allow=10.0.0.1"
    finally:
        eng.close()


# ---------------------------------------------------------------- pinning


class Resolver:
    """Answers from a table, and counts what it was asked."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table, self.asked = table, []  # type: ignore[var-annotated]

    def __call__(self, name: str) -> list[str]:
        self.asked.append(name)
        if name not in self.table:
            raise OSError(-2, "Name or service not known")
        return self.table[name]


def test_pin_resolves_names_once_and_keeps_literals() -> None:
    dns = Resolver({"pkg.example": ["10.9.0.8", "10.9.0.7", "10.9.0.8"],
                    "db.example": ["10.9.1.1"]})
    pinned = egress.pin("allow=pkg.example:443,10.1.2.3,pkg.example:80,192.168.0.0/24:53,"
                        "db.example", dns)
    assert dns.asked == ["pkg.example", "db.example"]  # each name once
    assert pinned == {
        "allow": ["10.9.0.7:443", "10.9.0.8:443", "10.1.2.3", "10.9.0.7:80", "10.9.0.8:80",
                  "192.168.0.0/24:53", "10.9.1.1"],
        "hosts": {"pkg.example": ["10.9.0.7", "10.9.0.8"], "db.example": ["10.9.1.1"]},
    }
    assert egress.rules_of(pinned)[:3] == [
        (ipaddress.IPv4Network("10.9.0.7/32"), 443), (ipaddress.IPv4Network("10.9.0.8/32"), 443),
        (ipaddress.IPv4Network("10.1.2.3/32"), None)]
    assert egress.hosts_lines(pinned) == [("db.example", "10.9.1.1"),
                                          ("pkg.example", "10.9.0.7"),
                                          ("pkg.example", "10.9.0.8")]
    assert egress.describe(pinned).endswith(
        "(pinned: db.example=10.9.1.1, pkg.example=10.9.0.7|10.9.0.8)")
    assert egress.pin("nat", dns) is None and egress.pin("none", dns) is None


def test_pin_never_resolves_addresses_and_fails_clearly() -> None:
    nobody = Resolver({})
    assert egress.pin("allow=10.1.2.3:22,10.2.0.0/16", nobody) == {
        "allow": ["10.1.2.3:22", "10.2.0.0/16"], "hosts": {}}
    assert nobody.asked == []
    says = re.escape("cannot resolve 'gone.example' on the host")
    with pytest.raises(InvalidValue, match=says) as exc:
        egress.pin("allow=gone.example", nobody)
    assert "\n" not in str(exc.value)
    with pytest.raises(InvalidValue, match=re.escape("'v6only.example' has no IPv4 address")):
        egress.pin("allow=v6only.example", Resolver({"v6only.example": []}))


def test_hosts_file_replaces_only_its_own_lines() -> None:
    pinned = {"allow": ["10.9.0.7"], "hosts": {"pkg.example": ["10.9.0.7"]}}
    base = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n"
    once = egress.hosts_file(base, pinned)
    assert once == base + f"10.9.0.7\tpkg.example\t{egress.HOSTS_MARK}\n"
    assert egress.hosts_file(once, pinned) == once  # every boot: the same file
    assert egress.hosts_file(once, {"hosts": {}}) == base
    assert egress.hosts_file("", pinned) == f"10.9.0.7\tpkg.example\t{egress.HOSTS_MARK}\n"


# ---------------------------------------------------------------- rules


RULES = egress.rules_of({"allow": ["10.1.2.3", "192.168.0.0/24:443"]})


def _body(ruleset: str, family: str, chain: str) -> list[str]:
    """The rule lines of one chain of the generated text."""
    table = ruleset[ruleset.index(f"\ntable {family} "):]
    part = table[table.index(f" chain {chain} {{"):]
    lines = part[:part.index("\n }")].splitlines()[2:]
    return [ln.strip() for ln in lines]


def test_docker_rules_allow_only_the_list_and_never_the_host() -> None:
    text = egress.docker_ruleset("aiva-eg-abcdef-12345678", "aivae12345678", RULES)
    assert text.startswith("add table inet aiva-eg-abcdef-12345678\n"
                           "delete table inet aiva-eg-abcdef-12345678\n")  # atomic replace
    m = 'iifname "aivae12345678"'
    assert _body(text, "inet", "forward") == [
        f"{m} ct state established,related accept",
        f"{m} ip daddr 10.1.2.3 accept",
        f"{m} ip daddr 192.168.0.0/24 meta l4proto {{ tcp, udp }} th dport 443 accept",
        f"{m} drop"]
    assert _body(text, "inet", "input") == [f"{m} ct state established,related accept",
                                            f"{m} drop"]
    assert "hook forward priority filter - 10; policy accept;" in text


def test_vm_rules_pin_the_tap_to_the_vm_and_filter_both_paths() -> None:
    text = egress.vm_ruleset("aiva-br0-12345678", "br0", "aiva-12345678", "02:aa:bb:cc:dd:ee",
                             "172.16.0.5", RULES)
    tap, via = 'iifname "aiva-12345678"', 'iifname "br0" ip saddr 172.16.0.5'
    assert _body(text, "bridge", "prerouting") == [
        f"{tap} ether saddr != 02:aa:bb:cc:dd:ee drop",
        f"{tap} ether type arp arp saddr ip != 172.16.0.5 drop",
        f"{tap} ether type != {{ ip, arp }} drop",
        f"{tap} ip saddr != 172.16.0.5 drop"]
    assert _body(text, "bridge", "forward") == [
        f"{tap} ether type arp accept", f"{tap} ip daddr 10.1.2.3 accept",
        f"{tap} ip daddr 192.168.0.0/24 meta l4proto {{ tcp, udp }} th dport 443 accept",
        f"{tap} drop"]
    assert _body(text, "inet", "forward")[0] == f"{via} ct state established,related accept"
    assert _body(text, "inet", "forward")[-1] == f"{via} drop"
    assert _body(text, "inet", "input") == [f"{via} ct state established,related accept",
                                            f"{via} drop"]
    # nothing allowed at all: only replies, then the drop
    none = egress.vm_ruleset("t", "br0", "tap0", "02:00:00:00:00:01", "172.16.0.5", [])
    assert _body(none, "bridge", "forward") == ['iifname "tap0" ether type arp accept',
                                               'iifname "tap0" drop']


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("nft") is None,
                    reason="nft -c needs root and nft")
def test_rulesets_are_valid_nft() -> None:
    """`nft -c` parses and checks against the kernel, and changes nothing."""
    before = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    for text in (egress.docker_ruleset("aiva-eg-test-00000000", "aivae00000000", RULES),
                 egress.vm_ruleset("aiva-test-00000000", "aiva-tbr", "aiva-00000000",
                                   "02:00:00:00:00:01", "10.213.0.2", RULES)):
        r = subprocess.run(["nft", "-c", "-f", "-"], input=text, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    assert subprocess.run(["nft", "list", "tables"], capture_output=True,
                          text=True).stdout == before


def test_docker_user_rules_only_let_the_list_through_isolation() -> None:
    rules = egress.docker_user_rules("aivae12345678", RULES, "aiva-eg:abcdef:12345678")
    tail = ["-m", "comment", "--comment", "aiva-eg:abcdef:12345678", "-j", "ACCEPT"]
    assert rules == [
        ["-o", "aivae12345678", "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", *tail],
        ["-i", "aivae12345678", "-d", "10.1.2.3/32", *tail],
        ["-i", "aivae12345678", "-d", "192.168.0.0/24", "-p", "tcp", "--dport", "443", *tail],
        ["-i", "aivae12345678", "-d", "192.168.0.0/24", "-p", "udp", "--dport", "443", *tail]]


def test_names_fit_and_say_whose() -> None:
    sid = "0123abcd-0000-4000-8000-000000000000"
    assert egress.docker_bridge(sid) == "aivae0123abcd" and len(egress.docker_bridge(sid)) <= 15
    tag = egress.home_tag()
    assert len(tag) == 6 and egress.docker_table(sid) == f"aiva-eg-{tag}-0123abcd"
    assert egress.docker_comment(sid) == f"aiva-eg:{tag}:0123abcd"
    assert network.egress_table("aiva0", sid) == "aiva-aiva0-0123abcd"


def test_vm_network_record_keeps_the_allow_list() -> None:
    net = network.VmNetwork("sid", "allow", "tap0", "br0", "10.0.0.2", 24, "10.0.0.1",
                            "02:00:00:00:00:01", (), ("10.1.2.3", "10.2.0.0/16:443"))
    import json

    assert network.VmNetwork.from_dict(json.loads(json.dumps(net.to_dict()))) == net
    old = {k: v for k, v in net.to_dict().items() if k != "allow"}  # a launch.json of before
    assert network.VmNetwork.from_dict(old).allow == ()
