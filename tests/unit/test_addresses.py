"""PCI and USB address spellings: what parses to what, what is refused and how, and fuzzing of both."""

from __future__ import annotations

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from vhotplug import errors
from vhotplug.addresses import (
    Bdf,
    UsbByAddress,
    UsbById,
    UsbByPort,
    UsbDevice,
    match_usb,
    parse_bdf,
    parse_usb_spec,
)

# --- PCI ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("06:10.1", Bdf(0, 6, 0x10, 1)),
        ("0000:06:10.1", Bdf(0, 6, 0x10, 1)),
        ("pci_0000_06_10_1", Bdf(0, 6, 0x10, 1)),
        ("PCI_0000_0A_1F_7", Bdf(0, 0x0A, 0x1F, 7)),
        ("0000:0a:1F.7", Bdf(0, 0x0A, 0x1F, 7)),
        ("ffff:ff:1f.7", Bdf(0xFFFF, 0xFF, 0x1F, 7)),
        ("1:2:3.4", Bdf(1, 2, 3, 4)),  # lspci pads, people do not always
        ("  00:02.0\n", Bdf(0, 0, 2, 0)),
    ],
)
def test_parse_bdf(text: str, expected: Bdf) -> None:
    assert parse_bdf(text) == expected


def test_bdf_spellings() -> None:
    bdf = Bdf(0, 6, 0x10, 1)
    assert str(bdf) == "0000:06:10.1"
    assert bdf.nodedev_name == "pci_0000_06_10_1"
    assert str(Bdf(0xABCD, 0xEF, 0x1F, 7)) == "abcd:ef:1f.7"


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("06:20.0", "slot 0x20 is above 0x1f"),
        ("06:ff.0", "slot 0xff is above 0x1f"),
        ("06:10.8", "function 8 is above 7"),
        ("pci_0000_06_10_9", "function 9 is above 7"),
        ("10000:06:10.1", "expected [DOMAIN:]BUS:SLOT.FUNCTION"),  # domain above 0xffff
        ("06:10", "expected"),
        ("06.10.1", "expected"),
        ("106:10.1", "expected"),  # bus above 0xff
        ("06:10.1.2", "expected"),
        ("pci_06_10_1", "expected"),  # libvirt always writes all four fields
        ("pci_0000:06:10.1", "expected"),
        ("0x06:10.1", "expected"),
        ("g6:10.1", "expected"),
        ("06:10.1 07:00.0", "expected"),
        ("", "expected"),
        ("\u0660\u0666:\u0661\u0660.\u0661", "expected"),  # Arabic-Indic digits: int() would take them, we do not
    ],
)
def test_parse_bdf_refuses(text: str, why: str) -> None:
    with pytest.raises(errors.InvalidRequest) as exc:
        parse_bdf(text)
    assert f"invalid PCI address {text!r}" in exc.value.message
    assert why in exc.value.message
    assert exc.value.hint is not None
    for spelling in ("06:10.1", "0000:06:10.1", "pci_0000_06_10_1"):
        assert spelling in exc.value.hint


# --- USB ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("host:0781:5567", UsbById(0x0781, 0x5567)),
        ("0781:5567", UsbById(0x0781, 0x5567)),
        ("0x0781:0x5567", UsbById(0x0781, 0x5567)),
        ("host:0x0781:0X5567", UsbById(0x0781, 0x5567)),
        ("HOST:abcd:EF01", UsbById(0xABCD, 0xEF01)),
        ("781:5567", UsbById(0x0781, 0x5567)),  # virt-install takes any hex number
        ("host:002.004", UsbByAddress(2, 4)),
        ("002.004", UsbByAddress(2, 4)),
        ("2.4", UsbByAddress(2, 4)),
        ("host:2.4", UsbByAddress(2, 4)),
        ("255.127", UsbByAddress(255, 127)),
        ("usb_2_4", UsbByPort(2, (4,))),
        ("usb_2_1_4", UsbByPort(2, (1, 4))),
        ("USB_1_1_2_3", UsbByPort(1, (1, 2, 3))),
        ("2-1.4", UsbByPort(2, (1, 4))),
        ("3-2", UsbByPort(3, (2,))),
        (" 0781:5567 ", UsbById(0x0781, 0x5567)),
    ],
)
def test_parse_usb_spec(text: str, expected: object) -> None:
    assert parse_usb_spec(text) == expected


