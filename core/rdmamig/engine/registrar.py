"""The source's registrar: what is pinned on both sides, and where each write goes.

Two strategies, chosen by what was negotiated, the way :mod:`.pipeline` chooses a
posting mode:

- :class:`PerChunk` (dynamic registration, QEMU's default): a chunk is pinned here
  and registered at the peer (REGISTER REQUEST) before its first write, one chunk
  or, with BATCH, an aligned pair at a time; the unpin policy decides what to
  release (UNREGISTER REQUEST) and when, and :class:`~.pins.PinTable` keeps what may
  not go yet.
- :class:`WholeBlocks` (PIN_ALL): every block is pinned whole once the blocks are
  exchanged, and the peer's key for each block came with them.

Completed writes reach the policy through the registrar: :meth:`PerChunk.policy`
first hands it the chunks the pipeline has completed since, so that it hears of
every completion before anything else that happened after it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import attrs
import numpy as np

from .. import wire
from ..errors import MemlockLimitError, MigrationError, RdmamigError
from ..memory import BoolArray, RamBlock
from ..policy import ChunkId, UnpinPolicy
from ..session import ControlSession
from ..transport import Endpoint, MemoryRegion
from ..units import size_text
from ..wire import CHUNK_SIZE
from . import convergence
from . import pages as masks
from .config import SourceConfig
from .pins import Pin, PinTable, registration_units
from .pipeline import PostingMode, WritePipeline

#: Registrations and the unpin policy's decisions, at DEBUG (``rdmamig -vv``).
log = logging.getLogger("rdmamig.registrar")
_T = TypeVar("_T")


def batches(entries: Sequence[_T], *, batch: bool) -> Iterator[Sequence[_T]]:
    """``entries`` split into array messages: up to 4096 each when BATCH was
    negotiated, else one each (as QEMU sends them)."""
    step = wire.MAX_REPEAT if batch else 1
    for at in range(0, len(entries), step):
        yield entries[at:at + step]


@attrs.frozen
class Target:
    """Where a write into a chunk goes: the local region and the offset in it of the
    chunk's block offset 0, and the peer's key and address of that block offset."""

    region: MemoryRegion
    region_base: int
    rkey: int
    remote_base: int


@attrs.define
class Counts:
    """What the registrar asked of both sides (chunks, not messages)."""

    registrations: int = 0
    unregistrations: int = 0
    reregistrations: int = 0
    #: Seconds spent registering: pins, round trips and the room made for them.
    registering_s: float = 0.0


class Registrar:
    """What both strategies share: the endpoint, the session, the blocks and their
    peer's list, and local pins made under memory pressure."""

    def __init__(self, endpoint: Endpoint, session: ControlSession, blocks: Sequence[RamBlock],
                 remote: Sequence[wire.DestBlock], *, policy: UnpinPolicy,
                 batch: bool) -> None:
        self.endpoint = endpoint
        self.session = session
        self.blocks = blocks
        self.remote = list(remote)
        self._policy = policy
        self.batch = batch
        self.counts = Counts()
        #: The peer's address of each block (REGISTER RESULT may say it again).
        self._host_addr = [b.remote_host_addr for b in remote]

    def policy(self) -> UnpinPolicy:
        """The unpin policy, up to date with what has happened."""
        return self._policy

    @property
    def peer_peak_bytes(self) -> int:
        """The most bytes the peer was asked to pin at once."""
        raise NotImplementedError

    def pinned_first(self, block: int, chunks: list[int]) -> list[int]:
        """The order in which to write ``chunks`` of ``block``."""
        return chunks

    def registered(self, chunks: Sequence[ChunkId]) -> BoolArray:
        """Which of ``chunks`` are registered (a write may go into them now)."""
        raise NotImplementedError

    def rewriting(self, chunks: Iterable[ChunkId]) -> None:
        """``chunks``, registered, are about to be written again (held until
        :meth:`rewritten`)."""

    def rewritten(self, chunks: Iterable[ChunkId]) -> None:
        """The writes of ``chunks`` are queued: the pipeline holds them now."""

    def register(self, chunks: list[ChunkId]) -> None:
        """Pin ``chunks`` here and have the peer register them."""
        raise NotImplementedError

    def target(self, cid: ChunkId) -> Target:
        """Where writes into chunk ``cid`` go."""
        raise NotImplementedError

    def settle(self) -> None:
        """A window or a round is done: release what the policy lets go."""

    def chunks_to_register(self) -> int:
        """How many chunks the dirty pages would need registered now."""
        return 0

    def release_all(self) -> None:
        """Release every pin on this side (the peer releases its own at the end)."""

    def _pin_local(self, view: memoryview, needed: int) -> MemoryRegion:
        try:
            return self.endpoint.register(buffer=view, remote_write=False)
        except MemlockLimitError:
            # Pressure: give the policy one chance to make room, then give up.
            self.policy().pressure(needed_bytes=needed, pinned_bytes=self.endpoint.pinned_bytes)
            self._make_room(needed, settle=True)
            return self.endpoint.register(buffer=view, remote_write=False)

    def _make_room(self, needed: int, *, settle: bool = False) -> None:
        """Nothing to make room in: whole blocks stay pinned."""


