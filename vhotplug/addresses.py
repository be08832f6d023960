"""Host device addresses as users type them: PCI BDFs and USB specs, parsed without touching the host.

The spellings are the ones users already know from elsewhere, so that what they copy from ``lspci``,
``lsusb``, ``virsh nodedev-list``, ``virt-install --host-device`` or the QEMU monitor works here:

- PCI: ``06:10.1``, ``0000:06:10.1`` (lspci, virt-install) and libvirt's node device name
  ``pci_0000_06_10_1``.
- USB by id: ``0781:5567``, ``0x0781:0x5567``, ``host:0781:5567`` (lsusb, virt-install, the QEMU monitor).
- USB by address: ``2.4``, ``002.004``, ``host:002.004`` (bus.device, as lsusb's "Bus 002 Device 004").
- USB by port: libvirt's node device name ``usb_2_1_4`` and the kernel's name for the same device ``2-1.4``.
  libvirt names a USB node device ``usb_`` + the kernel's sysfs name with every non-alphanumeric character
  turned into ``_`` (``udevGenerateDeviceName`` in libvirt's ``node_device_udev.c``); the kernel's name is
  the bus and the chain of hub ports (``2-1.4``: bus 2, root port 1, hub port 4). So ``usb_2_4`` means bus 2,
  port 4 — *not* device number 4, which changes on every re-plug while the port does not.

Parsers raise :class:`errors.InvalidRequest` for anything else, naming the accepted spellings; they never
raise anything else, whatever the input (the hypothesis tests hold them to that).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from vhotplug import errors

# re.ASCII and explicit [0-9]: \d and str.isdigit() accept other scripts' digits, which int() then
# silently converts; a device address is never spelled that way.
_HEX = "[0-9a-fA-F]"

_PCI_HINT = (
    "write a PCI address as BUS:SLOT.FUNCTION (06:10.1), DOMAIN:BUS:SLOT.FUNCTION (0000:06:10.1) "
    "or as libvirt's node device name (pci_0000_06_10_1)"
)
_PCI_BDF = re.compile(
    rf"(?:(?P<domain>{_HEX}{{1,4}}):)?(?P<bus>{_HEX}{{1,2}}):(?P<slot>{_HEX}{{1,2}})\.(?P<function>{_HEX})"
)
# libvirt always writes the full sysfs name (4/2/2/1 digits), so only that form is a node device name.
_PCI_NODEDEV = re.compile(
    rf"pci_(?P<domain>{_HEX}{{4}})_(?P<bus>{_HEX}{{2}})_(?P<slot>{_HEX}{{2}})_(?P<function>{_HEX})", re.IGNORECASE
)

_USB_HINT = (
    "name a USB device by VENDOR:PRODUCT (0781:5567), by BUS.DEVICE (2.4 or 002.004), either optionally after "
    "'host:', or by its port as libvirt's node device name (usb_2_1_4) or the kernel's name (2-1.4)"
)
_USB_ID = re.compile(rf"(?:0x)?(?P<vendor>{_HEX}{{1,4}}):(?:0x)?(?P<product>{_HEX}{{1,4}})", re.IGNORECASE)
_USB_ADDRESS = re.compile(r"(?P<bus>[0-9]{1,3})\.(?P<device>[0-9]{1,3})")
_USB_NODEDEV = re.compile(r"usb_(?P<bus>[0-9]{1,3})(?P<ports>(?:_[0-9]{1,3})+)", re.IGNORECASE)
_USB_SYSFS = re.compile(r"(?P<bus>[0-9]{1,3})-(?P<ports>[0-9]{1,3}(?:\.[0-9]{1,3})*)")

# The kernel numbers USB buses from 1 and devices 1-127 on each (a 7-bit USB address; 0 is the
# unconfigured default address, never a device's number in sysfs).
_USB_BUS_MAX = 255
_USB_DEVICE_MAX = 127
# Hub ports are numbered from 1 (a hub has at most 255); the kernel refuses hubs nested deeper than
# 5 below the root hub (MAX_TOPO_LEVEL), so a device sits behind at most 6 ports.
_USB_PORT_MAX = 255
_USB_PORTS_MAX = 6
_MAX_LISTED = 10


@dataclass(frozen=True, order=True)
class Bdf:
    """A host PCI address (domain:bus:slot.function)."""

    domain: int
    bus: int
    slot: int
    function: int

    def __str__(self) -> str:
        return f"{self.domain:04x}:{self.bus:02x}:{self.slot:02x}.{self.function:x}"

    @property
    def nodedev_name(self) -> str:
        """libvirt's node device name for this address, e.g. ``pci_0000_06_10_1``."""
        return f"pci_{self.domain:04x}_{self.bus:02x}_{self.slot:02x}_{self.function:x}"


