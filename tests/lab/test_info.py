"""`vhotplug info pci|usb` on the lab: QEMU's own view follows hot-plug, with libvirt's aliases."""

from __future__ import annotations

import shutil
from pathlib import Path

import libvirt
import pytest
from lxml import etree

from tests.lab.conftest import URI, stopped_domain
from vhotplug.errors import ExitCode


@pytest.fixture
def images(tmp_path_factory, monkeypatch) -> Path:
    # QEMU runs as libvirt-qemu: images must sit where it can read them, not under /tmp/pytest-of-root.
    d = Path("/var/lib/vhotplug/test-images") / f"info-{tmp_path_factory.getbasetemp().name}"
    d.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("VHOTPLUG_IMAGE_DIR", str(d))
    yield d
    shutil.rmtree(d)


def live(conn: libvirt.virConnect, name: str) -> etree._Element:
    return etree.fromstring(conn.lookupByName(name).XMLDesc(0).encode())


def pci_json(cli, name: str) -> dict[str, dict]:
    r = cli("-c", URI, "-o", "json", "info", "pci", name)
    assert r.code == 0, r.err
    return {f["address"]: f for f in r.json()["functions"]}


def usb_json(cli, name: str) -> dict:
    r = cli("-c", URI, "-o", "json", "info", "usb", name)
    assert r.code == 0, r.err
    return r.json()


def test_info_pci_shows_the_lab_with_libvirt_aliases(lab, cli, conn):
    r = cli("-c", URI, "info", "pci", lab.name)
    assert r.code == 0, r.err
    # The management NIC (virtio-net on pcie.0 slot 0x1e, from <qemu:commandline>): QEMU knows it without an id.
    mgmt = next(ln for ln in r.out.splitlines() if ln.startswith("00:1e.0"))
    assert mgmt.split() == ["00:1e.0", "1af4:1000", "Ethernet", "controller", "-", "-"]
    functions = pci_json(cli, lab.name)
    assert functions["00:1e.0"]["qdev_id"] is None and functions["00:1e.0"]["class_desc"] == "Ethernet controller"
    # Every PCI device libvirt named is there under its alias (but the q35 built-ins on 00:1f, which QEMU made).
    xml = live(conn, lab.name)
    named = {a for a in xml.xpath("devices/*[address/@type='pci']/alias/@name")
             if not xml.xpath(f"devices/*[alias/@name='{a}']/address[@slot='0x1f']")}
    assert {"pci.1", "usb", "scsi0", "balloon0", "rng0"} <= named
    qdev_ids = {f["qdev_id"] for f in functions.values()}
    assert named <= qdev_ids, named - qdev_ids
    for alias in named:
        assert alias in r.out


def test_info_pci_follows_a_hotplugged_nic(lab, cli, conn):
    r = cli("-c", URI, "attach", "nic", lab.name, "--model", "virtio", "--id", "infonic", "--mac", "52:54:00:3c:1f:01")
    assert r.code == 0, r.err
    try:
        found = [f for f in pci_json(cli, lab.name).values() if f["qdev_id"] == "ua-infonic"]
        assert len(found) == 1
        nic = found[0]
        assert nic["vendor_device"] == "1af4:1041" and nic["class_desc"] == "Ethernet controller"
        # It sits behind the root port libvirt put it on: <address bus='0xN'> is controller pci.N.
        bus = int(live(conn, lab.name).xpath("devices/interface[alias/@name='ua-infonic']/address/@bus")[0], 16)
        assert nic["bridge_id"] == f"pci.{bus}"
        table = cli("-c", URI, "info", "pci", lab.name).out
        assert any(ln.startswith(nic["address"]) and "ua-infonic" in ln for ln in table.splitlines())
    finally:
        d = cli("-c", URI, "detach", lab.name, "infonic")
        assert d.code == 0, d.err
    assert all(f["qdev_id"] != "ua-infonic" for f in pci_json(cli, lab.name).values())
    assert "ua-infonic" not in cli("-c", URI, "info", "pci", lab.name).out


def test_info_usb_follows_a_hotplugged_usb_disk(lab, cli, conn, images):
    before = cli("-c", URI, "info", "usb", lab.name)
    assert before.code == 0, before.err
    assert before.out.strip() == f"No USB devices in {lab.name} (QEMU info usb answered nothing)."
    assert usb_json(cli, lab.name) == {"domain": lab.name, "source": "HMP info usb", "devices": [], "unparsed": []}

    r = cli("-c", URI, "attach", "disk", lab.name, "--bus", "usb", "--size", "16M", "--id", "infousb")
    assert r.code == 0, r.err
    try:
        doc = usb_json(cli, lab.name)
        assert doc["unparsed"] == []
        found = [d for d in doc["devices"] if d["id"] == "ua-infousb"]
        assert len(found) == 1
        assert found[0]["product"] == "QEMU USB MSD" and found[0]["speed"].endswith(" Mb/s")
        port = live(conn, lab.name).xpath("devices/disk[alias/@name='ua-infousb']/address[@type='usb']/@port")
        assert found[0]["port"] == port[0]
        table = cli("-c", URI, "info", "usb", lab.name).out
        assert any("ua-infousb" in ln and "QEMU USB MSD" in ln for ln in table.splitlines())
    finally:
        d = cli("-c", URI, "detach", lab.name, "infousb")
        assert d.code == 0, d.err
    assert usb_json(cli, lab.name)["devices"] == []
    assert "ua-infousb" not in cli("-c", URI, "info", "usb", lab.name).out


@pytest.mark.parametrize("what", ["pci", "usb"])
def test_info_refuses_a_stopped_domain(lab, cli, conn, what):
    name = f"{lab.name}-infostop"
    with stopped_domain(conn, name):
        r = cli("-c", URI, "info", what, name)
    assert r.code == ExitCode.INVALID
    lines = [ln for ln in r.err.splitlines() if not ln.startswith("vhotplug: warning:")]  # global, not ours
    assert lines == [f"vhotplug: error: {name} is not running: QEMU's monitor exists only while the domain runs",
                     f"vhotplug: hint: `vhotplug list {name}` shows the devices of its definition"]
    assert r.out == ""
