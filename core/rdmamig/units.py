"""How sizes are shown to people: one way everywhere (summaries, progress lines,
logs, ``image info``), in binary units with their suffix."""

from __future__ import annotations

_SUFFIXES = ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB")


def size_text(count: float) -> str:
    """``count`` bytes in the largest binary unit it fills: ``512 bytes``, ``4 KiB``,
    ``64.5 MiB``, ``1 GiB`` (one decimal, dropped when it is 0)."""
    value, unit = float(count), 0
    while abs(value) >= 1024 and unit < len(_SUFFIXES) - 1:
        value /= 1024
        unit += 1
    shown = f"{value:.1f}".removesuffix(".0")
    if shown == "1024" and unit < len(_SUFFIXES) - 1:  # 1023.96 MiB rounds up
        shown, unit = "1", unit + 1
    return f"{shown} {_SUFFIXES[unit]}"
