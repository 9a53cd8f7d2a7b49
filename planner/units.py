"""Parse and print sizes: ``64GiB``, ``1M`` tokens, ``25GB/s``. Torch-free."""

from __future__ import annotations

import math
import re

_BINARY = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4, "p": 1024**5}
_DECIMAL = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "p": 10**15}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgtp]?)(i?)(b?)\s*$", re.IGNORECASE)


class UnitError(ValueError):
    """A size string that does not parse; the message says what forms are accepted."""


def parse_bytes(value: int | float | str) -> int:
    """``"64GiB"`` -> 68719476736, ``"2TB"`` -> 2e12, ``"512M"`` -> 512 MiB, ints pass through.

    A bare suffix without ``i`` (``G``, ``M``) is read as binary for memory, as nvidia-smi and
    ``free`` print it; ``GB`` with an explicit ``B`` and no ``i`` is decimal.
    """
    if isinstance(value, bool):
        raise UnitError(f"expected a size, got {value!r}; write e.g. 64GiB or 68719476736")
    if isinstance(value, (int, float)):
        if value < 0:
            raise UnitError(f"a size cannot be negative, got {value}")
        return int(value)
    m = _SIZE.match(str(value))
    if not m:
        raise UnitError(f"cannot read size {value!r}; write e.g. 512MiB, 64GiB, 2TiB, 2TB or a byte count")
    number, prefix, binary, b = m.groups()
    prefix = prefix.lower()
    table = _DECIMAL if (b and not binary) else _BINARY
    return int(_finite(float(number) * table[prefix], value, "size"))


def parse_count(value: int | str) -> int:
    """Token counts: ``"1M"`` -> 1048576, ``"128K"`` -> 131072, ``"1000000"`` -> 1000000.

    Sequence lengths are powers of two in practice, so ``K`` and ``M`` are binary.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    m = re.match(r"^\s*([0-9]*\.?[0-9]+)\s*([kmg]?)\s*$", str(value), re.IGNORECASE)
    if not m:
        raise UnitError(f"cannot read count {value!r}; write e.g. 131072, 128K or 1M")
    return int(_finite(float(m.group(1)) * _BINARY[m.group(2).lower()], value, "count"))


def parse_bandwidth(value: int | float | str) -> float:
    """``"25GB/s"`` -> 25e9 bytes per second (decimal, as link speeds are quoted)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return _finite(float(value), value, "bandwidth")
    text = str(value).strip()
    if text.lower().endswith("/s"):
        text = text[:-2]
    m = _SIZE.match(text)
    if not m:
        raise UnitError(f"cannot read bandwidth {value!r}; write e.g. 25GB/s")
    number, prefix, binary, _ = m.groups()
    table = _BINARY if binary else _DECIMAL
    return _finite(float(number) * table[prefix.lower()], value, "bandwidth")


def _finite(x: float, value, what: str) -> float:
    """``x`` if finite: a string of hundreds of digits reads as infinity."""
    if not math.isfinite(x):
        text = str(value)
        raise UnitError(f"{what} {text if len(text) <= 40 else text[:37] + '...'} is not a finite number; write e.g. "
                        f"64GiB, 1M or 25GB/s")
    return x


def format_bytes(n: float) -> str:
    """1536 -> '1.50 KiB'."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
