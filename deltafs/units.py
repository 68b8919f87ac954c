"""Sizes as people write them (``10G``, ``512M``) and as people read them (``1.5MB``)."""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def parse_size(text: str) -> int:
    """'10G', '512M', '64k', '1000' -> bytes (powers of 1024). ValueError if it is not
    a size."""
    t = str(text).strip().upper().removesuffix("B").removesuffix("I")
    mult = 1
    if t and t[-1] in "KMGT":
        mult = 1024 ** ("KMGT".index(t[-1]) + 1)
        t = t[:-1]
    try:
        n = int(float(t) * mult)
    except (ValueError, OverflowError):  # "inf", "1e400"
        raise ValueError(f"not a size: {text!r} (e.g. 512M, 10G)") from None
    if n < 0:
        raise ValueError("a size cannot be negative")
    return n


def human(n: float) -> str:
    """1536 -> '1.5KB' (powers of 1024, the way du -h counts)."""
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1024 or unit == "PB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n}"
