"""`vhotplug list` on the lab: libvirt's view and the guest's own view of a hot-added NIC."""

from __future__ import annotations

import time

import libvirt
from lxml import etree

from tests.lab.conftest import URI
from vhotplug.guest.probe import guest_view
from vhotplug.guest.ssh import GuestSession

MAC = "52:54:00:7e:57:01"


def nic_xml() -> str:
    # Put in place with the plain libvirt API: this test is about `list`, not attach.
    iface = etree.Element("interface", type="user")
    etree.SubElement(iface, "mac", address=MAC)
    etree.SubElement(iface, "model", type="virtio")
    etree.SubElement(iface, "alias", name="ua-listnic")
    return etree.tostring(iface, encoding="unicode")


def wait_guest(session: GuestSession, present: bool, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(n.mac == MAC for n in guest_view(session).net) == present:
            return
        time.sleep(0.1)
    raise AssertionError(f"guest never {'showed' if present else 'dropped'} {MAC}")


def test_list_shows_hotplugged_nic_in_both_views(lab, cli, conn):
    dom = conn.lookupByName(lab.name)
    before = cli("-c", URI, "-o", "json", "list", lab.name).json()
    assert all(d["identity"] != MAC for d in before["devices"])
    dom.attachDeviceFlags(nic_xml(), libvirt.VIR_DOMAIN_AFFECT_LIVE)
    try:
        table = cli("-c", URI, "list", lab.name)
        doc = cli("-c", URI, "-o", "json", "list", lab.name).json()
        nic = [d for d in doc["devices"] if d["alias"] == "ua-listnic"]
        assert len(nic) == 1 and nic[0]["identity"] == MAC and nic[0]["model"] == "virtio"
        assert nic[0]["kind"] == "interface" and nic[0]["source"] == "user"
        assert nic[0]["address"].startswith("0000:") and nic[0]["address"] != "0000:00:00.0"
        for fact in (MAC, "ua-listnic", nic[0]["address"]):
            assert fact in table.out
        with GuestSession(lab.info.target) as session:
            wait_guest(session, present=True)
        guest = cli("-c", URI, "-o", "json", "list", lab.name, "--guest").json()["guest"]
        seen = [n for n in guest["net"] if n["mac"] == MAC]
        assert seen and seen[0]["driver"] == "virtio_net"
        # The guest's PCI function for it is the address libvirt gave it, with virtio-pci bound.
        assert any(p["vendor_device"] == "1af4:1041" and p["driver"] == "virtio-pci" for p in guest["pci"])
    finally:
        dom.detachDeviceAlias("ua-listnic", libvirt.VIR_DOMAIN_AFFECT_LIVE)
        with GuestSession(lab.info.target) as session:
            wait_guest(session, present=False)


def test_inactive_definition_has_no_live_nic(lab, cli):
    doc = cli("-c", URI, "-o", "json", "list", lab.name, "--inactive").json()
    assert doc["xml"] == "inactive" and all(d["identity"] != MAC for d in doc["devices"])
