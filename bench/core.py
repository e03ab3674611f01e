"""Core benchmark: aiva against plain Docker, measured side by side in one run.

aiva's claim is that a sandbox costs about what a container costs to start, and far less
to use: the host SDK talks to an agent over a bind-mounted Unix socket instead of going
through dockerd (``docker exec``) for every command or file. So each figure puts aiva
next to the Docker way of doing the same thing, on the same image, on the same host, in
the same run (numbers from different runs or machines are not comparable):

1. cold create -> first exec: ``Sandbox.create`` + ``commands.run(["true"])`` vs
   ``docker run --rm IMAGE true``; 1b: of which the sandbox's bounded disk.
2. exec latency of ``true`` in a running sandbox vs the Docker SDK's ``exec_run`` and
   the ``docker exec`` CLI against a container of the same image.
3. file throughput, 100 MB each way, vs ``docker cp`` in and out.
4. parallel create of 10 sandboxes vs 10 parallel ``docker run --rm``.
5. what gVisor costs: figures 1-3 for a ``--runtime gvisor`` sandbox against a runc one,
   interleaved in the same run (skipped, with a note, where scripts/setup.sh has not
   registered the runtime).

Run: ``.venv/bin/python bench/core.py [--quick] [--only gvisor]``. Results go to
bench/results/core.json (``--only gvisor``: core.gvisor.json).
Every sandbox and container it makes is removed at the end, also on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import docker

# A private, short AIVA_HOME (Unix socket paths must stay short), set before aiva is
# imported so the default engine uses it and the benchmark never sees the user's sandboxes.
HOME = tempfile.mkdtemp(prefix="aiva-b")
os.environ["AIVA_HOME"] = HOME

from aiva.engine import default_engine  # noqa: E402
from aiva.sdk.sandbox import Sandbox  # noqa: E402

IMAGE = "aiva/python:latest"
RUN_ID = Path(HOME).name
PEER_LABELS = {"aiva.bench": "1", "aiva.bench.run": RUN_ID}
MB = 1_000_000
RESULTS = Path(__file__).resolve().parent / "results"

from common import (  # noqa: E402
    Report,
    Row,
    console,
    no_sigint,
    pct,
    progress,
    ratio,
    render,
    sample,
    write_json,
)

T = TypeVar("T")


@dataclass(frozen=True)
class Counts:
    create: int = 7
    execs: int = 500
    exec_run: int = 100
    exec_cli: int = 50
    file_runs: int = 3
    file_mb: int = 100
    parallel: int = 10
    parallel_rounds: int = 3
    gvisor_create: int = 5
    gvisor_execs: int = 200


FULL = Counts()
QUICK = Counts(create=3, execs=100, exec_run=20, exec_cli=10, file_runs=1, parallel_rounds=1,
               gvisor_create=3, gvisor_execs=100)


class BenchError(RuntimeError):
    pass


# ---------------------------------------------------------------------- helpers


def timed(fn: Callable[[], T]) -> tuple[float, T]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def run_quiet(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if proc.returncode != 0:
        raise BenchError(f"{' '.join(cmd)} failed: {proc.stderr.decode().strip()}")


def docker_run_true() -> None:
    labels = [arg for k, v in PEER_LABELS.items() for arg in ("--label", f"{k}={v}")]
    run_quiet(["docker", "run", "--rm", *labels, IMAGE, "true"])


def ms(xs: list[float]) -> list[float]:
    return [round(x * 1e3, 4) for x in xs]


# ---------------------------------------------------------------------- bookkeeping


class Boxes:
    """Every sandbox the benchmark creates, so all of them can be removed at the end."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._live: list[Sandbox] = []

    def create(self, memory: str, runtime: str = "runc") -> Sandbox:
        sb = Sandbox.create(memory=memory, runtime=runtime)
        with self._lock:
            self._live.append(sb)
        return sb

    def destroy(self, sb: Sandbox) -> None:
        sb.destroy(volumes=True)
        with self._lock:
            self._live.remove(sb)

    def destroy_all(self) -> None:
        with self._lock:
            live, self._live = self._live, []
        for sb in live:
            try:
                sb.destroy(volumes=True)
            except Exception as exc:
                progress(f"[yellow]could not destroy {sb.name} (the sweep retries): "
                         f"{exc}[/yellow]")


