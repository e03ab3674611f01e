"""The agent wire format: frame encoding and the resynchronising Decoder.

What the Decoder can promise, and what these tests hold it to:

* it never raises, whatever it is fed, and its buffer never outgrows one whole frame
  (``HEADER_SIZE + MAX_PAYLOAD``); fed nothing but garbage it holds less than a header;
* every byte it throws away is counted in ``skipped``: ``skipped + pending`` always equals
  the number of bytes that were not part of a returned frame;
* how the bytes are split into ``feed`` calls never changes what comes out;
* a header is trusted only if its magic, CRC, kind and length all check out. Garbage that
  holds no such header (random bytes, lone magics, headers with a flipped bit, valid-CRC
  headers with an unknown kind or an oversize length) is skipped entirely and every frame
  that follows is recovered exactly. That is the guarantee: random garbage forges an
  acceptable header only by matching a 32-bit CRC, and a single flipped bit never does.
* the limit of that guarantee: a *genuine* header whose payload was cut short is trusted,
  so it swallows the next ``length`` bytes as its payload; the Decoder then resyncs and
  every frame that starts after the swallowed span is recovered.
"""

from __future__ import annotations

import itertools
import json
import zlib

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from aiva.agent import protocol as p
from aiva.agent.protocol import (
    CRC,
    HEADER,
    HEADER_SIZE,
    MAGIC,
    MAX_PAYLOAD,
    Decoder,
    FrameKind,
    decode_json,
    encode,
    encode_json,
)

Frame = tuple[int, int, bytes]

KINDS = sorted(FrameKind.ALL)
kinds = st.sampled_from(KINDS)
channels = st.integers(min_value=0, max_value=2**32 - 1)
payloads = st.binary(max_size=600)
frames_st = st.tuples(kinds, channels, payloads)


def decode_all(data: bytes) -> tuple[list[Frame], Decoder]:
    dec = Decoder()
    return dec.feed(data), dec


def enc(frame: Frame) -> bytes:
    return encode(*frame)


def header(kind: int, chan: int, length: int) -> bytes:
    """A header with a correct CRC, whatever the fields say."""
    head = HEADER.pack(MAGIC, kind, 0, chan, length)
    return head + CRC.pack(zlib.crc32(head))


def no_magic(data: bytes) -> bytes:
    """``data`` with every magic defused; replacing the 0x7a cannot create a new magic."""
    return data.replace(MAGIC, b"\xa1\x00")


# --------------------------------------------------------------------------- strategies


