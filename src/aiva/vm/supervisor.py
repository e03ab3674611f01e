"""One host process per VM: it owns the QEMU process and everything that talks to it.

    python -m aiva.vm.supervisor VM_DIR      (VM_DIR/launch.json says what to run)

- runs QEMU as its child and records how it ended in ``exit.json``, so a VM that dies
  is reported with a reason, and the supervisor exits with it (nothing outlives the VM);
- multiplexes the agent: QEMU's virtio-serial chardev accepts one connection, so the
  supervisor holds it and serves any number of aiva clients on ``agent.sock``, giving
  each client's channels their own ids upstream. A client that goes away has its open
  channels cancelled in the guest;
- timestamps the serial console into ``console.jsonl`` (the engine log of a VM) and
  writes the guest's syslog port into ``syslog.jsonl``: both are the guest's words, so both
  are bounded here (lines cut at ``MAX_LINE``, files rotated to ``.1`` at ``ROTATE_AT``)
  and a guest that floods them cannot fill the host's disk;
- first starts the VM's helpers (``launch.json`` ``helpers``: virtiofsd for host
  directories, see ``aiva.vm.hostfs``), waits for each one's socket, and ends them after
  QEMU.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

from aiva.agent import protocol as p
from aiva.network import vm_bridge as network

K = p.FrameKind
ROTATE_AT = 8 << 20  # bytes: a log file moves to NAME.1 (replacing the older one) past this
MAX_LINE = 64 << 10  # bytes of one line kept; the rest of an overlong line is dropped


class BoundedLog:
    """An append-only JSON-lines file of at most about ``2 * ROTATE_AT`` bytes on disk:
    past ``ROTATE_AT`` it becomes ``NAME.1`` and a new one starts. The file is created by
    this (host) process in the VM's own directory; the guest only chooses the bytes."""

    def __init__(self, path: Path, rotate_at: int = ROTATE_AT) -> None:
        self.path, self.rotate_at = path, rotate_at
        self._f = self._open()

    def _open(self) -> Any:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600)
        return os.fdopen(fd, "ab")

    def write(self, line: bytes) -> None:
        if self._f.tell() + len(line) > self.rotate_at and self._f.tell() > 0:
            self._f.close()
            os.replace(self.path, self.path.with_name(self.path.name + ".1"))
            self._f = self._open()
        self._f.write(line)
        self._f.flush()

    def close(self) -> None:
        self._f.close()


async def read_lines(reader: asyncio.StreamReader) -> Any:
    """Lines from ``reader`` without their ending, each cut at ``MAX_LINE`` bytes: an
    endless line costs a bounded buffer, never the host's memory."""
    pending = bytearray()
    dropping = False
    while data := await reader.read(1 << 16):
        pending += data
        while True:
            end = pending.find(b"\n")
            if end < 0:
                if len(pending) > MAX_LINE:
                    if not dropping:
                        yield bytes(pending[:MAX_LINE])
                    dropping = True
                    pending.clear()
                break
            line = bytes(pending[:end]).rstrip(b"\r")
            del pending[:end + 1]
            if not dropping:
                yield line[:MAX_LINE]
            dropping = False
    if pending and not dropping:
        yield bytes(pending[:MAX_LINE])


class Client:
    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.chans: dict[int, int] = {}  # client channel -> upstream channel


class Mux:
    """Rewrites channel ids between many clients and the one upstream agent stream."""

    def __init__(self, upstream: asyncio.StreamWriter) -> None:
        self.up = upstream
        # a guest restored from a snapshot may still hold channels opened before it was
        # saved: start somewhere random so new ids do not collide with them
        self.ids = itertools.count(secrets.randbits(30) * 2 + 1, 2)
        self.routes: dict[int, tuple[Client, int]] = {}

    async def from_client(self, client: Client, kind: int, chan: int, payload: bytes) -> None:
        if kind == K.OPEN:
            up = next(self.ids)
            client.chans[chan] = up
            self.routes[up] = (client, chan)
        up_chan = client.chans.get(chan)
        if up_chan is None:
            return
        self.up.write(p.encode(kind, up_chan, payload))
        await self.up.drain()

    async def from_agent(self, kind: int, chan: int, payload: bytes) -> None:
        route = self.routes.get(chan)
        if route is None:
            return
        client, cchan = route
        if kind in (K.RESULT, K.ERROR):
            del self.routes[chan]
            client.chans.pop(cchan, None)
        try:
            client.writer.write(p.encode(kind, cchan, payload))
            await client.writer.drain()
        except (ConnectionError, RuntimeError):
            pass  # the client is gone; its close handler cancels the channel

    def client_gone(self, client: Client) -> None:
        for up in client.chans.values():
            self.routes.pop(up, None)
            self.up.write(p.encode_json(K.SIGNAL, up, {"cancel": True}))
        client.chans.clear()


