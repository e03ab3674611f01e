"""VM benchmark: aiva's QEMU microVM sandboxes against raw QEMU and Docker, in one run.

A microVM sandbox buys hardware isolation; the question is what it costs on top of the
virtual machine itself, and against the Docker sandbox it replaces. So each figure puts
aiva next to a peer measured on the same host, in the same run (numbers from different
runs or machines are not comparable):

1. boot -> first exec: ``Sandbox.create(backend="qemu", template="minimal",
   memory="512MB", disk="1GB")`` + ``commands.run(["true"])`` vs raw QEMU booting the
   same kernel and initramfs with the same machine flags until the guest's /init runs
   (given no ``aiva.root=``, it prints ``AIVA-INIT-ERROR`` and powers off). The gap is
   what aiva adds: the data disk, mounting the disks, switch_root, the agent's python3
   cold start and the host side. aiva's boot is broken down with the timestamps of its
   console log (``AIVA_HOME/vms/<id>/console.jsonl``).
2. exec ``true`` p50/p95 in a running VM vs in an aiva Docker sandbox.
3. snapshot and restore of a running 512 MB VM (``engine.snapshot(name, tag)`` /
   ``engine.restore(name, tag)``; reported as not available while the engine lacks them).
4. host memory per idle VM: VmRSS of QEMU + its supervisor vs a raw QEMU process
   sampled the moment its /init ran.

Run: ``.venv/bin/python bench/vm.py [--quick]``. Results go to bench/results/vm.json.
Every sandbox, VM and raw QEMU process it starts is removed at the end, also on failure
or Ctrl-C. Kernel, initramfs and system image come from the shared cache (~/.aiva/cache).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
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
from typing import IO, Any

# A private, short AIVA_HOME (Unix socket paths must stay short), set before aiva is
# imported so the default engine uses it and the benchmark never sees the user's
# sandboxes. Kernels and system images are content-keyed: share the machine's cache, as
# the tests do, instead of rebuilding them.
HOME = tempfile.mkdtemp(prefix="aiva-b")
os.environ["AIVA_HOME"] = HOME
SHARED_CACHE = Path(os.environ.get("AIVA_TEST_CACHE", Path.home() / ".aiva" / "cache"))
SHARED_CACHE.mkdir(parents=True, exist_ok=True)
(Path(HOME) / "cache").symlink_to(SHARED_CACHE, target_is_directory=True)

from aiva.backends.qemu import QEMU, QemuBackend  # noqa: E402
from aiva.backends.supervised import vm_dir  # noqa: E402
from aiva.engine import Engine, default_engine  # noqa: E402
from aiva.sdk.sandbox import Sandbox  # noqa: E402
from aiva.vm.artifacts import VmArtifacts, ensure_vm_artifacts  # noqa: E402
from aiva.vm.kernel import tcg_kernel_args  # noqa: E402

TEMPLATE = "minimal"
VM_KW: dict[str, Any] = {"backend": "qemu", "template": TEMPLATE, "memory": "512MB",
                         "disk": "1GB"}
DOCKER_KW: dict[str, Any] = {"backend": "docker", "memory": "512MB"}
MEM_MIB = 512
RAW_TIMEOUT = 90.0  # one raw boot; TCG on a busy 2-core host is slow, a hang ends here
RAW_INIT = b"Run /init as init process"  # the kernel hands over (printed without quiet)
RAW_DONE = b"AIVA-INIT-ERROR"  # /init ran, found no aiva.root= and powers off
AGENT_START = "AIVA-AGENT-START"
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


@dataclass(frozen=True)
class Counts:
    boots: int = 3
    raw_boots: int = 3
    execs: int = 200
    snapshots: int = 3
    idle_vms: int = 2


FULL = Counts()
QUICK = Counts(boots=1, raw_boots=1, execs=50, snapshots=1)


class BenchError(RuntimeError):
    pass


# ---------------------------------------------------------------------- helpers


def ms(xs: list[float]) -> list[float]:
    return [round(x * 1e3, 2) for x in xs]


def median_or_none(xs: list[float | None]) -> float | None:
    known = [x for x in xs if x is not None]
    return statistics.median(known) if known else None


def rss_kib(pid: int) -> int:
    """VmRSS of a process, in KiB (0 if it is gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def read_pid(path: Path) -> int:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError) as exc:
        raise BenchError(f"no pid in {path}: {exc}") from None


