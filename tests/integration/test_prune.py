"""Nothing leaks, and what a user kept has a life: `aiva volume ls|rm`, `rm --volumes` of
a removed sandbox, snapshot images swept with their last fork, and `aiva prune`, on a
real Docker engine, in an AIVA_HOME of this test's own (so prune sees only its work)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.docker

AIVA = [sys.executable, "-m", "aiva.cli.main"]


@pytest.fixture
def home(python_image: str) -> Iterator[dict[str, str]]:
    """A short private AIVA_HOME sharing the session's image cache; emptied after."""
    d = Path(tempfile.mkdtemp(prefix="aiva-tp"))
    session_home = Path(os.environ["AIVA_HOME"])  # tests/conftest.py made it
    (d / "cache").symlink_to(session_home / "cache", target_is_directory=True)
    env = {**os.environ, "AIVA_HOME": str(d), "AIVA_NO_DAEMON": "1"}
    try:
        yield env
    finally:
        subprocess.run([*AIVA, "prune"], env=env, capture_output=True, timeout=300)
        for name in json.loads(subprocess.run([*AIVA, "ls", "-o", "json"], env=env,
                                              capture_output=True, text=True).stdout or "[]"):
            subprocess.run([*AIVA, "rm", name["name"], "--volumes"], env=env, timeout=120)
        subprocess.run(["rm", "-rf", "--one-file-system", str(d)], timeout=60)


def aiva(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*AIVA, *args], env=env, capture_output=True, text=True,
                          timeout=300)


def test_kept_data_forks_and_prune(home: dict[str, str], docker_ok: Any) -> None:
    box, copy = f"pb-{uuid.uuid4().hex[:6]}", f"pc-{uuid.uuid4().hex[:6]}"
    # a user's own volume, and another home's aiva volume: never touched
    mine = docker_ok.volumes.create(f"user-{uuid.uuid4().hex[:6]}")
    other = docker_ok.volumes.create(f"aiva-other-{uuid.uuid4().hex[:6]}", labels={
        "aiva.managed": "true", "aiva.home": "/elsewhere", "aiva.sandbox_id": "0" * 32})
    try:
        assert aiva(home, "start", box, "--memory", "256MB").returncode == 0
        assert aiva(home, "exec", box, "--", "sh", "-c", "echo kept > f").returncode == 0
        assert aiva(home, "snapshot", box, "s1").returncode == 0
        assert aiva(home, "start", copy, "--from-snapshot", f"{box}:s1").returncode == 0
        snap_images = [i for i in docker_ok.images.list(filters={"label": "aiva.snapshot=s1"})
                       if i.labels.get("aiva.home") == home["AIVA_HOME"]]
        assert len(snap_images) == 1
        # the source goes while its fork runs: the image stays, the fork needs it
        assert aiva(home, "rm", box, "--volumes").returncode == 0
        assert docker_ok.images.get(snap_images[0].id)
        # the fork goes without --volumes: its data is kept, the image is swept
        r = aiva(home, "rm", copy)
        assert r.returncode == 0 and f"aiva volume rm {copy}" in r.stderr
        import docker

        with pytest.raises(docker.errors.ImageNotFound):
            docker_ok.images.get(snap_images[0].id)
        listed = json.loads(aiva(home, "volume", "ls", "-o", "json").stdout)
        assert [(v["kind"], v["sandbox"]) for v in listed] == [("disk", copy)]
        # `rm --volumes` of the removed sandbox removes what it kept (it used to say
        # "no sandbox named ...")
        r = aiva(home, "rm", copy, "--volumes")
        assert r.returncode == 0 and "removed the kept disk" in r.stderr, r.stderr
        assert json.loads(aiva(home, "volume", "ls", "-o", "json").stdout) == []
        r = aiva(home, "rm", copy, "--volumes")
        assert r.returncode == 1 and f"no sandbox named '{copy}'" in r.stderr

        # prune: a kept disk and a crashed sandbox's run dir, listed, then removed
        assert aiva(home, "start", box, "--memory", "256MB").returncode == 0
        assert aiva(home, "rm", box).returncode == 0
        stray = Path(home["AIVA_HOME"]) / "run" / "abcdef012345"
        stray.mkdir(parents=True)
        dry = json.loads(aiva(home, "prune", "--dry-run", "-o", "json").stdout)
        assert sorted(x["kind"] for x in dry) == ["disk", "run dir"]
        assert stray.exists()  # a dry run changes nothing
        r = aiva(home, "prune")
        assert r.returncode == 0 and "pruned 2 of 2" in r.stderr, r.stderr
        assert not stray.exists()
        r = aiva(home, "prune", "--dry-run")
        assert r.returncode == 0 and "nothing to prune" in r.stderr
        mine.reload()
        other.reload()  # both still there
    finally:
        mine.remove(force=True)
        other.remove(force=True)
