"""The control-channel state machine's table."""

from __future__ import annotations

import copy

import pytest
from rdmamig.control import INITIAL, TRANSITIONS, ControlState, Direction, Role, State
from rdmamig.errors import LocalProtocolError, RemoteProtocolError
from rdmamig.wire import Command as C


def drive(state: ControlState, steps: list[tuple[str, C]]) -> None:
    for direction, command in steps:
        (state.send if direction == "send" else state.receive)(command)


def test_source_follows_a_qemu_like_conversation() -> None:
    source = ControlState(Role.SOURCE)
    drive(source, [("recv", C.READY), ("send", C.QEMU_FILE), ("recv", C.READY),
                   ("send", C.RAM_BLOCKS_REQUEST), ("recv", C.RAM_BLOCKS_RESULT),
                   ("recv", C.READY), ("send", C.REGISTER_REQUEST),
                   ("recv", C.REGISTER_RESULT), ("recv", C.READY), ("send", C.COMPRESS),
                   ("recv", C.READY), ("send", C.UNREGISTER_REQUEST),
                   ("recv", C.UNREGISTER_FINISHED), ("recv", C.READY),
                   ("send", C.REGISTER_FINISHED)])
    assert source.state is State.WAIT_READY


def test_destination_takes_any_message_after_ready() -> None:
    for command, reply in [(C.QEMU_FILE, None), (C.COMPRESS, None),
                           (C.REGISTER_FINISHED, None),
                           (C.RAM_BLOCKS_REQUEST, C.RAM_BLOCKS_RESULT),
                           (C.REGISTER_REQUEST, C.REGISTER_RESULT),
                           (C.UNREGISTER_REQUEST, C.UNREGISTER_FINISHED)]:
        destination = ControlState(Role.DESTINATION)
        drive(destination, [("send", C.READY), ("recv", command)])
        if reply is not None:
            destination.send(reply)
        assert destination.state is State.IDLE


def test_source_may_not_send_before_ready() -> None:
    with pytest.raises(LocalProtocolError,
                       match="can't send QEMU FILE when role=SOURCE state=WAIT_READY"):
        ControlState(Role.SOURCE).send(C.QEMU_FILE)


def test_unexpected_message_is_a_remote_error() -> None:
    destination = ControlState(Role.DESTINATION)
    with pytest.raises(RemoteProtocolError,
                       match="can't handle QEMU FILE when role=DESTINATION state=IDLE"):
        destination.receive(C.QEMU_FILE)
    source = ControlState(Role.SOURCE)
    drive(source, [("recv", C.READY), ("send", C.REGISTER_REQUEST)])
    with pytest.raises(RemoteProtocolError, match="can't handle READY when role=SOURCE "
                                                  "state=WAIT_REGISTER_RESULT"):
        source.receive(C.READY)


def test_destination_must_answer_before_ready() -> None:
    destination = ControlState(Role.DESTINATION)
    drive(destination, [("send", C.READY), ("recv", C.REGISTER_REQUEST)])
    with pytest.raises(LocalProtocolError, match="state=OWE_REGISTER_RESULT"):
        destination.send(C.READY)


def paths_to_every_state(role: Role) -> dict[State, list[tuple[str, C]]]:
    """The shortest way from the initial state to each state the table reaches."""
    paths: dict[State, list[tuple[str, C]]] = {INITIAL[role]: []}
    frontier = [INITIAL[role]]
    while frontier:
        state = frontier.pop(0)
        for (who, at, direction, command), after in TRANSITIONS.items():
            if who is role and at is state and after not in paths:
                step = ("send" if direction is Direction.SEND else "recv", command)
                paths[after] = [*paths[state], step]
                frontier.append(after)
    return paths


def test_every_live_state_is_reached_by_some_role() -> None:
    reached = {state for role in Role for state in paths_to_every_state(role)}
    assert reached == set(State) - {State.ERROR}


@pytest.mark.parametrize(("role", "state"), [
    (role, state) for role in Role for state in paths_to_every_state(role)])
def test_error_ends_the_conversation_from_any_state(role: Role, state: State) -> None:
    path = paths_to_every_state(role)[state]
    for direction in ("send", "recv"):
        machine = ControlState(role)
        drive(machine, path)
        assert machine.state is state
        assert machine.may_send(C.ERROR)
        drive(machine, [(direction, C.ERROR)])
        assert machine.state is State.ERROR
        assert not machine.may_send(C.ERROR)
        with pytest.raises(RemoteProtocolError):
            machine.receive(C.READY)


# The rdmamig extensions' requests, each with the reply it waits for (None: none).
EXTENSION_REQUESTS = [(C.AUTH_HELLO, C.AUTH_CHALLENGE), (C.AUTH_PROOF, None),
                      (C.BLOCK_HASHES, C.VERIFY_RESULT), (C.COMMIT, C.COMMIT_RESULT),
                      (C.PAGES, None)]


@pytest.mark.parametrize(("request_", "reply"), EXTENSION_REQUESTS,
                         ids=[r.name for r, _ in EXTENSION_REQUESTS])
def test_extension_requests_are_walked_as_the_others(request_: C, reply: C | None) -> None:
    source, destination = ControlState(Role.SOURCE), ControlState(Role.DESTINATION)
    destination.send(C.READY)
    source.receive(C.READY)
    source.send(request_)
    destination.receive(request_)
    if reply is not None:
        # Waiting for its answer, the source takes nothing else, READY included.
        for other in (C.READY, C.QEMU_FILE, C.REGISTER_RESULT, C.COMMIT_RESULT,
                      C.VERIFY_RESULT, C.AUTH_CHALLENGE):
            if other is reply:
                continue
            with pytest.raises(RemoteProtocolError, match=f"can't handle {other.label} when "
                                                          f"role=SOURCE state=WAIT_"):
                copy.copy(source).receive(other)
        # The destination owes it before anything else.
        with pytest.raises(LocalProtocolError, match="can't send READY when "
                                                     "role=DESTINATION state=OWE_"):
            copy.copy(destination).send(C.READY)
        destination.send(reply)
        source.receive(reply)
    assert source.state is State.WAIT_READY and destination.state is State.IDLE
