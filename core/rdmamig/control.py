"""Control-channel state machine: who may SEND what, and when (sans-IO).

Theory of operation. Every SEND must land in a receive the peer has posted, so the
receiver of the next message first sends READY. The source drives: it waits for
READY, sends one message and, for a request, waits for the reply (which needs no
READY: the source posted its receive before sending the request). The destination
loops: send READY, take whatever message arrives, answer it if it is a request, and
send READY again. ERROR may be sent or received in any live state and ends the
conversation.

This module only tracks states. It does no IO and keeps no clock: the engine feeds it
each message it sends (:meth:`ControlState.send`) and receives
(:meth:`ControlState.receive`), and an illegal one raises "can't ... when role=...
state=...". The table below is the whole protocol; nothing else decides.
"""

from __future__ import annotations

import enum
from typing import Final

from .errors import LocalProtocolError, RemoteProtocolError
from .wire import Command


class Role(enum.Enum):
    """Which end of the migration this is."""

    SOURCE = "source"
    DESTINATION = "destination"


class State(enum.Enum):
    """States of either role (each role uses its own subset)."""

    # source
    WAIT_READY = "wait-ready"
    CAN_SEND = "can-send"
    WAIT_RAM_BLOCKS_RESULT = "wait-ram-blocks-result"
    WAIT_REGISTER_RESULT = "wait-register-result"
    WAIT_UNREGISTER_FINISHED = "wait-unregister-finished"
    WAIT_VERIFY_RESULT = "wait-verify-result"
    WAIT_AUTH_CHALLENGE = "wait-auth-challenge"
    WAIT_COMMIT_RESULT = "wait-commit-result"
    # destination
    IDLE = "idle"
    AWAIT_MESSAGE = "await-message"
    OWE_RAM_BLOCKS_RESULT = "owe-ram-blocks-result"
    OWE_REGISTER_RESULT = "owe-register-result"
    OWE_UNREGISTER_FINISHED = "owe-unregister-finished"
    OWE_VERIFY_RESULT = "owe-verify-result"
    OWE_AUTH_CHALLENGE = "owe-auth-challenge"
    OWE_COMMIT_RESULT = "owe-commit-result"
    # both
    ERROR = "error"


class Direction(enum.Enum):
    """Whether this side sends the message or receives it."""

    SEND = "send"
    RECV = "receive"


S, R = Direction.SEND, Direction.RECV
C = Command

# Messages the destination takes after a READY, and the state each leads to.
_DESTINATION_TAKES: Final = {
    C.QEMU_FILE: State.IDLE,
    C.RAM_BLOCKS_REQUEST: State.OWE_RAM_BLOCKS_RESULT,
    C.COMPRESS: State.IDLE,
    C.REGISTER_REQUEST: State.OWE_REGISTER_RESULT,
    C.REGISTER_FINISHED: State.IDLE,
    C.UNREGISTER_REQUEST: State.OWE_UNREGISTER_FINISHED,
    C.BLOCK_HASHES: State.OWE_VERIFY_RESULT,
    C.PAGES: State.IDLE,
    C.CHUNK_HASHES: State.IDLE,
    C.AUTH_HELLO: State.OWE_AUTH_CHALLENGE,
    C.AUTH_PROOF: State.IDLE,
    C.COMMIT: State.OWE_COMMIT_RESULT,
}

# Requests the source sends, and the state that waits for the answer.
_SOURCE_WAITS: Final = {
    C.RAM_BLOCKS_REQUEST: State.WAIT_RAM_BLOCKS_RESULT,
    C.REGISTER_REQUEST: State.WAIT_REGISTER_RESULT,
    C.UNREGISTER_REQUEST: State.WAIT_UNREGISTER_FINISHED,
    C.BLOCK_HASHES: State.WAIT_VERIFY_RESULT,
    C.AUTH_HELLO: State.WAIT_AUTH_CHALLENGE,
    C.COMMIT: State.WAIT_COMMIT_RESULT,
}

