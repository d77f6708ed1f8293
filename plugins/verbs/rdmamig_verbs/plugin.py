"""Entry point of the verbs backend (group ``rdmamig``, name ``verbs``).

Registered on every machine: where pyverbs or an RDMA device is missing,
``rdmamig backends`` says so instead of the backend disappearing.
"""

from __future__ import annotations

from rdmamig import hookimpl
from rdmamig.plugins import Registry

from .backend import VerbsBackend


@hookimpl
def rdmamig_add_backends(registry: Registry) -> None:
    """Register the ``verbs`` backend."""
    registry.add_backend(VerbsBackend)
