"""A running migration as QEMU shows one through QMP: its status and passes as
``MIGRATION`` / ``MIGRATION_PASS`` events, its figures as ``query-migrate``'s
answer, and the requests of whoever drives it (``migrate_cancel``, the live
parameters ``downtime-limit`` and ``max-bandwidth``).

A :class:`Monitor` is shared by the migration's thread, which tells it what
happens, and any number of watchers (the ``--events`` file, the control socket of
:mod:`rdmamig.qmp`), which hear events and ask for figures.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable
from typing import Any

from .caps import Capability
from .wire import PAGE_BYTES as PAGE_SIZE

Event = dict[str, Any]


class Status(enum.StrEnum):
    """QMP's ``MigrationStatus`` values that rdmamig goes through."""

    NONE = "none"
    SETUP = "setup"
    ACTIVE = "active"
    DEVICE = "device"  # stop-and-copy: the workload is stopped
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


#: The statuses a migration ends in.
FINAL = {Status.COMPLETED, Status.FAILED, Status.CANCELLED}


def event(name: str, data: dict[str, Any]) -> Event:
    """A QMP event object, timestamped as QEMU does."""
    now = time.time()
    return {"event": name, "data": data,
            "timestamp": {"seconds": int(now), "microseconds": int(now % 1 * 1e6)}}


def capability_names(capabilities: int) -> list[str]:
    """The names of the capability bits set in ``capabilities``, lower case."""
    return [flag.name.lower().replace("_", "-") for flag in Capability
            if flag.name and capabilities & flag]


