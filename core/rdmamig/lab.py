"""The policy lab: ``rdmamig policies compare`` runs the same live migration under
several unpin policies, caps and workloads and compares what each cost."""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path
from typing import Any

from .caps import SOURCE_DEFAULTS
from .cli_migrate import (
    Guest,
    Plan,
    add_connection_arguments,
    add_tuning_arguments,
    backend_options,
    migrate_locally,
    parse_size,
    source_config,
)
from .errors import UsageError
from .plugins import load_registry
from .policy import Hint, PolicyOptions
from .report import write_report
from .workload import PATTERNS

#: Policies that take a pin cap; the others run once per workload.
CAPPED = ("lru", "memlock", "hints")


def _runs(args: argparse.Namespace) -> list[tuple[str, str, int | None]]:
    policies = [p for p in args.policies.split(",") if p]
    caps = [parse_size(c) for c in args.caps.split(",") if c]
    patterns = [p for p in args.patterns.split(",") if p]
    for pattern in patterns:
        if pattern not in PATTERNS:
            raise UsageError(f"unknown pattern {pattern!r}; known: {', '.join(PATTERNS)}")
    runs: list[tuple[str, str, int | None]] = []
    for pattern, policy in itertools.product(patterns, policies):
        if policy in CAPPED:
            runs += [(pattern, policy, cap) for cap in caps]
        else:
            runs.append((pattern, policy, None))
    return runs


def compare(args: argparse.Namespace) -> int:
    """Run every (workload, policy, cap) and print the table."""
    from rich.console import Console
    from rich.table import Table

    registry = load_registry()
    backend = registry.backend(args.backend)
    runs = _runs(args)
    for _pattern, name, _cap in runs:
        registry.policy(name)  # unknown names fail before anything runs
    # The hot set of the hotspot workload: the first tenth of the RAM.
    hot = Hint(kind="hot", block="ram0", offset=0, length=max(args.ram // 10, 4096))
    console = Console(stderr=True)
    results: list[dict[str, Any]] = []
    for pattern, name, cap in runs:
        policy = registry.policy(name)
        plan = Plan(backend=backend, backend_options=backend_options(args), policy=policy,
                    options=PolicyOptions(pin_cap=cap, hints=(hot,)),
                    requested=policy.capabilities | SOURCE_DEFAULTS,
                    config=source_config(args))
        guest = Guest(ram=args.ram, dirty_rate=args.dirty_rate, pattern=pattern)
        console.print(f"[dim]{pattern} / {name}"
                      f"{f' / cap {cap >> 20} MiB' if cap else ''} ...[/]")
        results.append(migrate_locally(plan, guest))

    table = Table("workload", "policy", "cap MiB", "total s", "downtime ms", "GB/s",
                  "reg", "unreg", "re-reg", "inline pages", "peak pinned src / dst MiB",
                  "verified",
                  title=f"policy lab: {args.ram >> 20} MiB, dirtying "
                        f"{args.dirty_rate / 2**20:.0f} MiB/s")
    for report in results:
        cap = report.get("pin_cap")
        table.add_row(
            report["pattern"], report["policy"], f"{cap >> 20}" if cap else "-",
            f"{report['total_time_s']:.2f}", f"{report['downtime_ms']:.0f}",
            f"{report['throughput_gbps']:.2f}", str(report["registrations"]),
            str(report["unregistrations"]), str(report["reregistrations"]),
            str(report["inline_pages"]),
            f"{report['pinned_peak_bytes_source'] >> 20} / "
            f"{report['pinned_peak_bytes_destination'] >> 20}",
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


def plot_pinned(results: list[dict[str, Any]], path: Path) -> None:
    """Pinned bytes (source) over time, one line per policy, one panel per workload."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install 'rdmamig[plot]'") from None
    patterns = list(dict.fromkeys(r["pattern"] for r in results))
    fig, axes = plt.subplots(len(patterns), 1, sharex=True, squeeze=False,
                             figsize=(8, 3 * len(patterns)))
    for axis, pattern in zip(axes[:, 0], patterns, strict=True):
        for report in (r for r in results if r["pattern"] == pattern):
            samples = report["timeline"]["source"]
            label = report["policy"] + (f" {report['pin_cap'] >> 20} MiB"
                                        if report.get("pin_cap") else "")
            axis.plot([s["t"] for s in samples], [s["pinned_bytes"] / 2**20 for s in samples],
                      label=label)
        axis.set_title(f"{pattern} dirtying")
        axis.set_ylabel("pinned MiB (source)")
        axis.legend(fontsize="small")
    axes[-1, 0].set_xlabel("seconds since connect")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``rdmamig policies compare``."""
    parser.add_argument("--ram", type=parse_size, default=2**30, help="RAM size (1GiB)")
    parser.add_argument("--dirty-rate", type=parse_size, default=100 * 2**20, metavar="RATE",
                        help="bytes per second the workload dirties (default 100MiB)")
    parser.add_argument("--policies", default="pin-until-done,eager,lru,hints",
                        help="comma-separated policy names")
    parser.add_argument("--caps", default="64MiB",
                        help="comma-separated pin caps for lru, memlock and hints")
    parser.add_argument("--patterns", default=",".join(PATTERNS),
                        help="comma-separated workloads")
    add_connection_arguments(parser)
    add_tuning_arguments(parser)
    parser.add_argument("--plot", type=Path, metavar="FILE.png",
                        help="draw pinned bytes over time per policy (needs matplotlib)")
