"""Replies that lie about modes, sizes and types: the host masks modes, holds the agent to
the size it declared, and turns every malformed reply into an AivaError (ProtocolError
where the call is the agent client's own), leaving no temp file behind."""

from __future__ import annotations

from typing import Any

import pytest
from hostile_kit import Area, MemoryGuard, biggest_file, bounded, ha, leftovers
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from surfaces import FILE_PULLS, PULLS, READS, mcp_tool

from aiva.errors import ProtocolError

FILE_STAT = ha.stat_reply("file", size=10)
MB10 = 10 << 20

#: fs.read replies; True: the host must refuse them with an AivaError.
READ_LIES: dict[str, tuple[list[Any], bool]] = {
    "mode 0o6777": (ha.read_reply(mode=0o6777), False),
    "mode 0o7777": (ha.read_reply(mode=0o7777), False),
    "mode 2**40": (ha.read_reply(mode=1 << 40), False),
    "mode negative": (ha.read_reply(mode=-1), True),
    "mode string": (ha.read_reply(mode="rwsrwsrwx"), True),
    "mode float": (ha.read_reply(mode=420.5), True),
    "size negative": (ha.read_reply(size=-5), True),
    "size string": (ha.read_reply(size="10"), True),
    "mtime string": (ha.read_reply(mtime_ns="now"), True),
    "mtime 2**80": (ha.read_reply(mtime_ns=1 << 80), True),
    "meta not an object": (ha.read_reply(meta=[1, 2]), True),
    "meta empty": (ha.read_reply(meta={}), True),
    "sends more than declared": (ha.read_reply(size=10, sent=MB10), True),
    "sends less than declared": (ha.read_reply(size=MB10, sent=10), False),
    "declares 2**62": (ha.read_reply(size=1 << 62, sent=10), False),
    "closes mid-stream": (ha.read_reply(size=1 << 20, sent=1000,
                                        then=[{"close": True}]), True),
}
FEW = ["mode 0o6777", "mode string", "sends more than declared", "closes mid-stream"]


def _pull(hostile: Any, op: str, lie: str, *, file_op: bool) -> None:
    reply, must_fail = READ_LIES[lie]
    area = Area.make(hostile.tmp / "area")
    ops = {"fs.read": reply, "fs.walk": ha.walk_reply(["f"], size=10)}
    if file_op:
        ops["fs.stat"] = FILE_STAT
    hostile.play(ha.script(ops))
    with MemoryGuard(on_breach=hostile.kill) as mem:
        out = bounded(lambda: (FILE_PULLS if file_op else PULLS)[op](hostile, area.dest),
                      on_overrun=hostile.kill)
    out.ended(must_fail=must_fail)
    mem.check()
    area.check()
    assert not leftovers(area.root), f"temp files left: {leftovers(area.root)}"
    if lie == "sends more than declared":
        assert biggest_file(area.dest) <= 10, "more bytes on the host than the agent declared"


@pytest.mark.parametrize("lie", READ_LIES)
def test_copy_out_of_a_file_against_each_lie(hostile: Any, lie: str) -> None:
    _pull(hostile, "engine.copy_out(file)", lie, file_op=True)


@pytest.mark.parametrize("lie", READ_LIES)
def test_sync_pull_against_each_lie(hostile: Any, lie: str) -> None:
    _pull(hostile, "engine.sync(pull)", lie, file_op=False)


@pytest.mark.parametrize("lie", FEW)
@pytest.mark.parametrize("op", [op for op in FILE_PULLS if op != "engine.copy_out(file)"])
def test_other_file_pulls_against_the_worst_lies(hostile: Any, op: str, lie: str) -> None:
    _pull(hostile, op, lie, file_op=True)


@pytest.mark.parametrize("lie", FEW)
@pytest.mark.parametrize("op", ["mcp sync(pull)", "daemon /sync(pull)", "Sandbox.sync(pull)"])
def test_other_dir_pulls_against_the_worst_lies(hostile: Any, op: str, lie: str) -> None:
    _pull(hostile, op, lie, file_op=False)


@pytest.mark.parametrize("op", READS)
@pytest.mark.parametrize("lie", ["sends more than declared", "meta not an object",
                                 "closes mid-stream"])
