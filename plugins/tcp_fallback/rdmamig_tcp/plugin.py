"""Entry point of the TCP backend (group ``rdmamig``, name ``tcp``)."""

from __future__ import annotations

from rdmamig import hookimpl
from rdmamig.plugins import Registry

from .listener import TcpBackend


@hookimpl
def rdmamig_add_backends(registry: Registry) -> None:
    """Register the ``tcp`` backend."""
    registry.add_backend(TcpBackend)
