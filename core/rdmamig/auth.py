"""Pre-shared-key authentication of both ends (Capability.AUTH).

A destination with a key refuses, at the connection handshake, any source that does
not ask for AUTH; a source with a key refuses a destination that does not grant it.
With AUTH granted, the first messages of the connection prove the key both ways,
before the stream starts (so before any block is created or any memory is
registered for the peer)::

    source                                    destination
                        <- READY
    AUTH HELLO (Ns)     ->
                        <- AUTH CHALLENGE (Nd, HMAC(K, "destination" | caps | Ns | Nd))
                        <- READY
    AUTH PROOF          ->   (HMAC(K, "source" | caps | Ns | Nd))

Both nonces are fresh (32 random bytes each), so no proof can be replayed; the role
in each proof keeps a peer from reflecting one side's proof back as the other's;
the negotiated capabilities are in both, so a capability changed on the way (VERIFY
or COMMIT stripped, say) fails the proof. The key never travels. A QEMU peer cannot
take part: QEMU's RDMA migration has no authentication.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from . import wire
from .caps import Capability
from .control import Role
from .errors import AuthenticationError, ConfigurationError
from .session import ControlSession

#: The environment variable that holds a key when no ``--psk-file`` is given.
ENVIRONMENT: Final = "RDMAMIG_PSK"
#: Shortest key taken (16 bytes: 128 bits if random, as ``openssl rand -hex 16``).
MIN_KEY_BYTES: Final = 16
#: Longest key file read.
MAX_KEY_BYTES: Final = 4096
_LABEL: Final = b"rdmamig-auth-1\0"


class PreSharedKey:
    """A secret both ends hold. Its ``repr`` does not show it."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < MIN_KEY_BYTES:
            raise ConfigurationError(f"the pre-shared key is {len(secret)} bytes; it must be "
                                     f"at least {MIN_KEY_BYTES} (openssl rand -hex 32 makes one)")
        self._secret = secret

    def __repr__(self) -> str:
        return "PreSharedKey(<hidden>)"

    def proof(self, role: Role, capabilities: Capability, source_nonce: bytes,
              destination_nonce: bytes) -> bytes:
        """What ``role`` sends to prove the key in the connection of these
        negotiated capabilities and nonces."""
        message = (_LABEL + role.value.encode() + b"\0" + struct.pack("!I", int(capabilities))
                   + source_nonce + destination_nonce)
        return hmac.new(self._secret, message, hashlib.sha256).digest()


def load_key(path: Path | None,
             environ: Mapping[str, str] | None = None) -> PreSharedKey | None:
    """The key of ``--psk-file PATH``, else of ``$RDMAMIG_PSK`` (in ``environ``, by
    default the process's environment), else None. Surrounding whitespace (a
    trailing newline) is not part of it. (The default is not ``os.environ`` itself:
    ``help()`` would print the whole environment, the key included.)

    Raises:
        ConfigurationError: the file cannot be read, is a link, is readable by
            others than its owner (as OpenSSH refuses such keys), or the key is short.
    """
    if path is None:
        value = (os.environ if environ is None else environ).get(ENVIRONMENT)
        return PreSharedKey(value.strip().encode()) if value else None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigurationError(f"cannot read the key file {path}: {exc.strerror}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):  # checked first: a directory opens, and fdopen refuses it
        os.close(fd)
        raise ConfigurationError(f"the key file {path} is not a regular file")
    with os.fdopen(fd, "rb") as file:
        if mode & 0o077:
            raise ConfigurationError(f"the key file {path} is readable by others "
                                     f"(mode {stat.S_IMODE(mode):o}); chmod 600 it")
        secret = file.read(MAX_KEY_BYTES + 1)
    if len(secret) > MAX_KEY_BYTES:
        raise ConfigurationError(f"the key file {path} is over {MAX_KEY_BYTES} bytes")
    return PreSharedKey(secret.strip())


def authenticate_source(session: ControlSession, key: PreSharedKey) -> None:
    """Prove ``key`` to the destination and check its proof, first thing after the
    connection.

    Raises:
        AuthenticationError: the destination's proof is wrong (another key).
        RemoteProtocolError, PeerAbortedError, TransportError: as the session's.
    """
    ours = secrets.token_bytes(wire.NONCE_BYTES)
    reply = session.exchange_send(wire.AuthHello(nonce=ours), reply=wire.Command.AUTH_CHALLENGE)
    assert isinstance(reply, wire.AuthChallenge)
    facts = (session.capabilities, ours, reply.nonce)
    if not hmac.compare_digest(reply.proof, key.proof(Role.DESTINATION, *facts)):
        raise AuthenticationError("the destination could not prove the pre-shared key "
                                  "(the two ends hold different keys)")
    session.exchange_send(wire.AuthProof(proof=key.proof(Role.SOURCE, *facts)))


def authenticate_destination(session: ControlSession, key: PreSharedKey) -> None:
    """Check the source's proof of ``key`` and prove it too, before anything else.

    Raises:
        AuthenticationError: the source's proof is wrong.
        RemoteProtocolError: the source sent anything but the AUTH messages.
        PeerAbortedError, TransportError: as the session's.
    """
    hello = session.exchange_recv({wire.Command.AUTH_HELLO})
    assert isinstance(hello, wire.AuthHello)
    ours = secrets.token_bytes(wire.NONCE_BYTES)
    facts = (session.capabilities, hello.nonce, ours)
    session.send(wire.AuthChallenge(nonce=ours, proof=key.proof(Role.DESTINATION, *facts)))
    answer = session.exchange_recv({wire.Command.AUTH_PROOF})
    assert isinstance(answer, wire.AuthProof)
    if not hmac.compare_digest(answer.proof, key.proof(Role.SOURCE, *facts)):
        raise AuthenticationError("the source could not prove the pre-shared key")
