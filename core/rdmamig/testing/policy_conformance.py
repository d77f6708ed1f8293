"""The policy conformance suite: what every unpin policy must do.

Subclass :class:`PolicyConformance` and provide a ``policy_name`` fixture, as for
backends. The suite drives the policy with the events the engine sends and checks
its answers: only pinned chunks, never one whose write has not completed, no
duplicates, and – for a policy with a pin cap – room made under the cap.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from ..plugins import load_registry
from ..policy import CHUNK_SIZE, ChunkId, Hint, PolicyOptions, UnpinPolicy

CAP = 8 * CHUNK_SIZE
OPTIONS = PolicyOptions(pin_cap=CAP, hints=(
    Hint(kind="cold", block="ram0", offset=0, length=4 * CHUNK_SIZE),
    Hint(kind="hot", block="ram0", offset=10 * CHUNK_SIZE, length=2 * CHUNK_SIZE)))


class PolicyConformance:
    """Tests every unpin policy must pass. Needs a ``policy_name`` fixture."""

    @pytest.fixture
    def make_policy(self, policy_name: str) -> Callable[[], UnpinPolicy]:
        cls = load_registry().policy(policy_name)

        def make() -> UnpinPolicy:
            policy = cls(OPTIONS)
            policy.set_block_names(("ram0", "ram1"))
            return policy
        return make

    def _run(self, policy: UnpinPolicy, chunks: list[ChunkId], *,
             write_lag: int = 1) -> dict[ChunkId, int]:
        """Register chunks one by one as the engine does: make room, register, and
        report writes ``write_lag`` chunks later. Returns what stays pinned."""
        pinned: dict[ChunkId, int] = {}
        in_flight: list[ChunkId] = []
        for chunk in chunks:
            chosen = list(policy.select_unpin(pinned=dict(pinned), needed_bytes=CHUNK_SIZE))
            assert len(chosen) == len(set(chosen)), f"duplicates in {chosen}"
            for victim in chosen:
                assert victim in pinned, f"{victim} is not pinned"
                assert victim not in in_flight, f"{victim} has a write in flight"
                del pinned[victim]
                policy.chunk_unpinned(chunk=victim)
            if policy.pin_cap is not None:
                assert sum(pinned.values()) + CHUNK_SIZE <= policy.pin_cap or len(
                    in_flight) * CHUNK_SIZE + CHUNK_SIZE > policy.pin_cap
            pinned[chunk] = CHUNK_SIZE
            policy.chunk_registered(chunk=chunk, nbytes=CHUNK_SIZE)
            in_flight.append(chunk)
            while len(in_flight) > write_lag:
                policy.chunk_written(chunk=in_flight.pop(0))
        return pinned

    def test_nothing_pinned_nothing_chosen(self, make_policy: Callable[[], UnpinPolicy]
                                           ) -> None:
        assert list(make_policy().select_unpin(pinned={}, needed_bytes=CHUNK_SIZE)) == []

    def test_answers_name_only_pinned_completed_chunks(
            self, make_policy: Callable[[], UnpinPolicy]) -> None:
        self._run(make_policy(), [ChunkId(0, i) for i in range(40)])

    def test_chunks_written_again_are_handled(self, make_policy: Callable[[], UnpinPolicy]
                                              ) -> None:
        policy = make_policy()
        pinned = self._run(policy, [ChunkId(0, i) for i in range(20)], write_lag=0)
        for chunk in list(pinned)[:3]:
            policy.chunk_dirtied(chunk=chunk)
            policy.chunk_written(chunk=chunk)
        policy.iteration_ended(iteration=1)
        policy.pressure(needed_bytes=CHUNK_SIZE, pinned_bytes=sum(pinned.values()))
        for chunk in policy.select_unpin(pinned=pinned, needed_bytes=0):
            assert chunk in pinned

    def test_a_registered_but_unwritten_chunk_is_never_chosen(
            self, make_policy: Callable[[], UnpinPolicy]) -> None:
        policy = make_policy()
        pinned = {ChunkId(1, i): CHUNK_SIZE for i in range(16)}
        for chunk in pinned:
            policy.chunk_registered(chunk=chunk, nbytes=CHUNK_SIZE)
        assert list(policy.select_unpin(pinned=pinned, needed_bytes=CHUNK_SIZE)) == []

    def test_a_chunk_being_rewritten_is_never_chosen(
            self, make_policy: Callable[[], UnpinPolicy]) -> None:
        policy = make_policy()
        pinned = {ChunkId(0, i): CHUNK_SIZE for i in range(16)}
        for chunk in pinned:
            policy.chunk_registered(chunk=chunk, nbytes=CHUNK_SIZE)
            policy.chunk_written(chunk=chunk)
            policy.chunk_dirtied(chunk=chunk)  # written again: in flight
        assert list(policy.select_unpin(pinned=pinned, needed_bytes=CHUNK_SIZE)) == []