def create_and_exec(boxes: Boxes, memory: str, runtime: str = "runc"
                    ) -> tuple[float, Sandbox]:
    """Seconds from ``Sandbox.create`` to the end of the first ``run(["true"])``."""
    t0 = time.perf_counter()
    sb = boxes.create(memory, runtime)
    sb.commands.run(["true"], check=True)
    return time.perf_counter() - t0, sb


def start_peer(client: Any) -> Any:
    """A long-running container from the same image, with a volume at /workspace like
    a sandbox has."""
    labels = [arg for k, v in PEER_LABELS.items() for arg in ("--label", f"{k}={v}")]
    proc = subprocess.run(
        ["docker", "run", "-d", *labels, "-v", "/workspace", IMAGE, "sleep", "infinity"],
        capture_output=True, text=True, check=True,
    )
    return client.containers.get(proc.stdout.strip())


# ---------------------------------------------------------------------- figures


def fig_create(c: Counts, boxes: Boxes, rep: Report) -> tuple[float, float]:
    """Figure 1; returns the single-create medians (aiva, docker run) for figure 4."""
    progress("[bold]1. cold create -> first exec[/bold]: warming up (not counted)")
    boxes.destroy(create_and_exec(boxes, "1GB")[1])
    docker_run_true()
    aiva: list[float] = []
    peer: list[float] = []
    for i in range(c.create):  # interleaved, so drift on the host hits both alike
        dt, sb = create_and_exec(boxes, "1GB")
        boxes.destroy(sb)
        aiva.append(dt)
        peer.append(timed(docker_run_true)[0])
        progress(f"   run {i + 1}/{c.create}: aiva {aiva[-1] * 1e3:.0f} ms, "
                 f"docker run {peer[-1] * 1e3:.0f} ms")
    a, p = statistics.median(aiva), statistics.median(peer)
    r = ratio(a, p)
    rep.rows.append(Row("1 create->exec", f"median of {c.create}", "ms", a * 1e3,
                        "docker run --rm", p * 1e3, r, "aiva/peer", "<= 1.2", r <= 1.2))
    rep.samples["create_ms"] = {"aiva": ms(aiva), "docker_run": ms(peer)}
    return a, p


def fig_disk(c: Counts, client: Any, rep: Report) -> None:
    """Figure 1b: the part of a create that makes the bounded disk of a Docker sandbox
    (a sparse ext4 image, its loop mount and the overlays over the per-image seed),
    and its removal. Part of figure 1's time, so no peer."""
    import uuid

    from aiva.backends import docker_disk
    from aiva.errors import BackendError
    from aiva.models import SandboxSpec

    try:
        if not docker_disk.enforced():
            return
    except BackendError:  # not root: aiva cannot make disks here
        return
    progress(f"[bold]1b. the disk of a create[/bold]: {c.create} runs")
    spec = SandboxSpec(image=IMAGE, cpus=1, memory=1 << 30, disk=20 << 30)
    pairs = docker_disk.layout(spec)
    seed = docker_disk.seed(client, client.images.get(IMAGE).id, pairs,
                            {"aiva.managed": "true", **PEER_LABELS})
    made: list[float] = []
    removed: list[float] = []
    for _ in range(c.create):
        sid = str(uuid.uuid4())
        t0 = time.perf_counter()
        docker_disk.make(sid, spec.disk)
        docker_disk.populate(sid, pairs, seed)
        t1 = time.perf_counter()
        docker_disk.remove(sid)
        made.append(t1 - t0)
        removed.append(time.perf_counter() - t1)
    rep.rows.append(Row("1b disk make+seed", f"median of {c.create}", "ms",
                        statistics.median(made) * 1e3))
    rep.rows.append(Row("1b disk remove", f"median of {c.create}", "ms",
                        statistics.median(removed) * 1e3))
    rep.samples["disk_ms"] = {"make": ms(made), "remove": ms(removed)}


