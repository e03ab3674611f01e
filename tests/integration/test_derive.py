"""``aiva image derive``: an image from another plus commands, cached, leaving no trace of
the build's CA bundle; a failing command is a clear error."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest

from aiva import errors
from aiva.images import build as images
from aiva.images import derive

pytestmark = pytest.mark.docker


def test_derive_caches_and_leaves_no_build_trace(python_image: str, docker_ok: Any) -> None:
    tag = f"aiva-test/derived-{uuid.uuid4().hex[:6]}:latest"
    marker = uuid.uuid4().hex
    try:
        info = derive.derive(tag, base="python", client=docker_ok,
                             run=[f"echo {marker} > /hello", "test -n \"$SSL_CERT_FILE\""])
        assert info.tag == tag and info.managed
        image = docker_ok.images.get(tag)
        labels = image.labels
        assert labels[derive.DERIVED_FROM] == "python" and labels[images.TEMPLATE] == ""
        env = image.attrs["Config"]["Env"] or []
        assert not [e for e in env if e.split("=")[0] in derive.CA_VARS]
        out = docker_ok.containers.run(tag, ["sh", "-c", "cat /hello; ls /run"], remove=True)
        assert out.decode().split() == [marker, "lock"]  # no /run/aiva-build left
        t0 = time.monotonic()
        again = derive.derive(tag, base="python", client=docker_ok,
                              run=[f"echo {marker} > /hello", "test -n \"$SSL_CERT_FILE\""])
        assert again.id == info.id and time.monotonic() - t0 < 5
        with pytest.raises(errors.ImageError, match="exited 3"):
            derive.derive(tag, base="python", client=docker_ok, run=["echo boom; exit 3"])
        assert docker_ok.images.get(tag).id.split(":")[-1][:12] == info.id  # kept
    finally:
        try:
            docker_ok.images.remove(tag, force=True)
        except Exception as exc:
            print(f"could not remove {tag}: {exc}")
