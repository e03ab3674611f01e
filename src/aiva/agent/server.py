"""The in-sandbox agent: runs commands and file operations for aiva. Stdlib only, Python >= 3.8.

It runs inside arbitrary images, so it must not import anything outside the standard
library. One thread, one ``selectors`` loop: client connections (a Unix socket, stdio, a
serial device), child process pipes, SIGCHLD and timers all wake the same loop, which
keeps a command round trip well under a millisecond of agent time.

Everything it serves belongs to the sandbox, so nothing in the sandbox may stall that
loop or grow the agent without bound: files are opened O_NONBLOCK and refused unless
regular; long work (reading, hashing, walking) is a producer that runs a bounded slice
per turn while its client keeps up; command output and stdin stop being read while the
other side is too far behind.

Usage: ``python3 DIR --listen unix:/path/agent.sock`` or ``python3 DIR --stdio``; with
``--syslog PATH`` it is also the guest's syslog (/dev/log), appending to PATH.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import heapq
import json
import os
import re
import selectors
import signal
import socket
import stat
import subprocess
import sys
import termios
import time
from collections import deque

try:
    from . import protocol as p
except ImportError:  # run as a directory: python3 /path/to/agent
    import protocol as p  # type: ignore[no-redef]

K = p.FrameKind
AGENT_VERSION = "1"
BACKGROUND_BUFFER = 1 << 20  # bytes of output kept per stream for a detached process
OUTPUT_LINGER = 0.2  # seconds to drain pipes held open by grandchildren after exit
WRITE_HIGH_WATER = 4 << 20  # stop producing file data when this much is queued
OUTPUT_LOW_WATER = 1 << 20  # paused command pipes are read again below this much queued
PSEUDO_FILE_MAX = 1 << 20  # bytes read of a file that says it is empty (/proc, /sys)
HASH_SLICE = 4 << 20  # bytes hashed per loop turn, so other clients are served between
STDIN_HIGH_WATER = 16 << 20  # stop reading a client whose commands hold this much stdin
STDIN_LOW_WATER = 4 << 20  # ... and read it again below this
WALK_BATCH = 5000  # entries looked at per walk frame
WALK_BATCH_BYTES = 1 << 20  # about this many bytes of JSON per walk frame (< MAX_PAYLOAD)


def log(msg):
    # type: (str) -> None
    sys.stderr.write("aiva-agent: %s\n" % msg)
    sys.stderr.flush()


def set_nonblocking(fd):
    # type: (int) -> None
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)


class RequestError(Exception):
    """A failure to report to the client as ERROR, with an exception class name."""

    def __init__(self, kind, message):
        # type: (str, str) -> None
        Exception.__init__(self, message)
        self.kind = kind


def error_payload(exc):
    # type: (BaseException) -> dict
    if isinstance(exc, RequestError):
        return {"kind": exc.kind, "message": str(exc)}
    if isinstance(exc, OSError) and exc.strerror:
        where = exc.filename if exc.filename is not None else ""
        msg = "%s: %s" % (exc.strerror, where) if where else exc.strerror
        return {"kind": type(exc).__name__, "message": msg, "errno": exc.errno}
    return {"kind": type(exc).__name__, "message": str(exc) or type(exc).__name__}


# --------------------------------------------------------------------------- safe opening

_FILE_TYPES = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISLNK, "a symbolic link"),
)


def file_type_name(mode):
    # type: (int) -> str
    for test, name in _FILE_TYPES:
        if test(mode):
            return name
    return "not a regular file"


def not_regular(path, mode):
    # type: (str, int) -> Exception
    """The error for a path that is not a regular file, naming what it is instead."""
    if stat.S_ISDIR(mode):
        return IsADirectoryError(errno.EISDIR, "is a directory", path)
    return RequestError("UnsupportedFileType", "%s is %s, not a regular file" % (
        path, file_type_name(mode)))


def open_regular(path, dir_fd=None):
    # type: (str, int | None) -> tuple
    """(fd, stat) of the regular file at ``path``, opened for reading; anything else
    (a FIFO, a device, a socket, a directory) is refused before a byte is read.

    Symlinks are followed: they point into the sandbox's own view. A stat first keeps a
    device from ever being opened (opening some has effects); the fstat of what was
    opened, with O_NONBLOCK so a FIFO swapped in meanwhile cannot block the open, is the
    check that counts. O_NONBLOCK stays on a file that claims to be empty (a /proc or
    /sys file: one like /proc/kmsg would block a read) and is cleared on any other.
    """
    st = os.stat(path, dir_fd=dir_fd)
    if not stat.S_ISREG(st.st_mode):
        raise not_regular(path, st.st_mode)
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise not_regular(path, st.st_mode)
        if st.st_size > 0:
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def read_some(fd, n):
    # type: (int, int) -> bytes
    """Up to ``n`` bytes; b"" at the end, or when a non-blocking pseudo file has none."""
    while True:
        try:
            return os.read(fd, n)
        except InterruptedError:
            continue
        except BlockingIOError:
            return b""


def read_pseudo(fd, limit=PSEUDO_FILE_MAX):
    # type: (int, int) -> bytes
    """A file that reports size 0 may still have content (procfs, sysfs): take what it
    has, up to ``limit`` bytes."""
    parts = []
    got = 0
    while got < limit:
        chunk = read_some(fd, min(1 << 16, limit - got))
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def read_small(path, limit=PSEUDO_FILE_MAX):
    # type: (str, int) -> bytes
    """The first ``limit`` bytes of a regular file (a /proc or /etc file)."""
    fd, _ = open_regular(path)
    try:
        return read_pseudo(fd, limit)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- connections


class Conn:
    """One client byte stream. ``rfd`` and ``wfd`` may be the same (a socket)."""

    def __init__(self, agent, rfd, wfd, name, owned=True):
        # type: (Agent, int, int, str, bool) -> None
        self.agent = agent
        self.rfd = rfd
        self.wfd = wfd
        self.name = name
        self.owned = owned
        self.decoder = p.Decoder()
        self.out = bytearray()
        self.channels = {}  # type: dict
        self.producers = deque()  # type: deque
        self.yielded = False  # a producer gave up its turn: come back on the next one
        self.read_paused = False  # its commands hold too much unread stdin
        self.closed = False

    def send(self, kind, chan, payload=b""):
        # type: (int, int, bytes) -> None
        if self.closed:
            return
        self.out += p.encode(kind, chan, payload)
        self.agent.want_write(self)

    def send_json(self, kind, chan, obj):
        # type: (int, int, object) -> None
        self.send(kind, chan, json.dumps(obj, separators=(",", ":")).encode())

    def finish(self, chan, result):
        # type: (int, dict) -> None
        self.channels.pop(chan, None)
        self.send_json(K.RESULT, chan, result)

    def fail(self, chan, exc):
        # type: (int, BaseException) -> None
        handler = self.channels.pop(chan, None)
        self.send_json(K.ERROR, chan, error_payload(exc))
        if handler is not None:  # ERROR ends the channel: release what it holds
            try:
                handler.abort()
            except Exception as err:
                log("abort failed: %r" % (err,))


# --------------------------------------------------------------------------- processes


class Proc:
    """A child process, its pipes, and who (if anyone) is listening to it."""

    def __init__(self, popen, conn, chan, background):
        # type: (subprocess.Popen, Conn, int, bool) -> None
        self.popen = popen
        self.pid = popen.pid
        self.conn = conn  # type: Conn | None
        self.chan = chan
        self.background = background
        self.started = time.time()
        self.exit_code = None  # type: int | None
        self.timed_out = False
        self.open_pipes = 0
        self.stdin_buf = bytearray()
        self.stdin_eof = False
        self.buffers = {K.STDOUT: bytearray(), K.STDERR: bytearray()}
        self.waiters = []  # type: list
        self.done = False
        self.finished_at = None  # type: float | None
        self.dropped = False  # the ring buffer of a background process lost its head

    def result(self):
        # type: () -> dict
        return {
            "pid": self.pid,
            "exit_code": self.exit_code,
            "timed_out": self.timed_out,
            "duration": (self.finished_at or time.time()) - self.started,
        }

    def full_result(self):
        # type: () -> dict
        """The result plus the output kept for a detached (background) process: the
        tail of each stream that fits one frame (binary output can take 6 bytes of JSON
        per byte). ``truncated`` says some of it is not there."""
        out = self.result()
        cut = self.dropped
        for kind, key in ((K.STDOUT, "stdout"), (K.STDERR, "stderr")):
            text = bytes(self.buffers[kind]).decode("utf-8", "replace")
            out[key], lost = json_tail(text, RESULT_STREAM_MAX)
            cut = cut or lost
        if cut:
            out["truncated"] = True
        return out


RESULT_STREAM_MAX = (p.MAX_PAYLOAD - (64 << 10)) // 2  # JSON bytes per stream in a RESULT


def json_tail(text, limit):
    # type: (str, int) -> tuple
    """(the longest tail of ``text`` whose JSON form fits in ``limit`` bytes, cut?)"""
    size = len(json.dumps(text))
    if size <= limit:
        return text, False
    n = len(text) * limit // size
    while n > 0:
        tail = text[len(text) - n:]
        size = len(json.dumps(tail))
        if size <= limit:
            return tail, True
        n = min(n - 1, n * limit // size)
    return "", True


# --------------------------------------------------------------------------- guest syslog

SYSLOG_SOCKET = "/dev/log"
SYSLOG_DGRAM_MAX = 64 << 10  # bytes kept of one datagram; the rest of a longer one is lost
SYSLOG_BATCH = 256  # datagrams taken per wake-up before the loop serves anything else
SYSLOG_WRITE_AT = 64 << 10  # bytes of records gathered before one write
SYSLOG_PENDING_MAX = 1 << 20  # bytes held while the sink cannot take them (a full port)
SYSLOG_ROTATE = 8 << 20  # a regular file moves to PATH.1 at this size
SYSLOG_COMPLAIN_EVERY = 30.0  # seconds between two stderr lines about a failing sink
FACILITIES = ("kern", "user", "mail", "daemon", "auth", "syslog", "lpr", "news", "uucp",
              "cron", "authpriv", "ftp", "ntp", "security", "console", "solaris-cron",
              "local0", "local1", "local2", "local3", "local4", "local5", "local6", "local7")
SEVERITIES = ("emerg", "alert", "crit", "err", "warning", "notice", "info", "debug")
_BSD_STAMP = re.compile(r"[A-Z][a-z]{2} [ 0-9]\d \d\d:\d\d:\d\d ")
_HOST = re.compile(r"[A-Za-z0-9._-]+$")
_TAG = re.compile(r"[^\s:\[\]]+(\[[^\]\s]*\])?:(\s|$)")


def _skip_structured_data(text):
    # type: (str) -> str
    """An RFC 5424 message after its STRUCTURED-DATA ("-" or "[id k="v" ...]...")."""
    if text == "-" or text.startswith("- "):
        return text[2:]
    i, n = 0, len(text)
    while i < n and text[i] == "[":
        quoted = False
        i += 1
        while i < n:
            c = text[i]
            if c == "\\":
                i += 2
                continue
            if c == '"':
                quoted = not quoted
            elif c == "]" and not quoted:
                break
            i += 1
        i += 1
    return text[i + 1:] if i < n and text[i] == " " else text[i:]


def parse_syslog(data):
    # type: (bytes) -> tuple
    """(facility, severity, "tag: message") of one /dev/log datagram; never raises.

    Takes RFC 3164 as libc's syslog(3), util-linux and busybox ``logger`` send it locally
    (``<PRI>Mmm dd hh:mm:ss TAG[PID]: MSG``, also with a HOSTNAME before TAG), RFC 5424
    (``<PRI>1 STAMP HOST APP PROCID MSGID SD MSG``) and anything else as plain text.
    Facility and severity are names, or None if the datagram had no valid ``<PRI>``.
    """
    text = data.decode("utf-8", "replace").replace("\x00", "").rstrip()
    facility = severity = None
    end = text.find(">", 1, 5) if text.startswith("<") else -1
    if end > 1 and text[1:end].isdigit() and int(text[1:end]) < 8 * len(FACILITIES):
        pri = int(text[1:end])
        facility, severity = FACILITIES[pri >> 3], SEVERITIES[pri & 7]
        text = text[end + 1:]
        if text.startswith("1 "):  # RFC 5424
            parts = text.split(" ", 6)
            if len(parts) >= 6:
                app, procid = parts[3], parts[4]
                msg = _skip_structured_data(parts[6]) if len(parts) > 6 else ""
                if msg.startswith("\ufeff"):
                    msg = msg[1:]
                tag = "" if app == "-" else app
                if tag and procid != "-":
                    tag += "[%s]" % procid
                return facility, severity, ("%s: %s" % (tag, msg) if tag else msg)
        if _BSD_STAMP.match(text):
            text = text[16:]
        host, _, rest = text.partition(" ")
        if rest and _HOST.match(host) and not _TAG.match(text) and _TAG.match(rest):
            text = rest  # "HOSTNAME TAG: MSG": the host is this one
    return facility, severity, text


class SyslogSink:
    """Appends records (JSON lines) to a regular file or a character device.

    A regular file is opened for each batch (O_APPEND), so one that vanished or was moved
    comes back, and it moves to PATH.1 at SYSLOG_ROTATE bytes. Anything else (a
    virtio-serial port, which only one process may hold open; a FIFO) is kept open,
    never seeked or renamed, and written without blocking: what it cannot take yet waits
    here, up to SYSLOG_PENDING_MAX bytes, until the selector says it is writable.
    """

    def __init__(self, agent, path):
        # type: (Agent, str) -> None
        self.agent = agent
        self.path = path
        self.fd = -1  # a device's fd, kept open
        self.pending = bytearray()
        self.dropped = 0
        self.waiting = False  # registered for EVENT_WRITE on self.fd
        self.complained = 0.0

    def add(self, record):
        # type: (dict) -> None
        line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
        if len(self.pending) + len(line) > SYSLOG_PENDING_MAX:
            self.dropped += 1
            return
        if self.dropped and not self.pending:
            self._note_dropped()
        self.pending += line

    def _note_dropped(self):
        # type: () -> None
        note = {"t": time.time(), "s": "syslog",
                "d": "aiva-agent: %d syslog messages were lost (the log could not take "
                     "them)" % self.dropped}
        self.dropped = 0
        self.pending += (json.dumps(note, separators=(",", ":")) + "\n").encode()

    def flush(self):
        # type: () -> None
        if not self.pending or self.waiting:
            return
        try:
            if self.fd < 0:
                fd = self._open()
                if stat.S_ISREG(os.fstat(fd).st_mode):
                    self._write_file(fd)
                    return
                self.fd = fd
            self._write_device()
        except OSError as exc:
            self._complain("cannot write the syslog to %s: %s" % (
                self.path, exc.strerror or exc))
            self.close()
            self.dropped += self.pending.count(b"\n")
            del self.pending[:]

    def _open(self):
        # type: () -> int
        """Open the target without blocking (a FIFO with no reader is ENXIO, not a hang);
        a block device is refused: records are lines, not disk blocks."""
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOCTTY
                     | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0), 0o644)
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISCHR(mode) or stat.S_ISFIFO(mode)):
            os.close(fd)
            raise OSError(errno.EINVAL, "it is %s, not a file, a FIFO or a character "
                          "device" % file_type_name(mode))
        return fd

    def _write_file(self, fd):
        # type: (int) -> None
        """Write what is pending to the regular file open at ``fd``, then close it."""
        try:
            size = os.fstat(fd).st_size
            if size and size + len(self.pending) > SYSLOG_ROTATE:
                os.close(fd)
                fd = -1
                os.replace(self.path, self.path + ".1")
                fd = self._open()
            view = memoryview(bytes(self.pending))  # not a view of pending: that must resize
            while view:
                view = view[os.write(fd, view):]
        finally:
            if fd >= 0:
                os.close(fd)
        del self.pending[:]

    def _write_device(self):
        # type: () -> None
        while self.pending:
            try:
                n = os.write(self.fd, self.pending)
            except (BlockingIOError, InterruptedError):
                self.waiting = True
                self.agent.sel.register(self.fd, selectors.EVENT_WRITE, ("syslog-out", self))
                return
            del self.pending[:n]

    def on_writable(self):
        # type: () -> None
        self._unwatch()
        self.flush()

    def _unwatch(self):
        # type: () -> None
        if self.waiting:
            self.waiting = False
            try:
                self.agent.sel.unregister(self.fd)
            except (KeyError, ValueError):
                pass

    def close(self):
        # type: () -> None
        self._unwatch()
        if self.fd >= 0:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = -1

    def _complain(self, msg):
        # type: (str) -> None
        now = time.monotonic()
        if now - self.complained >= SYSLOG_COMPLAIN_EVERY or not self.complained:
            self.complained = now
            log(msg)


def syslog_owner(path):
    # type: (str) -> str | None
    """Why ``path`` must be left alone (a live syslog daemon, or not a socket at all), or
    None if it is free: missing, a socket nobody is bound to, or a dangling symlink."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return "it cannot be examined (%s)" % exc.strerror
    if not (stat.S_ISSOCK(st.st_mode) or stat.S_ISLNK(st.st_mode)):
        return "it is not a socket"
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        probe.connect(path)
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            return None
        if exc.errno == errno.EPROTOTYPE:
            return "a syslog daemon serves it as a stream socket"
        return "it cannot be reached (%s)" % exc.strerror
    finally:
        probe.close()
    return "a syslog daemon serves it"