async def _connect(path: str, deadline: float, handshake: str | None = None,
                   child: asyncio.Task[int] | None = None
                   ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Retry until ``deadline`` or the VMM's exit. ``handshake``: Firecracker's vsock Unix
    socket wants ``CONNECT <port>\\n`` and answers ``OK <n>\\n`` once the guest accepts;
    until the guest listens it closes the connection instead."""
    while True:
        try:
            reader, writer = await asyncio.open_unix_connection(path, limit=1 << 22)
            if handshake is None:
                return reader, writer
            writer.write(handshake.encode())
            left = max(0.1, deadline - time.monotonic())
            if (await asyncio.wait_for(reader.readline(), left)).startswith(b"OK "):
                return reader, writer
            writer.close()
            raise ConnectionRefusedError(f"{path}: no listener for {handshake.strip()!r}")
        except OSError:
            if time.monotonic() > deadline or (child is not None and child.done()):
                raise
            await asyncio.sleep(0.02 if handshake else 0.005)


async def _pump_agent(reader: asyncio.StreamReader, mux: Mux) -> None:
    decoder = p.Decoder()
    while data := await reader.read(1 << 20):
        for kind, chan, payload in decoder.feed(data):
            await mux.from_agent(kind, chan, payload)


async def _pump_console(reader: asyncio.StreamReader, out: Path) -> None:
    log = BoundedLog(out)
    try:
        async for line in read_lines(reader):
            text = line.decode("utf-8", "replace")
            log.write((json.dumps({"t": time.time(), "s": "console", "d": text}) + "\n")
                      .encode())
    finally:
        log.close()


async def _pump_syslog(reader: asyncio.StreamReader, out: Path) -> None:
    """The guest agent's syslog port: JSON lines it formats itself, kept as they come
    (whoever reads them parses them as untrusted), bounded like the console."""
    log = BoundedLog(out)
    try:
        async for line in read_lines(reader):
            log.write(line + b"\n")
    finally:
        log.close()


async def _start_helpers(vm_dir: Path, helpers: list[dict[str, Any]], deadline: float
                         ) -> tuple[list[asyncio.subprocess.Process], str | None]:
    """Start each helper; wait until its socket exists. Returns the processes and, if one
    failed, why (the last line of its log)."""
    procs: list[asyncio.subprocess.Process] = []
    for h in helpers:
        with open(h["log"], "ab") as log:
            procs.append(await asyncio.create_subprocess_exec(
                *h["argv"], stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log))
        (vm_dir / "helpers.pid").write_text("".join(f"{x.pid}\n" for x in procs))
        while not os.path.exists(h["socket"]):
            if procs[-1].returncode is not None or time.monotonic() > deadline:
                try:
                    lines = Path(h["log"]).read_text(errors="replace").strip().splitlines()
                except OSError:
                    lines = []
                why = lines[-1] if lines else f"exit status {procs[-1].returncode}"
                return procs, f"{Path(h['argv'][0]).name} helper failed: {why}"
            await asyncio.sleep(0.01)
    return procs, None


async def _end_helpers(procs: list[asyncio.subprocess.Process]) -> None:
    """virtiofsd exits by itself once QEMU disconnects: give it a moment, then kill."""
    for proc in procs:
        try:
            await asyncio.wait_for(proc.wait(), 2)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def supervise(vm_dir: Path) -> int:
    spec: dict[str, Any] = json.loads((vm_dir / "launch.json").read_text())
    (vm_dir / "exit.json").unlink(missing_ok=True)
    on_stdout = spec["console"] == "stdout"  # Firecracker: its serial console is its stdout
    helpers, failed = await _start_helpers(vm_dir, spec.get("helpers") or [],
                                           time.monotonic() + 20)
    if failed is not None:
        for proc in helpers:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
        with (vm_dir / "qemu.log").open("a") as qlog:  # where a failed boot is explained
            qlog.write(f"aiva: {failed}\n")
        _record_exit(vm_dir, None, failed)
        return 1
    try:
        return await _supervise_vmm(vm_dir, spec, on_stdout)
    finally:
        await _end_helpers(helpers)


async def _supervise_vmm(vm_dir: Path, spec: dict[str, Any], on_stdout: bool) -> int:
    with (vm_dir / "qemu.log").open("ab") as qlog:
        qemu = await asyncio.create_subprocess_exec(*spec["argv"], stdin=asyncio.subprocess.DEVNULL,
                                                    stdout=asyncio.subprocess.PIPE if on_stdout
                                                    else qlog, stderr=qlog, limit=1 << 22)
    deadline = time.monotonic() + float(spec.get("connect_timeout", 30))
    waiter = asyncio.create_task(qemu.wait())
    try:
        if on_stdout and qemu.stdout is not None:
            con_r = qemu.stdout
        else:
            con_r, _con_w = await _connect(spec["console"], deadline)
        # read the console at once: a full pipe would stall the guest's serial port
        console = asyncio.create_task(_pump_console(con_r, vm_dir / "console.jsonl"))
        pumps = [console]
        if spec.get("syslog_upstream"):
            log_r, _log_w = await _connect(spec["syslog_upstream"], deadline)
            pumps.append(asyncio.create_task(_pump_syslog(log_r, Path(spec["syslog_out"]))))
        up_r, up_w = await _connect(spec["agent_upstream"], deadline,
                                    spec.get("agent_handshake"), waiter)
    except OSError as exc:
        try:
            qemu.kill()
        except ProcessLookupError:
            pass  # it exited already, which is what ended the wait
        await waiter
        _record_exit(vm_dir, qemu.returncode, f"cannot reach QEMU's sockets: {exc}")
        return 1
    mux = Mux(up_w)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        client = Client(writer)
        decoder = p.Decoder()
        try:
            while data := await reader.read(1 << 20):
                for kind, chan, payload in decoder.feed(data):
                    await mux.from_client(client, kind, chan, payload)
        except ConnectionError:
            pass
        finally:
            mux.client_gone(client)
            writer.close()

    listen = spec["agent_listen"]
    Path(listen).unlink(missing_ok=True)
    old_umask = os.umask(0o177)  # the socket is the VM: owner only
    try:
        server = await asyncio.start_unix_server(serve, listen, limit=1 << 22)
    finally:
        os.umask(old_umask)
    forwards: list[asyncio.Server] = []
    if spec.get("network"):
        try:
            forwards = await network.start_forwards(network.VmNetwork.from_dict(spec["network"]))
        except OSError as exc:
            qemu.kill()
            await waiter
            server.close()
            _record_exit(vm_dir, qemu.returncode, f"cannot publish ports: {exc}")
            return 1
    tasks = [asyncio.create_task(_pump_agent(up_r, mux)), *pumps]
    code = await waiter
    server.close()
    for fwd in forwards:
        fwd.close()
    for t in tasks:
        t.cancel()
    Path(listen).unlink(missing_ok=True)
    _record_exit(vm_dir, code, None)
    return 0


def _record_exit(vm_dir: Path, code: int | None, reason: str | None) -> None:
    data = {"code": code, "at": time.time(), "reason": reason}
    tmp = vm_dir / "exit.json.tmp"
    tmp.write_text(json.dumps(data))
    tmp.replace(vm_dir / "exit.json")


def main() -> int:
    if len(sys.argv) != 2:
        print("usage: python -m aiva.vm.supervisor VM_DIR", file=sys.stderr)
        return 2
    return asyncio.run(supervise(Path(sys.argv[1])))


if __name__ == "__main__":
    sys.exit(main())