#: (role, state, direction, command) -> next state. Anything absent is illegal.
TRANSITIONS: Final[dict[tuple[Role, State, Direction, Command], State]] = {
    (Role.SOURCE, State.WAIT_READY, R, C.READY): State.CAN_SEND,
    **{
        (Role.SOURCE, State.CAN_SEND, S, command): _SOURCE_WAITS.get(command, State.WAIT_READY)
        for command in _DESTINATION_TAKES
    },
    (Role.SOURCE, State.WAIT_RAM_BLOCKS_RESULT, R, C.RAM_BLOCKS_RESULT): State.WAIT_READY,
    (Role.SOURCE, State.WAIT_REGISTER_RESULT, R, C.REGISTER_RESULT): State.WAIT_READY,
    (Role.SOURCE, State.WAIT_UNREGISTER_FINISHED, R, C.UNREGISTER_FINISHED): State.WAIT_READY,
    (Role.SOURCE, State.WAIT_VERIFY_RESULT, R, C.VERIFY_RESULT): State.WAIT_READY,
    (Role.SOURCE, State.WAIT_AUTH_CHALLENGE, R, C.AUTH_CHALLENGE): State.WAIT_READY,
    (Role.SOURCE, State.WAIT_COMMIT_RESULT, R, C.COMMIT_RESULT): State.WAIT_READY,
    (Role.DESTINATION, State.IDLE, S, C.READY): State.AWAIT_MESSAGE,
    **{
        (Role.DESTINATION, State.AWAIT_MESSAGE, R, command): after
        for command, after in _DESTINATION_TAKES.items()
    },
    (Role.DESTINATION, State.OWE_RAM_BLOCKS_RESULT, S, C.RAM_BLOCKS_RESULT): State.IDLE,
    (Role.DESTINATION, State.OWE_REGISTER_RESULT, S, C.REGISTER_RESULT): State.IDLE,
    (Role.DESTINATION, State.OWE_UNREGISTER_FINISHED, S, C.UNREGISTER_FINISHED): State.IDLE,
    (Role.DESTINATION, State.OWE_VERIFY_RESULT, S, C.VERIFY_RESULT): State.IDLE,
    (Role.DESTINATION, State.OWE_AUTH_CHALLENGE, S, C.AUTH_CHALLENGE): State.IDLE,
    (Role.DESTINATION, State.OWE_COMMIT_RESULT, S, C.COMMIT_RESULT): State.IDLE,
}

INITIAL: Final = {Role.SOURCE: State.WAIT_READY, Role.DESTINATION: State.IDLE}


class ControlState:
    """The control channel's state for one role; feed it every message."""

    def __init__(self, role: Role) -> None:
        self.role = role
        self.state = INITIAL[role]

    def _advance(self, direction: Direction, command: Command) -> None:
        if command == Command.ERROR and self.state is not State.ERROR:
            # Either side may give up at any time, and the other aborts.
            self.state = State.ERROR
            return
        after = TRANSITIONS.get((self.role, self.state, direction, command))
        if after is None:
            verb = "send" if direction is Direction.SEND else "handle"
            error = LocalProtocolError if direction is Direction.SEND else RemoteProtocolError
            raise error(
                f"can't {verb} {command.label} when role={self.role.name} "
                f"state={self.state.name}"
            )
        self.state = after

    def send(self, command: Command) -> None:
        """Record that we are sending ``command``.

        Raises:
            LocalProtocolError: the protocol does not let this role send it now.
        """
        self._advance(Direction.SEND, command)

    def receive(self, command: Command) -> None:
        """Record that ``command`` arrived from the peer.

        Raises:
            RemoteProtocolError: the peer was not allowed to send it now.
        """
        self._advance(Direction.RECV, command)

    def may_send(self, command: Command) -> bool:
        """Whether :meth:`send` would accept ``command`` now."""
        if command == Command.ERROR:
            return self.state is not State.ERROR
        return (self.role, self.state, Direction.SEND, command) in TRANSITIONS
