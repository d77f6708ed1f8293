"""End-to-end migrations through the engine, over real TCP sockets, at small sizes."""

from __future__ import annotations

import errno
import json
import os
import threading
from typing import Any

import numpy as np
import pytest
from conftest import DEFAULT_CAPS, Migration
from rdmamig import wire
from rdmamig.caps import Capability
from rdmamig.engine import ChecksumTracker, Destination, RamBlock, SourceConfig
from rdmamig.engine.convergence import RoundCounters
from rdmamig.engine.pages import runs
from rdmamig.engine.pipeline import _pieces
from rdmamig.engine.source import MIN_COMPRESS_RUN
from rdmamig.errors import MigrationCancelledError, MigrationError
from rdmamig.policy import ChunkId, PolicyOptions, UnpinPolicy
from rdmamig.report import rate_series
from rdmamig.status import Monitor, Status
from rdmamig.transport import MemoryRegion, RemoteWrite
from rdmamig.workload import SyntheticWorkload, fill_guest
from rdmamig_policies.lru import Lru

MiB = 1 << 20


def guest(*sizes: int, zero_fraction: float = 0.0) -> list[RamBlock]:
    blocks = [RamBlock.anonymous(f"ram{i}", size) for i, size in enumerate(sizes)]
    fill_guest(blocks, zero_fraction=zero_fraction)
    return blocks


def same_memory(migration: Migration, blocks: list[RamBlock]) -> bool:
    assert migration.destination is not None
    return all(a.digest() == b.digest() for a, b in zip(
        blocks, migration.destination.blocks, strict=True))


def assert_succeeded(migration: Migration, blocks: list[RamBlock]) -> None:
    assert migration.source_error is None and migration.destination_error is None
    assert migration.source is not None and migration.destination is not None
    assert migration.source.result.verified and migration.destination.result.verified
    assert same_memory(migration, blocks)
    assert migration.pinned_after == (0, 0)


def test_idle_migration(migration: Migration) -> None:
    blocks = guest(8 * MiB)
    assert_succeeded(migration.run(blocks), blocks)
    result = migration.source.result  # type: ignore[union-attr]
    assert result.bytes_written == 8 * MiB
    assert result.registrations == 8


def test_several_blocks_of_odd_sizes(migration: Migration) -> None:
    blocks = guest(3 * MiB + 4096, 4096, 2 * MiB)
    assert_succeeded(migration.run(blocks), blocks)


def test_zero_heavy_ram_goes_as_compress(migration: Migration) -> None:
    blocks = guest(16 * MiB, zero_fraction=0.9)
    zero = ~blocks[0].nonzero_pages(0, blocks[0].pages)
    long_runs = sum(end - start for start, end in runs(zero, period=256)
                    if end - start >= MIN_COMPRESS_RUN)
    assert_succeeded(migration.run(blocks), blocks)
    result = migration.source.result  # type: ignore[union-attr]
    # Every page goes once, written or as COMPRESS; long zero runs always as COMPRESS.
    assert result.zero_pages + result.bytes_written // 4096 == blocks[0].pages
    assert long_runs <= result.zero_pages <= np.count_nonzero(zero)


def test_short_zero_runs_travel_with_their_data(migration: Migration) -> None:
    blocks = [RamBlock.anonymous("ram0", 2 * MiB)]
    pages = blocks[0].array.reshape(-1, 4096)
    pages[0:256:2] = 7  # chunk 0: data and zero pages alternate; chunk 1: all zero
    assert_succeeded(migration.run(blocks), blocks)
    result = migration.source.result  # type: ignore[union-attr]
    assert result.bytes_written == MiB  # the whole first chunk in one write
    assert result.zero_pages == 256


