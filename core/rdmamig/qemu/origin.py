"""What replaying a QEMU migration as QEMU's stream needs, beside the RAM and the
device state: kept in a migration image's manifest and sent ahead of its blocks."""

from __future__ import annotations

import base64
from typing import Any

import attrs

from ..errors import ImageError

#: The longest machine type or device name an origin may hold (QEMU's idstr is 255).
MAX_NAME = 256
#: The most device sections an origin may list, and the largest configuration section.
MAX_DEVICES = 4096
MAX_CONFIGURATION = 64 << 10


def _printable(text: str) -> bool:
    return 0 < len(text) <= MAX_NAME and text.isascii() and text.isprintable()


@attrs.frozen(kw_only=True)
class QemuOrigin:
    """What replaying an image as QEMU's migration stream needs.

    Attributes:
        machine: the machine type (QEMU's destination must run the same).
        configuration: the configuration section's bytes, as QEMU sent them.
        ram_section_id, ram_instance_id, ram_version_id: the ``ram`` section's entry.
        footers: whether the stream's sections end with footers.
        devices: the device sections the VM description lists.
    """

    machine: str
    configuration: bytes
    ram_section_id: int
    ram_instance_id: int = 0
    ram_version_id: int = 4
    footers: bool = True
    devices: tuple[str, ...] = ()
    #: Whether the source announced the switchover (QEMU 10's MIG_CMD_SWITCHOVER_START).
    switchover_start: bool = False

    def record(self, addrs: list[int | None]) -> dict[str, Any]:
        """What a source says of an image of this origin (an ORIGIN record), and what
        a destination of a QEMU source keeps: with each block's guest address."""
        return {"origin": "qemu", "qemu": self.to_json(), "addrs": addrs}

    def to_json(self) -> dict[str, Any]:
        """The manifest's ``qemu`` object."""
        data = attrs.asdict(self)
        data["configuration"] = base64.b64encode(self.configuration).decode()
        data["devices"] = list(self.devices)
        return data

    @classmethod
    def from_json(cls, data: Any) -> QemuOrigin:
        """Read a manifest's ``qemu`` object.

        Raises:
            ImageError: it is malformed.
        """
        try:
            origin = cls(machine=str(data["machine"]),
                         configuration=base64.b64decode(data["configuration"], validate=True),
                         ram_section_id=int(data["ram_section_id"]),
                         ram_instance_id=int(data.get("ram_instance_id", 0)),
                         ram_version_id=int(data.get("ram_version_id", 4)),
                         footers=bool(data.get("footers", True)),
                         devices=tuple(str(d) for d in data.get("devices", ())),
                         switchover_start=bool(data.get("switchover_start", False)))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ImageError(f"the manifest's qemu object is malformed: {exc!r}") from None
        origin.check()
        return origin

    def check(self) -> None:
        """What a stream can carry: the ids are u32 as QEMU writes them, the machine
        type and the device names short printable ASCII (they are printed, and
        written back into a stream), the configuration of a plausible size.

        Raises:
            ImageError: a field that is not, named with its value escaped.
        """
        for name in ("ram_section_id", "ram_instance_id", "ram_version_id"):
            value = getattr(self, name)
            if not 0 <= value < 2**32:
                raise ImageError(f"qemu {name}={value}: not a u32")
        if not _printable(self.machine):
            raise ImageError(f"qemu machine={self.machine!r}: not 1 to {MAX_NAME} printable "
                             f"ASCII characters")
        if len(self.configuration) > MAX_CONFIGURATION:
            raise ImageError(f"qemu configuration of {len(self.configuration)} bytes: over "
                             f"{MAX_CONFIGURATION}")
        if len(self.devices) > MAX_DEVICES:
            raise ImageError(f"qemu devices: {len(self.devices)}, over {MAX_DEVICES}")
        for device in self.devices:
            if not _printable(device):
                raise ImageError(f"qemu device {device!r}: not 1 to {MAX_NAME} printable "
                                 f"ASCII characters")
