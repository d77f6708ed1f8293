"""What a destination takes from a peer it does not trust: how many RAM blocks, of
which names and sizes, and how much memory the peer may have pinned.

Every block list a source sends (rdmamig's BLOCKS record or QEMU's ram setup) is
checked here, whole, before the first block is made: no file is created for a
layout that is refused.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Final

import attrs

from .errors import RefusedError, RemoteProtocolError
from .wire import PAGE_BYTES as PAGE_SIZE

#: Longest block name (QEMU's idstr holds 255 bytes and a NUL).
MAX_NAME_BYTES: Final = 255
#: ``max_ram`` for a reader bound only by its disk (``image import``).
UNLIMITED_RAM: Final = 1 << 64


def physical_memory() -> int:
    """Bytes of RAM this machine has."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@attrs.frozen(kw_only=True)
class Limits:
    """A destination's limits.

    Attributes:
        max_ram: most bytes of RAM one migration may declare (default: this
            machine's memory).
        max_blocks: most RAM blocks one migration may declare (a QEMU guest has a
            few dozen at most).
        max_pinned: most bytes the source may have registered here at once (None:
            only RLIMIT_MEMLOCK limits it).
    """

    max_ram: int = attrs.Factory(physical_memory)
    max_blocks: int = 256
    max_pinned: int | None = None


def check_layout(listed: Sequence[tuple[str, int]], limits: Limits, *,
                 lister: str = "the source") -> None:
    """Check a block list (name, length) that ``lister`` gave against ``limits``.

    Raises:
        RemoteProtocolError: a name that is empty, too long, not printable or
            listed twice; a length that is not a positive multiple of 4 KiB.
        RefusedError: more blocks or more RAM than ``limits`` allow.
    """
    if not listed:
        raise RemoteProtocolError(f"{lister} lists no RAM block")
    if len(listed) > limits.max_blocks:
        raise RefusedError(f"{lister} lists {len(listed)} RAM blocks; this destination "
                           f"takes at most {limits.max_blocks}")
    seen: set[str] = set()
    total = 0
    for index, (name, length) in enumerate(listed):
        where = f"RAM block {index} ({name!r})"
        if not name or len(name.encode()) > MAX_NAME_BYTES or not name.isprintable():
            raise RemoteProtocolError(f"{where}: a name must be 1 to {MAX_NAME_BYTES} bytes "
                                      f"of printable characters")
        if name in seen:
            raise RemoteProtocolError(f"{where}: the name is listed twice")
        seen.add(name)
        if length <= 0 or length % PAGE_SIZE:
            raise RemoteProtocolError(f"{where}: length={length} is not a positive "
                                      f"multiple of {PAGE_SIZE}")
        total += length
    if total > limits.max_ram:
        raise RefusedError(f"{lister} declares {total} bytes of RAM; this destination "
                           f"takes at most {limits.max_ram} (--max-ram)")