def test_usb_spec_spellings() -> None:
    assert str(UsbById(0x781, 0x5567)) == "0781:5567"
    assert str(UsbByAddress(2, 4)) == "002.004"
    port = UsbByPort(2, (1, 4))
    assert (str(port), port.nodedev_name, port.sysfs_name) == ("usb_2_1_4", "usb_2_1_4", "2-1.4")


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("0.4", "bus 0 is outside 1-255"),
        ("256.4", "bus 256 is outside 1-255"),
        ("2.0", "device 0 is outside 1-127"),
        ("2.128", "device 128 is outside 1-127"),
        ("usb_0_1", "bus 0 is outside 1-255"),
        ("usb_2_1_1_0", "is this one of a device's interfaces?"),  # libvirt's name for interface 2-1.1:1.0
        ("2-1.0", "numbered from 1"),
        ("usb_2_1_2_3_4_5_6_7", "more than 6 hub ports deep"),
        ("usb_2_256", "port 256 is above 255"),
        ("07811:5567", "not a spelling"),
        ("0781:5567:1", "not a spelling"),
        ("0781-5567", "not a spelling"),
        ("0781", "not a spelling"),
        ("2.4.1", "not a spelling"),
        ("0x2.4", "not a spelling"),
        ("host:usb_2_4", "not a spelling"),  # 'host:' is QEMU's, libvirt's names never had it
        ("host:", "not a spelling"),
        ("usb_usb2", "not a spelling"),  # a root hub: nothing to pass through
        ("usb_2", "not a spelling"),
        ("", "not a spelling"),
        ("\uff12.\uff14", "not a spelling"),  # fullwidth digits
    ],
)
def test_parse_usb_spec_refuses(text: str, why: str) -> None:
    with pytest.raises(errors.InvalidRequest) as exc:
        parse_usb_spec(text)
    assert f"invalid USB device {text!r}" in exc.value.message
    assert why in exc.value.message
    assert exc.value.hint is not None
    for spelling in ("0781:5567", "2.4", "002.004", "host:", "usb_2_1_4"):
        assert spelling in exc.value.hint


# --- matching host USB devices -----------------------------------------------------------------------

STICK_A = UsbDevice(2, 4, 0x0781, 0x5567, "SanDisk Corp. Cruzer Blade", nodedev="usb_2_1")
STICK_B = UsbDevice(3, 7, 0x0781, 0x5567, "SanDisk Corp. Cruzer Blade", nodedev="usb_3_1_4")
MOUSE = UsbDevice(1, 2, 0x046D, 0xC077, "Logitech, Inc. M105 Optical Mouse", nodedev="usb_1_2")
HOST = [MOUSE, STICK_A, STICK_B]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("046d:c077", MOUSE),
        ("host:002.004", STICK_A),
        ("3.7", STICK_B),
        ("usb_3_1_4", STICK_B),
        ("3-1.4", STICK_B),
        ("usb_1_2", MOUSE),
    ],
)
def test_match_usb(spec: str, expected: UsbDevice) -> None:
    assert match_usb(parse_usb_spec(spec), HOST) == expected


def test_match_usb_refuses_an_ambiguous_vendor_product_listing_the_candidates() -> None:
    with pytest.raises(errors.InvalidRequest) as exc:
        match_usb(parse_usb_spec("host:0781:5567"), HOST)
    assert exc.value.message.splitlines() == [
        "several USB devices match 0781:5567:",
        "  host:002.004 0781:5567 SanDisk Corp. Cruzer Blade",
        "  host:003.007 0781:5567 SanDisk Corp. Cruzer Blade",
    ]
    assert exc.value.hint == "use host:BUS.DEV to pick one"
    # ... and the spelling the hint suggests picks exactly one.
    assert match_usb(parse_usb_spec("host:003.007"), HOST) == STICK_B


@pytest.mark.parametrize("spec", ["dead:beef", "9.9", "usb_2_4"])
def test_match_usb_not_found_lists_what_exists(spec: str) -> None:
    with pytest.raises(errors.NotFound) as exc:
        match_usb(parse_usb_spec(spec), HOST)
    assert exc.value.exit_code == errors.ExitCode.NOT_FOUND
    assert f"no USB device matches {parse_usb_spec(spec)}; the host has:" in exc.value.message
    assert "host:001.002 046d:c077 Logitech, Inc. M105 Optical Mouse" in exc.value.message


def test_match_usb_by_port_needs_the_nodedev_name() -> None:
    anonymous = UsbDevice(2, 4, 0x0781, 0x5567)
    with pytest.raises(errors.NotFound):
        match_usb(UsbByPort(2, (1,)), [anonymous])
    assert match_usb(UsbByAddress(2, 4), [anonymous]) == anonymous


def test_match_usb_lists_at_most_ten() -> None:
    many = [UsbDevice(1, n, 0x1234, n, f"gadget {n}") for n in range(1, 15)]
    with pytest.raises(errors.NotFound) as exc:
        match_usb(UsbById(0xDEAD, 0xBEEF), many)
    lines = exc.value.message.splitlines()
    assert len(lines) == 1 + 10 + 1
    assert lines[-1] == "  … and 4 more"
    with pytest.raises(errors.InvalidRequest) as ambiguous:
        match_usb(UsbById(0x1234, 1), many + many[:1])
    assert "several USB devices match 1234:0001:" in ambiguous.value.message