# ---------------------------------------------------------------------- aiva side


class Boxes:
    """Every sandbox the benchmark creates, so all of them can be removed at the end."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._live: list[Sandbox] = []

    def create(self, **kw: Any) -> Sandbox:
        sb = Sandbox.create(**kw)
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


@dataclass
class AivaBoot:
    """One ``Sandbox.create`` + first exec of a VM, and where its time went (seconds)."""

    total: float
    prep: float | None  # create called -> supervisor spawned (store, data disk, argv)
    guest: float | None  # supervisor spawned -> AIVA-AGENT-START (QEMU, kernel, /init,
    #                      disks, switch_root, stage 2)
    agent: float | None  # AIVA-AGENT-START -> create returned (python3 cold start, ping)
    first_exec: float


def console_time(d: Path, marker: str) -> float | None:
    """Wall-clock time of the first console line holding ``marker`` (console.jsonl)."""
    try:
        lines = (d / "console.jsonl").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if marker in str(rec.get("d", "")):
            return float(rec["t"])
    return None


def boot_and_exec(boxes: Boxes) -> tuple[AivaBoot, Sandbox]:
    wall0, t0 = time.time(), time.perf_counter()
    sb = boxes.create(**VM_KW)
    wall1, t1 = time.time(), time.perf_counter()
    sb.commands.run(["true"], check=True)
    t2 = time.perf_counter()
    d = vm_dir(sb.info)
    try:  # the backend writes supervisor.pid right after spawning it
        spawned: float | None = (d / "supervisor.pid").stat().st_mtime
    except OSError:
        spawned = None
    agent = console_time(d, AGENT_START)
    return AivaBoot(
        total=t2 - t0,
        prep=spawned - wall0 if spawned else None,
        guest=agent - spawned if agent and spawned else None,
        agent=wall1 - agent if agent else None,
        first_exec=t2 - t1,
    ), sb


# ---------------------------------------------------------------------- raw QEMU peer


@dataclass
class RawBoot:
    """One raw QEMU boot to /init (seconds from spawn) and its RSS at that moment."""

    to_init: float | None  # the kernel prints "Run /init as init process"
    to_error: float  # /init printed AIVA-INIT-ERROR
    rss_kib: int
    line: str


def _pump(stream: IO[bytes], q: queue.Queue[tuple[float, bytes | None]]) -> None:
    for line in iter(stream.readline, b""):
        q.put((time.perf_counter(), line))
    q.put((time.perf_counter(), None))


class RawQemu:
    """The peer: the same kernel and initramfs, the same machine flags, no aiva."""

    def __init__(self, art: VmArtifacts, accel: str, smp: int) -> None:
        self.art, self.accel, self.smp = art, accel, smp
        self._procs: dict[int, subprocess.Popen[bytes]] = {}

    def argv(self, *, quiet: bool = False) -> list[str]:
        # No aiva.root=: /init loads its modules, then fails at once. (aiva.root=/dev/none
        # would make it wait 5 s for the device first, and time that wait.)
        cmdline = " ".join(["console=ttyS0", *(["quiet"] if quiet else []),
                            "panic=-1 pci=off",
                            *(tcg_kernel_args() if self.accel == "tcg" else [])])
        return [QEMU, "-M", "microvm", "-accel", self.accel, "-m", str(MEM_MIB),
                "-smp", str(self.smp), "-nodefaults", "-no-user-config", "-nographic",
                "-no-reboot", "-serial", "stdio", "-kernel", str(self.art.kernel),
                "-initrd", str(self.art.initramfs), "-append", cmdline]

    def boot(self, *, quiet: bool = False) -> RawBoot:
        q: queue.Queue[tuple[float, bytes | None]] = queue.Queue()
        t0 = time.perf_counter()
        proc = subprocess.Popen(self.argv(quiet=quiet), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self._procs[proc.pid] = proc
        assert proc.stdout is not None
        threading.Thread(target=_pump, args=(proc.stdout, q), daemon=True).start()
        try:
            return self._watch(proc, t0, q)
        finally:
            self._end(proc)

    def _watch(self, proc: subprocess.Popen[bytes], t0: float,
               q: queue.Queue[tuple[float, bytes | None]]) -> RawBoot:
        to_init = None
        deadline = t0 + RAW_TIMEOUT
        while True:
            try:
                t, line = q.get(timeout=max(0.1, deadline - time.perf_counter()))
            except queue.Empty:
                raise BenchError(f"raw QEMU did not reach /init in {RAW_TIMEOUT:.0f} s"
                                 ) from None
            if line is None:
                raise BenchError(f"raw QEMU ended (status {proc.poll()}) before /init ran")
            if RAW_INIT in line and to_init is None:
                to_init = t - t0
            if RAW_DONE in line:
                rss = rss_kib(proc.pid)  # sampled now, before the guest powers off
                return RawBoot(to_init, t - t0, rss, line.decode(errors="replace").strip())

    def _end(self, proc: subprocess.Popen[bytes]) -> None:
        try:
            proc.wait(timeout=15)  # it powers itself off
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        self._procs.pop(proc.pid, None)

    def kill_all(self) -> None:
        for pid, proc in list(self._procs.items()):
            try:
                proc.kill()
                proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired) as exc:
                progress(f"[yellow]could not end raw QEMU {pid}: {exc}[/yellow]")
            self._procs.pop(pid, None)


# ---------------------------------------------------------------------- figures


def fig_exec(c: Counts, boxes: Boxes, rep: Report) -> Sandbox:
    """Figure 2; returns the running VM, which figure 3 uses. The Docker sandbox goes
    first, so no VM runs beside it; the VM's cold first boot warms everything (imports,
    page cache) before figure 1 is timed."""
    progress(f"[bold]2. exec `true`[/bold]: {c.execs} runs in a Docker sandbox")
    box = boxes.create(**DOCKER_KW)
    try:
        peer = sample(lambda: box.commands.run(["true"], check=True), c.execs, warm=20)
    finally:
        boxes.destroy(box)
    progress("   booting a VM (cold first boot, not counted in figure 1)")
    boot, vm = boot_and_exec(boxes)
    rep.samples["cold_first_boot_ms"] = round(boot.total * 1e3, 1)
    progress(f"   VM up in {boot.total:.1f} s; {c.execs} runs of `true` in it")
    aiva = sample(lambda: vm.commands.run(["true"], check=True), c.execs, warm=10)
    for q in (50, 95):
        a, p = pct(aiva, q) * 1e3, pct(peer, q) * 1e3
        rep.rows.append(Row("2 exec true", f"p{q} of {c.execs}", "ms", a,
                            "Docker sandbox", p, ratio(a, p), "aiva/peer"))
    rep.samples["exec_ms"] = {"vm": ms(aiva), "docker": ms(peer)}
    progress(f"   p50: VM {pct(aiva, 50) * 1e3:.2f} ms, Docker {pct(peer, 50) * 1e3:.2f} ms")
    return vm


def time_call(fn: Callable[..., Any], *args: Any) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def disk_mb(path: Path) -> float:
    """Bytes a file takes on the host (allocated blocks), in MB."""
    return path.stat().st_blocks * 512 / 1e6


def fig_snapshot(c: Counts, engine: Engine, vm: Sandbox, rep: Report) -> None:
    snapshot = getattr(engine, "snapshot", None)  # called by name: it may not exist yet
    restore = getattr(engine, "restore", None)
    if snapshot is None or restore is None:
        progress("[bold]3. snapshot/restore[/bold]: not available yet (the engine has no "
                 "snapshot/restore)")
        for what in ("snapshot", "restore"):
            rep.rows.append(Row("3 snapshot", f"{what}: not available yet", "s", None))
        rep.notes.append("figure 3: the engine has no snapshot()/restore() yet; skipped")
        return
    progress(f"[bold]3. snapshot/restore[/bold] of the running {MEM_MIB} MB VM, "
             f"{c.snapshots} times")
    disk = vm_dir(vm.info) / "data.qcow2"
    before = disk_mb(disk)
    xs: dict[str, list[float]] = {"snapshot": [], "restore": [], "exec_after": []}
    try:
        for i in range(c.snapshots):
            tag = f"bench{i}"
            xs["snapshot"].append(time_call(snapshot, vm.name, tag))
            xs["restore"].append(time_call(restore, vm.name, tag))
            xs["exec_after"].append(time_call(vm.commands.run, ["true"]))  # it answers
            progress(f"   run {i + 1}/{c.snapshots}: snapshot {xs['snapshot'][-1]:.2f} s, "
                     f"restore {xs['restore'][-1]:.2f} s")
    except Exception as exc:  # a new engine call: report it, keep the other figures
        progress(f"[yellow]snapshot/restore failed: {exc}[/yellow]")
        rep.notes.append(f"figure 3 failed after {len(xs['snapshot'])} snapshot(s): {exc}")
    n = len(xs["snapshot"])
    growth = (disk_mb(disk) - before) / n if n else None
    for key, label in (("snapshot", "snapshot (savevm)"), ("restore", "restore (loadvm)"),
                       ("exec_after", "exec after restore")):
        rep.rows.append(Row("3 snapshot", f"{label}, median of {len(xs[key])}", "s",
                            statistics.median(xs[key]) if xs[key] else None))
    rep.rows.append(Row("3 snapshot", "disk growth per snapshot", "MB", growth))
    rep.samples["snapshot_s"] = {k: [round(x, 3) for x in v] for k, v in xs.items()}


def fig_boot(c: Counts, boxes: Boxes, raw: RawQemu, rep: Report) -> list[RawBoot]:
    """Figure 1; returns the raw boots, whose RSS figure 4 uses."""
    progress(f"[bold]1. boot -> first exec[/bold]: {c.boots} aiva VMs, {c.raw_boots} raw "
             "QEMU boots, interleaved")
    boots: list[AivaBoot] = []
    raws: list[RawBoot] = []
    for i in range(max(c.boots, c.raw_boots)):  # interleaved: host drift hits both alike
        if i < c.boots:
            boot, sb = boot_and_exec(boxes)
            boxes.destroy(sb)
            boots.append(boot)
        if i < c.raw_boots:
            raws.append(raw.boot())
        progress(f"   run {i + 1}: aiva {boots[-1].total:.2f} s, raw QEMU to /init "
                 f"{raws[-1].to_error:.2f} s")
    progress("   one raw boot with `quiet` (for information)")
    quiet = raw.boot(quiet=True)
    boot_rows(c, boots, raws, quiet, rep)
    rep.samples["boot"] = {
        "aiva": [{k: None if v is None else round(v * 1e3, 1) for k, v in asdict(b).items()}
                 for b in boots],
        "raw": [{"to_init_ms": None if r.to_init is None else round(r.to_init * 1e3, 1),
                 "to_error_ms": round(r.to_error * 1e3, 1), "rss_kib": r.rss_kib}
                for r in raws],
        "raw_quiet": {"to_error_ms": round(quiet.to_error * 1e3, 1), "rss_kib": quiet.rss_kib},
        "raw_line": raws[0].line if raws else None,
        "raw_argv": raw.argv(),
    }
    return raws


def boot_rows(c: Counts, boots: list[AivaBoot], raws: list[RawBoot], quiet: RawBoot,
              rep: Report) -> None:
    a = statistics.median(b.total for b in boots) * 1e3
    p = statistics.median(r.to_error for r in raws) * 1e3
    r = ratio(a, p)
    rep.rows.append(Row("1 boot->exec", f"median of {c.boots}", "ms", a, "raw QEMU to /init",
                        p, r, "aiva/peer", "<= 1.3", r <= 1.3))
    to_init = median_or_none([x.to_init for x in raws])
    rep.rows.append(Row("1 boot->exec", "raw: spawn -> 'Run /init'", "ms", None,
                        "raw QEMU", None if to_init is None else to_init * 1e3))
    rep.rows.append(Row("1 boot->exec", "raw to /init, `quiet`, 1 run", "ms", None,
                        "raw QEMU, quiet", quiet.to_error * 1e3))
    parts = (("prep", "create -> supervisor spawned"),
             ("guest", "spawned -> AIVA-AGENT-START"),
             ("agent", "AGENT-START -> agent answers"),
             ("first_exec", "first run(['true'])"))
    for key, label in parts:
        v = median_or_none([getattr(b, key) for b in boots])
        row = Row("1 breakdown", label, "ms", None if v is None else v * 1e3)
        if key == "guest" and v is not None:
            row.peer, row.peer_value = "raw QEMU to /init", p
            row.ratio, row.ratio_is = ratio(v * 1e3, p), "aiva/peer"
        rep.rows.append(row)


def vm_rss(sb: Sandbox) -> tuple[int, int]:
    """VmRSS (KiB) of the VM's QEMU process and of its supervisor."""
    d = vm_dir(sb.info)
    return rss_kib(read_pid(d / "qemu.pid")), rss_kib(read_pid(d / "supervisor.pid"))


