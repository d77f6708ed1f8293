"""rdmamig: live migration of memory over RDMA, QEMU's protocol, pluggable transports.

The names most users need are re-exported here; the modules hold the rest:
:mod:`rdmamig.wire` (codec), :mod:`rdmamig.caps` (negotiation),
:mod:`rdmamig.control` (control-channel state machine), :mod:`rdmamig.transport`
(the backend interfaces), :mod:`rdmamig.plugins` (registry), :mod:`rdmamig.engine`.
"""

from .caps import Capability
from .errors import (
    LocalProtocolError,
    MemlockLimitError,
    MigrationError,
    PeerAbortedError,
    ProtocolError,
    RdmamigError,
    RegistrationError,
    RemoteProtocolError,
    TransportError,
    UnknownNameError,
    VerificationError,
)

__version__ = "0.1.0"

__all__ = [
    "Capability",
    "LocalProtocolError",
    "MemlockLimitError",
    "MigrationError",
    "PeerAbortedError",
    "ProtocolError",
    "RdmamigError",
    "RegistrationError",
    "RemoteProtocolError",
    "TransportError",
    "UnknownNameError",
    "VerificationError",
    "__version__",
]