class SyslogReceiver:
    """The guest's /dev/log: each datagram becomes one record in a SyslogSink."""

    def __init__(self, agent, sock, sock_path, sink):
        # type: (Agent, socket.socket, str, SyslogSink) -> None
        self.agent = agent
        self.sock = sock
        self.sock_path = sock_path
        self.sink = sink
        st = os.stat(sock_path)
        self.ident = (st.st_dev, st.st_ino)

    def on_read(self):
        # type: () -> None
        try:
            for _ in range(SYSLOG_BATCH):
                try:
                    data = self.sock.recv(SYSLOG_DGRAM_MAX)
                except (BlockingIOError, InterruptedError):
                    break
                if not data:
                    continue  # an empty datagram, not an end of stream
                facility, severity, text = parse_syslog(data)
                record = {"t": time.time(), "s": "syslog", "d": text}
                if facility is not None:
                    record["f"], record["p"] = facility, severity
                self.sink.add(record)
                if len(self.sink.pending) >= SYSLOG_WRITE_AT:
                    self.sink.flush()
        finally:
            self.sink.flush()

    def close(self):
        # type: () -> None
        """Stop receiving; remove the socket file if it is still the one we made."""
        try:
            self.agent.sel.unregister(self.sock)
        except (KeyError, ValueError):
            pass
        try:
            st = os.lstat(self.sock_path)
            if (st.st_dev, st.st_ino) == self.ident:
                os.unlink(self.sock_path)
        except OSError:
            pass
        self.sock.close()
        self.sink.flush()
        self.sink.close()


