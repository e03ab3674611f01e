from __future__ import annotations

import pytest

from aiva.errors import InvalidTransition, InvalidValue
from aiva.models import PortSpec, State, can_move, check_action, check_name


def test_state_machine_of_the_spec() -> None:
    assert can_move(State.CREATING, State.RUNNING)
    assert can_move(State.RUNNING, State.PAUSED) and can_move(State.PAUSED, State.RUNNING)
    assert can_move(State.RUNNING, State.STOPPING)
    assert can_move(State.STOPPING, State.STOPPED)
    assert can_move(State.STOPPED, State.RUNNING)
    for s in State:
        assert can_move(s, State.ERROR)
    assert not can_move(State.STOPPED, State.PAUSED)
    assert not can_move(State.PAUSED, State.CREATING)
    assert not can_move(State.STOPPING, State.RUNNING)


@pytest.mark.parametrize(
    ("state", "action"),
    [(State.STOPPED, "pause"), (State.RUNNING, "resume"), (State.RUNNING, "start"),
     (State.STOPPED, "stop"), (State.STOPPED, "use")],
)
def test_illegal_actions_raise_with_hint(state: State, action: str) -> None:
    with pytest.raises(InvalidTransition) as exc:
        check_action("box", state, action)
    assert exc.value.hint
    assert state.value in str(exc.value)


def test_paused_use_hints_resume() -> None:
    with pytest.raises(InvalidTransition) as exc:
        check_action("box", State.PAUSED, "use")
    assert "aiva resume box" in (exc.value.hint or "")


def test_legal_actions_pass() -> None:
    check_action("b", State.RUNNING, "pause")
    check_action("b", State.PAUSED, "resume")
    check_action("b", State.ERROR, "start")
    check_action("b", State.RUNNING, "use")


@pytest.mark.parametrize(
    ("text", "ip", "host", "guest", "proto"),
    [("8080:80", "127.0.0.1", 8080, 80, "tcp"),
     ("127.0.0.1:8080:80", "127.0.0.1", 8080, 80, "tcp"),
     ("0.0.0.0:53:53/udp", "0.0.0.0", 53, 53, "udp"),
     ("80", "127.0.0.1", None, 80, "tcp"),
     ("127.0.0.1::80", "127.0.0.1", None, 80, "tcp")],
)
def test_port_specs(text: str, ip: str, host: int | None, guest: int, proto: str) -> None:
    p = PortSpec.parse(text)
    assert (p.host_ip, p.host_port, p.guest_port, p.protocol) == (ip, host, guest, proto)


@pytest.mark.parametrize("bad", ["x:80", "70000:80", "80/sctp", "1:2:3:4", ""])
def test_bad_port_specs(bad: str) -> None:
    with pytest.raises(InvalidValue, match="port mapping"):
        PortSpec.parse(bad)


def test_names() -> None:
    assert check_name("agent-1.b_c") == "agent-1.b_c"
    for bad in ("", "-x", "a b", "x" * 64, "a/b"):
        with pytest.raises(InvalidValue):
            check_name(bad)
