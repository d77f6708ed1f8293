"""Entry point of the built-in unpin policies (group ``rdmamig``, name ``policies``)."""

from __future__ import annotations

from rdmamig.hookspecs import hookimpl
from rdmamig.plugins import Registry

from .pin_until_done import PinUntilDone


@hookimpl
def rdmamig_add_policies(registry: Registry) -> None:
    """Register the built-in policies."""
    registry.add_policy(PinUntilDone)
