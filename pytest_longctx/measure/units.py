"""Byte units for messages: one formatter, so every figure reads the same."""

from __future__ import annotations

GiB = 1 << 30


def format_bytes(n: int) -> str:
    """Bytes in binary units with one decimal: '1.9 GiB', '512.0 MiB', '100 B'."""
    sign, size = ("-" if n < 0 else ""), abs(int(n))
    if size < 1024:
        return f"{sign}{size} B"
    value = float(size)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{sign}{value:.1f} {unit}"
