"""What QEMU itself says the guest has: ``query-pci`` (QMP) and ``info usb`` (HMP), read through libvirt.

The parsers are pure functions of the monitor's text. The two thin functions that ask QEMU go
through ``virDomainQemuMonitorCommand`` (``virsh qemu-monitor-command``): read-only commands, but
libvirt still marks the domain as tainted ("custom-monitor") in its log, as it does for virsh.
``libvirt_qemu`` is imported only there, so other commands do not pay for it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import libvirt

from vhotplug import errors
from vhotplug.virt.errors import translate

QUERY_PCI = '{"execute":"query-pci"}'
INFO_USB = "info usb"


@dataclass(frozen=True)
class PciFunction:
    """One PCI function as QEMU reports it; bus numbers are the guest's (as lspci in the guest shows them)."""

    bus: int
    slot: int
    function: int
    vendor: int
    device: int
    class_code: int  # class << 8 | subclass, e.g. 0x0200
    class_desc: str | None  # QEMU's name for the class, when it has one
    qdev_id: str | None  # QEMU's device id: libvirt's alias (net0, ua-nic1, hostdev0); None when unset
    bridge: str | None = None  # address of the bridge it sits behind; None on a root bus
    bridge_id: str | None = None  # that bridge's qdev id (libvirt's controller alias, e.g. pci.6)
    secondary_bus: int | None = None  # for a bridge: the bus behind it

    @property
    def address(self) -> str:
        return f"{self.bus:02x}:{self.slot:02x}.{self.function:x}"

    @property
    def vendor_device(self) -> str:
        return f"{self.vendor:04x}:{self.device:04x}"

    @property
    def class_hex(self) -> str:
        return f"{self.class_code:04x}"

    @property
    def class_name(self) -> str:
        return self.class_desc or f"class {self.class_hex}"

    def to_dict(self) -> dict[str, Any]:
        return {"address": self.address, "bus": self.bus, "slot": self.slot, "function": self.function,
                "vendor_device": self.vendor_device, "class": self.class_hex, "class_desc": self.class_desc,
                "qdev_id": self.qdev_id, "bridge": self.bridge, "bridge_id": self.bridge_id,
                "secondary_bus": self.secondary_bus}


@dataclass(frozen=True)
class UsbRow:
    """One line of ``info usb``: a device, or (``parsed`` false) a line kept verbatim because it did not parse."""

    raw: str
    device: str | None = None  # bus.address as the guest assigned it ("0.0" until the guest has addressed it)
    port: str | None = None  # the port (as in libvirt's <address type='usb' port=.../>), "1.2" behind a hub
    speed: str | None = None  # as QEMU prints it, e.g. "480 Mb/s"
    product: str | None = None
    id: str | None = None  # QEMU's device id: libvirt's alias (ua-usb1, input2); None when unset

    @property
    def parsed(self) -> bool:
        return self.device is not None

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "port": self.port, "speed": self.speed, "product": self.product,
                "id": self.id}


def _monitor_error(what: str, detail: str) -> errors.LibvirtFailure:
    return errors.LibvirtFailure(f"unexpected answer from QEMU's monitor to {what}: {detail}")


def parse_query_pci(json_text: str) -> list[PciFunction]:
    """Every PCI function in a QMP ``query-pci`` reply, bridges recursed into, sorted by address."""
    try:
        reply = json.loads(json_text)
    except (TypeError, ValueError) as exc:
        raise _monitor_error("query-pci", f"not JSON ({exc})") from exc
    if isinstance(reply, dict) and "error" in reply:
        err = reply["error"] if isinstance(reply["error"], dict) else {}
        raise errors.LibvirtFailure(f"QEMU refused query-pci: {err.get('desc') or reply['error']}")
    buses = reply.get("return") if isinstance(reply, dict) else reply
    if not isinstance(buses, list):
        raise _monitor_error("query-pci", "no list of buses")
    found: list[PciFunction] = []
    try:
        for bus in buses:
            _walk(bus.get("devices") or [], None, None, found)
    except (AttributeError, KeyError, TypeError) as exc:
        raise _monitor_error("query-pci", f"malformed device entry ({exc!r})") from exc
    return sorted(found, key=lambda f: (f.bus, f.slot, f.function))


def _walk(devices: list[dict[str, Any]], bridge: str | None, bridge_id: str | None,
          found: list[PciFunction]) -> None:
    for dev in devices:
        class_info = dev.get("class_info") or {}
        behind = dev.get("pci_bridge")
        fn = PciFunction(
            bus=int(dev["bus"]), slot=int(dev["slot"]), function=int(dev["function"]),
            vendor=int(dev["id"]["vendor"]), device=int(dev["id"]["device"]),
            class_code=int(class_info["class"]), class_desc=class_info.get("desc") or None,
            qdev_id=dev.get("qdev_id") or None, bridge=bridge, bridge_id=bridge_id,
            secondary_bus=int(behind["bus"]["secondary"]) if behind and "bus" in behind else None,
        )
        found.append(fn)
        if behind:
            _walk(behind.get("devices") or [], fn.address, fn.qdev_id, found)


# hw/usb/bus.c: "  Device %d.%d, Port %s, Speed %s Mb/s, Product %s[, ID: %s]"
_USB_LINE = re.compile(
    r"^\s*Device (?P<device>\d+\.\d+), Port (?P<port>[\d.]+), Speed (?P<speed>\S+) Mb/s, "
    r"Product (?P<product>.*?)(?:, ID: (?P<id>\S+))?\s*$"
)


def parse_info_usb(text: str) -> list[UsbRow]:
    """One row per non-blank line of HMP ``info usb``; lines that are not devices are kept verbatim (unparsed)."""
    rows = []
    for line in text.splitlines():
        line = line.rstrip()
        if not line.strip():
            continue
        m = _USB_LINE.match(line)
        if m is None:
            rows.append(UsbRow(raw=line.strip()))
            continue
        rows.append(UsbRow(raw=line.strip(), device=m["device"], port=m["port"], speed=f"{m['speed']} Mb/s",
                           product=m["product"], id=m["id"] or None))
    return rows


def _command(dom: libvirt.virDomain, command: str, *, hmp: bool) -> str:
    import libvirt_qemu  # only the info commands need it

    flags = libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP if hmp else 0
    try:
        return libvirt_qemu.qemuMonitorCommand(dom, command, flags) or ""
    except libvirt.libvirtError as exc:
        raise translate(exc, f"asking QEMU's monitor {command!r} for {dom.name()}") from exc


def query_pci(dom: libvirt.virDomain) -> list[PciFunction]:
    """The guest's PCI functions, from QMP ``query-pci``."""
    return parse_query_pci(_command(dom, QUERY_PCI, hmp=False))


def info_usb(dom: libvirt.virDomain) -> list[UsbRow]:
    """The guest's USB devices, from HMP ``info usb`` (an empty answer: none)."""
    return parse_info_usb(_command(dom, INFO_USB, hmp=True))
