"""Shared test setup: an isolated AIVA_HOME per session, a Docker engine when the test
needs one, and a final check that no sandbox a test made was left behind."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# One short AIVA_HOME for the whole session (Unix socket paths must stay short); set
# before aiva is imported anywhere so every default engine uses it.
TEST_HOME = Path(tempfile.mkdtemp(prefix="aiva-t"))
os.environ["AIVA_HOME"] = str(TEST_HOME)
# Only the daemon tests, which connect explicitly, ever talk to a daemon.
os.environ["AIVA_NO_DAEMON"] = "1"
# Built images, kernels and root filesystems are content-keyed: share the machine's cache
# (filled by scripts/setup.sh) instead of rebuilding them for every run.
SHARED_CACHE = Path(os.environ.get("AIVA_TEST_CACHE", Path.home() / ".aiva" / "cache"))
SHARED_CACHE.mkdir(parents=True, exist_ok=True)
(TEST_HOME / "cache").symlink_to(SHARED_CACHE, target_is_directory=True)
# VM networking in tests uses its own bridge and a subnet no real setup uses.
(TEST_HOME / "config.yaml").write_text(
    f"networking:\n  bridge_name: aiva-t{os.getpid() % 100000}\n"
    f"  subnet: 10.213.{os.getpid() % 200 + 20}.0/24\n"
)


def docker_client() -> Any:
    try:
        import docker

        client = docker.from_env()
        client.ping()
        return client
    except Exception:
        return None


@pytest.fixture(scope="session")
def docker_ok() -> Any:
    client = docker_client()
    if client is None:
        if os.environ.get("CI"):
            pytest.fail("CI needs a running Docker engine: scripts/setup.sh starts one")
        pytest.skip("no Docker engine answers here (scripts/setup.sh starts one)")
    return client


@pytest.fixture(scope="session")
def gvisor_ok(docker_ok: Any, python_image: str) -> None:
    """The engine knows aiva's runsc runtime; set up here (scripts/gvisor.sh) if not.
    Skips only where runsc cannot be installed or registered, and never in CI."""
    from aiva.backends.docker import GVISOR_RUNTIME

    if GVISOR_RUNTIME in (docker_ok.info().get("Runtimes") or {}):
        return
    script = Path(__file__).resolve().parents[1] / "scripts" / "gvisor.sh"
    import subprocess

    r = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=600)
    if r.returncode == 0 and GVISOR_RUNTIME in (docker_ok.info().get("Runtimes") or {}):
        return
    why = (r.stderr.strip().splitlines() or ["no output"])[-1]
    if os.environ.get("CI"):
        pytest.fail(f"CI needs gVisor: scripts/gvisor.sh failed: {why}")
    pytest.skip(f"gVisor cannot be set up here: {why}")


@pytest.fixture(scope="session")
def python_image(docker_ok: Any) -> str:
    """The aiva/python image, built once (scripts/setup.sh normally has it ready)."""
    from aiva.images import build as images

    return images.build_image("python", client=docker_ok).tag


@pytest.fixture(scope="session")
def desktop_image(docker_ok: Any) -> str:
    """The aiva/desktop image (XFCE, noVNC, ffmpeg ...): about 3 minutes to build the
    first time on this machine, then cached like the others."""
    from aiva.images import build as images

    return images.build_image("desktop", client=docker_ok).tag


@pytest.fixture(scope="session")
def engine(python_image: str) -> Iterator[Any]:
    from aiva.engine import default_engine

    eng = default_engine()
    yield eng
    eng.close()


@pytest.fixture
def make_sandbox(engine: Any) -> Iterator[Any]:
    """Create sandboxes for one test; all are removed afterwards, pass or fail."""
    from aiva.sdk import Sandbox

    made: list[str] = []

    def make(name: str | None = None, **kw: Any) -> Sandbox:
        kw.setdefault("cpus", 1)
        kw.setdefault("memory", "512MB")
        sb = Sandbox.create(name, engine=engine, **kw)
        made.append(sb.name)
        return sb

    yield make
    for name in made:
        if engine.exists(name):
            try:
                engine.delete(name, volumes=True)
            except Exception as exc:  # keep cleaning the rest
                print(f"cleanup of {name} failed: {exc}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if any container or volume of this test home was left behind."""
    client = docker_client()
    if client is not None:
        flt = {"label": f"aiva.home={TEST_HOME}"}
        left = [c.name for c in client.containers.list(all=True, filters=flt)]
        vols = [v.name for v in client.volumes.list(filters=flt)]
        for c in client.containers.list(all=True, filters=flt):
            c.remove(force=True)
        for v in client.volumes.list(filters=flt):
            v.remove(force=True)
        if left or vols:
            print(f"\nLEAK: tests left containers {left} and volumes {vols} (now removed)")
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
    mounted = [d for d in (TEST_HOME / "disks").glob("*/mnt") if os.path.ismount(d)]
    for mnt in mounted:  # never delete through a mount: unmount (the loop device goes)
        subprocess.run(["umount", "-l", str(mnt)], check=False)
    if mounted:
        print(f"\nLEAK: tests left disks mounted {[str(m) for m in mounted]} (now unmounted)")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    from aiva.guard import runmount

    for mount in runmount.mounts_under(TEST_HOME / "run"):  # a sandbox's run dir tmpfs
        runmount.release(mount)
    shutil.rmtree(TEST_HOME, ignore_errors=True)