def fig_exec(c: Counts, boxes: Boxes, peer: Any, rep: Report) -> None:
    progress(f"[bold]2. exec `true`[/bold]: {c.execs} runs in one sandbox")
    sb = boxes.create("1GB")
    try:
        aiva = sample(lambda: sb.commands.run(["true"], check=True), c.execs, warm=20)
    finally:
        boxes.destroy(sb)

    def exec_run() -> None:
        if peer.exec_run(["true"]).exit_code != 0:
            raise BenchError("exec_run true failed")

    progress(f"   docker SDK exec_run: {c.exec_run} runs")
    sdk = sample(exec_run, c.exec_run, warm=3)
    progress(f"   docker exec CLI: {c.exec_cli} runs")
    cli = sample(lambda: run_quiet(["docker", "exec", peer.id, "true"]), c.exec_cli, warm=2)

    a50 = pct(aiva, 50) * 1e3
    rep.rows.append(Row("2 exec true", "p50", "ms", a50, target="<= 2 ms", met=a50 <= 2.0))
    for q in (50, 95):
        a = pct(aiva, q) * 1e3
        for name, xs in (("docker SDK exec_run", sdk), ("docker exec CLI", cli)):
            p = pct(xs, q) * 1e3
            row = Row("2 exec true", f"p{q}", "ms", a, name, p, ratio(p, a), "peer/aiva")
            if q == 50 and name == "docker SDK exec_run":
                row.target, row.met = ">= 30x", row.ratio is not None and row.ratio >= 30
            rep.rows.append(row)
    rep.samples["exec_ms"] = {"aiva": ms(aiva), "exec_run": ms(sdk), "docker_exec": ms(cli)}


def aiva_file_rates(c: Counts, sb: Sandbox, data: bytes) -> tuple[list[float], list[float]]:
    path = "/workspace/big"
    writes: list[float] = []
    reads: list[float] = []
    for i in range(c.file_runs):
        if sb.files.exists(path):
            sb.files.remove(path)
        writes.append(len(data) / MB / timed(lambda: sb.files.write(path, data))[0])
        dt, got = timed(lambda: sb.files.read(path, format="bytes"))
        if got != data:
            raise BenchError(f"read back {len(got)} bytes that differ from what was written")
        del got
        reads.append(len(data) / MB / dt)
        progress(f"   aiva run {i + 1}/{c.file_runs}: write {writes[-1]:.0f} MB/s, "
                 f"read {reads[-1]:.0f} MB/s")
    return writes, reads


def docker_cp_rates(c: Counts, peer: Any, data: bytes, tmp: Path
                    ) -> tuple[list[float], list[float]]:
    src, out = tmp / "big", tmp / "out"
    src.write_bytes(data)
    ins: list[float] = []
    outs: list[float] = []
    for i in range(c.file_runs):
        run_quiet(["docker", "exec", peer.id, "rm", "-f", "/workspace/big"])
        dt, _ = timed(lambda: run_quiet(["docker", "cp", str(src), f"{peer.id}:/workspace/big"]))
        ins.append(len(data) / MB / dt)
        out.unlink(missing_ok=True)
        dt, _ = timed(lambda: run_quiet(["docker", "cp", f"{peer.id}:/workspace/big", str(out)]))
        if out.read_bytes() != data:
            raise BenchError("docker cp brought back different bytes")
        outs.append(len(data) / MB / dt)
        progress(f"   docker cp run {i + 1}/{c.file_runs}: in {ins[-1]:.0f} MB/s, "
                 f"out {outs[-1]:.0f} MB/s")
    src.unlink()
    out.unlink(missing_ok=True)
    return ins, outs


