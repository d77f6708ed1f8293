"""``rdmamig migrate``: the whole job on one machine, a destination process and a
source over loopback, on a synthetic guest (:mod:`rdmamig.loopback`)."""

from __future__ import annotations

import argparse
from typing import Any

from ..loopback import Guest, migrate_locally
from ..migration import available_backend
from ..plugins import load_registry
from ..status import Monitor
from ..workload import PATTERNS
from .options import (
    add_source_arguments,
    finish,
    parse_fraction,
    parse_size,
    plan_from_args,
    progress_display,
    watched,
    whole_number,
)


def run(args: argparse.Namespace) -> int:
    """Run ``rdmamig migrate``."""
    plan = plan_from_args(args, load_registry())
    available_backend(plan.backend, plan.backend_options)
    guest = Guest(ram=args.ram, blocks=args.blocks, zero_fraction=args.zero_fraction,
                  dirty_rate=args.dirty_rate, pattern=args.pattern)
    total = sum(length for _name, length in guest.layout())
    monitor = Monitor(total_bytes=total, max_downtime=plan.config.max_downtime,
                      max_bandwidth=plan.config.max_bandwidth)
    with watched(args, monitor), progress_display(args.quiet, monitor,
                                                  first="filling") as update:
        report = migrate_locally(plan, guest, host=args.host, on_progress=update,
                                 monitor=monitor)
    return finish(args, report)


def add_verb(verbs: Any) -> None:
    """Add ``migrate`` to the ``rdmamig`` parser."""
    migrate = verbs.add_parser("migrate", help="migrate a synthetic guest over loopback "
                                               "(a destination process and a source)")
    migrate.add_argument("--ram", type=parse_size, default=2**30, help="RAM size (1GiB)")
    migrate.add_argument("--blocks", type=whole_number(1), default=1,
                         help="number of RAM blocks (default 1)")
    migrate.add_argument("--zero-fraction", type=parse_fraction, default=0.0,
                         help="fraction of pages that are zero, 0 to 1 (default 0)")
    migrate.add_argument("--dirty-rate", type=parse_size, default=0, metavar="RATE",
                         help="bytes per second the workload dirties (e.g. 100MiB)")
    migrate.add_argument("--pattern", choices=PATTERNS, default="uniform")
    migrate.add_argument("--host", default="127.0.0.1", help="loopback address to use")
    add_source_arguments(migrate)
    migrate.set_defaults(run=run)
