"""The MCP server's budgets: output cut to a byte limit (head, note, tail), file windows
that never split a character, capped timeouts. Pure functions, no server."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aiva.config import McpSettings
from aiva.errors import InvalidValue
from aiva.mcp.limits import HEAD_SHARE, Limits, clip_output, file_window, window_note


def test_output_under_the_limit_is_untouched() -> None:
    c = clip_output("hello\n", 1024)
    assert (c.text, c.total, c.omitted, c.truncated) == ("hello\n", 6, 0, False)
    exact = "x" * 1024
    assert clip_output(exact, 1024).text == exact


def test_big_output_keeps_head_and_tail_around_a_note() -> None:
    text = "".join(f"line {i}\n" for i in range(20000))
    c = clip_output(text, 4096, stream="stdout")
    assert c.truncated and c.total == len(text.encode())
    head, _, rest = c.text.partition("\n[... stdout truncated: ")
    note, _, tail = rest.partition(" ...]\n")
    assert text.startswith(head) and text.endswith(tail)
    assert len(head.encode()) == int(4096 * HEAD_SHARE)
    assert len(head.encode()) + len(tail.encode()) == 4096
    assert c.omitted == c.total - 4096
    assert note.startswith(f"{c.omitted} bytes omitted of {c.total}")
    assert "file_read" in note and "offset" in note  # says how to get the rest
    assert tail.endswith("line 19999\n")


def test_a_cut_never_splits_a_character() -> None:
    text = "é" * 5000  # 2 bytes each: an odd budget falls inside one
    c = clip_output(text, 1025)
    head, _, rest = c.text.partition("\n[... ")
    tail = rest.partition(" ...]\n")[2]
    assert set(head) == {"é"} and set(tail) == {"é"}
    assert len(head.encode()) + len(tail.encode()) + c.omitted == c.total == 10000


@given(st.text(max_size=3000), st.integers(min_value=16, max_value=2048))
def test_clip_accounts_for_every_byte(text: str, limit: int) -> None:
    c = clip_output(text, limit)
    total = len(text.encode("utf-8", "replace"))
    assert c.total == total
    if total <= limit:
        assert c.text == text and c.omitted == 0
    else:
        assert c.omitted >= total - limit  # kept at most the limit
        assert c.omitted <= total - limit + 6  # lost at most a split character each side


def test_file_window_text_and_continuation() -> None:
    data = "".join(f"{i}\n" for i in range(1000)).encode()
    w = file_window(data[:100], offset=0, size=len(data))
    assert w.encoding == "text" and w.content == data[:100].decode()
    assert w.truncated and w.next_offset == 100
    assert "offset=100" in window_note(w) and f"{len(data) - 100} more bytes" in window_note(w)
    end = file_window(data[100:], offset=100, size=len(data))
    assert not end.truncated and end.next_offset is None and window_note(end) == ""


def test_file_window_stops_before_a_split_character() -> None:
    data = ("ab" + "€" * 10).encode()  # € is 3 bytes
    w = file_window(data[:6], offset=0, size=len(data))  # "ab" + € + one byte of the next
    assert (w.content, w.length, w.next_offset) == ("ab€", 5, 5)
    nxt = file_window(data[5:11], offset=5, size=len(data))
    assert nxt.content == "€€" and nxt.next_offset == 11


def test_binary_and_forced_encodings() -> None:
    blob = bytes(range(256))
    w = file_window(blob, offset=0, size=256)
    assert w.encoding == "base64" and base64.b64decode(w.content) == blob
    nul = file_window(b"a\0b", offset=0, size=3)  # valid UTF-8, but NUL: binary
    assert nul.encoding == "base64"
    forced = file_window(b"ok\xff", offset=0, size=3, encoding="text")
    assert forced.encoding == "text" and forced.content == "ok\ufffd"
    b64 = file_window(b"plain", offset=0, size=5, encoding="base64")
    assert b64.encoding == "base64" and base64.b64decode(b64.content) == b"plain"
    with pytest.raises(InvalidValue):
        file_window(b"", offset=-1, size=0)


def test_timeouts_default_and_cap() -> None:
    lim = Limits(exec_timeout=120, max_exec_timeout=600)
    assert lim.timeout_for(None) == 120
    assert lim.timeout_for(5) == 5
    assert lim.timeout_for(10_000) == 600
    with pytest.raises(InvalidValue, match="positive"):
        lim.timeout_for(0)
    assert Limits(exec_timeout=900, max_exec_timeout=600).timeout_for(None) == 600


def test_limits_from_config_and_overrides() -> None:
    lim = Limits.from_settings(McpSettings())
    assert (lim.max_output, lim.exec_timeout, lim.max_exec_timeout) == (65536, 120, 600)
    lim = Limits.from_settings(McpSettings(max_output="1MB"), exec_timeout=5)
    assert (lim.max_output, lim.exec_timeout) == (1 << 20, 5)
    assert Limits.from_settings(McpSettings(), max_output="8KB").max_output == 8192
    with pytest.raises(InvalidValue, match="at least 1KB"):
        Limits(max_output=10)