def fig_memory(c: Counts, boxes: Boxes, raws: list[RawBoot], rep: Report) -> None:
    n = c.idle_vms
    progress(f"[bold]4. host memory per idle VM[/bold]: booting {n} VMs at once")
    with ThreadPoolExecutor(n) as pool:
        vms = list(pool.map(lambda _: boot_and_exec(boxes)[1], range(n)))
    try:
        for vm in vms:  # each answers
            vm.commands.run(["true"], check=True)
        time.sleep(2)  # let the guests settle into idle
        rss = [vm_rss(vm) for vm in vms]
    finally:
        for vm in vms:
            boxes.destroy(vm)
    qemu = statistics.mean(q for q, _ in rss) / 1024
    sup = statistics.mean(s for _, s in rss) / 1024
    peer = statistics.median(r.rss_kib for r in raws) / 1024
    progress(f"   per VM: QEMU {qemu:.0f} MiB + supervisor {sup:.0f} MiB; raw QEMU "
             f"{peer:.0f} MiB")
    label = "raw QEMU at /init"
    rep.rows += [
        Row("4 idle memory", f"QEMU + supervisor, mean of {n}", "MiB", qemu + sup, label,
            peer, ratio(qemu + sup, peer), "aiva/peer"),
        Row("4 idle memory", "QEMU only", "MiB", qemu, label, peer,
            ratio(qemu, peer), "aiva/peer"),
        Row("4 idle memory", "supervisor only", "MiB", sup),
    ]
    rep.samples["rss_kib"] = {"vms": [{"qemu": q, "supervisor": s} for q, s in rss],
                              "raw_at_init": [r.rss_kib for r in raws]}


