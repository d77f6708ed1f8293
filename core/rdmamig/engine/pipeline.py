"""The source's write pipeline: writes are queued, posted in signalled batches,
completed and drained, and a posting mode decides when, around the control round
trips of each window.

Every control message waits behind the writes posted before it, as a SEND behind
WRITEs on one queue pair, so the link stays busy only if writes are posted while
the source waits for the peer's answers. Two modes do that:

- :class:`Pipelined`, for a policy that keeps everything pinned: large windows, each
  posted once the next window's REGISTER REQUEST is on its way; one window in flight.
- :class:`Interleaved`, for a policy that unpins: small windows (64 chunks, or half
  the cap when that is less: the window in flight and the one being registered fill
  it), each posted in thirds – one at once, one during the next UNREGISTER exchange,
  the last during the next REGISTER – with at most two windows in flight. What is in
  flight is what the policy cannot choose from, so windows stay small.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Callable
from typing import Protocol

import attrs

from ..policy import ChunkId, UnpinPolicy
from ..transport import Endpoint, MemoryRegion, RemoteWrite
from ..wire import CHUNK_SIZE
from .pins import PinTable

#: Longest merged write (PROTOCOL.md, "RAM transfer").
MAX_WRITE = 2 * CHUNK_SIZE


@attrs.define
class _Batch:
    """Writes to post together, the last one signalled, and the chunks they fill."""

    writes: list[RemoteWrite] = attrs.Factory(list)
    chunks: list[ChunkId] = attrs.Factory(list)


class WritePipeline:
    """Queues one-sided writes in batches of ``batch_chunks`` chunks and posts,
    completes and drains them. Each queued chunk is held in ``pins`` until the batch
    holding it completes; :meth:`take_written` returns the chunks completed since it
    was last called.

    Args:
        endpoint: where the writes go.
        pins: the source's pin table.
        batch_chunks: chunks per signalled batch.
        timeout: seconds to wait for one batch.
        on_progress: called after each post, and by a mode's window that posted
            nothing (the source's meter samples its progress there).
        before_post: called with a batch's bytes before it is posted (the meter
            paces there).
        post_unit: the most bytes to post at once, or None (a paced source posts
            its batches in pieces of this size).
        alongside: called with a batch's chunks beside its writes
            (:meth:`~rdmamig.transport.RemoteWriter.post_writes_with`: perhaps on
            the backend's sending thread, before it sends them); it has run once
            the batch completes.
        on_completed: called with the bytes of each posted piece that completes,
            before the progress sample that follows.
    """

    def __init__(self, endpoint: Endpoint, pins: PinTable, *, batch_chunks: int,
                 timeout: float | None, on_progress: Callable[[], None],
                 before_post: Callable[[int], None] = lambda nbytes: None,
                 post_unit: Callable[[], int | None] = lambda: None,
                 alongside: Callable[[list[ChunkId]], None] = lambda chunks: None,
                 on_completed: Callable[[int], None] = lambda nbytes: None) -> None:
        self.endpoint = endpoint
        self.batch_chunks = batch_chunks
        self.timeout = timeout
        self._pins = pins
        self._written: list[ChunkId] = []
        self.sample = on_progress
        self._before_post = before_post
        self._post_unit = post_unit
        self._alongside = alongside
        self._on_completed = on_completed
        self._queued: list[_Batch] = []
        # Posted pieces not yet seen complete, oldest first: ticket, the chunks
        # written once it completes (a batch's last piece), bytes.
        self._outstanding: deque[tuple[int, list[ChunkId], int]] = deque()
        #: Batches posted since :meth:`mark`: those of the window now in flight.
        self.posted_since_mark = 0

    @property
    def queued_batches(self) -> int:
        """Batches queued and not posted yet."""
        return len(self._queued)

    def queue(self, cid: ChunkId, *, region: MemoryRegion, offset: int, length: int,
              remote_addr: int, rkey: int) -> None:
        """Queue a write of ``length`` bytes at ``offset`` of ``region`` into chunk
        ``cid``, merged with the one before when both are contiguous on both sides,
        under the same keys, and the result is at most :data:`MAX_WRITE`."""
        batch = self._queued[-1] if self._queued else None
        if batch is None or (batch.chunks[-1] != cid and len(batch.chunks) == self.batch_chunks):
            batch = _Batch()
            self._queued.append(batch)
        if not batch.chunks or batch.chunks[-1] != cid:
            batch.chunks.append(cid)
            self._pins.hold(cid)
        last = batch.writes[-1] if batch.writes else None
        if (last is not None and last.region == region and last.rkey == rkey
                and last.offset + last.length == offset
                and last.remote_addr + last.length == remote_addr
                and last.length + length <= MAX_WRITE):
            batch.writes[-1] = attrs.evolve(last, length=last.length + length)
            return
        batch.writes.append(RemoteWrite(region=region, offset=offset, length=length,
                                        remote_addr=remote_addr, rkey=rkey))

    def post(self, limit: int | None = None) -> None:
        """Post the queued batches (the first ``limit`` of them)."""
        if not self._queued:
            return
        count = len(self._queued) if limit is None else limit
        posting, self._queued = self._queued[:count], self._queued[count:]
        for batch in posting:
            pieces = _pieces(batch.writes, self._post_unit())
            for index, piece in enumerate(pieces):
                nbytes = sum(write.length for write in piece)
                self._before_post(nbytes)
                if index == 0:
                    ticket = self.endpoint.post_writes_with(
                        writes=piece, alongside=functools.partial(self._alongside, batch.chunks))
                else:
                    ticket = self.endpoint.post_writes(writes=piece)
                # Completions come in order: the batch's chunks are written with its
                # last piece.
                self._outstanding.append((ticket, batch.chunks if index == len(pieces) - 1
                                          else [], nbytes))
                self.posted_since_mark += 1
        self.sample()

    def post_part(self, parts: int) -> None:
        """Post the first ``1/parts`` of the queued batches (rounded up)."""
        self.post(limit=-(-len(self._queued) // parts))

    def mark(self) -> None:
        """A new window starts being in flight."""
        self.posted_since_mark = 0

    def complete_before_mark(self) -> None:
        """Wait for every posted batch but those posted since :meth:`mark`."""
        while len(self._outstanding) > self.posted_since_mark:
            self.complete_oldest()

    def complete_oldest(self) -> None:
        """Wait for the oldest posted batch; its chunks are written."""
        ticket, chunks, nbytes = self._outstanding.popleft()
        self.endpoint.wait_writes(ticket=ticket, timeout=self.timeout)
        for cid in chunks:
            self._pins.release(cid)
        self._written += chunks
        self._on_completed(nbytes)
        self.sample()

    def take_written(self) -> list[ChunkId]:
        """The chunks whose writes completed since the last call, in order."""
        written, self._written = self._written, []
        return written

    def complete_all(self) -> None:
        """Post everything queued and wait for all of it."""
        self.post()
        while self._outstanding:
            self.complete_oldest()

    def drain(self) -> None:
        """End of a round: everything completes, and the next window starts afresh."""
        self.complete_all()
        self.mark()


def _pieces(writes: list[RemoteWrite], unit: int | None) -> list[list[RemoteWrite]]:
    """``writes`` in pieces of at most ``unit`` bytes (one piece without a unit),
    a write cut where a piece ends."""
    if unit is None or sum(write.length for write in writes) <= unit:
        return [writes]
    pieces: list[list[RemoteWrite]] = [[]]
    room = unit
    for write in writes:
        at = 0
        while at < write.length:
            if room == 0:
                pieces.append([])
                room = unit
            length = min(room, write.length - at)
            pieces[-1].append(attrs.evolve(write, offset=write.offset + at,
                                           remote_addr=write.remote_addr + at, length=length))
            at += length
            room -= length
    return pieces


class PostingMode(Protocol):
    """When a window's writes are posted, around the source's control round trips."""

    @property
    def window_chunks(self) -> int:
        """Most chunks a window scans and registers."""

    @property
    def batch_chunks(self) -> int:
        """Chunks per signalled batch."""

    def after_unregister_sent(self, pipeline: WritePipeline) -> None:
        """An UNREGISTER REQUEST is on its way; its answer is awaited next."""

    def before_register(self, pipeline: WritePipeline) -> None:
        """A window is about to ask the policy for room and register chunks."""

    def end_window(self, pipeline: WritePipeline) -> None:
        """A window's writes are queued."""


@attrs.frozen
class Pipelined:
    """Large windows, one in flight: the queued window is posted once the next
    window's REGISTER REQUEST is sent (or when it registers nothing)."""

    window_chunks: int
    batch_chunks: int

    def after_unregister_sent(self, pipeline: WritePipeline) -> None:
        pass

    def before_register(self, pipeline: WritePipeline) -> None:
        pass

    def end_window(self, pipeline: WritePipeline) -> None:
        if not pipeline.posted_since_mark:
            pipeline.sample()
        pipeline.complete_before_mark()
        pipeline.mark()


@attrs.frozen
class Interleaved:
    """Small windows posted in thirds, two in flight (see the module docstring)."""

    window_chunks: int
    batch_chunks: int

    def after_unregister_sent(self, pipeline: WritePipeline) -> None:
        pipeline.post_part(2)

    def before_register(self, pipeline: WritePipeline) -> None:
        # What the policy may choose from: the windows before the last one.
        pipeline.complete_before_mark()

    def end_window(self, pipeline: WritePipeline) -> None:
        # Every write of the window before is posted by now. In a run of windows
        # that register nothing, this wait keeps what is in flight to two windows
        # (a send queue has a depth).
        pipeline.complete_before_mark()
        pipeline.mark()
        pipeline.post_part(3)
        if not pipeline.posted_since_mark:
            pipeline.sample()


def posting_mode(policy: UnpinPolicy, *, window_chunks: int, batch_chunks: int) -> PostingMode:
    """The mode and window sizes for ``policy``, from the source's configured
    ``window_chunks`` (for a policy that keeps everything) and ``batch_chunks``."""
    window = window_chunks if policy.keeps_everything else batch_chunks
    cap = policy.pin_cap
    if cap is not None:
        window = max(1, min(window, cap // CHUNK_SIZE // 2))
    if policy.keeps_everything:
        return Pipelined(window_chunks=window, batch_chunks=batch_chunks)
    return Interleaved(window_chunks=window, batch_chunks=max(1, min(batch_chunks, window // 8)))
