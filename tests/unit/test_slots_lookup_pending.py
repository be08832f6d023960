"""Room for PCI hot-plug, finding a device by any user spelling, and pending-detach records."""

from __future__ import annotations

import copy

import pytest
from lxml import etree

from tests.conftest import GOLDEN
from vhotplug import errors
from vhotplug.virt import pending
from vhotplug.virt.devices import find_device, used_names
from vhotplug.virt.slots import check_pci_room, pci_room, place_on_q35

LAB = (GOLDEN / "lab-live-q35.xml").read_text()
DEVICES = (GOLDEN / "devices-in.xml").read_text()


def fill_root_ports(xml: str) -> str:
    """The lab's live XML with a device on every free root port."""
    root = etree.fromstring(xml.encode())
    devices = root.find("devices")
    used = {a.get("bus") for a in root.iterfind(".//devices/*/address[@type='pci']")}
    for ctl in root.xpath("devices/controller[@model='pcie-root-port']"):
        bus = f"0x{int(ctl.get('index')):02x}"
        if bus not in used:
            nic = etree.SubElement(devices, "interface", type="user")
            etree.SubElement(nic, "address", type="pci", domain="0x0000", bus=bus, slot="0x00", function="0x0")
    return etree.tostring(root, encoding="unicode")


def test_lab_has_room():
    room = pci_room(LAB)
    assert room.pcie and room.free_root_ports == 8 and room.free_bridge_slots == 31


def test_no_free_root_port_is_refused_naming_the_controller():
    full = fill_root_ports(LAB)
    assert pci_room(full).free_root_ports == 0
    with pytest.raises(errors.InvalidRequest, match="no free pcie-root-port") as exc:
        check_pci_room(full, conventional=False, what="a virtio NIC")
    assert "pcie-root-port" in (exc.value.hint or "")
    check_pci_room(full, conventional=True, what="an e1000 NIC")  # the pcie-to-pci-bridge still has room


def test_no_bridge_is_refused():
    root = etree.fromstring(LAB.encode())
    for ctl in root.xpath("devices/controller[@model='pcie-to-pci-bridge']"):
        ctl.getparent().remove(ctl)
    with pytest.raises(errors.InvalidRequest, match="pcie-to-pci-bridge"):
        check_pci_room(etree.tostring(root), conventional=True, what="an e1000 NIC")


def test_hotplug_off_port_is_not_room():
    root = etree.fromstring(fill_root_ports(LAB).encode())
    port = copy.deepcopy(root.xpath("devices/controller[@model='pcie-root-port']")[0])
    port.set("index", "99")
    for child in list(port):
        port.remove(child)
    etree.SubElement(port, "target", hotplug="off")
    root.find("devices").append(port)
    assert pci_room(etree.tostring(root)).free_root_ports == 0


@pytest.mark.parametrize(("ref", "alias"), [
    ("ua-mynic", "ua-mynic"), ("mynic", "ua-mynic"), ("52:54:00:AB:CD:EF", "net1"), ("vdb", "ua-data"),
    ("0000:05:00.0", "ua-data"), ("06:00.0", "ua-mynic"), ("hostdev1", "hostdev1"), ("sdb", "ua-stick"),
])
def test_find_device(ref, alias):
    assert find_device(DEVICES, ref)[0].alias == alias


def test_find_device_not_found_lists_aliases():
    with pytest.raises(errors.DeviceNotFound, match=r"known aliases: .*ua-mynic"):
        find_device(DEVICES, "nosuch")


def test_find_device_ambiguous():
    root = etree.fromstring(DEVICES.encode())
    root.xpath("devices/disk/alias[@name='ua-stick']")[0].set("name", "vdb")  # alias equal to another's target
    with pytest.raises(errors.InvalidRequest, match="several devices"):
        find_device(etree.tostring(root), "vdb")


def test_used_names():
    used = used_names(DEVICES, LAB)
    assert {"ua-mynic", "ua-data", "rng0"} <= used.aliases
    assert "52:54:00:12:34:56" in used.macs and {"vdb", "sda", "sdb"} <= used.targets


def test_pending_records(tmp_path, monkeypatch):
    monkeypatch.setenv("VHOTPLUG_RUN_DIR", str(tmp_path))
    assert pending.pending_since("u1", 5, "ua-a") is None
    pending.record("u1", 5, "ua-a")
    assert pending.pending_since("u1", 5, "ua-a") is not None
    assert pending.pending_since("u1", 6, "ua-a") is None  # the domain restarted: stale, and dropped
    assert pending.pending_since("u1", 5, "ua-a") is None
    pending.record("u1", 5, "ua-b")
    pending.clear("u1", "ua-b")
    assert pending.pending_since("u1", 5, "ua-b") is None


# -- where a host PCI function goes on q35 ---------------------------------------------------------------------


def test_hostdev_goes_on_the_first_free_root_port():
    address = place_on_q35(LAB, what="PCI device 0000:00:05.0")
    assert dict(address.attrib) == {"type": "pci", "domain": "0x0000", "bus": "0x06", "slot": "0x00",
                                    "function": "0x0"}
    # ports 1-5 carry the template's own devices (xhci, scsi, balloon, rng, bridge parent): 6 is the first free
    assert pci_room(LAB).free_root_ports == 8


def test_hostdev_falls_back_to_a_bridge_slot_then_refuses_naming_prepare():
    full = fill_root_ports(LAB)
    address = place_on_q35(full, what="x")
    assert (address.get("bus"), address.get("slot")) == ("0x0e", "0x01")  # the pcie-to-pci-bridge, first slot
    root = etree.fromstring(LAB.encode())
    for ctl in root.xpath("devices/controller[@model='pcie-to-pci-bridge']"):
        ctl.getparent().remove(ctl)
    no_bridge_full = fill_root_ports(etree.tostring(root, encoding="unicode"))
    with pytest.raises(errors.InvalidRequest, match="no free pcie-root-port or pcie-to-pci-bridge slot") as exc:
        place_on_q35(no_bridge_full, what="PCI device 0000:00:05.0")
    assert "vhotplug prepare DOMAIN --pcie-ports N" in (exc.value.hint or "")


def test_pc_machine_leaves_placement_to_libvirt():
    root = etree.fromstring(LAB.encode())
    for ctl in root.xpath("devices/controller[@type='pci']"):
        ctl.getparent().remove(ctl)
    etree.SubElement(root.find("devices"), "controller", type="pci", index="0", model="pci-root")
    assert place_on_q35(etree.tostring(root), what="x") is None
