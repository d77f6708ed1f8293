"""Sans-IO codec for the control messages of PROTOCOL.md.

One control message is one SEND: a 16-byte header and a data portion. Every message
is a frozen, keyword-only ``attrs`` class named after the command. ``encode`` turns a
message into bytes; ``decode_untrusted`` parses bytes that came from a peer and raises
nothing but :class:`~rdmamig.errors.RemoteProtocolError`, naming the field, its value
and its byte offset. Lengths and repeat counts are checked against their maxima
before anything is allocated.

Padding is written as zero and ignored on receipt. ``repeat`` is ignored on receipt
where it carries no count and written as 1: real QEMU senders differ there.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Final, TypeAlias

import attrs

from .caps import Capability
from .errors import LocalProtocolError, RemoteProtocolError

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
}

#: Data portions of a fixed size: (command, bytes).
_FIXED_SIZE: Final = {
    Command.VERIFY_RESULT: VERIFY_RESULT.size,
    Command.AUTH_HELLO: NONCE_BYTES,
    Command.AUTH_CHALLENGE: NONCE_BYTES + PROOF_BYTES,
    Command.AUTH_PROOF: PROOF_BYTES,
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
)

_EMPTY: Final[dict[Command, Message]] = {
    Command.ERROR: ErrorMessage(),
    Command.READY: Ready(),
    Command.RAM_BLOCKS_REQUEST: RamBlocksRequest(),
    Command.REGISTER_FINISHED: RegisterFinished(),
    Command.UNREGISTER_FINISHED: UnregisterFinished(),
    Command.COMMIT: Commit(),
}

# ---------------------------------------------------------------- encoding


def _pack_entries(layout: struct.Struct, rows: Sequence[tuple[Any, ...]]) -> bytes:
    return b"".join(layout.pack(*row) for row in rows)


def _data_of(message: Message) -> tuple[bytes, int]:
    """The data portion of ``message`` and the header's ``repeat``."""
    rows: list[tuple[Any, ...]]
    match message:
        case ErrorMessage(reason=reason):
            return reason.encode()[:MAX_REASON], 1
        case Ready() | RamBlocksRequest() | RegisterFinished() | UnregisterFinished() | Commit():
            return b"", 1
        case QemuFile(data=data):
            return bytes(data), 1
        case RamBlocksResult(blocks=blocks):
            rows = [(b.remote_host_addr, b.offset, b.length, b.remote_rkey, 0) for b in blocks]
            return _pack_entries(DEST_BLOCK, rows), 1
        case Compress(entries=entries):
            rows = [(e.value, e.block_idx, e.offset, e.length) for e in entries]
            return _pack_entries(COMPRESS, rows), len(entries)
        case RegisterRequest(entries=entries) | UnregisterRequest(entries=entries):
            rows = [(e.key, e.current_index, 0, e.chunks) for e in entries]
            return _pack_entries(REGISTER, rows), len(entries)
        case RegisterResult(entries=entries):
            rows = [(e.rkey, 0, e.host_addr) for e in entries]
            return _pack_entries(REGISTER_RESULT, rows), len(entries)
        case BlockHashes(entries=entries):
            rows = [(e.block_idx, 0, e.digest) for e in entries]
            return _pack_entries(BLOCK_HASH, rows), len(entries)
        case VerifyResult(matched=matched, mismatched=mismatched):
            return VERIFY_RESULT.pack(matched, mismatched), 1
        case Pages(entries=entries):
            rows = [(e.block_idx, 0, e.offset, e.data) for e in entries]
            return _pack_entries(PAGE, rows), len(entries)
        case AuthHello(nonce=nonce):
            return nonce, 1
        case AuthChallenge(nonce=nonce, proof=proof):
            return nonce + proof, 1
        case AuthProof(proof=proof):
            return proof, 1
        case CommitResult(committed=committed, reason=reason):
            return COMMIT_RESULT.pack(int(committed), 0) + reason.encode()[:MAX_REASON], 1
    raise LocalProtocolError(f"not a control message: {message!r}")


def encode(message: Message) -> bytes:
    """Serialize one whole control message (header + data portion).

    Raises:
        LocalProtocolError: a field does not fit its type, the message is over
            512 KiB, or an array message has no entry or more than 4096.
    """
    try:
        data, repeat = _data_of(message)
    except struct.error as exc:
        raise LocalProtocolError(f"cannot encode {message!r}: {exc}") from None
    command = message.TYPE
    if command in _ARRAY_ENTRY and not 1 <= repeat <= MAX_REPEAT:
        raise LocalProtocolError(
            f"{command.label} must carry 1 to {MAX_REPEAT} entries, not {repeat}"
        )
    if len(data) > MAX_DATA:
        raise LocalProtocolError(
            f"{command.label} data portion is {len(data)} bytes, over the {MAX_DATA} maximum"
        )
    return HEADER.pack(len(data), command, repeat, 0) + data


