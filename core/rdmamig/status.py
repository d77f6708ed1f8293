"""A running migration as QEMU shows one through QMP: its status and passes as
``MIGRATION`` / ``MIGRATION_PASS`` events, its figures as ``query-migrate``'s
answer, and the requests of whoever drives it (``migrate_cancel``, the live
parameters ``downtime-limit`` and ``max-bandwidth``).

A :class:`Monitor` is shared by the migration's thread, which tells it what
happens (its status, and its figures as a typed :class:`Progress`), and any number
of watchers (the ``--events`` file, the control socket of :mod:`rdmamig.qmp`),
which hear events and ask for figures. What a watcher may change while the
migration runs is apart from that, in :class:`Parameters` (``Monitor.parameters``),
which the engine reads.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable
from typing import Any

import attrs

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
#: Seconds ``mbps`` is measured over while a migration runs: the writes go in
#: pieces of a tenth of a second under a bandwidth limit, and a rate over a shorter
#: window swings with them.
RATE_WINDOW_S = 1.0


def event(name: str, data: dict[str, Any]) -> Event:
    """A QMP event object, timestamped as QEMU does."""
    now = time.time()
    return {"event": name, "data": data,
            "timestamp": {"seconds": int(now), "microseconds": int(now % 1 * 1e6)}}


def capability_names(capabilities: int) -> list[str]:
    """The names of the capability bits set in ``capabilities``, lower case."""
    return [flag.name.lower().replace("_", "-") for flag in Capability
            if flag.name and capabilities & flag]


#: QEMU's bounds of the live parameters (migration/options.c): 2000 s of downtime,
#: SIZE_MAX bytes per second.
MAX_DOWNTIME_MS = 2_000_000
MAX_BANDWIDTH = 2**64 - 1


@attrs.define
class Parameters:
    """What whoever drives a migration may change while it runs, read by the
    engine: QMP's ``downtime-limit`` and ``max-bandwidth``, and ``migrate_cancel``.

    Attributes:
        max_downtime: the downtime limit, in seconds.
        max_bandwidth: bytes per second the writes may use (None: no limit).
        cancel_requested: set by ``migrate_cancel``; the engine stops at its next step.
    """

    max_downtime: float
    max_bandwidth: int | None = None
    cancel_requested: threading.Event = attrs.Factory(threading.Event)

    def set(self, *, downtime_limit_ms: float | None = None,
            max_bandwidth: int | None = None) -> None:
        """``migrate-set-parameters``: the live tunables (a bandwidth of 0: none),
        bounded as QEMU bounds them (``migrate_params_check``).

        Raises:
            ValueError: a value out of QEMU's range (nothing is changed).
        """
        if downtime_limit_ms is not None and not 0 <= downtime_limit_ms <= MAX_DOWNTIME_MS:
            raise ValueError(f"Parameter 'downtime-limit' expects an integer in the range "
                             f"of 0 to {MAX_DOWNTIME_MS} ms")
        if max_bandwidth is not None and not 0 <= max_bandwidth <= MAX_BANDWIDTH:
            raise ValueError(f"Parameter 'max-bandwidth' expects an integer in the range "
                             f"of 0 to {MAX_BANDWIDTH} bytes/second")
        if downtime_limit_ms is not None:
            self.max_downtime = downtime_limit_ms / 1000
        if max_bandwidth is not None:
            self.max_bandwidth = max_bandwidth or None

    def query(self) -> dict[str, Any]:
        """``query-migrate-parameters``' answer, for the parameters rdmamig has."""
        return {"downtime-limit": round(self.max_downtime * 1000),
                "max-bandwidth": self.max_bandwidth or 0}


@attrs.define
class Progress:
    """The figures of a running migration, as the engine last recorded them."""

    #: Bytes of RAM sent (written and inline).
    transferred: int = 0
    #: Bytes of dirty RAM still to send.
    remaining: int = 0
    #: Pages found all zero.
    duplicate: int = 0
    #: Pages sent with their data.
    normal: int = 0
    #: The pass under way (1: the bulk round).
    passes: int = 0
    #: Megabits per second of ``transferred``: over the last second or more while
    #: it runs, over the whole migration once it has ended (as QEMU's).
    mbps: float = 0.0
    #: Pages dirtied per second in the last pass.
    dirty_pages_rate: float = 0.0
    expected_downtime_s: float = 0.0
    downtime_s: float = 0.0
    #: What the endpoint has registered.
    pinned_bytes: int = 0
    #: What the kernel counts against RLIMIT_MEMLOCK.
    locked_bytes: int = 0