def test_reads_into_memory_refuse_lies(hostile: Any, op: str, lie: str) -> None:
    hostile.play(ha.script({"fs.read": READ_LIES[lie][0], "fs.stat": FILE_STAT}))
    with MemoryGuard(on_breach=hostile.kill) as mem:
        out = bounded(lambda: READS[op](hostile), on_overrun=hostile.kill)
    mem.check()
    if op == "mcp file_read" and lie == "closes mid-stream":
        out.ended()  # its 100-byte window came before the cut: returning it is right
        assert out.error is not None or out.value["length"] <= 100, out.describe()
        return
    out.ended(must_fail=True)


def test_read_stream_raises_protocol_error_past_the_declared_size(hostile: Any) -> None:
    hostile.play(ha.script({"fs.read": READ_LIES["sends more than declared"][0]}))

    def read() -> int:
        _meta, chunks = hostile.engine.read_stream(hostile.name, "/workspace/f")
        return sum(len(c) for c in chunks)

    out = bounded(read, on_overrun=hostile.kill)
    out.ended(must_fail=True)
    assert isinstance(out.error, ProtocolError), out.describe()


_examples = iter(range(10**6))
NOT_INT_META = st.one_of(st.text(max_size=4), st.none(), st.lists(st.integers(), max_size=2),
                         st.floats(allow_nan=False, allow_infinity=False))