class WholeBlocks(Registrar):
    """PIN_ALL: every block pinned whole, here and at the peer, from the start."""

    def __init__(self, endpoint: Endpoint, session: ControlSession, blocks: Sequence[RamBlock],
                 remote: Sequence[wire.DestBlock], *, policy: UnpinPolicy,
                 batch: bool) -> None:
        super().__init__(endpoint, session, blocks, remote, policy=policy, batch=batch)
        self._regions: list[MemoryRegion] = []
        for block in blocks:
            self._regions.append(self._pin_local(block.view, block.length))
            self.counts.registrations += 1

    @property
    def peer_peak_bytes(self) -> int:
        return sum(block.length for block in self.blocks)

    def registered(self, chunks: Sequence[ChunkId]) -> BoolArray:
        return np.ones(len(chunks), dtype=np.bool_)

    def register(self, chunks: list[ChunkId]) -> None:
        raise AssertionError("PIN_ALL registers nothing after the blocks are exchanged")

    def target(self, cid: ChunkId) -> Target:
        return Target(region=self._regions[cid.block], region_base=0,
                      rkey=self.remote[cid.block].remote_rkey,
                      remote_base=self._host_addr[cid.block])

    def release_all(self) -> None:
        for region in self._regions:
            with contextlib.suppress(RdmamigError):
                self.endpoint.deregister(region=region)
        self._regions.clear()


