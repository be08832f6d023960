"""Xen (libvirt's libxl driver): the XML and the calls chosen by the driver, and what libxl cannot do refused.

The fakes behave as libxl was seen to behave on Xen 4.17 + libvirt 9.0 (tests/unit/fakevirt.py: no
detachDeviceAlias, no DEVICE_REMOVED, pciback keeping its slot); the domain XML is a real PV guest's
live XML (tests/golden/xen-pv-live.xml). The same flows run for real in tests/xen against the Xen lab.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import libvirt
import pytest
from lxml import etree

from tests.conftest import GOLDEN, golden
from tests.unit.fakevirt import FakeConnection, FakeDomain, libvirt_error
from tests.unit.test_host_usage import build_host
from tests.unit.test_passthrough import FakeWatch
from vhotplug import errors, templates
from vhotplug.addresses import parse_bdf, parse_usb_spec
from vhotplug.devices.disk import disk_spec, disk_xml
from vhotplug.devices.nic import nic_spec, nic_xml
from vhotplug.guest.watch import Identity
from vhotplug.host import journal, pciback
from vhotplug.ops import attach as attach_mod
from vhotplug.ops import check, detach, passthrough, prepare, vcpu
from vhotplug.virt.devices import find_device
from vhotplug.virt.flavor import QEMU, XEN, flavor_for_driver, xen_guest_kind, xen_passthrough_on

LIVE = libvirt.VIR_DOMAIN_AFFECT_LIVE
CONFIG = libvirt.VIR_DOMAIN_AFFECT_CONFIG
PV_XML = (GOLDEN / "xen-pv-live.xml").read_text()
E1000E = parse_bdf("00:04.0")  # test_host_usage's fixture host: an e1000e the host does not use


def pv_xml(*, passthrough_on: bool = True, pvh: bool = False) -> str:
    root = etree.fromstring(PV_XML.encode())
    if not passthrough_on:
        features = root.find("features")
        features.getparent().remove(features)
    if pvh:
        os_type = root.find("os/type")
        os_type.text, os_type.attrib["machine"] = "xenpvh", "xenpvh"
    return etree.tostring(root, encoding="unicode")


@pytest.fixture(autouse=True)
def dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("VHOTPLUG_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("VHOTPLUG_RUN_DIR", str(tmp_path / "run"))
    return tmp_path


def xen_conn(xml: str = PV_XML) -> tuple[FakeConnection, FakeDomain]:
    conn = FakeConnection(uri="xen:///system", driver="Xen")
    return conn, conn.add_domain(xml=xml, name="pv1")


# -- the driver decides ------------------------------------------------------------------------------------


def test_flavor_by_driver_name():
    assert flavor_for_driver("Xen") is XEN
    assert flavor_for_driver("QEMU") is QEMU
    assert flavor_for_driver("Test") is QEMU  # the test driver's XML is QEMU's


def test_guest_kind_and_passthrough_read_from_the_xml():
    assert (xen_guest_kind(PV_XML), xen_passthrough_on(PV_XML)) == ("pv", True)
    assert (xen_guest_kind(pv_xml(pvh=True)), xen_passthrough_on(pv_xml(passthrough_on=False))) == ("pvh", False)


# -- NICs ----------------------------------------------------------------------------------------------------


def test_xen_nic_is_a_bridge_netfront_with_a_xen_mac():
    spec = nic_spec(bridge="xenbr0", id="n1", flavor=XEN)
    el = nic_xml(spec)
    assert el.find("model") is None and spec.mac.startswith("00:16:3e:")
    golden("nic-xen-bridge.xml", templates.tostring(nic_xml(nic_spec(bridge="xenbr0", id="n1", mac="00:16:3e:00:00:01",
                                                                      flavor=XEN))))
    assert nic_spec(bridge="xenbr0", model="netfront", flavor=XEN).model is None  # its one model, by name


def test_xen_nic_refusals():
    with pytest.raises(errors.Unsupported, match="user-mode networking") as info:
        nic_spec(user=True, flavor=XEN)
    assert info.value.exit_code == errors.ExitCode.UNSUPPORTED and "--bridge" in (info.value.hint or "")
    with pytest.raises(errors.InvalidRequest, match="needs a source"):
        nic_spec(flavor=XEN)
    for model in ("virtio", "e1000", "rtl8139"):
        with pytest.raises(errors.Unsupported, match=f"emulate the NIC model '{model}'"):
            nic_spec(bridge="xenbr0", model=model, flavor=XEN)


def test_qemu_nic_unchanged():
    spec = nic_spec(id="n1")
    assert (spec.model, spec.source_type) == ("virtio", "user") and spec.mac.startswith("52:54:00:")


# -- disks ---------------------------------------------------------------------------------------------------


def test_xen_disk_is_phy_on_the_xen_bus_found_by_name(tmp_path):
    img = tmp_path / "d.img"
    img.write_bytes(b"\0" * 4096)
    spec = disk_spec(path=img, size=None, id="d1", used_targets=["xvda"], image_dir=tmp_path, flavor=XEN)
    assert (spec.bus, spec.target, spec.driver, spec.guest_serial) == ("xen", "xvdb", "phy", False)
    el = disk_xml(spec)
    assert el.find("driver").attrib == {"name": "phy"} and el.find("serial") is None
    assert detach.identity_of(find_device(_with_device(el), "ua-d1")[0], el) == Identity("blockdev", "xvdb")


def _with_device(el: etree._Element) -> str:
    root = etree.fromstring(PV_XML.encode())
    root.find("devices").append(el)
    return etree.tostring(root, encoding="unicode")


def test_xen_disk_refusals(tmp_path):
    qcow = tmp_path / "q.img"
    qcow.write_bytes(b"QFI\xfb" + b"\0" * 508)
    with pytest.raises(errors.Unsupported, match="qcow2") as info:
        disk_spec(path=qcow, size=None, image_dir=tmp_path, flavor=XEN)
    assert "qemu-img convert -O raw" in (info.value.hint or "")
    for bus in ("virtio", "scsi", "sata", "usb"):
        with pytest.raises(errors.Unsupported, match=f"on the {bus} bus"):
            disk_spec(path=qcow, size=None, bus=bus, image_dir=tmp_path, flavor=XEN)
    with pytest.raises(errors.InvalidRequest, match="invalid target 'vdb'"):
        disk_spec(path=None, size="64M", target="vdb", image_dir=tmp_path / "new", flavor=XEN)


def test_remote_disk_path_is_not_looked_at_here_nor_created(tmp_path):
    spec = disk_spec(path=Path("/var/lib/xen/absent-here.img"), size=None, image_dir=tmp_path, flavor=XEN,
                     local=False)
    assert (str(spec.path), spec.source_type, spec.fmt) == ("/var/lib/xen/absent-here.img", "file", "raw")
    assert disk_spec(path=Path("/dev/vg/lv"), size=None, image_dir=tmp_path, flavor=XEN, local=False).source_type \
        == "block"
    with pytest.raises(errors.InvalidRequest, match="absolute path there"):
        disk_spec(path=Path("rel.img"), size=None, image_dir=tmp_path, flavor=XEN, local=False)
    with pytest.raises(errors.InvalidRequest, match="--size creates the image on this machine"):
        disk_spec(path=None, size="64M", image_dir=tmp_path, flavor=XEN, local=False)


# -- detach without an alias API or removal events ----------------------------------------------------------


def test_detach_by_xml_confirmed_in_the_live_xml():
    conn, dom = xen_conn()
    dom.attachDeviceFlags(etree.tostring(nic_xml(nic_spec(bridge="xenbr0", id="n1", flavor=XEN)),
                                         encoding="unicode"), LIVE | CONFIG)
    outcome = detach.detach_device(conn, dom, "n1", live=True, config=True, session=None, timeout=5)
    assert outcome.live and outcome.config and outcome.libvirt_seconds is not None
    assert not dom.live.xpath("devices/interface[alias/@name='ua-n1']")
    assert not dom.config.xpath("devices/interface[alias/@name='ua-n1']")
    assert "domain.detach" in conn.rec.calls  # by XML: the alias API would have raised NO_SUPPORT


def test_detach_that_does_not_happen_times_out_instead_of_waiting_for_an_event():
    conn, dom = xen_conn()
    dom.hold_unplug = True
    with pytest.raises(errors.Timeout, match=r"still in the live XML 0\.3 s after the detach call returned"):
        detach.detach_live(conn, dom, "ua-mgmt", timeout=0.3)


def test_config_removal_by_xml():
    conn, dom = xen_conn()
    detach.remove_from_config(conn, dom, "ua-mgmt")
    assert not dom.config.xpath("devices/interface") and dom.live.xpath("devices/interface")
    detach.remove_from_config(conn, dom, "ua-mgmt")  # gone already: nothing to do


# -- PCI passthrough ----------------------------------------------------------------------------------------


def xen_flow(monkeypatch, xml: str = PV_XML):
    conn, dom = xen_conn(xml)
    dev = conn.add_pci(E1000E, driver="e1000e", group=None, stub="pciback")
    monkeypatch.setattr(attach_mod, "start_watch", lambda *a, **k: FakeWatch(conn.rec))
    released: list[str] = []

    def release(uri, bdf):  # stands in for the write to pciback/remove_slot on the Xen host
        conn.rec.hit("pciback.release")
        released.append(f"{uri} {bdf}")
        dev.pciback_slot = False

    monkeypatch.setattr(pciback, "release", release)
    return conn, dom, dev, released


def plan(conn, dom, hostroot=None, **kw):
    return passthrough.plan_pci(conn, dom, E1000E, managed=False, id="pci0", force=False, facts_root=hostroot,
                                live=True, facts_note="test", **kw)


@pytest.fixture
def dom0(tmp_path: Path) -> Path:
    """The fixture host's tree as a Xen dom0 sees it: no IOMMU groups (Xen owns the IOMMU)."""
    root = tmp_path / "dom0"
    build_host(root)
    shutil.rmtree(root / "sys/kernel/iommu_groups")
    return root


