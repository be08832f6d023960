"""Is there room to hot-plug a PCI device? Answered from the live domain XML, before asking libvirt.

On q35, PCIe devices (virtio, e1000e) hot-plug only into a free pcie-root-port;
conventional PCI devices (e1000, rtl8139) into a pcie-to-pci-bridge or pci-bridge
slot. On i440fx (pc) both go into pci.0 (ACPI hot-plug) or a pci-bridge.
"""

from __future__ import annotations

from dataclasses import dataclass

from lxml import etree

from vhotplug import errors

CONVENTIONAL_MODELS = frozenset({"e1000", "rtl8139", "ne2k_pci", "pcnet"})
_BRIDGE_SLOTS = range(1, 32)  # slot 0 of a bridge is not hot-pluggable


@dataclass(frozen=True)
class PciRoom:
    pcie: bool  # a PCIe machine (q35)
    free_root_ports: int
    free_bridge_slots: int  # conventional PCI slots: pcie-to-pci-bridge / pci-bridge / pci-root


def _used_slots(root: etree._Element) -> dict[int, set[int]]:
    used: dict[int, set[int]] = {}
    for addr in root.iterfind(".//devices/*/address[@type='pci']"):
        used.setdefault(int(addr.get("bus", "0"), 0), set()).add(int(addr.get("slot", "0"), 0))
    return used


def pci_room(xml: str | bytes) -> PciRoom:
    root = etree.fromstring(xml.encode() if isinstance(xml, str) else xml)
    used = _used_slots(root)
    controllers = root.findall("devices/controller[@type='pci']")
    pcie = any(c.get("model") == "pcie-root" for c in controllers)
    free_ports = 0
    free_slots = 0
    for ctl in controllers:
        index, model = int(ctl.get("index", "0")), ctl.get("model")
        if ctl.find("target[@hotplug='off']") is not None:
            continue
        if model == "pcie-root-port" and not used.get(index):
            free_ports += 1
        elif model in ("pcie-to-pci-bridge", "pci-bridge", "pci-root"):
            free_slots += len(set(_BRIDGE_SLOTS) - used.get(index, set()))
    return PciRoom(pcie, free_ports, free_slots)


def check_pci_room(xml: str | bytes, *, conventional: bool, what: str) -> None:
    """Refuse with the missing controller named when a live PCI hot-plug cannot be placed."""
    room = pci_room(xml)
    if room.pcie and not conventional and room.free_root_ports == 0:
        raise errors.InvalidRequest(
            f"no free pcie-root-port on this q35 domain: hot-plugging {what} needs one",
            hint="add pcie-root-port controllers to the definition (they take effect at the next boot)",
        )
    if conventional and room.free_bridge_slots == 0:
        where = "pcie-to-pci-bridge" if room.pcie else "pci-bridge"
        raise errors.InvalidRequest(
            f"no free conventional PCI slot: hot-plugging {what} needs a {where} with a free slot",
            hint=f"add a {where} controller to the definition (it takes effect at the next boot)",
        )
