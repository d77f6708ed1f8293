"""What the verbs share: parsers of sizes, addresses and numbers, the options of
every verb that connects or runs a source, the plan they resolve to, the live
progress display and the end of a run (report, plot, summary, exit status)."""

from __future__ import annotations

import argparse
import contextlib
import decimal
import json
import logging
import math
import os
import re
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .. import __version__
from ..auth import load_key
from ..engine import SourceConfig
from ..errors import ConfigurationError
from ..memory import PAGES_PER_CHUNK
from ..migration import Plan, source_capabilities
from ..migration import parse_address as split_address
from ..plugins import Registry
from ..policy import Hint, PolicyOptions
from ..qmp import ControlServer, parse_control
from ..report import plot_timeline, require_matplotlib, summary_table, write_report
from ..status import Event, Monitor
from ..units import size_text


class UsageError(ConfigurationError, argparse.ArgumentTypeError):
    """A command-line argument is wrong (the CLI exits with status 2); argparse
    reports one raised by a type function as that argument's error."""


_UNITS = {"": 1, "b": 1}
for _power, _letter in enumerate("kmgt", start=1):
    # K, M, G, T alone are binary, as in QEMU; KB, MB... decimal; KiB, MiB... binary.
    _UNITS.update({_letter: 1024**_power, _letter + "ib": 1024**_power,
                   _letter + "b": 1000**_power})


#: What -q and -v / -vv do, before the verb or after it.
QUIET_HELP = "no live progress display; log only warnings and errors"
VERBOSE_HELP = ("log more (-v: the steps of both sides, -vv: every control message, "
                "registration and unpin decision)")


def parse_size(text: str) -> int:
    """``1GiB``, ``512M``, ``1.5G``, ``2TB``, ``1e9``, ``4096`` -> bytes (K, M, G, T
    alone are binary, as in QEMU; KB... decimal). A size must come to whole bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?(?:[eE]\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise UsageError(f"cannot parse size {text!r} (examples: 1GiB, 512M, 1.5G, 2TB, "
                         f"4096)")
    size = decimal.Decimal(match.group(1)) * _UNITS[match.group(2).lower()]
    if size != size.to_integral_value():
        raise UsageError(f"size {text!r} is {size} bytes: not a whole number of bytes")
    return int(size)


def parse_control_address(text: str) -> Path:
    """An option's parser: ``unix:PATH`` (:func:`rdmamig.qmp.parse_control`)."""
    try:
        return parse_control(text)
    except ConfigurationError as exc:
        raise UsageError(str(exc)) from None


def parse_seconds(text: str) -> float:
    """An option's parser: a number of seconds, more than 0 and finite."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise UsageError(f"{text!r} is not a number of seconds (more than 0)")
    return value


def parse_fraction(text: str) -> float:
    """An option's parser: a fraction from 0 to 1."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value <= 1:
        raise UsageError(f"{text!r} is not a fraction from 0 to 1")
    return value


#: What an output option takes for standard output.
STDOUT = Path("-")


def output_file(text: str) -> Path:
    """An option's parser: a file to write (``-``: standard output), checked before
    any work: its directory exists and may be written, and it is not a directory."""
    path = Path(text)
    if path == STDOUT:
        return path
    directory = path.parent
    if path.is_dir():
        raise UsageError(f"{text!r} is a directory, not a file to write")
    if not directory.is_dir():
        raise UsageError(f"cannot write {text!r}: {directory} is not a directory")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write {text!r}: {directory} is not writable")
    return path


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT`` (:func:`rdmamig.migration.parse_address`)."""
    try:
        return split_address(text)
    except ConfigurationError as exc:
        raise UsageError(str(exc)) from None


def whole_number(low: int, high: int | None = None) -> Callable[[str], int]:
    """An option's parser: a whole number from ``low`` to ``high`` (or more, without
    ``high``); argparse names the option in its message."""
    def parse(text: str) -> int:
        if (not text.strip().isdigit() or int(text) < low
                or (high is not None and int(text) > high)):
            raise UsageError(f"{text!r} is not a whole number {_bounds(low, high)}")
        return int(text)
    return parse


def _bounds(low: int, high: int | None) -> str:
    return f"from {low} to {high}" if high is not None else f"{low} or more"


def parse_milliseconds(text: str) -> float:
    """An option's parser: milliseconds, 0 or more."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise UsageError(f"{text!r} is not a number of milliseconds, 0 or more")
    return value