@settings(max_examples=25, deadline=None, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(size=st.one_of(st.integers(-(1 << 70), 1 << 70), NOT_INT_META),
       mode=st.one_of(st.integers(-(1 << 40), 1 << 40), NOT_INT_META),
       mtime=st.one_of(st.integers(-(1 << 70), 1 << 70), NOT_INT_META),
       sent=st.sampled_from([0, 10, 1 << 16]))
def test_generated_read_metadata(hostile: Any, size: Any, mode: Any, mtime: Any,
                                 sent: int) -> None:
    """Any declared size, mode and mtime: the file on the host never has powers or wide
    modes, never more bytes than declared; a bad type or range is an AivaError."""
    area = Area.make(hostile.tmp / f"g{next(_examples)}")
    hostile.play(ha.script({"fs.stat": FILE_STAT,
                            "fs.read": ha.read_reply(size=size, sent=sent, mode=mode,
                                                     mtime_ns=mtime)}))
    out = bounded(lambda: FILE_PULLS["engine.copy_out(file)"](hostile, area.dest),
                  on_overrun=hostile.kill)

    def natural(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and x >= 0

    out.ended(must_fail=not (natural(size) and natural(mode) and natural(mtime))
              or (natural(size) and sent > size))
    area.check()
    assert not leftovers(area.root)
    if natural(size):
        assert biggest_file(area.dest) <= max(size, len("mine\n"))


# ---------------------------------------------------------------------- malformed frames

NOT_OBJECTS = {"a list": "[1,2]", "not json": "{nope", "bad utf-8": "\udcff\udcfe",
               "a string": '"ok"', "null": "null"}


@pytest.mark.parametrize("payload", NOT_OBJECTS)
@pytest.mark.parametrize("op", ["ping", "fs.stat", "fs.walk", "exec", "fs.list",
                                "fs.hash", "sys.metrics"])
def test_a_reply_that_is_not_an_object_is_a_protocol_error(hostile: Any, op: str,
                                                          payload: str) -> None:
    kind = "EVENT" if op in ("exec", "fs.walk") else "RESULT"
    hostile.play(ha.script({op: [{"text": NOT_OBJECTS[payload], "kind": kind},
                                 {"hang": True}]}))
    client = hostile.engine.agent(hostile.name)
    calls = {"ping": lambda: client.ping(), "fs.stat": lambda: client.stat("/x"),
             "fs.walk": lambda: client.walk("/x"), "exec": lambda: client.exec(["true"]),
             "fs.list": lambda: client.list_dir("/x"),
             "fs.hash": lambda: client.hash_files("/x", ["a"]),
             "sys.metrics": lambda: client.metrics()}
    out = bounded(calls[op], on_overrun=hostile.kill)
    out.ended(must_fail=True)
    assert isinstance(out.error, ProtocolError), out.describe()


# ---------------------------------------------------------------------- exec replies

NOT_INT = st.one_of(st.text(max_size=4), st.none(), st.lists(st.integers(), max_size=2),
                    st.dictionaries(st.text(max_size=2), st.integers(), max_size=1),
                    st.floats(allow_nan=False, allow_infinity=False).filter(
                        lambda x: x != int(x)))
NOT_NUMBER = st.one_of(st.text(max_size=4), st.none(), st.lists(st.integers(), max_size=2),
                       st.dictionaries(st.text(max_size=2), st.integers(), max_size=1))
NOT_BOOL = NOT_NUMBER


@st.composite
def bad_exec_replies(draw: Any) -> dict[str, Any]:
    """An exec exchange with at least one field of the wrong type."""
    good = {"started": 4242, "exit_code": 0, "duration": 0.5, "timed_out": False}
    bad = {"started": NOT_INT, "exit_code": NOT_INT, "duration": NOT_NUMBER,
           "timed_out": NOT_BOOL}
    keys = draw(st.lists(st.sampled_from(sorted(bad)), min_size=1, max_size=4, unique=True))
    return good | {k: draw(bad[k]) for k in keys}


@settings(max_examples=25, deadline=None, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(reply=bad_exec_replies())
def test_exec_replies_of_the_wrong_type_are_protocol_errors(hostile: Any,
                                                           reply: dict[str, Any]) -> None:
    hostile.play(ha.script({"exec": ha.exec_reply(**reply)}))
    out = bounded(lambda: hostile.engine.exec(hostile.name, ["true"]),
                  on_overrun=hostile.kill)
    out.ended(must_fail=True)
    assert isinstance(out.error, ProtocolError), out.describe()


def test_exec_with_a_missing_result_field_is_a_protocol_error(hostile: Any) -> None:
    hostile.play(ha.script({"exec": ha.exec_reply(result={"exit_code": 0})}))
    out = bounded(lambda: hostile.engine.exec(hostile.name, ["true"]),
                  on_overrun=hostile.kill)
    out.ended(must_fail=True)
    assert isinstance(out.error, ProtocolError), out.describe()


def test_mcp_exec_and_daemon_exec_report_bad_replies_as_aiva_errors(hostile: Any) -> None:
    from surfaces import daemon_ndjson

    hostile.play(ha.script({"exec": ha.exec_reply(exit_code="zero", started="x")}))
    out = bounded(lambda: mcp_tool(hostile, "exec", {"sandbox": hostile.name,
                                                     "command": ["true"]}),
                  on_overrun=hostile.kill)
    out.ended(must_fail=True)
    out = bounded(lambda: daemon_ndjson(hostile, "/exec", {"command": ["true"]}),
                  on_overrun=hostile.kill)
    out.ended(must_fail=True)


# ---------------------------------------------------------------------- sizes in fs.write

@pytest.mark.parametrize("written", ["lots", None, -1, [1], 1.5])
def test_write_replies_of_the_wrong_type_are_protocol_errors(hostile: Any, tmp_path: Any,
                                                            written: Any) -> None:
    src = tmp_path / "up.txt"
    src.write_text("upload\n")
    hostile.play(ha.script({"fs.write": [{"consume": True}, {"result": {"bytes": written}}],
                            "fs.stat": ha.stat_reply("file")}))
    for call in (lambda: hostile.engine.write_file(hostile.name, "/workspace/x", b"abc"),
                 lambda: hostile.engine.copy_in(hostile.name, src, "/workspace/x")):
        out = bounded(call, on_overrun=hostile.kill)
        out.ended(must_fail=True)
        assert isinstance(out.error, ProtocolError), out.describe()


# ---------------------------------------------------------------------- listings via MCP

BAD_ENTRIES = {
    "mode string": {"name": "a", "type": "file", "size": 1, "mode": "rwx", "mtime": 0},
    "size string": {"name": "a", "type": "file", "size": "big", "mode": 420, "mtime": 0},
    "mtime string": {"name": "a", "type": "file", "size": 1, "mode": 420, "mtime": "now"},
    "mtime huge": {"name": "a", "type": "file", "size": 1, "mode": 420, "mtime": 1e300},
    "not an object": "a",
}


@pytest.mark.parametrize("entry", BAD_ENTRIES)
def test_mcp_file_list_reports_bad_entries_as_an_aiva_error(hostile: Any, entry: str) -> None:
    hostile.play(ha.script({"fs.list": [{"result": {"entries": [BAD_ENTRIES[entry]]}}]}))
    out = bounded(lambda: mcp_tool(hostile, "file_list", {"sandbox": hostile.name,
                                                          "path": "/workspace"}),
                  on_overrun=hostile.kill)
    out.ended(must_fail=True)
