"""The source of a migration: QEMU's pre-copy over any backend.

A bulk round sends every page; dirty-page iterations follow while the workload
runs; when the remaining dirty bytes fit in ``max_downtime`` at the measured
bandwidth (or after ``max_iterations``), the workload stops and the last pages, the
state stream and END go out. Zero pages travel as COMPRESS; the others as one-sided
writes merged over contiguous pages (up to 2 MiB, within one registration, since one
write uses one key), completion signalled once per batch of ``batch_chunks`` chunks.
Pages are scanned and registered a window of ``window_chunks`` chunks at a time, and
one window's writes stay in flight while the next is prepared. With an rdmamig peer,
two neighbouring chunks are registered as one 2 MiB region.
Which chunks to unpin is the unpin policy's call.

The source only reads its memory: a failed migration leaves it as it was, and the
workload keeps running.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from types import MappingProxyType
from typing import Protocol, TypeVar

import attrs
import numpy as np

from .. import wire
from ..caps import Capability
from ..control import Role
from ..errors import MemlockLimitError, MigrationError, RdmamigError, VerificationError
from ..pinning import locked_bytes
from ..policy import CHUNK_SIZE, ChunkId, UnpinPolicy
from ..session import ControlSession, QemuFileWriter
from ..transport import Endpoint, MemoryRegion, RemoteWrite
from . import pages as masks
from . import stream
from .ramblock import PAGE_SIZE, PAGES_PER_CHUNK, BoolArray, ChecksumTracker, RamBlock

_T = TypeVar("_T")

#: Longest merged write (PROTOCOL.md, "RAM transfer").
MAX_WRITE = 2 * CHUNK_SIZE
#: Dirty zero pages in a chunk with data go as COMPRESS only in runs of this many.
MIN_COMPRESS_RUN = 16
#: Gaps of fewer clean pages than this between the pages a chunk writes are written
#: too: one more write costs more than copying them. A 1 GiB guest dirtying 1 GiB/s
#: of scattered pages: stop-and-copy 348-379 ms without, 189-211 ms with (TCP).
FILL_GAPS_BELOW = 4


class Workload(Protocol):
    """What the source needs of the thing that dirties its memory."""

    def stop(self) -> None:
        """Pause it (the stop of stop-and-copy)."""

    def resume(self) -> None:
        """Let it run again (after a failed migration the source keeps running)."""

    def throttle(self, fraction: float) -> None:
        """Slow it down to ``1 - fraction`` of its speed (auto-converge)."""

    def state(self) -> bytes:
        """Its non-RAM state, sent after stop in the QEMU FILE stream."""


@attrs.define(kw_only=True)
class SourceConfig:
    """Tunables, with QEMU's defaults where QEMU has one."""

    max_downtime: float = 0.3
    max_iterations: int = 30
    auto_converge: bool = False
    #: Chunks per signalled batch of writes (under a policy that unpins, an eighth
    #: of its window).
    batch_chunks: int = 64
    #: Chunks scanned and registered together when the policy keeps everything
    #: pinned (under a policy that unpins, a window is ``batch_chunks`` chunks, or
    #: half its cap when that is less). Each window costs a few control round
    #: trips, each behind the writes before it: large windows amortise them.
    window_chunks: int = 256
    timeout: float | None = 60.0
    #: With INLINE, an unregistered chunk with at most this many dirty data pages
    #: sends them inside PAGES messages rather than being registered (a copy of a
    #: few pages costs less than a registration's round trips; as UCX's eager
    #: protocol against rendezvous). 0: always register.
    inline_pages: int = 16
    #: Unpin off the data path: one batched UNREGISTER REQUEST per decision and the
    #: local deregistrations on a worker thread. False: one request per chunk and
    #: deregistration inline, as the seed patch does it (the benchmark's baseline).
    async_unregister: bool = True


