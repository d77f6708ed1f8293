"""RAM blocks: named, page-aligned memory with a dirty bitmap per 4 KiB page.

A block wraps any contiguous buffer (an anonymous mapping, a file or ``/dev/shm``
mapping, a bytearray, a numpy array; read-only memory for a source only). Code that
writes a block calls :meth:`RamBlock.mark_dirty`; memory written by someone else
(another process, a VM) is tracked by :class:`ChecksumTracker`. Pages the kernel
says hold no data (:mod:`rdmamig.populated`) are never read. Per-page work is
vectorised with numpy.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import mmap
import os
import threading
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import xxhash

from .errors import ConfigurationError, ImageError
from .populated import Everything, FileExtents, PrivateAnonymous, Residency, is_private_anonymous
from .units import size_text
from .wire import CHUNK_SIZE

PAGE_SIZE = 4096
PAGES_PER_CHUNK = CHUNK_SIZE // PAGE_SIZE
_WORDS_PER_PAGE = PAGE_SIZE // 8

BoolArray = npt.NDArray[np.bool_]
#: madvise(2) advice that faults a range in for writing (Linux 5.14).
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)


class RamBlock:
    """A named block of RAM.

    Args:
        name: the block's name (RAM BLOCKS exchange matches blocks by name).
        buffer: contiguous memory whose length is a multiple of 4 KiB; writable for
            a destination, which writes it (a source only reads: ``readonly``).
        residency: how to tell which of its pages hold data without reading them
            (:mod:`rdmamig.populated`); found from the mapping when not given.
    """

    def __init__(self, name: str, buffer: object, *, owner: object = None,
                 residency: Residency | None = None) -> None:
        try:
            view = memoryview(buffer).cast("B")  # type: ignore[arg-type]
        except TypeError as exc:
            raise ValueError(f"RAM block {name!r}: not contiguous memory of bytes "
                             f"({exc})") from None
        if view.nbytes == 0 or view.nbytes % PAGE_SIZE:
            raise ValueError(f"RAM block {name!r}: length {view.nbytes} is not a positive "
                             f"multiple of {PAGE_SIZE}")
        self.name = name
        self.view = view
        self.length = view.nbytes
        self.pages = self.length // PAGE_SIZE
        self.chunks = -(-self.length // CHUNK_SIZE)
        self.array = np.frombuffer(view, dtype=np.uint8)
        #: Memory only a source can use (it is never written).
        self.readonly = view.readonly
        self._owner = owner  # keeps a mapping alive as long as the block
        #: The file of a file-backed block (open as long as the block), else None.
        self._fd: int | None = None
        self._lock = threading.Lock()
        self._dirty = np.ones(self.pages, dtype=np.bool_)
        if residency is None:
            address = int(self.array.ctypes.data)
            residency = (PrivateAnonymous(address) if is_private_anonymous(address, self.length)
                         else Everything())
        #: Which pages hold data, by what the kernel says (:meth:`populated_pages`).
        self.residency = residency

    # ------------------------------------------------------------ construction

    @classmethod
    def anonymous(cls, name: str, length: int, *, populate: bool = True) -> RamBlock:
        """Fresh zeroed memory, backed by transparent huge pages where the kernel has
        them (QEMU advises MADV_HUGEPAGE on guest RAM too). ``populate`` pre-faults
        it, as QEMU's ``prealloc=on`` does, so faulting is not timed as migration."""
        mapping = mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        # Advice first: pages faulted before it stay 4 KiB.
        with contextlib.suppress(OSError, AttributeError):
            mapping.madvise(mmap.MADV_HUGEPAGE)
        if populate:
            try:
                mapping.madvise(_MADV_POPULATE_WRITE)
            except OSError:  # kernels before 5.14: touch every page instead
                np.frombuffer(mapping, dtype=np.uint8)[::PAGE_SIZE] = 0
        return cls(name, mapping, owner=mapping,
                   residency=PrivateAnonymous(ctypes.addressof(ctypes.c_char.from_buffer(mapping))))

    @classmethod
    def from_file(cls, name: str, path: Path, *, length: int | None = None,
                  populate: bool = False) -> RamBlock:
        """Shared mapping of a file (``/dev/shm`` for a VM's ``memory-backend-file``);
        the file is created or extended to ``length`` when given."""
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if length is not None else 0),
                     0o600)
        try:
            if length is not None and os.fstat(fd).st_size != length:
                os.ftruncate(fd, length)
            size = os.fstat(fd).st_size
            flags = mmap.MAP_SHARED | (getattr(mmap, "MAP_POPULATE", 0) if populate else 0)
            mapping = mmap.mmap(fd, size, flags=flags)
        except BaseException:
            os.close(fd)
            raise
        return cls._mapped(name, fd, mapping)

    @classmethod
    def from_fd(cls, name: str, fd: int, *, writable: bool = False) -> RamBlock:
        """A shared mapping of the file open as ``fd`` (the block owns the
        descriptor from here on), read-only unless ``writable``: a source's view
        of an image's block file, which it never writes."""
        try:
            mapping = mmap.mmap(fd, os.fstat(fd).st_size, flags=mmap.MAP_SHARED,
                                prot=mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0))
        except BaseException:
            os.close(fd)
            raise
        return cls._mapped(name, fd, mapping)

    @classmethod
    def _mapped(cls, name: str, fd: int, mapping: mmap.mmap) -> RamBlock:
        # The descriptor stays open for SEEK_DATA / SEEK_HOLE and fallocate, as long
        # as the block.
        block = cls(name, mapping, owner=mapping, residency=FileExtents(fd))
        weakref.finalize(block, os.close, fd)
        block._fd = fd
        return block

    def prefault(self, offset: int, length: int) -> None:
        """Fault ``length`` bytes at ``offset`` in for writing with one system call
        (MADV_POPULATE_WRITE) instead of a page fault per page; nothing on kernels
        before 5.14."""
        if isinstance(self._owner, mmap.mmap) and length > 0:
            with contextlib.suppress(OSError, ValueError):
                self._owner.madvise(_MADV_POPULATE_WRITE, offset, length)

    def require_writable(self) -> None:
        """Refuse read-only memory where the block is to be written (a destination).

        Raises:
            ConfigurationError: it is read-only.
        """
        if self.readonly:
            raise ConfigurationError(f"RAM block {self.name!r} is read-only memory: a "
                                     f"destination writes its blocks")

    def allocate(self, offset: int, length: int) -> None:
        """Give a file-backed block's file the disk space of ``length`` bytes at
        ``offset`` before they are stored through the mapping: a store into a
        mapped file the disk has no room for is a SIGBUS, which no caller can
        handle; this is an error instead. Nothing for anonymous memory.

        Raises:
            ImageError: the filesystem refused (full, over a quota, an I/O error).
        """
        if self._fd is not None and length > 0:
            try:
                os.posix_fallocate(self._fd, offset, length)
            except OSError as exc:
                raise ImageError(f"RAM block {self.name!r}: no room for {length} bytes at "
                                 f"offset {offset}: {exc.strerror}") from None

    def allocated_bytes(self) -> int:
        """Bytes a file-backed block's file has allocated on its filesystem (0 for
        anonymous memory)."""
        return os.fstat(self._fd).st_blocks * 512 if self._fd is not None else 0

    def flush(self) -> None:
        """Write a file-backed block's pages to its file and wait for the disk
        (msync); nothing for anonymous memory."""
        if self._fd is not None and isinstance(self._owner, mmap.mmap):
            self._owner.flush()

    # ------------------------------------------------------------ dirty tracking

    def chunk_bytes(self, index: int) -> int:
        """The length of chunk ``index`` (the last chunk may be short)."""
        return min(CHUNK_SIZE, self.length - index * CHUNK_SIZE)

    def mark_dirty(self, offset: int, length: int) -> None:
        """Record that ``length`` bytes at ``offset`` were written (call it after
        writing: a page marked after the engine took the bitmap goes next round)."""
        if offset < 0 or length < 0 or offset + length > self.length:
            raise ValueError(f"mark_dirty({offset}, {length}) is outside block {self.name!r} "
                             f"of {self.length} bytes")
        if length:
            with self._lock:
                self._dirty[offset // PAGE_SIZE:(offset + length - 1) // PAGE_SIZE + 1] = True

    def mark_pages_dirty(self, pages: npt.NDArray[np.integer] | BoolArray) -> None:
        """Record written pages given as indexes or as a boolean mask."""
        with self._lock:
            if pages.dtype == np.bool_:
                self._dirty |= pages.astype(np.bool_, copy=False)
            else:
                self._dirty[pages] = True

    def take_dirty(self) -> BoolArray:
        """The dirty bitmap, cleared atomically (QEMU's bitmap sync)."""
        with self._lock:
            taken = self._dirty
            self._dirty = np.zeros(self.pages, dtype=np.bool_)
        return taken

    def dirty_pages(self) -> int:
        """How many pages are dirty now."""
        return int(np.count_nonzero(self._dirty))

    def dirty_bitmap(self) -> BoolArray:
        """A copy of the dirty bitmap, left as it is (for estimates)."""
        with self._lock:
            return self._dirty.copy()

    # ------------------------------------------------------------ page scans

    def populated_pages(self, first_page: int, last_page: int) -> BoolArray:
        """Which pages in ``[first_page, last_page)`` may hold data; the others read
        as zero and are not read (:mod:`rdmamig.populated`)."""
        return self.residency.pages(first_page, last_page)

    def nonzero_pages(self, first_page: int, last_page: int, *,
                      populated: BoolArray | None = None) -> BoolArray:
        """Which pages in ``[first_page, last_page)`` hold a non-zero byte; pages
        that are not populated (``populated``, asked for when not given) are not
        read."""
        words = self.array[first_page * PAGE_SIZE:last_page * PAGE_SIZE].view(np.uint64)
        pages = words.reshape(-1, _WORDS_PER_PAGE)
        if populated is None:
            populated = self.populated_pages(first_page, last_page)
        if populated.all():
            return _nonzero(pages)
        # Gathering whole pages would copy them: gather first words, then only the
        # pages whose first word is zero.
        held = np.flatnonzero(populated)
        nonzero = np.zeros(len(pages), dtype=np.bool_)
        nonzero[held] = pages[held, 0] != 0
        undecided = held[~nonzero[held]]
        if len(undecided):
            nonzero[undecided] = pages[undecided].any(axis=1)
        return nonzero

    def reads_zero(self, start: int, length: int) -> bool:
        """Whether the ``length`` bytes at ``start`` are all zero (only reads them,
        and of whole pages only those that are populated)."""
        if length and start % PAGE_SIZE == 0 and length % PAGE_SIZE == 0:
            first = start // PAGE_SIZE
            return not self.nonzero_pages(first, first + length // PAGE_SIZE).any()
        data = self.array[start:start + length]
        if start % 8 == 0 and length % 8 == 0:
            data = data.view(np.uint64)
        # For unsigned words, max() is the fastest of numpy's reductions here.
        return length == 0 or int(data.max()) == 0

    def digest(self, known: Mapping[int, bytes] | None = None) -> bytes:
        """The block's digest: xxh3-128 over the xxh3-128 digests of its 1 MiB
        chunks in order (docs/protocol-extensions.md). Chunks that are not
        populated are not read: a hole's digest is that of zeros. ``known``: the
        digests of chunks taken earlier (:meth:`chunk_digest`), which are not
        hashed again."""
        known = known or {}
        populated = self.populated_pages(0, self.pages)
        tree = xxhash.xxh3_128()
        for index in range(self.chunks):
            digest = known.get(index)
            if digest is None:
                held = populated[index * PAGES_PER_CHUNK:(index + 1) * PAGES_PER_CHUNK]
                digest = _chunk_digest(self._chunk_view(index), held, _HELD_PIECE)
            tree.update(digest)
        return tree.digest()

    def chunk_digest(self, index: int, populated: BoolArray | None = None) -> bytes:
        """The digest of chunk ``index`` that :meth:`digest` takes, hashed in one
        call that lets other threads run meanwhile (this is for hashing beside a
        transfer: the lanes that send or place data need the GIL now and then).
        ``populated``: the chunk's pages that may hold data, when the caller has
        asked the kernel already (:meth:`populated_pages`); else asked now."""
        if populated is None:
            first = index * PAGES_PER_CHUNK
            populated = self.populated_pages(first, min(first + PAGES_PER_CHUNK, self.pages))
        return _chunk_digest(self._chunk_view(index), populated, CHUNK_SIZE)

    def _chunk_view(self, index: int) -> memoryview:
        return self.view[index * CHUNK_SIZE:(index + 1) * CHUNK_SIZE]


def blocks_text(blocks: Sequence[RamBlock], shown: int = 4) -> str:
    """The first ``shown`` blocks by name and size, for a log line."""
    text = ", ".join(f"{block.name} {size_text(block.length)}" for block in blocks[:shown])
    return text + (", ..." if len(blocks) > shown else "")


def content_digest(data: bytes | memoryview) -> bytes:
    """The digest :meth:`RamBlock.digest` gives a block holding ``data``."""
    view = memoryview(data).cast("B")
    tree = xxhash.xxh3_128()
    for start in range(0, view.nbytes, CHUNK_SIZE):
        tree.update(_xxh3(view[start:start + CHUNK_SIZE], _HELD_PIECE))
    return tree.digest()


_ZEROS = memoryview(bytes(CHUNK_SIZE))
#: Bytes hashed per call when the hash is what the caller waits for.
#: python-xxhash lets go of the GIL for larger inputs, and each time it does, a
#: runnable thread (another migration of a listener) may keep it for a whole switch
#: interval (5 ms): per 1 MiB chunk, that made a digest 100 times slower. Smaller
#: pieces keep the GIL (benchmarks/README.md). Hashing beside a transfer is the
#: other way round: pieces that keep the GIL make the lanes wait 5 ms for it.
_HELD_PIECE = 64 << 10


def _feed(running: xxhash.xxh3_128, view: memoryview, piece: int) -> None:
    """Hash ``view`` into ``running``, ``piece`` bytes per call."""
    for start in range(0, view.nbytes, piece):
        running.update(view[start:start + piece])


def _xxh3(view: memoryview, piece: int) -> bytes:
    """xxh3-128 of ``view``, hashed ``piece`` bytes per call."""
    running = xxhash.xxh3_128()
    _feed(running, view, piece)
    return running.digest()


@functools.cache
def _zero_digest(length: int) -> bytes:
    return _xxh3(_ZEROS[:length], _HELD_PIECE)


def _chunk_digest(chunk: memoryview, populated: BoolArray, piece: int) -> bytes:
    """xxh3-128 of ``chunk``, reading only its populated pages (``populated``),
    ``piece`` bytes per call."""
    if populated.all():
        return _xxh3(chunk, piece)
    if not populated.any():
        return _zero_digest(chunk.nbytes)
    running = xxhash.xxh3_128()
    edges = np.flatnonzero(np.diff(populated)) + 1
    for start, end in zip(np.r_[0, edges].tolist(), np.r_[edges, len(populated)].tolist(),
                          strict=True):
        length = (end - start) * PAGE_SIZE
        _feed(running, chunk[start * PAGE_SIZE:start * PAGE_SIZE + length]
              if populated[start] else _ZEROS[:length], piece)
    return running.digest()


def _nonzero(pages: npt.NDArray[np.uint64]) -> BoolArray:
    """Which rows (pages of 64-bit words) hold a non-zero word."""
    # A page whose first word is non-zero needs no further look: for ordinary
    # content that settles almost every page reading 8 bytes of it. Only the
    # others are scanned whole.
    nonzero: BoolArray = np.not_equal(pages[:, 0], 0)
    undecided = np.flatnonzero(~nonzero)
    if 2 * len(undecided) > len(pages):  # mostly zero: one pass beats gathering
        # OR-reducing the words beats any(axis=1) (benchmarks/README.md).
        return np.asarray(np.bitwise_or.reduce(pages, axis=1) != 0, dtype=np.bool_)
    if len(undecided):
        nonzero[undecided] = pages[undecided].any(axis=1)
    return nonzero


class ChecksumTracker:
    """Finds dirty pages of memory rdmamig does not write, by comparing a per-page
    checksum between rounds (for a file or ``/dev/shm`` region written by another
    process, such as a VM's ``memory-backend-file``).

    The checksum is a weighted sum of the page's 64-bit words with random odd
    weights, modulo 2**64: vectorised with numpy, a few hundred MB/s per core. Pages
    that are not populated are not read: their checksum is a zero page's, 0.
    """

    #: Pages hashed per numpy step (bounds the temporary arrays to 32 MiB).
    STEP = 8192
    #: What it rests on (:class:`rdmamig.tracking.DirtyTracker`), with why it was
    #: chosen when something chose it.
    method = "checksum"

    def __init__(self, block: RamBlock, *, seed: int = 0x5EED) -> None:
        self.block = block
        rng = np.random.default_rng(seed)
        self._weights = rng.integers(0, 2**63, size=_WORDS_PER_PAGE, dtype=np.uint64) * 2 + 1
        self._sums = self._checksums()

    def _checksums(self) -> npt.NDArray[np.uint64]:
        pages = self.block.array.view(np.uint64).reshape(-1, _WORDS_PER_PAGE)
        out = np.zeros(len(pages), dtype=np.uint64)
        with np.errstate(over="ignore"):
            for start in range(0, len(pages), self.STEP):
                part = pages[start:start + self.STEP]
                held = self.block.populated_pages(start, start + len(part))
                if held.all():
                    out[start:start + len(part)] = self._sum(part)
                elif held.any():
                    at = np.flatnonzero(held)
                    out[start + at] = self._sum(part[at])
        return out

    def _sum(self, pages: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
        return np.asarray((pages * self._weights).sum(axis=1, dtype=np.uint64))

    def scan(self) -> int:
        """Mark every page whose checksum changed since the last scan as dirty;
        returns how many did."""
        sums = self._checksums()
        changed = sums != self._sums
        self._sums = sums
        self.block.mark_pages_dirty(changed)
        return int(np.count_nonzero(changed))
