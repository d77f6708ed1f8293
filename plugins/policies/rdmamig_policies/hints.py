"""``hints``: the user says which ranges are hot and which are cold (the seed's
TODO 7). Cold chunks are unpinned as soon as they are written; hot chunks are kept
unless nothing else can make room under the cap; the rest go in ``lru``'s order."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping

from rdmamig.errors import ConfigurationError
from rdmamig.policy import CHUNK_SHIFT, ChunkId, Hint, PolicyOptions

from .lru import NO_CAP, Lru


class Hints(Lru):
    """Workload hints: ``--hint hot:BLOCK:OFFSET:LEN`` / ``cold:...``, a hints file,
    or :meth:`add_hint` while the migration runs. Without ``--pin-cap`` only cold
    chunks are unpinned."""

    name = "hints"
    description = "user hints: cold ranges unpinned first, hot ranges kept"

    def __init__(self, options: PolicyOptions) -> None:
        # Without a cap only cold chunks are unpinned: a cap no RAM reaches.
        super().__init__(options, cap=options.pin_cap or NO_CAP)
        self._lock = threading.Lock()
        self._hot: set[ChunkId] = set()
        self._cold: set[ChunkId] = set()
        self._hints = list(options.hints)

    def set_block_names(self, names: tuple[str, ...]) -> None:
        super().set_block_names(names)
        with self._lock:
            for hint in self._hints:
                self._apply(hint)

    def add_hint(self, hint: Hint) -> None:
        """Add a hint at run time (thread-safe); it applies from the next decision."""
        with self._lock:
            self._hints.append(hint)
            if self.options.block_names:
                self._apply(hint)

    def _apply(self, hint: Hint) -> None:
        names = self.options.block_names
        if hint.block not in names:
            raise ConfigurationError(f"hint names block {hint.block!r}; blocks are "
                             f"{', '.join(names)}")
        block = names.index(hint.block)
        first = hint.offset >> CHUNK_SHIFT
        last = (hint.offset + max(hint.length, 1) - 1) >> CHUNK_SHIFT
        chunks = {ChunkId(block, index) for index in range(first, last + 1)}
        mine, other = (self._hot, self._cold) if hint.kind == "hot" else (self._cold,
                                                                           self._hot)
        mine |= chunks
        other -= chunks

    def _candidates(self, pinned: Mapping[ChunkId, int]) -> Iterable[ChunkId]:
        with self._lock:
            hot = set(self._hot)
        order = list(super()._candidates(pinned))
        return [c for c in order if c not in hot] + [c for c in order if c in hot]

    def select_unpin(self, *, pinned: Mapping[ChunkId, int], needed_bytes: int) -> Iterable[
            ChunkId]:
        with self._lock:
            cold = [chunk for chunk in Lru._candidates(self, pinned) if chunk in self._cold]
        rest = {chunk: size for chunk, size in pinned.items() if chunk not in cold}
        return cold + list(super().select_unpin(pinned=rest, needed_bytes=needed_bytes))