def test_xen_passthrough_round_trip_gives_the_function_back_to_its_driver(monkeypatch, dom0):
    conn, dom, dev, released = xen_flow(monkeypatch)
    p = plan(conn, dom, dom0)
    assert p.element.find("address") is None  # no q35 placement: Xen picks the guest address
    outcome = passthrough.attach_hostdev(conn, dom, p, flags=LIVE, session=object(), timeout=5, uri="xen:///system")
    assert outcome.host_detached and dev.driver == "pciback"
    result = passthrough.detach_hostdev(conn, dom, "pci0", find_device(dom.XMLDesc(0), "ua-pci0")[1], live=True,
                                        config=False, session=None, timeout=5, keep_detached=False,
                                        uri="xen:///system")
    assert result.reattached and result.driver_now == "e1000e" and dev.driver == "e1000e"
    assert released == ["xen:///system 0000:00:04.0"]
    calls = conn.rec.calls
    assert calls.index("pciback.release") < calls.index("nodedev.reattach")
    assert journal.entries() == []


def test_without_the_slot_release_the_function_would_stay_on_pciback(monkeypatch):
    # The fake is honest about what libxl does: this is the failure the release step prevents.
    _conn, _dom, dev, _ = xen_flow(monkeypatch)
    dev.detachFlags(None, 0)
    dev.reAttach()
    assert dev.driver == "pciback"


