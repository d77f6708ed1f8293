"""What every backend's endpoint shares: its registrations by lkey with the
pinned-bytes accounting and the check of a write's local range (:class:`RegionTable`),
and the argument checks every endpoint makes the same way (:class:`EndpointBase`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Generic, TypeVar

from . import wire
from .errors import LocalProtocolError
from .transport import Endpoint, MemoryRegion, RemoteWrite

H = TypeVar("H")


class RegionTable(Generic[H]):
    """An endpoint's registered regions by lkey, each with the backend's own handle
    (an MR, a memoryview). Not thread-safe: the endpoint guards it with its lock."""

    def __init__(self) -> None:
        self._by_lkey: dict[int, tuple[MemoryRegion, H]] = {}
        #: Bytes registered now, and the most at any one time.
        self.pinned = 0
        self.pinned_peak = 0

    def __contains__(self, lkey: object) -> bool:
        return lkey in self._by_lkey

    def add(self, region: MemoryRegion, handle: H) -> None:
        """Record a new registration."""
        self._by_lkey[region.lkey] = (region, handle)
        self.pinned += region.length
        self.pinned_peak = max(self.pinned_peak, self.pinned)

    def remove(self, region: MemoryRegion) -> H:
        """Forget ``region``; returns its handle for the backend to release.

        Raises:
            LocalProtocolError: ``region`` is not registered here.
        """
        known = self._by_lkey.get(region.lkey)
        if known is None or known[0] != region:
            raise LocalProtocolError(f"region at {region.addr:#x} is not registered here")
        del self._by_lkey[region.lkey]
        self.pinned -= region.length
        return known[1]

    def source_of(self, write: RemoteWrite) -> tuple[MemoryRegion, H]:
        """The registered region a write reads from, after checking its local range.

        Raises:
            LocalProtocolError: the region is not registered or the range leaves it.
        """
        known = self._by_lkey.get(write.region.lkey)
        if known is None:
            raise LocalProtocolError(f"local region lkey={write.region.lkey:#x} is not "
                                     f"registered")
        region = known[0]
        if write.offset < 0 or write.length <= 0 or write.offset + write.length > region.length:
            raise LocalProtocolError(f"local range offset={write.offset} length={write.length} "
                                     f"is outside its {region.length}-byte region")
        return known

    def drain(self) -> list[tuple[MemoryRegion, H]]:
        """Forget every registration; returns them for the backend to release."""
        every = list(self._by_lkey.values())
        self._by_lkey.clear()
        self.pinned = 0
        return every


class EndpointBase(Endpoint, Generic[H]):
    """A concrete base for a backend's endpoint: a :class:`RegionTable` of handles
    ``H`` behind the pinned-bytes properties, and the checks of the interface's
    arguments, so that every backend refuses the same misuse with the same words."""

    def __init__(self) -> None:
        self._regions: RegionTable[H] = RegionTable()

    @property
    def pinned_bytes(self) -> int:
        return self._regions.pinned

    @property
    def pinned_peak_bytes(self) -> int:
        return self._regions.pinned_peak

    @staticmethod
    def byte_view(buffer: memoryview) -> memoryview:
        """``buffer`` as one-dimensional bytes (what registration works on)."""
        return buffer.cast("B") if buffer.format != "B" or buffer.ndim != 1 else buffer

    @staticmethod
    def check_message(data: bytes) -> None:
        """Refuse a control message over the protocol's 512 KiB.

        Raises:
            LocalProtocolError: it is longer.
        """
        if len(data) > wire.MAX_MESSAGE:
            raise LocalProtocolError(f"control message of {len(data)} bytes is over 512 KiB")

    @staticmethod
    def check_batch(writes: Sequence[RemoteWrite]) -> None:
        """Refuse an empty batch of writes (it would have nothing to signal).

        Raises:
            LocalProtocolError: ``writes`` is empty.
        """
        if not writes:
            raise LocalProtocolError("post_writes needs at least one write")
