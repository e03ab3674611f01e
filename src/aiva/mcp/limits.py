"""What one MCP tool call may return or take: output cut to a byte budget, timeouts capped.

An agent pays for every byte of a tool result in its context window, so a command that
prints a megabyte must not hand it all back. Output keeps its head and its tail (errors are
usually at the end) with a note in between saying how much was left out and how to get it.
File reads return a window of the file instead, with the offset to continue from.

Pure functions, no MCP SDK: the unit tests cover them without a server.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from aiva.errors import InvalidValue

if TYPE_CHECKING:
    from aiva.config import McpSettings

#: Share of the budget given to the head of a cut output; the tail gets the rest.
HEAD_SHARE = 0.25


@dataclass(frozen=True)
class Limits:
    max_output: int = 64 * 1024  # bytes kept per exec stream, per file_read, per log read
    exec_timeout: float = 120.0  # seconds, when a call gives none
    max_exec_timeout: float = 600.0  # a larger timeout is cut to this
    max_entries: int = 1000  # entries of file_list, paths per list of a sync report
    log_lines: int = 200  # lines of the logs resource unless ?tail= says otherwise

    def __post_init__(self) -> None:
        if self.max_output < 1024:
            raise InvalidValue(f"max output must be at least 1KB, not {self.max_output} bytes")
        if self.exec_timeout <= 0 or self.max_exec_timeout <= 0:
            raise InvalidValue("exec timeouts must be positive")

    @classmethod
    def from_settings(cls, settings: McpSettings, *, max_output: str | int | None = None,
                      exec_timeout: float | None = None,
                      max_exec_timeout: float | None = None) -> Limits:
        """The config's ``mcp`` section, overridden by whatever is given here."""
        from aiva.config import parse_size

        return cls(
            max_output=parse_size(max_output if max_output is not None else settings.max_output),
            exec_timeout=exec_timeout if exec_timeout is not None else settings.exec_timeout,
            max_exec_timeout=(max_exec_timeout if max_exec_timeout is not None
                              else settings.max_exec_timeout),
        )

    def timeout_for(self, requested: float | None) -> float:
        """The timeout a command gets: the default when none is asked, never over the cap."""
        if requested is None:
            return min(self.exec_timeout, self.max_exec_timeout)
        if requested <= 0:
            raise InvalidValue(f"timeout must be a positive number of seconds, not {requested}",
                               hint=f"leave it out for the default of {self.exec_timeout:g}s")
        return min(requested, self.max_exec_timeout)


@dataclass(frozen=True)
class Clipped:
    """A text cut to a byte budget. ``total`` counts the UTF-8 bytes of the whole text."""

    text: str
    total: int
    omitted: int

    @property
    def truncated(self) -> bool:
        return self.omitted > 0


def clip_output(text: str, limit: int, *, stream: str = "output") -> Clipped:
    """``text`` if it fits in ``limit`` UTF-8 bytes; else its head and tail (never a split
    character) around a note naming the bytes left out and how to read them."""
    data = text.encode("utf-8", "replace")
    if len(data) <= limit:
        return Clipped(text, len(data), 0)
    head_n = int(limit * HEAD_SHARE)
    head = data[:head_n].decode("utf-8", "ignore")  # drops a character cut in two
    tail = data[len(data) - (limit - head_n):].decode("utf-8", "ignore")
    kept = len(head.encode()) + len(tail.encode())
    omitted = len(data) - kept
    note = (f"\n[... {stream} truncated: {omitted} bytes omitted of {len(data)}; "
            f"redirect it to a file (cmd > /tmp/out.txt 2>&1) and read that with file_read "
            f"and offset ...]\n")
    return Clipped(head + note + tail, len(data), omitted)


Encoding = Literal["auto", "text", "base64"]


@dataclass(frozen=True)
class Window:
    """Part of a file, ready for a tool result."""

    content: str
    encoding: Literal["text", "base64"]
    offset: int
    length: int  # bytes of the file this window covers
    size: int  # the whole file's size
    next_offset: int | None  # where the next read starts; None at the end of the file

    @property
    def truncated(self) -> bool:
        return self.next_offset is not None


def file_window(data: bytes, *, offset: int, size: int, encoding: Encoding = "auto") -> Window:
    """Encode ``data``, the bytes of a file from ``offset`` on (at most the budget), as text
    when it is UTF-8 (``auto``; ``text`` replaces invalid bytes) or as base64.

    A window that ends inside a multi-byte character is shortened to end before it, so
    reading on from ``next_offset`` never splits a character."""
    if offset < 0:
        raise InvalidValue(f"offset must not be negative, not {offset}")
    at_eof = offset + len(data) >= size
    text: str | None = None
    if encoding == "text":
        text = data.decode("utf-8", "replace")
    elif encoding == "auto" and b"\0" not in data:
        text, used = _utf8_prefix(data, at_eof)
        data = data[:used]
    end = offset + len(data)
    next_offset = None if end >= size else end
    if text is None:
        return Window(base64.b64encode(data).decode("ascii"), "base64", offset, len(data),
                      size, next_offset)
    return Window(text, "text", offset, len(data), size, next_offset)


def _utf8_prefix(data: bytes, at_eof: bool) -> tuple[str | None, int]:
    """The text of ``data`` and the bytes it used; None if it is not UTF-8. Up to 3 bytes
    of a character the window cut in two are left for the next read."""
    try:
        return data.decode("utf-8"), len(data)
    except UnicodeDecodeError as exc:
        cut_char = exc.reason == "unexpected end of data" and exc.start >= len(data) - 3
        if at_eof or not cut_char or exc.start == 0:
            return None, len(data)
        try:
            return data[:exc.start].decode("utf-8"), exc.start
        except UnicodeDecodeError:
            return None, len(data)


def window_note(w: Window) -> str:
    """The line a truncated read ends with, telling the agent how to go on."""
    if w.next_offset is None:
        return ""
    left = w.size - w.next_offset
    return (f"\n[... {left} more bytes of {w.size}; call file_read again with "
            f"offset={w.next_offset} ...]")