def test_failed_xen_attach_is_rolled_back_onto_the_host_driver(monkeypatch, dom0):
    conn, dom, dev, released = xen_flow(monkeypatch)
    before = dom.snapshot()
    p = plan(conn, dom, dom0)
    conn.rec.fail_names["guest.verify"] = errors.Timeout("injected: the guest never showed it")
    with pytest.raises(errors.Timeout):
        passthrough.attach_hostdev(conn, dom, p, flags=LIVE, session=object(), timeout=5, uri="xen:///system")
    assert dev.driver == "e1000e" and released and dom.snapshot() == before and journal.entries() == []


def test_pvh_guest_refused(monkeypatch):
    conn, dom, _dev, _ = xen_flow(monkeypatch, pv_xml(pvh=True))
    with pytest.raises(errors.Unsupported, match="PVH guest") as info:
        plan(conn, dom)
    assert info.value.exit_code == errors.ExitCode.UNSUPPORTED and "nodedev.detach" not in conn.rec.calls


def test_running_guest_without_passthrough_refused_naming_prepare(monkeypatch):
    conn, dom, dev, _ = xen_flow(monkeypatch, pv_xml(passthrough_on=False))
    with pytest.raises(errors.Unsupported, match="started without PCI passthrough") as info:
        plan(conn, dom)
    assert "vhotplug prepare pv1 --xen-passthrough" in (info.value.hint or "")
    assert dev.driver == "e1000e"


def test_usb_passthrough_refused_on_xen():
    conn, dom = xen_conn()
    with pytest.raises(errors.Unsupported, match="USB device"):
        passthrough.plan_usb(conn, dom, parse_usb_spec("0627:0001"), id=None, force=False, facts_root=None)


