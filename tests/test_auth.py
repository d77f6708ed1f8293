"""The pre-shared key: where it is read from, and that nothing prints it."""

from __future__ import annotations

import contextlib
import os
import pydoc
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import rdmamig
from rdmamig import wire
from rdmamig.auth import ENVIRONMENT, PreSharedKey, authenticate_destination, load_key
from rdmamig.caps import SOURCE_DEFAULTS, Capability
from rdmamig.control import Role
from rdmamig.engine import RamBlock, Source, SourceConfig
from rdmamig.errors import (
    AuthenticationError,
    ConfigurationError,
    MigrationError,
    RdmamigError,
)
from rdmamig.policy import PolicyOptions
from rdmamig.session import ControlSession
from rdmamig.testing import connected_pair
from rdmamig.transport import Endpoint
from rdmamig_policies.pin_until_done import PinUntilDone
from rdmamig_tcp import TcpBackend


def test_help_never_shows_the_key_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "do-not-print-me-0123456789abcdef"
    monkeypatch.setenv(ENVIRONMENT, secret)
    key = load_key(None)
    assert key is not None  # read from the environment when no file is given
    for thing in (rdmamig, rdmamig.load_key, load_key):
        assert secret not in pydoc.render_doc(thing, renderer=pydoc.plaintext)
    assert secret not in repr(key) and secret not in str(key)
    given = load_key(None, {ENVIRONMENT: " " + secret + "\n"})
    assert given is not None
    facts = (Role.SOURCE, Capability.AUTH, bytes(32), bytes(32))
    assert given.proof(*facts) == key.proof(*facts)  # the same key, whitespace aside


@pytest.mark.parametrize(("mode", "link", "content", "message"), [
    (0o644, False, b"k" * 32, r"readable by others \(mode 644\); chmod 600 it"),
    (0o640, False, b"k" * 32, r"readable by others \(mode 640\)"),
    (0o600, True, b"k" * 32, "cannot read the key file"),  # a link is not followed
    (0o600, False, b"k" * 15 + b"\n", "the pre-shared key is 15 bytes; it must be at least 16"),
    (0o600, False, b"k" * 5000, "is over 4096 bytes"),
])
def test_a_key_file_that_is_not_safe_is_refused(tmp_path: Path, mode: int, link: bool,
                                                content: bytes, message: str) -> None:
    key = tmp_path / "key"
    key.write_bytes(content)
    key.chmod(mode)
    path = key
    if link:
        path = tmp_path / "link"
        path.symlink_to(key)
    with pytest.raises(ConfigurationError, match=message):
        load_key(path)


def test_a_key_file_of_its_owner_alone_is_read(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_bytes(b"k" * 32 + b"\n")
    key.chmod(0o600)
    assert load_key(key) is not None


def _impostor(endpoint: Endpoint, proof: Callable[[bytes, bytes], bytes],
              seen: list[wire.Message]) -> None:
    """A destination that answers AUTH HELLO with ``proof(their nonce, ours)`` and
    records what the source sends next."""
    session = ControlSession(endpoint, role=Role.DESTINATION,
                             capabilities=endpoint.capabilities, timeout=10)
    hello = session.exchange_recv({wire.Command.AUTH_HELLO})
    assert isinstance(hello, wire.AuthHello)
    ours = os.urandom(wire.NONCE_BYTES)
    session.send(wire.AuthChallenge(nonce=ours, proof=proof(hello.nonce, ours)))
    with contextlib.suppress(RdmamigError):
        seen.append(session.exchange_recv())


@pytest.mark.parametrize("wrong", ["random proof", "another key", "the source's own role"])
def test_the_source_checks_the_destinations_proof(wrong: str) -> None:
    # A destination that cannot prove the key is refused by the source itself, which
    # then sends it nothing (no proof of its own, no block).
    key, other = PreSharedKey(b"k" * 32), PreSharedKey(b"o" * 32)

    def proof(theirs: bytes, ours: bytes) -> bytes:
        facts = (caps, theirs, ours)
        if wrong == "another key":
            return other.proof(Role.DESTINATION, *facts)
        if wrong == "the source's own role":
            return key.proof(Role.SOURCE, *facts)
        return os.urandom(wire.PROOF_BYTES)

    with connected_pair(TcpBackend(), requested=SOURCE_DEFAULTS | Capability.AUTH) as (
            src, dst):
        caps = dst.capabilities
        seen: list[wire.Message] = []
        thread = threading.Thread(target=_impostor, args=(dst, proof, seen))
        thread.start()
        source = Source(src, [RamBlock.anonymous("mem", 1 << 20)],
                        policy=PinUntilDone(PolicyOptions()),
                        config=SourceConfig(timeout=10), key=key)
        with pytest.raises(MigrationError, match="the destination could not prove the "
                                                 "pre-shared key"):
            source.run()
        thread.join(20)
    assert not any(isinstance(m, wire.AuthProof) for m in seen), seen


def _destination_checks(endpoint: Endpoint, key: PreSharedKey,
                        outcome: list[BaseException | None]) -> None:
    session = ControlSession(endpoint, role=Role.DESTINATION,
                             capabilities=endpoint.capabilities, timeout=10)
    try:
        authenticate_destination(session, key)
        outcome.append(None)
    except RdmamigError as exc:
        outcome.append(exc)


def _hand_source(endpoint: Endpoint, nonce: bytes,
                 proof: Callable[[bytes], bytes]) -> bytes:
    """AUTH HELLO with ``nonce``, then AUTH PROOF ``proof(their nonce)``: what was sent."""
    session = ControlSession(endpoint, role=Role.SOURCE, capabilities=endpoint.capabilities,
                             timeout=10)
    challenge = session.exchange_send(wire.AuthHello(nonce=nonce),
                                      reply=wire.Command.AUTH_CHALLENGE)
    assert isinstance(challenge, wire.AuthChallenge)
    sent = proof(challenge.nonce)
    with contextlib.suppress(RdmamigError):
        session.exchange_send(wire.AuthProof(proof=sent))
    return sent


def test_a_recorded_proof_does_not_open_a_new_session() -> None:
    key = PreSharedKey(b"k" * 32)
    nonce = os.urandom(wire.NONCE_BYTES)
    recorded: list[bytes] = []
    for attempt in ("the real source", "a replay"):
        with connected_pair(TcpBackend(), requested=SOURCE_DEFAULTS | Capability.AUTH) as (
                src, dst):
            outcome: list[BaseException | None] = []
            thread = threading.Thread(target=_destination_checks, args=(dst, key, outcome))
            thread.start()
            caps = src.capabilities
            if attempt == "the real source":
                recorded.append(_hand_source(src, nonce, lambda theirs, caps=caps: key.proof(
                    Role.SOURCE, caps, nonce, theirs)))
            else:  # the same HELLO, and the proof that worked before
                _hand_source(src, nonce, lambda _theirs: recorded[0])
            thread.join(20)
        if attempt == "the real source":
            assert outcome == [None]
        else:
            assert isinstance(outcome[0], AuthenticationError), outcome
