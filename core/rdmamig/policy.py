"""The unpin-policy interface: which pinned chunks to release, and when.

The engine tells a policy what happens to chunks (registered, written, dirtied
again), where iterations end and when a registration was refused (pressure), and
asks it which chunks to unpin. A policy never talks to a transport; it only answers.
The engine checks every answer: a chunk that is not pinned or has a write in flight
is refused and reported as the policy's error.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Mapping
from typing import ClassVar, Literal, NamedTuple

import attrs

from .caps import Capability
from .wire import CHUNK_SHIFT, CHUNK_SIZE

__all__ = ["CHUNK_SHIFT", "CHUNK_SIZE", "ChunkId", "Hint", "PolicyOptions", "UnpinPolicy"]


class ChunkId(NamedTuple):
    """A chunk: ``index`` (1 MiB unit) of RAM block number ``block``. A named tuple:
    the engine hashes and sorts many of them, and tuples do that in C."""

    block: int
    index: int  # type: ignore[assignment]  # shadows tuple.index(), which no one needs


@attrs.frozen(kw_only=True)
class Hint:
    """A user's statement about a range: ``hot`` (keep pinned) or ``cold`` (unpin
    first)."""

    kind: Literal["hot", "cold"]
    block: str
    offset: int
    length: int


@attrs.frozen(kw_only=True)
class PolicyOptions:
    """What a policy is configured with.

    Attributes:
        pin_cap: most bytes to keep pinned on each side (None: no cap).
        hints: hot and cold ranges named by the user.
        block_names: name of each RAM block, by index (to resolve hints).
    """

    pin_cap: int | None = None
    hints: tuple[Hint, ...] = ()
    block_names: tuple[str, ...] = ()


class UnpinPolicy(abc.ABC):
    """Decides which registered chunks to unpin. Subclass it and register it from a
    plugin's ``rdmamig_add_policies`` hook."""

    #: The name users select it by (``--policy NAME``).
    name: ClassVar[str]
    #: One line for ``rdmamig policies``.
    description: ClassVar[str] = ""
    #: Capabilities this policy asks to negotiate (``pin-all`` asks for PIN_ALL).
    capabilities: ClassVar[Capability] = Capability(0)
    #: True for a policy that never unpins before the end: the engine may then
    #: work in large windows (:mod:`rdmamig.engine.pipeline` says how windows
    #: follow from this and from :attr:`pin_cap`).
    keeps_everything: ClassVar[bool] = False
    #: True for a policy that keeps a pin cap (``--pin-cap``; the policy lab runs
    #: it once per cap). Its :attr:`pin_cap` is then the cap.
    takes_cap: ClassVar[bool] = False

    def __init__(self, options: PolicyOptions) -> None:
        self.options = options

    @property
    def pin_cap(self) -> int | None:
        """The most bytes this policy keeps pinned on each side, or None when it
        enforces no cap (the default; capped policies override it).

        The engine keeps what is in flight within the cap and lets writes complete
        before it asks the policy to make room, so that a policy can keep its cap
        with chunks it has seen written.
        """
        return None

    def set_block_names(self, names: tuple[str, ...]) -> None:
        """Called once the RAM blocks are known (for hints by block name)."""
        self.options = attrs.evolve(self.options, block_names=names)

    def chunk_registered(self, *, chunk: ChunkId, nbytes: int) -> None:
        """``chunk`` was pinned on both sides."""

    def chunk_written(self, *, chunk: ChunkId) -> None:
        """A write into ``chunk`` completed."""

    def chunk_dirtied(self, *, chunk: ChunkId) -> None:
        """``chunk``, still pinned, has dirty pages again and is about to be written:
        like a newly registered chunk, it has a write in flight until
        :meth:`chunk_written`, and must not be chosen before that."""

    def chunk_unpinned(self, *, chunk: ChunkId) -> None:
        """``chunk`` was unpinned on both sides (at this policy's request or at the
        end of the migration)."""

    def iteration_ended(self, *, iteration: int) -> None:
        """Iteration ``iteration`` (0 = the bulk round) finished."""

    def pressure(self, *, needed_bytes: int, pinned_bytes: int) -> None:
        """A registration of ``needed_bytes`` was refused with ``pinned_bytes`` pinned."""

    @abc.abstractmethod
    def select_unpin(self, *, pinned: Mapping[ChunkId, int], needed_bytes: int) -> Iterable[
            ChunkId]:
        """Which chunks to unpin now.

        Args:
            pinned: every pinned chunk and its size in bytes.
            needed_bytes: bytes the engine is about to register (0 when it only asks
                after a batch of writes completed).

        Returns:
            Chunks from ``pinned`` to release; chunks with writes in flight are
            refused by the engine.
        """