@st.composite
def flipped_header(draw: st.DrawFn) -> bytes:
    """A real frame whose header (CRC included) has one bit flipped, plus its payload."""
    raw = bytearray(enc(draw(frames_st)))
    bit = draw(st.integers(0, HEADER_SIZE * 8 - 1))
    raw[bit // 8] ^= 1 << (bit % 8)
    return bytes(raw)


bad_kind_header = st.builds(
    header,
    st.integers(0, 255).filter(lambda k: k not in FrameKind.ALL),
    channels,
    st.integers(0, MAX_PAYLOAD),
)
oversize_header = st.builds(header, kinds, channels, st.integers(MAX_PAYLOAD + 1, 2**32 - 1))
magic_then_junk = st.binary(max_size=20).map(lambda b: MAGIC + b)

#: Garbage that holds no header the Decoder may accept (short of a 2**-32 CRC forgery).
garbage_piece = st.one_of(
    st.binary(min_size=1, max_size=200),
    st.just(MAGIC),
    st.just(MAGIC[:1]),
    magic_then_junk,
    flipped_header(),
    bad_kind_header,
    oversize_header,
)
garbage = st.lists(garbage_piece, max_size=4).map(b"".join)
clean_garbage = st.binary(max_size=200).map(no_magic)


def interleave(frames: list[Frame], junk: list[bytes]) -> bytes:
    """junk[0] frame[0] junk[1] frame[1] ... junk[n]  (len(junk) == len(frames) + 1)."""
    parts = [junk[0]]
    for frame, g in zip(frames, junk[1:], strict=True):
        parts += [enc(frame), g]
    return b"".join(parts)


@st.composite
def stream_with_garbage(draw: st.DrawFn, junk: st.SearchStrategy[bytes]
                        ) -> tuple[list[Frame], list[bytes]]:
    frames = draw(st.lists(frames_st, max_size=6))
    gs = draw(st.lists(junk, min_size=len(frames) + 1, max_size=len(frames) + 1))
    return frames, gs


def feed_in_pieces(data: bytes, cuts: list[int]) -> tuple[list[Frame], Decoder, int]:
    """Feed ``data`` split at ``cuts``; return frames, decoder and the largest pending seen."""
    dec = Decoder()
    out: list[Frame] = []
    worst = 0
    bounds = [0, *sorted(c % (len(data) + 1) for c in cuts), len(data)]
    for a, b in itertools.pairwise(bounds):
        out += dec.feed(data[a:b])
        worst = max(worst, dec.pending)
    return out, dec, worst


# --------------------------------------------------------------------------- encoding


def test_header_layout() -> None:
    data = encode(FrameKind.STDOUT, 0x01020304, b"hello")
    assert HEADER_SIZE == 16
    assert data[:2] == MAGIC
    assert data[2] == FrameKind.STDOUT
    assert data[3] == 0  # flags
    assert data[4:8] == b"\x01\x02\x03\x04"
    assert data[8:12] == (5).to_bytes(4, "big")
    assert data[12:16] == zlib.crc32(data[:12]).to_bytes(4, "big")
    assert data[16:] == b"hello"


@pytest.mark.parametrize("kind", KINDS)
@given(chan=channels, payload=st.binary(max_size=4096))
def test_round_trip_every_kind(kind: int, chan: int, payload: bytes) -> None:
    data = encode(kind, chan, payload)
    assert len(data) == HEADER_SIZE + len(payload)
    frames, dec = decode_all(data)
    assert frames == [(kind, chan, payload)]
    assert dec.skipped == 0
    assert dec.pending == 0


@given(st.lists(frames_st, max_size=10))
def test_round_trip_many_frames(frames: list[Frame]) -> None:
    out, dec = decode_all(b"".join(map(enc, frames)))
    assert out == frames
    assert (dec.skipped, dec.pending) == (0, 0)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=12,
)


@given(kind=st.sampled_from(sorted(FrameKind.JSON)),
       obj=st.dictionaries(st.text(max_size=10), json_values, max_size=5), chan=channels)
def test_json_frames_round_trip(kind: int, obj: dict[str, object], chan: int) -> None:
    frames, _ = decode_all(encode_json(kind, chan, obj))
    assert len(frames) == 1
    got_kind, got_chan, payload = frames[0]
    assert (got_kind, got_chan) == (kind, chan)
    assert decode_json(payload) == obj


@pytest.mark.parametrize("payload", [b"[1,2]", b"3", b'"op"', b"null", b"true", b"", b"{",
                                     b"\xff\xfe{}", b'{"a":1'])
def test_decode_json_rejects_anything_but_an_object(payload: bytes) -> None:
    with pytest.raises(ValueError):
        decode_json(payload)


def test_encode_refuses_oversize_payload() -> None:
    with pytest.raises(ValueError):
        encode(FrameKind.DATA, 1, bytes(MAX_PAYLOAD + 1))