@dataclass(frozen=True)
class UsbById:
    """A USB device named by vendor:product; may match several devices."""

    vendor: int
    product: int

    def __str__(self) -> str:
        return f"{self.vendor:04x}:{self.product:04x}"


@dataclass(frozen=True)
class UsbByAddress:
    """A USB device named by bus and device number (``lsusb``'s "Bus 002 Device 004")."""

    bus: int
    device: int

    def __str__(self) -> str:
        return f"{self.bus:03d}.{self.device:03d}"


@dataclass(frozen=True)
class UsbByPort:
    """A USB device named by where it is plugged in: bus and the chain of hub ports."""

    bus: int
    ports: tuple[int, ...]

    def __str__(self) -> str:
        return self.nodedev_name

    @property
    def sysfs_name(self) -> str:
        """The kernel's name for the device, e.g. ``2-1.4``."""
        return f"{self.bus}-" + ".".join(str(p) for p in self.ports)

    @property
    def nodedev_name(self) -> str:
        """libvirt's node device name for the device, e.g. ``usb_2_1_4``."""
        return f"usb_{self.bus}_" + "_".join(str(p) for p in self.ports)


UsbSpec = UsbById | UsbByAddress | UsbByPort


@dataclass(frozen=True)
class UsbDevice:
    """A USB device on the host, as the host listing reports it.

    ``nodedev`` is libvirt's node device name (``usb_2_1_4``); only a :class:`UsbByPort` spec needs it.
    """

    bus: int
    device: int
    vendor: int
    product: int
    name: str = ""
    nodedev: str | None = None

    @property
    def address(self) -> str:
        """The ``host:BUS.DEV`` spelling that names exactly this device."""
        return f"host:{self.bus:03d}.{self.device:03d}"

    def describe(self) -> str:
        """One line for a candidate list: address, vendor:product and name."""
        text = f"{self.address} {self.vendor:04x}:{self.product:04x}"
        return f"{text} {self.name}" if self.name else text


def _refuse(kind: str, text: str, why: str, hint: str) -> errors.InvalidRequest:
    return errors.InvalidRequest(f"invalid {kind} {text!r}: {why}", hint=hint)


def parse_bdf(text: str) -> Bdf:
    """Parse a host PCI address: ``06:10.1``, ``0000:06:10.1`` or ``pci_0000_06_10_1`` (hex, any case)."""
    spec = text.strip()
    match = _PCI_BDF.fullmatch(spec) or _PCI_NODEDEV.fullmatch(spec)
    if match is None:
        raise _refuse("PCI address", text, "expected [DOMAIN:]BUS:SLOT.FUNCTION in hex", _PCI_HINT)
    bdf = Bdf(
        domain=int(match["domain"] or "0", 16),
        bus=int(match["bus"], 16),
        slot=int(match["slot"], 16),
        function=int(match["function"], 16),
    )
    # Domain and bus cannot overflow with at most 4 and 2 hex digits; slot and function can.
    if bdf.slot > 0x1F:
        raise _refuse("PCI address", text, f"slot 0x{bdf.slot:02x} is above 0x1f", _PCI_HINT)
    if bdf.function > 7:
        raise _refuse("PCI address", text, f"function {bdf.function:x} is above 7", _PCI_HINT)
    return bdf