def parse_hint(text: str) -> Hint:
    """``hot:BLOCK:OFFSET:LEN`` or ``cold:...`` (sizes as in :func:`parse_size`)."""
    parts = text.split(":")
    if len(parts) != 4 or parts[0] not in ("hot", "cold"):
        raise UsageError(f"cannot parse hint {text!r} (hot|cold:BLOCK:OFFSET:LEN)")
    return Hint(kind=parts[0], block=parts[1], offset=parse_size(parts[2]),  # type: ignore[arg-type]
                length=parse_size(parts[3]))


# ---------------------------------------------------------------- options


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of every verb that connects: backend, device, report, timeout, TLS, key,
    and how much it says."""
    parser.add_argument("-q", "--quiet", action="store_true",
                        help=QUIET_HELP)
    parser.add_argument("-v", "--verbose", action="count", default=0, help=VERBOSE_HELP)
    parser.add_argument("--backend", default="tcp", help="transport (rdmamig backends)")
    parser.add_argument("--device", metavar="NAME",
                        help="RDMA device the address must be on (verbs; e.g. rxe0, mlx5_0)")
    parser.add_argument("--report", type=output_file, metavar="FILE.json",
                        help="write a JSON report (-: standard output)")
    parser.add_argument("--timeout", type=parse_seconds, default=60.0,
                        help="seconds to wait for the peer (default 60)")
    tls = parser.add_argument_group("TLS (tcp backend)")
    tls.add_argument("--tls", action="store_true",
                     help="encrypt with TLS: a listener presents --tls-cert, a source checks "
                          "it against --tls-ca or the system's CAs and the host name")
    tls.add_argument("--tls-cert", type=Path, metavar="PEM",
                     help="this side's certificate (a listener needs one); implies --tls")
    tls.add_argument("--tls-key", type=Path, metavar="PEM",
                     help="its private key (default: in --tls-cert)")
    tls.add_argument("--tls-ca", type=Path, metavar="PEM",
                     help="CA the peer's certificate must come from; on a listener, "
                          "sources must present one")
    parser.add_argument("--events", type=output_file, metavar="FILE",
                        help="write QMP events (MIGRATION, MIGRATION_PASS) as JSON lines "
                             "(-: standard output)")
    parser.add_argument("--psk-file", type=Path, metavar="FILE",
                        help="a pre-shared key both ends prove (mode 600; default: "
                             "$RDMAMIG_PSK if set). QEMU peers cannot: none for them")


def add_tuning_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of every verb that runs a source (``migrate``, ``send``, the policy
    lab): how it uses the link and when it converges. Read by :func:`source_config`
    and :func:`backend_options`."""
    parser.add_argument("--channels", type=whole_number(1), default=1, metavar="N",
                        help="connections to stripe the pages over, as QEMU's multifd "
                             "(as many as the backend takes; default 1)")
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


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``migrate`` and ``send``: connection, tuning, policy, output."""
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
    parser.add_argument("--plot", type=output_file, metavar="FILE.png",
                        help="draw a timeline (needs matplotlib)")
    parser.add_argument("--max-bandwidth", type=parse_size, metavar="RATE",
                        help="bytes per second the writes may use (e.g. 1GiB; default: "
                             "no limit); migrate-set-parameters changes it live")
    parser.add_argument("--control", type=parse_control_address, metavar="unix:PATH",
                        help="a QMP socket to watch and drive the migration (query-migrate, "
                             "migrate_cancel, migrate-set-parameters)")


def source_config(args: argparse.Namespace) -> SourceConfig:
    """The source's tunables from :func:`add_tuning_arguments` and ``--timeout``."""
    return SourceConfig(max_downtime=args.max_downtime / 1000,
                        max_bandwidth=getattr(args, "max_bandwidth", None),
                        max_iterations=args.max_iterations,
                        auto_converge=args.auto_converge, timeout=args.timeout,
                        inline_pages=args.inline_pages,
                        async_unregister=args.unregister == "async")


