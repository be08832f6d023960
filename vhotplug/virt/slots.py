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
            hint="`vhotplug prepare DOMAIN --pcie-ports N` adds pcie-root-ports to the definition (effective at "
                 "the next boot)",
        )
    if conventional and room.free_bridge_slots == 0:
        where = "pcie-to-pci-bridge" if room.pcie else "pci-bridge"
        raise errors.InvalidRequest(
            f"no free conventional PCI slot: hot-plugging {what} needs a {where} with a free slot",
            hint=f"add a {where} controller to the definition (it takes effect at the next boot)"
                 + ("; `vhotplug prepare DOMAIN` adds one" if room.pcie else ""),
        )


def place_on_q35(xml: str | bytes, *, what: str) -> etree._Element | None:
    """The guest address for a host PCI function hot-plugged into a q35 domain; None on other machines.

    libvirt does not place a hostdev it cannot prove to be PCIe on a pcie-root-port by itself ("No more
    available PCI slots", seen in the nested lab), so vhotplug writes the address: slot 0 of the first free
    pcie-root-port, else the first free slot of a pcie-to-pci-bridge (conventional PCI: no PCIe extended
    capabilities in the guest).
    """
    root = etree.fromstring(xml.encode() if isinstance(xml, str) else xml)
    controllers = root.findall("devices/controller[@type='pci']")
    if not any(c.get("model") == "pcie-root" for c in controllers):
        return None
    used = _used_slots(root)
    hotpluggable = [c for c in controllers if c.find("target[@hotplug='off']") is None]
    for ctl in sorted(hotpluggable, key=lambda c: int(c.get("index", "0"))):
        index = int(ctl.get("index", "0"))
        if ctl.get("model") == "pcie-root-port" and not used.get(index):
            return _address(index, 0)
    for ctl in sorted(hotpluggable, key=lambda c: int(c.get("index", "0"))):
        index = int(ctl.get("index", "0"))
        if ctl.get("model") == "pcie-to-pci-bridge":
            free = sorted(set(_BRIDGE_SLOTS) - used.get(index, set()))
            if free:
                return _address(index, free[0])
    raise errors.InvalidRequest(
        f"no free pcie-root-port or pcie-to-pci-bridge slot on this q35 domain: {what} has nowhere to go",
        hint="`vhotplug prepare DOMAIN --pcie-ports N` adds pcie-root-ports to the definition (effective at the "
             "next boot)",
    )


def _address(bus: int, slot: int) -> etree._Element:
    return etree.Element("address", type="pci", domain="0x0000", bus=f"0x{bus:02x}", slot=f"0x{slot:02x}",
                         function="0x0")
