"""Issue 3 on the real lab: attach with in-guest verification, detach that waits, refusals that change nothing."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import libvirt
import pytest
from lxml import etree

from tests.lab.conftest import URI, stopped_domain
from vhotplug.errors import ExitCode
from vhotplug.guest.probe import guest_view
from vhotplug.guest.ssh import GuestSession
from vhotplug.guest.watch import Identity, wait_for
from vhotplug.virt import pending


def live_xml(conn: libvirt.virConnect, name: str) -> str:
    return conn.lookupByName(name).XMLDesc(0)


def config_xml(conn: libvirt.virConnect, name: str) -> str:
    return conn.lookupByName(name).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)


def aliases(xml: str) -> set[str]:
    return set(etree.fromstring(xml.encode()).xpath("devices/*/alias/@name"))


@pytest.fixture
def images(tmp_path_factory) -> Path:
    # QEMU runs as libvirt-qemu: images must sit where it can read them, not under /tmp/pytest-of-root.
    d = Path("/var/lib/vhotplug/test-images") / tmp_path_factory.getbasetemp().name
    d.mkdir(parents=True, exist_ok=True)
    yield d
    shutil.rmtree(d)


@pytest.mark.parametrize("model", ["virtio", "e1000"])
def test_nic_cycle_with_ping(lab, cli, conn, model):
    mac = f"52:54:00:3c:00:{len(model):02x}"
    r = cli("-c", URI, "-o", "json", "attach", "nic", lab.name, "--model", model, "--mac", mac,
            "--id", f"t{model}", "--ping", "10.0.2.2")
    assert r.code == 0, r.err
    att = r.json()["attached"]
    assert att["alias"] == f"ua-t{model}" and att["identity"] == mac
    assert re.fullmatch(r"eth\d+", att["guest"]["name"])
    assert att["guest"]["driver"] == {"virtio": "virtio_net", "e1000": "e1000"}[model]
    assert att["ping"]["received"] >= 1
    assert f"ua-t{model}" in aliases(live_xml(conn, lab.name))
    assert f"ua-t{model}" not in aliases(config_xml(conn, lab.name))  # current == live on a running domain

    d = cli("-c", URI, "-o", "json", "detach", lab.name, f"t{model}")
    assert d.code == 0, d.err
    det = d.json()["detached"]
    assert det["live"] and not det["was_pending"] and "guest_gone_seconds" in det
    assert f"ua-t{model}" not in aliases(live_xml(conn, lab.name))
    with GuestSession(lab.info.target) as s:
        assert all(n.mac != mac for n in guest_view(s).net)


@pytest.mark.parametrize(("bus", "pattern"), [("virtio", r"vd[a-z]+"), ("scsi", r"sd[a-z]+"), ("usb", r"sd[a-z]+")])
def test_disk_cycle(lab, cli, conn, images, bus, pattern):
    path = images / f"{bus}.img"
    path.write_bytes(b"")
    os.truncate(path, 64 << 20)
    r = cli("-c", URI, "-o", "json", "attach", "disk", lab.name, str(path), "--bus", bus, "--id", f"d{bus}")
    assert r.code == 0, r.err
    att = r.json()["attached"]
    assert att["identity"] == f"vh-d{bus}"
    assert re.fullmatch(pattern, att["guest"]["name"])
    if bus == "usb":
        assert "usb" in att["guest"]  # seen under /sys/bus/usb
    with GuestSession(lab.info.target) as s:
        blocks = {b.name: b for b in guest_view(s).block}
    assert blocks[att["guest"]["name"]].size_bytes == 64 << 20
    assert blocks[att["guest"]["name"]].serial == f"vh-d{bus}"  # `list --guest` reads it as the watcher matched it

    d = cli("-c", URI, "detach", lab.name, f"d{bus}")
    assert d.code == 0, d.err
    assert "released by the guest" in d.out and "gone" in d.out
    assert f"ua-d{bus}" not in aliases(live_xml(conn, lab.name))
    with GuestSession(lab.info.target) as s:
        assert att["guest"]["name"] not in {b.name for b in guest_view(s).block}


def test_disk_by_size_creates_and_detach_by_target(lab, cli, conn, monkeypatch, images):
    monkeypatch.setenv("VHOTPLUG_IMAGE_DIR", str(images))
    r = cli("-o", "json", "-c", URI, "attach", "disk", lab.name, "--size", "32M", "--id", "sized")
    assert r.code == 0, r.err
    att = r.json()["attached"]
    created = Path(att["created_image"])
    assert created.stat().st_size == 32 << 20
    target = etree.fromstring(live_xml(conn, lab.name).encode()).xpath(
        "devices/disk[alias/@name='ua-sized']/target/@dev")[0]
    assert cli("-c", URI, "detach", lab.name, target).code == 0
    assert "ua-sized" not in aliases(live_xml(conn, lab.name))


def test_config_only_changes_the_definition(lab, cli, conn):
    before_live = live_xml(conn, lab.name)
    r = cli("-c", URI, "attach", "nic", lab.name, "--config", "--id", "cfgonly", "--mac", "52:54:00:3c:01:01")
    assert r.code == 0, r.err
    assert "ua-cfgonly" in aliases(config_xml(conn, lab.name))
    assert "ua-cfgonly" not in aliases(live_xml(conn, lab.name))
    assert live_xml(conn, lab.name) == before_live
    assert cli("-c", URI, "detach", lab.name, "cfgonly", "--config").code == 0
    assert "ua-cfgonly" not in aliases(config_xml(conn, lab.name))


def test_print_xml_changes_nothing(lab, cli, conn):
    before = (live_xml(conn, lab.name), config_xml(conn, lab.name))
    r = cli("-c", URI, "attach", "nic", lab.name, "--id", "printed", "--mac", "52:54:00:3c:02:01", "--print-xml")
    assert r.code == 0
    el = etree.fromstring(r.out.encode())
    assert el.tag == "interface" and el.find("alias").get("name") == "ua-printed"
    assert el.find("mac").get("address") == "52:54:00:3c:02:01"
    assert (live_xml(conn, lab.name), config_xml(conn, lab.name)) == before


def pending_record(uuid: str, alias: str) -> Path:
    return pending.run_dir() / "pending-detach" / f"{uuid}-{alias}.json"


def test_guest_that_does_not_release_times_out_honestly(lab, cli, conn):
    dom = conn.lookupByName(lab.name)
    assert cli("-c", URI, "attach", "nic", lab.name, "--id", "stuck", "--mac", "52:54:00:3c:03:01").code == 0
    dom.suspend()  # a paused guest cannot acknowledge the unplug
    try:
        r = cli("-c", URI, "detach", lab.name, "stuck", "--timeout", "2", "--no-verify")
        assert r.code == ExitCode.TIMEOUT
        assert "did not release ua-stuck within 2 s: it is still attached" in r.err
        assert "ua-stuck" in aliases(live_xml(conn, lab.name))
        record = pending_record(dom.UUIDString(), "ua-stuck").read_text()
        # Asked again while the first request is pending: it waits, and does not send another.
        r = cli("-c", URI, "detach", lab.name, "stuck", "--timeout", "1", "--no-verify")
        assert r.code == ExitCode.TIMEOUT and "not re-sent" in r.err
        assert pending_record(dom.UUIDString(), "ua-stuck").read_text() == record
        assert "ua-stuck" in aliases(live_xml(conn, lab.name))
    finally:
        dom.resume()
    # The guest completes the one request it got; asking again reports that honestly.
    with GuestSession(lab.info.target) as s:
        wait_for(s, Identity("nic", "52:54:00:3c:03:01"), present=False, timeout=30)
    r = cli("-c", URI, "-o", "json", "detach", lab.name, "stuck")
    assert r.code == 0, r.err
    assert r.json()["detached"]["was_pending"] is True
    assert "ua-stuck" not in aliases(live_xml(conn, lab.name))
    assert not pending_record(dom.UUIDString(), "ua-stuck").exists()


REFUSALS = [
    (("attach", "nic", "{dom}", "--mac", "01:00:5e:00:00:01"), ExitCode.INVALID, "multicast"),
    (("attach", "nic", "{dom}", "--mac", "52:54:00:zz:00:01"), ExitCode.INVALID, "invalid MAC"),
    (("attach", "nic", "{dom}", "--model", "ne2k"), ExitCode.INVALID, "model"),
    (("attach", "disk", "{dom}", "--size", "12Q"), ExitCode.INVALID, "size"),
    (("attach", "disk", "{dom}", "--size", "0"), ExitCode.INVALID, "size"),
    (("attach", "disk", "{dom}", "/var/lib/vhotplug/nonexistent.img"), ExitCode.INVALID, "not found"),
    (("attach", "disk", "{dom}", "--size", "8M", "--target", "hda"), ExitCode.INVALID, "target"),
    (("attach", "disk", "{dom}", "--size", "8M", "--bus", "scsi", "--target", "vdc"), ExitCode.INVALID, "target"),
    (("attach", "disk", "{dom}", "--size", "8M", "--bus", "sata"), ExitCode.INVALID, "cannot hot-plug SATA"),
]


@pytest.mark.parametrize(("args", "code", "words"), REFUSALS)
def test_refusals_change_nothing(lab, cli, conn, monkeypatch, images, args, code, words):
    monkeypatch.setenv("VHOTPLUG_IMAGE_DIR", str(images))
    before = (live_xml(conn, lab.name), config_xml(conn, lab.name))
    r = cli("-c", URI, *(a.format(dom=lab.name) for a in args))
    assert r.code == code, (r.code, r.err)
    assert words in r.err and "Traceback" not in r.err
    assert (live_xml(conn, lab.name), config_xml(conn, lab.name)) == before
    assert not list(images.rglob("*.img"))  # a refused --size created no image


def test_sata_refusal_suggests_scsi_or_usb(lab, cli, monkeypatch, images):
    monkeypatch.setenv("VHOTPLUG_IMAGE_DIR", str(images))
    r = cli("-c", URI, "attach", "disk", lab.name, "--size", "8M", "--bus", "sata")
    assert "--bus scsi or --bus usb" in r.err


def test_duplicate_id_refused(lab, cli, conn):
    assert cli("-c", URI, "attach", "nic", lab.name, "--id", "dup", "--no-verify").code == 0
    try:
        before = (live_xml(conn, lab.name), config_xml(conn, lab.name))
        r = cli("-c", URI, "attach", "nic", lab.name, "--id", "dup")
        assert r.code == ExitCode.INVALID and "duplicate" in r.err
        assert (live_xml(conn, lab.name), config_xml(conn, lab.name)) == before
    finally:
        assert cli("-c", URI, "detach", lab.name, "dup").code == 0


def test_live_on_stopped_domain_refused(lab, cli, conn):
    name = f"{lab.name}-stopped"
    with stopped_domain(conn, name) as stopped:
        before = stopped.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        r = cli("-c", URI, "attach", "nic", name, "--live")
        assert r.code == ExitCode.INVALID and "--live needs a running domain" in r.err
        assert stopped.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE) == before

def test_no_free_root_port_refused(lab, cli, conn):
    """Fill every free pcie-root-port, then one more PCIe NIC is refused naming the controller."""
    added = []
    try:
        for i in range(8):
            r = cli("-c", URI, "attach", "nic", lab.name, "--id", f"fill{i}", "--no-verify")
            assert r.code == 0, r.err
            added.append(f"fill{i}")
        before = (live_xml(conn, lab.name), config_xml(conn, lab.name))
        r = cli("-c", URI, "attach", "nic", lab.name, "--id", "onetoomany")
        assert r.code == ExitCode.INVALID and "no free pcie-root-port" in r.err
        assert (live_xml(conn, lab.name), config_xml(conn, lab.name)) == before
        # A conventional PCI NIC still fits on the pcie-to-pci-bridge.
        r = cli("-c", URI, "attach", "nic", lab.name, "--model", "e1000", "--id", "conv", "--no-verify")
        assert r.code == 0, r.err
        added.append("conv")
    finally:
        for dev in added:
            assert cli("-c", URI, "detach", lab.name, dev, "--no-verify").code == 0


def test_persistent_detach_of_a_device_without_user_alias(lab, cli, conn):
    """libvirt's own aliases (net1) live only in the live XML: the definition's copy is found by MAC."""
    dom = conn.lookupByName(lab.name)
    mac = "52:54:00:3c:04:01"
    iface = etree.Element("interface", type="user")
    etree.SubElement(iface, "mac", address=mac)
    etree.SubElement(iface, "model", type="virtio")
    dom.attachDeviceFlags(etree.tostring(iface, encoding="unicode"),
                          libvirt.VIR_DOMAIN_AFFECT_LIVE | libvirt.VIR_DOMAIN_AFFECT_CONFIG)
    live, config = xml_macs(conn, lab.name)
    assert mac in live and mac in config
    r = cli("-c", URI, "-o", "json", "detach", lab.name, mac, "--persistent")
    assert r.code == 0, r.err
    assert r.json()["detached"]["live"] and r.json()["detached"]["config"]
    assert r.json()["detached"]["alias"].startswith("net")
    live, config = xml_macs(conn, lab.name)
    assert mac not in live and mac not in config


def xml_macs(conn: libvirt.virConnect, name: str) -> tuple[set[str], set[str]]:
    return tuple(set(etree.fromstring(x.encode()).xpath("devices/interface/mac/@address"))  # type: ignore[return-value]
                 for x in (live_xml(conn, name), config_xml(conn, name)))
