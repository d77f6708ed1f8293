"""Page masks of a window, with numpy: what each dirty page of a span of chunks
becomes (:func:`plan_span`), runs of pages, chunk spans, per-chunk and per-page
views. The source decides page by page what to write, COMPRESS or send inline
without a Python loop over pages or chunks."""

from __future__ import annotations

import functools

import attrs
import numpy as np
import numpy.typing as npt

from ..memory import PAGES_PER_CHUNK, BoolArray

IntArray = npt.NDArray[np.intp]


@attrs.frozen
class SpanPlan:
    """What a span of consecutive chunks sends: page masks (``compress``, ``write``,
    ``inline``, disjoint) and, per chunk, whether it has pages to write."""

    compress: BoolArray
    write: BoolArray
    inline: BoolArray
    writes_chunk: BoolArray


def plan_span(dirty: BoolArray, nonzero: BoolArray, registered: BoolArray, *,
              inline_limit: int, min_compress_run: int, fill_gaps_below: int = 0,
              populated: BoolArray | None = None) -> SpanPlan:
    """Decide, for every page of a span of chunks, how it travels.

    Args:
        dirty: the span's dirty pages.
        nonzero: which of its pages hold a non-zero byte.
        registered: per chunk, whether it is registered (pinned on both sides).
        inline_limit: an unregistered chunk with at most this many dirty data pages
            sends them inline (0: never).
        min_compress_run: in a chunk that is written anyway, shorter runs of dirty
            zero pages are written with their data.
        fill_gaps_below: in a chunk that is written, runs of fewer clean pages than
            this between written pages are written with them (at most
            ``min_compress_run``; 0: none).
        populated: which of its pages hold data (None: all); the others are never
            read, so never written: dirty ones go as COMPRESS, registered or not.

    A registered chunk goes whole as COMPRESS when all its pages are zero, else its
    dirty pages are written (PROTOCOL.md, "RAM transfer"). An unregistered chunk
    sends its dirty zero pages as COMPRESS and its data pages inline or, after
    registering, written – with the short zero runs between them: a COMPRESS entry
    and one more write cost more than copying a few pages. For the same reason, short
    gaps of clean pages between the pages a chunk writes are written too: their
    content is what the destination already has, or newer (a page dirtied since the
    bitmap was taken goes again next round).
    """
    if fill_gaps_below > min_compress_run:
        raise ValueError(f"fill_gaps_below={fill_gaps_below} is over min_compress_run="
                         f"{min_compress_run}: a gap could hide a COMPRESS run")
    pages = len(dirty)
    held = np.ones(pages, dtype=np.bool_) if populated is None else populated
    on_registered = per_page(registered, pages)
    zero_chunk = per_page(registered & ~any_per_chunk(nonzero), pages)
    unregistered_zero = ~on_registered & dirty & ~nonzero
    new_data = per_chunk(~on_registered & dirty & nonzero).sum(axis=1)
    inline_chunk = ~registered & (new_data > 0) & (new_data <= inline_limit)
    on_inline = per_page(inline_chunk, pages)
    carried = (short_runs(unregistered_zero, shorter_than=min_compress_run,
                          period=PAGES_PER_CHUNK)
               & per_page((new_data > 0) & ~inline_chunk, pages) & held)
    write = ((on_registered & ~zero_chunk & dirty & held)
             | (~on_registered & ~on_inline & dirty & (nonzero | carried)))
    if fill_gaps_below:
        write |= interior_gaps(write, shorter_than=fill_gaps_below,
                               period=PAGES_PER_CHUNK) & held
    holes = on_registered & ~zero_chunk & dirty & ~held
    return SpanPlan(compress=zero_chunk | holes | (unregistered_zero & ~carried), write=write,
                    inline=on_inline & dirty & nonzero, writes_chunk=any_per_chunk(write))


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
        not_first, not_last = _inside_periods(len(mask), period)
        before &= not_first
        after &= not_last
    return np.flatnonzero(mask & ~before), np.flatnonzero(mask & ~after) + 1


@functools.lru_cache(maxsize=32)
def _inside_periods(size: int, period: int) -> tuple[BoolArray, BoolArray]:
    """Per index of a mask of ``size``: whether it is not the first of its period,
    and whether it is not the last. Windows come in a few sizes, so these are kept
    (the modulo over a window's pages cost more than the rest of the run search)."""
    at = np.arange(size)
    not_first, not_last = at % period != 0, (at + 1) % period != 0
    not_first.flags.writeable = not_last.flags.writeable = False
    return not_first, not_last


def short_runs(mask: BoolArray, *, shorter_than: int, period: int) -> BoolArray:
    """The pages of ``mask`` that lie in runs (within one period) of fewer than
    ``shorter_than`` pages."""
    starts, ends = _run_bounds(mask, period)
    short = ends - starts < shorter_than
    return _covering(starts[short], ends[short], len(mask))


def interior_gaps(mask: BoolArray, *, shorter_than: int, period: int) -> BoolArray:
    """The pages outside ``mask`` in runs of fewer than ``shorter_than`` pages that
    have a page of ``mask`` on both sides within the same period."""
    starts, ends = _run_bounds(~mask, period)
    inside = ((starts % period != 0) & (ends % period != 0) & (ends < len(mask))
              & (ends - starts < shorter_than))
    return _covering(starts[inside], ends[inside], len(mask))


def _covering(starts: IntArray, ends: IntArray, size: int) -> BoolArray:
    """A mask of ``size`` pages, True on every ``[start, end)``."""
    edges = np.zeros(size + 1, dtype=np.int64)
    np.add.at(edges, starts, 1)
    np.add.at(edges, ends, -1)
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