@pytest.mark.parametrize("inline", [True, False], ids=["inline", "not negotiated"])
def test_a_chunk_with_few_data_pages_travels_inline(migration: Migration,
                                                     inline: bool) -> None:
    blocks = [RamBlock.anonymous("ram0", 8 * MiB)]
    pages = blocks[0].array.reshape(-1, 4096)
    pages[2 * 256 + 7] = 1  # chunk 2: three data pages
    pages[2 * 256 + 100:2 * 256 + 102] = 2
    pages[5 * 256 + 10:5 * 256 + 30] = 3  # chunk 5: twenty, over the limit of 16
    requested = DEFAULT_CAPS if inline else DEFAULT_CAPS & ~Capability.INLINE
    assert_succeeded(migration.run(blocks, requested=requested), blocks)
    result = migration.source.result  # type: ignore[union-attr]
    assert result.inline_pages == (3 if inline else 0)
    assert result.registrations == (1 if inline else 2)
    # Short zero runs go with their data: pages 0-29 of chunk 5, 0-7 and 100-101 of 2.
    assert result.bytes_written == (30 if inline else 40) * 4096
    assert migration.destination.result.inline_pages == result.inline_pages  # type: ignore[union-attr]


def test_all_zero_chunks_are_never_registered(migration: Migration) -> None:
    blocks = [RamBlock.anonymous("ram0", 8 * MiB)]
    blocks[0].array[5 * MiB:5 * MiB + 10] = 7  # one data page: registered without INLINE
    assert_succeeded(migration.run(blocks, requested=DEFAULT_CAPS & ~Capability.INLINE),
                     blocks)
    assert migration.source.result.registrations == 1  # type: ignore[union-attr]


class _CountsRegistrations:
    """The source's endpoint, counting the regions it registers (its pins)."""

    def __init__(self, inner: Any) -> None:
        self._inner, self.lengths = inner, []

    def register(self, **kwargs: Any) -> MemoryRegion:
        region = self._inner.register(**kwargs)
        self.lengths.append(region.length)
        return region

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


@pytest.mark.parametrize("batch", [True, False], ids=["BATCH", "no BATCH (as QEMU)"])
def test_a_policy_that_keeps_everything_pins_a_windows_run_at_once(
        migration: Migration, batch: bool) -> None:
    # 96 MiB: windows of 64 chunks, then the 32 left. Chunks 10 and 11 are zero,
    # never registered, so the first window's run breaks there.
    blocks = guest(96 * MiB)
    blocks[0].array[10 * MiB:12 * MiB] = 0
    spies: list[_CountsRegistrations] = []

    def spy(endpoint: Any) -> _CountsRegistrations:
        spies.append(_CountsRegistrations(endpoint))
        return spies[-1]

    requested = DEFAULT_CAPS if batch else DEFAULT_CAPS & ~Capability.BATCH
    migration.run(blocks, requested=requested & ~Capability.INLINE, wrap_source=spy)
    assert_succeeded(migration, blocks)
    assert migration.source.result.registrations == 94  # type: ignore[union-attr]
    if batch:  # one pin per run of each window (one REGISTER entry: one pin there too)
        assert spies[0].lengths == [10 * MiB, 52 * MiB, 32 * MiB]
        assert migration.destination.result.registrations == 94  # type: ignore[union-attr]
    else:  # QEMU asks for one chunk at a time: so does a source for it
        assert spies[0].lengths == [MiB] * 94


def test_pin_all_registers_blocks_whole(migration: Migration) -> None:
    blocks = guest(6 * MiB, 2 * MiB)
    migration.run(blocks, requested=DEFAULT_CAPS | Capability.PIN_ALL)
    assert_succeeded(migration, blocks)
    assert migration.destination.result.registrations == 2  # type: ignore[union-attr]
    assert migration.destination.result.pinned_peak_bytes == 8 * MiB  # type: ignore[union-attr]


def test_without_batching_one_entry_per_message(migration: Migration) -> None:
    blocks = guest(4 * MiB, zero_fraction=0.5)
    migration.run(blocks, requested=Capability.VERIFY)
    assert_succeeded(migration, blocks)