# ---------------------------------------------------------------------- output


def qemu_version() -> str:
    out = subprocess.run([QEMU, "--version"], capture_output=True, text=True, check=False)
    return out.stdout.splitlines()[0] if out.stdout else "?"


def other_qemus() -> int:
    """QEMU processes running that this run did not start (they compete for the CPUs)."""
    count = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        exe = cmd.split(b"\0")[0].rsplit(b"/", 1)[-1]
        count += exe == QEMU.encode() and HOME.encode() not in cmd
    return count


def mem_total_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return round(int(line.split()[1]) * 1024 / 1e9, 1)
    return 0.0


def host_facts(c: Counts, quick: bool, art: VmArtifacts, accel: str, smp: int
               ) -> dict[str, Any]:
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "mem_total_gb": mem_total_gb(),
        "kernel": platform.release(),
        "python_version": platform.python_version(),
        "qemu_version": qemu_version(),
        "accel": accel,
        "dev_kvm_present": os.path.exists("/dev/kvm"),
        "tcg_kernel_args": tcg_kernel_args() if accel == "tcg" else [],
        "guest_kernel": art.modules_version,
        "template": TEMPLATE,
        "vm": {"memory_mib": MEM_MIB, "smp": smp, "disk": VM_KW["disk"]},
        "other_qemu_processes_at_start": other_qemus(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "quick": quick,
        "counts": asdict(c),
    }


