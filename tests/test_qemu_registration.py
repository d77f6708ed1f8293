"""rdmamig's registrations as QEMU's destination reads them.

QEMU's destination (``migration/rdma.c``, ``qemu_rdma_registration_handle``) keeps
one memory region per first chunk, ``pmr[chunk]``: a REGISTER REQUEST for a chunk
that has one is answered from it; otherwise it pins ``chunk .. chunk + chunks``
(inclusive, clamped to the block). An UNREGISTER REQUEST drops ``pmr[key]``, which
must exist (QEMU dereferences it). The model below applies those rules to every
message a real rdmamig source sends over TCP and records what QEMU would get wrong.
"""

from __future__ import annotations

from typing import Any

import pytest
from conftest import DEFAULT_CAPS, Migration
from rdmamig import wire
from rdmamig.caps import Capability
from rdmamig.engine import RamBlock, SourceConfig
from rdmamig.policy import PolicyOptions
from rdmamig.workload import fill_guest
from rdmamig_policies.lru import Lru
from rdmamig_policies.simple import Eager

MiB = 1 << 20


class QemuDestinationModel:
    """Wraps the source's endpoint; reads each REGISTER and UNREGISTER REQUEST it
    sends as QEMU's destination would."""

    def __init__(self, inner: Any, blocks: list[RamBlock]) -> None:
        self._inner = inner
        self._lengths = [b.length for b in blocks]
        # RAM BLOCKS RESULT's offsets: the blocks laid end to end, as rdmamig's
        # destination (and QEMU's, for its RAM blocks) lists them.
        self._offsets = [sum(self._lengths[:i]) for i in range(len(blocks))]
        self.pmr: dict[tuple[int, int], range] = {}
        self.pinned: set[tuple[int, int]] = set()
        self.pinned_bytes = 0
        self.peak_bytes = 0
        self.faults: list[str] = []

    def send_message(self, *, data: bytes) -> None:
        message = wire.decode_untrusted(data, extensions=self._inner.capabilities)
        if isinstance(message, wire.RegisterRequest):
            for entry in message.entries:
                self._register(entry)
        elif isinstance(message, wire.UnregisterRequest):
            for entry in message.entries:
                self._unregister(entry)
        self._inner.send_message(data=data)

    def _bytes(self, block: int, chunks: range) -> int:
        end = min(chunks.stop * MiB, self._lengths[block])
        return end - chunks.start * MiB

    def _register(self, entry: wire.Register) -> None:
        block = entry.current_index
        first = (entry.key - self._offsets[block]) >> wire.CHUNK_SHIFT
        if (block, first) in self.pmr:
            return  # answered with the region it holds
        last_chunk = -(-self._lengths[block] // MiB) - 1
        covered = range(first, min(first + entry.chunks, last_chunk) + 1)
        twice = [c for c in covered if (block, c) in self.pinned]
        if twice:
            self.faults.append(f"block {block} chunks {twice} pinned twice")
        self.pmr[(block, first)] = covered
        self.pinned.update((block, c) for c in covered)
        self.pinned_bytes += self._bytes(block, covered)
        self.peak_bytes = max(self.peak_bytes, self.pinned_bytes)

    def _unregister(self, entry: wire.Register) -> None:
        region = self.pmr.pop((entry.current_index, entry.key), None)
        if region is None:
            self.faults.append(f"UNREGISTER of block {entry.current_index} chunk "
                               f"{entry.key}, which has no registration of its own")
            return
        self.pinned.difference_update((entry.current_index, c) for c in region)
        self.pinned_bytes -= self._bytes(entry.current_index, region)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _run(migration: Migration, policy: Any, *, requested: Capability,
         async_unregister: bool = True) -> QemuDestinationModel:
    blocks = [RamBlock.anonymous("pc.ram", 24 * MiB), RamBlock.anonymous("vga", 3 * MiB + 8192)]
    fill_guest(blocks, zero_fraction=0.0)
    models: list[QemuDestinationModel] = []

    def model(endpoint: Any) -> QemuDestinationModel:
        models.append(QemuDestinationModel(endpoint, blocks))
        return models[-1]

    migration.run(blocks, requested=requested, policy=policy, wrap_source=model,
                  config=SourceConfig(timeout=20, async_unregister=async_unregister))
    assert migration.source_error is None and migration.destination_error is None
    assert migration.source is not None and migration.source.result.verified
    return models[0]


AS_QEMU = DEFAULT_CAPS & ~Capability.BATCH  # QEMU negotiates no BATCH: single chunks
POLICIES = {
    "pin-until-done": lambda: None,
    "eager": lambda: Eager(PolicyOptions()),
    "lru 4 MiB": lambda: Lru(PolicyOptions(pin_cap=4 * MiB)),
}


@pytest.mark.parametrize("requested", [AS_QEMU, DEFAULT_CAPS], ids=["as QEMU", "BATCH"])
@pytest.mark.parametrize("policy", POLICIES)
def test_qemu_pins_each_chunk_once_and_is_never_asked_to_drop_a_stranger(
        migration: Migration, policy: str, requested: Capability) -> None:
    model = _run(migration, POLICIES[policy](), requested=requested)
    assert model.faults == []
    assert model.pmr or policy != "pin-until-done"
    # rdmamig's own account of what it had the peer pin is what QEMU pinned.
    assert migration.source is not None
    assert migration.source.result.peer_pinned_peak_bytes == model.peak_bytes


@pytest.mark.parametrize("async_unregister", [True, False], ids=["async", "inline"])
def test_a_capped_policy_holds_qemus_pins_under_its_cap(migration: Migration,
                                                         async_unregister: bool) -> None:
    model = _run(migration, Lru(PolicyOptions(pin_cap=4 * MiB)), requested=AS_QEMU,
                 async_unregister=async_unregister)
    assert model.faults == []
    # The cap, plus at most the one registration unit (1 MiB without BATCH) that is
    # pinned before the unit it replaces is released.
    assert model.peak_bytes <= 4 * MiB + MiB
    assert migration.source is not None and migration.source.result.unregistrations > 20