def backend_options(args: argparse.Namespace, registry: Registry) -> dict[str, Any]:
    """Keyword arguments for ``--backend`` from ``--device`` and ``--channels``,
    checked against what the backend says it takes.

    Raises:
        UsageError: more channels than the backend stripes over.
    """
    backend = registry.backend(args.backend)
    options: dict[str, Any] = {}
    if args.device:
        options["device"] = args.device
    if args.tls or args.tls_cert or args.tls_key or args.tls_ca:
        options.update(tls=True, tls_cert=args.tls_cert, tls_key=args.tls_key,
                       tls_ca=args.tls_ca)
    if getattr(args, "handshake_timeout", None) is not None:
        options["handshake_timeout"] = args.handshake_timeout
    channels = getattr(args, "channels", 1)
    if channels > backend.max_channels:
        raise UsageError(f"argument --channels: '{channels}' is not a whole number "
                         f"{_bounds(1, backend.max_channels)} (what backend "
                         f"{backend.name!r} stripes over)")
    if channels != 1:
        options["channels"] = channels
    return options


def plan_from_args(args: argparse.Namespace, registry: Registry) -> Plan:
    """The plan of a source verb (:func:`add_source_arguments`).

    Raises:
        UsageError: options that contradict each other or the policy.
        UnknownNameError: an unknown backend or policy.
    """
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
    if args.pin_cap is not None and not policy.takes_cap:
        capped = [name for name, cls in registry.policies.items() if cls.takes_cap]
        raise UsageError(f"policy {policy.name!r} keeps no cap; --pin-cap is for "
                         f"{', '.join(capped)}")
    key = load_key(args.psk_file)
    if args.plot is not None:
        require_matplotlib()
    try:
        return Plan(backend=backend, backend_options=backend_options(args, registry),
                    policy=policy, options=options,
                    requested=source_capabilities(policy, key=key, pin_all=args.pin_all),
                    config=source_config(args), key=key)
    except ConfigurationError as exc:  # Plan's own rules, said as usage
        raise UsageError(str(exc)) from None


# ---------------------------------------------------------------- the run


@contextlib.contextmanager
def events_file(path: Path | None) -> Iterator[Callable[[Event], None] | None]:
    """A writer of events as JSON lines into ``path`` (``-``: standard output), safe
    to call from several threads; None without a path."""
    if path is None:
        yield None
        return
    with contextlib.ExitStack() as stack:
        out = sys.stdout if path == STDOUT else stack.enter_context(path.open("w"))
        lock = threading.Lock()

        def write(event: Event) -> None:
            with lock:
                out.write(json.dumps(event) + "\n")
                out.flush()

        yield write


def check_outputs(args: argparse.Namespace) -> None:
    """Refuse two writers of standard output (JSON lines and a JSON document mixed).

    Raises:
        UsageError: ``--events -`` and ``--report -`` together.
    """
    if getattr(args, "events", None) == STDOUT and getattr(args, "report", None) == STDOUT:
        raise UsageError("--events - and --report - would both write standard output: give "
                         "one of them a file")