class Monitor:
    """The status, figures and requests of one migration.

    Args:
        total_bytes: the RAM being migrated.
        max_downtime: the downtime limit in seconds (``downtime-limit`` changes it).
        max_bandwidth: bytes per second the writes may use (None: no limit).
    """

    def __init__(self, *, total_bytes: int, max_downtime: float,
                 max_bandwidth: int | None = None) -> None:
        self.total_bytes = total_bytes
        self.max_downtime = max_downtime
        self.max_bandwidth = max_bandwidth
        self.cancel_requested = threading.Event()
        self._lock = threading.Lock()
        self._listeners: list[Callable[[Event], None]] = []
        self._status = Status.NONE
        self._started = time.monotonic()
        self._setup_s: float | None = None
        self._ended_s: float | None = None
        self._figures: dict[str, float] = {"transferred": 0, "remaining": total_bytes,
                                          "duplicate": 0, "normal": 0, "passes": 0,
                                          "mbps": 0.0, "dirty_pages_rate": 0.0,
                                          "expected_downtime_s": 0.0, "downtime_s": 0.0,
                                          "pinned_bytes": 0, "locked_bytes": 0}
        self._last_rate: tuple[float, float] = (self._started, 0.0)
        self.error: str | None = None

    # ------------------------------------------------------------ watchers

    def subscribe(self, listener: Callable[[Event], None]) -> None:
        """Hear every event from now on (on the migration's thread: be quick)."""
        with self._lock:
            self._listeners.append(listener)

    def unsubscribe(self, listener: Callable[[Event], None]) -> None:
        with self._lock:
            if listener in self._listeners:
                self._listeners.remove(listener)

    def _emit(self, name: str, data: dict[str, Any]) -> None:
        with self._lock:
            listeners = list(self._listeners)
        message = event(name, data)
        for listener in listeners:
            listener(message)

    # ------------------------------------------------------------ the migration says

    @property
    def status(self) -> Status:
        return self._status

    def set_status(self, status: Status, error: str | None = None) -> None:
        """Enter ``status`` (a MIGRATION event); a final one also ends the clock."""
        with self._lock:
            if self._status in FINAL or self._status == status:
                return
            if self._status == Status.NONE:  # QEMU's clock starts with setup
                self._started = time.monotonic()
            self._status = status
            now = time.monotonic() - self._started
            if status == Status.ACTIVE and self._setup_s is None:
                self._setup_s = now
            if status in FINAL:
                self._ended_s = now
                self.error = error
        self._emit("MIGRATION", {"status": status.value})

    def new_pass(self, number: int, *, dirty_pages_rate: float) -> None:
        """Pass ``number`` (1 for the bulk round) starts: a MIGRATION_PASS event,
        with the figures at its start under ``rdmamig`` (QMP's event has only
        ``pass``; a client that knows no more ignores the rest)."""
        with self._lock:
            self._figures["passes"] = number
            self._figures["dirty_pages_rate"] = dirty_pages_rate
        ram = self.query().get("ram", {})
        self._emit("MIGRATION_PASS", {"pass": number, "rdmamig": {
            "transferred": ram.get("transferred", 0), "remaining": ram.get("remaining", 0),
            "dirty-pages-rate": ram.get("dirty-pages-rate", 0),
            "expected-downtime": round(self._figures["expected_downtime_s"] * 1000)}})

    def update(self, **figures: float) -> None:
        """New figures: ``transferred``, ``remaining``, ``duplicate``, ``normal``
        (pages), ``expected_downtime_s``, ``downtime_s``, ``pinned_bytes`` (what the
        endpoint has registered), ``locked_bytes`` (what the kernel counts)."""
        with self._lock:
            self._figures.update(figures)
            if "transferred" in figures:
                now = time.monotonic()
                then, before = self._last_rate
                if now - then >= 0.2:  # a rate over a window, not one batch's spike
                    self._figures["mbps"] = (figures["transferred"] - before) * 8 / (
                        now - then) / 1e6
                    self._last_rate = (now, figures["transferred"])

    # ------------------------------------------------------------ watchers ask

    def cancel(self) -> None:
        """``migrate_cancel``: the migration stops at its next step, as failed
        migrations do (workload resumed, pins released) and ends ``cancelled``."""
        if self._status not in FINAL:
            self.cancel_requested.set()
            self.set_status(Status.CANCELLING)

    def set_parameters(self, *, downtime_limit_ms: float | None = None,
                       max_bandwidth: int | None = None) -> None:
        """``migrate-set-parameters``: the live tunables."""
        if downtime_limit_ms is not None:
            self.max_downtime = downtime_limit_ms / 1000
        if max_bandwidth is not None:
            self.max_bandwidth = max_bandwidth or None

    def parameters(self) -> dict[str, Any]:
        """``query-migrate-parameters``' answer, for the parameters rdmamig has."""
        return {"downtime-limit": round(self.max_downtime * 1000),
                "max-bandwidth": self.max_bandwidth or 0}

    def query(self) -> dict[str, Any]:
        """``query-migrate``'s answer, shaped and named as QEMU's."""
        with self._lock:
            f = dict(self._figures)
            status = self._status
            now = time.monotonic() - self._started
            setup, ended = self._setup_s, self._ended_s
        answer: dict[str, Any] = {"status": status.value}
        if status == Status.NONE:
            return answer
        elapsed = (ended if ended is not None else now) * 1000
        answer["total-time"] = round(elapsed)
        if setup is not None:
            answer["setup-time"] = round(setup * 1000)
        if status == Status.COMPLETED:
            answer["downtime"] = round(f["downtime_s"] * 1000)
        elif status in (Status.ACTIVE, Status.DEVICE):
            answer["expected-downtime"] = round(f["expected_downtime_s"] * 1000)
        answer["ram"] = {
            "transferred": int(f["transferred"]),
            "remaining": int(f["remaining"]) if status != Status.COMPLETED else 0,
            "total": self.total_bytes,
            "duplicate": int(f["duplicate"]),
            "normal": int(f["normal"]),
            "normal-bytes": int(f["normal"]) * PAGE_SIZE,
            "mbps": round(f["mbps"], 3),
            "dirty-pages-rate": round(f["dirty_pages_rate"]),
            "dirty-sync-count": int(f["passes"]),
            "page-size": PAGE_SIZE,
        }
        if self.error is not None and status == Status.FAILED:
            answer["error-desc"] = self.error
        # rdmamig's own, under its name as QMP extensions are: what is pinned now.
        answer["rdmamig"] = {"pinned-bytes": int(f["pinned_bytes"]),
                             "locked-bytes": int(f["locked_bytes"])}
        return answer
