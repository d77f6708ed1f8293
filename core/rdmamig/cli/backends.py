"""``rdmamig backends``: the transports and whether each runs here."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..plugins import load_registry


def run(args: argparse.Namespace) -> int:
    """Run ``rdmamig backends``."""
    rows = []
    for name, cls in load_registry().backends.items():
        try:
            reason = cls().unavailable_reason()
        except Exception as exc:  # a broken plugin must not hide the others
            reason = f"the plugin failed to load: {exc}"
        rows.append({"name": name, "available": reason is None, "reason": reason,
                     "description": cls.description, "module": cls.__module__,
                     "max_channels": cls.max_channels})
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


def add_verb(verbs: Any) -> None:
    """Add ``backends`` to the ``rdmamig`` parser."""
    backends = verbs.add_parser("backends", help="list transports and whether they run here")
    backends.add_argument("--json", action="store_true", help="print a JSON list")
    backends.set_defaults(run=run)