# ---------------------------------------------------------------------- cleanup


def docker_sweep() -> int:
    """Remove Docker objects labelled with this run's AIVA_HOME; how many failed."""
    try:
        import docker

        client = docker.from_env()
        flt = {"label": f"aiva.home={HOME}"}
        objs = [*client.containers.list(all=True, filters=flt),
                *client.volumes.list(filters=flt)]
    except Exception:
        return 0  # no Docker: nothing of ours there
    failed = 0
    for obj in objs:
        try:
            obj.remove(force=True)
        except Exception as exc:
            progress(f"[yellow]could not remove {obj.name}: {exc}[/yellow]")
            failed += 1
    return failed


def sweep(engine: Engine) -> int:
    """Remove any sandbox still in this run's private store; how many could not be."""
    failed = 0
    for info in engine.list_all(reconcile=False):
        try:
            engine.delete(info.name, volumes=True)
        except Exception as exc:
            progress(f"[yellow]could not delete sandbox {info.name}: {exc}[/yellow]")
            failed += 1
    return failed + docker_sweep()


class Resources:
    """What the run owns: its sandboxes and raw QEMU processes."""

    def __init__(self, raw: RawQemu) -> None:
        self.boxes = Boxes()
        self.raw = raw

    def cleanup(self) -> None:
        progress("cleaning up")
        with no_sigint():
            self.raw.kill_all()
            self.boxes.destroy_all()
            engine = default_engine()
            try:
                failed = sweep(engine)
            except Exception as exc:
                progress(f"[yellow]cleanup sweep failed: {exc}[/yellow]")
                failed = 1
            engine.close()
            if failed:
                progress(f"[yellow]{failed} thing(s) could not be removed; AIVA_HOME {HOME} "
                         "kept (clean up with AIVA_HOME=... aiva rm)[/yellow]")
            else:
                remove_home()


