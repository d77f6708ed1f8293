"""The source of a migration: QEMU's pre-copy over any backend.

A bulk round sends every page; dirty-page iterations follow while the workload
runs; when the remaining dirty bytes fit in ``max_downtime`` at the measured
bandwidth (or after ``max_iterations``), the workload stops and the last pages, the
state stream and END go out. Zero pages travel as COMPRESS; the others as one-sided
writes merged over contiguous pages. Pages are scanned and registered a window at a
time while the window before is written (:mod:`.pipeline` says how windows are
posted); :mod:`.pins` keeps the registrations and what may not be unpinned;
:mod:`.convergence` decides when to stop. With an rdmamig peer, two neighbouring
chunks are registered as one 2 MiB region. Which chunks to unpin is the unpin
policy's call.

The source only reads its memory: a failed migration leaves it as it was, and the
workload keeps running.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import attrs
import numpy as np

from .. import wire
from ..auth import PreSharedKey, authenticate_source
from ..caps import Capability
from ..control import Role
from ..errors import (
    AuthenticationError,
    MemlockLimitError,
    MigrationCancelledError,
    MigrationError,
    RdmamigError,
    VerificationError,
)
from ..memory import PAGE_SIZE, PAGES_PER_CHUNK, BoolArray, ChecksumTracker, RamBlock
from ..pinning import locked_bytes
from ..policy import ChunkId, UnpinPolicy
from ..session import ControlSession, QemuFileWriter
from ..status import Monitor, Status
from ..transport import Endpoint, MemoryRegion
from ..wire import CHUNK_SIZE
from . import convergence
from . import pages as masks
from .config import SourceConfig, SourceResult, Workload
from .outgoing import NativeStream, OutgoingStream
from .pins import Pin, PinTable, registration_units
from .pipeline import WritePipeline, posting_mode

_T = TypeVar("_T")
log = logging.getLogger("rdmamig.source")

#: Dirty zero pages in a chunk with data go as COMPRESS only in runs of this many.
MIN_COMPRESS_RUN = 16
#: Gaps of fewer clean pages than this between the pages a chunk writes are written
#: too: one more write costs more than copying them (benchmarks/README.md).
FILL_GAPS_BELOW = 4


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
        stream: what goes into the QEMU FILE stream around the rounds (rdmamig's
            own records by default; :class:`.outgoing.QemuStream` for a QEMU
            destination).
        key: the pre-shared key; the destination must prove it (Capability.AUTH).
        monitor: hears the status, passes and figures, and may cancel the migration
            or change its downtime limit and bandwidth as it runs (:mod:`rdmamig.status`).
    """

    def __init__(self, endpoint: Endpoint, blocks: Sequence[RamBlock], *,
                 policy: UnpinPolicy, config: SourceConfig | None = None,
                 workload: Workload | None = None, trackers: Sequence[ChecksumTracker] = (),
                 on_progress: Callable[[dict[str, float]], None] | None = None,
                 started_at: float | None = None,
                 stream: OutgoingStream | None = None,
                 key: PreSharedKey | None = None, monitor: Monitor | None = None) -> None:
        self.endpoint = endpoint
        self.stream = stream or NativeStream()
        self.key = key
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
        #: Array messages carry many entries only when the peer negotiated BATCH.
        self.batch = bool(caps & Capability.BATCH)
        self._inline_pages = (self.config.inline_pages if caps & Capability.INLINE
                              and not self.pin_all else 0)
        self.result = SourceResult(capabilities=int(caps), peer=self.stream.peer)
        self.monitor = monitor or Monitor(total_bytes=sum(b.length for b in self.blocks),
                                          max_downtime=self.config.max_downtime,
                                          max_bandwidth=self.config.max_bandwidth)
        self._paced: tuple[float, int, int] | None = None  # (when, bytes, limit)
        self._start = started_at if started_at is not None else time.monotonic()
        self._remote: list[wire.DestBlock] = []
        self._host_addr: list[int] = []
        self._local_blocks: list[MemoryRegion] = []  # PIN_ALL: one region per block
        self._stopped = False
        # Seconds spent registering (pins, round trips, room made for them).
        self._registering_s = 0.0
        self.pins = PinTable(self._chunk_bytes)
        self._mode = posting_mode(policy, window_chunks=self.config.window_chunks,
                                  batch_chunks=self.config.batch_chunks)
        self.pipeline = WritePipeline(endpoint, self.pins, batch_chunks=self._mode.batch_chunks,
                                      timeout=self.config.timeout,
                                      on_written=self._written, on_progress=self._progress)
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
        error: RdmamigError | None = None
        try:
            self._migrate()
        except RdmamigError as exc:
            error = exc
            self.session.abort(str(exc))
            if self._stopped and self.workload is not None:
                self.workload.resume()
            if isinstance(exc, MigrationError):
                raise
            raise MigrationError(f"source failed: {exc}") from exc
        finally:
            # Released before the final status: a watcher that sees it sees nothing
            # pinned.
            self._release_all()
            self.result.pinned_peak_bytes = self.endpoint.pinned_peak_bytes
            self.result.peer_pinned_peak_bytes = (
                sum(b.length for b in self.blocks) if self.pin_all and self._remote
                else self.pins.peak_bytes)
            if error is not None:
                self.result.total_time_s = time.monotonic() - self._start
                cancelled = isinstance(error, MigrationCancelledError)
                self._end(Status.CANCELLED if cancelled else Status.FAILED, str(error))
        self.monitor.update(downtime_s=self.result.downtime_s)
        self._end(Status.COMPLETED)
        return self.result

    def _end(self, status: Status, error: str | None = None) -> None:
        self.monitor.update(pinned_bytes=self.endpoint.pinned_bytes, locked_bytes=locked_bytes())
        self.monitor.set_status(status, error)

    def _new_pass(self, number: int, previous_round_s: float) -> float:
        """Pass ``number`` begins: its event, with the dirty rate the pages now dirty
        make over the last round; the time it began."""
        self.monitor.new_pass(number, dirty_pages_rate=(
            self._dirty_bytes() / PAGE_SIZE / previous_round_s if previous_round_s else 0.0))
        started = time.monotonic()
        self.result.pass_starts.append(started - self._start)
        return started

    def _migrate(self) -> None:
        if self.key is not None:
            if not self.endpoint.capabilities & Capability.AUTH:
                raise AuthenticationError("the destination does not authenticate (it has "
                                          "no key, or is QEMU, which cannot)")
            authenticate_source(self.session, self.key)
        self.policy.set_block_names(tuple(b.name for b in self.blocks))
        writer = QemuFileWriter(self.session)
        self.stream.start(writer, self.blocks)
        self._exchange_blocks()
        self.stream.after_blocks(writer, self.session)
        self.monitor.set_status(Status.ACTIVE)

        iteration, round_s = 0, 0.0
        while True:
            self._check_cancel()
            for tracker in self.trackers:
                tracker.scan()
            started = self._new_pass(iteration + 1, round_s)
            before = attrs.evolve(self.result)
            registering_before = self._registering_s
            self.stream.begin_round(writer, last=False)
            self._send_dirty()
            self.session.exchange_send(wire.RegisterFinished())
            self.stream.end_round(writer, last=False)
            self.policy.iteration_ended(iteration=iteration)
            iteration += 1
            round_ = convergence.RoundCounters(
                written_bytes=self.result.bytes_written - before.bytes_written,
                inline_pages=self.result.inline_pages - before.inline_pages,
                zero_pages=self.result.zero_pages - before.zero_pages,
                registrations=self.result.registrations - before.registrations,
                registering_s=self._registering_s - registering_before,
                elapsed_s=max(time.monotonic() - started, 1e-6))
            for tracker in self.trackers:
                tracker.scan()
            remaining = self._dirty_bytes()
            round_s = round_.elapsed_s
            expected = self.downtime_estimate(remaining, round_)
            self.monitor.update(expected_downtime_s=expected, remaining=remaining)
            if expected <= self.monitor.max_downtime:
                break
            if iteration >= self.config.max_iterations:
                break
            if self.config.auto_converge and self.workload is not None:
                throttle = convergence.next_throttle(
                    self.result.throttle, dirty_rate=remaining / round_.elapsed_s,
                    bandwidth=max(round_.written_bytes / round_.elapsed_s, 1.0))
                if throttle != self.result.throttle:
                    self.result.throttle = throttle
                    self.workload.throttle(throttle)

        self._check_cancel()
        stop = time.monotonic()
        self.monitor.set_status(Status.DEVICE)
        if self.workload is not None:
            self.workload.stop()
            self._stopped = True
        for tracker in self.trackers:
            tracker.scan()
        self._new_pass(iteration + 1, round_s)
        self.result.stopped_at_s = stop - self._start
        self.stream.begin_round(writer, last=True)
        self._send_dirty()
        self.session.exchange_send(wire.RegisterFinished())
        self.stream.end_round(writer, last=True)
        self.stream.finish(writer, self.workload.state() if self.workload is not None else b"")
        if self.stream.final_ready or self.endpoint.capabilities & Capability.VERIFY:
            # The destination's next READY means it has processed the end: all is in
            # place (a QEMU destination sends none: it offers no verification either).
            self.session.wait_ready()
        done = time.monotonic()
        self.result.iterations = iteration + 1
        self.result.downtime_s = done - stop
        self.result.total_time_s = done - self._start
        if self.result.downtime_s > self.monitor.max_downtime:
            log.warning("downtime %.0f ms missed the %.0f ms limit: %s", 1000 *
                        self.result.downtime_s, 1000 * self.monitor.max_downtime,
                        f"stopped after the most passes ({self.config.max_iterations})"
                        if iteration >= self.config.max_iterations else
                        f"the last pass's estimate was {1000 * expected:.0f} ms, the link "
                        f"or the registrations were slower when stopped")
        if self.endpoint.capabilities & Capability.VERIFY:
            self._verify()
        if self.endpoint.capabilities & Capability.COMMIT:
            self._commit()

    def downtime_estimate(self, remaining: int, round_: convergence.RoundCounters) -> float:
        """Seconds a stop-and-copy round would take now, after ``round_``, with
        ``remaining`` dirty bytes (:func:`.convergence.downtime_estimate`)."""
        to_register = 0 if self.pin_all else self._chunks_to_register()
        return convergence.downtime_estimate(remaining, round_, chunks_to_register=to_register)

    def _dirty_bytes(self) -> int:
        return sum(block.dirty_pages() for block in self.blocks) * PAGE_SIZE

    def _chunks_to_register(self) -> int:
        pinned = [[cid.index for cid in self.pins.chunks() if cid.block == index]
                  for index in range(len(self.blocks))]
        return sum(convergence.chunks_to_register(
            masks.per_chunk(block.dirty_bitmap()).sum(axis=1), np.isin(
                np.arange(block.chunks), indices), inline_limit=self._inline_pages)
            for block, indices in zip(self.blocks, pinned, strict=True))

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
        if settle or (cap is not None and self.pins.pinned_bytes + needed > cap):
            self.pipeline.complete_all()
            self._unpin(self._ask_policy(needed))
        self._settle_deregistrations()

    # ------------------------------------------------------------ one round

    def _check_cancel(self) -> None:
        if self.monitor.cancel_requested.is_set():
            raise MigrationCancelledError("migration cancelled (migrate_cancel)")

    def _send_dirty(self) -> None:
        for index, block in enumerate(self.blocks):
            dirty = block.take_dirty()
            chunks = np.flatnonzero(masks.any_per_chunk(dirty))
            ordered = (chunks.tolist() if self.pin_all
                       else self.pins.pinned_first(index, chunks.tolist()))
            # Windows grow from one batch to the mode's window: the first writes
            # start early, the later windows amortise their round trips.
            window = self._mode.window_chunks
            size, at = min(self.config.batch_chunks, window), 0
            while at < len(ordered):
                self._check_cancel()
                self._send_window(index, block, dirty, ordered[at:at + size])
                at += size
                size = min(2 * size, window)
        self.pipeline.drain()
        if not self.pin_all:
            self._unpin(self._ask_policy(0))

    def _send_window(self, index: int, block: RamBlock, dirty: BoolArray,
                     window: list[int]) -> None:
        compress: list[wire.CompressRange] = []
        inline_pages: list[wire.InlinePage] = []
        writes: list[tuple[ChunkId, int, int]] = []
        to_register: list[ChunkId] = []
        # Registered chunks this window is about to write: held, so that no unpin
        # (of them or of a partner) happens before their writes are queued.
        rewritten: list[ChunkId] = []
        base = self._remote[index].offset
        for first_chunk, end_chunk in masks.runs_of_consecutive(window):
            first = first_chunk * PAGES_PER_CHUNK
            pages = dirty[first:min(end_chunk * PAGES_PER_CHUNK, block.pages)]
            nonzero = block.nonzero_pages(first, first + len(pages))
            chunks = [ChunkId(index, c) for c in range(first_chunk, end_chunk)]
            registered = np.fromiter((self.pin_all or c in self.pins for c in chunks),
                                     dtype=np.bool_, count=len(chunks))
            plan = masks.plan_span(pages, nonzero, registered, inline_limit=self._inline_pages,
                                   min_compress_run=MIN_COMPRESS_RUN,
                                   fill_gaps_below=FILL_GAPS_BELOW)
            self.result.zero_pages += int(np.count_nonzero(plan.compress))
            self.result.duplicate_pages += int(np.count_nonzero(pages & ~nonzero))
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
                    self.pins.hold(chunks[at])
                    rewritten.append(chunks[at])
                    self.policy.chunk_dirtied(chunk=chunks[at])
            to_register += [chunks[at] for at in np.flatnonzero(~registered & written).tolist()]
        if to_register:
            self._mode.before_register(self.pipeline)
            self._register(to_register)  # posts the window before while the peer pins
        self.pipeline.post()
        if compress:
            for part in self._batches(compress):
                self.session.exchange_send(wire.Compress(entries=tuple(part)))
        for at in range(0, len(inline_pages), wire.MAX_PAGES):
            self.session.exchange_send(wire.Pages(entries=tuple(
                inline_pages[at:at + wire.MAX_PAGES])))
        self.result.inline_pages += len(inline_pages)
        for cid, first_page, end_page in writes:
            self._queue_write(cid, first_page * PAGE_SIZE, end_page * PAGE_SIZE)
        for cid in rewritten:
            self.pins.release(cid)
        self._mode.end_window(self.pipeline)
        if not self.pin_all:
            self._unpin(self._ask_policy(0))

    def _batches(self, entries: Sequence[_T]) -> Iterator[Sequence[_T]]:
        """``entries`` split into array messages: up to 4096 each when BATCH was
        negotiated, else one each (as QEMU sends them)."""
        step = wire.MAX_REPEAT if self.batch else 1
        for at in range(0, len(entries), step):
            yield entries[at:at + step]

    # ------------------------------------------------------------ registration

    def _chunk_bytes(self, cid: ChunkId) -> int:
        return min(CHUNK_SIZE, self.blocks[cid.block].length - cid.index * CHUNK_SIZE)

    def _register(self, chunks: list[ChunkId]) -> None:
        started = time.monotonic()
        try:
            self._register_chunks(chunks)
        finally:
            self._registering_s += time.monotonic() - started

    def _register_chunks(self, chunks: list[ChunkId]) -> None:
        units = registration_units(chunks, pairs=self.batch)
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
            bound = {pin.region for pin in self.pins.registrations()}
            for region in regions:
                if region not in bound:
                    with contextlib.suppress(RdmamigError):
                        self.endpoint.deregister(region=region)
            raise

    def _bind(self, units: list[tuple[tuple[int, int, int], MemoryRegion]]) -> None:
        """Ask the peer to register ``units`` (already pinned here) and record them."""
        for part in self._batches(units):
            self.session.wait_ready()
            self.session.send(wire.RegisterRequest(entries=tuple(
                wire.Register.covering(key=self._remote[b].offset + first * CHUNK_SIZE,
                                       current_index=b, count=count)
                for (b, first, count), _region in part)))
            # The queued writes of the window before go out once the request is on
            # its way: it is not ordered behind them, and they keep the link busy
            # while the peer pins.
            self.pipeline.post()
            reply = self.session.recv_reply(wire.Command.REGISTER_RESULT)
            assert isinstance(reply, wire.RegisterResult)
            if len(reply.entries) != len(part):
                raise MigrationError(f"REGISTER RESULT has {len(reply.entries)} keys for "
                                     f"{len(part)} requested registrations")
            for ((block_index, first, count), region), key in zip(part, reply.entries,
                                                                   strict=True):
                self._host_addr[block_index] = key.host_addr
                pin = Pin(block=block_index, first=first, count=count, region=region,
                          rkey=key.rkey)
                for cid, nbytes, again in self.pins.add(pin):
                    self.result.registrations += 1
                    self.result.reregistrations += again
                    self.policy.chunk_registered(chunk=cid, nbytes=nbytes)

    def _ask_policy(self, needed: int) -> list[ChunkId]:
        pinned: Mapping[ChunkId, int] = self.pins.sizes
        if self.policy.pin_cap is not None:
            # A chunk registered together with a held chunk cannot go yet: a capped
            # policy sees it as part of what must fit, not as a candidate, so that
            # it picks others and the cap holds.
            pinned, tied_bytes = self.pins.candidates()
            needed += tied_bytes
        try:
            chosen = list(self.policy.select_unpin(pinned=pinned, needed_bytes=needed))
        except Exception as exc:
            raise MigrationError(f"unpin policy {self.policy.name!r} failed: "
                                 f"{type(exc).__name__}: {exc}") from exc
        for cid in chosen:
            if cid not in self.pins:
                raise MigrationError(f"unpin policy {self.policy.name!r} asked to unpin "
                                     f"chunk {cid.index} of block {cid.block}, which is not "
                                     f"pinned")
            if self.pins.held(cid):
                raise MigrationError(f"unpin policy {self.policy.name!r} asked to unpin "
                                     f"chunk {cid.index} of block {cid.block}, which has a "
                                     f"write in flight; refused")
        return chosen

    def _unpin(self, chunks: Iterable[ChunkId]) -> None:
        pins = self.pins.unpinnable(chunks)
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
            self.session.wait_ready()
            self.session.send(wire.UnregisterRequest(entries=tuple(
                wire.Register.covering(key=pin.first, current_index=pin.block,
                                       count=pin.count)
                for pin in part)))
            self._mode.after_unregister_sent(self.pipeline)
            self.session.recv_reply(wire.Command.UNREGISTER_FINISHED)
            for pin in part:
                if not self.config.async_unregister:
                    self.endpoint.deregister(region=pin.region)
                for cid in self.pins.remove(pin):
                    self.result.unregistrations += 1
                    self.policy.chunk_unpinned(chunk=cid)

    def _settle_deregistrations(self) -> None:
        """Wait for the worker's local deregistrations (raising what they raised)."""
        while self._deregistering:
            self._deregistering.pop(0).result()

    # ------------------------------------------------------------ writes

    def _queue_write(self, cid: ChunkId, start: int, end: int) -> None:
        if self.pin_all:
            region, local_offset = self._local_blocks[cid.block], start
            rkey = self._remote[cid.block].remote_rkey
        else:
            pin = self.pins[cid]
            region, local_offset = pin.region, start - pin.first * CHUNK_SIZE
            rkey = pin.rkey
        self.result.bytes_written += end - start
        self.pipeline.queue(cid, region=region, offset=local_offset, length=end - start,
                            remote_addr=self._host_addr[cid.block] + start, rkey=rkey)

    def _written(self, cid: ChunkId) -> None:
        self.policy.chunk_written(chunk=cid)

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
        self.monitor.update(pinned_bytes=sample["pinned_bytes"], locked_bytes=locked,
                            transferred=self.result.bytes_written
                            + self.result.inline_pages * PAGE_SIZE,
                            remaining=sample["dirty_bytes"],
                            duplicate=self.result.duplicate_pages,
                            normal=self.result.bytes_written // PAGE_SIZE
                            + self.result.inline_pages)
        if self.on_progress is not None:
            self.on_progress(sample)
        self._pace()

    def _pace(self) -> None:
        """Keep the writes' average at ``max-bandwidth`` (it may change meanwhile:
        pacing starts over from each change)."""
        limit = self.monitor.max_bandwidth
        if limit is None:
            self._paced = None
            return
        now, written = time.monotonic(), self.result.bytes_written
        if self._paced is None or self._paced[2] != limit:
            self._paced = (now, written, limit)
            return
        ahead = (written - self._paced[1]) / limit - (now - self._paced[0])
        if ahead > 0:
            time.sleep(min(ahead, 1.0))

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

    def _commit(self) -> None:
        """Wait until the destination has kept the migration: only then is it done."""
        reply = self.session.exchange_send(wire.Commit(), reply=wire.Command.COMMIT_RESULT)
        assert isinstance(reply, wire.CommitResult)
        if not reply.committed:
            raise MigrationError(f"the destination could not keep the migration: "
                                 f"{reply.reason!r}")
        self.result.committed = True

    def _release_all(self) -> None:
        self._worker.shutdown(wait=True)
        for future in self._deregistering:
            with contextlib.suppress(RdmamigError):
                future.result()
        self._deregistering.clear()
        for region in self.pins.clear() + self._local_blocks:
            with contextlib.suppress(RdmamigError):
                self.endpoint.deregister(region=region)
        self._local_blocks.clear()
