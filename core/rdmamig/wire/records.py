"""The control messages of PROTOCOL.md as records: the header's commands, the
layouts of their data portions, and one frozen, keyword-only ``attrs`` class per
message, named after its command (:mod:`rdmamig.wire` says how they travel)."""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from typing import Any, ClassVar, Final, TypeAlias

import attrs

from ..caps import Capability
from ..errors import LocalProtocolError

#: Largest control message, header included.
MAX_MESSAGE: Final = 512 * 1024
#: Largest data portion.
MAX_DATA: Final = MAX_MESSAGE - 16
#: Most entries in one array message.
MAX_REPEAT: Final = 4096
#: QEMU sends the QEMU FILE stream in pieces of at most this size.
QEMU_FILE_PIECE: Final = 32 * 1024
#: Registration chunks are 1 MiB: ``chunk = (addr - block_start) >> CHUNK_SHIFT``.
CHUNK_SHIFT: Final = 20
CHUNK_SIZE: Final = 1 << CHUNK_SHIFT

# len (u32), type (u32), repeat (u32), padding (u32)
HEADER = struct.Struct("!IIII")
# remote_host_addr (u64), offset (u64), length (u64), remote_rkey (u32), padding (u32)
DEST_BLOCK = struct.Struct("!QQQII")
# key (u64), current_index (u32), padding (u32), chunks (u64)
REGISTER = struct.Struct("!QIIQ")
# rkey (u32), padding (u32), host_addr (u64)
REGISTER_RESULT = struct.Struct("!IIQ")
# value (u32), block_idx (u32), offset (u64), length (u64)
COMPRESS = struct.Struct("!IIQQ")
# rdmamig extension: block_idx (u32), padding (u32), xxh3-128 digest (16 bytes)
BLOCK_HASH = struct.Struct("!II16s")
#: CHUNK HASHES entry: block_idx, chunk, xxh3-128 digest.
CHUNK_HASH = struct.Struct("!II16s")
# rdmamig extension: matched blocks (u32), mismatched blocks (u32)
VERIFY_RESULT = struct.Struct("!II")
#: Bytes of one page carried by PAGES.
PAGE_BYTES: Final = 4096
# rdmamig extension: block_idx (u32), padding (u32), offset (u64), the page's bytes
PAGE = struct.Struct(f"!IIQ{PAGE_BYTES}s")
#: Bytes of an AUTH nonce and of an AUTH proof (HMAC-SHA256).
NONCE_BYTES: Final = 32
PROOF_BYTES: Final = 32
# rdmamig extension: committed (u32, 0 or 1), padding (u32), then the reason (UTF-8)
COMMIT_RESULT = struct.Struct("!II")
#: Longest reason a COMMIT RESULT carries.
MAX_REASON: Final = 1024
#: Most pages one PAGES message holds (it must fit in 512 KiB).
MAX_PAGES: Final = MAX_DATA // PAGE.size


class Command(enum.IntEnum):
    """Values of the header's ``type`` field."""

    NONE = 0
    ERROR = 1
    READY = 2
    QEMU_FILE = 3
    RAM_BLOCKS_REQUEST = 4
    RAM_BLOCKS_RESULT = 5
    COMPRESS = 6
    REGISTER_REQUEST = 7
    REGISTER_RESULT = 8
    REGISTER_FINISHED = 9
    UNREGISTER_REQUEST = 10
    UNREGISTER_FINISHED = 11
    # rdmamig extensions, valid only when their capability was negotiated.
    BLOCK_HASHES = 12
    VERIFY_RESULT = 13
    PAGES = 14
    AUTH_HELLO = 15
    AUTH_CHALLENGE = 16
    AUTH_PROOF = 17
    COMMIT = 18
    COMMIT_RESULT = 19
    CHUNK_HASHES = 20

    @property
    def label(self) -> str:
        """The command's name as PROTOCOL.md writes it (``REGISTER REQUEST``)."""
        return self.name.replace("_", " ")


#: Commands that exist only when a capability bit of ours was negotiated.
EXTENSION_COMMANDS: Final = {
    Command.BLOCK_HASHES: Capability.VERIFY,
    Command.VERIFY_RESULT: Capability.VERIFY,
    Command.PAGES: Capability.INLINE,
    Command.AUTH_HELLO: Capability.AUTH,
    Command.AUTH_CHALLENGE: Capability.AUTH,
    Command.AUTH_PROOF: Capability.AUTH,
    Command.COMMIT: Capability.COMMIT,
    Command.COMMIT_RESULT: Capability.COMMIT,
    Command.CHUNK_HASHES: Capability.CHUNK_HASHES,
}