def fig_files(c: Counts, boxes: Boxes, peer: Any, tmp: Path, rep: Report) -> None:
    progress(f"[bold]3. file throughput[/bold]: {c.file_mb} MB each way, {c.file_runs} runs")
    data = os.urandom(c.file_mb * MB)
    sb = boxes.create("1GB")
    try:
        writes, reads = aiva_file_rates(c, sb, data)
    finally:
        boxes.destroy(sb)
    ins, outs = docker_cp_rates(c, peer, data, tmp)
    for way, aiva, cp, cp_name in (("write", writes, ins, "docker cp in"),
                                   ("read", reads, outs, "docker cp out")):
        for stat, fn in (("median", statistics.median), ("best", max)):
            a, p = fn(aiva), fn(cp)
            is_median = stat == "median"
            rep.rows.append(Row("3 files 100MB", f"{way} {stat}", "MB/s", a, cp_name, p,
                                ratio(a, p), "aiva/peer",
                                ">= 100 MB/s" if is_median else None,
                                a >= 100 if is_median else None))
    rep.samples["files_mb_s"] = {k: [round(x, 1) for x in v] for k, v in (
        ("aiva_write", writes), ("aiva_read", reads), ("docker_cp_in", ins),
        ("docker_cp_out", outs))}


def parallel_aiva(c: Counts, boxes: Boxes) -> tuple[float, list[float]]:
    """Wall time to create (and first-exec) ``c.parallel`` sandboxes at once."""
    with ThreadPoolExecutor(c.parallel) as pool:
        t0 = time.perf_counter()
        done = list(pool.map(lambda _: create_and_exec(boxes, "256MB"), range(c.parallel)))
        total = time.perf_counter() - t0
        list(pool.map(lambda r: boxes.destroy(r[1]), done))
    return total, [dt for dt, _ in done]


def parallel_docker(c: Counts) -> tuple[float, list[float]]:
    with ThreadPoolExecutor(c.parallel) as pool:
        t0 = time.perf_counter()
        each = list(pool.map(lambda _: timed(docker_run_true)[0], range(c.parallel)))
        return time.perf_counter() - t0, each


def fig_parallel(c: Counts, boxes: Boxes, single: tuple[float, float], rep: Report) -> None:
    n = c.parallel
    progress(f"[bold]4. parallel create[/bold]: {n} at once, {c.parallel_rounds} rounds")
    totals: dict[str, list[float]] = {"aiva": [], "docker": []}
    means: dict[str, list[float]] = {"aiva": [], "docker": []}
    runners: dict[str, Callable[[], tuple[float, list[float]]]] = {
        "aiva": lambda: parallel_aiva(c, boxes), "docker": lambda: parallel_docker(c)}
    for i in range(c.parallel_rounds):
        for who, fn in runners.items():
            total, each = fn()
            totals[who].append(total)
            means[who].append(statistics.mean(each))
        progress(f"   round {i + 1}/{c.parallel_rounds}: aiva {totals['aiva'][-1]:.2f} s, "
                 f"docker run {totals['docker'][-1]:.2f} s")
    a, p = statistics.median(totals["aiva"]), statistics.median(totals["docker"])
    am, pm = statistics.median(means["aiva"]), statistics.median(means["docker"])
    peer = f"{n}x docker run --rm"
    rep.rows += [
        Row("4 parallel x10", "total (median of rounds)", "s", a, peer, p, ratio(a, p),
            "aiva/peer"),
        Row("4 parallel x10", "mean per-sandbox latency", "s", am, peer, pm, ratio(am, pm),
            "aiva/peer"),
        Row("4 parallel x10", "total / single create", "x", ratio(a, single[0]), peer,
            ratio(p, single[1])),
    ]
    rep.samples["parallel_s"] = {
        "totals": {k: [round(x, 4) for x in v] for k, v in totals.items()},
        "mean_latency": {k: [round(x, 4) for x in v] for k, v in means.items()}}


def gvisor_ready(client: Any) -> bool:
    from aiva.backends.docker import GVISOR_RUNTIME

    return GVISOR_RUNTIME in (client.info().get("Runtimes") or {})


