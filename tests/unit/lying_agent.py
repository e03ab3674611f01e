"""A deliberately lying agent: speaks the aiva protocol over stdio, says what it is told.

Run as ``python lying_agent.py CONFIG_JSON``. CONFIG::

    {"root": "/r",                       # the remote root the host will walk
     "stat_type": "file",                # what fs.stat answers for any path
     "files": {REL: {"size": N,          # size declared in fs.walk and fs.read
                     "read_size": N,     # (optional) size declared by fs.read instead
                     "mode": M, "mtime_ns": T,
                     "send": N},         # bytes actually sent (default: the size)
               ...},
     "walk": {REL: VALUE}}               # (optional) raw walk entries, sent as they are

Only what sync and copy-out need is answered; writes are swallowed. Stdlib only.
"""

from __future__ import annotations

import json
import os
import sys

from aiva.agent import protocol as p

K = p.FrameKind
CHUNK = 256 << 10


class Liar:
    def __init__(self, cfg: dict) -> None:
        self.cfg = cfg
        self.root = cfg.get("root", "/r")
        self.files = cfg.get("files", {})
        self.writes: dict[int, int] = {}
        self.out = sys.stdout.buffer

    def send(self, kind: int, chan: int, obj: object) -> None:
        self.out.write(p.encode_json(kind, chan, obj))
        self.out.flush()

    def rel(self, path: str) -> str:
        prefix = self.root.rstrip("/") + "/"
        return path[len(prefix):] if path.startswith(prefix) else path

    def open(self, chan: int, req: dict) -> None:
        op = req.get("op")
        if op == "fs.walk":
            walk = self.cfg.get("walk") or {
                rel: [f["size"], f.get("mtime_ns", 0), f.get("mode", 0o644)]
                for rel, f in self.files.items()}
            self.send(K.EVENT, chan, {"files": walk, "dirs": []})
            self.send(K.RESULT, chan, {"count": len(walk)})
        elif op == "fs.read":
            f = self.files.get(self.rel(req["path"]))
            if f is None:
                self.send(K.ERROR, chan, {"kind": "FileNotFoundError", "message": "no such file"})
                return
            declared = f.get("read_size", f["size"])
            self.send(K.EVENT, chan, {"size": declared, "mode": f.get("mode", 0o644),
                                      "mtime_ns": f.get("mtime_ns", 0)})
            left = f.get("send", declared)
            while left > 0:
                n = min(left, CHUNK)
                self.out.write(p.encode(K.DATA, chan, b"x" * n))
                left -= n
            self.send(K.RESULT, chan, {"bytes": f.get("send", declared)})
        elif op == "fs.stat":
            self.send(K.RESULT, chan, {"type": self.cfg.get("stat_type", "file"),
                                       "size": 0, "mode": 0o644, "mtime_ns": 0})
        elif op == "fs.hash":
            self.send(K.RESULT, chan, {"hashes": {}})
        elif op in ("fs.mkdir", "fs.remove", "fs.rename", "ping"):
            self.send(K.RESULT, chan, {})
        elif op == "fs.write":
            self.writes[chan] = 0
        else:
            self.send(K.ERROR, chan, {"kind": "Error", "message": f"unsupported: {op}"})

    def frame(self, kind: int, chan: int, payload: bytes) -> None:
        if kind == K.OPEN:
            self.open(chan, p.decode_json(payload))
        elif kind == K.DATA and chan in self.writes:
            self.writes[chan] += len(payload)
        elif kind == K.EOF and chan in self.writes:
            self.send(K.RESULT, chan, {"bytes": self.writes.pop(chan)})


def main() -> None:
    liar = Liar(json.loads(sys.argv[1]))
    decoder = p.Decoder()
    while True:
        data = os.read(sys.stdin.fileno(), 1 << 16)
        if not data:
            return
        for kind, chan, payload in decoder.feed(data):
            liar.frame(kind, chan, payload)


if __name__ == "__main__":
    main()