# --------------------------------------------------------------------------- the agent


class Agent:
    def __init__(self):
        # type: () -> None
        self.sel = selectors.DefaultSelector()
        self.conns = []  # type: list
        self.procs = {}  # type: dict
        self.pipes = {}  # type: dict
        # a paused pipe's fd -> the Conn whose output must drain before it is read again
        self.paused = {}  # type: dict
        self.timers = []  # type: list
        self.timer_seq = 0
        self.running = True
        self.listeners = []  # type: list
        self.syslog = None  # type: SyslogReceiver | None
        r, w = os.pipe()
        set_nonblocking(r)
        set_nonblocking(w)
        self.wake_r = r
        signal.set_wakeup_fd(w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, self._on_term)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        self.sel.register(r, selectors.EVENT_READ, ("wake", None))

    # ---------------------------------------------------------------- setup

    def listen_unix(self, path):
        # type: (str) -> None
        try:
            os.unlink(path)
        except OSError:
            pass
        d = os.path.dirname(path)
        if d and not os.path.isdir(d):
            os.makedirs(d)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path + ".tmp")
        os.chmod(path + ".tmp", 0o660)
        sock.listen(64)
        os.rename(path + ".tmp", path)  # appears only once it accepts
        sock.setblocking(False)
        self.listeners.append((sock, path))  # getsockname() is the pre-rename path
        self.sel.register(sock, selectors.EVENT_READ, ("accept", sock))

    def listen_vsock(self, port):
        # type: (int) -> None
        """Firecracker's agent channel: the host reaches it through the VMM's vsock."""
        if not hasattr(socket, "AF_VSOCK"):
            raise OSError(errno.EAFNOSUPPORT, "this Python has no AF_VSOCK")
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        sock.bind((socket.VMADDR_CID_ANY, port))
        sock.listen(64)
        sock.setblocking(False)
        self.sel.register(sock, selectors.EVENT_READ, ("accept", sock))

    def listen_syslog(self, out_path, sock_path=SYSLOG_SOCKET):
        # type: (str, str) -> bool
        """Be the guest's syslog: receive datagrams at ``sock_path`` and append each to
        ``out_path`` as a JSON line. Leaves a path a syslog daemon already serves alone."""
        why = syslog_owner(sock_path)
        if why is not None:
            log("not receiving syslog at %s: %s" % (sock_path, why))
            return False
        tmp = "%s.aiva-%d" % (sock_path, os.getpid())
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            sock.bind(tmp)
            os.chmod(tmp, 0o666)  # every user of the guest may log
            os.rename(tmp, sock_path)  # replaces a stale socket in one step
            sock.setblocking(False)
            self.syslog = SyslogReceiver(self, sock, sock_path, SyslogSink(self, out_path))
        except OSError as exc:
            sock.close()
            try:
                os.unlink(tmp)
            except OSError:
                pass
            log("not receiving syslog at %s: %s" % (sock_path, exc.strerror or exc))
            return False
        self.sel.register(sock, selectors.EVENT_READ, ("syslog", self.syslog))
        return True

    def serve_fds(self, rfd, wfd, name):
        # type: (int, int, str) -> None
        set_nonblocking(rfd)
        if wfd != rfd:
            set_nonblocking(wfd)
        conn = Conn(self, rfd, wfd, name, owned=False)
        self.conns.append(conn)
        self.sel.register(rfd, selectors.EVENT_READ, ("conn", conn))

    def _on_term(self, *_):
        # type: (object) -> None
        self.running = False

    # ---------------------------------------------------------------- loop

    def run(self):
        # type: () -> None
        while self.running:
            timeout = None
            if self.timers:
                timeout = max(0.0, self.timers[0][0] - time.monotonic())
            try:
                events = self.sel.select(timeout)
            except InterruptedError:
                continue
            for key, mask in events:
                what, obj = key.data
                try:
                    if what == "wake":
                        self._on_wake()
                    elif what == "accept":
                        self._on_accept(obj)
                    elif what == "conn":
                        if mask & selectors.EVENT_READ:
                            self._on_conn_read(obj)
                        if mask & selectors.EVENT_WRITE and not obj.closed:
                            self._on_conn_write(obj)
                    elif what == "wconn":
                        self._on_conn_write(obj)
                    elif what == "pipe":
                        self._on_pipe(key.fd, obj)
                    elif what == "stdin":
                        self._on_stdin_writable(obj)
                    elif what == "syslog":
                        obj.on_read()
                    elif what == "syslog-out":
                        obj.on_writable()
                except Exception as exc:  # the loop must survive anything
                    log("internal error in %s handler: %r" % (what, exc))
            self._run_timers()
        self.shutdown()

    def _run_timers(self):
        # type: () -> None
        now = time.monotonic()
        while self.timers and self.timers[0][0] <= now:
            _, _, fn = heapq.heappop(self.timers)
            try:
                fn()
            except Exception as exc:
                log("timer failed: %r" % (exc,))

    def call_later(self, delay, fn):
        # type: (float, object) -> None
        self.timer_seq += 1
        heapq.heappush(self.timers, (time.monotonic() + delay, self.timer_seq, fn))

    def shutdown(self):
        # type: () -> None
        for proc in list(self.procs.values()):
            if proc.exit_code is None:
                self._killpg(proc, signal.SIGTERM)
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline and any(
            pr.exit_code is None for pr in self.procs.values()
        ):
            self._reap()
            time.sleep(0.02)
        for proc in self.procs.values():
            if proc.exit_code is None:
                self._killpg(proc, signal.SIGKILL)
        for _sock, path in self.listeners:
            try:
                os.unlink(path)
            except OSError:
                pass
        if self.syslog is not None:
            try:
                self.syslog.close()
            except Exception as exc:
                log("closing the syslog failed: %r" % (exc,))
        for conn in list(self.conns):
            self._flush_blocking(conn)

    def _flush_blocking(self, conn):
        # type: (Conn) -> None
        deadline = time.monotonic() + 1
        while conn.out and time.monotonic() < deadline:
            try:
                n = os.write(conn.wfd, conn.out)
                del conn.out[:n]
            except BlockingIOError:
                time.sleep(0.005)
            except OSError:
                break

    # ---------------------------------------------------------------- connections

    def _on_accept(self, sock):
        # type: (socket.socket) -> None
        try:
            client, _ = sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        client.setblocking(False)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        fd = client.detach()
        conn = Conn(self, fd, fd, "unix")
        self.conns.append(conn)
        self.sel.register(fd, selectors.EVENT_READ, ("conn", conn))

    def _on_conn_read(self, conn):
        # type: (Conn) -> None
        try:
            data = os.read(conn.rfd, 1 << 20)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.close_conn(conn)
            return
        for kind, chan, payload in conn.decoder.feed(data):
            try:
                self._dispatch(conn, kind, chan, payload)
            except Exception as exc:
                conn.fail(chan, exc)

    def want_write(self, conn):
        # type: (Conn) -> None
        if conn.closed:
            return
        # try right away: most replies are small and the socket has room. Producers wait
        # for the socket to be writable, so their work (a hash slice) never rides along
        # with every small send.
        self._on_conn_write(conn, produce=False)

    def _update_interest(self, conn):
        # type: (Conn) -> None
        """Watch for reads unless paused (stdin backlog), for writes while there is output."""
        need = bool(conn.out) or bool(conn.producers)
        read = not conn.read_paused
        fds = self.sel.get_map()
        if conn.rfd == conn.wfd:
            events = (selectors.EVENT_READ if read else 0) | (
                selectors.EVENT_WRITE if need else 0)
            key = fds.get(conn.rfd)
            if key is None:
                if events:
                    self.sel.register(conn.rfd, events, ("conn", conn))
            elif not events:
                self.sel.unregister(conn.rfd)
            elif key.events != events:
                self.sel.modify(conn.rfd, events, ("conn", conn))
            return
        registered = conn.wfd in fds
        if need and not registered:
            self.sel.register(conn.wfd, selectors.EVENT_WRITE, ("wconn", conn))
        elif not need and registered:
            self.sel.unregister(conn.wfd)
        registered = conn.rfd in fds
        if read and not registered:
            self.sel.register(conn.rfd, selectors.EVENT_READ, ("conn", conn))
        elif not read and registered:
            self.sel.unregister(conn.rfd)

    def _stdin_queued(self, conn):
        # type: (Conn) -> int
        return sum(len(pr.stdin_buf) for pr in self.procs.values() if pr.conn is conn)

    def check_stdin_backlog(self, conn):
        # type: (Conn | None) -> None
        """Stop reading a client whose commands hold STDIN_HIGH_WATER bytes of stdin they
        have not taken yet (its sends then wait in the socket); read it again once they
        are down to STDIN_LOW_WATER, or have exited."""
        if conn is None or conn.closed:
            return
        queued = self._stdin_queued(conn)
        if conn.read_paused:
            if queued > STDIN_LOW_WATER:
                return
            conn.read_paused = False
        elif queued >= STDIN_HIGH_WATER:
            conn.read_paused = True
        else:
            return
        self._update_interest(conn)

    def _on_conn_write(self, conn, produce=True):
        # type: (Conn, bool) -> None
        while True:
            if produce:
                self._produce(conn)
            if not conn.out:
                break
            try:
                n = os.write(conn.wfd, conn.out)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self.close_conn(conn)
                return
            del conn.out[:n]
            if conn.out or conn.yielded:
                break
        if conn.closed:
            return
        if len(conn.out) <= OUTPUT_LOW_WATER:
            self._resume_pipes(conn)
        self._update_interest(conn)

    def _produce(self, conn):
        # type: (Conn) -> None
        """Fill ``out`` from the producers, taking turns, up to WRITE_HIGH_WATER. A
        producer that yields b"" has done a slice of work (hashing) and gives the loop
        its turn: the connection stays interested in writing, so it comes back at once."""
        conn.yielded = False
        while conn.producers and len(conn.out) < WRITE_HIGH_WATER:
            prod = conn.producers.popleft()
            try:
                chunk = next(prod)
            except StopIteration:
                continue
            except Exception as exc:
                log("producer failed: %r" % (exc,))
                continue
            conn.producers.append(prod)
            if not chunk:
                conn.yielded = True
                return
            conn.out += chunk

    def close_conn(self, conn):
        # type: (Conn) -> None
        if conn.closed:
            return
        conn.closed = True
        for fd in {conn.rfd, conn.wfd}:
            try:
                self.sel.unregister(fd)
            except (KeyError, ValueError):
                pass
            if conn.owned:
                try:
                    os.close(fd)
                except OSError:
                    pass
        if conn in self.conns:
            self.conns.remove(conn)
        for handler in list(conn.channels.values()):
            try:
                handler.abort()
            except Exception as exc:
                log("abort failed: %r" % (exc,))
        conn.channels.clear()
        conn.producers.clear()
        self._resume_pipes(conn)  # a background process goes on into its ring buffer
        if not conn.owned:  # stdio or a device: the agent's life is this stream
            self.running = False

    # ---------------------------------------------------------------- frames

    def _dispatch(self, conn, kind, chan, payload):
        # type: (Conn, int, int, bytes) -> None
        if kind == K.OPEN:
            if chan in conn.channels:
                raise RequestError("ProtocolError", "channel %d is already open" % chan)
            req = p.decode_json(payload)
            op = req.get("op")
            handler = OPS.get(op) if isinstance(op, str) else None
            if handler is None:
                raise RequestError("UnknownOperation", "unknown operation %r" % (op,))
            handler(self, conn, chan, req)
            return
        target = conn.channels.get(chan)
        if target is None:
            return  # late frame for a finished channel: drop it
        if kind in (K.STDIN, K.DATA):
            target.data(payload)
        elif kind == K.EOF:
            target.eof()
        elif kind == K.SIGNAL:
            req = p.decode_json(payload)
            if req.get("cancel"):  # the client went away: undo, do not answer
                conn.channels.pop(chan, None)
                target.abort()
            else:
                target.signal(req)

    # ---------------------------------------------------------------- processes

    def _on_wake(self):
        # type: () -> None
        try:
            while os.read(self.wake_r, 4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        self._reap()

    def _reap(self):
        # type: () -> None
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            except InterruptedError:
                continue
            if pid == 0:
                return
            proc = self.procs.get(pid)
            if proc is None:
                continue  # an orphan we adopted as init
            if os.WIFSIGNALED(status):
                code = -os.WTERMSIG(status)
            else:
                code = os.WEXITSTATUS(status)
            proc.exit_code = code
            proc.popen.returncode = code
            proc.finished_at = time.time()
            if proc.open_pipes:
                self.call_later(OUTPUT_LINGER, lambda pr=proc: self._close_pipes(pr))
            self._maybe_done(proc)

    def _close_pipes(self, proc):
        # type: (Proc) -> None
        """The process exited a while ago and something (a grandchild) still holds a
        pipe: take what the pipe holds now, even if it is paused, and close it."""
        for fd, (pr, kind) in list(self.pipes.items()):
            if pr is proc:
                try:
                    self._drain_pipe(fd, proc, kind)
                except OSError:
                    pass
                self._drop_pipe(fd)
        self._maybe_done(proc)

    def _drain_pipe(self, fd, proc, kind):
        # type: (int, Proc, int) -> None
        """Read the bytes buffered in a pipe now (never more: a writer keeps going)."""
        buf = bytearray(4)
        fcntl.ioctl(fd, termios.FIONREAD, buf)
        left = int.from_bytes(bytes(buf), sys.byteorder)
        while left > 0:
            data = read_some(fd, min(left, 1 << 16))
            if not data:
                return
            left -= len(data)
            self._deliver(proc, kind, data)

    def _drop_pipe(self, fd):
        # type: (int) -> None
        proc, _ = self.pipes.pop(fd)
        if self.paused.pop(fd, None) is None:
            try:
                self.sel.unregister(fd)
            except (KeyError, ValueError):
                pass
        os.close(fd)
        proc.open_pipes -= 1

    def _on_pipe(self, fd, info):
        # type: (int, tuple) -> None
        proc, kind = info
        try:
            data = os.read(fd, 1 << 16)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop_pipe(fd)
            self._maybe_done(proc)
            return
        self._deliver(proc, kind, data)
        conn = proc.conn
        if conn is not None and not conn.closed and len(conn.out) >= WRITE_HIGH_WATER:
            self._pause_pipe(fd, conn)

    def _deliver(self, proc, kind, data):
        # type: (Proc, int, bytes) -> None
        if proc.conn is not None and not proc.conn.closed:
            proc.conn.send(kind, proc.chan, data)
        if proc.background:
            buf = proc.buffers[kind]
            buf += data
            if len(buf) > BACKGROUND_BUFFER:
                del buf[: len(buf) - BACKGROUND_BUFFER]
                proc.dropped = True

    def _pause_pipe(self, fd, conn):
        # type: (int, Conn) -> None
        """Stop reading a command's output while its client is this far behind: the
        command then blocks in its own write, and the agent's memory stays bounded."""
        try:
            self.sel.unregister(fd)
        except (KeyError, ValueError):
            return
        self.paused[fd] = conn

    def _resume_pipes(self, conn=None, proc=None):
        # type: (Conn | None, Proc | None) -> None
        """Read again the pipes paused for ``conn`` (or those of ``proc``)."""
        if not self.paused:
            return
        for fd, c in list(self.paused.items()):
            info = self.pipes.get(fd)
            if info is None:
                del self.paused[fd]
                continue
            if (conn is not None and c is conn) or (proc is not None and info[0] is proc):
                del self.paused[fd]
                self.sel.register(fd, selectors.EVENT_READ, ("pipe", info))

    def _maybe_done(self, proc):
        # type: (Proc) -> None
        if proc.done or proc.exit_code is None or proc.open_pipes:
            return
        proc.done = True
        self._close_stdin(proc)
        if proc.conn is not None and proc.conn.channels.get(proc.chan) is not None:
            proc.conn.finish(proc.chan, proc.result())
        waiters, proc.waiters = proc.waiters, []
        for conn, chan in waiters:
            try:
                conn.finish(chan, proc.full_result())
            except Exception as exc:  # one waiter's failure is not the others'
                conn.fail(chan, exc)
        if not proc.background:
            self.procs.pop(proc.pid, None)
        else:  # keep a finished background process around for a later wait
            self.call_later(600, lambda: self._forget(proc))

    def _forget(self, proc):
        # type: (Proc) -> None
        if self.procs.get(proc.pid) is proc:
            del self.procs[proc.pid]

    def _killpg(self, proc, sig):
        # type: (Proc, int) -> None
        try:
            os.killpg(proc.pid, sig)
        except OSError:
            try:
                os.kill(proc.pid, sig)
            except OSError:
                pass

    def _on_stdin_writable(self, proc):
        # type: (Proc) -> None
        stdin = proc.popen.stdin
        if stdin is None:
            return
        fd = stdin.fileno()
        try:
            n = os.write(fd, proc.stdin_buf)
            del proc.stdin_buf[:n]
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # the process closed its stdin: drop the rest
            proc.stdin_buf = bytearray()
        self.check_stdin_backlog(proc.conn)
        if not proc.stdin_buf:
            try:
                self.sel.unregister(fd)
            except (KeyError, ValueError):
                pass
            if proc.stdin_eof:
                self._close_stdin(proc)

    def _close_stdin(self, proc):
        # type: (Proc) -> None
        stdin = proc.popen.stdin
        if stdin is None:
            return
        try:
            self.sel.unregister(stdin.fileno())
        except (KeyError, ValueError):
            pass
        try:
            stdin.close()
        except OSError:
            pass
        proc.popen.stdin = None
        proc.stdin_buf = bytearray()
        self.check_stdin_backlog(proc.conn)


# --------------------------------------------------------------------------- channel handlers


class ExecChannel:
    def __init__(self, agent, proc):
        # type: (Agent, Proc) -> None
        self.agent = agent
        self.proc = proc

    def data(self, payload):
        # type: (bytes) -> None
        proc = self.proc
        if proc.popen.stdin is None:
            return
        was_empty = not proc.stdin_buf
        proc.stdin_buf += payload
        if was_empty:
            self.agent._on_stdin_writable(proc)
            if proc.stdin_buf and proc.popen.stdin is not None:
                self.agent.sel.register(
                    proc.popen.stdin.fileno(), selectors.EVENT_WRITE, ("stdin", proc)
                )
        self.agent.check_stdin_backlog(proc.conn)

    def eof(self):
        # type: () -> None
        self.proc.stdin_eof = True
        if not self.proc.stdin_buf:
            self.agent._close_stdin(self.proc)

    def signal(self, req):
        # type: (dict) -> None
        self.agent._killpg(self.proc, int(req.get("signal", signal.SIGTERM)))

    def abort(self):
        # type: () -> None
        proc = self.proc
        conn, proc.conn = proc.conn, None
        self.agent._resume_pipes(proc=proc)
        self.agent.check_stdin_backlog(conn)
        if not proc.background and proc.exit_code is None:
            self.agent._killpg(proc, signal.SIGKILL)


PASSWD_MAX = 16 << 20  # bytes read of /etc/passwd or /etc/group


class User:
    def __init__(self, name, uid, gid, home):
        # type: (str, int, int, str) -> None
        self.name, self.uid, self.gid, self.home = name, uid, gid, home


def _etc_lines(path):
    # type: (str) -> list
    """The colon-split lines of an /etc database, read like any sandbox file (a FIFO
    there is refused, not waited on; libc's getpwnam would block on it)."""
    try:
        data = read_small(path, PASSWD_MAX)
    except FileNotFoundError:
        return []
    return [line.split(":") for line in data.decode("utf-8", "replace").splitlines()
            if line and not line.startswith("#")]


def _lookup_user(user):
    # type: (str) -> User
    for f in _etc_lines("/etc/passwd"):
        if len(f) < 6 or not f[2].isdigit() or not f[3].isdigit():
            continue
        if f[0] == user or (user.isdigit() and int(f[2]) == int(user)):
            return User(f[0], int(f[2]), int(f[3]), f[5] or "/")
    raise RequestError("LookupError", "no user %r in the sandbox" % user)


def _user_groups(user):
    # type: (User) -> list
    """The user's primary group and every group of /etc/group that lists it."""
    groups = [user.gid]
    for f in _etc_lines("/etc/group"):
        if (len(f) >= 4 and f[2].isdigit() and user.name in f[3].split(",")
                and int(f[2]) not in groups):
            groups.append(int(f[2]))
    return groups


def op_exec(agent, conn, chan, req):
    # type: (Agent, Conn, int, dict) -> None
    argv = req.get("argv")
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        raise RequestError("ValueError", "argv must be a non-empty list of strings")
    env = dict(os.environ)
    env.pop("AIVA_AGENT_SOCKET", None)
    env.update({str(k): str(v) for k, v in (req.get("env") or {}).items()})
    cwd = req.get("cwd") or None
    if cwd is not None and not os.path.isdir(cwd):
        if req.get("cwd_default"):
            cwd = None
        else:
            raise FileNotFoundError(errno.ENOENT, "working directory does not exist", cwd)
    preexec = None
    user = req.get("user")
    if user:
        pw = _lookup_user(str(user))
        groups = _user_groups(pw)  # here, not in the child: the agent would wait for it
        env.update({"HOME": pw.home, "USER": pw.name, "LOGNAME": pw.name})

        def preexec(pw=pw, groups=groups):
            # type: (User, list) -> None
            os.setgroups(groups)
            os.setgid(pw.gid)
            os.setuid(pw.uid)

    want_stdin = bool(req.get("stdin"))
    popen = subprocess.Popen(
        argv,
        stdin=subprocess.PIPE if want_stdin else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=cwd,
        env=env,
        start_new_session=True,
        preexec_fn=preexec,
        close_fds=True,
    )
    proc = Proc(popen, conn, chan, bool(req.get("background")))
    agent.procs[popen.pid] = proc
    for stream, kind in ((popen.stdout, K.STDOUT), (popen.stderr, K.STDERR)):
        assert stream is not None
        fd = stream.fileno()
        set_nonblocking(fd)
        stream_fd = os.dup(fd)
        stream.close()
        agent.pipes[stream_fd] = (proc, kind)
        agent.sel.register(stream_fd, selectors.EVENT_READ, ("pipe", (proc, kind)))
        proc.open_pipes += 1
    if popen.stdin is not None:
        set_nonblocking(popen.stdin.fileno())
    popen.stdout = popen.stderr = None
    conn.channels[chan] = ExecChannel(agent, proc)
    conn.send_json(K.EVENT, chan, {"started": popen.pid})
    timeout = req.get("timeout")
    if timeout:

        def on_timeout(proc=proc):
            # type: (Proc) -> None
            if proc.exit_code is None:
                proc.timed_out = True
                agent._killpg(proc, signal.SIGKILL)

        agent.call_later(float(timeout), on_timeout)
    # a child that exited before we registered has already sent SIGCHLD: reap now
    agent._reap()


def _find_proc(agent, req):
    # type: (Agent, dict) -> Proc
    proc = agent.procs.get(int(req.get("pid", -1)))
    if proc is None:
        raise RequestError("ProcessLookupError",
                           "no process %s known to the agent" % req.get("pid"))
    return proc


def op_proc_wait(agent, conn, chan, req):
    # type: (Agent, Conn, int, dict) -> None
    proc = _find_proc(agent, req)
    if proc.done:
        conn.finish(chan, proc.full_result())
        return
    proc.waiters.append((conn, chan))
    conn.channels[chan] = _Waiter(proc, conn, chan)


class _Waiter:
    def __init__(self, proc, conn, chan):
        # type: (Proc, Conn, int) -> None
        self.proc, self.conn, self.chan = proc, conn, chan

    def data(self, payload):
        # type: (bytes) -> None
        pass

    eof = signal = lambda self, *a: None  # type: ignore[assignment]

    def abort(self):
        # type: () -> None
        self.proc.waiters = [w for w in self.proc.waiters if w[0] is not self.conn]


def op_proc_kill(agent, conn, chan, req):
    # type: (Agent, Conn, int, dict) -> None
    proc = _find_proc(agent, req)
    agent._killpg(proc, int(req.get("signal", signal.SIGKILL)))
    conn.finish(chan, {"pid": proc.pid})


def op_proc_list(agent, conn, chan, req):
    # type: (Agent, Conn, int, dict) -> None
    items = [pr.result() for pr in agent.procs.values()]
    for item, pr in zip(items, agent.procs.values()):
        item["argv"] = pr.popen.args
        item["background"] = pr.background
    conn.finish(chan, {"procs": items})


# --------------------------------------------------------------------------- files


def _stat_entry(path, name=None):
    # type: (str, str | None) -> dict
    st = os.lstat(path)
    mode = st.st_mode
    kind = (
        "dir" if stat.S_ISDIR(mode) else "file" if stat.S_ISREG(mode)
        else "symlink" if stat.S_ISLNK(mode) else "other"
    )
    return {
        "name": name if name is not None else os.path.basename(path),
        "path": path,
        "type": kind,
        "size": st.st_size,
        "mode": stat.S_IMODE(mode),
        "mtime": st.st_mtime,
        "mtime_ns": st.st_mtime_ns,
        "uid": st.st_uid,
        "gid": st.st_gid,
    }


class _Producing:
    """A channel whose work is a producer on the connection; it owns the producer's fd
    (if any), so cancelling the channel closes both, once."""

    def __init__(self, fd=-1):
        # type: (int) -> None
        self.gen = None  # type: object
        self.fd = fd

    def data(self, payload):
        # type: (bytes) -> None
        pass

    eof = signal = lambda self, *a: None  # type: ignore[assignment]

    def close_fd(self):
        # type: () -> None
        if self.fd >= 0:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = -1

    def abort(self):
        # type: () -> None
        gen, self.gen = self.gen, None
        if gen is not None:
            try:
                gen.close()  # type: ignore[attr-defined]
            except Exception as exc:  # it is running: it aborted itself
                log("closing a producer failed: %r" % (exc,))
        self.close_fd()


def start_producer(agent, conn, chan, holder, gen):
    # type: (Agent, Conn, int, _Producing, object) -> None
    holder.gen = gen
    conn.channels[chan] = holder
    conn.producers.append(gen)
    agent.want_write(conn)


def op_fs_read(agent, conn, chan, req):
    # type: (Agent, Conn, int, dict) -> None
    """EVENT {size, mode, mtime_ns}, then exactly ``size`` bytes or fewer: a file that
    grows meanwhile is cut there, one that shrinks ends early (RESULT says how many)."""
    fd, st = open_regular(req["path"])
    holder = _Producing(fd)
    try:
        head = b""
        size = st.st_size
        if size == 0:
            head = read_pseudo(fd)
            size = len(head)
        conn.send_json(K.EVENT, chan, {"size": size, "mode": stat.S_IMODE(st.st_mode),
                                       "mtime_ns": st.st_mtime_ns})
    except BaseException:
        holder.close_fd()
        raise
    start_producer(agent, conn, chan, holder, _read_frames(conn, chan, holder, size, head))


def _read_frames(conn, chan, holder, size, head):
    # type: (Conn, int, _Producing, int, bytes) -> object
    total = 0
    try:
        if head:
            total = len(head)
            for i in range(0, len(head), p.CHUNK * 4):
                yield p.encode(K.DATA, chan, head[i:i + p.CHUNK * 4])
        while total < size:
            chunk = read_some(holder.fd, min(p.CHUNK * 4, size - total))
            if not chunk:
                break
            total += len(chunk)
            yield p.encode(K.DATA, chan, chunk)
        result = {"bytes": total}  # type: dict
        if total == size and read_some(holder.fd, 1):
            result["truncated"] = True  # it grew: the rest is not what was declared
    except OSError as exc:
        conn.channels.pop(chan, None)
        yield p.encode_json(K.ERROR, chan, error_payload(exc))
        return
    finally:
        holder.close_fd()
    conn.channels.pop(chan, None)
    yield p.encode_json(K.RESULT, chan, result)


class _Writer:
    def __init__(self, agent, conn, chan, req):
        # type: (Agent, Conn, int, dict) -> None
        self.conn, self.chan, self.req = conn, chan, req
        self.path = req["path"]
        self.total = 0
        self.failed = None  # type: BaseException | None
        parent = os.path.dirname(self.path) or "."
        if req.get("mkdirs"):
            os.makedirs(parent, exist_ok=True)
        if os.path.isdir(self.path):
            raise IsADirectoryError(errno.EISDIR, "is a directory", self.path)
        cloexec = getattr(os, "O_CLOEXEC", 0)
        if req.get("append"):
            self.tmp = None  # type: str | None
            self.fd = _open_append(self.path)
        else:
            self.tmp = os.path.join(parent, ".%s.aiva-%d-%d" % (
                os.path.basename(self.path), os.getpid(), chan))
            try:  # whatever sits at the temp name (a FIFO someone planted) goes first
                os.unlink(self.tmp)
            except FileNotFoundError:
                pass
            self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                              | cloexec, 0o600)

    def data(self, payload):
        # type: (bytes) -> None
        if self.failed is not None:
            return
        try:
            view = memoryview(payload)
            while view:
                n = os.write(self.fd, view)
                view = view[n:]
            self.total += len(payload)
        except OSError as exc:
            self.failed = exc

    def eof(self):
        # type: () -> None
        try:
            if self.failed is not None:
                raise self.failed
            req = self.req
            mode = req.get("mode")
            if self.tmp is not None:
                if mode is None:
                    try:
                        mode = stat.S_IMODE(os.stat(self.path).st_mode)
                    except OSError:
                        mode = 0o644
                os.fchmod(self.fd, mode)
            elif mode is not None:
                os.fchmod(self.fd, mode)
            os.close(self.fd)
            self.fd = -1
            if self.tmp is not None:
                os.replace(self.tmp, self.path)
                self.tmp = None
            if req.get("mtime_ns") is not None:
                m = int(req["mtime_ns"])
                os.utime(self.path, ns=(m, m))
            self.conn.finish(self.chan, {"bytes": self.total})
        except Exception as exc:
            self.abort()
            self.conn.fail(self.chan, exc)

    def signal(self, req):
        # type: (dict) -> None
        pass

    def abort(self):
        # type: () -> None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.tmp:
            try:
                os.unlink(self.tmp)
            except OSError:
                pass
            self.tmp = None