def fig_gvisor(c: Counts, boxes: Boxes, rep: Report) -> None:
    """Figure 5: the same aiva calls on a gVisor sandbox and a runc one, interleaved."""
    runtimes = ("gvisor", "runc")
    progress(f"[bold]5. gVisor vs runc[/bold]: create -> first exec, {c.gvisor_create} "
             "rounds (warm-up not counted)")
    for rt in runtimes:
        boxes.destroy(create_and_exec(boxes, "1GB", rt)[1])
    create: dict[str, list[float]] = {rt: [] for rt in runtimes}
    for i in range(c.gvisor_create):
        for rt in runtimes:
            dt, sb = create_and_exec(boxes, "1GB", rt)
            boxes.destroy(sb)
            create[rt].append(dt)
        progress(f"   round {i + 1}/{c.gvisor_create}: gvisor {create['gvisor'][-1] * 1e3:.0f}"
                 f" ms, runc {create['runc'][-1] * 1e3:.0f} ms")
    rows = [("create->exec", f"median of {c.gvisor_create}", "ms",
             statistics.median(create["gvisor"]) * 1e3, statistics.median(create["runc"]) * 1e3)]
    execs: dict[str, list[float]] = {}
    writes: dict[str, list[float]] = {}
    reads: dict[str, list[float]] = {}
    data = os.urandom(c.file_mb * MB)
    for rt in runtimes:
        progress(f"   {rt}: exec `true` x{c.gvisor_execs}, files {c.file_mb} MB x{c.file_runs}")
        sb = boxes.create("1GB", rt)
        try:
            execs[rt] = sample(functools.partial(sb.commands.run, ["true"], check=True),
                               c.gvisor_execs, warm=10)
            writes[rt], reads[rt] = aiva_file_rates(c, sb, data)
        finally:
            boxes.destroy(sb)
    del data
    for q in (50, 95):
        rows.append(("exec true", f"p{q}", "ms", pct(execs["gvisor"], q) * 1e3,
                     pct(execs["runc"], q) * 1e3))
    for way, rates in (("write", writes), ("read", reads)):
        rows.append((f"files {c.file_mb}MB", f"{way} median", "MB/s",
                     statistics.median(rates["gvisor"]), statistics.median(rates["runc"])))
    for what, metric, unit, g, r in rows:
        rep.rows.append(Row(f"5 gvisor {what}", metric, unit, g, "same, runc", r,
                            ratio(g, r), "gvisor/runc"))
    rep.samples["gvisor"] = {
        "create_ms": {rt: ms(v) for rt, v in create.items()},
        "exec_ms": {rt: ms(v) for rt, v in execs.items()},
        "files_mb_s": {f"{rt}_{way}": [round(x, 1) for x in v[rt]]
                       for way, v in (("write", writes), ("read", reads)) for rt in runtimes}}


# ---------------------------------------------------------------------- output


def host_facts(client: Any, c: Counts, quick: bool) -> dict[str, Any]:
    info = client.info()
    others = [x for x in client.containers.list()
              if x.labels.get("aiva.bench.run") != RUN_ID
              and x.labels.get("aiva.home") != HOME]
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "mem_total_gb": round(info.get("MemTotal", 0) / 1e9, 1),
        "docker_server_version": client.version().get("Version"),
        "storage_driver": info.get("Driver"),
        "cgroup_version": info.get("CgroupVersion"),
        "kernel": platform.release(),
        "python_version": platform.python_version(),
        "image": IMAGE,
        "other_containers_running_at_start": len(others),
        "quick": quick,
        "counts": asdict(c),
    }


# ---------------------------------------------------------------------- cleanup


def remove(obj: Any, what: str, **kw: Any) -> bool:
    """Remove a Docker container or volume; False (with a warning) if it could not be."""
    try:
        obj.remove(force=True, **kw)
    except docker.errors.NotFound:
        pass
    except docker.errors.APIError as exc:
        if exc.status_code != 409 or "in progress" not in str(exc):  # a --rm already going
            progress(f"[yellow]could not remove {what}: {exc}[/yellow]")
            return False
    return True


