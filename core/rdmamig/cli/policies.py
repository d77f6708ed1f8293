"""``rdmamig policies``: list the unpin policies, or compare them in the policy lab
(:mod:`rdmamig.lab`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..lab import lab_runs, plot_pinned, run_lab
from ..plugins import load_registry
from ..report import require_matplotlib, write_report
from ..units import size_text
from ..workload import PATTERNS
from .options import (
    add_connection_arguments,
    add_tuning_arguments,
    backend_options,
    parse_size,
    source_config,
)


def list_policies(args: argparse.Namespace) -> int:
    """Run ``rdmamig policies``."""
    rows = [{"name": name, "description": cls.description, "module": cls.__module__,
             "takes_cap": cls.takes_cap}
            for name, cls in load_registry().policies.items()]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            print(f"{row['name']:<16} {row['description']}")
    return 0


def compare(args: argparse.Namespace) -> int:
    """Run ``rdmamig policies compare``: every (workload, policy, cap), then the table."""
    from rich.console import Console
    from rich.table import Table

    registry = load_registry()
    runs = lab_runs(registry, policies=[p for p in args.policies.split(",") if p],
                    caps=[parse_size(c) for c in args.caps.split(",") if c],
                    patterns=[p for p in args.patterns.split(",") if p])
    options = backend_options(args, registry)
    if args.plot is not None:
        require_matplotlib()
    console = Console(stderr=True)
    results = run_lab(
        registry, runs, backend=registry.backend(args.backend), backend_options=options,
        config=source_config(args), ram=args.ram, dirty_rate=args.dirty_rate,
        before_each=lambda run: console.print(
            f"[dim]{run.pattern} / {run.policy}"
            f"{f' / cap {size_text(run.cap)}' if run.cap else ''} ...[/]"))

    table = Table("workload", "policy", "cap", "total s", "downtime ms", "GB/s",
                  "reg", "unreg", "re-reg", "inline pages", "peak pinned src / dst",
                  "verified",
                  title=f"policy lab: {size_text(args.ram)}, dirtying "
                        f"{size_text(args.dirty_rate)}/s")
    for report in results:
        cap = report.get("pin_cap")
        table.add_row(
            report["pattern"], report["policy"], size_text(cap) if cap else "-",
            f"{report['total_time_s']:.2f}", f"{report['downtime_ms']:.0f}",
            f"{report['throughput_gbps']:.2f}", str(report["registrations"]),
            str(report["unregistrations"]), str(report["reregistrations"]),
            str(report["inline_pages"]),
            f"{size_text(report['pinned_peak_bytes_source'])} / "
            f"{size_text(report['pinned_peak_bytes_destination'])}",
            "[green]yes[/]" if report["verified"] else f"[red]no[/] {report['error']}")
    output = Console()
    if not output.is_terminal:
        output.width = 200  # a pipe or a file: the whole table, not cut to 80 columns
    output.print(table)
    if args.report is not None:
        write_report(args.report, {"runs": results})
    if args.plot is not None:
        plot_pinned(results, args.plot)
    return 0 if all(r["verified"] for r in results) else 1


def add_verb(verbs: Any) -> None:
    """Add ``policies`` and ``policies compare`` to the ``rdmamig`` parser."""
    policies = verbs.add_parser("policies", help="list unpin policies, or compare them")
    policies.add_argument("--json", action="store_true", help="print a JSON list")
    policies.set_defaults(run=list_policies)
    parser = policies.add_subparsers(dest="action", metavar="ACTION").add_parser(
        "compare", help="run one live migration per policy, cap and workload; compare")
    parser.add_argument("--ram", type=parse_size, default=2**30, help="RAM size (1GiB)")
    parser.add_argument("--dirty-rate", type=parse_size, default=100 * 2**20, metavar="RATE",
                        help="bytes per second the workload dirties (default 100MiB)")
    parser.add_argument("--policies", default="pin-until-done,eager,lru,hints",
                        help="comma-separated policy names")
    parser.add_argument("--caps", default="64MiB",
                        help="comma-separated pin caps, for each policy that takes one")
    parser.add_argument("--patterns", default=",".join(PATTERNS),
                        help="comma-separated workloads")
    add_connection_arguments(parser)
    add_tuning_arguments(parser)
    parser.add_argument("--plot", type=Path, metavar="FILE.png",
                        help="draw pinned bytes over time per policy (needs matplotlib)")
    parser.set_defaults(run=compare)
