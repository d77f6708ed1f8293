"""The records of QEMU's ``ram`` section (``migration/ram.c``), sans IO.

Every record starts with a big-endian u64: a page-aligned offset in its RAM block
with flags in the bits below the page size. Without ``CONTINUE`` the block's name
follows (u8 length, bytes); with it, the record is in the block of the record before.
``ZERO`` then carries one fill byte, ``PAGE`` the page's 4096 bytes; ``EOS`` ends
the section's records, ``HOOK`` marks where a destination over RDMA enters its
registration loop. The setup (the ``START`` section) is ``MEM_SIZE`` with the total
RAM in the offset bits, then each block's name and used length (and its address
in guest memory when ``x-ignore-shared`` is on).

Runs of ``PAGE | CONTINUE`` records (4104 bytes each) and of ``ZERO | CONTINUE``
records (9 bytes each) have a fixed layout: they are decoded and encoded as numpy
views over the buffer, a run at a time, never a Python loop per page.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Collection, Sequence
from typing import Final, Protocol

import attrs
import numpy as np
import numpy.typing as npt

from ..errors import StreamError, TruncatedError
from .fields import decode_name_untrusted, encode_name, need_bytes

#: The target page size of x86 (TARGET_PAGE_SIZE): the unit of every record.
PAGE_SIZE: Final = 4096
_FLAG_BITS: Final = PAGE_SIZE - 1
# offset | flags (u64)
RECORD_HEADER = struct.Struct("!Q")
# used length or address (u64)
U64 = struct.Struct("!Q")
#: A ``PAGE | CONTINUE`` record: header and page.
PAGE_RECORD: Final = RECORD_HEADER.size + PAGE_SIZE
#: The most RAM blocks a setup may list (a VM has a few dozen; a destination's own
#: limit is lower, rdmamig.limits): a bound before the list is kept.
MAX_SETUP_BLOCKS: Final = 1024
#: A ``ZERO | CONTINUE`` record: header and fill byte.
ZERO_RECORD: Final = RECORD_HEADER.size + 1
#: Records decoded per numpy step (a bound on the work of one look ahead).
RUN_STEP: Final = 2048


class RamFlag(enum.IntFlag):
    """The flags of a record (``RAM_SAVE_FLAG_*``)."""

    FULL = 0x01  # obsolete since QEMU 1.x
    ZERO = 0x02
    MEM_SIZE = 0x04
    PAGE = 0x08
    EOS = 0x10
    CONTINUE = 0x20
    XBZRLE = 0x40
    HOOK = 0x80
    COMPRESS_PAGE = 0x100
    MULTIFD_FLUSH = 0x200


#: Flags rdmamig refuses, with what they mean.
UNSUPPORTED: Final = {
    RamFlag.FULL: "an obsolete FULL record",
    RamFlag.XBZRLE: "an XBZRLE page (the xbzrle capability)",
    RamFlag.COMPRESS_PAGE: "a compressed page (the compress capability)",
    RamFlag.MULTIFD_FLUSH: "a multifd flush (the multifd capability)",
}

_PAGE_RUN: Final = int(RamFlag.PAGE | RamFlag.CONTINUE)
_ZERO_RUN: Final = int(RamFlag.ZERO | RamFlag.CONTINUE)


@attrs.frozen(kw_only=True)
class RamBlockInfo:
    """A RAM block as the setup lists it.

    Attributes:
        name: QEMU's idstr (``pc.ram``, ``mem``, ``/rom@etc/acpi/tables``).
        length: its used length in bytes, a whole number of pages.
        addr: its guest-physical address (only with ``x-ignore-shared``).
    """

    name: str
    length: int
    addr: int | None = None

    @property
    def pages(self) -> int:
        """Pages in the block."""
        return self.length // PAGE_SIZE


class RecordSink(Protocol):
    """Where decoded pages go, a run at a time."""

    def pages(self, block: int, numbers: npt.NDArray[np.uint64],
              data: npt.NDArray[np.uint8]) -> None:
        """Pages ``numbers`` of block ``block`` hold ``data`` (one row per page)."""

    def zero(self, block: int, numbers: npt.NDArray[np.uint64],
             fills: npt.NDArray[np.uint8]) -> None:
        """Pages ``numbers`` of block ``block`` are filled with ``fills`` (mostly 0)."""


class Stop(enum.Enum):
    """Why :func:`decode_records_untrusted` returned."""

    EOS = "eos"
    HOOK = "hook"
    NEED_MORE = "need-more"


# ---------------------------------------------------------------- setup


def decode_mem_size_untrusted(buf: memoryview, at: int) -> tuple[int, int]:
    """The setup's ``MEM_SIZE`` record: the bytes of RAM its blocks add up to, and
    the offset after it.

    Raises:
        TruncatedError: the buffer ends inside it.
        RemoteProtocolError: not a setup.
    """
    need_bytes(buf, at, RECORD_HEADER.size, "ram setup", at)
    (word,) = RECORD_HEADER.unpack_from(buf, at)
    if word & _FLAG_BITS != RamFlag.MEM_SIZE:
        raise StreamError(f"flags={word & _FLAG_BITS:#x}", at=at,
                          reason="the ram section starts without MEM_SIZE")
    return word & ~_FLAG_BITS, at + RECORD_HEADER.size


def decode_setup_entry_untrusted(buf: memoryview, at: int, *, left: int,
                                 names: Collection[str],
                                 ignore_shared: bool = False) -> tuple[RamBlockInfo, int]:
    """One block of the setup's list, at ``at``, with ``left`` bytes of ``MEM_SIZE``
    not yet given to the blocks before it, named ``names``; returns it and the
    offset after it (with ``ignore_shared``, the block carries its address).

    Raises:
        TruncatedError: the buffer ends inside it (resume at ``at``).
        RemoteProtocolError: more than :data:`MAX_SETUP_BLOCKS` blocks, a length
            that does not fit, a name listed twice.
    """
    start = at
    if len(names) >= MAX_SETUP_BLOCKS:
        raise StreamError(f"RAM block {len(names) + 1}", at=at,
                          reason=f"more than {MAX_SETUP_BLOCKS} blocks in the ram setup")
    name, at = decode_name_untrusted(buf, at, "RAM block name", start)
    need_bytes(buf, at, U64.size, f"length of RAM block {name!r}", start)
    (length,) = U64.unpack_from(buf, at)
    if not length or length % PAGE_SIZE or length > left:
        raise StreamError(f"length={length}", at=at,
                          reason=f"RAM block {name!r} is not a whole number of pages within "
                                 f"the {left} bytes of MEM_SIZE left")
    if name in names:
        raise StreamError(f"RAM block name {name!r}", at=at, reason="listed twice")
    at += U64.size
    addr = None
    if ignore_shared:
        need_bytes(buf, at, U64.size, f"address of RAM block {name!r}", start)
        (addr,) = U64.unpack_from(buf, at)
        at += U64.size
    return RamBlockInfo(name=name, length=length, addr=addr), at


def decode_setup_untrusted(buf: memoryview, at: int, *, ignore_shared: bool = False
                           ) -> tuple[list[RamBlockInfo], int]:
    """The setup's block list, from its ``MEM_SIZE`` record; returns the blocks and
    the offset after them. With ``ignore_shared`` each block carries its address.

    Raises:
        TruncatedError: the buffer ends inside the list.
        RemoteProtocolError: not a setup, or the lengths do not add up.
    """
    left, at = decode_mem_size_untrusted(buf, at)
    blocks: list[RamBlockInfo] = []
    names: set[str] = set()
    while left:
        block, at = decode_setup_entry_untrusted(buf, at, left=left, names=names,
                                                 ignore_shared=ignore_shared)
        blocks.append(block)
        names.add(block.name)
        left -= block.length
    return blocks, at


def encode_setup(blocks: Sequence[RamBlockInfo]) -> bytes:
    """``MEM_SIZE`` and the block list (addresses where the blocks have them)."""
    parts = [RECORD_HEADER.pack(sum(b.length for b in blocks) | RamFlag.MEM_SIZE)]
    for block in blocks:
        parts += [encode_name(block.name), U64.pack(block.length)]
        if block.addr is not None:
            parts.append(U64.pack(block.addr))
    return b"".join(parts)


# ---------------------------------------------------------------- records


def decode_records_untrusted(buf: memoryview, at: int, blocks: Sequence[RamBlockInfo],
                             sink: RecordSink, *, current: int | None = None
                             ) -> tuple[Stop, int, int | None]:
    """Decode records from ``at`` into ``sink`` until ``EOS``, ``HOOK`` or the end
    of ``buf``; returns why it stopped, where (after the EOS or HOOK, or at the
    start of the incomplete record) and the block a ``CONTINUE`` record refers to.

    Raises:
        RemoteProtocolError: an unsupported or unknown flag, an unknown block, a
            page outside its block; the message names the offset.
    """
    end = len(buf)
    names = {block.name: index for index, block in enumerate(blocks)}
    while True:
        if end - at < RECORD_HEADER.size:
            return Stop.NEED_MORE, at, current
        (word,) = RECORD_HEADER.unpack_from(buf, at)
        flags = word & _FLAG_BITS
        if current is not None and flags in (_PAGE_RUN, _ZERO_RUN):
            taken = _run(buf, at, flags, blocks[current], current, sink)
            if taken:
                at += taken
                continue
            return Stop.NEED_MORE, at, current
        try:
            at, current, stop = _record(buf, at, word, blocks, names, sink, current)
        except TruncatedError as exc:
            return Stop.NEED_MORE, exc.offset, current
        if stop is not None:
            return stop, at, current


def _record(buf: memoryview, at: int, word: int, blocks: Sequence[RamBlockInfo],
            names: dict[str, int], sink: RecordSink, current: int | None
            ) -> tuple[int, int | None, Stop | None]:
    """One record the slow way (a first record of a block, EOS, HOOK, errors)."""
    start = at
    flags = word & _FLAG_BITS
    for flag, meaning in UNSUPPORTED.items():
        if flags & flag:
            raise StreamError(f"flags={flags:#x}", at=at,
                              reason=f"{meaning}, which rdmamig does not support")
    kind = flags & ~RamFlag.CONTINUE
    at += RECORD_HEADER.size
    if kind == RamFlag.EOS:
        return at, current, Stop.EOS
    if kind == RamFlag.HOOK:
        return at, current, Stop.HOOK
    if kind not in (RamFlag.ZERO, RamFlag.PAGE):
        raise StreamError(f"flags={flags:#x}", at=start,
                          reason="an unknown combination of ram flags")
    if flags & RamFlag.CONTINUE:
        if current is None:
            raise StreamError(f"flags={flags:#x}", at=start,
                              reason="CONTINUE before any record named a RAM block")
    else:
        name, at = decode_name_untrusted(buf, at, "RAM block name", start)
        if name not in names:
            raise StreamError(f"RAM block name {name!r}", at=start + 8,
                              reason="not in the setup's list")
        current = names[name]
    block = blocks[current]
    offset = word & ~_FLAG_BITS
    if offset >= block.length:
        raise StreamError(f"offset={offset:#x}", at=start,
                          reason=f"outside RAM block {block.name!r} ({block.length} bytes)")
    number = np.array([offset // PAGE_SIZE], dtype=np.uint64)
    if kind == RamFlag.ZERO:
        need_bytes(buf, at, 1, "fill byte of a ZERO record", start)
        sink.zero(current, number, np.frombuffer(buf, np.uint8, 1, at))
        return at + 1, current, None
    need_bytes(buf, at, PAGE_SIZE, "page of a PAGE record", start)
    sink.pages(current, number, np.frombuffer(buf, np.uint8, PAGE_SIZE, at).reshape(1, -1))
    return at + PAGE_SIZE, current, None


def _run(buf: memoryview, at: int, flags: int, block: RamBlockInfo, index: int,
         sink: RecordSink) -> int:
    """Decode the complete records of a run of ``PAGE | CONTINUE`` or ``ZERO |
    CONTINUE`` records that starts at ``at``; returns the bytes taken (0: the buffer
    does not hold the first one whole)."""
    stride = PAGE_RECORD if flags == _PAGE_RUN else ZERO_RECORD
    count = min((len(buf) - at) // stride, RUN_STEP)
    if not count:
        return 0
    words = np.ndarray((count,), dtype=">u8", buffer=buf, offset=at, strides=(stride,))
    same = (words & np.uint64(_FLAG_BITS)) == flags
    if not same.all():
        count = int(np.argmin(same))
        words = words[:count]
    offsets = words & np.uint64(~_FLAG_BITS & 0xFFFF_FFFF_FFFF_FFFF)
    outside = offsets >= block.length
    if outside.any():
        bad = int(np.argmax(outside))
        raise StreamError(f"offset={int(offsets[bad]):#x}", at=at + bad * stride,
                          reason=f"outside RAM block {block.name!r} ({block.length} bytes)")
    numbers = (offsets // np.uint64(PAGE_SIZE)).astype(np.uint64)
    if stride == PAGE_RECORD:
        data = np.ndarray((count, PAGE_SIZE), dtype=np.uint8, buffer=buf,
                          offset=at + RECORD_HEADER.size, strides=(stride, 1))
        sink.pages(index, numbers, data)
    else:
        fills = np.ndarray((count,), dtype=np.uint8, buffer=buf,
                           offset=at + RECORD_HEADER.size, strides=(stride,))
        sink.zero(index, numbers, fills)
    return count * stride


# ---------------------------------------------------------------- encoding


def encode_eos() -> bytes:
    """The end of a section's records."""
    return RECORD_HEADER.pack(RamFlag.EOS)


