"""Host devices given to a guest: PCI functions and USB devices, as ``<hostdev>`` XML.

The spec says which host device (by its host address) and how the guest will recognise it: a PCI
function by vendor:device with a driver bound, a USB device by idVendor:idProduct. Nothing here
talks to libvirt: callers look the device up first (:mod:`vhotplug.host.nodedev`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from lxml import etree

from vhotplug import templates
from vhotplug.addresses import Bdf
from vhotplug.devices.common import choose_id, set_alias, user_alias


@dataclass(frozen=True)
class PciHostdevSpec:
    bdf: Bdf
    vendor: int | None
    product: int | None
    managed: bool
    alias: str

    @property
    def ids(self) -> str | None:
        """``8086:100e``: what the guest will see (None when libvirt did not say)."""
        if self.vendor is None or self.product is None:
            return None
        return f"{self.vendor:04x}:{self.product:04x}"


@dataclass(frozen=True)
class UsbHostdevSpec:
    vendor: int
    product: int
    bus: int | None  # set when the device is named by its address
    device: int | None
    alias: str

    @property
    def ids(self) -> str:
        return f"{self.vendor:04x}:{self.product:04x}"


def pci_hostdev_spec(bdf: Bdf, *, vendor: int | None, product: int | None, managed: bool, id: str | None,
                     used_aliases: Iterable[str]) -> PciHostdevSpec:
    """A PCI hostdev with id ``id`` (default ``pciN``), alias ``ua-ID``."""
    alias = user_alias(choose_id(id, prefix="pci", used_aliases=used_aliases))
    return PciHostdevSpec(bdf, vendor, product, managed, alias)


def usb_hostdev_spec(*, vendor: int, product: int, bus: int | None, device: int | None, id: str | None,
                     used_aliases: Iterable[str]) -> UsbHostdevSpec:
    """A USB hostdev with id ``id`` (default ``usbN``), alias ``ua-ID``."""
    alias = user_alias(choose_id(id, prefix="usb", used_aliases=used_aliases))
    return UsbHostdevSpec(vendor, product, bus, device, alias)


def pci_hostdev_xml(spec: PciHostdevSpec) -> etree._Element:
    root = templates.load("hostdev-pci")
    root.set("managed", "yes" if spec.managed else "no")
    addr = root.find("source/address")
    addr.set("domain", f"0x{spec.bdf.domain:04x}")
    addr.set("bus", f"0x{spec.bdf.bus:02x}")
    addr.set("slot", f"0x{spec.bdf.slot:02x}")
    addr.set("function", f"0x{spec.bdf.function:x}")
    set_alias(root, spec.alias)
    return root


def usb_hostdev_xml(spec: UsbHostdevSpec) -> etree._Element:
    root = templates.load("hostdev-usb")
    source = root.find("source")
    source.find("vendor").set("id", f"0x{spec.vendor:04x}")
    source.find("product").set("id", f"0x{spec.product:04x}")
    addr = source.find("address")
    if spec.bus is None or spec.device is None:
        source.remove(addr)
    else:
        addr.set("bus", str(spec.bus))
        addr.set("device", str(spec.device))
    set_alias(root, spec.alias)
    return root
