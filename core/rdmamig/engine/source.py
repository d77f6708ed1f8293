"""The source of a migration: QEMU's pre-copy over any backend.

A bulk round sends every page; dirty-page iterations follow while the workload
runs; when the remaining dirty bytes fit in ``max_downtime`` at the measured
bandwidth (or after ``max_iterations``), the workload stops and the last pages, the
state stream and END go out. Zero pages travel as COMPRESS; the others as one-sided
writes merged over contiguous pages. Pages are scanned and registered a window at a
time while the window before is written (:mod:`.pipeline` says how windows are
posted); :mod:`.registrar` pins and unpins (chunk by chunk, or whole blocks with
PIN_ALL), asking the unpin policy; :mod:`.meter` samples progress and paces the
writes; :mod:`.convergence` decides when to stop. This module is the pass loop,
the page plan of each window, and the end: verification and COMMIT.

The source only reads its memory: a failed migration leaves it as it was, and the
workload keeps running.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import attrs
import numpy as np

from .. import wire
from ..auth import PreSharedKey, authenticate_source
from ..caps import Capability
from ..control import Role
from ..errors import (
    AuthenticationError,
    MigrationCancelledError,
    MigrationError,
    RdmamigError,
    VerificationError,
)
from ..memory import (
    PAGE_SIZE,
    PAGES_PER_CHUNK,
    BoolArray,
    RamBlock,
    blocks_text,
)
from ..pinning import locked_bytes
from ..policy import ChunkId, UnpinPolicy
from ..session import ControlSession, QemuFileWriter
from ..status import Monitor, Status, capability_names
from ..tracking import DirtyTracker
from ..transport import Endpoint
from ..units import size_text
from . import convergence
from . import pages as masks
from .config import SourceConfig, SourceResult, Workload
from .meter import Meter
from .outgoing import NativeStream, OutgoingStream
from .pins import PinTable
from .pipeline import WritePipeline, posting_mode
from .registrar import PerChunk, Registrar, WholeBlocks, batches
from .verify import SentChunks

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
        trackers: what finds the pages of memory rdmamig does not write itself
            (:mod:`rdmamig.tracking`), scanned around each round.
        on_progress: called after every batch with the latest timeline sample.
        started_at: ``time.monotonic()`` when the migration started (connect).
        stream: what goes into the QEMU FILE stream around the rounds (rdmamig's
            own records by default; :class:`.outgoing.QemuStream` for a QEMU
            destination).
        key: the pre-shared key; the destination must prove it (Capability.AUTH).
        monitor: hears the status, passes and figures; its ``parameters`` (the
            downtime limit, the bandwidth, a cancel) may change as it runs
            (:mod:`rdmamig.status`).
    """

    def __init__(self, endpoint: Endpoint, blocks: Sequence[RamBlock], *,
                 policy: UnpinPolicy, config: SourceConfig | None = None,
                 workload: Workload | None = None, trackers: Sequence[DirtyTracker] = (),
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
        self._start = started_at if started_at is not None else time.monotonic()
        self._stopped = False
        self.meter = Meter(blocks=self.blocks, endpoint=endpoint, result=self.result,
                           monitor=self.monitor, started=self._start, on_progress=on_progress)
        self.pins = PinTable(lambda cid: self.blocks[cid.block].chunk_bytes(cid.index))
        self._mode = posting_mode(policy, window_chunks=self.config.window_chunks,
                                  batch_chunks=self.config.batch_chunks)
        self.pipeline = WritePipeline(endpoint, self.pins, batch_chunks=self._mode.batch_chunks,
                                      timeout=self.config.timeout,
                                      on_progress=self.meter.sample,
                                      before_post=self.meter.before_post,
                                      post_unit=self.meter.post_unit,
                                      alongside=self._hash_sent,
                                      on_completed=self.meter.completed)
        self._sent = SentChunks(self.blocks)
        #: Made once the blocks are exchanged (:mod:`.registrar`).
        self.registrar: Registrar | None = None

    # ------------------------------------------------------------ the run

    def run(self) -> SourceResult:
        """Migrate.

        Raises:
            MigrationError: anything failed (the cause is chained and named). Every
                registration is released; the source's memory is untouched and its
                workload runs again.
        """
        error: RdmamigError | None = None
        self.monitor.set_status(Status.SETUP)  # its clock starts (if run_source's has not)
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
            if error is not None:
                cancelled = isinstance(error, MigrationCancelledError)
                self._end(Status.CANCELLED if cancelled else Status.FAILED, str(error))
        self.monitor.update(downtime_s=self.result.downtime_s)
        self._end(Status.COMPLETED)
        return self.result

    def _end(self, status: Status, error: str | None = None) -> None:
        # What was done, also when it stopped halfway: the passes begun (QMP's
        # dirty-sync-count), the writes posted (queued ones never went out).
        self.result.iterations = len(self.result.pass_starts)
        self.result.bytes_written -= self.meter.unposted_bytes
        self.meter.unposted_bytes = 0
        self.monitor.update(pinned_bytes=self.endpoint.pinned_bytes, locked_bytes=locked_bytes())
        self.monitor.set_status(status, error)
        # The monitor's clock, so that the report and query-migrate agree.
        self.result.total_time_s = self.monitor.total_time_s

    def _new_pass(self, number: int, previous_round_s: float) -> float:
        """Pass ``number`` begins: its event, with the dirty rate the pages now dirty
        make over the last round; the time it began."""
        self.monitor.new_pass(number, dirty_pages_rate=(
            self.meter.dirty_bytes() / PAGE_SIZE / previous_round_s if previous_round_s else 0.0))
        started = time.monotonic()
        self.result.pass_starts.append(started - self._start)
        log.info("pass %d: %s dirty", number, size_text(self.meter.dirty_bytes()))
        return started

    def _migrate(self) -> None:
        if self.key is not None:
            if not self.endpoint.capabilities & Capability.AUTH:
                raise AuthenticationError("the destination does not authenticate (it has "
                                          "no key, or is QEMU, which cannot)")
            authenticate_source(self.session, self.key)
        log.info("destination: %s; capabilities %s", self.stream.peer,
                 ", ".join(capability_names(self.endpoint.capabilities)) or "none")
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
            counts_before = attrs.evolve(self._registrar.counts)
            self.stream.begin_round(writer, last=False)
            self._send_dirty()
            self.session.exchange_send(wire.RegisterFinished())
            self.stream.end_round(writer, last=False)
            self._registrar.policy().iteration_ended(iteration=iteration)
            iteration += 1
            round_ = convergence.RoundCounters(
                written_bytes=self.result.bytes_written - before.bytes_written,
                inline_pages=self.result.inline_pages - before.inline_pages,
                zero_pages=self.result.zero_pages - before.zero_pages,
                registrations=self._registrar.counts.registrations - counts_before.registrations,
                registering_s=self._registrar.counts.registering_s - counts_before.registering_s,
                elapsed_s=max(time.monotonic() - started, 1e-6))
            for tracker in self.trackers:
                tracker.scan()
            remaining = self.meter.dirty_bytes()
            round_s = round_.elapsed_s
            expected = self.downtime_estimate(remaining, round_)
            self.monitor.update(expected_downtime_s=expected, remaining=remaining)
            if expected <= self.monitor.parameters.max_downtime:
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
        log.info("stopping for the last pass (expected downtime %.0f ms)",
                 1000 * self.monitor.progress.expected_downtime_s)
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
        self.result.downtime_s = done - stop
        self.result.transfer_time_s = done - self._start
        if self.result.downtime_s > self.monitor.parameters.max_downtime:
            log.warning("downtime %.0f ms missed the %.0f ms limit: %s", 1000 *
                        self.result.downtime_s, 1000 * self.monitor.parameters.max_downtime,
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
        return convergence.downtime_estimate(
            remaining, round_, chunks_to_register=self._registrar.chunks_to_register())

    @property
    def _registrar(self) -> Registrar:
        assert self.registrar is not None, "the blocks are exchanged first"
        return self.registrar

    # ------------------------------------------------------------ RAM blocks

    def _exchange_blocks(self) -> None:
        reply = self.session.exchange_send(wire.RamBlocksRequest(),
                                           reply=wire.Command.RAM_BLOCKS_RESULT)
        assert isinstance(reply, wire.RamBlocksResult)
        log.info("%d RAM block(s): %s", len(self.blocks), blocks_text(self.blocks))
        theirs = [b.length for b in reply.blocks]
        ours = [b.length for b in self.blocks]
        if theirs != ours:
            raise MigrationError(f"RAM blocks do not match: source lengths {ours}, "
                                 f"destination lengths {theirs}")
        if self.pin_all:
            self.registrar = WholeBlocks(self.endpoint, self.session, self.blocks,
                                         reply.blocks, policy=self.policy, batch=self.batch)
        else:
            self.registrar = PerChunk(self.endpoint, self.session, self.blocks, reply.blocks,
                                      policy=self.policy, batch=self.batch, pins=self.pins,
                                      pipeline=self.pipeline, mode=self._mode,
                                      config=self.config, inline_pages=self._inline_pages)

    # ------------------------------------------------------------ one round

    def _check_cancel(self) -> None:
        if self.monitor.parameters.cancel_requested.is_set():
            raise MigrationCancelledError("migration cancelled (migrate_cancel)")

    def _send_dirty(self) -> None:
        for index, block in enumerate(self.blocks):
            dirty = block.take_dirty()
            self.meter.unsent_bytes += int(np.count_nonzero(dirty)) * PAGE_SIZE
            # Asked of the kernel once a pass: a page populated after this goes as
            # zero now and, dirty, again next pass – as a page written after it is read.
            populated = block.populated_pages(0, block.pages)
            self._sent.new_pass(index, masks.any_per_chunk(dirty), populated)
            chunks = self._without_holes(index, block, dirty, populated)
            ordered = self._registrar.pinned_first(index, chunks.tolist())
            # Windows grow from one batch to the mode's window: the first writes
            # start early, the later windows amortise their round trips.
            window = self._mode.window_chunks
            size, at = min(self.config.batch_chunks, window), 0
            while at < len(ordered):
                self._check_cancel()
                self._send_window(index, block, dirty, populated, ordered[at:at + size])
                at += size
                size = min(2 * size, window)
        self.meter.unsent_bytes = 0
        self.pipeline.drain()
        self._registrar.settle()
        self._send_chunk_hashes()

    def _without_holes(self, index: int, block: RamBlock, dirty: BoolArray,
                       populated: BoolArray) -> masks.IntArray:
        """The dirty chunks of ``block`` that hold data. Those that are holes from end
        to end go as COMPRESS now, a few messages for the whole block: in the
        windows they would take the places of chunks to register and write, and
        break the overlap of one window's writes with the next one's registrations."""
        holes = ~masks.any_per_chunk(populated)
        dirty_chunks = masks.any_per_chunk(dirty)
        gone = holes & dirty_chunks
        if gone.any():
            pages = masks.per_page(gone, block.pages) & dirty
            count = int(np.count_nonzero(pages))
            self.result.zero_pages += count
            self.result.duplicate_pages += count
            self.meter.unsent_bytes -= count * PAGE_SIZE
            base = self._registrar.remote[index].offset
            ranges = [wire.CompressRange(value=0, block_idx=index,
                                         offset=base + start * PAGE_SIZE,
                                         length=(end - start) * PAGE_SIZE)
                      for start, end in masks.runs(pages)]
            for part in batches(ranges, batch=self.batch):
                self.session.exchange_send(wire.Compress(entries=tuple(part)))
        return np.flatnonzero(dirty_chunks & ~holes)

    def _send_window(self, index: int, block: RamBlock, dirty: BoolArray,
                     populated_pages: BoolArray, window: list[int]) -> None:
        compress: list[wire.CompressRange] = []
        inline_pages: list[wire.InlinePage] = []
        writes: list[tuple[ChunkId, int, int]] = []
        to_register: list[ChunkId] = []
        # Registered chunks this window is about to write: held, so that no unpin
        # (of them or of a partner) happens before their writes are queued.
        rewritten: list[ChunkId] = []
        base = self._registrar.remote[index].offset
        taken = 0  # bytes of the dirty pages this window sends, however
        for first_chunk, end_chunk in masks.runs_of_consecutive(window):
            first = first_chunk * PAGES_PER_CHUNK
            pages = dirty[first:min(end_chunk * PAGES_PER_CHUNK, block.pages)]
            populated = populated_pages[first:first + len(pages)]
            nonzero = block.nonzero_pages(first, first + len(pages), populated=populated)
            chunks = [ChunkId(index, c) for c in range(first_chunk, end_chunk)]
            registered = self._registrar.registered(chunks)
            plan = masks.plan_span(pages, nonzero, registered, inline_limit=self._inline_pages,
                                   min_compress_run=MIN_COMPRESS_RUN,
                                   fill_gaps_below=FILL_GAPS_BELOW, populated=populated)
            self.result.zero_pages += int(np.count_nonzero(plan.compress))
            self.result.duplicate_pages += int(np.count_nonzero(pages & ~nonzero))
            taken += int(np.count_nonzero(pages)) * PAGE_SIZE
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
            again = [chunks[at] for at in np.flatnonzero(registered & written).tolist()]
            self._registrar.rewriting(again)
            rewritten += again
            to_register += [chunks[at] for at in np.flatnonzero(~registered & written).tolist()]
        if to_register:
            self._mode.before_register(self.pipeline)
            self._registrar.register(to_register)  # posts the window before meanwhile
        self.pipeline.post()
        if compress:
            for part in batches(compress, batch=self.batch):
                self.session.exchange_send(wire.Compress(entries=tuple(part)))
        for at in range(0, len(inline_pages), wire.MAX_PAGES):
            self.session.exchange_send(wire.Pages(entries=tuple(
                inline_pages[at:at + wire.MAX_PAGES])))
        self.result.inline_pages += len(inline_pages)
        for cid, first_page, end_page in writes:
            self._queue_write(cid, first_page * PAGE_SIZE, end_page * PAGE_SIZE)
        # Only now: until its writes are queued, the window is still to send.
        self.meter.unsent_bytes -= taken
        self._registrar.rewritten(rewritten)
        self._mode.end_window(self.pipeline)
        self._registrar.settle()
        self._send_chunk_hashes()

    # ------------------------------------------------------------ writes

    def _queue_write(self, cid: ChunkId, start: int, end: int) -> None:
        target = self._registrar.target(cid)
        self.result.bytes_written += end - start
        self.meter.unposted_bytes += end - start
        self.pipeline.queue(cid, region=target.region, offset=target.region_base + start,
                            length=end - start, remote_addr=target.remote_base + start,
                            rkey=target.rkey)

    def _hash_sent(self, chunks: list[ChunkId]) -> None:
        """Beside the writes of ``chunks`` (on the backend's sending thread, before
        it sends them, where it has one): hash them for CHUNK HASHES once the
        source is stopped, or from the start when nothing but a caller's
        ``mark_dirty`` changes its memory (a chunk marked dirty again is hashed
        again when it is written again). The source stops only between passes,
        with no write in flight."""
        static = self.workload is None and not self.trackers
        if self.endpoint.capabilities & Capability.CHUNK_HASHES and (self._stopped or static):
            self._sent.posted(chunks)

    def _send_chunk_hashes(self) -> None:
        """Name the chunks hashed since the last call, after their writes."""
        for message in self._sent.messages():
            self.session.exchange_send(message)

    # ------------------------------------------------------------ the end

    def _verify(self) -> None:
        started = time.monotonic()
        hashes = tuple(wire.BlockHash(block_idx=i, digest=digest)
                       for i, digest in enumerate(self._sent.block_digests()))
        # The READY that ended the downtime is still ours to use.
        reply = self.session.send_request(wire.BlockHashes(entries=hashes),
                                          reply=wire.Command.VERIFY_RESULT)
        assert isinstance(reply, wire.VerifyResult)
        self.result.verify_time_s = time.monotonic() - started
        self.result.chunk_hashes = self._sent.named
        log.info("%d of %d block(s) match (%d chunks hashed as they moved), in %.0f ms",
                 reply.matched, len(self.blocks), self._sent.named,
                 1000 * self.result.verify_time_s)
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
        log.info("the destination kept the migration")
        self.result.committed = True

    def _release_all(self) -> None:
        if self.registrar is not None:
            self.registrar.release_all()
            counts = self.registrar.counts
            self.result.registrations = counts.registrations
            self.result.unregistrations = counts.unregistrations
            self.result.reregistrations = counts.reregistrations
            self.result.peer_pinned_peak_bytes = self.registrar.peer_peak_bytes
