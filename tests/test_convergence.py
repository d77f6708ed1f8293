"""Convergence decisions as properties of a round's counters."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from rdmamig.engine.convergence import (
    THROTTLE_INITIAL,
    THROTTLE_MAX,
    RoundCounters,
    chunks_to_register,
    downtime_estimate,
    next_throttle,
)

MiB = 1 << 20

rounds = st.builds(
    RoundCounters,
    written_bytes=st.integers(0, 2**40), inline_pages=st.integers(0, 2**20),
    zero_pages=st.integers(0, 2**20), registrations=st.integers(0, 2**16),
    registering_s=st.floats(0, 100), elapsed_s=st.floats(1e-6, 1000))


def test_the_estimate_is_bytes_at_the_rate_plus_registrations() -> None:
    round_ = RoundCounters(written_bytes=6 * MiB, zero_pages=512, elapsed_s=1.0)
    assert downtime_estimate(4 * MiB, round_, chunks_to_register=3) == pytest.approx(0.5)
    round_ = RoundCounters(written_bytes=4 * MiB, inline_pages=512, zero_pages=512,
                           registrations=4, registering_s=0.2, elapsed_s=1.2)
    assert downtime_estimate(4 * MiB, round_, chunks_to_register=2) == pytest.approx(0.7)


@given(rounds, st.integers(0, 2**40), st.integers(0, 2**40), st.integers(0, 4096))
def test_the_estimate_grows_with_what_is_left(round_: RoundCounters, a: int, b: int,
                                              chunks: int) -> None:
    low, high = sorted((a, b))
    assert 0 <= downtime_estimate(low, round_, chunks_to_register=chunks) <= downtime_estimate(
        high, round_, chunks_to_register=chunks)
    assert downtime_estimate(low, round_, chunks_to_register=0) <= downtime_estimate(
        low, round_, chunks_to_register=chunks)


@given(rounds)
def test_nothing_left_takes_no_time(round_: RoundCounters) -> None:
    assert downtime_estimate(0, round_, chunks_to_register=0) == 0


@given(rounds, st.integers(1, 2**30))
def test_a_faster_round_never_estimates_longer(round_: RoundCounters, more: int) -> None:
    faster = RoundCounters(written_bytes=round_.written_bytes + more,
                           inline_pages=round_.inline_pages, zero_pages=round_.zero_pages,
                           registrations=round_.registrations,
                           registering_s=round_.registering_s, elapsed_s=round_.elapsed_s)
    assert downtime_estimate(MiB, faster, chunks_to_register=1) <= downtime_estimate(
        MiB, round_, chunks_to_register=1)


@given(st.lists(st.tuples(st.integers(0, 256), st.booleans()), max_size=64), st.integers(0, 256))
def test_chunks_to_register_are_the_unpinned_ones_too_dirty_to_go_inline(
        chunks: list[tuple[int, bool]], limit: int) -> None:
    dirty = np.array([d for d, _ in chunks], dtype=np.int64)
    pinned = np.array([p for _, p in chunks], dtype=np.bool_)
    assert chunks_to_register(dirty, pinned, inline_limit=limit) == sum(
        1 for d, p in chunks if d > limit and not p)


@given(st.floats(0, THROTTLE_MAX), st.floats(0, 1e12), st.floats(1, 1e12))
def test_the_throttle_only_grows_and_stays_in_bounds(current: float, dirty_rate: float,
                                                     bandwidth: float) -> None:
    after = next_throttle(current, dirty_rate=dirty_rate, bandwidth=bandwidth)
    assert current <= after <= THROTTLE_MAX
    if dirty_rate <= bandwidth / 2:
        assert after == current
    elif current == 0:
        assert after == THROTTLE_INITIAL


def test_the_throttle_steps_as_qemus_cpu_throttle() -> None:
    steps = [0.0]
    for _ in range(10):
        steps.append(next_throttle(steps[-1], dirty_rate=3.0, bandwidth=2.0))
    assert steps[1:4] == pytest.approx([0.2, 0.3, 0.4])
    assert steps[-1] == pytest.approx(THROTTLE_MAX)