# ---------------------------------------------------------------- decoding


def _fail(field: str, value: object, offset: int, why: str) -> RemoteProtocolError:
    return RemoteProtocolError(f"{field}={value} at offset {offset}: {why}")


def _entries(
    data: memoryview, layout: struct.Struct, base: int
) -> list[tuple[int, tuple[Any, ...]]]:
    """(offset of entry, fields) for each entry of an array data portion."""
    size = layout.size
    return [(base + i * size, row) for i, row in enumerate(layout.iter_unpack(data))]


def _decode_dest_blocks(data: memoryview, repeat: int) -> RamBlocksResult:
    blocks = []
    for at, (addr, offset, length, rkey, _pad) in _entries(data, DEST_BLOCK, 16):
        if addr + length > 2**64:
            raise _fail("remote_host_addr", hex(addr), at, f"block of {length} bytes wraps")
        blocks.append(DestBlock(remote_host_addr=addr, offset=offset, length=length,
                                remote_rkey=rkey))
    return RamBlocksResult(blocks=tuple(blocks))


def _decode_compress(data: memoryview, repeat: int) -> Compress:
    entries = []
    for at, (value, block_idx, offset, length) in _entries(data, COMPRESS, 16):
        if value > 0xFF:
            raise _fail("value", value, at, "COMPRESS value must be a byte value (0-255)")
        if offset + length > 2**64:
            raise _fail("length", length, at + 16, f"range at offset {offset} wraps")
        entries.append(CompressRange(value=value, block_idx=block_idx, offset=offset,
                                     length=length))
    return Compress(entries=tuple(entries))


def _registers(data: memoryview) -> tuple[Register, ...]:
    entries = []
    for _at, (key, index, _pad, chunks) in _entries(data, REGISTER, 16):
        entries.append(Register(key=key, current_index=index, chunks=chunks))
    return tuple(entries)


def _decode_register_request(data: memoryview, repeat: int) -> RegisterRequest:
    return RegisterRequest(entries=_registers(data))


def _decode_unregister_request(data: memoryview, repeat: int) -> UnregisterRequest:
    return UnregisterRequest(entries=_registers(data))


def _decode_register_result(data: memoryview, repeat: int) -> RegisterResult:
    entries = []
    for _at, (rkey, _pad, host_addr) in _entries(data, REGISTER_RESULT, 16):
        entries.append(RegisterKey(rkey=rkey, host_addr=host_addr))
    return RegisterResult(entries=tuple(entries))


def _decode_block_hashes(data: memoryview, repeat: int) -> BlockHashes:
    entries = []
    for _at, (block_idx, _pad, digest) in _entries(data, BLOCK_HASH, 16):
        entries.append(BlockHash(block_idx=block_idx, digest=digest))
    return BlockHashes(entries=tuple(entries))


def _decode_verify_result(data: memoryview, repeat: int) -> VerifyResult:
    matched, mismatched = VERIFY_RESULT.unpack(data)
    return VerifyResult(matched=matched, mismatched=mismatched)


def _decode_pages(data: memoryview, repeat: int) -> Pages:
    entries = []
    for at, (block_idx, _pad, offset, page) in _entries(data, PAGE, 16):
        if offset + PAGE_BYTES > 2**64:
            raise _fail("offset", offset, at + 8, "page wraps the address space")
        entries.append(InlinePage(block_idx=block_idx, offset=offset, data=page))
    return Pages(entries=tuple(entries))


def _decode_auth_hello(data: memoryview, repeat: int) -> AuthHello:
    return AuthHello(nonce=bytes(data))


def _decode_auth_challenge(data: memoryview, repeat: int) -> AuthChallenge:
    return AuthChallenge(nonce=bytes(data[:NONCE_BYTES]), proof=bytes(data[NONCE_BYTES:]))


def _decode_auth_proof(data: memoryview, repeat: int) -> AuthProof:
    return AuthProof(proof=bytes(data))


def _decode_commit_result(data: memoryview, repeat: int) -> CommitResult:
    committed, _pad = COMMIT_RESULT.unpack_from(data)
    if committed > 1:
        raise _fail("committed", committed, 16, "COMMIT RESULT committed must be 0 or 1")
    return CommitResult(committed=bool(committed),
                        reason=bytes(data[COMMIT_RESULT.size:]).decode("utf-8", "replace"))


def _decode_qemu_file(data: memoryview, repeat: int) -> QemuFile:
    return QemuFile(data=bytes(data))


_Decoder: TypeAlias = Callable[[memoryview, int], Message]

#: Array commands: entry layout; ``len`` must be ``repeat`` x entry size.
_ARRAY_ENTRY: Final[dict[Command, struct.Struct]] = {
    Command.COMPRESS: COMPRESS,
    Command.REGISTER_REQUEST: REGISTER,
    Command.REGISTER_RESULT: REGISTER_RESULT,
    Command.UNREGISTER_REQUEST: REGISTER,
    Command.BLOCK_HASHES: BLOCK_HASH,
    Command.PAGES: PAGE,
}