def test_match_usb_on_a_host_without_usb_devices() -> None:
    with pytest.raises(errors.NotFound) as exc:
        match_usb(UsbByAddress(2, 4), [])
    assert exc.value.message == "no USB device matches 002.004; the host has no USB devices"


# --- fuzzing -----------------------------------------------------------------------------------------

# Text biased towards the characters addresses are made of, so the fuzzer reaches deep into the grammar
# rather than stopping at the first character, plus arbitrary unicode.
_ADDRESS_ALPHABET = "0123456789abcdefABCDEFxX:._-_ hostpciusbHOSTUSB\n\t\u0663\uff12"
_NEAR_MISSES = st.text(alphabet=_ADDRESS_ALPHABET, max_size=24) | st.text(max_size=24)


@given(_NEAR_MISSES)
@example("pci_0000_06_10_1")
@example("usb_2_1_1_0")
def test_parse_bdf_returns_or_refuses_cleanly(text: str) -> None:
    try:
        bdf = parse_bdf(text)
    except errors.InvalidRequest as exc:
        assert exc.message.startswith("invalid PCI address")
    else:
        assert 0 <= bdf.domain <= 0xFFFF and 0 <= bdf.bus <= 0xFF
        assert 0 <= bdf.slot <= 0x1F and 0 <= bdf.function <= 7


@given(_NEAR_MISSES)
@example("host:")
@example("usb_2_" + "1_" * 10 + "1")
def test_parse_usb_spec_returns_or_refuses_cleanly(text: str) -> None:
    try:
        spec = parse_usb_spec(text)
    except errors.InvalidRequest as exc:
        assert exc.message.startswith("invalid USB device")
    else:
        assert parse_usb_spec(str(spec)) == spec


_BDFS = st.builds(
    Bdf,
    domain=st.integers(0, 0xFFFF),
    bus=st.integers(0, 0xFF),
    slot=st.integers(0, 0x1F),
    function=st.integers(0, 7),
)


@given(_BDFS)
def test_bdf_round_trips(bdf: Bdf) -> None:
    assert parse_bdf(str(bdf)) == bdf
    assert parse_bdf(bdf.nodedev_name) == bdf
    assert parse_bdf(str(bdf).upper()) == bdf


def _hex(value: int, width: int) -> st.SearchStrategy[str]:
    """Any hex spelling of ``value`` users might type: minimal to zero-padded, either case."""
    digits = f"{value:x}"
    return st.builds(
        lambda pad, upper: digits.zfill(pad).upper() if upper else digits.zfill(pad),
        st.integers(len(digits), width),
        st.booleans(),
    )


@given(_BDFS, st.data())
def test_every_bdf_spelling_parses_to_its_numbers(bdf: Bdf, data: st.DataObject) -> None:
    bus, slot, function = (data.draw(_hex(n, w)) for n, w in ((bdf.bus, 2), (bdf.slot, 2), (bdf.function, 1)))
    if bdf.domain == 0 and data.draw(st.booleans()):
        text = f"{bus}:{slot}.{function}"
    else:
        text = f"{data.draw(_hex(bdf.domain, 4))}:{bus}:{slot}.{function}"
    assert parse_bdf(text) == bdf


@given(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.data())
def test_every_vendor_product_spelling_parses_to_its_numbers(vendor: int, product: int, data: st.DataObject) -> None:
    prefix = data.draw(st.sampled_from(["", "host:", "HOST:"]))
    parts = [data.draw(st.sampled_from(["", "0x", "0X"])) + data.draw(_hex(n, 4)) for n in (vendor, product)]
    assert parse_usb_spec(prefix + ":".join(parts)) == UsbById(vendor, product)


@given(st.integers(1, 255), st.integers(1, 127), st.data())
def test_every_bus_device_spelling_parses_to_its_numbers(bus: int, device: int, data: st.DataObject) -> None:
    prefix = data.draw(st.sampled_from(["", "host:"]))
    numbers = [str(n).zfill(data.draw(st.integers(len(str(n)), 3))) for n in (bus, device)]
    assert parse_usb_spec(prefix + ".".join(numbers)) == UsbByAddress(bus, device)


@given(st.integers(1, 255), st.lists(st.integers(1, 255), min_size=1, max_size=6))
def test_every_port_spelling_parses_to_its_numbers(bus: int, ports: list[int]) -> None:
    expected = UsbByPort(bus, tuple(ports))
    assert parse_usb_spec(expected.nodedev_name) == expected
    assert parse_usb_spec(expected.sysfs_name) == expected
