"""rdmamig's TCP backend: the one-sided semantics of RDMA over ordinary sockets."""

from .endpoint import TcpEndpoint
from .listener import TcpBackend, TcpListener

__all__ = ["TcpBackend", "TcpEndpoint", "TcpListener"]
