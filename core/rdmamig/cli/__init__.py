"""The ``rdmamig`` command line: the parser and dispatch; each verb has its module
here (``migrate``, ``listen``, ``send``, ``image``, ``policies``, ``backends``), and
:mod:`.options` holds what they share.

Bad arguments (unknown backend or policy, unparsable size, options a plugin cannot
take, an unreachable address) end in one clear line on stderr and exit status 2; a
failed migration exits 1.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence

from ..errors import ConfigurationError, RdmamigError, UnknownNameError, UnreachableError
from . import backends, image, listen, migrate, policies, send


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every verb."""
    parser = argparse.ArgumentParser(
        prog="rdmamig", description="Live migration of memory over RDMA, QEMU's protocol.")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb in (backends, policies, migrate, listen, send, image):
        verb.add_verb(verbs)
    return parser


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status. SIGTERM is taken as SIGINT
    is: every verb cleans up (workload resumed, pins released, staging removed)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(format=f"rdmamig {args.verb}: %(message)s", level=logging.WARNING)
    if args.verb == "listen":  # a service says what it served
        logging.getLogger("rdmamig").setLevel(logging.INFO)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return int(args.run(args))
    except (ConfigurationError, UnknownNameError, UnreachableError) as exc:
        print(f"rdmamig {args.verb}: error: {exc}", file=sys.stderr)
        return 2
    except RdmamigError as exc:
        print(f"rdmamig {args.verb}: failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"rdmamig {args.verb}: interrupted", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
