"""Entry point of the built-in unpin policies (group ``rdmamig``, name ``policies``)."""

from __future__ import annotations

from rdmamig import hookimpl
from rdmamig.plugins import Registry

from .hints import Hints
from .lru import Lru, Memlock
from .pin_until_done import PinUntilDone
from .simple import Eager, PinAll


@hookimpl
def rdmamig_add_policies(registry: Registry) -> None:
    """Register the built-in policies."""
    for policy in (PinUntilDone, PinAll, Eager, Lru, Memlock, Hints):
        registry.add_policy(policy)