def sweep(client: Any) -> int:
    """Remove anything this run left (sandboxes in its private store, then anything
    Docker still has with its labels); returns how many things could not be removed."""
    engine = default_engine()
    failed = 0
    for info in engine.list_all(reconcile=False):
        try:
            engine.delete(info.name, volumes=True)
        except Exception as exc:
            progress(f"[yellow]could not delete sandbox {info.name}: {exc}[/yellow]")
            failed += 1
    for label in (f"aiva.home={HOME}", f"aiva.bench.run={RUN_ID}"):
        for ctr in client.containers.list(all=True, filters={"label": label}):
            failed += not remove(ctr, f"container {ctr.name}", v=True)
    for vol in client.volumes.list(filters={"label": f"aiva.home={HOME}"}):
        failed += not remove(vol, f"volume {vol.name}")
    return failed


class Resources:
    """What the run owns: its sandboxes, the peer container and a scratch directory."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.boxes = Boxes()
        self.tmp = Path(tempfile.mkdtemp(prefix="aiva-bench-data"))
        self._peer: Any = None

    def peer(self) -> Any:
        """The peer container, started on first use."""
        if self._peer is None:
            progress(f"   starting peer container from {IMAGE}")
            self._peer = start_peer(self.client)
        return self._peer

    def cleanup(self) -> None:
        progress("cleaning up")
        with no_sigint():
            self.boxes.destroy_all()
            if self._peer is not None:
                remove(self._peer, "the peer container", v=True)
            try:
                failed = sweep(self.client)
            except Exception as exc:
                progress(f"[yellow]cleanup sweep failed: {exc}[/yellow]")
                failed = 1
            default_engine().close()
            shutil.rmtree(self.tmp, ignore_errors=True)
            if failed:
                progress(f"[yellow]{failed} thing(s) could not be removed; AIVA_HOME {HOME} "
                         "kept (clean up with AIVA_HOME=... aiva rm)[/yellow]")
            else:
                shutil.rmtree(HOME, ignore_errors=True)


# ---------------------------------------------------------------------- main


def run(c: Counts, res: Resources, rep: Report, only: str | None = None) -> None:
    if only is None:
        single = fig_create(c, res.boxes, rep)
        fig_disk(c, docker.from_env(), rep)
        fig_exec(c, res.boxes, res.peer(), rep)
        fig_files(c, res.boxes, res.peer(), res.tmp, rep)
        fig_parallel(c, res.boxes, single, rep)
    if gvisor_ready(res.client):
        fig_gvisor(c, res.boxes, rep)
    else:
        rep.notes.append("figure 5 skipped: the engine has no aiva-runsc runtime "
                         "(scripts/setup.sh registers it)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="small counts, for a smoke run")
    ap.add_argument("--only", choices=["gvisor"], help="just figure 5 (gVisor vs runc)")
    ap.add_argument("--out", type=Path, help="JSON path (default bench/results/core.json; "
                    "core.quick.json with --quick; core.gvisor[.quick].json with --only)")
    args = ap.parse_args(argv)
    c = QUICK if args.quick else FULL
    stem = "core.gvisor" if args.only else "core"
    out = args.out or RESULTS / (f"{stem}.quick.json" if args.quick else f"{stem}.json")
    try:
        client = docker.from_env(timeout=300)
        client.images.get(IMAGE)
    except docker.errors.DockerException as exc:
        shutil.rmtree(HOME, ignore_errors=True)
        console.print(f"[red]{exc}[/red]\nneeds a running Docker engine and {IMAGE} "
                      "(`.venv/bin/aiva image build python`)")
        return 1
    host = host_facts(client, c, args.quick)
    progress(f"AIVA_HOME={HOME}, {host['cpu_count']} CPUs, Docker "
             f"{host['docker_server_version']}, {host['other_containers_running_at_start']} "
             "other container(s) running")
    res, rep = Resources(client), Report()
    try:
        run(c, res, rep, args.only)
    except KeyboardInterrupt:
        console.print("[red]interrupted[/red]")
        return 130
    finally:
        res.cleanup()
    render(rep.rows, "aiva vs Docker (same host, same run)", notes=rep.notes)
    write_json(out, host, rep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
