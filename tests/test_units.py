"""Sizes are shown one way: binary units with their suffix."""

from __future__ import annotations

import pytest
from rdmamig.units import size_text


@pytest.mark.parametrize(("count", "shown"), [
    (0, "0 bytes"),
    (1023, "1023 bytes"),
    (4095, "4 KiB"),  # rounded to one decimal
    (4096, "4 KiB"),
    (64 * 2**20 + 2**19, "64.5 MiB"),
    (2**30 - 2**20, "1023 MiB"),
    (2**30 - 1, "1 GiB"),  # rounds up into the next unit, not to "1024 MiB"
    (3 * 2**40, "3 TiB"),
])
def test_a_size_is_shown_in_the_largest_binary_unit_it_fills(count: int, shown: str) -> None:
    assert size_text(count) == shown
