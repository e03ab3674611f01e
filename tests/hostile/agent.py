"""A hostile aiva agent: speaks the real frame format, answers as an attacker would.

Stdlib only (Python >= 3.8), so it also runs inside a sandbox, where code that has taken
over the container removes ``/.aiva/run/agent.sock`` and binds its own socket there: the
next host process that connects talks to this instead of the real agent.

What it answers is a *script*: a JSON object ::

    {"ops": {"fs.read": [ACTION, ...], ...},   # per op; an op left out answers sanely
     "default": "sane" | "hang" | "close",     # for ops the script does not name
     "greeting": [ACTION, ...]}                # sent on every new connection first

An ACTION is a one-key object (extra keys are its options):

    {"event": X} {"result": X} {"error": X}   a JSON frame on the request's channel
    {"text": "...", "kind": "EVENT"}          a control frame whose payload is not JSON
    {"data": N, "chunk": C}                   N bytes of DATA (N < 0: without end)
    {"stdout": N} {"stderr": N}               the same as STDOUT / STDERR frames
    {"walk": {"names": [...], "mode": M, "size": S, "batches": B, "per_batch": P}}
                                              fs.walk EVENT batches (B < 0: without end)
    {"frame": {"kind": "DATA", "channel": C, "size": N, "repeat": R}}
                                              frames on a channel (default: never opened)
    {"garbage": N}                            N random bytes on the stream
    {"consume": true}                         read the request's DATA until its EOF
    {"sleep": S} {"hang": true} {"close": true}

``"record": PATH`` in a script appends every SIGNAL frame the host sends to PATH.

"$bytes" in a JSON value is replaced by what ``consume`` counted. Named scenarios
(``--scenario``) are prepared scripts; tests build their own with the functions below.

Usage: ``python3 agent.py (--stdio | --listen PATH) [--scenario NAME [--arg X] |
--script JSON | --script-file PATH] [--protocol-dir DIR]``. With ``--script-file`` the
file is read again for every connection, so a test can change the script between calls.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import socket
import sys
import threading
import time

FLOOD_CAP = 1 << 40  # "without end" (a flood costs this side CPU only, never memory)
BLOCK = 1 << 20
HOSTILE_VERSION = "hostile"


def load_protocol(dirs):
    # type: (list) -> object
    """The real framing module: aiva's when importable, else the sandbox's agent bundle."""
    try:
        from aiva.agent import protocol

        return protocol
    except ImportError:
        for d in [*dirs, "/.aiva/agent"]:
            if os.path.isfile(os.path.join(d, "protocol.py")):
                sys.path.insert(0, d)
                import protocol  # type: ignore[import-not-found,no-redef]

                return protocol
        raise


p = None  # type: object  # set by main() or by a host test through load_protocol()

# --------------------------------------------------------------------------- scripts


def script(ops=None, default="sane", greeting=None, record=None):
    # type: (dict | None, str, list | None, str | None) -> dict
    return {"ops": ops or {}, "default": default, "greeting": greeting or [],
            "record": record}


def walk_reply(names, mode=0o644, size=3, mtime_ns=1700000000000000000, dirs=None):
    # type: (list, object, object, object, list | None) -> list
    """fs.walk answering with exactly these file names (and dirs)."""
    files = {n: [size, mtime_ns, mode] for n in names}
    return [{"event": {"files": files, "dirs": dirs or []}}, {"result": {"count": len(files)}}]


def read_reply(size=3, sent=3, mode=0o644, mtime_ns=1700000000000000000, meta=None,
               then=None):
    # type: (object, int, object, object, dict | None, list | None) -> list
    """fs.read: the declared stat (``meta`` replaces it whole), ``sent`` bytes, RESULT."""
    head = meta if meta is not None else {"size": size, "mode": mode, "mtime_ns": mtime_ns}
    tail = then if then is not None else [{"result": {"bytes": sent}}]
    return [{"event": head}, {"data": sent}, *tail]


def stat_reply(kind="dir", size=0, mode=0o755):
    # type: (str, object, object) -> list
    return [{"result": {"name": "x", "path": "/x", "type": kind, "size": size, "mode": mode,
                        "mtime": 1700000000.0, "mtime_ns": 1700000000000000000,
                        "uid": 0, "gid": 0}}]


def exec_reply(started=4242, exit_code=0, duration=0.01, timed_out=False, pid=4242,
               stdout=3, result=None):
    # type: (object, object, object, object, object, int, dict | None) -> list
    res = result if result is not None else {"exit_code": exit_code, "duration": duration,
                                             "pid": pid, "timed_out": timed_out}
    return [{"event": {"started": started}}, {"stdout": stdout}, {"result": res}]


def _escape(arg):
    # type: (str | None) -> str
    return arg or "../../../../../tmp/x/evil"


SCENARIOS = {
    "sane": lambda arg: script(),
    "never-answer": lambda arg: script(default="hang"),
    "close-at-once": lambda arg: script(default="close"),
    "walk-escape": lambda arg: script({"fs.walk": walk_reply([_escape(arg)]),
                                       "fs.read": read_reply(mode=0o6777)}),
    "walk-absolute": lambda arg: script({"fs.walk": walk_reply([arg or "/etc/evil"])}),
    "walk-dotdot-inside": lambda arg: script({"fs.walk": walk_reply(["a/../../b"])}),
    "walk-nul": lambda arg: script({"fs.walk": walk_reply(["ok\x00/../../evil"])}),
    "walk-long": lambda arg: script({"fs.walk": walk_reply(["n" * 5000])}),
    "walk-deep": lambda arg: script({"fs.walk": walk_reply(["d/" * 3000 + "f"])}),
    "walk-endless": lambda arg: script({"fs.walk": [{"walk": {"batches": -1}}]}),
    "mode-setuid": lambda arg: script({"fs.walk": walk_reply(["f"], mode=0o6777),
                                       "fs.read": read_reply(mode=0o6777)}),
    "mode-7777": lambda arg: script({"fs.walk": walk_reply(["f"], mode=0o7777),
                                     "fs.read": read_reply(mode=0o7777)}),
    "mode-negative": lambda arg: script({"fs.read": read_reply(mode=-1)}),
    "mode-string": lambda arg: script({"fs.read": read_reply(mode="rwsrwsrwx")}),
    "read-huge-declared": lambda arg: script({"fs.read": read_reply(size=1 << 62, sent=10)}),
    "read-lies-long": lambda arg: script({"fs.read": read_reply(size=10, sent=10 << 20)}),
    "read-lies-short": lambda arg: script({"fs.read": read_reply(size=10 << 20, sent=10)}),
    "read-endless": lambda arg: script({"fs.read": read_reply(size=100, sent=-1)}),
    "read-close-mid": lambda arg: script({"fs.read": read_reply(size=1 << 20, sent=1000,
                                                                then=[{"close": True}])}),
    "exec-bad-started": lambda arg: script({"exec": exec_reply(started="pid")}),
    "exec-bad-exit": lambda arg: script({"exec": exec_reply(exit_code="0")}),
    "exec-bad-duration": lambda arg: script({"exec": exec_reply(duration="fast")}),
    "exec-bad-timed-out": lambda arg: script({"exec": exec_reply(timed_out="no")}),
    "exec-endless-stdout": lambda arg: script({"exec": [{"event": {"started": 7}},
                                                        {"stdout": -1}]}),
    "stray-channels": lambda arg: script(greeting=[{"frame": {"kind": "DATA", "size": BLOCK,
                                                              "repeat": 64}}]),
    "garbage": lambda arg: script(greeting=[{"garbage": 1 << 20}]),
}


# --------------------------------------------------------------------------- serving


class Conn:
    """One client stream: a reader (here) and one thread per request channel."""

    def __init__(self, rfd, wfd, get_script, on_close):
        # type: (int, int, object, object) -> None
        self.rfd, self.wfd = rfd, wfd
        self.get_script = get_script
        self.on_close = on_close
        self.lock = threading.Lock()
        self.inbox = {}  # type: dict
        self.closed = False
        self.cancels = 0

    # -- output

    def send(self, data):
        # type: (bytes) -> None
        with self.lock:
            view = memoryview(data)
            while view:
                try:
                    n = os.write(self.wfd, view)
                except InterruptedError:
                    continue
                view = view[n:]

    def frame(self, kind, chan, payload=b""):
        # type: (int, int, bytes) -> None
        self.send(p.encode(kind, chan, payload))  # type: ignore[attr-defined]

    def close(self):
        # type: () -> None
        self.closed = True
        self.on_close()

    # -- input

    def serve(self):
        # type: () -> None
        sc = self.get_script()
        try:
            if sc.get("greeting"):
                self.run_actions(sc["greeting"], 0, {}, sc)
            decoder = p.Decoder()  # type: ignore[attr-defined]
            while not self.closed:
                data = os.read(self.rfd, 1 << 20)
                if not data:
                    break
                for kind, chan, payload in decoder.feed(data):
                    self.on_frame(kind, chan, payload)
        except OSError:
            pass
        self.close()

    def on_frame(self, kind, chan, payload):
        # type: (int, int, bytes) -> None
        K = p.FrameKind  # type: ignore[attr-defined]
        if kind == K.OPEN:
            try:
                req = json.loads(payload.decode("utf-8"))
            except ValueError:
                return
            box = queue.Queue()  # type: queue.Queue
            self.inbox[chan] = box
            threading.Thread(target=self.answer, args=(chan, req, box), daemon=True).start()
            return
        if kind == K.SIGNAL:
            self.cancels += 1  # a hostile agent ignores cancels (it may keep talking)
            record = self.get_script().get("record")
            if record:  # for tests: which signals the host sent
                with open(record, "a") as f:
                    f.write(json.dumps({"chan": chan, "signal": payload.decode(
                        "utf-8", "replace")}) + "\n")
        box = self.inbox.get(chan)
        if box is not None:
            box.put((kind, payload))

    def answer(self, chan, req, box):
        # type: (int, dict, queue.Queue) -> None
        sc = self.get_script()
        op = str(req.get("op"))
        actions = sc.get("ops", {}).get(op)
        if actions is None:
            mode = sc.get("default", "sane")
            actions = sane(op, req) if mode == "sane" else [{mode: True}]
        try:
            self.run_actions(actions, chan, {"box": box}, sc)
        except OSError:
            self.close()

    # -- actions

    def run_actions(self, actions, chan, ctx, sc):
        # type: (list, int, dict, dict) -> None
        K = p.FrameKind  # type: ignore[attr-defined]
        for act in actions:
            if self.closed:
                return
            if "event" in act or "result" in act or "error" in act:
                key = "event" if "event" in act else "result" if "result" in act else "error"
                kind = {"event": K.EVENT, "result": K.RESULT, "error": K.ERROR}[key]
                body = _subst(act[key], ctx)
                self.frame(kind, chan, json.dumps(body, separators=(",", ":")).encode())
            elif "text" in act:
                kind = getattr(K, act.get("kind", "EVENT"))
                self.frame(kind, chan, act["text"].encode("utf-8", "surrogatepass"))
            elif "data" in act or "stdout" in act or "stderr" in act:
                key = "data" if "data" in act else "stdout" if "stdout" in act else "stderr"
                kind = {"data": K.DATA, "stdout": K.STDOUT, "stderr": K.STDERR}[key]
                self.flood(kind, chan, int(act[key]), int(act.get("chunk", BLOCK)))
            elif "walk" in act:
                self.walk_batches(chan, act["walk"])
            elif "frame" in act:
                f = act["frame"]
                kind = getattr(K, f.get("kind", "DATA"))
                target = f.get("channel", "stray")
                ch = chan + 100000 if target == "stray" else int(target)
                block = b"S" * int(f.get("size", 16))
                for _ in range(int(f.get("repeat", 1))):
                    self.frame(kind, ch, block)
            elif "garbage" in act:
                self.send(os.urandom(int(act["garbage"])))
            elif "consume" in act:
                ctx["bytes"] = self.consume(ctx.get("box"))
            elif "sleep" in act:
                time.sleep(float(act["sleep"]))
            elif "hang" in act:
                while not self.closed:
                    time.sleep(0.05)
                return
            elif "close" in act:
                self.close()
                return

    def flood(self, kind, chan, size, chunk):
        # type: (int, int, int, int) -> None
        chunk = max(1, min(chunk, BLOCK * 4))
        block = b"A" * chunk
        left = FLOOD_CAP if size < 0 else size
        while left > 0 and not self.closed:
            n = min(left, chunk)
            self.frame(kind, chan, block if n == chunk else block[:n])
            left -= n

    def walk_batches(self, chan, spec):
        # type: (int, dict) -> None
        K = p.FrameKind  # type: ignore[attr-defined]
        batches = int(spec.get("batches", 1))
        per = int(spec.get("per_batch", 5000))
        mode, size = spec.get("mode", 0o644), spec.get("size", 3)
        sent = 0
        i = 0
        while (batches < 0 or i < batches) and not self.closed and sent < FLOOD_CAP:
            names = spec.get("names") or [f"w{i}/f{j}" for j in range(per)]
            body = {"files": {n: [size, 1700000000000000000, mode] for n in names}}
            payload = json.dumps(body, separators=(",", ":")).encode()
            self.frame(K.EVENT, chan, payload)
            sent += len(payload)
            i += 1
        if batches >= 0 and not self.closed:
            self.frame(K.RESULT, chan, b'{"count":0}')

    def consume(self, box):
        # type: (queue.Queue | None) -> int
        K = p.FrameKind  # type: ignore[attr-defined]
        total = 0
        while box is not None and not self.closed:
            try:
                kind, payload = box.get(timeout=0.1)
            except queue.Empty:
                continue
            if kind in (K.DATA, K.STDIN):
                total += len(payload)
            elif kind in (K.EOF, K.SIGNAL):
                break
        return total


def _subst(value, ctx):
    # type: (object, dict) -> object
    if value == "$bytes":
        return ctx.get("bytes", 0)
    if isinstance(value, dict):
        return {k: _subst(v, ctx) for k, v in value.items()}
    if isinstance(value, list):
        return [_subst(v, ctx) for v in value]
    return value


def sane(op, req):
    # type: (str, dict) -> list
    """What an honest (and empty) agent would say, so a script only scripts the lie."""
    if op == "ping":
        return [{"result": {"version": HOSTILE_VERSION, "pid": os.getpid(), "uid": 0,
                            "python": ".".join(map(str, sys.version_info[:3]))}}]
    if op == "exec":
        return exec_reply(stdout=0)
    if op == "fs.stat":
        return stat_reply("dir")
    if op == "fs.walk":
        return walk_reply([])
    if op == "fs.hash":
        return [{"result": {"hashes": {rel: None for rel in req.get("paths", [])}}}]
    if op == "fs.read":
        return read_reply()
    if op == "fs.write":
        return [{"consume": True}, {"result": {"bytes": "$bytes"}}]
    if op == "fs.list":
        return [{"result": {"entries": []}}]
    if op in ("fs.mkdir", "fs.remove"):
        return [{"result": {"path": req.get("path")}}]
    if op == "fs.rename":
        return [{"result": {"src": req.get("src"), "dst": req.get("dst")}}]
    if op == "proc.list":
        return [{"result": {"procs": []}}]
    if op == "sys.metrics":
        return [{"result": {}}]
    return [{"error": {"kind": "RequestError", "message": f"unknown op {op}"}}]


# --------------------------------------------------------------------------- main


def _script_source(args):
    # type: (argparse.Namespace) -> object
    if args.script_file:
        path = args.script_file

        def from_file():
            # type: () -> dict
            with open(path) as f:
                return json.load(f)

        return from_file
    if args.script:
        fixed = json.loads(args.script)
    else:
        fixed = SCENARIOS[args.scenario](args.arg)
    return lambda: fixed


def listen(path, get_script):
    # type: (str, object) -> None
    """Take over ``path``: remove what is there, bind, rename into place, serve forever."""
    tmp = path + ".hostile"
    for stale in (tmp, path):
        try:
            os.unlink(stale)
        except FileNotFoundError:
            pass
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(tmp)
    os.chmod(tmp, 0o666)
    srv.listen(64)
    os.rename(tmp, path)
    sys.stderr.write(f"hostile agent listening on {path}\n")
    sys.stderr.flush()
    while True:
        c, _ = srv.accept()

        def run(c=c):
            # type: (socket.socket) -> None
            def shut():
                # type: () -> None
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

            Conn(c.fileno(), c.fileno(), get_script, shut).serve()
            c.close()

        threading.Thread(target=run, daemon=True).start()


def main(argv=None):
    # type: (list | None) -> int
    global p
    parser = argparse.ArgumentParser(prog="hostile-agent")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--stdio", action="store_true", help="serve one client on fds 0/1")
    where.add_argument("--listen", metavar="PATH", help="replace the Unix socket at PATH")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--scenario", choices=sorted(SCENARIOS), default="sane")
    what.add_argument("--script", help="a script as JSON")
    what.add_argument("--script-file", help="a JSON script file, read on every connection")
    parser.add_argument("--arg", help="the scenario's argument (a walk name ...)")
    parser.add_argument("--protocol-dir", action="append", default=[],
                        help="where protocol.py is, if aiva is not importable")
    args = parser.parse_args(argv)
    p = load_protocol(args.protocol_dir)
    get_script = _script_source(args)
    if args.listen:
        listen(args.listen, get_script)
        return 0
    Conn(0, 1, get_script, lambda: os._exit(0)).serve()
    os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