def encode_hook() -> bytes:
    """The marker where a destination over RDMA enters its registration loop."""
    return RECORD_HEADER.pack(RamFlag.HOOK)


def encode_pages(name: str, numbers: npt.NDArray[np.integer], data: npt.NDArray[np.uint8],
                 *, first: bool) -> bytes:
    """``PAGE`` records for pages ``numbers`` of block ``name`` holding ``data`` (one
    row each); with ``first`` the first record names the block."""
    return b"".join(page_records(name, numbers, data, RamFlag.PAGE, first=first))


def encode_zero_pages(name: str, numbers: npt.NDArray[np.integer], *, first: bool) -> bytes:
    """``ZERO`` records (fill 0) for pages ``numbers`` of block ``name``."""
    return b"".join(page_records(name, numbers, np.zeros((len(numbers), 1), np.uint8),
                                 RamFlag.ZERO, first=first))


def page_records(name: str, numbers: npt.NDArray[np.integer], data: npt.NDArray[np.uint8],
                 flag: RamFlag, *, first: bool) -> list[bytes | memoryview]:
    """``flag`` records (PAGE: ``data`` holds the pages; ZERO: the fill bytes) as
    pieces to write one after the other, built in one numpy buffer; with ``first``
    the first record names the block."""
    count = len(numbers)
    if not count:
        return []
    width = data.shape[1]
    records = np.empty((count, RECORD_HEADER.size + width), dtype=np.uint8)
    words = (np.asarray(numbers, dtype=np.uint64) * np.uint64(PAGE_SIZE)
             | np.uint64(flag | RamFlag.CONTINUE))
    records[:, :RECORD_HEADER.size] = words.astype(">u8").view(np.uint8).reshape(count, -1)
    records[:, RECORD_HEADER.size:] = data
    out = records.data.cast("B")
    if not first:
        return [out]
    head = RECORD_HEADER.pack(int(numbers[0]) * PAGE_SIZE | flag) + encode_name(name)
    return [head, out[RECORD_HEADER.size:]]
