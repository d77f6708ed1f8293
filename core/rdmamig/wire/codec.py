"""How each control message travels: one row per command (its data portion's size
rule, its encoder and its decoder), :func:`encode` and :func:`decode_untrusted`."""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from typing import Any, Final, TypeAlias

import attrs

from ..caps import Capability
from ..errors import LocalProtocolError, RemoteProtocolError
from .records import (
    BLOCK_HASH,
    CHUNK_HASH,
    COMMIT_RESULT,
    COMPRESS,
    DEST_BLOCK,
    EXTENSION_COMMANDS,
    HEADER,
    MAX_DATA,
    MAX_MESSAGE,
    MAX_REASON,
    MAX_REPEAT,
    NONCE_BYTES,
    PAGE,
    PAGE_BYTES,
    PROOF_BYTES,
    REGISTER,
    REGISTER_RESULT,
    VERIFY_RESULT,
    AuthChallenge,
    AuthHello,
    AuthProof,
    BlockHash,
    BlockHashes,
    ChunkHash,
    ChunkHashes,
    Command,
    Commit,
    CommitResult,
    Compress,
    CompressRange,
    DestBlock,
    ErrorMessage,
    InlinePage,
    Message,
    Pages,
    QemuFile,
    RamBlocksRequest,
    RamBlocksResult,
    Ready,
    Register,
    RegisterFinished,
    RegisterKey,
    RegisterRequest,
    RegisterResult,
    UnregisterFinished,
    UnregisterRequest,
    VerifyResult,
)

# ---------------------------------------------------------------- the codec, a row per command


def _fail(field: str, value: object, offset: int, why: str) -> RemoteProtocolError:
    return RemoteProtocolError(f"{field}={value} at offset {offset}: {why}")


#: Checks a data portion's ``len`` (and ``repeat``) against what its command allows,
#: with the negotiated extensions; raises RemoteProtocolError.
_SizeCheck: TypeAlias = Callable[[Command, int, int, Capability], None]


def _array(entry: struct.Struct) -> _SizeCheck:
    """An array message: 1 to MAX_REPEAT entries of ``entry``, ``len`` = their bytes."""
    def check(command: Command, length: int, repeat: int, _ext: Capability) -> None:
        if repeat > MAX_REPEAT:
            raise _fail("repeat", repeat, 8, f"{command.label} allows at most {MAX_REPEAT}")
        if repeat == 0:
            raise _fail("repeat", repeat, 8, f"{command.label} needs at least one entry")
        if length != repeat * entry.size:
            raise _fail("len", length, 0, f"{command.label} with repeat={repeat} must be "
                                          f"{repeat * entry.size} bytes ({entry.size} per "
                                          f"entry)")
    return check


def _multiple(entry: struct.Struct) -> _SizeCheck:
    """Entries counted by ``len`` alone (RAM BLOCKS RESULT: QEMU sends repeat 1)."""
    def check(command: Command, length: int, _repeat: int, _ext: Capability) -> None:
        if length % entry.size:
            raise _fail("len", length, 0, f"{command.label} must be a multiple of "
                                          f"{entry.size} bytes")
    return check


def _fixed(size: int) -> _SizeCheck:
    def check(command: Command, length: int, _repeat: int, _ext: Capability) -> None:
        if length != size:
            raise _fail("len", length, 0, f"{command.label} is {size} bytes" if size
                        else f"{command.label} carries no data")
    return check


def _between(low: int, high: int) -> _SizeCheck:
    def check(command: Command, length: int, _repeat: int, _ext: Capability) -> None:
        if not low <= length <= high:
            raise _fail("len", length, 0, f"{command.label} is {low} to {high} bytes")
    return check


def _reason_size(command: Command, length: int, _repeat: int, ext: Capability) -> None:
    if length and (not ext & Capability.REASONS or length > MAX_REASON):
        raise _fail("len", length, 0, f"ERROR carries no data, or with REASONS "
                                      f"negotiated a reason of at most {MAX_REASON} bytes")


def _rows(layout: struct.Struct, rows: Sequence[tuple[Any, ...]]) -> bytes:
    return b"".join(layout.pack(*row) for row in rows)


def _entries(data: memoryview, layout: struct.Struct) -> list[tuple[int, tuple[Any, ...]]]:
    """(offset in the message, fields) of each entry of an array data portion."""
    size = layout.size
    return [(16 + i * size, row) for i, row in enumerate(layout.iter_unpack(data))]


