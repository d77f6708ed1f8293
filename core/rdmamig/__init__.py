"""rdmamig: live migration of memory over RDMA, QEMU's protocol, pluggable transports.

The names most users need are re-exported here; the modules hold the rest:
:mod:`rdmamig.wire` (codec), :mod:`rdmamig.caps` (negotiation),
:mod:`rdmamig.control` (control-channel state machine), :mod:`rdmamig.transport`
(the backend interfaces), :mod:`rdmamig.plugins` (registry), :mod:`rdmamig.engine`.
"""

from .caps import Capability
from .errors import (
    ConfigurationError,
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
    UnreachableError,
    VerificationError,
)
from .hookspecs import hookimpl
from .plugins import ENTRY_POINT_GROUP

__version__ = "0.1.0"

__all__ = [
    "ENTRY_POINT_GROUP",
    "Capability",
    "ConfigurationError",
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
    "UnreachableError",
    "VerificationError",
    "__version__",
    "hookimpl",
]