def test_largest_payload_round_trips_and_bounds_pending() -> None:
    payload = bytes(range(256)) * (MAX_PAYLOAD // 256)
    assert len(payload) == MAX_PAYLOAD
    data = encode(FrameKind.DATA, 7, payload)
    dec = Decoder()
    out: list[Frame] = []
    step = 1 << 16
    for i in range(0, len(data), step):
        out += dec.feed(data[i:i + step])
        assert dec.pending <= HEADER_SIZE + MAX_PAYLOAD
    assert out == [(FrameKind.DATA, 7, payload)]
    assert (dec.skipped, dec.pending) == (0, 0)


# --------------------------------------------------------------------------- splitting

#: every kind, empty payloads, and payloads that contain magics and whole encoded frames
#: (which must stay payload, not be decoded as frames of their own)
TRICKY = [
    (FrameKind.OPEN, 1, b'{"op":"ping"}'),
    (FrameKind.STDIN, 3, b""),
    (FrameKind.STDOUT, 5, MAGIC * 5),
    (FrameKind.STDERR, 2**32 - 1, encode(FrameKind.RESULT, 9, b"{}")),
    (FrameKind.DATA, 0, MAGIC[:1]),
    (FrameKind.EOF, 7, bytes([FrameKind.STDIN])),
    (FrameKind.RESULT, 9, b"{}" + MAGIC),
    (FrameKind.ERROR, 11, encode(FrameKind.OPEN, 1, b"x")[:HEADER_SIZE]),
    (FrameKind.SIGNAL, 13, b'{"signal":15}'),
    (FrameKind.EVENT, 15, bytes(range(256))),
]


def test_tricky_stream_decodes_whole() -> None:
    out, dec = decode_all(b"".join(map(enc, TRICKY)))
    assert out == TRICKY
    assert (dec.skipped, dec.pending) == (0, 0)


def test_split_at_every_byte_boundary() -> None:
    data = b"".join(map(enc, TRICKY))
    for i in range(len(data) + 1):
        dec = Decoder()
        out = dec.feed(data[:i])
        out += dec.feed(data[i:])
        assert out == TRICKY, f"split at {i}"
        assert (dec.skipped, dec.pending) == (0, 0), f"split at {i}"


def test_fed_one_byte_at_a_time() -> None:
    data = b"".join(map(enc, TRICKY))
    dec = Decoder()
    out: list[Frame] = []
    for i in range(len(data)):
        out += dec.feed(data[i:i + 1])
        assert dec.pending < HEADER_SIZE + 300
    assert out == TRICKY
    assert (dec.skipped, dec.pending) == (0, 0)


def test_every_split_of_garbage_and_frames_matches_one_shot() -> None:
    data = (b"\x00\xa1\xa1" + enc(TRICKY[0]) + MAGIC + b"\x01\x00" + header(0, 1, 2)
            + enc(TRICKY[2]) + header(1, 1, MAX_PAYLOAD + 1) + b"\xa1")
    whole, ref = decode_all(data)
    assert whole == [TRICKY[0], TRICKY[2]]
    for i in range(len(data) + 1):
        for j in range(i, len(data) + 1, 7):
            dec = Decoder()
            out = dec.feed(data[:i]) + dec.feed(data[i:j]) + dec.feed(data[j:])
            assert out == whole, (i, j)
            assert (dec.skipped, dec.pending) == (ref.skipped, ref.pending), (i, j)


@given(stream_with_garbage(garbage), st.lists(st.integers(min_value=0), max_size=12))
def test_random_splits_match_one_shot(case: tuple[list[Frame], list[bytes]],
                                      cuts: list[int]) -> None:
    frames, gs = case
    data = interleave(frames, gs)
    whole, ref = decode_all(data)
    out, dec, _ = feed_in_pieces(data, cuts)
    assert out == whole
    assert (dec.skipped, dec.pending) == (ref.skipped, ref.pending)


# --------------------------------------------------------------------------- garbage


@given(st.binary(max_size=2000), st.lists(st.integers(min_value=0), max_size=20))
def test_random_garbage_yields_nothing_and_stays_small(data: bytes, cuts: list[int]) -> None:
    out, dec, worst = feed_in_pieces(data, cuts)
    assert out == []
    assert worst < HEADER_SIZE
    assert dec.skipped + dec.pending == len(data)


@given(stream_with_garbage(clean_garbage), st.lists(st.integers(min_value=0), max_size=8))
def test_magic_free_garbage_is_skipped_and_counted(case: tuple[list[Frame], list[bytes]],
                                                   cuts: list[int]) -> None:
    frames, gs = case
    out, dec, _ = feed_in_pieces(interleave(frames, gs), cuts)
    assert out == frames
    assert dec.skipped + dec.pending == sum(map(len, gs))
    # only a trailing first magic byte may be held back, waiting for its second byte
    assert dec.pending == (1 if gs[-1].endswith(MAGIC[:1]) else 0)
    assert dec.skipped == sum(map(len, gs)) - dec.pending


@given(stream_with_garbage(garbage), st.lists(st.integers(min_value=0), max_size=8))
def test_garbage_with_magics_and_bad_headers_loses_no_frame(
        case: tuple[list[Frame], list[bytes]], cuts: list[int]) -> None:
    frames, gs = case
    data = interleave(frames, gs)
    out, dec, worst = feed_in_pieces(data, cuts)
    assert out == frames  # nothing invented, nothing lost
    assert dec.skipped + dec.pending == sum(map(len, gs))
    assert dec.pending < HEADER_SIZE  # trailing garbage holds no acceptable header
    assert worst <= HEADER_SIZE + MAX_PAYLOAD
    biggest = max((HEADER_SIZE + len(f[2]) for f in frames), default=0)
    assert worst < max(HEADER_SIZE, biggest)


@given(garbage)
def test_garbage_only_never_grows_the_buffer(data: bytes) -> None:
    dec = Decoder()
    for i in range(0, len(data), 5):
        assert dec.feed(data[i:i + 5]) == []
        assert dec.pending < HEADER_SIZE
    assert dec.skipped + dec.pending == len(data)


@given(frame=frames_st, bit=st.integers(0, HEADER_SIZE * 8 - 1), after=frames_st)
def test_one_flipped_header_bit_drops_only_that_frame(frame: Frame, bit: int,
                                                      after: Frame) -> None:
    raw = bytearray(enc(frame))
    raw[bit // 8] ^= 1 << (bit % 8)
    out, dec = decode_all(bytes(raw) + enc(after))
    assert out == [after]
    assert dec.skipped == len(raw)


@given(kind=st.integers(0, 255).filter(lambda k: k not in FrameKind.ALL), chan=channels,
       payload=payloads, after=frames_st)
def test_unknown_kind_with_valid_crc_is_skipped(kind: int, chan: int, payload: bytes,
                                                after: Frame) -> None:
    bad = header(kind, chan, len(payload)) + payload
    out, dec = decode_all(bad + enc(after))
    assert out == [after]
    assert dec.skipped == len(bad)


@given(length=st.integers(MAX_PAYLOAD + 1, 2**32 - 1), kind=kinds, chan=channels,
       after=frames_st)
def test_oversize_length_with_valid_crc_is_not_waited_for(length: int, kind: int, chan: int,
                                                          after: Frame) -> None:
    bad = header(kind, chan, length)
    dec = Decoder()
    assert dec.feed(bad) == []
    assert dec.pending < HEADER_SIZE  # not holding out for a 4 GiB payload
    assert dec.feed(enc(after)) == [after]
    assert dec.skipped == len(bad)


@given(frame=frames_st.filter(lambda f: len(f[2]) > 0), keep=st.integers(min_value=0))
def test_truncated_frame_at_end_waits_and_completes(frame: Frame, keep: int) -> None:
    data = enc(frame)
    cut = keep % len(data)
    dec = Decoder()
    assert dec.feed(data[:cut]) == []
    assert dec.pending == cut
    assert dec.skipped == 0
    assert dec.feed(data[cut:]) == [frame]
    assert dec.pending == 0


@settings(suppress_health_check=[HealthCheck.filter_too_much])
@given(cut_frame=frames_st.filter(lambda f: len(f[2]) > 0), keep=st.integers(min_value=0),
       frames=st.lists(frames_st, min_size=1, max_size=6))
def test_truncated_frame_mid_stream_swallows_then_resyncs(cut_frame: Frame, keep: int,
                                                         frames: list[Frame]) -> None:
    """The limit of the guarantee: a genuine header is trusted for its length."""
    kind, chan, payload = cut_frame
    kept = keep % len(payload)  # the payload is cut short: `kept` of its bytes arrive
    rest = b"".join(map(enc, frames))
    need = len(payload) - kept
    assume(len(rest) >= need)
    data = enc(cut_frame)[:HEADER_SIZE + kept] + rest
    out, dec = decode_all(data)
    # the truncated frame comes out with the next bytes of the stream as its payload...
    assert out[0] == (kind, chan, payload[:kept] + rest[:need])
    # ...and every frame that starts at or after the end of that span is recovered
    starts, pos = [], 0
    for f in frames:
        starts.append(pos)
        pos += HEADER_SIZE + len(f[2])
    survivors = [f for f, s in zip(frames, starts, strict=True) if s >= need]
    assert out[1:] == survivors
    lost_bytes = (starts[len(frames) - len(survivors)] if survivors else len(rest)) - need
    assert dec.skipped + dec.pending == lost_bytes


def test_module_constants_are_consistent() -> None:
    assert FrameKind.JSON <= FrameKind.ALL
    assert p.CHUNK * 4 <= MAX_PAYLOAD  # the client's write chunks fit in one frame
    assert json.loads(decode_all(encode_json(1, 1, {"a": 1}))[0][0][2]) == {"a": 1}
