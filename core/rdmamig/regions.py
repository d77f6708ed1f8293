"""Bookkeeping every backend needs for its registrations: regions by lkey, the
pinned-bytes accounting, and the check of a write's local range."""

from __future__ import annotations

from typing import Generic, TypeVar

from .errors import LocalProtocolError
from .transport import MemoryRegion, RemoteWrite

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
