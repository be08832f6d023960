"""Sizes parse as virsh parses them and print the way people read them."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vhotplug import errors, units
from vhotplug.units import format_size, parse_size, unit_scale

KiB, MiB, GiB, TiB, PiB, EiB = (1024**p for p in range(1, 7))
_MAX = units._MAX_BYTES


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("512M", 512 * MiB),
        ("1G", GiB),
        ("128 MiB", 128 * MiB),
        ("128MiB", 128 * MiB),
        ("  64m  ", 64 * MiB),
        ("1mib", MiB),
        ("4096", 4096 * MiB),  # a bare number is in the default unit
        ("1k", KiB),
        ("1KiB", KiB),
        ("1KB", 1000),
        ("1kb", 1000),
        ("1MB", 10**6),
        ("1GB", 10**9),
        ("2T", 2 * TiB),
        ("1TB", 10**12),
        ("1P", PiB),
        ("1PB", 10**15),
        ("1E", EiB),
        ("1EB", 10**18),
        ("512b", 512),
        ("512 bytes", 512),
        ("1 byte", 1),
        ("+8M", 8 * MiB),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


def test_default_unit() -> None:
    assert parse_size("4096", default_unit="b") == 4096
    assert parse_size("2", default_unit="GiB") == 2 * GiB
    assert parse_size("2", default_unit="KB") == 2000
    assert parse_size("2M", default_unit="b") == 2 * MiB  # an explicit unit wins


def test_bad_default_unit_is_a_programming_error() -> None:
    with pytest.raises(ValueError):
        parse_size("1", default_unit="furlongs")


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("0", "greater than zero"),
        ("0M", "greater than zero"),
        ("-1M", "cannot be negative"),
        ("-0", "cannot be negative"),
        ("1.5G", "whole numbers"),
        ("2.0G", "whole numbers"),
        (".5G", "whole numbers"),
        ("1X", "unknown unit 'X'"),
        ("1MiBs", "unknown unit 'MiBs'"),
        ("1KiBB", "unknown unit"),
        ("abc", "expected a whole number"),
        ("", "expected a whole number"),
        ("1 2M", "expected a whole number"),
        ("0x10M", "expected a whole number"),
        ("1e3", "expected a whole number"),
        ("20E", "larger than libvirt can represent"),
    ],
)
def test_parse_size_refuses(text: str, why: str) -> None:
    with pytest.raises(errors.InvalidRequest) as exc:
        parse_size(text)
    assert f"invalid size {text!r}" in exc.value.message
    assert why in exc.value.message
    assert exc.value.hint


def test_hint_lists_the_accepted_forms() -> None:
    with pytest.raises(errors.InvalidRequest) as exc:
        parse_size("lots")
    assert exc.value.hint is not None
    for form in ("512M", "1G", "KiB", "KB", "MiB"):
        assert form in exc.value.hint
    assert "a bare number is in MiB" in exc.value.hint


@pytest.mark.parametrize(
    ("text", "better", "nbytes"),
    [
        ("1.5G", "1536M", 3 * GiB // 2),
        ("1.5GB", "1500MB", 15 * 10**8),
        ("0.5K", "512b", 512),
        ("2.0G", "2G", 2 * GiB),
        ("1.5", "1536K", 3 * MiB // 2),  # default unit MiB
        ("1.25T", "1280G", 5 * TiB // 4),
    ],
)
def test_fraction_hint_suggests_the_same_size_as_a_whole_number(text: str, better: str, nbytes: int) -> None:
    with pytest.raises(errors.InvalidRequest) as exc:
        parse_size(text)
    assert exc.value.hint == f"write {better} instead"
    assert parse_size(better) == nbytes


def test_fraction_below_a_byte_gets_the_generic_hint() -> None:
    with pytest.raises(errors.InvalidRequest) as exc:
        parse_size("0.3b")
    assert exc.value.hint is not None and "whole number" in exc.value.hint


def test_unit_scale() -> None:
    assert unit_scale("KiB") == unit_scale("k") == 1024
    assert unit_scale("kB") == 1000
    assert unit_scale("bytes") == 1
    assert unit_scale("Ki") is None
    assert unit_scale("") is None


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (512, "512 B"),
        (1023, "1023 B"),
        (KiB, "1 KiB"),
        (1536, "1.5 KiB"),
        (128 * MiB, "128 MiB"),
        (1000 * MiB, "1000 MiB"),
        (3 * GiB // 2, "1.5 GiB"),
        (GiB, "1 GiB"),
        (GiB + 1, "1.0 GiB"),  # not exact: keeps a decimal so it does not look exact
        (10**9, "953.67 MiB"),
        (5 * TiB, "5 TiB"),
        (EiB, "1 EiB"),
        (2**64 - 1, "16.0 EiB"),
    ],
)
def test_format_size(n: int, text: str) -> None:
    assert format_size(n) == text


def test_format_size_round_trips_exact_values() -> None:
    for n in (KiB, 128 * MiB, 7 * GiB, 3 * TiB):
        number, unit = format_size(n).split()
        assert parse_size(number + unit) == n


def test_format_size_refuses_negative() -> None:
    with pytest.raises(ValueError):
        format_size(-1)


# -- fuzzing: any text either parses to a size or is refused with a clear error -------------------------------

_SIZE_ALPHABET = st.sampled_from(list("0123456789 .,-+eEkKmMgGtTpPbBiI_xX\t\n\u00a0٣"))


@given(st.one_of(st.text(_SIZE_ALPHABET, max_size=16), st.text(max_size=16)))
def test_parse_size_returns_a_positive_size_or_refuses_cleanly(text: str) -> None:
    try:
        size = parse_size(text)
    except errors.InvalidRequest as exc:
        assert exc.message.startswith("invalid size") or "size" in exc.message
        assert "\n" not in exc.message.split(":", 1)[0]
        return
    assert isinstance(size, int) and 0 < size <= 16 * EiB


@given(st.integers(1, 2**40), st.sampled_from(["", "K", "KiB", "M", "MiB", "G", "GiB", "T", "b", "B"]))
def test_every_whole_size_with_a_unit_round_trips(number: int, unit: str) -> None:
    scale = unit_scale(unit) if unit else MiB
    assert scale is not None
    if number * scale > _MAX:
        with pytest.raises(errors.InvalidRequest, match="larger than libvirt can represent"):
            parse_size(f"{number}{unit}")
    else:
        assert parse_size(f"{number}{unit}") == number * scale