# -- pciback's slot list on the host -------------------------------------------------------------------------


def test_release_local_removes_only_a_listed_slot(tmp_path):
    d = tmp_path / "pciback"
    d.mkdir()
    (d / "slots").write_text("0000:00:04.0\n0000:02:00.0\n")
    assert pciback.release_local(E1000E, d) is True
    assert (d / "remove_slot").read_text() == "0000:00:04.0\n"
    (d / "remove_slot").unlink()
    assert pciback.release_local(parse_bdf("03:00.0"), d) is False and not (d / "remove_slot").exists()
    assert pciback.release_local(E1000E, tmp_path / "no-pciback") is False


def test_remote_release_needs_an_ssh_uri():
    with pytest.raises(errors.Unsupported, match="not reached over SSH") as info:
        pciback.release("xen+tls://xenhost/system", E1000E)
    assert "xl pci-assignable-remove -r 0000:00:04.0" in (info.value.hint or "")


# -- check, prepare, vCPUs -----------------------------------------------------------------------------------


def rows(xml: str, *, config: str | None = None, cap: int | None = None) -> dict[str, check.Row]:
    found = check.evaluate_domain("pv1", check.domain_facts(xml), check.domain_facts(config) if config else None,
                                  XEN, cap)
    return {r.item: r for r in found}


def test_check_rows_for_a_pv_guest():
    r = rows(PV_XML, cap=2)
    assert [i for i, row in r.items() if row.ok] == ["pci", "nic", "disk", "vcpu", "balloon"]
    assert [i for i, row in r.items() if not row.ok] == ["memory", "usb", "scsi"]
    assert "balloon" in r["memory"].fix and r["vcpu"].facts["room"] == 1  # 1 of 4, but 2 host CPUs
    assert "at most 2 while running" in r["vcpu"].detail


def test_check_tells_how_to_get_passthrough():
    r = rows(pv_xml(passthrough_on=False))
    assert not r["pci"].ok and "--xen-passthrough" in r["pci"].fix
    r = rows(pv_xml(passthrough_on=False), config=PV_XML)  # prepared, not restarted
    assert "stop and start" in r["pci"].fix
    assert not rows(pv_xml(pvh=True))["pci"].ok


def test_prepare_xen_passthrough_once():
    root = prepare.parse_xml(pv_xml(passthrough_on=False))
    req = prepare.make_request(xen_passthrough=True)
    first = prepare.plan(root, req)
    assert [str(c) for c in first.changes] == ["xen passthrough: default -> on"]
    assert xen_passthrough_on(first.root)
    assert prepare.plan(first.root, req).changes == []


def test_prepare_refuses_what_xen_has_no_room_for():
    with pytest.raises(errors.Unsupported, match="memory devices"):
        prepare.check_request(prepare.make_request(slots=2), XEN, "pv1")
    with pytest.raises(errors.Unsupported, match="--pcie-ports"):
        prepare.check_request(prepare.make_request(pcie_ports=2), XEN, "pv1")
    with pytest.raises(errors.InvalidRequest, match="for Xen domains"):
        prepare.check_request(prepare.make_request(xen_passthrough=True), QEMU, "vm1")


class CapConn(FakeConnection):
    def getMaxVcpus(self, kind):
        return 2


def test_vcpu_cap_is_the_hosts_cpus_on_xen_only():
    with pytest.raises(errors.InvalidRequest, match=r"exceed the 2 that Xen \(libxl\) allows"):
        vcpu.check_host_cap(CapConn(driver="Xen"), 3)
    vcpu.check_host_cap(CapConn(driver="Xen"), 2)
    vcpu.check_host_cap(CapConn(driver="QEMU"), 3)


def test_libxl_attach_failure_points_at_its_log(monkeypatch):
    conn, dom = xen_conn()

    def refuse(xml: str, flags: int) -> None:
        raise libvirt_error("internal error: libxenlight failed to attach network device",
                            libvirt.VIR_ERR_INTERNAL_ERROR)

    monkeypatch.setattr(dom, "attachDeviceFlags", refuse)
    with pytest.raises(errors.VhotplugError) as info:
        attach_mod.attach_device(conn, dom, nic_xml(nic_spec(bridge="nobr0", flavor=XEN)), flags=LIVE, identity=None,
                                 session=None, timeout=5)
    assert "libxl-driver.log" in (info.value.hint or "")