def test_live_dirtying_converges_and_carries_state(migration: Migration) -> None:
    blocks = guest(64 * MiB)
    workload = SyntheticWorkload(blocks, rate=200 * MiB, pattern="hotspot")
    workload.start()
    try:
        migration.run(blocks, workload=workload,
                      config=SourceConfig(max_downtime=0.05, timeout=20))
    finally:
        workload.close()
    assert_succeeded(migration, blocks)
    source = migration.source.result  # type: ignore[union-attr]
    # Pages dirtied during the bulk round went again (iterations or stop-and-copy).
    assert source.bytes_written > 64 * MiB
    state = json.loads(migration.destination.result.state)  # type: ignore[union-attr]
    assert state["pages_written"] == workload.pages_written > 0


def test_checksum_tracker_finds_writes_nobody_marked(migration: Migration) -> None:
    blocks = guest(4 * MiB)
    tracker = ChecksumTracker(blocks[0])
    blocks[0].take_dirty()
    blocks[0].array[123 * 4096 + 5] ^= 0xFF  # written behind rdmamig's back
    blocks[0].array[700 * 4096] ^= 0x01
    assert tracker.scan() == 2
    assert np.flatnonzero(blocks[0].take_dirty()).tolist() == [123, 700]
    blocks[0].mark_dirty(0, blocks[0].length)
    assert_succeeded(migration.run(blocks, trackers=[tracker]), blocks)


def test_mismatched_blocks_fail_before_any_page_moves(migration: Migration) -> None:
    blocks = guest(4 * MiB)
    theirs = [RamBlock.anonymous("other", 4 * MiB)]
    migration.run(blocks, dest_blocks=theirs)
    assert "RAM blocks do not match: source has ram0=4194304; destination has other=4194304" \
        in str(migration.destination_error)
    assert isinstance(migration.source_error, MigrationError)
    assert migration.source.result.bytes_written == 0  # type: ignore[union-attr]
    assert not theirs[0].array.any()
    assert migration.pinned_after == (0, 0)