def remove_home() -> None:
    (Path(HOME) / "cache").unlink(missing_ok=True)  # the shared cache stays
    shutil.rmtree(HOME, ignore_errors=True)


# ---------------------------------------------------------------------- main


def figure_key(r: Row) -> int:
    return int(r.figure.split()[0])


def run(c: Counts, res: Resources, rep: Report) -> None:
    engine = default_engine()
    vm = fig_exec(c, res.boxes, rep)  # first: its cold boot warms up figure 1
    try:
        fig_snapshot(c, engine, vm, rep)
    finally:
        res.boxes.destroy(vm)
    raws = fig_boot(c, res.boxes, res.raw, rep)
    fig_memory(c, res.boxes, raws, rep)
    rep.rows.sort(key=figure_key)


def prepare() -> tuple[VmArtifacts, str, int]:
    """The template's VM artifacts (from the cache), the accel QEMU uses here, and the
    vCPU count a sandbox with the default profile gets."""
    backend = QemuBackend()
    backend.check()
    art = ensure_vm_artifacts(TEMPLATE, progress=lambda m: progress(f"   {m}"))
    accel = backend.accel(art.kernel, art.initramfs)
    cpus = default_engine().build_spec(**VM_KW).cpus
    return art, accel, max(1, min(int(cpus), os.cpu_count() or 1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="small counts, for a smoke run")
    ap.add_argument("--out", type=Path, help="JSON path (default bench/results/vm.json; "
                    "vm.quick.json with --quick)")
    args = ap.parse_args(argv)
    c = QUICK if args.quick else FULL
    out = args.out or RESULTS / ("vm.quick.json" if args.quick else "vm.json")
    try:
        art, accel, smp = prepare()
    except Exception as exc:
        remove_home()
        console.print(f"[red]{exc}[/red]\nneeds qemu-system-x86_64 and the '{TEMPLATE}' VM "
                      "image (tests/integration/test_qemu.py builds it into ~/.aiva/cache)")
        return 1
    host = host_facts(c, args.quick, art, accel, smp)
    progress(f"AIVA_HOME={HOME}, {host['cpu_count']} CPUs, {host['qemu_version']}, accel "
             f"{accel}, {smp} vCPU(s), {host['other_qemu_processes_at_start']} other QEMU "
             "process(es) running")
    res, rep = Resources(RawQemu(art, accel, smp)), Report()
    try:
        run(c, res, rep)
    except KeyboardInterrupt:
        console.print("[red]interrupted[/red]")
        return 130
    finally:
        res.cleanup()
    render(rep.rows, f"aiva microVMs (QEMU microvm, {accel}) vs peers (same host, same run)",
           notes=rep.notes)
    write_json(out, host, rep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
