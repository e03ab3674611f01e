"""The wire format between aiva and its in-sandbox agent. Stdlib only, Python >= 3.8.

One byte stream carries many channels. Every frame is a 16-byte header and a payload:

    magic  b"\\xa1\\x7a"   2 bytes
    kind   FrameKind     1 byte
    flags  0             1 byte
    chan   channel id    4 bytes, big endian (the client picks it; odd numbers)
    length payload size  4 bytes, big endian, at most MAX_PAYLOAD
    crc    crc32 of the 12 bytes above, 4 bytes

The header checksum lets a reader that meets garbage skip to the next real frame, so the
format works over streams with no connection boundaries (virtio-serial, a serial line)
as well as over sockets; garbage in never kills the reader and never makes it wait for a
payload that will not come (a bad header is skipped, not trusted).

A channel starts with OPEN (a JSON request ``{"op": ...}``), carries STDIN / STDOUT /
STDERR / DATA bytes and EVENT / SIGNAL / EOF control frames, and ends with RESULT or
ERROR (JSON) from the agent.
"""

from __future__ import annotations

import json
import struct
import zlib

MAGIC = b"\xa1\x7a"
VERSION = 1
HEADER = struct.Struct("!2sBBII")
CRC = struct.Struct("!I")
HEADER_SIZE = HEADER.size + CRC.size
MAX_PAYLOAD = 4 << 20
CHUNK = 256 << 10


class FrameKind:
    OPEN = 1
    STDIN = 2
    STDOUT = 3
    STDERR = 4
    DATA = 5
    EOF = 6  # payload: one byte, the kind of the stream that ended
    RESULT = 7
    ERROR = 8
    SIGNAL = 9
    EVENT = 10

    ALL = frozenset(range(1, 11))
    JSON = frozenset({OPEN, RESULT, ERROR, SIGNAL, EVENT})


def encode(kind, channel, payload=b""):
    # type: (int, int, bytes) -> bytes
    if len(payload) > MAX_PAYLOAD:
        raise ValueError("payload of %d bytes exceeds %d" % (len(payload), MAX_PAYLOAD))
    head = HEADER.pack(MAGIC, kind, 0, channel, len(payload))
    return head + CRC.pack(zlib.crc32(head)) + payload


def encode_json(kind, channel, obj):
    # type: (int, int, object) -> bytes
    return encode(kind, channel, json.dumps(obj, separators=(",", ":")).encode())


def decode_json(payload):
    # type: (bytes) -> dict
    """Parse a JSON control payload; anything but a JSON object is a ValueError."""
    obj = json.loads(payload.decode("utf-8"))
    if not isinstance(obj, dict):
        raise ValueError("control payload is not a JSON object")
    return obj


class Decoder:
    """Incremental, resynchronising frame reader: feed bytes, get whole frames.

    Never raises on input. Bytes that do not form a valid frame are skipped and counted
    in ``skipped``, so the caller can report a noisy or hostile peer.
    """

    __slots__ = ("_buf", "skipped")

    def __init__(self):
        # type: () -> None
        self._buf = bytearray()
        self.skipped = 0

    def feed(self, data):
        # type: (bytes) -> list
        buf = self._buf
        buf += data
        frames = []
        while True:
            if len(buf) < HEADER_SIZE:
                if buf and not MAGIC.startswith(bytes(buf[: len(MAGIC)])):
                    self._skip_to_magic(buf)
                return frames
            if buf[:2] != MAGIC:
                self._skip_to_magic(buf)
                continue
            _, kind, _flags, channel, length = HEADER.unpack_from(buf)
            (crc,) = CRC.unpack_from(buf, HEADER.size)
            if (
                crc != zlib.crc32(bytes(buf[: HEADER.size]))
                or length > MAX_PAYLOAD
                or kind not in FrameKind.ALL
            ):
                del buf[:1]
                self.skipped += 1
                continue
            end = HEADER_SIZE + length
            if len(buf) < end:
                return frames
            frames.append((kind, channel, bytes(buf[HEADER_SIZE:end])))
            del buf[:end]

    def _skip_to_magic(self, buf):
        # type: (bytearray) -> None
        idx = buf.find(MAGIC, 1)
        if idx < 0:
            # keep a trailing first magic byte: it may start the next frame
            keep = 1 if buf[-1:] == MAGIC[:1] else 0
            drop = len(buf) - keep
        else:
            drop = idx
        self.skipped += drop
        del buf[:drop]

    @property
    def pending(self):
        # type: () -> int
        return len(self._buf)
