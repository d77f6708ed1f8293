"""``rdmamig listen``: receive one migration into a new migration image, exposed
under its name only once complete and verified (:mod:`rdmamig.image`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..image import ImageWriter
from ..migration import available_backend, receive
from ..plugins import load_registry
from ..report import build_report
from .options import add_connection_arguments, backend_options, finish, parse_address


def run(args: argparse.Namespace) -> int:
    """Run ``rdmamig listen``."""
    registry = load_registry()
    backend = available_backend(registry.backend(args.backend),
                                backend_options(args, registry))
    host, port = parse_address(args.address)
    with ImageWriter(args.into) as writer:

        def announce(bound: int) -> None:
            print(f"listening on {host}:{bound}", flush=True)

        destination = receive(backend, host, port, timeout=args.timeout,
                              make_block=lambda name, length: writer.add_block(name, length),
                              announce=announce)
        result = destination.result
        report = build_report(backend=args.backend, policy="-", ram_bytes=sum(
            b.length for b in destination.blocks), source=None, destination=result,
            error=result.error)
        # Only a complete migration, verified unless its peer cannot verify (QEMU),
        # is exposed as an image.
        if report["succeeded"]:
            writer.set_state(result.state)
            writer.commit_from(result.origin, source={
                "backend": args.backend, "listen": args.address, "peer": result.peer,
                "verification": report["verification"]})
    return finish(args, report)


def add_verb(verbs: Any) -> None:
    """Add ``listen`` to the ``rdmamig`` parser."""
    listen = verbs.add_parser("listen", help="receive a migration into a new image DIR")
    listen.add_argument("address", metavar="ADDR:PORT")
    listen.add_argument("--into", type=Path, required=True, metavar="DIR",
                        help="the image to create (it must not exist)")
    add_connection_arguments(listen)
    listen.set_defaults(run=run)
