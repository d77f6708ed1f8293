"""The exceptions rdmamig raises, in one place.

Following h11, misuse by our own caller (``LocalProtocolError``) is kept apart from
bad input from the peer (``RemoteProtocolError``); both are ``ProtocolError``.
Failures of the transport itself carry the errno, the way pyverbs'
``PyverbsRDMAError.error_code`` does.
"""

from __future__ import annotations

from typing import Self


class RdmamigError(Exception):
    """Base class of every error rdmamig raises on purpose."""


class ProtocolError(RdmamigError):
    """The migration protocol was violated (by us or by the peer)."""


class LocalProtocolError(ProtocolError):
    """Our own caller asked for something the protocol does not allow here."""


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes or a message that break the protocol."""


class StreamError(RemoteProtocolError):
    """Bytes of a stream that break it, at a known place: ``{what} at offset {at}:
    {reason}``.

    Attributes:
        what: the field or record at fault, with its value (``flags=0x40``).
        at: where it is, in bytes from the start of the stream.
        reason: what is wrong with it.
    """

    def __init__(self, what: str, *, at: int, reason: str) -> None:
        super().__init__(f"{what} at offset {at}: {reason}")
        self.what, self.at, self.reason = what, at, reason

    def shifted(self, by: int) -> Self:
        """The same error, of the same type, with its offsets ``by`` bytes later (a
        decoder that was given only the stream's tail)."""
        moved = type(self).__new__(type(self))
        moved.__dict__.update(self.__dict__)
        moved.at = self.at + by
        moved.args = (f"{moved.what} at offset {moved.at}: {moved.reason}",)
        return moved


class TruncatedError(StreamError):
    """The bytes end inside a record: more may complete it (a stream read in parts),
    or the stream was cut short.

    Attributes:
        offset: where the incomplete record starts (a decoder resumes there).
    """

    def __init__(self, what: str, *, at: int, reason: str, offset: int) -> None:
        super().__init__(what, at=at, reason=reason)
        self.offset = offset

    def shifted(self, by: int) -> Self:
        moved = super().shifted(by)
        moved.offset = self.offset + by
        return moved


class PeerAbortedError(ProtocolError):
    """The peer sent ERROR: it hit a fatal error and the migration is aborted."""


class TransportError(RdmamigError):
    """The transport failed: connection refused or lost, remote access error, ...

    Attributes:
        errno: the operating-system or verbs error number, when there is one.
    """

    def __init__(self, message: str, *, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class RegistrationError(RdmamigError):
    """Memory could not be registered (pinned)."""


class MemlockLimitError(RegistrationError):
    """Pinning would exceed ``RLIMIT_MEMLOCK``; the message says how to raise it.

    Attributes:
        requested: bytes asked for by the refused registration.
        limit: the soft ``RLIMIT_MEMLOCK`` in bytes.
        locked: bytes this process had locked when it was refused.
    """

    def __init__(self, message: str, *, requested: int, limit: int, locked: int) -> None:
        super().__init__(message)
        self.requested = requested
        self.limit = limit
        self.locked = locked


class ConfigurationError(RdmamigError):
    """A backend or policy was given options it cannot take (a missing or too small
    pin cap, a hint naming no block, an option the backend does not know)."""


class UnreachableError(RdmamigError):
    """The peer could not be reached (refused, unresolvable, timed out)."""


class ImageError(RdmamigError):
    """A migration image is damaged: its manifest or files do not match what it says."""


class UnknownNameError(RdmamigError, LookupError):
    """A backend or policy was asked for by a name no plugin registered."""


class BackendUnavailableError(RdmamigError):
    """A backend exists but cannot run on this machine (the reason says why)."""


class MigrationError(RdmamigError):
    """The migration failed; the source's memory is intact and it keeps running."""


class VerificationError(MigrationError):
    """After transfer, a block's hash on the destination differs from the source's."""


class MigrationCancelledError(MigrationError):
    """The migration was cancelled (``migrate_cancel``); it ends as a failed one does."""


class AuthenticationError(MigrationError):
    """The peer could not prove the pre-shared key, or would not try."""


class RefusedError(MigrationError):
    """The destination refused what the source asked of it (a layout over its
    limits, more pinned memory than it allows); the reason says which limit."""
