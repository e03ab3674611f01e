"""The Firecracker driver, checked against Firecracker's published API description.

No Firecracker binary runs here, so every request the driver sends goes to an
``httpx.MockTransport`` that records it, and each recorded request is validated against
the published Swagger 2.0 file, kept in ``tests/data``: the method and path must exist, and the JSON
body must validate against the operation's body schema, converted to JSON Schema (draft 4,
which Swagger 2.0 is built on) with every ``$ref`` resolved. Objects without an explicit
``additionalProperties`` are closed, as Firecracker's server rejects unknown fields
(serde ``deny_unknown_fields``), so a misspelt field fails here rather than on a real host.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import yaml
from pydantic import ValidationError

from aiva.config import Config
from aiva.errors import BackendError, BackendUnavailable, InvalidValue
from aiva.vm.firecracker_api import (
    FirecrackerAPI,
    JailerConfig,
    chroot_path,
    find_binaries,
    firecracker_command,
    jailer_command,
    kvm_usable,
)

SPEC_PATH = Path(
    os.environ.get("AIVA_FIRECRACKER_SPEC")
    or Path(__file__).resolve().parents[1] / "data" / "firecracker-api.yaml"
)
if not SPEC_PATH.is_file():
    if os.environ.get("CI"):
        raise RuntimeError(f"the Firecracker API description is missing: {SPEC_PATH}")
    pytest.skip(f"no Firecracker API description at {SPEC_PATH}", allow_module_level=True)


# ---------------------------------------------------------------------- the spec


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML follows YAML 1.1, where a bare Off/On/Yes/No is a boolean: the spec's
    Logger level enum ``[..., Trace, Off]`` would load as ``False``. Swagger files are
    YAML 1.2, where only true/false are booleans."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)

SPEC: dict[str, Any] = yaml.load(SPEC_PATH.read_text(), Loader=_Yaml12Loader)
DEFS: dict[str, Any] = SPEC["definitions"]

# Every keyword the converter handles; anything else in the spec fails a test, so a new
# Swagger keyword cannot slip through unvalidated.
SCHEMA_KEYWORDS = {"type", "properties", "required", "enum", "default", "description",
                   "items", "additionalProperties", "minimum", "maximum", "format", "$ref"}
SWAGGER_ONLY = {"readOnly", "example", "discriminator", "xml", "externalDocs"}


def to_json_schema(node: dict[str, Any], seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """Swagger 2.0 schema -> JSON Schema draft 4, $refs inlined, objects closed.

    It walks the schema structure rather than every dict, because ``Metrics`` has a
    *property named* ``properties`` that a naive walk would take for the keyword."""
    if "$ref" in node:  # siblings of $ref (descriptions here) are ignored, as in draft 4
        name = node["$ref"].removeprefix("#/definitions/")
        assert name not in seen, f"recursive $ref {name}"
        return to_json_schema(DEFS[name], (*seen, name))
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {prop: to_json_schema(sub, seen) for prop, sub in value.items()}
        elif key == "items":
            out[key] = to_json_schema(value, seen)
        elif key == "additionalProperties":
            out[key] = to_json_schema(value, seen) if isinstance(value, dict) else value
        elif key in SWAGGER_ONLY or key.startswith("x-"):
            continue
        else:
            assert key in SCHEMA_KEYWORDS, f"unhandled Swagger keyword {key!r}"
            out[key] = value
    if out.get("type") == "object" and "properties" in out:
        out.setdefault("additionalProperties", False)
    return out


def _template_regex(template: str) -> re.Pattern[str]:
    parts = re.split(r"\{(\w+)\}", template)
    rx = "".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>[^/]+)" for i, p in enumerate(parts))
    return re.compile(f"^{rx}$")


ROUTES = [(_template_regex(t), t, ops) for t, ops in SPEC["paths"].items()]


def operation(method: str, path: str) -> tuple[str, dict[str, Any], dict[str, str]]:
    for rx, template, ops in ROUTES:
        m = rx.match(path)
        if m:
            op = ops.get(method.lower())
            if op is None:
                raise LookupError(f"{method} is not defined for {template}")
            return template, op, m.groupdict()
    raise LookupError(f"no path in the spec matches {path}")


def body_param(op: dict[str, Any]) -> dict[str, Any] | None:
    return next((p for p in op.get("parameters", []) if p["in"] == "body"), None)


def _prose_rules(name: str, body: dict[str, Any]) -> list[str]:
    """Constraints the spec states in descriptions rather than in the schema."""
    errs = []
    if name == "SnapshotLoadParams" and ("mem_file_path" in body) == ("mem_backend" in body):
        errs.append("exactly one of mem_file_path / mem_backend must be present")
    if name == "Drive" and "socket" not in body:
        errs += [f"virtio-block needs {f}" for f in ("path_on_host", "is_read_only")
                 if f not in body]
    vcpus = body.get("vcpu_count", 1)
    if name == "MachineConfiguration" and body.get("smt") and isinstance(vcpus, int) \
            and vcpus > 1 and vcpus % 2:
        errs.append("with smt the vCPU count must be 1 or even")
    return errs


def spec_errors(
    method: str, path: str, body: Any = None, content_type: str | None = "application/json"
) -> list[str]:
    """Everything wrong with one request according to the spec; [] when it is valid."""
    try:
        template, op, path_params = operation(method, path)
    except LookupError as exc:
        return [str(exc)]
    errs: list[str] = []
    param = body_param(op)
    if param is None:
        if body is not None:
            errs.append(f"{method} {template} takes no body")
        return errs
    if body is None:
        return [f"{method} {template} requires a body"] if param.get("required") else []
    if content_type != "application/json":
        errs.append(f"content type {content_type!r}, the spec consumes application/json")
    schema = to_json_schema(param["schema"])
    validator = jsonschema.Draft4Validator(schema)
    errs += [f"{'/'.join(map(str, e.absolute_path)) or '<body>'}: {e.message}"
             for e in validator.iter_errors(body)]
    if isinstance(body, dict):
        name = param["schema"].get("$ref", "").removeprefix("#/definitions/")
        errs += _prose_rules(name, body)
        # Firecracker refuses a body whose id differs from the id in the path.
        errs += [f"path {k}={v!r} but body {k}={body.get(k)!r}"
                 for k, v in path_params.items() if k in body and body[k] != v]
    return errs


def response_schema(method: str, path: str, status: int = 200) -> dict[str, Any]:
    return to_json_schema(operation(method, path)[1]["responses"][status]["schema"])


# ---------------------------------------------------------------------- a fake VMM


@dataclass
class Sent:
    method: str
    path: str
    body: Any
    content_type: str | None


GET_ANSWERS: dict[str, Any] = {
    "/": {"app_name": "Firecracker", "id": "anonymous-instance", "state": "Not started",
          "vmm_version": "1.17.0-dev"},
    "/version": {"firecracker_version": "1.17.0-dev"},
    "/balloon/statistics": {"target_pages": 32768, "actual_pages": 32768, "target_mib": 128,
                            "actual_mib": 128, "free_memory": 1 << 28, "total_memory": 1 << 30},
}


@dataclass
class FakeFirecracker:
    """Records every request; answers 204, or the spec-shaped JSON above for GETs."""

    sent: list[Sent] = field(default_factory=list)
    checked: int = 0
    fail: dict[tuple[str, str], httpx.Response] = field(default_factory=dict)

    def handle(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        self.sent.append(Sent(request.method, request.url.path, body,
                              request.headers.get("content-type")))
        if (request.method, request.url.path) in self.fail:
            return self.fail[request.method, request.url.path]
        if request.method == "GET":
            return httpx.Response(200, json=GET_ANSWERS[request.url.path])
        return httpx.Response(204)

    def errors(self) -> list[str]:
        return [f"{s.method} {s.path} {json.dumps(s.body)}: {e}" for s in self.sent
                for e in spec_errors(s.method, s.path, s.body, s.content_type)]

    def validated(self) -> list[tuple[str, str]]:
        """Assert every request so far is valid; return (method, path) in order."""
        assert self.errors() == []
        self.checked = len(self.sent)
        return [(s.method, s.path) for s in self.sent]


@pytest.fixture
def fc() -> Iterator[tuple[FirecrackerAPI, FakeFirecracker]]:
    fake = FakeFirecracker()
    api = FirecrackerAPI("/nonexistent/fc.sock", transport=httpx.MockTransport(fake.handle))
    yield api, fake
    api.close()
    assert fake.errors() == [], "a request the driver sent does not match the spec"


# ---------------------------------------------------------------------- the spec itself


def test_spec_loads_as_yaml_1_2_and_every_keyword_is_handled() -> None:
    assert SPEC["swagger"] == "2.0" and SPEC["info"]["version"].startswith("1.17")
    assert DEFS["Logger"]["properties"]["level"]["enum"][-1] == "Off"  # not False
    assert yaml.safe_load("[Trace, Off]") == ["Trace", False]  # why the loader exists
    for name in DEFS:
        schema = to_json_schema({"$ref": f"#/definitions/{name}"})
        jsonschema.Draft4Validator.check_schema(schema)
    for name, d in DEFS.items():
        for prop, sub in d.get("properties", {}).items():
            if sub.get("type") == "string" and "enum" in sub:
                assert all(isinstance(v, str) for v in sub["enum"]), f"{name}.{prop}"


def test_fake_answers_match_the_spec() -> None:
    for path, answer in GET_ANSWERS.items():
        jsonschema.Draft4Validator(response_schema("GET", path)).validate(answer)


# ---------------------------------------------------------------------- the driver


def test_full_boot_sequence(fc: tuple[FirecrackerAPI, FakeFirecracker]) -> None:
    api, fake = fc
    api.put_logger("/run/fc.log", "Debug")
    api.put_metrics("/run/fc.metrics")
    api.put_machine_config(vcpu_count=2, mem_size_mib=1024, smt=False, track_dirty_pages=True)
    api.put_boot_source("/vmlinux", boot_args="console=ttyS0 reboot=k panic=1",
                        initrd_path="/initrd.img")
    api.put_drive("rootfs", "/rootfs.ext4", is_root_device=True, is_read_only=True)
    api.put_drive("data", "/data.ext4", is_root_device=False, is_read_only=False,
                  cache_type="Writeback", io_engine="Async")
    api.put_network_interface("eth0", "tap0", guest_mac="06:00:ac:10:00:02")
    api.put_vsock(guest_cid=3, uds_path="/run/v.sock")
    api.put_balloon(amount_mib=0, deflate_on_oom=True, stats_polling_interval_s=1)
    api.start()
    assert fake.validated() == [
        ("PUT", "/logger"), ("PUT", "/metrics"), ("PUT", "/machine-config"),
        ("PUT", "/boot-source"), ("PUT", "/drives/rootfs"), ("PUT", "/drives/data"),
        ("PUT", "/network-interfaces/eth0"), ("PUT", "/vsock"), ("PUT", "/balloon"),
        ("PUT", "/actions"),
    ]
    root, data = fake.sent[4].body, fake.sent[5].body
    assert root["is_read_only"] is True and root["cache_type"] == "Unsafe"
    assert "io_engine" not in root and data["io_engine"] == "Async"
    assert fake.sent[-1].body == {"action_type": "InstanceStart"}
    assert fake.sent[7].body == {"guest_cid": 3, "uds_path": "/run/v.sock"}  # no vsock_id


def test_minimal_optional_fields_are_left_out(fc: tuple[FirecrackerAPI, FakeFirecracker]) -> None:
    api, fake = fc
    api.put_boot_source("/vmlinux")
    api.put_network_interface("eth0", "tap0")
    api.put_logger("/log", "Off")
    fake.validated()
    assert fake.sent[0].body == {"kernel_image_path": "/vmlinux"}
    assert fake.sent[1].body == {"iface_id": "eth0", "host_dev_name": "tap0"}


def test_pause_resume_actions(fc: tuple[FirecrackerAPI, FakeFirecracker]) -> None:
    api, fake = fc
    api.pause()
    api.resume()
    api.send_ctrl_alt_del()
    api.flush_metrics()
    assert fake.validated() == [("PATCH", "/vm"), ("PATCH", "/vm"),
                                ("PUT", "/actions"), ("PUT", "/actions")]
    assert [s.body for s in fake.sent] == [
        {"state": "Paused"}, {"state": "Resumed"},
        {"action_type": "SendCtrlAltDel"}, {"action_type": "FlushMetrics"},
    ]


def test_snapshot_create_and_load(fc: tuple[FirecrackerAPI, FakeFirecracker]) -> None:
    api, fake = fc
    api.pause()
    api.create_snapshot("/snap/vm.state", "/snap/vm.mem")
    api.create_snapshot("/snap/d.state", "/snap/d.mem", snapshot_type="Diff")
    api.load_snapshot("/snap/vm.state", "/snap/vm.mem", resume_vm=True)
    assert fake.validated()[1:] == [("PUT", "/snapshot/create"), ("PUT", "/snapshot/create"),
                                    ("PUT", "/snapshot/load")]
    assert fake.sent[-1].body == {
        "snapshot_path": "/snap/vm.state", "resume_vm": True,
        "mem_backend": {"backend_type": "File", "backend_path": "/snap/vm.mem"},
    }


def test_balloon_and_describe(fc: tuple[FirecrackerAPI, FakeFirecracker]) -> None:
    api, fake = fc
    api.patch_balloon(256)
    assert api.balloon_stats()["actual_mib"] == 128
    info = api.describe_instance()
    assert info["state"] == "Not started" and info["app_name"] == "Firecracker"
    assert api.version() == "1.17.0-dev"
    assert fake.validated() == [("PATCH", "/balloon"), ("GET", "/balloon/statistics"),
                                ("GET", "/"), ("GET", "/version")]
    assert fake.sent[0].body == {"amount_mib": 256}
    assert all(s.body is None for s in fake.sent[1:])


def test_ids_that_firecracker_would_refuse_are_refused_first() -> None:
    api = FirecrackerAPI("/x", transport=httpx.MockTransport(lambda r: httpx.Response(204)))
    for bad in ("root/fs", "", "a b", "rootfs\n", "é"):
        with pytest.raises(InvalidValue):
            api.put_drive(bad, "/r", is_root_device=True, is_read_only=True)
    with pytest.raises(InvalidValue):
        api.put_network_interface("eth-0", "tap0")


# ---------------------------------------------------------------------- the validator fails


GOOD_DRIVE = {"drive_id": "rootfs", "path_on_host": "/r", "is_root_device": True,
              "is_read_only": True}


@pytest.mark.parametrize(
    ("method", "path", "body", "why"),
    [
        ("PUT", "/drives/rootfs", {**GOOD_DRIVE, "cache_type": "WriteThrough"}, "enum"),
        ("PUT", "/drives/rootfs", {**GOOD_DRIVE, "io_engine": "sync"}, "enum, case"),
        ("PUT", "/drives/rootfs", {k: v for k, v in GOOD_DRIVE.items() if k != "is_root_device"},
         "required"),
        ("PUT", "/drives/rootfs", {k: v for k, v in GOOD_DRIVE.items() if k != "path_on_host"},
         "required by description"),
        ("PUT", "/drives/other", GOOD_DRIVE, "path id differs from body id"),
        ("PUT", "/drives/rootfs", {**GOOD_DRIVE, "read_only": True}, "unknown field"),
        ("PUT", "/machine-config", {"vcpu_count": "2", "mem_size_mib": 128}, "type"),
        ("PUT", "/machine-config", {"vcpu_count": 2.0, "mem_size_mib": 128}, "float integer"),
        ("PUT", "/machine-config", {"vcpu_count": 33, "mem_size_mib": 128}, "maximum"),
        ("PUT", "/machine-config", {"vcpu_count": 0, "mem_size_mib": 128}, "minimum"),
        ("PUT", "/machine-config", {"vcpu_count": 3, "mem_size_mib": 128, "smt": True}, "smt"),
        ("PUT", "/machine-config", {"vcpu_count": 1}, "required"),
        ("PUT", "/vsock", {"guest_cid": 2, "uds_path": "/v"}, "minimum cid"),
        ("PUT", "/actions", {"action_type": "Start"}, "enum"),
        ("PUT", "/actions", None, "required body"),
        ("PUT", "/logger", {"level": "Verbose"}, "enum"),
        ("PUT", "/snapshot/load", {"snapshot_path": "/s", "mem_file_path": "/m",
                                   "mem_backend": {"backend_type": "File", "backend_path": "/m"}},
         "both mem fields"),
        ("PUT", "/snapshot/load", {"snapshot_path": "/s"}, "no mem field"),
        ("PUT", "/snapshot/load", {"snapshot_path": "/s",
                                   "mem_backend": {"backend_type": "Disk", "backend_path": "/m"}},
         "nested enum through $ref"),
        ("PUT", "/metrics", {"metrics_path": "/m", "properties": {"a": 1}},
         "additionalProperties schema of a property named 'properties'"),
        ("GET", "/", {"x": 1}, "body on GET"),
        ("DELETE", "/vm", None, "method"),
        ("PUT", "/drive/rootfs", GOOD_DRIVE, "path"),
    ],
)
def test_validator_rejects(method: str, path: str, body: Any, why: str) -> None:
    assert spec_errors(method, path, body), why


def test_validator_accepts_what_the_spec_allows() -> None:
    assert spec_errors("PUT", "/drives/rootfs", GOOD_DRIVE) == []
    assert spec_errors("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 128}) == []
    assert spec_errors("PUT", "/metrics", {"metrics_path": "/m", "properties": {"a": "b"}}) == []
    assert spec_errors("PUT", "/mmds", {"anything": {"goes": [1]}}) == []  # explicitly open
    assert spec_errors("PUT", "/machine-config", None) == []  # body not required there
    assert spec_errors("PATCH", "/balloon/hinting/stop") == []
    assert spec_errors("PUT", "/drives/rootfs", GOOD_DRIVE, "text/plain")


def test_driver_request_with_a_wrong_enum_fails_validation() -> None:
    fake = FakeFirecracker()
    with FirecrackerAPI("/x", transport=httpx.MockTransport(fake.handle)) as api:
        api.put_drive("rootfs", "/r", is_root_device=True, is_read_only=True,
                      cache_type="Writethrough")  # type: ignore[arg-type]
        api.pause()
    errs = fake.errors()
    assert len(errs) == 1 and "cache_type" in errs[0] and "Writethrough" in errs[0]


# ---------------------------------------------------------------------- errors


def test_fault_message_becomes_backend_error(fc: tuple[FirecrackerAPI, FakeFirecracker]) -> None:
    api, fake = fc
    fault = "Invalid block device path: /r. No such file or directory"
    fake.fail["PUT", "/drives/rootfs"] = httpx.Response(400, json={"fault_message": fault})
    with pytest.raises(BackendError) as info:
        api.put_drive("rootfs", "/r", is_root_device=True, is_read_only=True)
    assert not isinstance(info.value, BackendUnavailable)
    assert fault in str(info.value) and "PUT /drives/rootfs" in str(info.value)
    assert "400" in str(info.value) and info.value.hint
    jsonschema.Draft4Validator(response_schema("PUT", "/drives/rootfs", 400)).validate(
        {"fault_message": fault})


def test_server_error_without_json(fc: tuple[FirecrackerAPI, FakeFirecracker]) -> None:
    api, fake = fc
    fake.fail["PATCH", "/vm"] = httpx.Response(500, text="boom")
    with pytest.raises(BackendError, match=r"PATCH /vm failed \(500\): boom"):
        api.pause()


@pytest.mark.parametrize(
    ("exc", "kind"),
    [(httpx.ReadTimeout("slow"), BackendError),
     (httpx.RemoteProtocolError("closed"), BackendUnavailable)],
)
def test_transport_failures(exc: Exception, kind: type[BackendError]) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    with FirecrackerAPI("/x", transport=httpx.MockTransport(handler)) as api, \
            pytest.raises(kind) as info:
        api.start()
    assert type(info.value) is kind and info.value.hint


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """Unix socket paths must stay under 108 bytes; pytest's tmp_path may not."""
    path = Path(tempfile.mkdtemp(prefix="fc"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_connection_refused_is_backend_unavailable(short_dir: Path) -> None:
    sock_path = str(short_dir / "fc.sock")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(sock_path)  # a real socket file that nobody listens on
    with socket.socket(socket.AF_UNIX) as probe:
        assert probe.connect_ex(sock_path) == errno.ECONNREFUSED
    with FirecrackerAPI(sock_path, timeout=2) as api, pytest.raises(BackendUnavailable) as info:
        api.describe_instance()
    assert sock_path in str(info.value) and "GET /" in str(info.value)
    assert info.value.hint and "running" in info.value.hint
    assert info.value.recoverable


def test_missing_socket_is_backend_unavailable(short_dir: Path) -> None:
    with FirecrackerAPI(str(short_dir / "none.sock")) as api, pytest.raises(BackendUnavailable):
        api.start()


# ---------------------------------------------------------------------- jailer

# The flags docs/jailer.md documents for the jailer itself (before "--").
JAILER_FLAGS = {"--id", "--exec-file", "--uid", "--gid", "--parent-cgroup", "--cgroup-version",
                "--cgroup", "--chroot-base-dir", "--netns", "--resource-limit", "--daemonize",
                "--new-pid-ns"}
VM_ID = "551e7604-e35c-42b3-b825-416853441234"


def test_jailer_command_full() -> None:
    cfg = JailerConfig(id=VM_ID, exec_file="/usr/bin/firecracker", uid=123, gid=100,
                       netns="/var/run/netns/my_netns", cgroup_version=2,
                       cgroups={"cpu.max": "50000 100000", "memory.max": "1073741824"},
                       daemonize=True, new_pid_ns=True)
    argv = jailer_command(cfg, "/usr/bin/jailer", api_sock="/run/firecracker.socket")
    assert argv == [
        "/usr/bin/jailer", "--id", VM_ID, "--exec-file", "/usr/bin/firecracker",
        "--uid", "123", "--gid", "100", "--chroot-base-dir", "/srv/jailer",
        "--netns", "/var/run/netns/my_netns", "--cgroup-version", "2",
        "--cgroup", "cpu.max=50000 100000", "--cgroup", "memory.max=1073741824",
        "--daemonize", "--new-pid-ns", "--", "--api-sock", "/run/firecracker.socket",
    ]
    jailer_part = argv[1:argv.index("--")]
    assert {a for a in jailer_part if a.startswith("--")} <= JAILER_FLAGS
    assert "--id" not in argv[argv.index("--"):]  # the jailer passes --id itself


def test_jailer_command_minimal_and_chroot() -> None:
    cfg = JailerConfig(id="vm1", exec_file="/opt/fc/firecracker-v1.17.0-x86_64", uid=0, gid=0,
                       chroot_base_dir=Path("/var/lib/aiva/jail"), cgroup_version=1)
    argv = jailer_command(cfg, "jailer")
    assert argv == ["jailer", "--id", "vm1", "--exec-file", "/opt/fc/firecracker-v1.17.0-x86_64",
                    "--uid", "0", "--gid", "0", "--chroot-base-dir", "/var/lib/aiva/jail",
                    "--cgroup-version", "1", "--", "--api-sock", "/run/firecracker.socket"]
    assert chroot_path(cfg) == Path("/var/lib/aiva/jail/firecracker-v1.17.0-x86_64/vm1/root")
    default = JailerConfig(id=VM_ID, exec_file="/usr/bin/firecracker", uid=1, gid=1)
    assert chroot_path(default) == Path(f"/srv/jailer/firecracker/{VM_ID}/root")
    assert firecracker_command("/usr/bin/firecracker", "/tmp/a.sock") == [
        "/usr/bin/firecracker", "--api-sock", "/tmp/a.sock"]


@pytest.mark.parametrize(
    "changes",
    [{"id": "has_underscore"}, {"id": "x" * 65}, {"id": ""}, {"exec_file": "/usr/bin/qemu"},
     {"uid": -1}, {"cgroup_version": 3}, {"cgroups": {"cpu max": "1"}},
     {"cgroups": {"memory.max=1": "2"}}, {"seccomp_level": 2}],
)
def test_jailer_config_refuses(changes: dict[str, Any]) -> None:
    base: dict[str, Any] = {"id": "vm1", "exec_file": "/usr/bin/firecracker", "uid": 1, "gid": 1}
    with pytest.raises(ValidationError):
        JailerConfig(**{**base, **changes})


# ---------------------------------------------------------------------- host checks


def _exe(path: Path) -> str:
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    return str(path)


def _config(fc_bin: str, jailer: str) -> Config:
    return Config.model_validate(
        {"platform": {"linux": {"firecracker_binary": fc_bin, "jailer_binary": jailer}}})


def test_find_binaries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fc_bin, jailer = _exe(tmp_path / "firecracker"), _exe(tmp_path / "jailer")
    monkeypatch.setenv("PATH", "/nonexistent")
    assert find_binaries(_config(fc_bin, jailer)) == (fc_bin, jailer)
    monkeypatch.setenv("PATH", str(tmp_path))  # configured paths missing: found on PATH
    assert find_binaries(_config("/no/firecracker", "jailer")) == (fc_bin, jailer)


@pytest.mark.parametrize("missing", ["firecracker", "jailer"])
def test_find_binaries_missing(
    missing: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    names = {"firecracker": "firecracker", "jailer": "jailer"}
    for name in names:
        if name != missing:
            _exe(tmp_path / name)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(BackendUnavailable) as info:
        find_binaries(_config("/no/firecracker", "/no/jailer"))
    assert f"no {missing} binary" in str(info.value)
    assert info.value.hint == f"install it and set platform.linux.{missing}_binary"


def test_kvm_usable(tmp_path: Path) -> None:
    ok, why = kvm_usable(str(tmp_path / "kvm"))
    assert not ok and "does not exist" in why
    ok, why = kvm_usable(str(tmp_path))  # a directory cannot be opened read-write
    assert not ok and "cannot open" in why
    (tmp_path / "dev").write_bytes(b"")
    assert kvm_usable(str(tmp_path / "dev")) == (True, "")
    ok, why = kvm_usable()
    assert isinstance(ok, bool) and (ok or why)


# ---------------------------------------------------------------------- the real binary

FIRECRACKER = shutil.which("firecracker")
KVM_OK, KVM_WHY = kvm_usable()
NO_REAL = (
    "no firecracker binary on PATH" if FIRECRACKER is None
    else f"KVM is not usable: {KVM_WHY}" if not KVM_OK else ""
)


def _wait_for(check: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.skipif(bool(NO_REAL), reason=NO_REAL or "runs")
def test_real_firecracker_describe_instance(short_dir: Path) -> None:
    assert FIRECRACKER is not None
    sock = short_dir / "fc.sock"
    proc = subprocess.Popen(firecracker_command(FIRECRACKER, str(sock)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert _wait_for(sock.exists, 10), "firecracker did not create its API socket"
        with FirecrackerAPI(str(sock)) as api:
            info = api.describe_instance()
            version = api.version()
        jsonschema.Draft4Validator(response_schema("GET", "/")).validate(info)
        assert info["state"] == "Not started" and version
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        if proc.stderr:
            proc.stderr.close()
