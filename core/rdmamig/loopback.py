"""A whole migration on one machine: a destination in a child process and a source
in this one, over loopback, on a synthetic guest (what ``rdmamig migrate`` and the
policy lab run)."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import signal
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import attrs

from .auth import PreSharedKey
from .engine import DestinationResult, RamBlock, SourceResult
from .errors import ConfigurationError, MigrationError
from .limits import physical_memory
from .migration import Plan, receive, run_source
from .plugins import load_registry
from .report import build_report
from .status import Monitor
from .workload import SyntheticWorkload, fill_guest


@attrs.frozen(kw_only=True)
class Guest:
    """The synthetic guest: its RAM, split into ``blocks``, and how it dirties it."""

    ram: int
    blocks: int = 1
    zero_fraction: float = 0.0
    dirty_rate: float = 0.0
    pattern: str = "uniform"

    def layout(self) -> list[tuple[str, int]]:
        """(name, length) of each block; lengths are whole pages.

        Raises:
            ConfigurationError: the sizes do not make blocks.
        """
        if not 0 <= self.zero_fraction <= 1:
            raise ConfigurationError(f"--zero-fraction {self.zero_fraction} is not between "
                                     f"0 and 1")
        if self.blocks < 1 or self.ram < self.blocks * 4096:
            raise ConfigurationError(f"--ram {self.ram} cannot hold {self.blocks} block(s)")
        if self.ram % 4096:
            raise ConfigurationError(
                f"--ram {self.ram} bytes is not whole 4 KiB pages (decimal suffixes are "
                f"powers of ten: 1GB is 10**9 bytes, 1GiB or 1G 2**30)")
        if 2 * self.ram > physical_memory():
            raise ConfigurationError(
                f"--ram {self.ram / 2**30:.1f} GiB twice (the source's and the destination's "
                f"copies) is more than this machine's {physical_memory() / 2**30:.1f} GiB")
        # Blocks of whole pages: what does not divide evenly is left out.
        per_block = (self.ram // self.blocks) // 4096 * 4096
        return [(f"ram{i}", per_block) for i in range(self.blocks)]


def _destination_child(backend_name: str, options: dict[str, Any], host: str,
                       layout: list[tuple[str, int]], timeout: float,
                       key: PreSharedKey | None, pipe: Connection, log_level: int) -> None:
    """Body of the destination process: allocate and pre-fault the RAM (QEMU's
    ``prealloc=on``), listen, report the port, receive, report the result. It logs
    as much as the parent's ``rdmamig`` logger (``log_level``)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    logging.basicConfig(format="rdmamig destination: %(message)s")
    logging.getLogger("rdmamig").setLevel(log_level)
    try:
        backend = load_registry().backend(backend_name)(**options)
        blocks = [RamBlock.anonymous(name, length) for name, length in layout]
        destination = receive(backend, host, 0, timeout=timeout, blocks=blocks,
                              announce=lambda port: pipe.send(port), key=key)
        pipe.send(attrs.asdict(destination.result))
    except BaseException as exc:  # the parent must hear about anything
        with contextlib.suppress(OSError):  # unless it is gone (Ctrl-C)
            pipe.send(f"destination failed: {exc}")
    finally:
        pipe.close()


def _receive_from(pipe: Connection, process: Any) -> Any:
    """What the destination process sent next.

    Raises:
        MigrationError: it ended without a word (its pipe closed).
    """
    try:
        return pipe.recv()
    except EOFError:
        process.join(5)
        raise MigrationError(f"the destination process ended without saying why (exit "
                             f"status {process.exitcode})") from None


def _start_destination(plan: Plan, host: str, layout: list[tuple[str, int]]
                       ) -> tuple[Connection, Any]:
    """Start the destination process; returns our end of its pipe and the process."""
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(target=_destination_child, name="rdmamig-destination",
                              args=(plan.backend.name, plan.backend_options, host, layout,
                                    plan.config.timeout, plan.key, child,
                                    logging.getLogger("rdmamig").getEffectiveLevel()))
    process.start()
    child.close()
    return parent, process


def _migrate_to(process: Any, pipe: Connection, plan: Plan, guest: Guest, host: str,
                layout: list[tuple[str, int]],
                on_progress: Callable[[dict[str, float]], None] | None, monitor: Monitor
                ) -> tuple[SourceResult | None, DestinationResult | None,
                           MigrationError | str | None]:
    """Fill the guest, migrate it to the destination process once it listens, and
    collect what both sides made of it."""
    timeout = plan.config.timeout
    blocks = [RamBlock.anonymous(name, length) for name, length in layout]
    fill_guest(blocks, zero_fraction=guest.zero_fraction)
    workload = SyntheticWorkload(blocks, rate=guest.dirty_rate, pattern=guest.pattern)
    source: SourceResult | None = None
    error: MigrationError | str | None = None
    try:
        if not pipe.poll(timeout):
            raise MigrationError("the destination process did not start listening")
        port = _receive_from(pipe, process)
        if isinstance(port, str):
            raise MigrationError(port)
        workload.start()
        source, error = run_source(plan, host, port, blocks, workload=workload,
                                   on_progress=on_progress, monitor=monitor)
    except MigrationError as exc:
        error = exc
    finally:
        workload.close()
    destination = None
    if pipe.poll(timeout):
        try:
            received = _receive_from(pipe, process)
        except MigrationError as exc:
            received = str(exc)
        if isinstance(received, str):
            error = error or received
        else:
            destination = DestinationResult(**received)
    return source, destination, error


def migrate_locally(plan: Plan, guest: Guest, *, host: str = "127.0.0.1",
                    on_progress: Callable[[dict[str, float]], None] | None = None,
                    monitor: Monitor | None = None) -> dict[str, Any]:
    """Migrate a synthetic guest from this process to a destination child process on
    ``host``; returns the report (``verified`` says whether it worked). ``monitor``
    follows the source (:func:`~rdmamig.migration.run_source`).

    Raises:
        ConfigurationError: the guest's sizes or the plan's backend are unusable.
    """
    layout = guest.layout()
    ram_bytes = sum(length for _name, length in layout)
    monitor = monitor or Monitor(total_bytes=ram_bytes, max_downtime=plan.config.max_downtime,
                                 max_bandwidth=plan.config.max_bandwidth)
    parent, process = _start_destination(plan, host, layout)
    try:
        source, destination, error = _migrate_to(process, parent, plan, guest, host, layout,
                                                 on_progress, monitor)
    except BaseException:
        # Interrupted (Ctrl-C) or broken here: the destination must not outlive us,
        # nor keep this process from exiting (multiprocessing joins its children).
        process.kill()
        raise
    finally:
        process.join(plan.config.timeout)
        if process.is_alive():
            process.kill()
        parent.close()
    return build_report(backend=plan.backend.name, policy=plan.label,
                        ram_bytes=ram_bytes, source=source, destination=destination,
                        error=error, status=monitor.query(), pattern=guest.pattern,
                        dirty_rate=guest.dirty_rate,
                        pin_cap=plan.options.pin_cap,
                        channels=plan.backend_options.get("channels", 1),
                        unregister="async" if plan.config.async_unregister else "inline")
