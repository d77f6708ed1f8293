"""What replaying a QEMU migration as QEMU's stream needs, beside the RAM and the
device state: kept in a migration image's manifest and sent ahead of its blocks."""

from __future__ import annotations

import base64
from typing import Any

import attrs

from ..errors import ImageError


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
            return cls(machine=str(data["machine"]),
                       configuration=base64.b64decode(data["configuration"], validate=True),
                       ram_section_id=int(data["ram_section_id"]),
                       ram_instance_id=int(data.get("ram_instance_id", 0)),
                       ram_version_id=int(data.get("ram_version_id", 4)),
                       footers=bool(data.get("footers", True)),
                       devices=tuple(str(d) for d in data.get("devices", ())),
                       switchover_start=bool(data.get("switchover_start", False)))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ImageError(f"the manifest's qemu object is malformed: {exc!r}") from None
