"""An uncompressed ``vmlinux`` from a bzImage: Firecracker boots ELF kernels only, and
Debian ships its cloud kernel as a bzImage (compressed with lz4, which the standard
library cannot read, hence a small decoder here)."""

from __future__ import annotations

import bz2
import lzma
import os
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

from aiva.errors import BackendError, BackendUnavailable

_MAGIC = {b"\x1f\x8b\x08": "gzip", b"\xfd7zXZ\x00": "xz", b"\x5d\x00\x00": "lzma",
          b"BZh": "bzip2", b"\x28\xb5\x2f\xfd": "zstd", b"\x02\x21\x4c\x18": "lz4"}


def ensure_vmlinux(kernel: Path) -> Path:
    """Firecracker boots an ELF vmlinux on x86 and Debian ships a bzImage: extract it once."""
    with kernel.open("rb") as f:
        if f.read(4) == b"\x7fELF":
            return kernel
    out = kernel.with_name(f"{kernel.name}.vmlinux")
    if not out.is_file():
        tmp = out.with_name(f".{out.name}.{os.getpid()}")
        tmp.write_bytes(extract_vmlinux(kernel.read_bytes()))
        os.replace(tmp, out)
    return out


def extract_vmlinux(image: bytes) -> bytes:
    """The ELF in a bzImage: the boot header (protocol >= 2.08) locates the compressed
    payload, whose last 4 bytes are the uncompressed size (the kernel build appends it)."""
    if image[0x202:0x206] != b"HdrS" or struct.unpack_from("<H", image, 0x206)[0] < 0x208:
        raise BackendError("the kernel is neither an ELF vmlinux nor a bzImage (boot >= 2.08)")
    start = ((image[0x1F1] or 4) + 1) * 512
    offset, length = struct.unpack_from("<II", image, 0x248)
    payload = image[start + offset:start + offset + length]
    kind = next((k for magic, k in _MAGIC.items() if payload.startswith(magic)), "unknown")
    body = payload[:-4]
    try:
        if kind == "gzip":
            elf = zlib.decompressobj(31).decompress(payload)
        elif kind in ("xz", "lzma"):
            elf = lzma.LZMADecompressor(lzma.FORMAT_XZ if kind == "xz" else lzma.FORMAT_ALONE
                                        ).decompress(body)
        elif kind == "bzip2":
            elf = bz2.decompress(body)
        elif kind == "lz4":
            elf = lz4_legacy(body)
        elif kind == "zstd" and shutil.which("zstd"):
            elf = subprocess.run(["zstd", "-dc"], input=body, capture_output=True, check=True
                                 ).stdout
        else:
            raise BackendUnavailable(f"cannot decompress a {kind} kernel payload",
                                     hint="install zstd, or use a gzip, xz or lz4 kernel")
    except (OSError, EOFError, ValueError, IndexError, zlib.error,
            subprocess.CalledProcessError) as exc:
        raise BackendError(f"the kernel's {kind} payload is corrupt: {exc}") from None
    if elf[:5] != b"\x7fELF\x02" or struct.unpack_from("<H", elf, 18)[0] != 62:
        raise BackendError(f"the kernel's {kind} payload is not an x86-64 ELF")
    if len(elf) & 0xFFFFFFFF != struct.unpack_from("<I", payload, len(payload) - 4)[0]:
        raise BackendError(f"the kernel's {kind} payload does not have its stated size")
    return elf


def lz4_legacy(data: bytes) -> bytes:
    """LZ4's legacy frame, which the kernel's lz4 option writes and no stdlib codec reads."""
    out, pos = bytearray(), 4
    while pos + 4 <= len(data):
        size = int.from_bytes(data[pos:pos + 4], "little")
        pos += 4
        if size != 0x184C2102:  # else the magic of a concatenated frame
            _lz4_block(data[pos:pos + size], out)
            pos += size
    return bytes(out)


def _lz4_block(src: bytes, out: bytearray) -> None:
    i = 0
    while i < len(src):
        token = src[i]
        lit, i = _lz4_length(src, i + 1, token >> 4)
        out += src[i:i + lit]
        i += lit
        if i >= len(src):
            return
        back = src[i] | src[i + 1] << 8
        length, i = _lz4_length(src, i + 2, token & 15)
        if not 0 < back <= len(out):
            raise ValueError(f"an LZ4 match {back} bytes back, before the output")
        start = len(out) - back
        pattern = out[start:start + min(back, length + 4)]
        reps, rest = divmod(length + 4, len(pattern))
        out += pattern * reps + pattern[:rest]  # a short pattern repeats (overlapping copy)


def _lz4_length(src: bytes, i: int, value: int) -> tuple[int, int]:
    """A 4-bit length of 15 goes on in the next bytes, while they are 255."""
    if value == 15:
        while True:
            value += src[i]
            i += 1
            if src[i - 1] != 255:
                break
    return value, i
