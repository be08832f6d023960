"""Sizes as users type them (virsh's scaled integers) and as we print them.

virsh's rules (``virScaleInteger``): a bare number is in the command's default
unit; a suffix is case-insensitive; ``K``/``KiB`` are powers of 1024 and ``KB``
powers of 1000; only whole numbers. We keep those rules so that what works with
``virsh`` works here and means the same number of bytes.
"""

from __future__ import annotations

import re
from fractions import Fraction

from vhotplug import errors

_PREFIXES = "kmgtpe"
_BYTE_WORDS = ("b", "byte", "bytes")
# libvirt stores sizes in unsigned long long; anything above cannot be meant.
_MAX_BYTES = 2**64 - 1

_NUMBER = re.compile(r"^\s*(?P<sign>[+-]?)(?P<num>\d+(?:\.\d*)?|\.\d+)\s*(?P<unit>[A-Za-z]*)\s*$")

ACCEPTED_FORMS = (
    "a whole number with an optional unit, e.g. 512M, 1G, '128 MiB', 1000000KB; "
    "units (case-insensitive): b, K/KiB, M/MiB, G/GiB, T/TiB, P/PiB, E/EiB (powers of 1024) "
    "and KB, MB, GB, TB, PB, EB (powers of 1000)"
)
_DECIMAL_UNITS = tuple(p + "b" for p in _PREFIXES)

_BINARY_NAMES = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def unit_scale(unit: str) -> int | None:
    """Bytes per ``unit`` (virsh spelling, case-insensitive); None if it is not a unit."""
    u = unit.lower()
    if u in _BYTE_WORDS:
        return 1
    if not u or u[0] not in _PREFIXES:
        return None
    rest = u[1:]
    if rest in ("", "ib"):
        base = 1024
    elif rest == "b":
        base = 1000
    else:
        return None
    return base ** (_PREFIXES.index(u[0]) + 1)


def _whole_suggestion(value: Fraction, unit: str) -> str | None:
    """For a fraction like 1.5G, the same size as a whole number in a smaller unit of the same family."""
    scale = unit_scale(unit)
    if scale is None:
        return None
    nbytes = value * scale
    if nbytes.denominator != 1 or nbytes == 0:
        return None
    decimal = unit.lower() in _DECIMAL_UNITS
    base = 1000 if decimal else 1024
    n = nbytes.numerator
    for power in range(len(_PREFIXES), 0, -1):
        if n % base**power == 0:
            return f"{n // base**power}{_PREFIXES[power - 1].upper()}{'B' if decimal else ''}"
    return f"{n}b"


def _refuse(text: str, why: str, default_unit: str, hint: str | None = None) -> errors.InvalidRequest:
    generic = f"give {ACCEPTED_FORMS}; a bare number is in {default_unit}"
    return errors.InvalidRequest(f"invalid size {text!r}: {why}", hint=hint or generic)


def parse_size(text: str, *, default_unit: str = "MiB") -> int:
    """Bytes meant by ``text`` (``512M``, ``1G``, ``128 MiB``, ``4096``), following virsh's rules.

    A bare number is in ``default_unit``. Zero, negative, fractional and
    unparsable sizes raise :class:`errors.InvalidRequest`.
    """
    default_scale = unit_scale(default_unit)
    if default_scale is None:
        raise ValueError(f"bad default unit {default_unit!r}")
    m = _NUMBER.match(text)
    if m is None:
        raise _refuse(text, "expected a whole number and an optional unit", default_unit)
    unit = m["unit"]
    scale = unit_scale(unit) if unit else default_scale
    if scale is None:
        raise _refuse(text, f"unknown unit {unit!r}", default_unit)
    if m["sign"] == "-":
        raise _refuse(text, "a size cannot be negative", default_unit)
    whole, _, fraction = m["num"].partition(".")
    # Fraction() and int() raise ValueError beyond 4300 digits (a traceback, found by the hostile-input fuzz);
    # 16 EiB in bytes has 20 digits, so more than 30 either side of the point means no size libvirt can take.
    if len(whole) > 30 or len(fraction) > 30:
        raise _refuse(text, "too many digits", default_unit)
    value = Fraction(m["num"])
    # Even "2.0G" is refused: virsh parses integers only, and one rule is easier to remember.
    if "." in m["num"]:
        better = _whole_suggestion(value, unit or default_unit)
        raise _refuse(text, "sizes must be whole numbers (as in virsh)", default_unit,
                      hint=f"write {better} instead" if better else None)
    nbytes = int(value) * scale
    if nbytes == 0:
        raise _refuse(text, "a size must be greater than zero", default_unit)
    if nbytes > _MAX_BYTES:
        raise _refuse(text, "larger than libvirt can represent (16 EiB)", default_unit)
    return nbytes


def format_size(n: int) -> str:
    """``n`` bytes for humans: the largest binary unit it reaches, e.g. ``128 MiB``, ``1.5 GiB``, ``512 B``.

    Exact multiples print as integers; other values get up to two decimals and
    keep at least one (``1.0 GiB`` is "about 1 GiB", ``1 GiB`` is exactly).
    """
    if n < 0:
        raise ValueError(f"negative size {n}")
    power = 0
    while power + 1 < len(_BINARY_NAMES) and n >= 1024 ** (power + 1):
        power += 1
    scale = 1024**power
    name = _BINARY_NAMES[power]
    if n % scale == 0:
        return f"{n // scale} {name}"
    text = f"{n / scale:.2f}".rstrip("0")
    if text.endswith("."):
        text += "0"
    return f"{text} {name}"