class PerChunk(Registrar):
    """Dynamic registration, chunk by chunk, with the policy deciding what to unpin.

    Args:
        pipeline: the writes: posted while the peer answers, and completed when the
            policy needs room; it holds the chunks of the writes it carries.
        mode: when the pipeline posts, around these round trips.
        config: ``async_unregister`` and ``inline_pages``.
    """

    def __init__(self, endpoint: Endpoint, session: ControlSession, blocks: Sequence[RamBlock],
                 remote: Sequence[wire.DestBlock], *, policy: UnpinPolicy, batch: bool,
                 pins: PinTable, pipeline: WritePipeline, mode: PostingMode,
                 config: SourceConfig, inline_pages: int) -> None:
        super().__init__(endpoint, session, blocks, remote, policy=policy, batch=batch)
        self.pins = pins
        self.pipeline = pipeline
        self.mode = mode
        self.config = config
        self._inline_pages = inline_pages
        self._deregistering: list[Future[None]] = []
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rdmamig-unpin")

    def policy(self) -> UnpinPolicy:
        for cid in self.pipeline.take_written():
            self._policy.chunk_written(chunk=cid)
        return self._policy

    @property
    def peer_peak_bytes(self) -> int:
        return self.pins.peak_bytes

    def pinned_first(self, block: int, chunks: list[int]) -> list[int]:
        return self.pins.pinned_first(block, chunks)

    def registered(self, chunks: Sequence[ChunkId]) -> BoolArray:
        return np.fromiter((c in self.pins for c in chunks), dtype=np.bool_, count=len(chunks))

    def rewriting(self, chunks: Iterable[ChunkId]) -> None:
        policy = self.policy()
        for cid in chunks:
            # A pinned chunk written again: in flight until chunk_written.
            self.pins.hold(cid)
            policy.chunk_dirtied(chunk=cid)

    def rewritten(self, chunks: Iterable[ChunkId]) -> None:
        for cid in chunks:
            self.pins.release(cid)

    def target(self, cid: ChunkId) -> Target:
        pin = self.pins[cid]
        return Target(region=pin.region, region_base=-pin.first * CHUNK_SIZE, rkey=pin.rkey,
                      remote_base=self._host_addr[cid.block])

    def settle(self) -> None:
        self._unpin(self._ask_policy(0))

    def chunks_to_register(self) -> int:
        pinned = [[cid.index for cid in self.pins.chunks() if cid.block == index]
                  for index in range(len(self.blocks))]
        return sum(convergence.chunks_to_register(
            masks.per_chunk(block.dirty_bitmap()).sum(axis=1), np.isin(
                np.arange(block.chunks), indices), inline_limit=self._inline_pages)
            for block, indices in zip(self.blocks, pinned, strict=True))

    # ------------------------------------------------------------ registration

    def register(self, chunks: list[ChunkId]) -> None:
        started = time.monotonic()
        try:
            self._register(chunks)
        finally:
            self.counts.registering_s += time.monotonic() - started

    def _register(self, chunks: list[ChunkId]) -> None:
        units = registration_units(chunks, pairs=self.batch,
                                   runs=self._policy.keeps_everything)
        log.debug("registering %d chunk(s) as %d region(s)", len(chunks), len(units))
        self._make_room(sum(self.blocks[c.block].chunk_bytes(c.index) for c in chunks))
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
        for part in batches(units, batch=self.batch):
            self.session.wait_ready()
            self.session.send(wire.RegisterRequest(entries=tuple(
                wire.Register.covering(key=self.remote[b].offset + first * CHUNK_SIZE,
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
            policy = self.policy()
            for ((block_index, first, count), region), key in zip(part, reply.entries,
                                                                   strict=True):
                self._host_addr[block_index] = key.host_addr
                pin = Pin(block=block_index, first=first, count=count, region=region,
                          rkey=key.rkey)
                for cid, nbytes, again in self.pins.add(pin):
                    self.counts.registrations += 1
                    self.counts.reregistrations += again
                    policy.chunk_registered(chunk=cid, nbytes=nbytes)

    # ------------------------------------------------------------ unpinning

    def _make_room(self, needed: int, *, settle: bool = False) -> None:
        """Ask the policy what to unpin before pinning ``needed`` more bytes.

        A policy may only choose chunks whose writes completed. If that is not enough
        to stay under its cap (or with ``settle``), the writes in flight complete and
        the policy is asked again. Local deregistrations finish before returning, so
        the kernel's count of locked memory stays under the cap too.
        """
        if not settle:
            self._unpin(self._ask_policy(needed))
        cap = self._policy.pin_cap
        if settle or (cap is not None and self.pins.pinned_bytes + needed > cap):
            self.pipeline.complete_all()
            self._unpin(self._ask_policy(needed))
        self._settle_deregistrations()

    def _ask_policy(self, needed: int) -> list[ChunkId]:
        policy = self.policy()
        pinned: Mapping[ChunkId, int] = self.pins.sizes
        if policy.pin_cap is not None:
            # A chunk registered together with a held chunk cannot go yet: a capped
            # policy sees it as part of what must fit, not as a candidate, so that
            # it picks others and the cap holds.
            pinned, tied_bytes = self.pins.candidates()
            needed += tied_bytes
        try:
            chosen = list(policy.select_unpin(pinned=pinned, needed_bytes=needed))
        except Exception as exc:
            raise MigrationError(f"unpin policy {policy.name!r} failed: "
                                 f"{type(exc).__name__}: {exc}") from exc
        for cid in chosen:
            if cid not in self.pins:
                raise MigrationError(f"unpin policy {policy.name!r} asked to unpin "
                                     f"chunk {cid.index} of block {cid.block}, which is not "
                                     f"pinned")
            if self.pins.held(cid):
                raise MigrationError(f"unpin policy {policy.name!r} asked to unpin "
                                     f"chunk {cid.index} of block {cid.block}, which has a "
                                     f"write in flight; refused")
        if chosen:
            log.debug("policy %s unpins %d chunk(s) for %s more (pinned %s)", policy.name,
                      len(chosen), size_text(needed), size_text(self.pins.pinned_bytes))
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
            requests = list(batches(pins, batch=self.batch))
        else:
            requests = [[pin] for pin in pins]
        for part in requests:
            self.session.wait_ready()
            self.session.send(wire.UnregisterRequest(entries=tuple(
                wire.Register.covering(key=pin.first, current_index=pin.block,
                                       count=pin.count)
                for pin in part)))
            self.mode.after_unregister_sent(self.pipeline)
            self.session.recv_reply(wire.Command.UNREGISTER_FINISHED)
            policy = self.policy()
            for pin in part:
                if not self.config.async_unregister:
                    self.endpoint.deregister(region=pin.region)
                for cid in self.pins.remove(pin):
                    self.counts.unregistrations += 1
                    policy.chunk_unpinned(chunk=cid)

    def _settle_deregistrations(self) -> None:
        """Wait for the worker's local deregistrations (raising what they raised)."""
        while self._deregistering:
            self._deregistering.pop(0).result()

    def release_all(self) -> None:
        self._worker.shutdown(wait=True)
        for future in self._deregistering:
            with contextlib.suppress(RdmamigError):
                future.result()
        self._deregistering.clear()
        for region in self.pins.clear():
            with contextlib.suppress(RdmamigError):
                self.endpoint.deregister(region=region)
