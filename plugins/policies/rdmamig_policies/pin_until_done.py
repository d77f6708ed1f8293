"""``pin-until-done``: QEMU's behaviour, the default – nothing is unpinned before the
migration completes."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from rdmamig.policy import ChunkId, UnpinPolicy


class PinUntilDone(UnpinPolicy):
    """Keep every registered chunk pinned until completion (QEMU's behaviour)."""

    name = "pin-until-done"
    description = "QEMU's behaviour: nothing is unpinned before completion"
    keeps_everything = True

    def select_unpin(self, *, pinned: Mapping[ChunkId, int], needed_bytes: int) -> Iterable[
            ChunkId]:
        return ()
