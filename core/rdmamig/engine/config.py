"""What a source is given (its tunables, the workload it stops) and what it gives
back (its result, timed as QEMU's ``query-migrate``)."""

from __future__ import annotations

from typing import Protocol

import attrs


class Workload(Protocol):
    """What the source needs of the thing that dirties its memory."""

    def stop(self) -> None:
        """Pause it (the stop of stop-and-copy)."""

    def resume(self) -> None:
        """Let it run again (after a failed migration the source keeps running)."""

    def throttle(self, fraction: float) -> None:
        """Slow it down to ``1 - fraction`` of its speed (auto-converge)."""

    def state(self) -> bytes:
        """Its non-RAM state, sent after stop in the QEMU FILE stream."""


@attrs.define(kw_only=True)
class SourceConfig:
    """Tunables, with QEMU's defaults where QEMU has one."""

    max_downtime: float = 0.3
    max_iterations: int = 30
    #: Bytes per second the writes may use on average (QEMU's max-bandwidth); None:
    #: as fast as the link goes.
    max_bandwidth: int | None = None
    auto_converge: bool = False
    #: Chunks per signalled batch of writes, and the window of a policy that unpins
    #: (:func:`.pipeline.posting_mode`).
    batch_chunks: int = 64
    #: Chunks scanned and registered together when the policy keeps everything
    #: pinned: each window costs a few control round trips, and large windows
    #: amortise them.
    window_chunks: int = 256
    timeout: float | None = 60.0
    #: Seconds to keep trying a destination that refuses the connection (not
    #: listening yet), as ``migrate`` waits for ``-incoming``; 0: fail at once.
    connect_wait: float = 0.0
    #: With INLINE, an unregistered chunk with at most this many dirty data pages
    #: sends them inside PAGES messages rather than being registered (a copy of a
    #: few pages costs less than a registration's round trips; as UCX's eager
    #: protocol against rendezvous). 0: always register.
    inline_pages: int = 16
    #: Unpin off the data path: one batched UNREGISTER REQUEST per decision and the
    #: local deregistrations on a worker thread. False: one request per chunk and
    #: deregistration inline, as the seed patch does it (the benchmark's baseline).
    async_unregister: bool = True


@attrs.define(kw_only=True)
class SourceResult:
    """What happened, timed as QEMU's ``query-migrate`` does."""

    verified: bool = False
    #: The destination said it kept the migration (Capability.COMMIT).
    committed: bool = False
    iterations: int = 0
    bytes_written: int = 0
    #: Pages sent as COMPRESS.
    zero_pages: int = 0
    #: Dirty pages that were all zero, however they went (QEMU's ``duplicate``: a
    #: few zero pages between data pages are written with them).
    duplicate_pages: int = 0
    #: Pages sent inside PAGES messages (Capability.INLINE).
    inline_pages: int = 0
    registrations: int = 0
    unregistrations: int = 0
    reregistrations: int = 0
    pinned_peak_bytes: int = 0
    #: The most bytes this source had the peer pin at once, by its own accounting of
    #: the registrations it asked for (a QEMU peer reports nothing of its own).
    peer_pinned_peak_bytes: int = 0
    #: Highest VmLck + VmPin seen (what the kernel counts against RLIMIT_MEMLOCK).
    locked_peak_bytes: int = 0
    downtime_s: float = 0.0
    #: Setup to the final status (query-migrate's ``total-time``).
    total_time_s: float = 0.0
    #: Connect to the destination holding everything (before verification).
    transfer_time_s: float = 0.0
    verify_time_s: float = 0.0
    #: Chunks hashed as their writes were posted and named in CHUNK HASHES.
    chunk_hashes: int = 0
    throttle: float = 0.0
    capabilities: int = 0
    #: ``rdmamig``, or ``qemu`` for a QEMU destination (which offers no verification).
    peer: str = "rdmamig"
    #: One sample per batch: seconds, bytes written, dirty bytes left, pinned bytes.
    timeline: list[dict[str, float]] = attrs.Factory(list)
    #: Seconds (as the timeline's) when each pass began, and when the workload
    #: stopped for the last one (the downtime begins).
    pass_starts: list[float] = attrs.Factory(list)
    stopped_at_s: float | None = None
