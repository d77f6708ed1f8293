"""``rdmamig send``: migrate file-backed blocks (a VM's RAM file, shared memory) or
a migration image to a listener, optionally live while another process writes
the blocks."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..engine import RamBlock
from ..image import open_image
from ..migration import run_source
from ..plugins import load_registry
from ..report import build_report
from ..status import Monitor
from ..tracking import TRACKERS, choose_tracker
from ..workload import PausedProcess
from .options import (
    UsageError,
    add_source_arguments,
    finish,
    parse_address,
    plan_from_args,
    progress_display,
    watched,
)


def _parse_block(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise UsageError(f"cannot parse block {text!r} (NAME=PATH)")
    return name, Path(path)


def run(args: argparse.Namespace) -> int:
    """Run ``rdmamig send``."""
    plan = plan_from_args(args, load_registry())
    host, port = parse_address(args.address)
    origin = None
    paths: list[Path] = []
    if args.tracker != "auto" and not args.live:
        raise UsageError("--tracker is for --live")
    if args.image is not None:
        if args.block or args.state is not None or args.live:
            raise UsageError("--image sends a whole image: no --block, --state or --live "
                             "with it")
        image = open_image(args.image)
        if not args.no_digest_check:
            image.check_digests()
        # ibv_reg_mr pins even a read-only registration for writing on Linux before
        # 6.2 (FOLL_FORCE), which a read-only shared mapping refuses (EFAULT).
        blocks = image.blocks(writable=args.backend == "verbs")
        state, origin = image.state(), image.origin()
    elif not args.block:
        raise UsageError("give at least one --block NAME=PATH, or --image DIR")
    else:
        blocks = []
        named = [_parse_block(text)[0] for text in args.block]
        if twice := sorted({name for name in named if named.count(name) > 1}):
            raise UsageError(f"--block names must differ: {', '.join(map(repr, twice))} "
                             f"given more than once")
        for name, path in map(_parse_block, args.block):
            try:
                blocks.append(RamBlock.from_file(name, path))
                paths.append(path)
            except (OSError, ValueError) as exc:
                raise UsageError(f"block {name}={path}: {exc}") from None
        state = args.state.read_bytes() if args.state is not None else b""
    workload = PausedProcess(args.pause_pid, state)
    trackers = [choose_tracker(block, path, workload, wanted=args.tracker)
                for block, path in zip(blocks, paths, strict=True)] if args.live else []
    total = sum(b.length for b in blocks)
    monitor = Monitor(total_bytes=total, max_downtime=plan.config.max_downtime,
                      max_bandwidth=plan.config.max_bandwidth)
    try:
        with watched(args, monitor), progress_display(args.quiet, monitor) as update:
            source, error = run_source(plan, host, port, blocks, workload=workload,
                                       trackers=trackers, on_progress=update, origin=origin,
                                       monitor=monitor)
    finally:
        workload.resume()
    report = build_report(backend=args.backend, policy=plan.label, ram_bytes=total,
                          source=source, destination=None, error=error,
                          status=monitor.query(), channels=args.channels,
                          **({"dirty_tracking": {block.name: tracker.method for block, tracker
                                                 in zip(blocks, trackers, strict=True)}}
                             if trackers else {}))
    return finish(args, report)


def add_verb(verbs: Any) -> None:
    """Add ``send`` to the ``rdmamig`` parser."""
    send = verbs.add_parser("send", help="migrate file-backed blocks to a listener")
    send.add_argument("address", metavar="ADDR:PORT")
    send.add_argument("--block", action="append", default=[], metavar="NAME=PATH",
                      help="a block to send (repeat for each)")
    send.add_argument("--image", type=Path, metavar="DIR",
                      help="send a migration image (its blocks and state)")
    send.add_argument("--no-digest-check", action="store_true",
                      help="with --image: send even blocks that no longer match the "
                           "manifest's digests")
    send.add_argument("--live", action="store_true",
                      help="track the pages another process writes while the blocks move")
    send.add_argument("--tracker", choices=TRACKERS, default="auto",
                      help="with --live, how written pages are found: the kernel's "
                           "soft-dirty bits of the --pause-pid process, checksums of every "
                           "page each pass, or soft-dirty where it can be trusted (auto)")
    send.add_argument("--pause-pid", type=int, metavar="PID",
                      help="SIGSTOP this process for stop-and-copy, SIGCONT after")
    send.add_argument("--state", type=Path, help="file sent as the non-RAM state")
    add_source_arguments(send)
    send.set_defaults(run=run)