class _CorruptNth:
    """Wraps an endpoint; its ``nth`` control message goes out with type 99."""

    def __init__(self, inner: Any, nth: int) -> None:
        self._inner, self._left = inner, nth

    def send_message(self, *, data: bytes) -> None:
        self._left -= 1
        if self._left == 0:
            data = data[:4] + (99).to_bytes(4, "big") + data[8:]
        self._inner.send_message(data=data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def test_corrupted_message_aborts_both_sides_cleanly(migration: Migration) -> None:
    blocks = guest(8 * MiB)
    before = [b.digest() for b in blocks]
    migration.run(blocks, wrap_source=lambda endpoint: _CorruptNth(endpoint, 6))
    assert "type=99 at offset 4: unknown command" in str(migration.destination_error)
    assert "the destination gave up: type=99 at offset 4" in str(migration.source_error)
    assert not migration.destination.result.completed  # type: ignore[union-attr]
    assert [b.digest() for b in blocks] == before
    assert migration.pinned_after == (0, 0)


class _Raises(UnpinPolicy):
    name = "test-raises"

    def select_unpin(self, *, pinned: Any, needed_bytes: int) -> Any:
        raise ValueError("boom")


class _UnpinsInFlight(UnpinPolicy):
    name = "test-in-flight"

    def __init__(self, options: PolicyOptions) -> None:
        super().__init__(options)
        self.registered: list[ChunkId] = []

    def chunk_registered(self, *, chunk: ChunkId, nbytes: int) -> None:
        self.registered.append(chunk)

    def select_unpin(self, *, pinned: Any, needed_bytes: int) -> Any:
        return self.registered[-1:]  # the newest chunk: its batch is still in flight


@pytest.mark.parametrize(("policy", "error"), [
    (_Raises, "unpin policy 'test-raises' failed: ValueError: boom"),
    (_UnpinsInFlight, "which has a write in flight; refused"),
])
def test_a_broken_policy_cannot_corrupt_a_migration(migration: Migration, policy: Any,
                                                    error: str) -> None:
    blocks = guest(4 * MiB)
    before = [b.digest() for b in blocks]
    migration.run(blocks, policy=policy(PolicyOptions()))
    assert error in str(migration.source_error)
    assert not migration.destination.result.completed  # type: ignore[union-attr]
    assert [b.digest() for b in blocks] == before
    assert migration.pinned_after == (0, 0)


@pytest.mark.parametrize("name", ["pin-until-done", "pin-all", "eager", "lru", "memlock",
                                  "hints", "example-oldest-half"])
def test_every_policy_migrates_a_live_guest(migration: Migration, name: str) -> None:
    from rdmamig.plugins import load_registry
    from rdmamig.policy import Hint

    cls = load_registry().policy(name)
    cap = 6 * MiB
    options = PolicyOptions(pin_cap=cap, hints=(
        Hint(kind="hot", block="ram0", offset=0, length=2 * MiB),
        Hint(kind="cold", block="ram0", offset=8 * MiB, length=8 * MiB)))
    policy = cls(options)
    blocks = guest(24 * MiB)
    workload = SyntheticWorkload(blocks, rate=100 * MiB, pattern="hotspot")
    workload.start()
    try:
        migration.run(blocks, policy=policy, workload=workload,
                      requested=DEFAULT_CAPS | cls.capabilities,
                      config=SourceConfig(max_downtime=0.02, timeout=20))
    finally:
        workload.close()
    assert_succeeded(migration, blocks)
    source = migration.source.result  # type: ignore[union-attr]
    destination = migration.destination.result  # type: ignore[union-attr]
    if policy.pin_cap is not None and policy.pin_cap < 24 * MiB:
        assert source.pinned_peak_bytes <= policy.pin_cap
        assert destination.pinned_peak_bytes <= policy.pin_cap
    if name in ("eager", "lru", "hints"):
        assert source.unregistrations > 0
        assert destination.unregistrations == source.unregistrations
    if name in ("pin-until-done", "pin-all"):
        assert source.unregistrations == 0


@pytest.mark.parametrize("async_unregister", [True, False])
def test_lru_keeps_its_cap_with_and_without_the_unpin_worker(
        migration: Migration, async_unregister: bool) -> None:
    from rdmamig_policies.lru import Lru

    blocks = guest(32 * MiB)
    policy = Lru(PolicyOptions(pin_cap=4 * MiB))
    migration.run(blocks, policy=policy,
                  config=SourceConfig(timeout=20, async_unregister=async_unregister))
    assert_succeeded(migration, blocks)
    source = migration.source.result  # type: ignore[union-attr]
    assert source.pinned_peak_bytes <= 4 * MiB
    assert migration.destination.result.pinned_peak_bytes <= 4 * MiB  # type: ignore[union-attr]
    assert source.unregistrations >= 28


class _CountsInFlight:
    """Wraps an endpoint; records the most write batches posted and not yet waited
    for."""

    def __init__(self, inner: Any) -> None:
        self._inner, self._posted, self._waited, self.most = inner, 0, 0, 0

    def post_writes(self, *, writes: Any) -> int:
        return self._posting(self._inner.post_writes(writes=writes))

    def post_writes_with(self, *, writes: Any, alongside: Any) -> int:
        return self._posting(self._inner.post_writes_with(writes=writes, alongside=alongside))

    def _posting(self, ticket: int) -> int:
        self._posted = ticket
        self.most = max(self.most, self._posted - self._waited)
        return ticket

    def wait_writes(self, *, ticket: int, timeout: float | None) -> None:
        self._inner.wait_writes(ticket=ticket, timeout=timeout)
        self._waited = max(self._waited, ticket)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class _RewritesEverythingOnce:
    """A tracker that finds the whole block dirty after the first round (a guest
    that rewrote all of it), so that the next round writes pinned chunks only."""

    def __init__(self, block: RamBlock) -> None:
        self.block, self.scans = block, 0

    def scan(self) -> int:
        self.scans += 1
        if self.scans == 2:
            self.block.mark_dirty(0, self.block.length)
        return 0


def test_windows_that_register_nothing_keep_two_windows_in_flight(
        migration: Migration) -> None:
    # A cap the RAM fits in: every chunk stays pinned, windows are 64 chunks in 8
    # batches, and the second round registers nothing.
    blocks = guest(256 * MiB)
    spies: list[_CountsInFlight] = []

    def spy(endpoint: Any) -> _CountsInFlight:
        spies.append(_CountsInFlight(endpoint))
        return spies[-1]

    migration.run(blocks, policy=Lru(PolicyOptions(pin_cap=512 * MiB)),
                  trackers=[_RewritesEverythingOnce(blocks[0])], wrap_source=spy)
    assert_succeeded(migration, blocks)
    assert migration.source.result.bytes_written == 512 * MiB  # type: ignore[union-attr]
    assert 8 < spies[0].most <= 16


def test_auto_converge_throttles_a_workload_that_outpaces_the_link(
        migration: Migration) -> None:
    class DirtiesEverything:
        """A workload that dirties the whole block in every round it runs through,
        as fast as the link (a tracker the source scans before and after each
        round: deterministic, where a dirtying thread had to win the GIL in time)."""

        def __init__(self, block: RamBlock) -> None:
            self.block, self.throttled, self.running = block, 0.0, True

        def scan(self) -> int:
            if self.running:
                self.block.mark_dirty(0, self.block.length)
            return 0

        def stop(self) -> None:
            self.running = False

        def resume(self) -> None:
            self.running = True

        def throttle(self, fraction: float) -> None:
            self.throttled = fraction

        def state(self) -> bytes:
            return b""

    blocks = guest(16 * MiB)
    workload = DirtiesEverything(blocks[0])
    migration.run(blocks, workload=workload, trackers=[workload], config=SourceConfig(
        max_downtime=0.0001, max_iterations=6, auto_converge=True, timeout=20))
    assert_succeeded(migration, blocks)
    source = migration.source.result  # type: ignore[union-attr]
    assert source.iterations == 7  # the limit, then stop-and-copy
    assert source.throttle >= 0.6  # 20 % after the first round, +10 % after each other
    assert workload.throttled == source.throttle


def test_a_chunk_about_to_be_written_keeps_its_registration_partner(
        migration: Migration) -> None:
    # lru at 8 MiB on 16 MiB: 2-chunk windows, so chunks are registered in 2 MiB
    # pairs. After the bulk round chunk 9 (pinned, paired with 8) and chunk 0 (not
    # pinned) are dirtied: registering 0 needs room, and the pair 8-9 must not be
    # what goes, as 9 is about to be written.
    blocks = guest(16 * MiB)
    block = blocks[0]

    class DirtiesAfterBulk(Lru):
        def iteration_ended(self, *, iteration: int) -> None:
            super().iteration_ended(iteration=iteration)
            if iteration == 0:
                for offset in (9 * MiB, 0):
                    block.array[offset:offset + 20 * 4096] = 0x5A
                    block.mark_dirty(offset, 20 * 4096)

    policy = DirtiesAfterBulk(PolicyOptions(pin_cap=8 * MiB))
    assert_succeeded(migration.run(blocks, policy=policy), blocks)
    result = migration.source.result  # type: ignore[union-attr]
    assert result.pinned_peak_bytes <= 8 * MiB
    assert result.iterations == 2


def test_the_downtime_estimate_counts_inline_pages_and_registrations(
        migration: Migration) -> None:
    blocks = guest(8 * MiB)
    migration.run(blocks, policy=Lru(PolicyOptions(pin_cap=4 * MiB)))
    source = migration.source
    assert source is not None
    # 8 MiB handled in 1 s: 4 MiB left take 0.5 s when nothing needs registering.
    round_ = RoundCounters(written_bytes=6 * MiB, zero_pages=512, elapsed_s=1.0)
    assert source.downtime_estimate(4 * MiB, round_) == pytest.approx(0.5)
    # Inline pages count as handled; the rate is over the whole round (writes go on
    # during registrations); registrations add their measured cost for each dirty
    # chunk that is not pinned (after the run, none is) and has more dirty pages
    # than go inline.
    round_ = RoundCounters(written_bytes=4 * MiB, inline_pages=512, zero_pages=512,
                           registrations=4, registering_s=0.2, elapsed_s=1.2)
    blocks[0].mark_dirty(0, 2 * MiB)  # two chunks, 256 dirty pages each
    blocks[0].mark_dirty(3 * MiB, 4 * 4096)  # a chunk with four: goes inline
    assert source.downtime_estimate(4 * MiB, round_) == pytest.approx(0.6 + 2 * 0.2 / 4)


class _RecordsRepeats:
    """Wraps an endpoint; records (command, repeat) of every control message sent."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.sent: list[tuple[wire.Command, int]] = []

    def send_message(self, *, data: bytes) -> None:
        _length, command, repeat, _pad = wire.HEADER.unpack_from(data)
        self.sent.append((wire.Command(command), repeat))
        self._inner.send_message(data=data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


@pytest.mark.parametrize("batch", [True, False], ids=["BATCH", "no BATCH (as QEMU)"])
def test_array_messages_carry_one_entry_each_unless_batch_was_negotiated(
        migration: Migration, batch: bool) -> None:
    # Zero runs (COMPRESS), many registrations (REGISTER) and an unpinning policy
    # (UNREGISTER): every array message the source sends, more than one entry each.
    blocks = guest(32 * MiB)
    for chunk in range(16, 32, 2):  # zero chunks between chunks of data
        blocks[0].array[chunk * MiB:(chunk + 1) * MiB] = 0
    spies: list[_RecordsRepeats] = []

    def spy(endpoint: Any) -> _RecordsRepeats:
        spies.append(_RecordsRepeats(endpoint))
        return spies[0]

    from rdmamig_policies.simple import Eager
    requested = DEFAULT_CAPS if batch else DEFAULT_CAPS & ~Capability.BATCH
    migration.run(blocks, requested=requested, policy=Eager(PolicyOptions()), wrap_source=spy)
    assert_succeeded(migration, blocks)
    arrays = (wire.Command.REGISTER_REQUEST, wire.Command.UNREGISTER_REQUEST,
              wire.Command.COMPRESS)
    most = {command: max((r for c, r in spies[0].sent if c == command), default=0)
            for command in arrays}
    if batch:
        assert all(count > 1 for count in most.values()), most
    else:
        assert most == dict.fromkeys(arrays, 1)


def test_qemus_stream_between_a_source_and_a_destination(migration: Migration) -> None:
    # The framing QEMU's RDMA migration puts around the rounds (HOOK, EOS, footers,
    # the device state at the end), here between rdmamig's own two ends; against
    # an unmodified QEMU it runs in the soft-RoCE guest (tests/rxe).
    from rdmamig.engine.outgoing import QemuStream
    from rdmamig.qemu.origin import QemuOrigin
    from rdmamig.qemu.stream import encode_configuration
    from test_qemu_stream import device_state

    blocks = guest(4 * MiB, 128 * 1024, zero_fraction=0.3)
    origin = QemuOrigin(machine="pc-i440fx-7.2", configuration=encode_configuration(
        "pc-i440fx-7.2"), ram_section_id=2, devices=("timer/0",))
    state = device_state({"devices": [{"name": "timer", "instance_id": 0}]})

    class Device:
        def stop(self) -> None: ...
        def resume(self) -> None: ...
        def throttle(self, fraction: float) -> None: ...
        def state(self) -> bytes:
            return state

    migration.run(blocks, stream=QemuStream(origin), workload=Device())
    assert_succeeded(migration, blocks)
    result = migration.destination.result  # type: ignore[union-attr]
    assert result.peer == "qemu" and result.state == state
    assert result.origin == origin.record([None, None])


def test_the_source_is_done_only_once_the_destination_has_kept_the_migration(
        migration: Migration) -> None:
    blocks = [RamBlock.anonymous("ram", 4 * MiB)]
    blocks[0].array[:] = 5
    seen: list[tuple[bool, int]] = []

    def keep(destination: Destination) -> None:
        assert migration.source is not None
        # Verified, every key already revoked, the source not told yet.
        seen.append((migration.source.result.committed, destination.endpoint.pinned_bytes))
        assert destination.result.verified

    assert_succeeded(migration.run(blocks, keep=keep), blocks)
    assert seen == [(False, 0)]
    assert migration.source.result.committed  # type: ignore[union-attr]


def test_a_destination_that_cannot_keep_the_migration_fails_the_source(
        migration: Migration) -> None:
    blocks = [RamBlock.anonymous("ram", 2 * MiB)]

    def keep(destination: Destination) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    migration.run(blocks, keep=keep)
    assert migration.source is not None and migration.destination is not None
    assert "could not keep the migration" in str(migration.source_error)
    assert "No space left on device" in str(migration.source_error)
    assert migration.source.result.verified and not migration.source.result.committed
    assert not migration.destination.result.committed


def test_max_bandwidth_holds_the_writes_rate_and_can_be_lifted(migration: Migration) -> None:
    # Paced at 8 MiB/s, 16 MiB cannot take less than 2 s, less the 0.1 s of credit
    # and the first piece (a lower bound only: a slow machine is slower still).
    blocks = guest(16 * MiB)
    migration.run(blocks, config=SourceConfig(timeout=20, max_bandwidth=8 * MiB))
    assert_succeeded(migration, blocks)
    result = migration.source.result  # type: ignore[union-attr]
    assert result.bytes_written == 16 * MiB
    assert result.total_time_s >= (16 * MiB - 0.1 * 8 * MiB - 0.8 * MiB) / (8 * MiB)
    # At 1 MiB/s, 64 MiB would take a minute; lifted (migrate-set-parameters
    # max-bandwidth 0) after a moment, it completes at once.
    blocks = guest(64 * MiB)
    lifted = Migration()
    monitor = Monitor(total_bytes=64 * MiB, max_downtime=0.3, max_bandwidth=MiB)
    timer = threading.Timer(0.5, lambda: monitor.parameters.set(max_bandwidth=0))
    timer.start()
    lifted.run(blocks, monitor=monitor)
    timer.join()
    assert_succeeded(lifted, blocks)
    assert lifted.source.result.total_time_s < 30  # type: ignore[union-attr]


def test_a_paced_batch_is_posted_in_pieces_that_cover_it_exactly() -> None:
    region = MemoryRegion(addr=0x1000, length=8 * MiB, lkey=1, rkey=0)
    writes = [RemoteWrite(region=region, offset=0, length=3 * MiB, remote_addr=1 << 40, rkey=7),
              RemoteWrite(region=region, offset=4 * MiB, length=MiB + 4096,
                          remote_addr=(1 << 40) + 4 * MiB, rkey=7)]
    pieces = _pieces(writes, MiB)
    assert [sum(w.length for w in piece) for piece in pieces] == [MiB] * 4 + [4096]
    flat = [w for piece in pieces for w in piece]
    assert [(w.offset, w.remote_addr - (1 << 40)) for w in flat] == [
        (0, 0), (MiB, MiB), (2 * MiB, 2 * MiB), (4 * MiB, 4 * MiB), (5 * MiB, 5 * MiB)]
    assert _pieces(writes, None) == [writes] == _pieces(writes, 8 * MiB)


def test_remaining_counts_what_the_pass_has_not_sent_yet(migration: Migration) -> None:
    # QEMU's ram.remaining during the bulk round is what is left of it, not 0.
    blocks = guest(32 * MiB)
    monitor = Monitor(total_bytes=32 * MiB, max_downtime=0.3)
    seen: list[tuple[int, int]] = []

    def sample(_sample: dict[str, float]) -> None:
        ram = monitor.query()["ram"]
        if ram["dirty-sync-count"] == 1:
            seen.append((ram["remaining"], ram["transferred"]))

    migration.run(blocks, monitor=monitor, on_progress=sample,
                  config=SourceConfig(timeout=20, batch_chunks=4, window_chunks=4))
    assert_succeeded(migration, blocks)
    assert len(seen) > 4
    remaining = [r for r, _t in seen]
    assert remaining == sorted(remaining, reverse=True) and remaining[0] > 24 * MiB
    assert all(r + t >= 28 * MiB for r, t in seen[:-1])  # at most a window queued, unposted


def test_transferred_moves_with_the_writes_posted_not_the_windows_queued(
        migration: Migration) -> None:
    # One window of 32 chunks in batches of 4: query-migrate's transferred goes up
    # a batch at a time as they are posted, not all at once when the window is.
    blocks = guest(32 * MiB)
    monitor = Monitor(total_bytes=32 * MiB, max_downtime=0.3)
    seen: list[int] = []
    update = monitor.update

    def recording(**figures: Any) -> None:
        if figures.get("transferred") is not None:
            seen.append(figures["transferred"])
        update(**figures)

    monitor.update = recording  # type: ignore[method-assign]
    migration.run(blocks, monitor=monitor,
                  config=SourceConfig(timeout=20, batch_chunks=4, window_chunks=32))
    assert_succeeded(migration, blocks)
    assert seen == sorted(seen)
    assert len({value for value in seen if 0 < value < max(seen)}) >= 6


def test_mbps_at_the_end_is_the_whole_migrations_rate() -> None:
    monitor = Monitor(total_bytes=64 * MiB, max_downtime=0.3)
    monitor.set_status(Status.SETUP)
    monitor.update(transferred=64 * MiB)
    monitor.set_status(Status.COMPLETED)
    answer = monitor.query()
    assert answer["ram"]["mbps"] == round(64 * MiB * 8 / monitor.total_time_s / 1e6, 3)


def test_a_cancelled_migration_reports_what_it_did_as_query_migrate_does(
        migration: Migration) -> None:
    # Paced at 8 MiB/s and cancelled after 0.5 s: a few MiB of 32 went out.
    blocks = guest(32 * MiB)
    monitor = Monitor(total_bytes=32 * MiB, max_downtime=0.3, max_bandwidth=8 * MiB)
    timer = threading.Timer(0.5, monitor.cancel)
    timer.start()
    migration.run(blocks, monitor=monitor)
    timer.join()
    assert isinstance(migration.source_error, MigrationCancelledError)
    result, ram = migration.source.result, monitor.query()["ram"]  # type: ignore[union-attr]
    assert result.iterations == ram["dirty-sync-count"] == 1
    assert result.bytes_written == ram["transferred"] < 32 * MiB


def test_the_timeline_counts_writes_as_they_complete(migration: Migration) -> None:
    blocks = guest(32 * MiB)
    migration.run(blocks, config=SourceConfig(timeout=20, batch_chunks=4, window_chunks=16))
    assert_succeeded(migration, blocks)
    result = migration.source.result  # type: ignore[union-attr]
    completed = [s["bytes_completed"] for s in result.timeline]
    assert completed == sorted(completed)
    assert all(s["bytes_completed"] <= s["bytes_written"] for s in result.timeline)
    assert completed[-1] == result.bytes_written
    assert len(set(completed)) > 4  # sampled as batches complete, not once a window


def test_the_plotted_rate_follows_completions_not_windows_queued() -> None:
    # A window of 256 MiB queued at once at 0.1 s, carried at 1 GiB/s: the plotted
    # rate is 1 GiB/s throughout, never the queue's jump.
    samples = [{"t": i / 100, "bytes_written": float(256 * MiB if i >= 10 else 0),
                "bytes_completed": float(max(i - 10, 0) * (1 << 30) / 100)}
               for i in range(10, 36)]
    _t, rate = rate_series(samples)
    assert rate.max() == pytest.approx((1 << 30) / 1e9)
