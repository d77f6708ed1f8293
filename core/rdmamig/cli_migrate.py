"""The ``migrate``, ``listen`` and ``send`` verbs.

``migrate`` runs the whole job on one machine: a destination in a child process and a
source in this one, on loopback, over a synthetic guest. ``listen`` and ``send`` are
the two halves for two hosts, with blocks backed by files or shared memory.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import re
import signal
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import attrs

from .caps import SOURCE_DEFAULTS, Capability
from .engine import (
    ChecksumTracker,
    Destination,
    DestinationResult,
    RamBlock,
    Source,
    SourceConfig,
    SourceResult,
)
from .engine.ramblock import PAGES_PER_CHUNK
from .errors import MigrationError, RdmamigError, UsageError
from .plugins import Registry, load_registry
from .policy import Hint, PolicyOptions, UnpinPolicy
from .report import build_report, plot_timeline, summary_table, write_report
from .transport import Backend
from .workload import PATTERNS, SyntheticWorkload, fill_guest

_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 1000, "kib": 2**10, "m": 2**20, "mb": 1000**2,
          "mib": 2**20, "g": 2**30, "gb": 1000**3, "gib": 2**30, "t": 2**40, "tib": 2**40}


def parse_size(text: str) -> int:
    """``1GiB``, ``512M``, ``4096`` -> bytes (K/M/G alone are binary, as in QEMU)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise UsageError(f"cannot parse size {text!r} (examples: 1GiB, 512M, 4096)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT``."""
    match = re.fullmatch(r"\[([^\]]+)\]:(\d+)|([^:\[\]]+):(\d+)", text)
    if not match:
        raise UsageError(f"cannot parse address {text!r} (HOST:PORT or [IPV6]:PORT)")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if port > 65535:
        raise UsageError(f"port {port} in {text!r} is over 65535")
    return host, port


def whole_number(low: int, high: int | None = None) -> Callable[[str], int]:
    """An option's parser: a whole number from ``low`` to ``high`` (or more, without
    ``high``); argparse names the option in its message."""
    def parse(text: str) -> int:
        if (not text.strip().isdigit() or int(text) < low
                or (high is not None and int(text) > high)):
            bounds = f"from {low} to {high}" if high is not None else f"{low} or more"
            raise UsageError(f"{text!r} is not a whole number {bounds}")
        return int(text)
    return parse


def parse_milliseconds(text: str) -> float:
    """An option's parser: milliseconds, 0 or more."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise UsageError(f"{text!r} is not a number of milliseconds, 0 or more")
    return value


#: ``--channels``: connections to stripe over (the TCP backend's MAX_LANES, which
#: core cannot import from a plugin; the backend checks it again).
parse_channels = whole_number(1, 16)


def parse_hint(text: str) -> Hint:
    """``hot:BLOCK:OFFSET:LEN`` or ``cold:...`` (sizes as in :func:`parse_size`)."""
    parts = text.split(":")
    if len(parts) != 4 or parts[0] not in ("hot", "cold"):
        raise UsageError(f"cannot parse hint {text!r} (hot|cold:BLOCK:OFFSET:LEN)")
    return Hint(kind=parts[0], block=parts[1], offset=parse_size(parts[2]),  # type: ignore[arg-type]
                length=parse_size(parts[3]))


# ---------------------------------------------------------------- shared options


@attrs.frozen(kw_only=True)
class Plan:
    """What the user selected, resolved against the plugin registry."""

    backend: type[Backend]
    #: Keyword options for the backend's constructor (``--device``, ``--channels``).
    backend_options: dict[str, Any] = attrs.field(factory=dict)
    policy: type[UnpinPolicy]
    options: PolicyOptions
    requested: Capability
    config: SourceConfig


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of every verb that connects: backend, device, report, timeout."""
    parser.add_argument("--backend", default="tcp", help="transport (rdmamig backends)")
    parser.add_argument("--device", metavar="NAME",
                        help="RDMA device the address must be on (verbs; e.g. rxe0, mlx5_0)")
    parser.add_argument("--report", type=Path, metavar="FILE.json", help="write a JSON report")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds to wait for the peer (default 60)")


def add_tuning_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of every verb that runs a source (``migrate``, ``send``, the policy
    lab): how it uses the link and when it converges. Read by :func:`source_config`
    and :func:`backend_options`."""
    parser.add_argument("--channels", type=parse_channels, default=1, metavar="N",
                        help="connections to stripe the pages over, as QEMU's multifd "
                             "(tcp; 1-16, default 1)")
    parser.add_argument("--max-downtime", type=parse_milliseconds, default=300.0,
                        metavar="MS", help="downtime to converge to, in ms (default 300)")
    parser.add_argument("--max-iterations", type=whole_number(1),
                        default=30, metavar="N",
                        help="rounds before stop-and-copy at the latest (default 30)")
    parser.add_argument("--inline-pages", type=whole_number(0, PAGES_PER_CHUNK),
                        default=SourceConfig().inline_pages,
                        metavar="N", help="send up to N dirty pages of an unregistered chunk "
                                          "inside control messages instead of registering it "
                                          "(rdmamig peers; default 16, 0: always register)")
    parser.add_argument("--auto-converge", action="store_true",
                        help="throttle the workload when dirtying outpaces the link")
    parser.add_argument("--unregister", choices=("async", "inline"), default="async",
                        help="unpin beside the writes (batched, worker thread) or inline, "
                             "one chunk per request (default async)")


def source_config(args: argparse.Namespace) -> SourceConfig:
    """The source's tunables from :func:`add_tuning_arguments` and ``--timeout``."""
    return SourceConfig(max_downtime=args.max_downtime / 1000,
                        max_iterations=args.max_iterations,
                        auto_converge=args.auto_converge, timeout=args.timeout,
                        inline_pages=args.inline_pages,
                        async_unregister=args.unregister == "async")


def _add_source_arguments(parser: argparse.ArgumentParser) -> None:
    add_connection_arguments(parser)
    add_tuning_arguments(parser)
    parser.add_argument("--policy", default="pin-until-done",
                        help="unpin policy (rdmamig policies)")
    parser.add_argument("--pin-cap", type=parse_size, metavar="BYTES",
                        help="most bytes pinned on each side, for capped policies")
    parser.add_argument("--hint", type=parse_hint, action="append", default=[],
                        metavar="hot|cold:BLOCK:OFFSET:LEN", help="hints for --policy hints")
    parser.add_argument("--hints-file", type=Path, help="file of hints, one per line")
    parser.add_argument("--pin-all", action="store_true",
                        help="ask for PIN_ALL: register whole blocks up front")
    parser.add_argument("--plot", type=Path, metavar="FILE.png",
                        help="draw a timeline (needs matplotlib)")
    parser.add_argument("--quiet", action="store_true", help="no live progress display")


def _plan(args: argparse.Namespace, registry: Registry) -> Plan:
    backend = registry.backend(args.backend)
    policy = registry.policy(args.policy)
    hints = list(args.hint)
    if args.hints_file is not None:
        try:
            lines = [line.strip() for line in args.hints_file.read_text().splitlines()]
        except OSError as exc:
            raise UsageError(f"cannot read hints file: {exc}") from None
        hints += [parse_hint(line) for line in lines if line and not line.startswith("#")]
    options = PolicyOptions(pin_cap=args.pin_cap, hints=tuple(hints))
    if args.pin_cap is not None and policy(options).pin_cap is None:
        raise UsageError(f"policy {policy.name!r} keeps no cap; --pin-cap is for lru, "
                         f"memlock and hints")
    requested = SOURCE_DEFAULTS | policy.capabilities
    if args.pin_all:
        if not policy.keeps_everything:
            raise UsageError(f"--pin-all registers whole blocks up front, and policy "
                             f"{policy.name!r} unpins chunks: use one or the other")
        requested |= Capability.PIN_ALL
    return Plan(backend=backend, backend_options=backend_options(args), policy=policy,
                options=options, requested=requested, config=source_config(args))


def backend_options(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments for the backend from ``--device`` and ``--channels``."""
    options: dict[str, Any] = {}
    if args.device:
        options["device"] = args.device
    if getattr(args, "channels", 1) != 1:
        options["channels"] = args.channels
    return options


def _available(backend: type[Backend], options: dict[str, Any] | None = None) -> Backend:
    try:
        instance = backend(**(options or {}))
    except TypeError:
        raise UsageError(f"backend {backend.name!r} takes no option "
                         f"{', '.join('--' + key for key in options or {})}") from None
    reason = instance.unavailable_reason()
    if reason is not None:
        raise UsageError(f"backend {backend.name!r} cannot run here: {reason}")
    return instance


# ---------------------------------------------------------------- the source side


def _progress(quiet: bool, total: int) -> tuple[Callable[[dict[str, float]], None], Any]:
    """A live rich display fed by the source's samples."""
    if quiet:
        return (lambda sample: None), None
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    progress = Progress(TextColumn("[bold]migrating"), BarColumn(),
                        TextColumn("{task.fields[line]}"), TimeElapsedColumn(), transient=True)
    task = progress.add_task("migrate", total=total, line="")
    last = {"t": 0.0, "written": 0.0}

    def update(sample: dict[str, float]) -> None:
        dt = max(sample["t"] - last["t"], 1e-6)
        rate = (sample["bytes_written"] - last["written"]) / dt / 1e9
        last.update(t=sample["t"], written=sample["bytes_written"])
        progress.update(task, completed=min(sample["bytes_written"], total), line=(
            f"sent {sample['bytes_written'] / 2**20:,.0f} MiB  {rate:5.2f} GB/s  "
            f"dirty {sample['dirty_bytes'] / 2**20:,.1f} MiB  "
            f"pinned {sample['pinned_bytes'] / 2**20:,.0f} MiB"))
    return update, progress


def run_source(plan: Plan, host: str, port: int, blocks: Sequence[RamBlock], *,
               workload: Any = None, trackers: Sequence[ChecksumTracker] = (),
               quiet: bool = True) -> tuple[SourceResult, str | None]:
    """Connect and migrate ``blocks``: the source's result (what it did, also when it
    failed) and the reason it failed, or None.

    Raises:
        UsageError: the destination cannot be reached.
    """
    backend = _available(plan.backend, plan.backend_options)
    started = time.monotonic()
    total = sum(b.length for b in blocks)
    update, progress = _progress(quiet, total)
    try:
        endpoint = backend.connect(host=host, port=port, requested=plan.requested,
                                   timeout=plan.config.timeout)
    except RdmamigError as exc:
        raise UsageError(f"cannot reach the destination {host}:{port}: {exc}") from exc
    with endpoint:
        source = Source(endpoint, blocks, policy=plan.policy(plan.options), config=plan.config,
                        workload=workload, trackers=trackers, on_progress=update,
                        started_at=started)
        try:
            with progress if progress is not None else contextlib.nullcontext():
                source.run()
        except MigrationError as exc:
            return source.result, str(exc)
    return source.result, None


# ---------------------------------------------------------------- the destination side


def _receive(backend: Backend, host: str, port: int, *, timeout: float,
             blocks: Sequence[RamBlock] | None,
             make_block: Callable[[str, int], RamBlock] | None,
             announce: Callable[[int], None]) -> Destination:
    listener = backend.listen(host=host, port=port, supported=backend.supported)
    with listener:
        announce(listener.address[1])
        endpoint = listener.accept(timeout=timeout)
    destination = Destination(endpoint, blocks=blocks, make_block=make_block, timeout=timeout)
    with endpoint, contextlib.suppress(MigrationError):  # destination.result holds the reason
        destination.run()
    return destination


def _destination_child(backend_name: str, options: dict[str, Any], host: str,
                       layout: list[tuple[str, int]], timeout: float,
                       pipe: Connection) -> None:
    """Body of ``migrate``'s destination process: allocate and pre-fault the RAM
    (QEMU's ``prealloc=on``), listen, report the port, receive, report the result."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    try:
        backend = load_registry().backend(backend_name)(**options)
        blocks = [RamBlock.anonymous(name, length) for name, length in layout]
        destination = _receive(backend, host, 0, timeout=timeout, blocks=blocks,
                               make_block=None, announce=lambda port: pipe.send(port))
        pipe.send(attrs.asdict(destination.result))
    except BaseException as exc:  # the parent must hear about anything
        pipe.send(f"destination failed: {exc}")
    finally:
        pipe.close()


# ---------------------------------------------------------------- the verbs


def _finish(args: argparse.Namespace, report: dict[str, Any]) -> int:
    from rich.console import Console
    if args.report is not None:
        write_report(args.report, report)
    if getattr(args, "plot", None) is not None:
        plot_timeline(report, args.plot)
    console = Console(stderr=True)
    console.print(summary_table(report))
    if not report["verified"]:
        reason = report["error"] or "the migration was not verified"
        console.print(f"rdmamig {args.verb}: failed: {reason}", markup=False, highlight=False,
                      soft_wrap=True)
        return 1
    return 0


@attrs.frozen(kw_only=True)
class Guest:
    """The synthetic guest of ``rdmamig migrate``."""

    ram: int
    blocks: int = 1
    zero_fraction: float = 0.0
    dirty_rate: float = 0.0
    pattern: str = "uniform"

    def layout(self) -> list[tuple[str, int]]:
        """(name, length) of each block; lengths are whole pages.

        Raises:
            UsageError: the sizes do not make blocks.
        """
        if not 0 <= self.zero_fraction <= 1:
            raise UsageError(f"--zero-fraction {self.zero_fraction} is not between 0 and 1")
        if self.blocks < 1 or self.ram < self.blocks * 4096:
            raise UsageError(f"--ram {self.ram} cannot hold {self.blocks} block(s)")
        per_block = (self.ram // self.blocks) // 4096 * 4096
        return [(f"ram{i}", per_block) for i in range(self.blocks)]


def migrate_locally(plan: Plan, guest: Guest, *, host: str = "127.0.0.1",
                    quiet: bool = True) -> dict[str, Any]:
    """Migrate a synthetic guest from this process to a destination child process on
    ``host``; returns the report (``verified`` says whether it worked)."""
    layout = guest.layout()
    ram_bytes = sum(length for _name, length in layout)
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    timeout = plan.config.timeout
    process = context.Process(target=_destination_child, name="rdmamig-destination",
                              args=(plan.backend.name, plan.backend_options, host, layout,
                                    timeout, child))
    process.start()
    child.close()
    blocks = [RamBlock.anonymous(name, length) for name, length in layout]
    fill_guest(blocks, zero_fraction=guest.zero_fraction)
    workload = SyntheticWorkload(blocks, rate=guest.dirty_rate, pattern=guest.pattern)
    source: SourceResult | None = None
    error = None
    try:
        if not parent.poll(timeout):
            raise MigrationError("the destination process did not start listening")
        port = parent.recv()
        if isinstance(port, str):
            raise MigrationError(port)
        workload.start()
        source, error = run_source(plan, host, port, blocks, workload=workload, quiet=quiet)
    except MigrationError as exc:
        error = str(exc)
    finally:
        workload.close()
    destination = None
    if parent.poll(timeout):
        received = parent.recv()
        if isinstance(received, str):
            error = error or received
        else:
            destination = DestinationResult(**received)
    process.join(timeout)
    if process.is_alive():
        process.kill()
    return build_report(backend=plan.backend.name, policy=plan.policy.name,
                        ram_bytes=ram_bytes, source=source, destination=destination,
                        error=error, pattern=guest.pattern, dirty_rate=guest.dirty_rate,
                        pin_cap=plan.options.pin_cap,
                        channels=plan.backend_options.get("channels", 1),
                        unregister="async" if plan.config.async_unregister else "inline")


def _migrate(args: argparse.Namespace) -> int:
    plan = _plan(args, load_registry())
    _available(plan.backend, plan.backend_options)
    guest = Guest(ram=args.ram, blocks=args.blocks, zero_fraction=args.zero_fraction,
                  dirty_rate=args.dirty_rate, pattern=args.pattern)
    return _finish(args, migrate_locally(plan, guest, host=args.host, quiet=args.quiet))


def _safe_name(name: str) -> str:
    # Block names may hold slashes (QEMU's "/rom@etc/acpi/tables").
    return re.sub(r"[^A-Za-z0-9@._-]", "_", name.strip("/")) or "block"


def _listen(args: argparse.Namespace) -> int:
    registry = load_registry()
    backend = _available(registry.backend(args.backend), backend_options(args))
    host, port = parse_address(args.address)
    into: Path = args.into
    into.mkdir(parents=True, exist_ok=True)
    partial: list[tuple[Path, Path]] = []

    def make_block(name: str, length: int) -> RamBlock:
        final = into / _safe_name(name)
        staging = into / f".{final.name}.partial"
        partial.append((staging, final))
        return RamBlock.from_file(name, staging, length=length, populate=True)

    def announce(bound: int) -> None:
        print(f"listening on {host}:{bound}", flush=True)

    destination = _receive(backend, host, port, timeout=args.timeout, blocks=None,
                           make_block=make_block, announce=announce)
    result = destination.result
    ok = result.completed and result.verified
    for staging, final in partial:
        # Only a verified migration is exposed under the blocks' own names.
        if ok:
            staging.replace(final)
        else:
            staging.unlink(missing_ok=True)
    if result.state and ok:
        (into / "state.bin").write_bytes(result.state)
    report = build_report(backend=args.backend, policy="-", ram_bytes=sum(
        b.length for b in destination.blocks), source=None, destination=result,
        error=result.error)
    report["verified"] = ok
    return _finish(args, report)


def _parse_block(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise UsageError(f"cannot parse block {text!r} (NAME=PATH)")
    return name, Path(path)


class _PausePid:
    """Stops another process (a VM, a writer) for stop-and-copy with SIGSTOP."""

    def __init__(self, pid: int | None, state: bytes) -> None:
        self.pid = pid
        self._state = state

    def _signal(self, sig: int) -> None:
        if self.pid is not None:
            os.kill(self.pid, sig)

    def stop(self) -> None:
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def throttle(self, fraction: float) -> None:
        pass

    def state(self) -> bytes:
        return self._state


def _send(args: argparse.Namespace) -> int:
    registry = load_registry()
    plan = _plan(args, registry)
    host, port = parse_address(args.address)
    if not args.block:
        raise UsageError("give at least one --block NAME=PATH")
    blocks = []
    for name, path in map(_parse_block, args.block):
        try:
            blocks.append(RamBlock.from_file(name, path))
        except (OSError, ValueError) as exc:
            raise UsageError(f"block {name}={path}: {exc}") from None
    trackers = [ChecksumTracker(block) for block in blocks] if args.live else []
    state = args.state.read_bytes() if args.state is not None else b""
    workload = _PausePid(args.pause_pid, state)
    try:
        source, error = run_source(plan, host, port, blocks, workload=workload,
                                   trackers=trackers, quiet=args.quiet)
    finally:
        workload.resume()
    report = build_report(backend=args.backend, policy=args.policy,
                          ram_bytes=sum(b.length for b in blocks), source=source,
                          destination=None, error=error, channels=args.channels)
    return _finish(args, report)


def add_verbs(verbs: Any) -> None:
    """Add the migration verbs to the ``rdmamig`` parser."""
    migrate = verbs.add_parser("migrate", help="migrate a synthetic guest over loopback "
                                               "(a destination process and a source)")
    migrate.add_argument("--ram", type=parse_size, default=2**30, help="RAM size (1GiB)")
    migrate.add_argument("--blocks", type=int, default=1, help="number of RAM blocks")
    migrate.add_argument("--zero-fraction", type=float, default=0.0,
                         help="fraction of pages that are zero")
    migrate.add_argument("--dirty-rate", type=parse_size, default=0, metavar="RATE",
                         help="bytes per second the workload dirties (e.g. 100MiB)")
    migrate.add_argument("--pattern", choices=PATTERNS, default="uniform")
    migrate.add_argument("--host", default="127.0.0.1", help="loopback address to use")
    _add_source_arguments(migrate)
    migrate.set_defaults(run=_migrate)

    listen = verbs.add_parser("listen", help="receive a migration into files under DIR")
    listen.add_argument("address", metavar="ADDR:PORT")
    listen.add_argument("--into", type=Path, required=True, metavar="DIR")
    add_connection_arguments(listen)
    listen.set_defaults(run=_listen)

    send = verbs.add_parser("send", help="migrate file-backed blocks to a listener")
    send.add_argument("address", metavar="ADDR:PORT")
    send.add_argument("--block", action="append", default=[], metavar="NAME=PATH")
    send.add_argument("--live", action="store_true",
                      help="track pages written by other processes (checksums per page)")
    send.add_argument("--pause-pid", type=int, metavar="PID",
                      help="SIGSTOP this process for stop-and-copy, SIGCONT after")
    send.add_argument("--state", type=Path, help="file sent as the non-RAM state")
    _add_source_arguments(send)
    send.set_defaults(run=_send)