def parse_usb_spec(text: str) -> UsbSpec:
    """Parse a USB device spec: vendor:product, bus.device (each optionally after ``host:``) or a port name."""
    spec = text.strip()
    prefixed = spec[:5].lower() == "host:"
    body = spec[5:] if prefixed else spec
    if match := _USB_ID.fullmatch(body):
        return UsbById(int(match["vendor"], 16), int(match["product"], 16))
    if match := _USB_ADDRESS.fullmatch(body):
        return _usb_address(text, int(match["bus"]), int(match["device"]))
    # 'host:' belongs to QEMU's id and address spellings only; no port name ever had it.
    if not prefixed and (match := _USB_NODEDEV.fullmatch(body)):
        return _usb_port(text, int(match["bus"]), match["ports"][1:].split("_"))
    if not prefixed and (match := _USB_SYSFS.fullmatch(body)):
        return _usb_port(text, int(match["bus"]), match["ports"].split("."))
    raise _refuse("USB device", text, "not a spelling vhotplug knows", _USB_HINT)


def _usb_address(text: str, bus: int, device: int) -> UsbByAddress:
    if not 1 <= bus <= _USB_BUS_MAX:
        raise _refuse("USB device", text, f"bus {bus} is outside 1-{_USB_BUS_MAX}", _USB_HINT)
    if not 1 <= device <= _USB_DEVICE_MAX:
        raise _refuse("USB device", text, f"device {device} is outside 1-{_USB_DEVICE_MAX}", _USB_HINT)
    return UsbByAddress(bus, device)


def _usb_port(text: str, bus: int, ports: list[str]) -> UsbByPort:
    if not 1 <= bus <= _USB_BUS_MAX:
        raise _refuse("USB device", text, f"bus {bus} is outside 1-{_USB_BUS_MAX}", _USB_HINT)
    if len(ports) > _USB_PORTS_MAX:
        raise _refuse("USB device", text, f"more than {_USB_PORTS_MAX} hub ports deep", _USB_HINT)
    numbers = tuple(int(p) for p in ports)
    if 0 in numbers:
        # libvirt's names for a device's interfaces (2-1:1.0 -> usb_2_1_1_0) end like this.
        why = "hub ports are numbered from 1 (is this one of a device's interfaces?)"
        raise _refuse("USB device", text, why, "name the device, not its interface: " + _USB_HINT)
    if max(numbers) > _USB_PORT_MAX:
        raise _refuse("USB device", text, f"port {max(numbers)} is above {_USB_PORT_MAX}", _USB_HINT)
    return UsbByPort(bus, numbers)


def _matches(spec: UsbSpec, dev: UsbDevice) -> bool:
    if isinstance(spec, UsbById):
        return (dev.vendor, dev.product) == (spec.vendor, spec.product)
    if isinstance(spec, UsbByAddress):
        return (dev.bus, dev.device) == (spec.bus, spec.device)
    return dev.nodedev is not None and dev.nodedev.lower() == spec.nodedev_name


def _listing(devices: Sequence[UsbDevice]) -> str:
    lines = [f"  {dev.describe()}" for dev in devices[:_MAX_LISTED]]
    if len(devices) > _MAX_LISTED:
        lines.append(f"  … and {len(devices) - _MAX_LISTED} more")
    return "\n".join(lines)


def match_usb(spec: UsbSpec, devices: Sequence[UsbDevice]) -> UsbDevice:
    """The one host USB device ``spec`` names.

    Refuses (InvalidRequest) a vendor:product that several devices share, listing them, as virt-install
    does: picking one would be a guess, and passing the wrong device through takes it from the host.
    """
    found = [dev for dev in devices if _matches(spec, dev)]
    if len(found) == 1:
        return found[0]
    if found:
        raise errors.InvalidRequest(
            f"several USB devices match {spec}:\n{_listing(found)}",
            hint="use host:BUS.DEV to pick one",
        )
    have = f"the host has:\n{_listing(devices)}" if devices else "the host has no USB devices"
    raise errors.DeviceNotFound(f"no USB device matches {spec}; {have}", hint="vhotplug host list --usb shows them")
