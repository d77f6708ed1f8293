"""When pre-copy stops: the downtime estimate and auto-converge's throttle, as pure
functions of a round's counters (QEMU's ``migration_iteration_finish`` decision and
``cpu-throttle``)."""

from __future__ import annotations

import attrs
import numpy as np
import numpy.typing as npt

from ..memory import PAGE_SIZE

#: auto-converge's first throttle, its step and its ceiling (QEMU's defaults).
THROTTLE_INITIAL = 0.2
THROTTLE_INCREMENT = 0.1
THROTTLE_MAX = 0.99


@attrs.frozen(kw_only=True)
class RoundCounters:
    """What one round did (differences of the source's running totals).

    Attributes:
        written_bytes: bytes written by one-sided writes.
        inline_pages: pages sent inside PAGES messages.
        zero_pages: pages sent as COMPRESS.
        registrations: chunks registered.
        registering_s: seconds spent registering.
        elapsed_s: the round's length.
    """

    written_bytes: int = 0
    inline_pages: int = 0
    zero_pages: int = 0
    registrations: int = 0
    registering_s: float = 0.0
    elapsed_s: float = 1e-6

    @property
    def handled_bytes(self) -> int:
        """Dirty bytes the round dealt with, however they travelled."""
        return self.written_bytes + (self.inline_pages + self.zero_pages) * PAGE_SIZE


def downtime_estimate(remaining_bytes: int, round_: RoundCounters, *,
                      chunks_to_register: int) -> float:
    """Seconds the stop-and-copy round would take: ``remaining_bytes`` at the rate
    the last round handled dirty pages, plus, at that round's cost per registration,
    one for each of ``chunks_to_register`` (what a capped policy adds, which a
    bytes-only estimate misses).

    The rate is over the whole round: writes go on while registrations are
    answered, so taking their time out would overstate it.
    """
    estimate = remaining_bytes / max(round_.handled_bytes / max(round_.elapsed_s, 1e-6), 1.0)
    if round_.registrations:
        estimate += chunks_to_register * round_.registering_s / round_.registrations
    return estimate


def chunks_to_register(dirty_per_chunk: npt.NDArray[np.integer], pinned: npt.NDArray[np.bool_],
                       *, inline_limit: int) -> int:
    """How many chunks the next round would register: those with more dirty pages
    than go inline that are not pinned."""
    return int(np.count_nonzero((dirty_per_chunk > inline_limit) & ~pinned))


def next_throttle(current: float, *, dirty_rate: float, bandwidth: float) -> float:
    """auto-converge: the workload's throttle after a round that dirtied
    ``dirty_rate`` bytes/s over a link of ``bandwidth`` bytes/s. It starts at 20 %
    and grows by 10 % while dirtying outpaces half the link, up to 99 %."""
    if dirty_rate <= bandwidth / 2:
        return current
    return min(THROTTLE_INITIAL if current == 0 else current + THROTTLE_INCREMENT,
               THROTTLE_MAX)