def _open_append(path):
    # type: (str) -> int
    """An fd to append to the regular file at ``path`` (made if missing); a FIFO or a
    device there is refused, never opened in a way that could block or write to it."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISREG(st.st_mode):
            raise not_regular(path, st.st_mode)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NONBLOCK | os.O_NOCTTY
                 | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise not_regular(path, st.st_mode)
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def op_fs_write(agent, conn, chan, req):
    # type: (Agent, Conn, int, dict) -> None
    conn.channels[chan] = _Writer(agent, conn, chan, req)


def op_fs_stat(agent, conn, chan, req):
    # type: (Agent, Conn, int, dict) -> None
    conn.finish(chan, _stat_entry(req["path"]))


def op_fs_list(agent, conn, chan, req):
    # type: (Agent, Conn, int, dict) -> None
    path = req["path"]
    entries = []
    for name in sorted(os.listdir(path)):
        try:
            entries.append(_stat_entry(os.path.join(path, name), name))
        except OSError:
            continue  # vanished while listing
    try:
        frame = p.encode_json(K.RESULT, chan, {"entries": entries})
    except ValueError:
        raise RequestError("ValueError", "%s has too many entries (%d) for one answer: "
                           "walk it instead" % (path, len(entries)))
    conn.channels.pop(chan, None)
    conn.out += frame
    agent.want_write(conn)


def op_fs_walk(agent, conn, chan, req):
    # type: (Agent, Conn, int, dict) -> None
    """Every regular file under a root as relpath -> [size, mtime_ns, mode], and every
    directory, in EVENT batches of bounded size. Symlinks are never followed: each
    directory is opened relative to its parent's fd with O_NOFOLLOW, so one swapped for
    a link meanwhile is skipped, not entered. The walk goes as the client reads."""
    root = req["path"]
    flags = os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(root, flags | os.O_NONBLOCK)
    except NotADirectoryError:
        raise NotADirectoryError(errno.ENOTDIR, "not a directory", root)
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, "no such directory", root)
    holder = _Producing(fd)
    start_producer(agent, conn, chan, holder, _walk_frames(conn, chan, holder))


def _walk_frames(conn, chan, holder):
    # type: (Conn, int, _Producing) -> object
    files = {}  # type: dict
    dirs = []  # type: list
    size = seen = count = 0
    # [dir fd (-1: closed, deeper than WALK_MAX_FDS), relpath, name, subdirs still to
    # visit (None until the directory is listed)]
    stack = [[holder.fd, "", "", None]]  # type: list
    try:
        while stack:
            top = stack[-1]
            rel = top[1]
            if top[3] is None:  # not listed yet
                todo = []  # type: list
                top[3] = todo
                with os.scandir(top[0]) as it:
                    for entry in it:
                        seen += 1
                        name = entry.name
                        path = name if not rel else rel + "/" + name
                        # its JSON size: a non-ASCII character is at most 12 bytes
                        cost = len(path) if path.isascii() else 12 * len(path)
                        try:
                            st = entry.stat(follow_symlinks=False)
                        except OSError:
                            continue  # vanished while listing
                        if stat.S_ISDIR(st.st_mode):
                            todo.append(name)
                            dirs.append(path)
                            size += cost + 4
                        elif stat.S_ISREG(st.st_mode):
                            files[path] = [st.st_size, st.st_mtime_ns, stat.S_IMODE(st.st_mode)]
                            size += cost + 48
                            count += 1
                        if seen >= WALK_BATCH or size >= WALK_BATCH_BYTES:
                            yield p.encode_json(K.EVENT, chan, {"files": files, "dirs": dirs})
                            files, dirs, size, seen = {}, [], 0, 0
                todo.reverse()  # visit in listing order
                if len(stack) > WALK_MAX_FDS and todo:
                    _walk_close(stack, len(stack) - 1)  # reopened from an ancestor
                continue
            if not top[3]:
                _walk_close(stack, len(stack) - 1)
                stack.pop()
                continue
            name = top[3].pop()
            sub = _walk_open(stack, name)
            if sub >= 0:
                stack.append([sub, name if not rel else rel + "/" + name, name, None])
    except Exception as exc:
        conn.channels.pop(chan, None)
        yield p.encode_json(K.ERROR, chan, error_payload(exc))
        return
    finally:
        for i in range(len(stack)):
            _walk_close(stack, i)
        holder.close_fd()
    conn.channels.pop(chan, None)
    yield p.encode_json(K.EVENT, chan, {"files": files, "dirs": dirs})
    yield p.encode_json(K.RESULT, chan, {"count": count})


WALK_MAX_FDS = 64  # directories a walk keeps open; deeper ones are reopened from there
_WALK_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


def _walk_close(stack, i):
    # type: (list, int) -> None
    """Close the fd of stack entry ``i`` (not the root's: its holder owns that)."""
    if i > 0 and stack[i][0] >= 0:
        os.close(stack[i][0])
        stack[i][0] = -1


def _walk_open(stack, name):
    # type: (list, str) -> int
    """An fd for subdirectory ``name`` of the stack's top, never through a symlink (one
    swapped in meanwhile is not entered: -1). A top whose fd was closed is reached again
    from its nearest open ancestor, one O_NOFOLLOW step per level."""
    j = len(stack) - 1
    while stack[j][0] < 0:
        j -= 1
    fd = stack[j][0]
    for k, part in enumerate([entry[2] for entry in stack[j + 1:]] + [name]):
        try:
            nxt = os.open(part, _WALK_DIR, dir_fd=fd)
        except (FileNotFoundError, NotADirectoryError):
            return -1  # gone, or no longer a directory (a symlink now): not entered
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return -1
            raise
        finally:
            if k > 0:  # a step of our own on the way down
                os.close(fd)
        fd = nxt
    return fd


def op_fs_hash(agent, conn, chan, req):
    # type: (Agent, Conn, int, dict) -> None
    """sha256 of each path (None for one that is missing or not a regular file), hashed
    HASH_SLICE bytes per loop turn so a huge file never keeps other clients waiting. A
    file is hashed up to the size it had when opened, as fs.read would send it."""
    root = req.get("root") or "/"
    paths = req["paths"]
    if not isinstance(root, str) or not isinstance(paths, list) or not all(
            isinstance(x, str) for x in paths):
        raise RequestError("ValueError", "root must be a string, paths a list of strings")
    holder = _Producing()
    start_producer(agent, conn, chan, holder, _hash_frames(conn, chan, holder, root, paths))


def _hash_frames(conn, chan, holder, root, paths):
    # type: (Conn, int, _Producing, str, list) -> object
    hashes = {}  # type: dict
    budget = HASH_SLICE
    for rel in paths:
        h = hashlib.sha256()
        try:
            holder.fd, st = open_regular(os.path.join(root, rel))
            left = st.st_size
            if left == 0:
                h.update(read_pseudo(holder.fd))
            while left > 0:
                if budget <= 0:
                    yield b""  # the loop's turn
                    budget = HASH_SLICE
                chunk = read_some(holder.fd, min(1 << 20, left, budget))
                if not chunk:
                    break
                left -= len(chunk)
                budget -= len(chunk)
                h.update(chunk)
        except (OSError, ValueError, RequestError):  # missing, not regular, a NUL in it
            hashes[rel] = None
            continue
        finally:
            holder.close_fd()
        hashes[rel] = h.hexdigest()
        budget -= 4096  # opening costs something too: a list of small files yields as well
    conn.channels.pop(chan, None)
    try:
        frame = p.encode_json(K.RESULT, chan, {"hashes": hashes})
    except ValueError:
        frame = p.encode_json(K.ERROR, chan, {
            "kind": "ValueError",
            "message": "too many paths in one fs.hash request (%d)" % len(paths)})
    yield frame


def op_fs_mkdir(agent, conn, chan, req):
    # type: (Agent, Conn, int, dict) -> None
    path = req["path"]
    if req.get("parents", True):
        os.makedirs(path, mode=int(req.get("mode", 0o755)), exist_ok=True)
    else:
        os.mkdir(path, int(req.get("mode", 0o755)))
    conn.finish(chan, {"path": path})


def _rmtree(path):
    # type: (str) -> None
    for dirpath, dirnames, filenames in os.walk(path, topdown=False):
        for name in filenames:
            os.unlink(os.path.join(dirpath, name))
        for name in dirnames:
            full = os.path.join(dirpath, name)
            if os.path.islink(full):
                os.unlink(full)
            else:
                os.rmdir(full)
    os.rmdir(path)


def op_fs_remove(agent, conn, chan, req):
    # type: (Agent, Conn, int, dict) -> None
    path = req["path"]
    st = os.lstat(path)
    if stat.S_ISDIR(st.st_mode):
        if req.get("recursive"):
            _rmtree(path)
        else:
            os.rmdir(path)
    else:
        os.unlink(path)
    conn.finish(chan, {"path": path})


def op_fs_rename(agent, conn, chan, req):
    # type: (Agent, Conn, int, dict) -> None
    src, dst = req["src"], req["dst"]
    os.lstat(src)  # a clear error naming the source if it is missing
    os.rename(src, dst)
    conn.finish(chan, {"src": src, "dst": dst})


# --------------------------------------------------------------------------- system


def _read(path):
    # type: (str) -> str
    return read_small(path).decode("utf-8", "replace")


def op_ping(agent, conn, chan, req):
    # type: (Agent, Conn, int, dict) -> None
    conn.finish(chan, {
        "version": AGENT_VERSION,
        "pid": os.getpid(),
        "python": "%d.%d.%d" % sys.version_info[:3],
        "uid": os.getuid(),
    })


def op_sys_metrics(agent, conn, chan, req):
    # type: (Agent, Conn, int, dict) -> None
    """CPU, memory and uptime as the guest sees them, from /proc."""
    out = {}  # type: dict
    try:
        mem = {}
        for line in _read("/proc/meminfo").splitlines():
            key, _, rest = line.partition(":")
            mem[key] = int(rest.split()[0]) * 1024
        out["memory"] = {
            "total": mem.get("MemTotal", 0),
            "available": mem.get("MemAvailable", 0),
            "used": mem.get("MemTotal", 0) - mem.get("MemAvailable", 0),
            "cache": mem.get("Cached", 0) + mem.get("Buffers", 0),
        }
        cpu = _read("/proc/stat").splitlines()[0].split()[1:]
        out["cpu_jiffies"] = [int(x) for x in cpu]
        out["uptime"] = float(_read("/proc/uptime").split()[0])
        out["loadavg"] = [float(x) for x in _read("/proc/loadavg").split()[:3]]
    except (OSError, ValueError, IndexError) as exc:
        out["error"] = str(exc)
    conn.finish(chan, out)


def op_sys_shutdown(agent, conn, chan, req):
    # type: (Agent, Conn, int, dict) -> None
    """Stop serving: in a VM, /init then syncs, unmounts and powers off."""
    conn.finish(chan, {"shutdown": True})
    agent.running = False


OPS = {
    "ping": op_ping,
    "sys.shutdown": op_sys_shutdown,
    "exec": op_exec,
    "proc.wait": op_proc_wait,
    "proc.kill": op_proc_kill,
    "proc.list": op_proc_list,
    "fs.read": op_fs_read,
    "fs.write": op_fs_write,
    "fs.stat": op_fs_stat,
    "fs.list": op_fs_list,
    "fs.walk": op_fs_walk,
    "fs.hash": op_fs_hash,
    "fs.mkdir": op_fs_mkdir,
    "fs.remove": op_fs_remove,
    "fs.rename": op_fs_rename,
    "sys.metrics": op_sys_metrics,
}


def main(argv=None):
    # type: (list | None) -> int
    import argparse

    parser = argparse.ArgumentParser(prog="aiva-agent")
    parser.add_argument("--listen", action="append", default=[],
                        help="unix:/path/to/socket (repeatable)")
    parser.add_argument("--stdio", action="store_true", help="serve one client on stdin/stdout")
    parser.add_argument("--device", action="append", default=[],
                        help="serve one client on a character device (virtio-serial)")
    parser.add_argument("--vsock", type=int, action="append", default=[], metavar="PORT",
                        help="serve clients on AF_VSOCK port PORT, any CID (Firecracker)")
    parser.add_argument("--syslog", metavar="PATH",
                        help="receive the guest's syslog at /dev/log and append it to PATH "
                        "as JSON lines (a file, rotated at 8 MiB, or a character device)")
    parser.add_argument("--syslog-socket", default=SYSLOG_SOCKET, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    agent = Agent()
    if args.syslog:  # before serving: once a client is answered, logging works
        try:
            agent.listen_syslog(args.syslog, args.syslog_socket)
        except Exception as exc:  # never worth the agent itself
            log("cannot receive syslog: %r" % (exc,))
    for spec in args.listen:
        scheme, _, path = spec.partition(":")
        if scheme != "unix" or not path:
            parser.error("--listen takes unix:/path")
        agent.listen_unix(path)
    if args.stdio:
        agent.serve_fds(sys.stdin.fileno(), sys.stdout.fileno(), "stdio")
    for dev in args.device:
        fd = os.open(dev, os.O_RDWR | os.O_NOCTTY)
        agent.serve_fds(fd, fd, dev)
    for port in args.vsock:
        agent.listen_vsock(port)
    if not (args.listen or args.stdio or args.device or args.vsock):
        parser.error("nothing to serve: give --listen, --stdio, --device or --vsock")
    agent.run()
    return 0
