"""The destination of a migration: serves whatever the source sends.

After each READY the destination takes any message – QEMU FILE bytes, RAM BLOCKS
REQUEST, REGISTER REQUEST, COMPRESS, UNREGISTER REQUEST, REGISTER FINISHED – because
a real QEMU source interleaves them. The QEMU FILE stream is read like QEMU's
``get_buffer``: a read that needs bytes pumps messages until stream bytes arrive.
The stream is rdmamig's own (``RMIGSTR``, :mod:`.stream`) from an rdmamig source, or
QEMU's migration stream (``QEVM``, :mod:`rdmamig.qemu`) from an unmodified QEMU,
told apart by its first bytes. Every peer-supplied index, key and range is checked
against the blocks before any memory is touched, and the block list against the
destination's :class:`~rdmamig.limits.Limits` before any block is made.

The end is ordered so that nothing unfinished is ever kept: once the stream is
complete every registration is released (no write can land after that), then the
source's hashes are compared, then ``keep`` makes the migration durable (an image
renamed into place), and only then does the source hear that it is done (COMMIT
RESULT, Capability.COMMIT). With a key, the source proves it first of all
(:mod:`rdmamig.auth`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import attrs

from .. import wire
from ..auth import PreSharedKey, authenticate_destination
from ..caps import Capability
from ..control import Role
from ..errors import (
    AuthenticationError,
    ImageError,
    MigrationError,
    RdmamigError,
    RefusedError,
    RemoteProtocolError,
    TransportError,
    VerificationError,
)
from ..limits import Limits, check_layout
from ..memory import RamBlock, blocks_text
from ..pinning import buffer_address, locked_bytes
from ..qemu import stream as qemu_stream
from ..qemu.decoder import PrecopyDecoder
from ..qemu.ram import RamBlockInfo
from ..qemu.sink import BlockSink
from ..session import ControlSession, QemuFileReader
from ..status import Monitor, Status, capability_names
from ..transport import Endpoint, MemoryRegion
from ..units import size_text
from ..wire import CHUNK_SHIFT, CHUNK_SIZE
from . import stream
from .grants import GrantTable
from .verify import ArrivedChunks

#: The steps of a migration received, at INFO (``rdmamig -v``).
log = logging.getLogger("rdmamig.destination")

BlockFactory = Callable[[str, int], RamBlock]


@attrs.define(kw_only=True)
class DestinationResult:
    """What the destination saw. ``completed`` is True only once every page and the
    state stream arrived; ``verified`` only if the source's hashes matched too."""

    completed: bool = False
    verified: bool = False
    #: ``keep`` made the migration durable (and the source was told so).
    committed: bool = False
    error: str | None = None
    state: bytes = b""
    iterations: int = 0
    registrations: int = 0
    unregistrations: int = 0
    zero_pages: int = 0
    #: Pages that came inside PAGES messages (Capability.INLINE).
    inline_pages: int = 0
    pinned_peak_bytes: int = 0
    #: Highest VmLck + VmPin seen (what the kernel counts against RLIMIT_MEMLOCK).
    locked_peak_bytes: int = 0
    #: Setup to the final status (query-migrate's ``total-time``).
    total_time_s: float = 0.0
    #: Start to the stream's end: everything in place, before verification.
    transfer_time_s: float = 0.0
    verify_time_s: float = 0.0
    #: Chunks whose digest was taken as they arrived (CHUNK HASHES) and held to
    #: the end: only the others were hashed after the transfer.
    chunks_hashed_on_arrival: int = 0
    mismatched_blocks: list[str] = attrs.Factory(list)
    #: xxh3-128 of each block as verified (empty when the peer did not verify).
    digests: list[bytes] = attrs.Factory(list)
    #: What the source said its blocks come from (an ORIGIN record), if it did; for a
    #: QEMU source, what its stream said.
    origin: dict[str, Any] | None = None
    #: ``rdmamig``, or ``qemu`` for a QEMU source (which offers no verification).
    peer: str = "rdmamig"
    #: (seconds since start, pinned bytes) after every (un)registration.
    pinned_timeline: list[tuple[float, int]] = attrs.Factory(list)