# ---------------------------------------------------------------- array entries


@attrs.frozen(kw_only=True)
class DestBlock:
    """One RAM block of the destination, in RAM BLOCKS RESULT."""

    remote_host_addr: int
    offset: int
    length: int
    remote_rkey: int = 0


@attrs.frozen(kw_only=True)
class Register:
    """One entry of REGISTER REQUEST (``key`` = offset in the destination RAM space)
    or UNREGISTER REQUEST (``key`` = the first chunk of the registration to drop).

    ``chunks`` is QEMU's field as it travels: how many chunks *after* the first a
    registration covers (QEMU's destination pins ``first .. first + chunks``
    inclusive, so a single chunk is 0). Build entries with :meth:`covering` and
    read them with :attr:`count`, which say the number of chunks itself.
    """

    key: int
    current_index: int
    chunks: int

    @classmethod
    def covering(cls, *, key: int, current_index: int, count: int) -> Register:
        """The entry for ``count`` (at least 1) chunks from the one ``key`` names."""
        if count < 1:
            raise LocalProtocolError(f"a registration covers at least one chunk, not {count}")
        return cls(key=key, current_index=current_index, chunks=count - 1)

    @property
    def count(self) -> int:
        """How many chunks this entry covers, the first included (``chunks + 1``)."""
        return self.chunks + 1


@attrs.frozen(kw_only=True)
class RegisterKey:
    """One entry of REGISTER RESULT (the spec's *RegisterResult* structure)."""

    rkey: int
    host_addr: int


@attrs.frozen(kw_only=True)
class CompressRange:
    """One entry of COMPRESS: ``length`` bytes at ``offset`` all hold ``value``."""

    value: int
    block_idx: int
    offset: int
    length: int


@attrs.frozen(kw_only=True)
class BlockHash:
    """rdmamig extension: the xxh3-128 digest of one whole RAM block."""

    block_idx: int
    digest: bytes = attrs.field(validator=attrs.validators.instance_of(bytes))


@attrs.frozen(kw_only=True)
class ChunkHash:
    """rdmamig extension: the xxh3-128 digest of chunk ``chunk`` of a RAM block,
    as the source holds it for good."""

    block_idx: int
    chunk: int
    digest: bytes = attrs.field(validator=attrs.validators.instance_of(bytes))


@attrs.frozen(kw_only=True)
class InlinePage:
    """rdmamig extension: one page's bytes for ``offset`` (in the destination RAM
    space, as COMPRESS's) of block ``block_idx``."""

    block_idx: int
    offset: int
    data: bytes = attrs.field(validator=attrs.validators.and_(
        attrs.validators.instance_of(bytes), attrs.validators.min_len(PAGE_BYTES),
        attrs.validators.max_len(PAGE_BYTES)))


# ---------------------------------------------------------------- messages


@attrs.frozen(kw_only=True)
class ErrorMessage:
    """ERROR: the sender hit a fatal error; the migration aborts. With
    Capability.REASONS its data portion is the reason (UTF-8); else it has none."""

    TYPE: ClassVar[Command] = Command.ERROR
    reason: str = ""


@attrs.frozen(kw_only=True)
class Ready:
    """READY: "I have a receive posted, you may SEND one message"."""

    TYPE: ClassVar[Command] = Command.READY


@attrs.frozen(kw_only=True)
class QemuFile:
    """QEMU FILE: a piece of the opaque non-RAM state stream."""

    TYPE: ClassVar[Command] = Command.QEMU_FILE
    data: bytes


@attrs.frozen(kw_only=True)
class RamBlocksRequest:
    """RAM BLOCKS REQUEST: the source asks for the destination's block list."""

    TYPE: ClassVar[Command] = Command.RAM_BLOCKS_REQUEST


@attrs.frozen(kw_only=True)
class RamBlocksResult:
    """RAM BLOCKS RESULT: one DestBlock per RAM block (count = len / 32)."""

    TYPE: ClassVar[Command] = Command.RAM_BLOCKS_RESULT
    blocks: tuple[DestBlock, ...]


@attrs.frozen(kw_only=True)
class Compress:
    """COMPRESS: ranges that hold one byte value (zero pages) instead of a write."""

    TYPE: ClassVar[Command] = Command.COMPRESS
    entries: tuple[CompressRange, ...]


@attrs.frozen(kw_only=True)
class RegisterRequest:
    """REGISTER REQUEST: pin these chunks and return their keys."""

    TYPE: ClassVar[Command] = Command.REGISTER_REQUEST
    entries: tuple[Register, ...]


