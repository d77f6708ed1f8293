"""The built-in unpin policies: conformance and behaviour on event sequences."""

from __future__ import annotations

import pytest
from rdmamig.caps import Capability
from rdmamig.errors import ConfigurationError
from rdmamig.plugins import load_registry
from rdmamig.policy import CHUNK_SIZE as MiB
from rdmamig.policy import ChunkId, Hint, PolicyOptions
from rdmamig.testing.policy_conformance import PolicyConformance
from rdmamig_policies import lru as lru_module
from rdmamig_policies.hints import Hints
from rdmamig_policies.lru import Lru, Memlock
from rdmamig_policies.simple import Eager, PinAll

C = [ChunkId(0, i) for i in range(32)]


@pytest.fixture(params=sorted(load_registry().policies))
def policy_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class TestPolicyConformance(PolicyConformance):
    pass


def written(policy: object, chunks: list[ChunkId]) -> dict[ChunkId, int]:
    for chunk in chunks:
        policy.chunk_registered(chunk=chunk, nbytes=MiB)  # type: ignore[attr-defined]
        policy.chunk_written(chunk=chunk)  # type: ignore[attr-defined]
    return dict.fromkeys(chunks, MiB)


def test_pin_all_asks_for_the_capability() -> None:
    assert PinAll.capabilities == Capability.PIN_ALL
    assert list(PinAll(PolicyOptions()).select_unpin(pinned={C[0]: MiB}, needed_bytes=MiB)) == []


def test_eager_unpins_exactly_the_written_chunks() -> None:
    eager = Eager(PolicyOptions())
    pinned = written(eager, C[:3])
    eager.chunk_registered(chunk=C[3], nbytes=MiB)
    pinned[C[3]] = MiB
    assert list(eager.select_unpin(pinned=pinned, needed_bytes=0)) == C[:3]


def test_lru_needs_a_cap() -> None:
    with pytest.raises(ConfigurationError, match="policy 'lru' needs --pin-cap BYTES"):
        Lru(PolicyOptions())
    with pytest.raises(ConfigurationError, match="below two chunks"):
        Lru(PolicyOptions(pin_cap=MiB))


def test_lru_evicts_least_recently_written_and_keeps_rewritten_chunks_hot() -> None:
    lru = Lru(PolicyOptions(pin_cap=4 * MiB))
    pinned = written(lru, C[:4])
    lru.chunk_dirtied(chunk=C[0])
    lru.chunk_written(chunk=C[0])  # rewritten: now the most recent
    assert list(lru.select_unpin(pinned=pinned, needed_bytes=0)) == []
    assert list(lru.select_unpin(pinned=pinned, needed_bytes=2 * MiB)) == [C[1], C[2]]


def test_memlock_takes_its_cap_from_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lru_module, "memlock_applies", lambda: True)
    monkeypatch.setattr(lru_module, "memlock_limit", lambda: 8 * MiB)
    monkeypatch.setattr(lru_module, "locked_bytes", lambda: 1 * MiB)
    assert Memlock(PolicyOptions()).pin_cap == 8 * MiB - MiB - Memlock.MARGIN
    assert Memlock(PolicyOptions(pin_cap=3 * MiB)).pin_cap == 3 * MiB


def test_memlock_without_a_binding_limit_has_no_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lru_module, "memlock_applies", lambda: False)
    monkeypatch.setattr(lru_module, "memlock_limit", lambda: 8 * MiB)
    assert Memlock(PolicyOptions()).pin_cap == 2**62


def test_memlock_under_a_tiny_limit_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lru_module, "memlock_applies", lambda: True)
    monkeypatch.setattr(lru_module, "memlock_limit", lambda: 2 * MiB)
    monkeypatch.setattr(lru_module, "locked_bytes", lambda: 0)
    with pytest.raises(ConfigurationError, match="'memlock': a pin cap of 1048576 bytes"):
        Memlock(PolicyOptions())


def test_hints_unpin_cold_first_and_keep_hot() -> None:
    hints = Hints(PolicyOptions(pin_cap=4 * MiB, hints=(
        Hint(kind="cold", block="ram0", offset=2 * MiB, length=MiB),
        Hint(kind="hot", block="ram0", offset=0, length=MiB))))
    hints.set_block_names(("ram0",))
    pinned = written(hints, C[:4])
    assert list(hints.select_unpin(pinned=pinned, needed_bytes=0)) == [C[2]]
    rest = {c: MiB for c in C[:4] if c != C[2]}
    hints.chunk_unpinned(chunk=C[2])
    # Over the cap by two chunks: C[1] and C[3] go before the hot C[0].
    assert list(hints.select_unpin(pinned=rest, needed_bytes=3 * MiB)) == [C[1], C[3]]


def test_hints_added_at_run_time() -> None:
    hints = Hints(PolicyOptions())
    hints.set_block_names(("ram0",))
    pinned = written(hints, C[:3])
    assert list(hints.select_unpin(pinned=pinned, needed_bytes=0)) == []
    hints.add_hint(Hint(kind="cold", block="ram0", offset=MiB, length=2 * MiB))
    assert list(hints.select_unpin(pinned=pinned, needed_bytes=0)) == [C[1], C[2]]


def test_a_hint_on_an_unknown_block_is_a_clear_error() -> None:
    hints = Hints(PolicyOptions(hints=(Hint(kind="hot", block="nope", offset=0, length=1),)))
    with pytest.raises(ConfigurationError, match="hint names block 'nope'; blocks are ram0"):
        hints.set_block_names(("ram0",))


def test_lru_keeps_a_rewritten_hot_set_through_address_order_scans() -> None:
    """Rounds scan chunks in address order: hot chunks 0-3 are written every round,
    then eight cold chunks never written again – more than the cap holds, so plain
    LRU would end every round with only cold chunks pinned. Ranked by their previous
    write, the hot chunks stay pinned from their first rewrite on."""
    lru = Lru(PolicyOptions(pin_cap=8 * MiB))
    pinned: dict[ChunkId, int] = {}
    registered_hot = 0
    cold = iter(range(4, 1000))
    for _round in range(6):
        for chunk in [*C[:4], *(ChunkId(0, next(cold)) for _ in range(8))]:
            if chunk in pinned:
                lru.chunk_dirtied(chunk=chunk)
            else:
                for victim in lru.select_unpin(pinned=pinned, needed_bytes=MiB):
                    del pinned[victim]
                    lru.chunk_unpinned(chunk=victim)
                pinned[chunk] = MiB
                lru.chunk_registered(chunk=chunk, nbytes=MiB)
                registered_hot += chunk.index < 4
            lru.chunk_written(chunk=chunk)
            assert sum(pinned.values()) <= 8 * MiB
    assert registered_hot == 8  # rounds 1 and 2 (nothing known yet), never again
