"""A third-party rdmamig plugin: a backend and a policy, found by entry point."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from rdmamig.hookspecs import hookimpl
from rdmamig.policy import ChunkId, UnpinPolicy
from rdmamig_tcp import TcpBackend


class ExampleBackend(TcpBackend):
    """The TCP transport under another name, to prove the third-party path."""

    name = "example-tcp"
    description = "third-party example: TCP under another name"


class UnpinOldestHalf(UnpinPolicy):
    """Unpins the older half of the pinned chunks whenever space is needed."""

    name = "example-oldest-half"

    def select_unpin(self, *, pinned: Mapping[ChunkId, int],
                     needed_bytes: int) -> Iterable[ChunkId]:
        return sorted(pinned)[: len(pinned) // 2] if needed_bytes else ()


@hookimpl
def rdmamig_add_backends(registry):  # type: ignore[no-untyped-def]
    registry.add_backend(ExampleBackend)


@hookimpl
def rdmamig_add_policies(registry):  # type: ignore[no-untyped-def]
    registry.add_policy(UnpinOldestHalf)
