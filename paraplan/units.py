"""Units: the only place that converts numbers to human units for display.

Internally paraplan uses bytes, seconds, FLOPs and FLOP/s everywhere (names end in ``_bytes``, ``_s``, ``_flops``,
``_flops_per_s``, ``_bytes_per_s``).
"""

from __future__ import annotations

KiB = 1024
MiB = 1024**2
GiB = 1024**3
TiB = 1024**4
GB = 1e9
TFLOPS = 1e12


def format_bytes(n_bytes: float) -> str:
    """Format a byte count in binary units, e.g. ``format_bytes(3 * GiB) == '3.00 GiB'``."""
    value = float(n_bytes)
    for unit, scale in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value:.0f} B"


def format_seconds(seconds: float) -> str:
    """Format a duration: ms below one second, s above (``format_seconds(0.0123) == '12.3 ms'``)."""
    if seconds < 1.0:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


def format_count(n: float) -> str:
    """Format a large count with an SI suffix (``format_count(8.03e9) == '8.03B'``)."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


_BYTE_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": KiB, "mib": MiB, "gib": GiB,
               "tib": TiB, "k": KiB, "m": MiB, "g": GiB, "t": TiB}


def parse_bytes(text: str) -> float:
    """Parse a size such as ``1.5GiB``, ``800MB``, ``2g`` (binary) or ``1000000`` (bytes).

    Raises:
        ValueError: not a positive number with one of the units B, KB, MB, GB, TB, KiB, MiB, GiB, TiB (K/M/G/T).
    """
    import re

    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if not match or unit not in _BYTE_UNITS or float(match.group(1)) <= 0:
        raise ValueError(f"size '{text}': write a positive number with a unit, e.g. 1.5GiB, 800MB or 2G")
    return float(match.group(1)) * _BYTE_UNITS[unit]
