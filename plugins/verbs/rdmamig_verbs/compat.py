"""Importing pyverbs across rdma-core releases, and saying why it cannot be used.

rdma-core 44 (Debian 12) names the enum modules ``pyverbs.enums`` and
``pyverbs.cm_enums``; newer releases ``pyverbs.libibverbs_enums`` and
``pyverbs.librdmacm_enums``.
"""

from __future__ import annotations

import fcntl
import importlib
import socket
import struct
from pathlib import Path
from types import ModuleType
from typing import Any

#: Where pyverbs comes from, for the "not installed" reason.
INSTALL_HINT = ("pyverbs is not importable by this Python: install the distribution's "
                "python3-pyverbs (Debian/Ubuntu: apt-get install python3-pyverbs "
                "rdma-core ibverbs-providers) and use a virtual environment of the system "
                "python3 made with --system-site-packages")


def _first(*names: str) -> ModuleType:
    error: ImportError | None = None
    for name in names:
        try:
            return importlib.import_module(name)
        except ImportError as exc:
            error = exc
    assert error is not None
    raise error


def load() -> Any:
    """The pyverbs modules the backend uses, as one namespace.

    Raises:
        ImportError: pyverbs is missing (``INSTALL_HINT`` says how to get it).
    """
    ns = ModuleType("pyverbs_compat")
    ns.enums = _first("pyverbs.libibverbs_enums", "pyverbs.enums")  # type: ignore[attr-defined]
    ns.cm_enums = _first("pyverbs.librdmacm_enums", "pyverbs.cm_enums")  # type: ignore[attr-defined]
    for name in ("cmid", "cq", "device", "mr", "qp", "wr", "pyverbs_error"):
        setattr(ns, name, importlib.import_module(f"pyverbs.{name}"))
    return ns


def unavailable_reason() -> str | None:
    """Why verbs cannot run here (pyverbs missing, no RDMA device), or None."""
    try:
        pv = load()
    except ImportError as exc:
        return f"{INSTALL_HINT} ({exc})"
    try:
        devices = pv.device.get_device_list()
    except pv.pyverbs_error.PyverbsError as exc:
        # rdma-core raises here rather than returning [] when no device exists.
        return f"no RDMA device found ({exc}); for soft-RoCE: rdma link add rxe0 type rxe " \
               f"netdev IFACE"
    if not devices:
        return "no RDMA device found; for soft-RoCE: rdma link add rxe0 type rxe netdev IFACE"
    return None


_SIOCGIFADDR = 0x8915


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:  # unused GID table entries refuse to be read (EINVAL)
        return ""


def rdma_ipv4_addresses() -> set[str]:
    """IPv4 addresses of the network devices that RDMA ports sit on (RoCE), read
    from sysfs and ``SIOCGIFADDR``."""
    netdevs = {_read(path) for pattern in ("*/ports/*/gid_attrs/ndevs/*", "*/parent")
               for path in Path("/sys/class/infiniband").glob(pattern)}
    found = set()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for netdev in netdevs - {""}:
            request = struct.pack("256s", netdev.encode()[:15])
            try:
                reply = fcntl.ioctl(sock.fileno(), _SIOCGIFADDR, request)
            except OSError:
                continue
            found.add(socket.inet_ntoa(reply[20:24]))
    return found