@attrs.define(kw_only=True)
class SourceResult:
    """What happened, timed as QEMU's ``query-migrate`` does."""

    verified: bool = False
    iterations: int = 0
    bytes_written: int = 0
    zero_pages: int = 0
    #: Pages sent inside PAGES messages (Capability.INLINE).
    inline_pages: int = 0
    registrations: int = 0
    unregistrations: int = 0
    reregistrations: int = 0
    pinned_peak_bytes: int = 0
    #: Highest VmLck + VmPin seen (what the kernel counts against RLIMIT_MEMLOCK).
    locked_peak_bytes: int = 0
    downtime_s: float = 0.0
    total_time_s: float = 0.0
    verify_time_s: float = 0.0
    throttle: float = 0.0
    capabilities: int = 0
    #: One sample per batch: seconds, bytes written, dirty bytes left, pinned bytes.
    timeline: list[dict[str, float]] = attrs.Factory(list)


@attrs.frozen
class _Pin:
    """One registration: ``count`` chunks of block ``block`` from chunk ``first``,
    pinned on both sides under one local region and one rkey."""

    block: int
    first: int
    count: int
    region: MemoryRegion
    rkey: int

    def chunks(self) -> list[ChunkId]:
        return [ChunkId(self.block, self.first + i) for i in range(self.count)]


@attrs.define
class _Pending:
    region: MemoryRegion
    offset: int
    length: int
    remote_addr: int
    rkey: int


@attrs.define
class _Batch:
    """Writes to post together, the last one signalled, and the chunks they fill."""

    writes: list[_Pending] = attrs.Factory(list)
    chunks: list[ChunkId] = attrs.Factory(list)


