"""The ``migrate``, ``listen`` and ``send`` verbs (filled in with the engine)."""

from __future__ import annotations

from typing import Any


def add_verbs(verbs: Any) -> None:
    """Add the migration verbs to the ``rdmamig`` parser."""
