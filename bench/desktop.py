"""Desktop benchmark: a watchable XFCE desktop from aiva vs the same session on plain Docker.

1. start -> desktop ready: ``Sandbox.create(template="desktop")`` (returns once noVNC
   answers and XFCE's window manager, panel and desktop run) vs ``docker run -d -p`` of
   the same image running the same ``session.sh``, polled until it reports ready.
2. idle memory of the running desktop (the container's cgroup), aiva vs the peer: what
   the in-sandbox agent adds.
3. a 5 s screen recording, from the call to the finished file on the host.

Run: ``.venv/bin/python bench/desktop.py [--quick]`` (needs ``aiva image build desktop``).
Results go to bench/results/desktop.json. Everything it starts is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import docker
from rich.console import Console
from rich.table import Table

# a private, short AIVA_HOME, set before aiva is imported (see core.py)
HOME = tempfile.mkdtemp(prefix="aiva-b")
os.environ["AIVA_HOME"] = HOME
os.environ["AIVA_NO_DAEMON"] = "1"

from aiva.desktop import DIR_IN_SANDBOX, session_script  # noqa: E402
from aiva.engine import default_engine  # noqa: E402
from aiva.sdk.sandbox import Sandbox  # noqa: E402
from common import fmt, no_sigint, ratio  # noqa: E402

IMAGE = "aiva/desktop:latest"
RESULTS = Path(__file__).resolve().parent / "results"
PEER_LABELS = {"aiva.bench": "1", "aiva.bench.run": Path(HOME).name}
console = Console()


@dataclass
class Row:
    figure: str
    aiva: float
    peer: str | None = None
    peer_value: float | None = None
    unit: str = "s"

    @property
    def ratio(self) -> float | None:
        return None if self.peer_value is None else ratio(self.aiva, self.peer_value)


def progress(msg: str) -> None:
    console.print(f"[dim]{time.strftime('%H:%M:%S')}[/dim] {msg}", highlight=False)


def wait(cond: Any, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError("the peer desktop did not become ready")
        time.sleep(0.05)


def answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/vnc.html", timeout=2) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def memory_bytes(client: Any, container_id: str) -> int:
    stats = client.containers.get(container_id).stats(stream=False)
    mem = stats["memory_stats"]
    return int(mem["usage"] - mem.get("stats", {}).get("inactive_file", 0))


def aiva_start(engine: Any, i: int) -> tuple[float, Sandbox]:
    t0 = time.perf_counter()
    sb = Sandbox.create(f"bdesk{i}", template="desktop", engine=engine, cpus=2, memory="2GB")
    return time.perf_counter() - t0, sb


def peer_start(client: Any, tmp: Path) -> tuple[float, Any]:
    """The same session script and services, started by plain Docker; the run dir is a
    bind mount so readiness is seen without a ``docker exec``."""
    run = Path(tempfile.mkdtemp(dir=tmp))
    (run / "password").write_text("benchpw1\n")
    (run / "session.sh").write_bytes(session_script())
    t0 = time.perf_counter()
    ctr = client.containers.run(
        IMAGE, ["/bin/sh", f"{DIR_IN_SANDBOX}/session.sh"], detach=True, init=True,
        labels=PEER_LABELS, ports={"6080/tcp": ("127.0.0.1", None)},
        volumes={str(run): {"bind": DIR_IN_SANDBOX, "mode": "rw"}},
        nano_cpus=2_000_000_000, mem_limit="2g")
    ctr.reload()
    port = int(ctr.ports["6080/tcp"][0]["HostPort"])
    wait(lambda: (run / "ready").exists() and answers(port))
    return time.perf_counter() - t0, ctr


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="2 rounds instead of 5")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    rounds = 2 if args.quick else 5
    out = args.out or RESULTS / ("desktop.quick.json" if args.quick else "desktop.json")
    client = docker.from_env(timeout=300)
    try:
        client.images.get(IMAGE)
    except docker.errors.ImageNotFound:
        console.print(f"[red]no {IMAGE}[/red]: build it with `.venv/bin/aiva image build desktop`")
        return 1
    engine = default_engine()
    tmp = Path(tempfile.mkdtemp(prefix="aiva-bench-desk"))
    starts: dict[str, list[float]] = {"aiva": [], "docker": []}
    mems: dict[str, list[int]] = {"aiva": [], "docker": []}
    records: list[float] = []
    try:
        for i in range(rounds):
            progress(f"round {i + 1}/{rounds}: aiva")
            took, sb = aiva_start(engine, i)
            starts["aiva"].append(took)
            time.sleep(3)  # let the desktop settle before reading memory
            mems["aiva"].append(memory_bytes(client, sb.info.runtime["container_id"]))
            if i == 0:
                t0 = time.perf_counter()
                sb.record_screen(tmp / "rec.mp4", duration=5)
                records.append(time.perf_counter() - t0)
            engine.delete(sb.name, volumes=True)
            progress(f"round {i + 1}/{rounds}: docker run")
            took, ctr = peer_start(client, tmp)
            starts["docker"].append(took)
            time.sleep(3)
            mems["docker"].append(memory_bytes(client, ctr.id))
            ctr.remove(force=True)
    finally:
        with no_sigint():
            for sb_info in engine.list_all(reconcile=False):
                engine.delete(sb_info.name, volumes=True)
            for ctr in client.containers.list(
                    all=True, filters={"label": f"aiva.bench.run={PEER_LABELS['aiva.bench.run']}"}):
                ctr.remove(force=True)
            engine.close()
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(HOME, ignore_errors=True)
    med = statistics.median
    rows = [
        Row("start -> desktop ready (median)", med(starts["aiva"]), "docker run + same session",
            med(starts["docker"])),
        Row("idle memory (median)", med(mems["aiva"]) / 2**20, "docker run + same session",
            med(mems["docker"]) / 2**20, unit="MiB"),
        Row("record 5 s -> file on host", records[0]),
    ]
    table = Table(title="aiva desktop vs plain Docker (same host, same run)")
    for col in ("figure", "aiva", "peer", "peer value", "ratio"):
        table.add_column(col)
    for r in rows:
        table.add_row(r.figure, f"{fmt(r.aiva)} {r.unit}", r.peer or "-",
                      "-" if r.peer_value is None else f"{fmt(r.peer_value)} {r.unit}",
                      "-" if r.ratio is None else fmt(r.ratio))
    console.print(table)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "cpu_count": os.cpu_count(),
        "rounds": rounds,
        "rows": [{**asdict(r), "ratio": r.ratio} for r in rows],
        "samples": {"start_s": starts, "memory_bytes": mems},
    }, indent=2) + "\n")
    console.print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
