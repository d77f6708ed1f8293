"""Real QEMU guests for the interoperability tests (:mod:`rdmamig.testing.qemuvm`,
which the benchmarks use too), and how a test without QEMU skips or fails."""

from __future__ import annotations

import os
import shutil

import pytest
from rdmamig.testing.qemuvm import QEMU, Guest, qemu_root

__all__ = ["QEMU", "REQUIRE_ENV", "Guest", "need_qemu", "qemu_root"]

#: Set by .ci/run: a missing QEMU fails these tests there instead of skipping them.
REQUIRE_ENV = "RDMAMIG_REQUIRE_QEMU"


def need_qemu() -> None:
    """Skip (or, under CI, fail) when QEMU is not installed."""
    if shutil.which(QEMU) is None:
        message = f"{QEMU} is not installed (Debian: apt-get install qemu-system-x86)"
        if os.environ.get(REQUIRE_ENV):
            pytest.fail(message)
        pytest.skip(message)
