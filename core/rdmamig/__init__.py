"""rdmamig: live migration of memory over RDMA, QEMU's protocol, pluggable transports.

The names a program needs are here::

    import numpy as np, rdmamig
    weights = np.zeros(1 << 20)                  # 8 MiB, a multiple of 4 KiB
    rdmamig.receive_into("0.0.0.0:4444", {"weights": weights})   # on one host
    rdmamig.send("dst-host:4444", {"weights": weights})          # on the other

:func:`send` / :func:`receive_into` are the one-call forms; :func:`run_source`,
:func:`receive` and :class:`Source` / :class:`Destination` the parts they are made
of; :func:`migrate_locally` runs a whole migration on one machine; :class:`Monitor`
follows a running migration as QMP shows QEMU's. The modules hold the rest:
:mod:`rdmamig.wire` (codec), :mod:`rdmamig.caps` (negotiation),
:mod:`rdmamig.control` (control-channel state machine), :mod:`rdmamig.transport`
(the backend interfaces), :mod:`rdmamig.plugins` (registry), :mod:`rdmamig.engine`,
:mod:`rdmamig.image` (migration images), :mod:`rdmamig.qemu` (QEMU's stream).
"""

#: Before the imports: modules imported below may read it.
__version__ = "0.1.0"

from .auth import PreSharedKey, load_key
from .caps import Capability
from .engine import (
    ChecksumTracker,
    Destination,
    DestinationResult,
    RamBlock,
    Source,
    SourceConfig,
    SourceResult,
)
from .errors import (
    AuthenticationError,
    ConfigurationError,
    LocalProtocolError,
    MemlockLimitError,
    MigrationCancelledError,
    MigrationError,
    PeerAbortedError,
    ProtocolError,
    RdmamigError,
    RefusedError,
    RegistrationError,
    RemoteProtocolError,
    TransportError,
    UnknownNameError,
    UnreachableError,
    VerificationError,
)
from .hookspecs import hookimpl
from .image import Image, ImageWriter, open_image
from .limits import Limits
from .loopback import Guest, migrate_locally
from .migration import Plan, listen, receive, receive_into, run_source, send
from .plugins import ENTRY_POINT_GROUP, Registry, load_registry
from .status import Monitor, Status

__all__ = [
    "ENTRY_POINT_GROUP",
    "AuthenticationError",
    "Capability",
    "ChecksumTracker",
    "ConfigurationError",
    "Destination",
    "DestinationResult",
    "Guest",
    "Image",
    "ImageWriter",
    "Limits",
    "LocalProtocolError",
    "MemlockLimitError",
    "MigrationCancelledError",
    "MigrationError",
    "Monitor",
    "PeerAbortedError",
    "Plan",
    "PreSharedKey",
    "ProtocolError",
    "RamBlock",
    "RdmamigError",
    "RefusedError",
    "RegistrationError",
    "Registry",
    "RemoteProtocolError",
    "Source",
    "SourceConfig",
    "SourceResult",
    "Status",
    "TransportError",
    "UnknownNameError",
    "UnreachableError",
    "VerificationError",
    "__version__",
    "hookimpl",
    "listen",
    "load_key",
    "load_registry",
    "migrate_locally",
    "open_image",
    "receive",
    "receive_into",
    "run_source",
    "send",
]