class Destination:
    """Receives a migration into ``blocks`` (checked against the source's list by
    name and size) or into blocks made by ``make_block(name, length)``.

    Args:
        endpoint: an accepted connection.
        blocks: pre-allocated blocks (as QEMU's destination has its RAM already).
        make_block: creates blocks on demand when ``blocks`` is None.
        timeout: seconds to wait for any one message.
        limits: what the source may declare and pin.
        key: the pre-shared key the source must prove (Capability.AUTH).
        keep: called with this destination once the migration is complete and
            verified, before the source is told it is done; it makes the migration
            durable. What it raises (RdmamigError, OSError) fails the migration.
        monitor: hears the destination's status and passes (:mod:`rdmamig.status`).
        auth_timeout: seconds each of the source's authentication messages may take
            (default ``timeout``): a peer that proves nothing is not waited for long.
        admit: called once the source has proven the key (without a key, at once),
            before anything else is received; it may wait for room or refuse
            (RefusedError): a listener counts only such sources as sessions.
    """

    def __init__(self, endpoint: Endpoint, *, blocks: Sequence[RamBlock] | None = None,
                 make_block: BlockFactory | None = None, timeout: float | None = 60.0,
                 started_at: float | None = None, limits: Limits | None = None,
                 key: PreSharedKey | None = None,
                 keep: Callable[[Destination], None] | None = None,
                 monitor: Monitor | None = None, auth_timeout: float | None = None,
                 admit: Callable[[], None] | None = None) -> None:
        if blocks is None and make_block is None:
            raise ValueError("give the destination blocks or a make_block factory")
        for block in blocks or ():
            block.require_writable()
        self.endpoint = endpoint
        self.session = ControlSession(endpoint, role=Role.DESTINATION,
                                      capabilities=endpoint.capabilities, timeout=timeout)
        self._given = list(blocks) if blocks is not None else None
        self._make_block = make_block
        self.limits = limits or Limits()
        self._key = key
        self._keep = keep
        self._auth_timeout = auth_timeout
        self._admit = admit
        self.monitor = monitor or Monitor(total_bytes=0, max_downtime=0.0)
        self.blocks: list[RamBlock] = []
        self._offsets: list[int] = []
        self._addrs: list[int] = []
        self.grants = GrantTable([])
        self.result = DestinationResult()
        self._start = started_at if started_at is not None else time.monotonic()
        #: Chunks hashed as they arrive (CHUNK HASHES), once the blocks are known.
        self._arrived: ArrivedChunks | None = None

    # ------------------------------------------------------------ the run

    def run(self) -> DestinationResult:
        """Receive the migration.

        Raises:
            MigrationError: anything failed; every registration is released, the
                endpoint is closed (a write stalled halfway cannot hold its region)
                and ``result.committed`` stays False.
        """
        self.monitor.set_status(Status.SETUP)
        error: RdmamigError | None = None
        try:
            if self._key is not None:
                if not self.endpoint.capabilities & Capability.AUTH:
                    raise AuthenticationError("the source did not authenticate")
                self._authenticate(self._key)
            if self._admit is not None:
                self._admit()
            log.info("source connected; capabilities %s", ", ".join(
                capability_names(self.endpoint.capabilities)) or "none")
            self._receive()
            self._release_all()  # no write lands after this
            if self.endpoint.capabilities & Capability.VERIFY:
                self._verify()
            self._commit()
        except RdmamigError as exc:
            error = exc
            self.result.error = str(exc)
            self.session.abort(str(exc))
            self.endpoint.close()
            raise exc if isinstance(exc, MigrationError) else MigrationError(
                f"destination failed: {exc}") from exc
        finally:
            self._release_all()
            if self._arrived is not None:  # its thread reads the blocks
                self._arrived.close()
            self.result.pinned_peak_bytes = self.endpoint.pinned_peak_bytes
            if error is not None:  # released first: nothing is pinned when it says so
                self.monitor.set_status(Status.FAILED, str(error))
                self.result.total_time_s = self.monitor.total_time_s
        self.monitor.set_status(Status.COMPLETED)
        self.result.total_time_s = self.monitor.total_time_s
        return self.result

    def _authenticate(self, key: PreSharedKey) -> None:
        timeout = self.session.timeout
        if self._auth_timeout is not None:
            self.session.timeout = self._auth_timeout
        try:
            authenticate_destination(self.session, key)
        finally:
            self.session.timeout = timeout

    def _receive(self) -> None:
        reader = QemuFileReader(self._fill)
        head = reader.read_exact(len(qemu_stream.MAGIC))
        if head == qemu_stream.MAGIC:
            self._receive_qemu(head + reader.take_buffered())
            return
        stream.read_magic(reader, head)
        tag, payload = stream.read_record(reader)
        if tag is not stream.Tag.BLOCKS:
            raise RemoteProtocolError(f"stream starts with record {tag.name}, not BLOCKS")
        self._set_up_blocks(stream.decode_blocks_untrusted(payload))
        while True:
            tag, payload = stream.read_record(reader)
            if tag is stream.Tag.STATE:
                self.result.state = payload
            elif tag is stream.Tag.ORIGIN:
                self.result.origin = stream.decode_origin_untrusted(payload,
                                                                    blocks=len(self.blocks))
            elif tag is stream.Tag.END:
                break
            else:
                raise RemoteProtocolError(f"record {tag.name} after the stream's start")
        self.result.transfer_time_s = time.monotonic() - self._start
        self.result.completed = True
        # This READY tells the source that everything before END is in place.
        self.session.send(wire.Ready())

    def _receive_qemu(self, start: bytes) -> None:
        """Take a QEMU source's migration stream (QEMU's RDMA migration): its ram
        setup lists the blocks before RAM BLOCKS REQUEST, registrations and COMPRESS
        arrive between stream pieces as with an rdmamig source, and it ends with the
        device state, after which QEMU disconnects."""
        self.result.peer = "qemu"
        def on_setup(infos: list[RamBlockInfo]) -> BlockSink:
            self._set_up_blocks([(b.name, b.length) for b in infos])
            # Blocks given to the destination may hold anything; made ones are new.
            return BlockSink(self.blocks, zeroed=self._given is None)

        def next_piece() -> bytes | None:
            try:
                return self._fill()
            except TransportError:
                if decoder.in_device_state:  # QEMU ends a stream by disconnecting
                    return None
                raise

        decoder = PrecopyDecoder(on_setup)
        decoder.feed(start)
        self.result.state = decoder.read_all(next_piece).raw
        self.result.origin = decoder.origin().record([b.addr for b in decoder.blocks])
        self.result.transfer_time_s = time.monotonic() - self._start
        self.result.completed = True
        if self.endpoint.capabilities & Capability.VERIFY:
            # An rdmamig source sending QEMU's stream: as after END, this READY says
            # everything is in place, and the hashes come next.
            self.session.send(wire.Ready())

    def _fill(self) -> bytes:
        while True:
            message = self.session.exchange_recv()
            if isinstance(message, wire.QemuFile):
                return message.data
            self._handle(message)

    def _handle(self, message: wire.Message) -> None:
        match message:
            case wire.RamBlocksRequest():
                self._ram_blocks()
                self._sample()
            case wire.RegisterRequest(entries=entries):
                self.session.send(wire.RegisterResult(
                    entries=tuple(self._register(e) for e in entries)))
                self._sample()
            case wire.Compress(entries=ranges):
                for compress in ranges:
                    self._compress(compress)
            case wire.Pages(entries=pages):
                for page in pages:
                    self._inline_page(page)
            case wire.UnregisterRequest(entries=chunks):
                for chunk in chunks:
                    self._unregister(chunk)
                self.session.send(wire.UnregisterFinished())
                self._sample()
            case wire.ChunkHashes(entries=entries):
                if self._arrived is None:
                    raise RemoteProtocolError("CHUNK HASHES before the stream listed the blocks")
                self._arrived.check(entries)
            case wire.RegisterFinished():
                if self._arrived is not None:
                    self._arrived.new_pass()
                self.result.iterations += 1
                log.info("pass %d ended; %s pinned", self.result.iterations,
                         size_text(self.endpoint.pinned_bytes))
                self.monitor.new_pass(self.result.iterations, dirty_pages_rate=0.0)
            case _:
                raise RemoteProtocolError(f"{message.TYPE.label} before the stream's END")

    # ------------------------------------------------------------ blocks

    def _set_up_blocks(self, listed: list[tuple[str, int]]) -> None:
        check_layout(listed, self.limits)
        if self._given is not None:
            ours = [(b.name, b.length) for b in self._given]
            if ours != listed:
                raise MigrationError(
                    "RAM blocks do not match: source has "
                    + ", ".join(f"{n}={length}" for n, length in listed)
                    + "; destination has " + ", ".join(f"{n}={length}" for n, length in ours))
            self.blocks = self._given
        else:
            assert self._make_block is not None
            try:
                for name, length in listed:
                    self.blocks.append(self._make_block(name, length))
            except (ImageError, OSError) as exc:
                raise RefusedError(f"cannot make RAM block {name!r} of {length} bytes: "
                                   f"{exc}") from exc
        self.monitor.total_bytes = sum(block.length for block in self.blocks)
        log.info("%d RAM block(s): %s", len(self.blocks), blocks_text(self.blocks))
        self.monitor.set_status(Status.ACTIVE)
        self.grants = GrantTable([block.chunks for block in self.blocks])
        if self.endpoint.capabilities & Capability.CHUNK_HASHES:
            self._arrived = ArrivedChunks(self.blocks)
            # Before any registration: no write can land before it is watched.
            self.endpoint.watch_placements(self._arrived.placed)
        offset = 0
        for block in self.blocks:
            self._offsets.append(offset)
            self._addrs.append(buffer_address(block.view))
            offset += block.length

    def _ram_blocks(self) -> None:
        if not self.blocks:
            raise RemoteProtocolError("RAM BLOCKS REQUEST before the stream listed the blocks")
        pin_all = bool(self.endpoint.capabilities & Capability.PIN_ALL)
        if pin_all and not self.grants.whole_blocks:
            self._check_pin_cap(sum(block.length for block in self.blocks))
            regions: list[MemoryRegion] = []
            try:
                for block in self.blocks:
                    block.allocate(0, block.length)
                    regions.append(self.endpoint.register(buffer=block.view, remote_write=True))
            finally:
                self.grants.add_whole(regions)  # released with the rest, whatever happens
            self.result.registrations += len(regions)
        self.session.send(wire.RamBlocksResult(blocks=tuple(
            wire.DestBlock(remote_host_addr=addr, offset=offset, length=block.length,
                           remote_rkey=self.grants.whole(i).rkey if pin_all else 0)
            for i, (block, offset, addr) in enumerate(
                zip(self.blocks, self._offsets, self._addrs, strict=True)))))

    def _locate(self, index: int, address: int, length: int, *, field: str
                ) -> tuple[RamBlock, int, bool]:
        """The block ``index`` names, where ``address`` (in the offsets of RAM BLOCKS
        RESULT) falls in it, and whether ``length`` bytes from there lie inside it.

        Raises:
            RemoteProtocolError: no block has that index (``field`` names it).
        """
        if not 0 <= index < len(self.blocks):
            raise RemoteProtocolError(f"{field}={index}: no such RAM block "
                                      f"(there are {len(self.blocks)})")
        block = self.blocks[index]
        start = address - self._offsets[index]
        return block, start, start >= 0 and start + length <= block.length

    # ------------------------------------------------------------ requests

    def _register(self, entry: wire.Register) -> wire.RegisterKey:
        block, start, inside = self._locate(entry.current_index, entry.key, 1,
                                            field="current_index")
        if not inside:
            raise RemoteProtocolError(f"key={entry.key:#x}: outside RAM block "
                                      f"{entry.current_index} ({block.name})")
        first = start >> CHUNK_SHIFT
        count = entry.count  # QEMU's meaning: chunks first .. first + entry.chunks
        if first + count > block.chunks:
            raise RemoteProtocolError(f"chunks={entry.chunks}: chunks {first}..{first + count - 1}"
                                      f" run past block {block.name} ({block.chunks} chunks)")
        region = self.grants.holding(entry.current_index, first, count)
        if region is None:
            end = min((first + count) * CHUNK_SIZE, block.length)
            self._check_pin_cap(end - first * CHUNK_SIZE)
            # The peer's writes land without us: their room is made now.
            block.allocate(first * CHUNK_SIZE, end - first * CHUNK_SIZE)
            region = self.endpoint.register(buffer=block.view[first * CHUNK_SIZE:end],
                                            remote_write=True)
            self.grants.add(entry.current_index, first, count, region)
            self.result.registrations += count
        return wire.RegisterKey(rkey=region.rkey, host_addr=self._addrs[entry.current_index])

    def _check_pin_cap(self, more: int) -> None:
        cap = self.limits.max_pinned
        if cap is not None and self.endpoint.pinned_bytes + more > cap:
            raise RefusedError(f"the source asks to pin {self.endpoint.pinned_bytes + more} "
                               f"bytes; this destination allows {cap} (--max-pinned)")

    def _unregister(self, entry: wire.Register) -> None:
        self._locate(entry.current_index, 0, 0, field="current_index")
        region = self.grants.remove(entry.current_index, entry.key)
        self.endpoint.deregister(region=region)
        self.result.unregistrations += -(-region.length // CHUNK_SIZE)

    def _compress(self, entry: wire.CompressRange) -> None:
        block, start, inside = self._locate(entry.block_idx, entry.offset, entry.length,
                                            field="block_idx")
        if not inside:
            raise RemoteProtocolError(
                f"offset={entry.offset:#x}: COMPRESS of {entry.length} bytes is outside "
                f"RAM block {entry.block_idx} ({block.name}, {block.length} bytes)")
        # As QEMU's ram_handle_zero: memory that already reads as zero (pre-faulted
        # RAM, mostly) is only read, not written over.
        if entry.value != 0 or not block.reads_zero(start, entry.length):
            block.allocate(start, entry.length)
            block.array[start:start + entry.length] = entry.value
            if self._arrived is not None:
                self._arrived.changed(entry.block_idx, start, entry.length)
        self.result.zero_pages += entry.length // wire.PAGE_BYTES if entry.value == 0 else 0

    def _inline_page(self, page: wire.InlinePage) -> None:
        block, start, inside = self._locate(page.block_idx, page.offset, wire.PAGE_BYTES,
                                            field="block_idx")
        if not inside or start % wire.PAGE_BYTES:
            raise RemoteProtocolError(
                f"offset={page.offset:#x}: PAGES entry is not a page of RAM block "
                f"{page.block_idx} ({block.name}, {block.length} bytes)")
        block.allocate(start, wire.PAGE_BYTES)
        block.view[start:start + wire.PAGE_BYTES] = page.data
        if self._arrived is not None:
            self._arrived.changed(page.block_idx, start, wire.PAGE_BYTES)
        self.result.inline_pages += 1

    # ------------------------------------------------------------ the end

    def _verify(self) -> None:
        started = time.monotonic()
        # Every registration is gone: nothing changes the blocks any more, so they
        # are hashed while the source hashes its own, not after; chunks that CHUNK
        # HASHES named were hashed as they arrived.
        if self._arrived is not None:
            self.result.digests = self._arrived.block_digests()
            self.result.chunks_hashed_on_arrival = sum(map(len, self._arrived.known))
        else:
            self.result.digests = [block.digest() for block in self.blocks]
        message = self.session.recv()
        if not isinstance(message, wire.BlockHashes):
            raise RemoteProtocolError(f"{message.TYPE.label} after END, expected BLOCK HASHES")
        theirs = {entry.block_idx: entry.digest for entry in message.entries}
        mismatched = [block.name for index, block in enumerate(self.blocks)
                      if theirs.get(index) != self.result.digests[index]]
        self.result.mismatched_blocks = mismatched
        self.result.verify_time_s = time.monotonic() - started
        self.session.send(wire.VerifyResult(matched=len(self.blocks) - len(mismatched),
                                            mismatched=len(mismatched)))
        log.info("%d of %d block(s) match (%d chunks hashed as they arrived), in %.0f ms",
                 len(self.blocks) - len(mismatched), len(self.blocks),
                 self.result.chunks_hashed_on_arrival, 1000 * self.result.verify_time_s)
        if mismatched:
            raise VerificationError(f"hash mismatch in block(s) {', '.join(mismatched)}"
                                    f"{self._mismatched_chunks()}")
        self.result.verified = True

    def _mismatched_chunks(self) -> str:
        """The chunks found to differ as they arrived, for the error: ``; chunk 3 of
        pc.ram (offset 0x300000)``, the first few of them."""
        found = self._arrived.mismatched if self._arrived is not None else []
        named = [f"chunk {chunk} of {self.blocks[index].name} (offset "
                 f"{chunk * CHUNK_SIZE:#x})" for index, chunk in sorted(found)[:4]]
        more = f" and {len(found) - 4} more" if len(found) > 4 else ""
        return f"; {', '.join(named)}{more}" if named else ""

    def _commit(self) -> None:
        """Keep the migration, then tell the source (COMMIT RESULT) that it is done.
        An rdmamig source that did not verify gets nothing kept: only QEMU, which
        cannot, is taken unverified."""
        if not (self.result.verified or self.result.peer == "qemu"):
            raise VerificationError("the source did not verify the migration (no VERIFY)")
        asked = bool(self.endpoint.capabilities & Capability.COMMIT)
        if asked:
            self.session.exchange_recv({wire.Command.COMMIT})
        try:
            if self._keep is not None:
                self._keep(self)
        except (RdmamigError, OSError) as exc:
            reason = str(exc)
            if asked:
                self.session.send(wire.CommitResult(committed=False, reason=reason))
            raise MigrationError(f"could not keep the migration: {reason}") from exc
        self.result.committed = True
        if asked:
            self.session.send(wire.CommitResult(committed=True))

    def _sample(self) -> None:
        """Record pinned bytes (ours and the kernel's VmLck) after a (un)registration."""
        locked = locked_bytes()
        self.result.locked_peak_bytes = max(self.result.locked_peak_bytes, locked)
        self.result.pinned_timeline.append(
            (time.monotonic() - self._start, self.endpoint.pinned_bytes))
        self.monitor.update(pinned_bytes=self.endpoint.pinned_bytes, locked_bytes=locked)

    def _release_all(self) -> None:
        for region in self.grants.clear():
            # Already gone if the endpoint was closed under us: that released it too.
            with contextlib.suppress(RdmamigError):
                self.endpoint.deregister(region=region)

