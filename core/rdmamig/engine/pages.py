"""Page masks of a window, with numpy: runs of pages, chunk spans, per-chunk and
per-page views. The source decides page by page what to write, COMPRESS or send
inline without a Python loop over pages or chunks."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from .ramblock import PAGES_PER_CHUNK, BoolArray

IntArray = npt.NDArray[np.intp]


def runs(mask: BoolArray, *, period: int | None = None) -> list[tuple[int, int]]:
    """``[start, end)`` of every run of True in ``mask``, found with numpy; with
    ``period``, runs also end at every multiple of it (at chunk boundaries)."""
    if not mask.any():
        return []
    starts, ends = _run_bounds(mask, period)
    return list(zip(starts.tolist(), ends.tolist(), strict=True))


def _run_bounds(mask: BoolArray, period: int | None) -> tuple[IntArray, IntArray]:
    before = np.concatenate(([False], mask[:-1]))
    after = np.concatenate((mask[1:], [False]))
    if period is not None:
        at = np.arange(len(mask))
        before &= at % period != 0
        after &= (at + 1) % period != 0
    return np.flatnonzero(mask & ~before), np.flatnonzero(mask & ~after) + 1


def short_runs(mask: BoolArray, *, shorter_than: int, period: int) -> BoolArray:
    """The pages of ``mask`` that lie in runs (within one period) of fewer than
    ``shorter_than`` pages."""
    starts, ends = _run_bounds(mask, period)
    short = ends - starts < shorter_than
    edges = np.zeros(len(mask) + 1, dtype=np.int64)
    np.add.at(edges, starts[short], 1)
    np.add.at(edges, ends[short], -1)
    return np.asarray(np.cumsum(edges[:-1]) > 0, dtype=np.bool_)


def runs_of_consecutive(values: list[int]) -> list[tuple[int, int]]:
    """``[first, end)`` of each run of consecutive integers in sorted ``values``."""
    spans: list[tuple[int, int]] = []
    for value in values:
        if spans and spans[-1][1] == value:
            spans[-1] = (spans[-1][0], value + 1)
        else:
            spans.append((value, value + 1))
    return spans


def per_page(per_chunk: BoolArray, pages: int) -> BoolArray:
    """A per-chunk mask spread over the chunks' ``pages`` pages."""
    return np.repeat(per_chunk, PAGES_PER_CHUNK)[:pages]


def per_chunk(per_page: BoolArray) -> BoolArray:
    """A per-page mask as one row per chunk (the last chunk padded with False)."""
    chunks = -(-len(per_page) // PAGES_PER_CHUNK)
    padded = np.zeros(chunks * PAGES_PER_CHUNK, dtype=np.bool_)
    padded[:len(per_page)] = per_page
    return padded.reshape(chunks, PAGES_PER_CHUNK)


def any_per_chunk(per_page: BoolArray) -> BoolArray:
    """Whether each chunk has a True page."""
    return np.asarray(per_chunk(per_page).any(axis=1), dtype=np.bool_)
