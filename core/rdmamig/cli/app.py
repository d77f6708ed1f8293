"""The command line's parser and dispatch (:func:`rdmamig.cli.main` loads it)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from .. import __version__
from ..caps import PROTOCOL_VERSION
from ..errors import ConfigurationError, RdmamigError, UnknownNameError, UnreachableError
from ..units import size_text
from . import backends, image, listen, migrate, policies, send
from .options import QUIET_HELP, VERBOSE_HELP


class _Help(argparse.HelpFormatter):
    """Help that shows every default and says which options repeat."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (action.option_strings and "default" not in text and default not in (
                None, False, [], 0, argparse.SUPPRESS) and not isinstance(default, bool)):
            shown = (size_text(default) if isinstance(default, int) and default >= 1 << 20
                     and not default % (1 << 20) else str(default))
            text += f" (default: {shown})"
        if isinstance(action, argparse._AppendAction) and "repeat" not in text:
            text += " (repeat for more)"
        return text


class _Parser(argparse.ArgumentParser):
    """An argument parser with :class:`_Help` (its verbs' parsers too)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Help)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        """One line that names what was wrong, not the whole usage (``--help``
        shows it)."""
        self.exit(2, f"{self.prog}: error: {message} (--help lists the options)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every verb."""
    parser = _Parser(
        prog="rdmamig", description="Live migration of memory over RDMA, QEMU's protocol.",
        epilog="Exit status: 0 done, 1 the migration failed, 2 bad usage or configuration, "
               "3 the peer could not be reached or refused the connection, 130 interrupted "
               "(SIGINT, SIGTERM).")
    parser.add_argument("--version", action="version",
                        version=f"rdmamig {__version__} (protocol version {PROTOCOL_VERSION})")
    # Also before the verb (`rdmamig -v migrate`), as after it.
    parser.add_argument("-v", "--verbose", dest="global_verbose", action="count", default=0,
                        help=VERBOSE_HELP)
    parser.add_argument("-q", "--quiet", dest="global_quiet", action="store_true",
                        help=QUIET_HELP)
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb in (backends, policies, migrate, listen, send, image):
        verb.add_verb(verbs)
    return parser


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status. SIGTERM is taken as SIGINT
    is: every verb cleans up (workload resumed, pins released, staging removed)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.global_quiet and hasattr(args, "quiet"):
        args.quiet = True
    logging.basicConfig(format=f"rdmamig {args.verb}: %(message)s", level=logging.WARNING)
    # A service says what it served; -q quiets it, -v makes anything say more.
    verbose = (getattr(args, "verbose", 0) + args.global_verbose
               - (getattr(args, "quiet", False) or args.global_quiet))
    verbose += args.verb == "listen"
    logging.getLogger("rdmamig").setLevel(logging.WARNING - 10 * max(min(verbose, 2), -1))
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return int(args.run(args))
    except (ConfigurationError, UnknownNameError) as exc:
        print(f"rdmamig {args.verb}: error: {exc}", file=sys.stderr)
        return 2
    except UnreachableError as exc:
        print(f"rdmamig {args.verb}: error: {exc}", file=sys.stderr)
        return 3
    except RdmamigError as exc:
        print(f"rdmamig {args.verb}: failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"rdmamig {args.verb}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `rdmamig ... | head`: the reader has what it wanted
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (no flush into the pipe)
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
