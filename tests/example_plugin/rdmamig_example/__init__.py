"""A third-party rdmamig plugin: a backend and a policy, found by entry point."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from rdmamig import hookimpl
from rdmamig.policy import ChunkId, PolicyOptions, UnpinPolicy
from rdmamig_tcp import TcpBackend


class ExampleBackend(TcpBackend):
    """The TCP transport under another name, to prove the third-party path."""

    name = "example-tcp"
    description = "third-party example: TCP under another name"


class UnpinOldestHalf(UnpinPolicy):
    """When space is needed, unpins the older half of the chunks whose writes
    completed (a policy may only choose those: the others have writes in flight)."""

    name = "example-oldest-half"
    description = "third-party example: unpin the older half of written chunks"

    def __init__(self, options: PolicyOptions) -> None:
        super().__init__(options)
        self._written: list[ChunkId] = []

    def chunk_written(self, *, chunk: ChunkId) -> None:
        if chunk not in self._written:
            self._written.append(chunk)

    def chunk_dirtied(self, *, chunk: ChunkId) -> None:
        self.chunk_unpinned(chunk=chunk)

    def chunk_unpinned(self, *, chunk: ChunkId) -> None:
        if chunk in self._written:
            self._written.remove(chunk)

    def select_unpin(self, *, pinned: Mapping[ChunkId, int],
                     needed_bytes: int) -> Iterable[ChunkId]:
        candidates = [chunk for chunk in self._written if chunk in pinned]
        return candidates[: len(candidates) // 2] if needed_bytes else ()


@hookimpl
def rdmamig_add_backends(registry):  # type: ignore[no-untyped-def]
    registry.add_backend(ExampleBackend)


@hookimpl
def rdmamig_add_policies(registry):  # type: ignore[no-untyped-def]
    registry.add_policy(UnpinOldestHalf)
