"""Workloads the source stops for stop-and-copy: the synthetic guest of ``rdmamig
migrate`` (RAM content and a thread that dirties pages at a set rate, the ``stress
--vm`` of the seed's measurements) and another process paused with SIGSTOP."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Iterator, Sequence

import numpy as np

from .errors import MigrationError
from .memory import PAGE_SIZE, RamBlock

PATTERNS = ("uniform", "hotspot", "sequential")
#: How often the workload wakes up to write its share of pages.
TICK = 0.002


def fill_guest(blocks: Sequence[RamBlock], *, zero_fraction: float, seed: int = 1) -> None:
    """Random bytes in every page except a random ``zero_fraction`` of them."""
    rng = np.random.default_rng(seed)
    step = 64 << 20
    for block in blocks:
        for at in range(0, block.length, step):
            end = min(at + step, block.length)
            block.array[at:end] = np.frombuffer(rng.bytes(end - at), dtype=np.uint8)
        if zero_fraction > 0:
            zero = rng.random(block.pages) < zero_fraction
            block.array.reshape(block.pages, PAGE_SIZE)[zero] = 0


class SyntheticWorkload:
    """A thread that writes ``rate`` bytes/s of pages and marks them dirty.

    Patterns: ``uniform`` (any page), ``hotspot`` (90 % of writes to 10 % of the
    pages), ``sequential`` (a scan that wraps around).
    """

    def __init__(self, blocks: Sequence[RamBlock], *, rate: float, pattern: str,
                 seed: int = 2) -> None:
        if pattern not in PATTERNS:
            raise ValueError(f"unknown pattern {pattern!r}; known: {', '.join(PATTERNS)}")
        self.blocks = list(blocks)
        self.rate = rate
        self.pattern = pattern
        self.pages_written = 0
        self.ticks = 0
        self._rng = np.random.default_rng(seed)
        self._cursor = 0
        self._throttle = 0.0
        self._running = threading.Event()
        self._running.set()
        self._quit = threading.Event()
        self._writing = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="rdmamig-workload", daemon=True)
        self._total = sum(b.pages for b in self.blocks)
        self._starts = np.cumsum([0] + [b.pages for b in self.blocks])

    def start(self) -> None:
        """Start dirtying."""
        if self.rate > 0:
            self._thread.start()

    def close(self) -> None:
        """Stop the thread for good."""
        self._quit.set()
        self._running.set()
        if self._thread.is_alive():
            self._thread.join()

    # Workload protocol of the source engine
    def stop(self) -> None:
        """Pause (stop-and-copy); returns once no write is in progress."""
        self._running.clear()
        with self._writing:  # wait out a tick that is writing now
            pass

    def resume(self) -> None:
        """Run again."""
        self._running.set()

    def throttle(self, fraction: float) -> None:
        """Write only ``1 - fraction`` of the rate (auto-converge)."""
        self._throttle = fraction

    def state(self) -> bytes:
        """The workload's counters, as the non-RAM state."""
        return json.dumps({"pages_written": self.pages_written, "ticks": self.ticks,
                           "pattern": self.pattern}).encode()

    def _pick(self, count: int) -> np.ndarray:
        total = self._total
        if self.pattern == "uniform":
            return self._rng.integers(0, total, count)
        if self.pattern == "hotspot":
            hot = max(total // 10, 1)
            picks = self._rng.integers(0, hot, count)
            cold = self._rng.random(count) >= 0.9
            picks[cold] = self._rng.integers(0, total, int(cold.sum()))
            return picks
        picks = (self._cursor + np.arange(count)) % total
        self._cursor = int(picks[-1] + 1) if count else self._cursor
        return picks

    def _loop(self) -> None:
        carry = 0.0
        last = time.monotonic()
        while not self._quit.is_set():
            self._running.wait()
            time.sleep(TICK)
            with self._writing:
                now = time.monotonic()
                if self._quit.is_set():
                    return
                if not self._running.is_set():
                    last = now
                    continue
                carry = self._tick(carry, now - last)
                last = now

    def _tick(self, carry: float, elapsed: float) -> float:
        carry += elapsed * self.rate * (1 - self._throttle) / PAGE_SIZE
        count, carry = int(carry), carry - int(carry)
        if not count:
            return carry
        pages = self._pick(count)
        self.ticks += 1
        for index, block in enumerate(self.blocks):
            mine = pages[(pages >= self._starts[index]) & (pages < self._starts[index + 1])]
            mine = mine - self._starts[index]
            if not len(mine):
                continue
            # A new counter value in the first word of each page, then mark dirty.
            words = block.array.view(np.uint64).reshape(block.pages, PAGE_SIZE // 8)
            words[mine, 0] = self.pages_written + np.arange(len(mine), dtype=np.uint64) + 1
            block.mark_pages_dirty(mine)
            self.pages_written += len(mine)
        return carry


class PausedProcess:
    """Another process (a VM, a writer) that owns the memory: stopped with SIGSTOP
    for stop-and-copy and resumed with SIGCONT. ``pid`` None: nothing to pause.

    A stop returns once every thread of the process has stopped (SIGSTOP only asks),
    so nothing it writes after the stop escapes the last pass.

    Args:
        pid: the process to pause.
        state: the non-RAM state sent after stop.
    """

    #: Seconds a process may take to stop before :meth:`stop` gives up.
    STOP_TIMEOUT = 10.0

    def __init__(self, pid: int | None, state: bytes = b"") -> None:
        self.pid = pid
        self._state = state
        self._stopped = False

    def stop(self) -> None:
        """SIGSTOP the process and wait until it has stopped.

        Raises:
            MigrationError: it is gone, or did not stop within :attr:`STOP_TIMEOUT`.
        """
        if self.pid is None or self._stopped:
            return
        try:
            os.kill(self.pid, signal.SIGSTOP)
        except ProcessLookupError:
            raise MigrationError(f"process {self.pid} (--pause-pid) is gone") from None
        self._stopped = True
        deadline = time.monotonic() + self.STOP_TIMEOUT
        while not _has_stopped(self.pid):
            if time.monotonic() > deadline:
                raise MigrationError(f"process {self.pid} (--pause-pid) did not stop within "
                                     f"{self.STOP_TIMEOUT:.0f} s of SIGSTOP")
            time.sleep(0.0005)

    def resume(self) -> None:
        """SIGCONT the process, if it was stopped here (and is still there)."""
        if self.pid is None or not self._stopped:
            return
        self._stopped = False
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGCONT)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """The process stopped for the length of the ``with`` block (a dirty-page
        sync), and running again after it unless it was stopped before."""
        if self._stopped:
            yield
            return
        try:
            self.stop()  # may fail once SIGSTOP is sent: it is continued all the same
            yield
        finally:
            self.resume()

    def throttle(self, fraction: float) -> None:
        """A paused-or-running process cannot be throttled: nothing happens."""

    def state(self) -> bytes:
        """The state given at construction."""
        return self._state


def _has_stopped(pid: int) -> bool:
    """Whether every thread of ``pid`` is stopped (or gone)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return True
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/stat", "rb") as f:
                stat = f.read()
        except (FileNotFoundError, ProcessLookupError):
            continue  # the thread has exited
        # The state follows the command name, which may hold anything but ends at
        # the last ')'.
        if stat.rpartition(b")")[2].split()[0] not in (b"T", b"t", b"Z", b"X"):
            return False
    return True