def _dest_blocks(data: memoryview) -> RamBlocksResult:
    blocks = []
    for at, (addr, offset, length, rkey, _pad) in _entries(data, DEST_BLOCK):
        if addr + length > 2**64:
            raise _fail("remote_host_addr", hex(addr), at, f"block of {length} bytes wraps")
        blocks.append(DestBlock(remote_host_addr=addr, offset=offset, length=length,
                                remote_rkey=rkey))
    return RamBlocksResult(blocks=tuple(blocks))


def _compress(data: memoryview) -> Compress:
    entries = []
    for at, (value, block_idx, offset, length) in _entries(data, COMPRESS):
        if value > 0xFF:
            raise _fail("value", value, at, "COMPRESS value must be a byte value (0-255)")
        if offset + length > 2**64:
            raise _fail("length", length, at + 16, f"range at offset {offset} wraps")
        entries.append(CompressRange(value=value, block_idx=block_idx, offset=offset,
                                     length=length))
    return Compress(entries=tuple(entries))


def _registers(data: memoryview) -> tuple[Register, ...]:
    return tuple(Register(key=key, current_index=index, chunks=chunks)
                 for _at, (key, index, _pad, chunks) in _entries(data, REGISTER))


def _pages(data: memoryview) -> Pages:
    entries = []
    for at, (block_idx, _pad, offset, page) in _entries(data, PAGE):
        if offset + PAGE_BYTES > 2**64:
            raise _fail("offset", offset, at + 8, "page wraps the address space")
        entries.append(InlinePage(block_idx=block_idx, offset=offset, data=page))
    return Pages(entries=tuple(entries))


def _commit_result(data: memoryview) -> CommitResult:
    committed, _pad = COMMIT_RESULT.unpack_from(data)
    if committed > 1:
        raise _fail("committed", committed, 16, "COMMIT RESULT committed must be 0 or 1")
    return CommitResult(committed=bool(committed),
                        reason=bytes(data[COMMIT_RESULT.size:]).decode("utf-8", "replace"))


@attrs.frozen
class _Row:
    """How one command travels: what its data portion's size may be, how a message
    becomes its data portion and ``repeat``, and how a checked data portion
    becomes the message."""

    size: _SizeCheck
    encode: Callable[[Any], tuple[bytes, int]]
    decode: Callable[[memoryview], Message]
    #: ``repeat`` counts the entries (1 to MAX_REPEAT).
    counted: bool = False


def _registers_row(record: type[RegisterRequest] | type[UnregisterRequest]) -> _Row:
    """REGISTER REQUEST and UNREGISTER REQUEST: the same entries (:class:`Register`)."""
    return _Row(_array(REGISTER),
                lambda m: (_rows(REGISTER, [(e.key, e.current_index, 0, e.chunks)
                                            for e in m.entries]), len(m.entries)),
                lambda data: record(entries=_registers(data)), counted=True)


def _no_data(message: Message) -> _Row:
    return _Row(_fixed(0), lambda _m: (b"", 1), lambda _data: message)