@contextlib.contextmanager
def watched(args: argparse.Namespace, monitor: Monitor) -> Iterator[Monitor]:
    """``monitor`` with what ``--events`` and ``--control`` ask for attached: events
    written as JSON lines, a QMP socket served, both closed at the end.

    Raises:
        UsageError: events and the report would both go to standard output.
    """
    check_outputs(args)
    with contextlib.ExitStack() as stack:
        write = stack.enter_context(events_file(args.events))
        if write is not None:
            monitor.subscribe(write)
            stack.callback(monitor.unsubscribe, write)
        if getattr(args, "control", None) is not None:
            stack.enter_context(ControlServer(args.control, monitor, version=__version__,
                                              capabilities={
                "rdma-pin-all": bool(getattr(args, "pin_all", False)),
                "auto-converge": bool(getattr(args, "auto_converge", False)),
                "events": True}))
        yield monitor


@contextlib.contextmanager
def progress_display(quiet: bool, monitor: Monitor, *, first: str = "starting"
                     ) -> Iterator[Callable[[dict[str, float]], None]]:
    """A live rich display of ``monitor``: ``first`` until the migration's status
    says otherwise (setup, each pass, stop-and-copy), and per batch what
    ``query-migrate`` would say – sent, the rate over the last fraction of a
    second, what remains, the dirty rate measured, the expected downtime, what is
    pinned. Log lines print above it meanwhile, not into it. Yields the sample
    callback."""
    if quiet:
        yield lambda sample: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    # On standard error, as the logs: standard output may carry a report or events.
    progress = Progress(TextColumn("[bold]{task.description:>10}"), BarColumn(bar_width=20),
                        TextColumn("{task.fields[line]}"), TimeElapsedColumn(), transient=True,
                        console=Console(stderr=True))
    task = progress.add_task(first, total=monitor.total_bytes, line="")

    def on_event(event: Event) -> None:
        data = event["data"]
        progress.update(task, description=f"pass {data['pass']}" if "pass" in data
                        else str(data["status"]))

    def update(sample: dict[str, float]) -> None:
        status = monitor.query()
        ram = status.get("ram", {})
        remaining = ram.get("remaining", monitor.total_bytes)
        progress.update(task, completed=monitor.total_bytes - min(remaining,
                                                                  monitor.total_bytes),
                        line=(f"{ram.get('mbps', 0) / 8000:4.2f} GB/s "
                              f"left {size_text(remaining)} "
                              f"dirty {size_text(ram.get('dirty-pages-rate', 0) * 4096)}/s "
                              f"~{status.get('expected-downtime', 0)} ms "
                              f"pin {size_text(sample['pinned_bytes'])}"))

    monitor.subscribe(on_event)
    root = logging.getLogger()
    handlers = root.handlers[:]
    above = _AboveTheDisplay(progress.console)
    above.setFormatter(handlers[0].formatter if handlers else None)
    try:
        with progress:
            if progress.console.is_terminal:  # else nothing is drawn to garble
                root.handlers[:] = [above]
            yield update
    finally:
        root.handlers[:] = handlers
        monitor.unsubscribe(on_event)


class _AboveTheDisplay(logging.Handler):
    """Log lines printed by the live display's console: above the display, which
    a plain write to the terminal would garble."""

    def __init__(self, console: Any) -> None:
        super().__init__()
        self._console = console

    def emit(self, record: logging.LogRecord) -> None:
        self._console.print(self.format(record), markup=False, highlight=False,
                            soft_wrap=True)


def finish(args: argparse.Namespace, report: dict[str, Any]) -> int:
    """Write the report and plot asked for, print the summary; the exit status."""
    from rich.console import Console
    if args.report is not None:
        write_report(args.report, report)
    if getattr(args, "plot", None) is not None:
        plot_timeline(report, args.plot)
    console = Console(stderr=True)
    console.print(summary_table(report))
    if not report["succeeded"]:
        reason = report["error"] or "the migration was not verified"
        console.print(f"rdmamig {args.verb}: failed: {reason}", markup=False, highlight=False,
                      soft_wrap=True)
        return 1
    return 0
