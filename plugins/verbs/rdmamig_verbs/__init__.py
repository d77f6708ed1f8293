"""rdmamig's ibverbs backend (RoCE / InfiniBand) on pyverbs and rdma_cm."""

from .backend import VerbsBackend

__all__ = ["VerbsBackend"]