class Monitor:
    """The status and figures of one migration (out), and its live parameters (in).

    Args:
        total_bytes: the RAM being migrated.
        max_downtime: the downtime limit in seconds (``downtime-limit`` changes it).
        max_bandwidth: bytes per second the writes may use (None: no limit).

    Attributes:
        parameters: what the engine reads and whoever drives the migration changes.
    """

    def __init__(self, *, total_bytes: int, max_downtime: float,
                 max_bandwidth: int | None = None) -> None:
        self.total_bytes = total_bytes
        self.parameters = Parameters(max_downtime=max_downtime, max_bandwidth=max_bandwidth)
        self._lock = threading.Lock()
        self._listeners: list[Callable[[Event], None]] = []
        self._status = Status.NONE
        self._started = time.monotonic()
        self._setup_s: float | None = None
        self._ended_s: float | None = None
        self._progress = Progress(remaining=total_bytes)
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
            if self._status == Status.CANCELLING and status not in FINAL:
                return  # as QEMU's: a cancelled migration only ends (one cancelled in setup too)
            if self._status == Status.NONE:  # QEMU's clock starts with setup
                self._started = time.monotonic()
            self._status = status
            now = time.monotonic() - self._started
            if status == Status.ACTIVE and self._setup_s is None:
                self._setup_s = now
            if status in FINAL:
                self._ended_s = now
                self.error = error
                # As QEMU's at completion: the whole migration's rate.
                self._progress.mbps = self._progress.transferred * 8 / max(now, 1e-9) / 1e6
        self._emit("MIGRATION", {"status": status.value})

    def new_pass(self, number: int, *, dirty_pages_rate: float) -> None:
        """Pass ``number`` (1 for the bulk round) starts: a MIGRATION_PASS event,
        with the figures at its start under ``rdmamig`` (QMP's event has only
        ``pass``; a client that knows no more ignores the rest)."""
        self.update(passes=number, dirty_pages_rate=dirty_pages_rate)
        ram = self.query().get("ram", {})
        self._emit("MIGRATION_PASS", {"pass": number, "rdmamig": {
            "transferred": ram.get("transferred", 0), "remaining": ram.get("remaining", 0),
            "dirty-pages-rate": ram.get("dirty-pages-rate", 0),
            "expected-downtime": round(self._progress.expected_downtime_s * 1000)}})

    def update(self, *, transferred: int | None = None, remaining: int | None = None,
               duplicate: int | None = None, normal: int | None = None,
               passes: int | None = None, dirty_pages_rate: float | None = None,
               expected_downtime_s: float | None = None, downtime_s: float | None = None,
               pinned_bytes: int | None = None, locked_bytes: int | None = None) -> None:
        """New figures (:class:`Progress`); those not given stay as they were."""
        given = {name: value for name, value in (
            ("transferred", transferred), ("remaining", remaining), ("duplicate", duplicate),
            ("normal", normal), ("passes", passes), ("dirty_pages_rate", dirty_pages_rate),
            ("expected_downtime_s", expected_downtime_s), ("downtime_s", downtime_s),
            ("pinned_bytes", pinned_bytes), ("locked_bytes", locked_bytes))
            if value is not None}
        with self._lock:
            for name, value in given.items():
                setattr(self._progress, name, value)
            if transferred is not None:
                now = time.monotonic()
                then, before = self._last_rate
                # The first figure comes sooner: a rate over a shorter window beats 0.
                first = self._progress.mbps == 0 and now - then >= RATE_WINDOW_S / 5
                if now - then >= RATE_WINDOW_S or first:
                    self._progress.mbps = (transferred - before) * 8 / (now - then) / 1e6
                    self._last_rate = (now, transferred)

    @property
    def progress(self) -> Progress:
        """The figures as last recorded (a copy)."""
        with self._lock:
            return attrs.evolve(self._progress)

    # ------------------------------------------------------------ watchers ask

    @property
    def total_time_s(self) -> float:
        """Seconds from setup to the final status (or to now, before it):
        ``query-migrate``'s ``total-time``, and every report's total time."""
        with self._lock:
            ended = self._ended_s
            return ended if ended is not None else time.monotonic() - self._started

    def cancel(self) -> None:
        """``migrate_cancel``: the migration stops at its next step, as failed
        migrations do (workload resumed, pins released) and ends ``cancelled``."""
        if self._status not in FINAL:
            self.parameters.cancel_requested.set()
            self.set_status(Status.CANCELLING)

    def query(self) -> dict[str, Any]:
        """``query-migrate``'s answer, shaped and named as QEMU's."""
        with self._lock:
            f = self._progress
            status = self._status
            setup = self._setup_s
        answer: dict[str, Any] = {"status": status.value}
        if status == Status.NONE:
            return answer
        answer["total-time"] = round(self.total_time_s * 1000)
        if setup is not None:
            answer["setup-time"] = round(setup * 1000)
        if status == Status.COMPLETED:
            answer["downtime"] = round(f.downtime_s * 1000)
        elif status in (Status.ACTIVE, Status.DEVICE):
            answer["expected-downtime"] = round(f.expected_downtime_s * 1000)
        answer["ram"] = {
            "transferred": f.transferred,
            "remaining": f.remaining if status != Status.COMPLETED else 0,
            "total": self.total_bytes,
            "duplicate": f.duplicate,
            "normal": f.normal,
            "normal-bytes": f.normal * PAGE_SIZE,
            "mbps": round(f.mbps, 3),
            "dirty-pages-rate": round(f.dirty_pages_rate),
            "dirty-sync-count": f.passes,
            "page-size": PAGE_SIZE,
        }
        if self.error is not None and status == Status.FAILED:
            answer["error-desc"] = self.error
        # rdmamig's own, under its name as QMP extensions are: what is pinned now.
        answer["rdmamig"] = {"pinned-bytes": f.pinned_bytes, "locked-bytes": f.locked_bytes}
        return answer
