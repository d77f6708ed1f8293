"""The policies that need no bookkeeping beyond "what was written": ``pin-all`` and
``eager``."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from rdmamig.caps import Capability
from rdmamig.policy import ChunkId, PolicyOptions, UnpinPolicy


class PinAll(UnpinPolicy):
    """Ask for PIN_ALL: every block is registered whole, up front, and stays so."""

    name = "pin-all"
    description = "request PIN_ALL: whole blocks registered up front, nothing unpinned"
    capabilities = Capability.PIN_ALL
    keeps_everything = True

    def select_unpin(self, *, pinned: Mapping[ChunkId, int], needed_bytes: int) -> Iterable[
            ChunkId]:
        return ()


class Eager(UnpinPolicy):
    """Unpin a chunk as soon as its write has completed: the least memory pinned,
    the most re-registrations when pages are dirtied again."""

    name = "eager"
    description = "unpin every chunk as soon as its write completed"

    def __init__(self, options: PolicyOptions) -> None:
        super().__init__(options)
        self._written: set[ChunkId] = set()

    def chunk_written(self, *, chunk: ChunkId) -> None:
        self._written.add(chunk)

    def chunk_dirtied(self, *, chunk: ChunkId) -> None:
        self._written.discard(chunk)

    def chunk_unpinned(self, *, chunk: ChunkId) -> None:
        self._written.discard(chunk)

    def select_unpin(self, *, pinned: Mapping[ChunkId, int], needed_bytes: int) -> Iterable[
            ChunkId]:
        return sorted(chunk for chunk in self._written if chunk in pinned)
