"""The ``rdmamig`` command line: argument parsing and dispatch to the verbs' modules.

Bad arguments (unknown backend or policy, unparsable size, unreachable address) end
in one clear line on stderr and exit status 2; a failed migration exits 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from .errors import RdmamigError, UnknownNameError, UsageError
from .plugins import load_registry


def _backends(args: argparse.Namespace) -> int:
    rows = []
    for name, cls in load_registry().backends.items():
        try:
            reason = cls().unavailable_reason()
        except Exception as exc:  # a broken plugin must not hide the others
            reason = f"the plugin failed to load: {exc}"
        rows.append({"name": name, "available": reason is None, "reason": reason,
                     "description": cls.description, "module": cls.__module__})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table
    table = Table("backend", "usable here", "description / reason")
    for row in rows:
        usable = "[green]yes[/]" if row["available"] else "[red]no[/]"
        table.add_row(str(row["name"]), usable, str(row["reason"] or row["description"]))
    Console().print(table)
    return 0


def _policies(args: argparse.Namespace) -> int:
    rows = [{"name": name, "description": cls.description, "module": cls.__module__}
            for name, cls in load_registry().policies.items()]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            print(f"{row['name']:<16} {row['description']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every verb."""
    parser = argparse.ArgumentParser(
        prog="rdmamig", description="Live migration of memory over RDMA, QEMU's protocol.")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    backends = verbs.add_parser("backends", help="list transports and whether they run here")
    backends.add_argument("--json", action="store_true", help="print a JSON list")
    backends.set_defaults(run=_backends)

    policies = verbs.add_parser("policies", help="list unpin policies, or compare them")
    policies.add_argument("--json", action="store_true", help="print a JSON list")
    policies.set_defaults(run=_policies)
    from . import lab
    compare = policies.add_subparsers(dest="action", metavar="ACTION").add_parser(
        "compare", help="run one live migration per policy, cap and workload; compare")
    lab.add_arguments(compare)
    compare.set_defaults(run=lab.compare)

    from . import cli_migrate
    cli_migrate.add_verbs(verbs)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args))
    except (UsageError, UnknownNameError) as exc:
        print(f"rdmamig {args.verb}: error: {exc}", file=sys.stderr)
        return 2
    except RdmamigError as exc:
        print(f"rdmamig {args.verb}: failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"rdmamig {args.verb}: interrupted", file=sys.stderr)
        return 130
