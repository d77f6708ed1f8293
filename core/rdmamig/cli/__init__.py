"""The ``rdmamig`` command line: the parser and dispatch (:mod:`.app`); each verb
has its module here (``migrate``, ``listen``, ``send``, ``image``, ``policies``,
``backends``), and :mod:`.options` holds what they share.

Bad arguments (unknown backend or policy, unparsable size, an output file that
cannot be written, options a plugin cannot take) end in one clear line on stderr
before any work and exit status 2; a peer that cannot be reached or refuses exits
3; a failed migration exits 1; SIGINT and SIGTERM exit 130, cleaned up.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from types import FrameType


def main(argv: Sequence[str] | None = None) -> int:
    """The ``rdmamig`` command; returns its exit status. Nothing heavy is imported
    before this runs, so that a Ctrl-C while the rest loads is an interruption
    like any other, not a traceback."""
    try:
        with _interrupt_after():
            from .app import run
        return run(argv)
    except KeyboardInterrupt:  # before a verb took over (it says which it was)
        print("rdmamig: interrupted", file=sys.stderr)
        return 130


@contextlib.contextmanager
def _interrupt_after() -> Iterator[None]:
    """Hold a SIGINT until the block ends, then raise it: raised inside an
    extension module's import (numpy's), it would come out as an ImportError.
    Nothing where SIGINT is ignored (``rdmamig ... &`` in a script)."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is signal.SIG_IGN):
        yield
        return
    caught: list[int] = []

    def hold(signum: int, _frame: FrameType | None) -> None:
        caught.append(signum)

    previous = signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt
