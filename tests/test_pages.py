"""Page masks: runs, spans, and what each page of a span becomes."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from rdmamig.engine.pages import plan_span, runs, runs_of_consecutive
from rdmamig.memory import PAGES_PER_CHUNK


@given(st.lists(st.booleans(), max_size=300), st.sampled_from([None, 1, 7, 64]))
def test_runs_cover_the_mask_exactly_and_break_at_chunk_boundaries(
        bits: list[bool], period: int | None) -> None:
    mask = np.array(bits, dtype=np.bool_)
    found = runs(mask, period=period)
    rebuilt = np.zeros(len(mask), dtype=np.bool_)
    for start, end in found:
        assert start < end and not rebuilt[start:end].any()
        rebuilt[start:end] = True
        if period is not None:
            assert start // period == (end - 1) // period
    assert (rebuilt == mask).all()
    # Runs are maximal: neighbours of a run are False or across a boundary.
    for start, end in found:
        if start > 0 and mask[start - 1]:
            assert period is not None and start % period == 0
        if end < len(mask) and mask[end]:
            assert period is not None and end % period == 0


def test_consecutive_chunks_group_into_spans() -> None:
    assert runs_of_consecutive([]) == []
    assert runs_of_consecutive([3, 4, 5, 9, 11, 12]) == [(3, 6), (9, 10), (11, 13)]



@st.composite
def spans(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    chunks = draw(st.integers(1, 4))
    pages = draw(st.integers((chunks - 1) * PAGES_PER_CHUNK + 1, chunks * PAGES_PER_CHUNK))
    # Sparse or dense dirty and data pages, in long and short runs.
    def mask(size: int) -> np.ndarray:
        density = draw(st.sampled_from([0.0, 0.02, 0.3, 0.9, 1.0]))
        seed = draw(st.integers(0, 2**16))
        return np.random.default_rng(seed).random(size) < density
    return mask(pages), mask(pages), mask(chunks), draw(st.sampled_from([0, 4, 16]))


@given(spans(), st.sampled_from([0, 4, 16]))
def test_every_page_travels_exactly_one_way(span: tuple[np.ndarray, ...], gaps: int) -> None:
    dirty, nonzero, registered, limit = span
    plan = plan_span(dirty, nonzero, registered, inline_limit=limit, min_compress_run=16,
                     fill_gaps_below=gaps)
    on_registered = np.repeat(registered, PAGES_PER_CHUNK)[:len(dirty)]
    assert not (plan.compress & plan.write).any()
    assert not (plan.compress & plan.inline).any()
    assert not (plan.write & plan.inline).any()
    # Every dirty page goes. Clean pages go only as short gaps between pages a chunk
    # writes anyway, or in a registered all-zero chunk's COMPRESS.
    assert ((plan.compress | plan.write | plan.inline) >= dirty).all()
    assert (plan.inline <= dirty).all()
    for start, end in runs(plan.write & ~dirty, period=PAGES_PER_CHUNK):
        assert end - start < gaps
        assert start % PAGES_PER_CHUNK and plan.write[start - 1] and dirty[start - 1]
        assert end % PAGES_PER_CHUNK and end < len(dirty) and plan.write[end] and dirty[end]
    assert (plan.compress <= dirty | on_registered).all()
    # COMPRESS only zeros; inline only data of unregistered chunks, within the limit.
    assert not (plan.compress & nonzero).any()
    assert not (plan.inline & (~nonzero | on_registered)).any()
    inline_per_chunk = np.zeros(len(registered) * PAGES_PER_CHUNK, dtype=np.bool_)
    inline_per_chunk[:len(dirty)] = plan.inline
    assert (inline_per_chunk.reshape(len(registered), -1).sum(axis=1) <= limit).all()
    # Dirty zero pages written from an unregistered chunk are short runs next to data.
    for start, end in runs(plan.write & dirty & ~nonzero & ~on_registered,
                           period=PAGES_PER_CHUNK):
        assert end - start < 16
    written = np.zeros(len(registered) * PAGES_PER_CHUNK, dtype=np.bool_)
    written[:len(dirty)] = plan.write
    assert (plan.writes_chunk == written.reshape(len(registered), -1).any(axis=1)).all()


def test_short_gaps_of_clean_pages_are_written_with_their_neighbours() -> None:
    dirty = np.zeros(2 * PAGES_PER_CHUNK, dtype=np.bool_)
    dirty[[0, 1, 3, 10, PAGES_PER_CHUNK - 1, PAGES_PER_CHUNK + 1]] = True
    plan = plan_span(dirty, np.ones_like(dirty), np.array([True, True]), inline_limit=0,
                     min_compress_run=16, fill_gaps_below=4)
    # Page 2 fills a gap of one; pages 4-9 are a gap of six; a gap never crosses a
    # chunk boundary.
    assert runs(plan.write, period=PAGES_PER_CHUNK) == [
        (0, 4), (10, 11), (PAGES_PER_CHUNK - 1, PAGES_PER_CHUNK),
        (PAGES_PER_CHUNK + 1, PAGES_PER_CHUNK + 2)]