@attrs.frozen(kw_only=True)
class RegisterResult:
    """REGISTER RESULT: one key per requested entry, in order."""

    TYPE: ClassVar[Command] = Command.REGISTER_RESULT
    entries: tuple[RegisterKey, ...]


@attrs.frozen(kw_only=True)
class RegisterFinished:
    """REGISTER FINISHED: this iteration's registrations are done."""

    TYPE: ClassVar[Command] = Command.REGISTER_FINISHED


@attrs.frozen(kw_only=True)
class UnregisterRequest:
    """UNREGISTER REQUEST: unpin these chunks (``Register.key`` = chunk index)."""

    TYPE: ClassVar[Command] = Command.UNREGISTER_REQUEST
    entries: tuple[Register, ...]


@attrs.frozen(kw_only=True)
class UnregisterFinished:
    """UNREGISTER FINISHED: the unpin completed."""

    TYPE: ClassVar[Command] = Command.UNREGISTER_FINISHED


@attrs.frozen(kw_only=True)
class BlockHashes:
    """rdmamig extension (Capability.VERIFY): the source's hash of every block."""

    TYPE: ClassVar[Command] = Command.BLOCK_HASHES
    entries: tuple[BlockHash, ...]


@attrs.frozen(kw_only=True)
class ChunkHashes:
    """rdmamig extension (Capability.CHUNK_HASHES): chunks whose data is final and
    sent (their writes posted before this message), with the source's digests."""

    TYPE: ClassVar[Command] = Command.CHUNK_HASHES
    entries: tuple[ChunkHash, ...]


@attrs.frozen(kw_only=True)
class Pages:
    """rdmamig extension (Capability.INLINE): pages of chunks that are not
    registered, carried in the message instead of written (at most
    :data:`MAX_PAGES` per message)."""

    TYPE: ClassVar[Command] = Command.PAGES
    entries: tuple[InlinePage, ...]


@attrs.frozen(kw_only=True)
class VerifyResult:
    """rdmamig extension (Capability.VERIFY): the destination's comparison."""

    TYPE: ClassVar[Command] = Command.VERIFY_RESULT
    matched: int
    mismatched: int


def _sized(size: int) -> Callable[[Any, Any, bytes], None]:
    def check(_instance: Any, attribute: Any, value: bytes) -> None:
        if not isinstance(value, bytes) or len(value) != size:
            raise ValueError(f"{attribute.name} must be {size} bytes")
    return check


@attrs.frozen(kw_only=True)
class AuthHello:
    """rdmamig extension (Capability.AUTH): the source's fresh nonce, first thing
    after the connection; a request answered by AUTH CHALLENGE."""

    TYPE: ClassVar[Command] = Command.AUTH_HELLO
    nonce: bytes = attrs.field(validator=_sized(NONCE_BYTES))


@attrs.frozen(kw_only=True)
class AuthChallenge:
    """rdmamig extension (Capability.AUTH): the destination's fresh nonce and its
    proof of the key (:mod:`rdmamig.auth`)."""

    TYPE: ClassVar[Command] = Command.AUTH_CHALLENGE
    nonce: bytes = attrs.field(validator=_sized(NONCE_BYTES))
    proof: bytes = attrs.field(validator=_sized(PROOF_BYTES))


@attrs.frozen(kw_only=True)
class AuthProof:
    """rdmamig extension (Capability.AUTH): the source's proof of the key."""

    TYPE: ClassVar[Command] = Command.AUTH_PROOF
    proof: bytes = attrs.field(validator=_sized(PROOF_BYTES))


@attrs.frozen(kw_only=True)
class Commit:
    """rdmamig extension (Capability.COMMIT): the source is done; the destination
    is to keep the migration (an image renamed into place) and say so."""

    TYPE: ClassVar[Command] = Command.COMMIT


@attrs.frozen(kw_only=True)
class CommitResult:
    """rdmamig extension (Capability.COMMIT): whether the destination kept the
    migration, and why not."""

    TYPE: ClassVar[Command] = Command.COMMIT_RESULT
    committed: bool
    reason: str = ""


Message: TypeAlias = (
    ErrorMessage
    | Ready
    | QemuFile
    | RamBlocksRequest
    | RamBlocksResult
    | Compress
    | RegisterRequest
    | RegisterResult
    | RegisterFinished
    | UnregisterRequest
    | UnregisterFinished
    | BlockHashes
    | VerifyResult
    | Pages
    | AuthHello
    | AuthChallenge
    | AuthProof
    | Commit
    | CommitResult
    | ChunkHashes
)
