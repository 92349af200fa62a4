"""How the suite writes a size for a person: the one formatter of messages and tables."""
from __future__ import annotations

UNITS = (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10))


def format_bytes(n: float) -> str:
    """'4 MiB' for a whole number of the largest unit it reaches, else one decimal ('4.7 GiB'); below 1 KiB, bytes."""
    for unit, scale in UNITS:
        if n >= scale:
            return f"{n // scale:.0f} {unit}" if n % scale == 0 else f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"
