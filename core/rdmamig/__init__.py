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

#: Before anything else: modules loaded later may read it.
__version__ = "0.1.0"

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

# Each name is loaded from its module when first asked for: ``import rdmamig`` (and
# the command line's start) stays quick, and loads numpy and the rest only for the
# names a program uses.
_EXPORTS = {
    "PreSharedKey": ".auth",
    "load_key": ".auth",
    "Capability": ".caps",
    "ChecksumTracker": ".engine",
    "Destination": ".engine",
    "DestinationResult": ".engine",
    "RamBlock": ".engine",
    "Source": ".engine",
    "SourceConfig": ".engine",
    "SourceResult": ".engine",
    "AuthenticationError": ".errors",
    "ConfigurationError": ".errors",
    "LocalProtocolError": ".errors",
    "MemlockLimitError": ".errors",
    "MigrationCancelledError": ".errors",
    "MigrationError": ".errors",
    "PeerAbortedError": ".errors",
    "ProtocolError": ".errors",
    "RdmamigError": ".errors",
    "RefusedError": ".errors",
    "RegistrationError": ".errors",
    "RemoteProtocolError": ".errors",
    "TransportError": ".errors",
    "UnknownNameError": ".errors",
    "UnreachableError": ".errors",
    "VerificationError": ".errors",
    "hookimpl": ".hookspecs",
    "Image": ".image",
    "ImageWriter": ".image",
    "open_image": ".image",
    "Limits": ".limits",
    "Guest": ".loopback",
    "migrate_locally": ".loopback",
    "Plan": ".migration",
    "listen": ".migration",
    "receive": ".migration",
    "receive_into": ".migration",
    "run_source": ".migration",
    "send": ".migration",
    "ENTRY_POINT_GROUP": ".plugins",
    "Registry": ".plugins",
    "load_registry": ".plugins",
    "Monitor": ".status",
    "Status": ".status",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'rdmamig' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


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