class Source:
    """Migrates ``blocks`` over ``endpoint``.

    Args:
        endpoint: a connected endpoint (its capabilities decide PIN_ALL, batching and
            verification).
        blocks: the RAM to migrate.
        policy: decides what to unpin and when.
        workload: stopped for stop-and-copy; None for idle memory.
        trackers: checksum trackers to scan before each round (memory rdmamig does
            not write itself).
        on_progress: called after every batch with the latest timeline sample.
        started_at: ``time.monotonic()`` when the migration started (connect).
    """

    def __init__(self, endpoint: Endpoint, blocks: Sequence[RamBlock], *,
                 policy: UnpinPolicy, config: SourceConfig | None = None,
                 workload: Workload | None = None, trackers: Sequence[ChecksumTracker] = (),
                 on_progress: Callable[[dict[str, float]], None] | None = None,
                 started_at: float | None = None) -> None:
        self.endpoint = endpoint
        self.blocks = list(blocks)
        self.policy = policy
        self.config = config or SourceConfig()
        self.workload = workload
        self.trackers = list(trackers)
        self.on_progress = on_progress
        self.session = ControlSession(endpoint, role=Role.SOURCE,
                                      capabilities=endpoint.capabilities,
                                      timeout=self.config.timeout)
        caps = endpoint.capabilities
        self.pin_all = bool(caps & Capability.PIN_ALL)
        self.batch = bool(caps & Capability.BATCH)
        self._inline_pages = (self.config.inline_pages if caps & Capability.INLINE
                              and not self.pin_all else 0)
        self.result = SourceResult(capabilities=int(caps))
        self._start = started_at if started_at is not None else time.monotonic()
        self._remote: list[wire.DestBlock] = []
        self._host_addr: list[int] = []
        # Every registered chunk -> its registration (two chunks may share one).
        self._pins: dict[ChunkId, _Pin] = {}
        # Every registered chunk -> its bytes: what the policy is shown (read-only).
        self._pinned_sizes: dict[ChunkId, int] = {}
        self._pinned_view = MappingProxyType(self._pinned_sizes)
        self._local_blocks: list[MemoryRegion] = []
        self._ever_unpinned: set[ChunkId] = set()
        self._last_ticket: dict[ChunkId, int] = {}
        self._completed_ticket = 0
        self._outstanding: deque[tuple[int, list[ChunkId]]] = deque()
        # Writes built but not posted yet, in batches of up to batch_chunks chunks.
        self._queued: list[_Batch] = []
        self._queued_chunks: set[ChunkId] = set()
        # Registered chunks the window being prepared is about to write: in flight
        # already, so that no unpin (of them or of a partner) happens meanwhile.
        self._to_write: set[ChunkId] = set()
        self._stopped = False
        # Seconds spent registering (pins, round trips, room made for them).
        self._registering_s = 0.0
        # How a window's writes are posted, so that the link stays busy through the
        # control round trips (each of which waits behind the writes posted before
        # it, as a SEND behind WRITEs on one queue pair):
        # - a policy that keeps everything pinned gets large windows, each posted
        #   once the next window's REGISTER REQUEST is on its way ("pipelined");
        # - a policy that unpins gets windows of 64 chunks, or of half its cap when
        #   that is less (the window in flight and the one being registered fill
        #   it): what is in flight is what it cannot choose from. Each window is
        #   posted in thirds: one at once, to be sent while the next window is
        #   scanned and the writes before complete, one during the next UNREGISTER
        #   exchange and the last during the next REGISTER ("interleaved"); each
        #   third covers one wait for the peer's answer.
        self._interleaved = not policy.keeps_everything  # else pipelined
        cap = policy.pin_cap
        self._window_chunks = (self.config.window_chunks if policy.keeps_everything
                               else self.config.batch_chunks)
        if cap is not None:
            self._window_chunks = max(1, min(self._window_chunks, cap // CHUNK_SIZE // 2))
        self._batch_chunks = (max(1, min(self.config.batch_chunks, self._window_chunks // 8))
                              if self._interleaved else self.config.batch_chunks)
        # Batches posted while the current window was being sent (interleaved:
        # batches of the last window posted so far; see _end_window).
        self._flushed = 0
        self._deregistering: list[Future[None]] = []
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rdmamig-unpin")

    # ------------------------------------------------------------ the run

    def run(self) -> SourceResult:
        """Migrate.

        Raises:
            MigrationError: anything failed (the cause is chained and named). Every
                registration is released; the source's memory is untouched and its
                workload runs again.
        """
        try:
            self._migrate()
        except RdmamigError as exc:
            self.session.abort()
            if self._stopped and self.workload is not None:
                self.workload.resume()
            if isinstance(exc, MigrationError):
                raise
            raise MigrationError(f"source failed: {exc}") from exc
        finally:
            self._release_all()
            self.result.pinned_peak_bytes = self.endpoint.pinned_peak_bytes
        return self.result

    def _migrate(self) -> None:
        self.policy.set_block_names(tuple(b.name for b in self.blocks))
        writer = QemuFileWriter(self.session)
        writer.write(stream.MAGIC)
        stream.write_record(writer, stream.Tag.BLOCKS,
                            stream.encode_blocks([(b.name, b.length) for b in self.blocks]))
        writer.flush()
        self._exchange_blocks()

        iteration = 0
        while True:
            for tracker in self.trackers:
                tracker.scan()
            started = time.monotonic()
            before = attrs.evolve(self.result)
            registering_before = self._registering_s
            self._send_dirty()
            self.session.exchange_send(wire.RegisterFinished())
            elapsed = max(time.monotonic() - started, 1e-6)
            self.policy.iteration_ended(iteration=iteration)
            iteration += 1
            bandwidth = max((self.result.bytes_written - before.bytes_written) / elapsed, 1.0)
            for tracker in self.trackers:
                tracker.scan()
            remaining = self._dirty_bytes()
            if self._downtime_estimate(remaining, before=before, elapsed=elapsed,
                                       registering=self._registering_s - registering_before,
                                       ) <= self.config.max_downtime:
                break
            if iteration >= self.config.max_iterations:
                break
            if self.config.auto_converge and self.workload is not None:
                self._auto_converge(dirty_rate=remaining / elapsed, bandwidth=bandwidth)

        stop = time.monotonic()
        if self.workload is not None:
            self.workload.stop()
            self._stopped = True
        for tracker in self.trackers:
            tracker.scan()
        self._send_dirty()
        self.session.exchange_send(wire.RegisterFinished())
        state = self.workload.state() if self.workload is not None else b""
        stream.write_record(writer, stream.Tag.STATE, state)
        stream.write_record(writer, stream.Tag.END)
        writer.flush()
        # The destination's next READY means it has processed END: all is in place.
        self.session.wait_ready()
        done = time.monotonic()
        self.result.iterations = iteration + 1
        self.result.downtime_s = done - stop
        self.result.total_time_s = done - self._start
        if self.endpoint.capabilities & Capability.VERIFY:
            self._verify()

    def _auto_converge(self, *, dirty_rate: float, bandwidth: float) -> None:
        # QEMU's cpu-throttle: start at 20 %, add 10 % while dirtying outpaces half
        # the link, at most 99 %.
        assert self.workload is not None
        if dirty_rate > bandwidth / 2:
            throttle = 0.2 if self.result.throttle == 0 else self.result.throttle + 0.1
            self.result.throttle = min(throttle, 0.99)
            self.workload.throttle(self.result.throttle)

    def _dirty_bytes(self) -> int:
        return sum(block.dirty_pages() for block in self.blocks) * PAGE_SIZE

    def _downtime_estimate(self, remaining: int, *, before: SourceResult, elapsed: float,
                           registering: float) -> float:
        """Seconds the stop-and-copy round would take: ``remaining`` dirty bytes at
        the rate the iteration just ended handled dirty pages (written, inline or
        as COMPRESS), plus, at that iteration's cost per registration, one for every
        dirty chunk that is not pinned and too dirty to go inline – the part a
        capped policy adds, which a bytes-only estimate misses.

        The rate is over the whole iteration: writes go on while registrations are
        answered, so taking their time out overstated it (with a 5 ms target, lru
        stopped after 3 iterations for 20 ms of downtime).
        """
        handled = (self.result.bytes_written - before.bytes_written
                   + (self.result.inline_pages - before.inline_pages
                      + self.result.zero_pages - before.zero_pages) * PAGE_SIZE)
        estimate = remaining / max(handled / elapsed, 1.0)
        registrations = self.result.registrations - before.registrations
        if registrations and not self.pin_all:
            estimate += self._chunks_to_register() * registering / registrations
        return estimate

    def _chunks_to_register(self) -> int:
        count = 0
        for index, block in enumerate(self.blocks):
            dirty = masks.per_chunk(block.dirty_bitmap()).sum(axis=1)
            pinned = np.zeros(len(dirty), dtype=np.bool_)
            pinned[[cid.index for cid in self._pins if cid.block == index]] = True
            count += int(np.count_nonzero((dirty > self._inline_pages) & ~pinned))
        return count

    # ------------------------------------------------------------ RAM blocks

    def _exchange_blocks(self) -> None:
        reply = self.session.exchange_send(wire.RamBlocksRequest(),
                                           reply=wire.Command.RAM_BLOCKS_RESULT)
        assert isinstance(reply, wire.RamBlocksResult)
        theirs = [b.length for b in reply.blocks]
        ours = [b.length for b in self.blocks]
        if theirs != ours:
            raise MigrationError(f"RAM blocks do not match: source lengths {ours}, "
                                 f"destination lengths {theirs}")
        self._remote = list(reply.blocks)
        self._host_addr = [b.remote_host_addr for b in reply.blocks]
        if self.pin_all:
            for block in self.blocks:
                self._local_blocks.append(self._pin_local(block.view, block.length))
                self.result.registrations += 1

    def _pin_local(self, view: memoryview, needed: int) -> MemoryRegion:
        try:
            return self.endpoint.register(buffer=view, remote_write=False)
        except MemlockLimitError:
            # Pressure: give the policy one chance to make room, then give up.
            self.policy.pressure(needed_bytes=needed, pinned_bytes=self.endpoint.pinned_bytes)
            self._make_room(needed, settle=True)
            return self.endpoint.register(buffer=view, remote_write=False)

    def _make_room(self, needed: int, *, settle: bool = False) -> None:
        """Ask the policy what to unpin before pinning ``needed`` more bytes.

        A policy may only choose chunks whose writes completed. If that is not enough
        to stay under its cap (or with ``settle``), the writes in flight complete and
        the policy is asked again. Local deregistrations finish before returning, so
        the kernel's count of locked memory stays under the cap too.
        """
        if not settle:
            self._unpin(self._ask_policy(needed))
        cap = self.policy.pin_cap
        pinned = sum(pin.region.length for pin in set(self._pins.values()))
        if settle or (cap is not None and pinned + needed > cap):
            self._flush_queued()
            while self._outstanding:
                self._complete_oldest()
            self._unpin(self._ask_policy(needed))
        self._settle_deregistrations()

    # ------------------------------------------------------------ one round

    def _send_dirty(self) -> None:
        for index, block in enumerate(self.blocks):
            dirty = block.take_dirty()
            chunks = np.flatnonzero(masks.any_per_chunk(dirty))
            ordered = self._pinned_first(index, chunks.tolist())
            # Windows grow from one batch to window_chunks: the first writes start
            # early, the later windows amortise their round trips.
            size, at = min(self.config.batch_chunks, self._window_chunks), 0
            while at < len(ordered):
                self._send_window(index, block, dirty, ordered[at:at + size])
                at += size
                size = min(2 * size, self._window_chunks)
        self._drain()

    def _pinned_first(self, index: int, chunks: list[int]) -> list[int]:
        """Dirty chunks that are still registered go before those that must be
        registered (each group in address order). Under a cap, the registrations of
        the round then evict chunks this round has already written, not registered
        chunks it is about to write: a hot set larger than the cap keeps the part
        that fits pinned, where an address-order scan would evict each hot chunk
        just before its next write."""
        if self.pin_all or not self._pins:
            return chunks
        pinned = [c for c in chunks if ChunkId(index, c) in self._pins]
        if not pinned:
            return chunks
        taken = set(pinned)
        return pinned + [c for c in chunks if c not in taken]

    def _send_window(self, index: int, block: RamBlock, dirty: BoolArray,
                     window: list[int]) -> None:
        compress: list[wire.CompressRange] = []
        inline_pages: list[wire.InlinePage] = []
        writes: list[tuple[ChunkId, int, int]] = []
        to_register: list[ChunkId] = []
        base = self._remote[index].offset
        for first_chunk, end_chunk in masks.runs_of_consecutive(window):
            first = first_chunk * PAGES_PER_CHUNK
            pages = dirty[first:min(end_chunk * PAGES_PER_CHUNK, block.pages)]
            nonzero = block.nonzero_pages(first, first + len(pages))
            chunks = [ChunkId(index, c) for c in range(first_chunk, end_chunk)]
            registered = np.fromiter((self.pin_all or c in self._pins for c in chunks),
                                     dtype=np.bool_, count=len(chunks))
            plan = masks.plan_span(pages, nonzero, registered, inline_limit=self._inline_pages,
                                   min_compress_run=MIN_COMPRESS_RUN,
                                   fill_gaps_below=FILL_GAPS_BELOW)
            self.result.zero_pages += int(np.count_nonzero(plan.compress))
            for run_start, run_end in masks.runs(plan.compress):
                compress.append(wire.CompressRange(
                    value=0, block_idx=index, offset=base + (first + run_start) * PAGE_SIZE,
                    length=(run_end - run_start) * PAGE_SIZE))
            for page in (np.flatnonzero(plan.inline) + first).tolist():
                start = page * PAGE_SIZE
                inline_pages.append(wire.InlinePage(
                    block_idx=index, offset=base + start,
                    data=bytes(block.view[start:start + PAGE_SIZE])))
            for run_start, run_end in masks.runs(plan.write, period=PAGES_PER_CHUNK):
                cid = chunks[run_start // PAGES_PER_CHUNK]
                writes.append((cid, first + run_start, first + run_end))
            written = plan.writes_chunk
            if not self.pin_all:
                for at in np.flatnonzero(registered & written).tolist():
                    # A pinned chunk written again: in flight until chunk_written.
                    self._to_write.add(chunks[at])
                    self.policy.chunk_dirtied(chunk=chunks[at])
            to_register += [chunks[at] for at in np.flatnonzero(~registered & written).tolist()]
        if to_register:
            if self._interleaved:
                # What the policy may choose from: the windows before the last one.
                # (Waiting for writes, this is not timed as registering.)
                self._complete_earlier_windows()
            self._register(to_register)  # posts the window before while the peer pins
        self._flush_queued()
        if compress:
            for part in self._batches(compress):
                self.session.exchange_send(wire.Compress(entries=tuple(part)))
        for at in range(0, len(inline_pages), wire.MAX_PAGES):
            self.session.exchange_send(wire.Pages(entries=tuple(
                inline_pages[at:at + wire.MAX_PAGES])))
        self.result.inline_pages += len(inline_pages)
        for cid, first_page, end_page in writes:
            self._queue_write(cid, block, first_page * PAGE_SIZE, end_page * PAGE_SIZE)
        self._to_write.clear()
        self._end_window()

    def _batches(self, entries: Sequence[_T]) -> Iterator[Sequence[_T]]:
        """``entries`` split into array messages: up to 4096 each when BATCH was
        negotiated, else one each (as QEMU sends them)."""
        step = wire.MAX_REPEAT if self.batch else 1
        for at in range(0, len(entries), step):
            yield entries[at:at + step]

    # ------------------------------------------------------------ registration

    def _chunk_bytes(self, cid: ChunkId) -> int:
        return min(CHUNK_SIZE, self.blocks[cid.block].length - cid.index * CHUNK_SIZE)

    def _units(self, chunks: list[ChunkId]) -> list[tuple[int, int, int]]:
        """(block, first chunk, count) to register. With an rdmamig peer (BATCH), an
        even chunk and the next one are registered together: 2 MiB, aligned, so
        pinning keeps the memory's transparent huge pages whole (a 1 MiB mlock
        splits them, and costs 25x more) and writes merge over both."""
        wanted = set(chunks)
        units = []
        for cid in sorted(wanted):
            partner = ChunkId(cid.block, cid.index + 1)
            if self.batch and cid.index % 2 == 0 and partner in wanted:
                units.append((cid.block, cid.index, 2))
                wanted.discard(partner)
            elif cid in wanted:
                units.append((cid.block, cid.index, 1))
        return units

    def _register(self, chunks: list[ChunkId]) -> None:
        started = time.monotonic()
        try:
            self._register_chunks(chunks)
        finally:
            self._registering_s += time.monotonic() - started

    def _register_chunks(self, chunks: list[ChunkId]) -> None:
        units = self._units(chunks)
        self._make_room(sum(self._chunk_bytes(c) for c in chunks))
        regions: list[MemoryRegion] = []
        try:
            for block_index, first, count in units:
                block = self.blocks[block_index]
                start = first * CHUNK_SIZE
                end = min(start + count * CHUNK_SIZE, block.length)
                regions.append(self._pin_local(block.view[start:end], end - start))
            self._bind(list(zip(units, regions, strict=True)))
        except BaseException:
            # Whatever the peer has not keyed yet is ours alone to release.
            bound = {pin.region for pin in self._pins.values()}
            for region in regions:
                if region not in bound:
                    with contextlib.suppress(RdmamigError):
                        self.endpoint.deregister(region=region)
            raise

    def _bind(self, units: list[tuple[tuple[int, int, int], MemoryRegion]]) -> None:
        """Ask the peer to register ``units`` (already pinned here) and record them."""
        for part in self._batches(units):
            # The queued writes of the window before go out once the request is on
            # its way: it is not ordered behind them, and they keep the link busy
            # while the peer pins.
            reply = self.session.exchange_send(wire.RegisterRequest(entries=tuple(
                wire.Register(key=self._remote[b].offset + first * CHUNK_SIZE,
                              current_index=b, chunks=count)
                for (b, first, count), _region in part)), reply=wire.Command.REGISTER_RESULT,
                meanwhile=self._flush_queued)
            assert isinstance(reply, wire.RegisterResult)
            if len(reply.entries) != len(part):
                raise MigrationError(f"REGISTER RESULT has {len(reply.entries)} keys for "
                                     f"{len(part)} requested registrations")
            for ((block_index, first, count), region), key in zip(part, reply.entries,
                                                                   strict=True):
                pin = _Pin(block=block_index, first=first, count=count, region=region,
                           rkey=key.rkey)
                self._host_addr[block_index] = key.host_addr
                for cid in pin.chunks():
                    self._pins[cid] = pin
                    self._pinned_sizes[cid] = self._chunk_bytes(cid)
                    self.result.registrations += 1
                    if cid in self._ever_unpinned:
                        self.result.reregistrations += 1
                    self.policy.chunk_registered(chunk=cid, nbytes=self._chunk_bytes(cid))

    def _in_flight(self, cid: ChunkId) -> bool:
        return (self._last_ticket.get(cid, 0) > self._completed_ticket
                or cid in self._queued_chunks or cid in self._to_write)

    def _ask_policy(self, needed: int) -> list[ChunkId]:
        pinned: Mapping[ChunkId, int] = self._pinned_view
        if self.policy.pin_cap is not None:
            # A chunk registered together with a chunk in flight cannot go yet: a
            # capped policy sees it as part of what must fit, not as a candidate, so
            # that it picks others and the cap holds.
            tied = {cid for cid in self._pinned_sizes
                    if any(self._in_flight(c) for c in self._pins[cid].chunks())}
            if tied:
                needed += sum(self._pinned_sizes[cid] for cid in tied)
                pinned = {cid: size for cid, size in self._pinned_sizes.items()
                          if cid not in tied}
        try:
            chosen = list(self.policy.select_unpin(pinned=pinned, needed_bytes=needed))
        except Exception as exc:
            raise MigrationError(f"unpin policy {self.policy.name!r} failed: "
                                 f"{type(exc).__name__}: {exc}") from exc
        for cid in chosen:
            if cid not in self._pins:
                raise MigrationError(f"unpin policy {self.policy.name!r} asked to unpin "
                                     f"chunk {cid.index} of block {cid.block}, which is not "
                                     f"pinned")
            if self._in_flight(cid):
                raise MigrationError(f"unpin policy {self.policy.name!r} asked to unpin "
                                     f"chunk {cid.index} of block {cid.block}, which has a "
                                     f"write in flight; refused")
        return chosen

    def _unpin(self, chunks: Iterable[ChunkId]) -> None:
        # A chunk goes with its whole registration; one whose partner still has a
        # write in flight stays until a later decision.
        pins = [pin for pin in dict.fromkeys(self._pins[cid] for cid in chunks)
                if not any(self._in_flight(cid) for cid in pin.chunks())]
        if not pins:
            return
        if self.config.async_unregister:
            # Our side goes to the worker first, so that it unpins while the peer
            # handles the (batched) request.
            for pin in pins:
                self._deregistering.append(self._worker.submit(
                    self.endpoint.deregister, region=pin.region))
            requests = list(self._batches(pins))
        else:
            requests = [[pin] for pin in pins]
        for part in requests:
            self.session.exchange_send(wire.UnregisterRequest(entries=tuple(
                wire.Register(key=pin.first, current_index=pin.block, chunks=pin.count)
                for pin in part)), reply=wire.Command.UNREGISTER_FINISHED,
                meanwhile=self._flush_half if self._interleaved else None)
            for pin in part:
                if not self.config.async_unregister:
                    self.endpoint.deregister(region=pin.region)
                for cid in pin.chunks():
                    del self._pins[cid]
                    del self._pinned_sizes[cid]
                    self._ever_unpinned.add(cid)
                    self.result.unregistrations += 1
                    self.policy.chunk_unpinned(chunk=cid)

    def _settle_deregistrations(self) -> None:
        """Wait for the worker's local deregistrations (raising what they raised)."""
        while self._deregistering:
            self._deregistering.pop(0).result()

    # ------------------------------------------------------------ writes

    def _queue_write(self, cid: ChunkId, block: RamBlock, start: int, end: int) -> None:
        if self.pin_all:
            region, local_offset = self._local_blocks[cid.block], start
            rkey = self._remote[cid.block].remote_rkey
        else:
            pin = self._pins[cid]
            region, local_offset = pin.region, start - pin.first * CHUNK_SIZE
            rkey = pin.rkey
        remote_addr = self._host_addr[cid.block] + start
        self.result.bytes_written += end - start
        batch = self._queued[-1] if self._queued else None
        if batch is None or (batch.chunks[-1] != cid
                             and len(batch.chunks) == self._batch_chunks):
            batch = _Batch()
            self._queued.append(batch)
        if not batch.chunks or batch.chunks[-1] != cid:
            batch.chunks.append(cid)
            self._queued_chunks.add(cid)
        last = batch.writes[-1] if batch.writes else None
        if (last is not None and last.region == region and last.rkey == rkey
                and last.offset + last.length == local_offset
                and last.remote_addr + last.length == remote_addr
                and last.length + (end - start) <= MAX_WRITE):
            last.length += end - start
            return
        batch.writes.append(_Pending(region, local_offset, end - start, remote_addr, rkey))

    def _flush_half(self) -> None:
        """Post the first half of the queued batches (rounded up)."""
        self._flush_queued(limit=-(-len(self._queued) // 2))

    def _flush_queued(self, limit: int | None = None) -> None:
        """Post the queued batches (the first ``limit`` of them), the last write of
        each signalled."""
        if not self._queued:
            return
        posting, self._queued = self._queued[:limit], self._queued[limit or len(self._queued):]
        for batch in posting:
            ticket = self.endpoint.post_writes(writes=[
                RemoteWrite(region=p.region, offset=p.offset, length=p.length,
                            remote_addr=p.remote_addr, rkey=p.rkey) for p in batch.writes])
            for cid in batch.chunks:
                self._last_ticket[cid] = ticket
            self._outstanding.append((ticket, batch.chunks))
            self._flushed += 1
        self._queued_chunks = {cid for batch in self._queued for cid in batch.chunks}
        self._progress()

    def _end_window(self) -> None:
        """Post a third of the window's writes (interleaved) or none (pipelined),
        and let the policy unpin.

        Pipelined, one window stays in flight: the writes of the windows before
        complete here. Interleaved, two do, and the wait for the one before comes
        before the next registration, so that the next window is scanned first;
        ``_flushed`` then counts the batches of this window posted so far.
        """
        if self._interleaved:
            # Every write of the window before is posted by now. Waiting here for
            # those before it is a no-op when a registration has waited already;
            # in a run of windows that register nothing, it keeps what is in
            # flight to two windows (a send queue has a depth).
            self._complete_earlier_windows()
            self._flushed = 0
            self._flush_queued(limit=-(-len(self._queued) // 3))
        if not self._flushed:
            self._progress()  # nothing posted in this step: sample anyway
        if not self._interleaved:
            self._complete_earlier_windows()
            self._flushed = 0
        if not self.pin_all:
            self._unpin(self._ask_policy(0))

    def _complete_earlier_windows(self) -> None:
        """Wait for every posted batch but the ``_flushed`` latest: the writes of the
        windows before the last one (interleaved) or before this one (pipelined)."""
        while len(self._outstanding) > self._flushed:
            self._complete_oldest()

    def _complete_oldest(self) -> None:
        ticket, chunks = self._outstanding.popleft()
        self.endpoint.wait_writes(ticket=ticket, timeout=self.config.timeout)
        self._completed_ticket = ticket
        for cid in chunks:
            self.policy.chunk_written(chunk=cid)

    def _drain(self) -> None:
        """End of a round: every write completes, then the policy has its say on the
        chunks those completions freed."""
        self._flush_queued()
        while self._outstanding:
            self._complete_oldest()
        self._flushed = 0
        if not self.pin_all:
            self._unpin(self._ask_policy(0))

    def _progress(self) -> None:
        locked = locked_bytes()
        self.result.locked_peak_bytes = max(self.result.locked_peak_bytes, locked)
        sample = {"t": time.monotonic() - self._start,
                  "locked_bytes": float(locked),
                  "bytes_written": float(self.result.bytes_written),
                  "dirty_bytes": float(self._dirty_bytes()),
                  "pinned_bytes": float(self.endpoint.pinned_bytes),
                  "zero_pages": float(self.result.zero_pages)}
        self.result.timeline.append(sample)
        if self.on_progress is not None:
            self.on_progress(sample)

    # ------------------------------------------------------------ the end

    def _verify(self) -> None:
        started = time.monotonic()
        hashes = tuple(wire.BlockHash(block_idx=i, digest=b.digest())
                       for i, b in enumerate(self.blocks))
        # The READY that ended the downtime is still ours to use.
        reply = self.session.send_request(wire.BlockHashes(entries=hashes),
                                          reply=wire.Command.VERIFY_RESULT)
        assert isinstance(reply, wire.VerifyResult)
        self.result.verify_time_s = time.monotonic() - started
        if reply.mismatched or reply.matched != len(self.blocks):
            raise VerificationError(f"destination reports {reply.mismatched} of "
                                    f"{len(self.blocks)} block(s) differ after transfer")
        self.result.verified = True

    def _release_all(self) -> None:
        self._worker.shutdown(wait=True)
        for future in self._deregistering:
            with contextlib.suppress(RdmamigError):
                future.result()
        self._deregistering.clear()
        regions = [pin.region for pin in set(self._pins.values())] + self._local_blocks
        for region in regions:
            with contextlib.suppress(RdmamigError):
                self.endpoint.deregister(region=region)
        self._pins.clear()
        self._pinned_sizes.clear()
        self._local_blocks.clear()