_CODEC: Final[dict[Command, _Row]] = {
    Command.ERROR: _Row(
        _reason_size, lambda m: (m.reason.encode()[:MAX_REASON], 1),
        lambda data: ErrorMessage(reason=bytes(data).decode("utf-8", "replace"))),
    Command.READY: _no_data(Ready()),
    Command.QEMU_FILE: _Row(
        _between(0, MAX_DATA), lambda m: (bytes(m.data), 1),
        lambda data: QemuFile(data=bytes(data))),
    Command.RAM_BLOCKS_REQUEST: _no_data(RamBlocksRequest()),
    Command.RAM_BLOCKS_RESULT: _Row(
        _multiple(DEST_BLOCK),
        lambda m: (_rows(DEST_BLOCK, [(b.remote_host_addr, b.offset, b.length, b.remote_rkey,
                                       0) for b in m.blocks]), 1),
        _dest_blocks),
    Command.COMPRESS: _Row(
        _array(COMPRESS),
        lambda m: (_rows(COMPRESS, [(e.value, e.block_idx, e.offset, e.length)
                                    for e in m.entries]), len(m.entries)),
        _compress, counted=True),
    Command.REGISTER_REQUEST: _registers_row(RegisterRequest),
    Command.REGISTER_RESULT: _Row(
        _array(REGISTER_RESULT),
        lambda m: (_rows(REGISTER_RESULT, [(e.rkey, 0, e.host_addr) for e in m.entries]),
                   len(m.entries)),
        lambda data: RegisterResult(entries=tuple(
            RegisterKey(rkey=rkey, host_addr=addr)
            for _at, (rkey, _pad, addr) in _entries(data, REGISTER_RESULT))), counted=True),
    Command.REGISTER_FINISHED: _no_data(RegisterFinished()),
    Command.UNREGISTER_REQUEST: _registers_row(UnregisterRequest),
    Command.UNREGISTER_FINISHED: _no_data(UnregisterFinished()),
    Command.BLOCK_HASHES: _Row(
        _array(BLOCK_HASH),
        lambda m: (_rows(BLOCK_HASH, [(e.block_idx, 0, e.digest) for e in m.entries]),
                   len(m.entries)),
        lambda data: BlockHashes(entries=tuple(
            BlockHash(block_idx=index, digest=digest)
            for _at, (index, _pad, digest) in _entries(data, BLOCK_HASH))), counted=True),
    Command.CHUNK_HASHES: _Row(
        _array(CHUNK_HASH),
        lambda m: (_rows(CHUNK_HASH, [(e.block_idx, e.chunk, e.digest) for e in m.entries]),
                   len(m.entries)),
        lambda data: ChunkHashes(entries=tuple(
            ChunkHash(block_idx=index, chunk=chunk, digest=digest)
            for _at, (index, chunk, digest) in _entries(data, CHUNK_HASH))), counted=True),
    Command.VERIFY_RESULT: _Row(
        _fixed(VERIFY_RESULT.size), lambda m: (VERIFY_RESULT.pack(m.matched, m.mismatched), 1),
        lambda data: VerifyResult(matched=VERIFY_RESULT.unpack(data)[0],
                                  mismatched=VERIFY_RESULT.unpack(data)[1])),
    Command.PAGES: _Row(
        _array(PAGE),
        lambda m: (_rows(PAGE, [(e.block_idx, 0, e.offset, e.data) for e in m.entries]),
                   len(m.entries)),
        _pages, counted=True),
    Command.AUTH_HELLO: _Row(
        _fixed(NONCE_BYTES), lambda m: (m.nonce, 1), lambda data: AuthHello(nonce=bytes(data))),
    Command.AUTH_CHALLENGE: _Row(
        _fixed(NONCE_BYTES + PROOF_BYTES), lambda m: (m.nonce + m.proof, 1),
        lambda data: AuthChallenge(nonce=bytes(data[:NONCE_BYTES]),
                                   proof=bytes(data[NONCE_BYTES:]))),
    Command.AUTH_PROOF: _Row(
        _fixed(PROOF_BYTES), lambda m: (m.proof, 1), lambda data: AuthProof(proof=bytes(data))),
    Command.COMMIT: _no_data(Commit()),
    Command.COMMIT_RESULT: _Row(
        _between(COMMIT_RESULT.size, COMMIT_RESULT.size + MAX_REASON),
        lambda m: (COMMIT_RESULT.pack(int(m.committed), 0) + m.reason.encode()[:MAX_REASON], 1),
        _commit_result),
}


def encode(message: Message) -> bytes:
    """Serialize one whole control message (header + data portion).

    Raises:
        LocalProtocolError: a field does not fit its type, the message is over
            512 KiB, or an array message has no entry or more than 4096.
    """
    command = getattr(message, "TYPE", None)
    if command not in _CODEC:
        raise LocalProtocolError(f"not a control message: {message!r}")
    assert isinstance(command, Command)
    try:
        data, repeat = _CODEC[command].encode(message)
    except struct.error as exc:
        raise LocalProtocolError(f"cannot encode {message!r}: {exc}") from None
    if _CODEC[command].counted and not 1 <= repeat <= MAX_REPEAT:
        raise LocalProtocolError(
            f"{command.label} must carry 1 to {MAX_REPEAT} entries, not {repeat}"
        )
    if len(data) > MAX_DATA:
        raise LocalProtocolError(
            f"{command.label} data portion is {len(data)} bytes, over the {MAX_DATA} maximum"
        )
    return HEADER.pack(len(data), command, repeat, 0) + data


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
    row = _CODEC[command]
    row.size(command, length, repeat, extensions)
    return row.decode(memoryview(data)[HEADER.size:])
