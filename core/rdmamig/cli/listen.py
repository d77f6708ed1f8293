"""``rdmamig listen``: receive one migration into files under a directory, exposed
under the blocks' own names only once verified."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from ..engine import RamBlock
from ..migration import available_backend, receive
from ..plugins import load_registry
from ..report import build_report
from .options import add_connection_arguments, backend_options, finish, parse_address


def _safe_name(name: str) -> str:
    # Block names may hold slashes (QEMU's "/rom@etc/acpi/tables").
    return re.sub(r"[^A-Za-z0-9@._-]", "_", name.strip("/")) or "block"


def run(args: argparse.Namespace) -> int:
    """Run ``rdmamig listen``."""
    registry = load_registry()
    backend = available_backend(registry.backend(args.backend),
                                backend_options(args, registry))
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

    destination = receive(backend, host, port, timeout=args.timeout, make_block=make_block,
                          announce=announce)
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
    return finish(args, report)


def add_verb(verbs: Any) -> None:
    """Add ``listen`` to the ``rdmamig`` parser."""
    listen = verbs.add_parser("listen", help="receive a migration into files under DIR")
    listen.add_argument("address", metavar="ADDR:PORT")
    listen.add_argument("--into", type=Path, required=True, metavar="DIR")
    add_connection_arguments(listen)
    listen.set_defaults(run=run)