_DECODERS: Final[dict[Command, _Decoder]] = {
    Command.QEMU_FILE: _decode_qemu_file,
    Command.RAM_BLOCKS_RESULT: _decode_dest_blocks,
    Command.COMPRESS: _decode_compress,
    Command.REGISTER_REQUEST: _decode_register_request,
    Command.REGISTER_RESULT: _decode_register_result,
    Command.UNREGISTER_REQUEST: _decode_unregister_request,
    Command.BLOCK_HASHES: _decode_block_hashes,
    Command.VERIFY_RESULT: _decode_verify_result,
    Command.PAGES: _decode_pages,
    Command.AUTH_HELLO: _decode_auth_hello,
    Command.AUTH_CHALLENGE: _decode_auth_challenge,
    Command.AUTH_PROOF: _decode_auth_proof,
    Command.COMMIT_RESULT: _decode_commit_result,
}


def decode_header_untrusted(data: bytes | bytearray | memoryview) -> tuple[int, Command, int]:
    """Parse and check a message's header: ``(len, command, repeat)``.

    Checks that ``data`` is exactly one whole message. Extension commands are
    accepted here; :func:`decode_untrusted` decides whether they were negotiated.

    Raises:
        RemoteProtocolError: too short or too long, ``len`` not matching the bytes
            received, type 0 or unknown.
    """
    size = len(data)
    if size < HEADER.size:
        raise _fail("message length", size, 0, "shorter than the 16-byte header")
    if size > MAX_MESSAGE:
        raise _fail("message length", size, 0, f"over the {MAX_MESSAGE}-byte maximum")
    length, command, repeat, _padding = HEADER.unpack_from(data)
    if length != size - HEADER.size:
        raise _fail("len", length, 0, f"message carries {size - HEADER.size} data bytes")
    if command == Command.NONE:
        raise _fail("type", command, 4, "type 0 (none) is never valid on the wire")
    if command not in Command._value2member_map_:
        raise _fail("type", command, 4, "unknown command")
    return length, Command(command), repeat


def decode_untrusted(
    data: bytes | bytearray | memoryview, *, extensions: Capability = Capability(0)
) -> Message:
    """Parse one whole control message received from a peer.

    Args:
        data: exactly one message, header and data portion.
        extensions: negotiated capabilities; the rdmamig extension commands are
            unknown types unless their capability bit is in here.

    Raises:
        RemoteProtocolError: any malformed input, naming field, value and offset.
    """
    length, command, repeat = decode_header_untrusted(data)
    needed = EXTENSION_COMMANDS.get(command)
    if needed is not None and not extensions & needed:
        raise _fail("type", int(command), 4, f"unknown command ({needed.name} not negotiated)")
    body = memoryview(data)[HEADER.size:]
    entry = _ARRAY_ENTRY.get(command)
    if entry is not None:
        if repeat > MAX_REPEAT:
            raise _fail("repeat", repeat, 8, f"{command.label} allows at most {MAX_REPEAT}")
        if repeat == 0:
            raise _fail("repeat", repeat, 8, f"{command.label} needs at least one entry")
        if length != repeat * entry.size:
            raise _fail("len", length, 0,
                        f"{command.label} with repeat={repeat} must be "
                        f"{repeat * entry.size} bytes ({entry.size} per entry)")
    elif command == Command.RAM_BLOCKS_RESULT:
        if length % DEST_BLOCK.size:
            raise _fail("len", length, 0, f"RAM BLOCKS RESULT must be a multiple of "
                        f"{DEST_BLOCK.size} bytes")
    elif command in _FIXED_SIZE:
        if length != _FIXED_SIZE[command]:
            raise _fail("len", length, 0, f"{command.label} is {_FIXED_SIZE[command]} bytes")
    elif command == Command.ERROR and length:
        if not extensions & Capability.REASONS or length > MAX_REASON:
            raise _fail("len", length, 0, f"ERROR carries no data, or with REASONS "
                        f"negotiated a reason of at most {MAX_REASON} bytes")
        return ErrorMessage(reason=bytes(body).decode("utf-8", "replace"))
    elif command == Command.COMMIT_RESULT:
        if not COMMIT_RESULT.size <= length <= COMMIT_RESULT.size + MAX_REASON:
            raise _fail("len", length, 0, f"COMMIT RESULT is {COMMIT_RESULT.size} to "
                        f"{COMMIT_RESULT.size + MAX_REASON} bytes")
    elif command != Command.QEMU_FILE and length:
        raise _fail("len", length, 0, f"{command.label} carries no data")
    if command in _EMPTY:
        return _EMPTY[command]
    return _DECODERS[command](body, repeat)
