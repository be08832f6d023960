"""``host list``: node device XML, ids files, the merge with sysfs facts, the CLI, and the real host (read-only)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import libvirt
import pytest

from tests.unit.test_host_usage import FakeHost, build_host, default_route_iface, root_fs_pci_function
from vhotplug.addresses import match_usb, parse_bdf, parse_usb_spec
from vhotplug.host import inventory
from vhotplug.host.inventory import IdsDb, build_inventory, host_inventory, is_local_uri, parse_nodedev_xml
from vhotplug.host.sysfs import Sysfs
from vhotplug.host.usage import assignments_from_xml

PCI_XML = """<device>
  <name>pci_0000_06_10_1</name>
  <path>/sys/devices/pci0000:00/0000:06:10.1</path>
  <parent>computer</parent>
  <driver><name>igbvf</name></driver>
  <capability type='pci'>
    <class>0x020000</class>
    <domain>0</domain><bus>6</bus><slot>16</slot><function>1</function>
    <product id='0x10ca'>82576 Virtual Function</product>
    <vendor id='0x8086'>Intel Corporation</vendor>
    <iommuGroup number='12'>
      <address domain='0x0000' bus='0x06' slot='0x10' function='0x1'/>
      <address domain='0x0000' bus='0x06' slot='0x10' function='0x0'/>
    </iommuGroup>
  </capability>
</device>"""


def _pci_nodedev(bdf: str, klass: int, vendor: int = 0x8086, product: int = 0x1234, group: int | None = None) -> str:
    b = parse_bdf(bdf)
    iommu = (f"<iommuGroup number='{group}'><address domain='0x{b.domain:04x}' bus='0x{b.bus:02x}' "
             f"slot='0x{b.slot:02x}' function='0x{b.function:x}'/></iommuGroup>") if group is not None else ""
    return (f"<device><name>{b.nodedev_name}</name><parent>computer</parent><capability type='pci'>"
            f"<class>0x{klass:06x}</class><domain>{b.domain}</domain><bus>{b.bus}</bus><slot>{b.slot}</slot>"
            f"<function>{b.function}</function><product id='0x{product:04x}'/><vendor id='0x{vendor:04x}'/>"
            f"{iommu}</capability></device>")


USB_NODEDEV = """<device><name>usb_2_1</name><parent>computer</parent><capability type='usb_device'>
  <bus>2</bus><device>4</device><product id='0x5567'>Cruzer Blade</product><vendor id='0x0781'>SanDisk Corp.</vendor>
</capability></device>"""

DOMAINS = """
<domain type='test'><name>hd</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>
  <os><type arch='x86_64'>hvm</type></os>
  <devices>
    <hostdev mode='subsystem' type='pci' managed='yes'>
      <source><address domain='0x0000' bus='0x02' slot='0x00' function='0x0'/></source>
    </hostdev>
  </devices>
</domain>"""


def _add_usb_stick(h: FakeHost) -> None:
    """A USB stick on bus 2 (usb-storage), its disk sdb1 mounted at /media/stick."""
    xhci = h.pci("0000:00:14.0", 0x0C0330, driver="xhci_hcd", group=30)
    dev = xhci / "usb2" / "2-1"
    for name, value in (("busnum", "2"), ("devnum", "4"), ("idVendor", "0781"), ("idProduct", "5567"),
                        ("bDeviceClass", "00")):
        h._write(dev / name, value)
    intf = dev / "2-1:1.0"
    h._write(intf / "bInterfaceClass", "08")
    drv = h.root / "sys/bus/usb/drivers/usb-storage"
    drv.mkdir(parents=True)
    h._link(intf / "driver", drv)
    h._link(h.root / "sys/bus/usb/devices/2-1", dev)
    h._link(h.root / "sys/bus/usb/devices/2-1:1.0", intf)
    h.disk(intf / "host1/target1:0:0/1:0:0:0/block/sdb", "8:16", {"sdb1": "8:17"})
    h.mount("8:17", "/media/stick", "/dev/sdb1", "vfat")


@pytest.fixture
def fixture_host(tmp_path: Path) -> tuple[str, Path]:
    """(test-driver URI, sysfs root): node devices matching the fixture tree, a domain holding 02:00.0."""
    root = tmp_path / "root"
    h = build_host(root)
    _add_usb_stick(h)
    h.finish()
    nodes = [_pci_nodedev("0000:00:02.0", 0x010000, 0x1AF4, 0x1042), _pci_nodedev("0000:00:03.0", 0x020000),
             _pci_nodedev("0000:00:04.0", 0x020000), _pci_nodedev("0000:00:1c.0", 0x060400),
             _pci_nodedev("0000:00:1f.2", 0x010601), _pci_nodedev("0000:02:00.0", 0x020000),
             _pci_nodedev("0000:00:14.0", 0x0C0330), USB_NODEDEV]
    node_file = tmp_path / "node.xml"
    node_file.write_text(f"<node>{''.join(nodes)}{DOMAINS}</node>")
    return f"test://{node_file}", root


def test_parse_pci_nodedev():
    node = parse_nodedev_xml(PCI_XML)
    assert node is not None and node.kind == "pci" and node.name == "pci_0000_06_10_1"
    assert str(node.bdf) == "0000:06:10.1" and node.driver == "igbvf" and node.class_code == 0x020000
    assert (node.vendor_id, node.product_id) == (0x8086, 0x10CA)
    assert (node.vendor_name, node.product_name) == ("Intel Corporation", "82576 Virtual Function")
    assert node.iommu_group == 12 and [str(b) for b in node.iommu_members] == ["0000:06:10.0", "0000:06:10.1"]


def test_parse_usb_and_other_nodedevs():
    node = parse_nodedev_xml(USB_NODEDEV)
    assert node is not None and (node.kind, node.bus, node.device, node.vendor_id) == ("usb", 2, 4, 0x0781)
    assert parse_nodedev_xml("<device><name>computer</name><capability type='system'/></device>") is None


def test_ids_files(tmp_path):
    ids = tmp_path / "usr/share/misc/pci.ids"
    ids.parent.mkdir(parents=True)
    ids.write_text("# comment\n1af4  Red Hat, Inc.\n\t1042  Virtio 1.0 block device\n\t\t1af4 1100  QEMU\n"
                   "8086  Intel Corporation\n\t1234  Something\n"
                   "C 01  Mass storage controller\n\t08  Non-Volatile memory controller\n\t\t02  NVM Express\n")
    db = IdsDb(inventory.PCI_IDS_PATHS, Sysfs(tmp_path))
    db.load({0x1AF4})
    assert db.names(0x1AF4, 0x1042) == ("Red Hat, Inc.", "Virtio 1.0 block device")
    assert db.names(0x8086, 0x1234) == (None, None)  # only the vendors asked about are kept
    assert db.class_name(0x0108) == "Non-Volatile memory controller" and db.class_name(0x01) == "Mass storage " \
        "controller"
    assert not IdsDb(inventory.PCI_IDS_PATHS, Sysfs(tmp_path / "none")).available


def test_is_local_uri():
    for uri in ("qemu:///system", "qemu:///session", "qemu+unix:///system", "xen:///system",
                "qemu+ssh://localhost/system"):
        assert is_local_uri(uri), uri
    for uri in ("qemu+ssh://root@lab.example/system", "qemu+tcp://10.0.0.1/system", "test:///default",
                "qemu+ssh://root@127.0.0.1:2222/system"):  # a forward into another machine (the nested lab)
        assert not is_local_uri(uri), uri


def test_inventory_merges_sysfs_and_domains(fixture_host):
    uri, root = fixture_host
    with contextlib.closing(libvirt.open(uri)) as conn:
        inv = host_inventory(conn, root=root)
    by = {d.address: d for d in inv.devices}
    assert by["0000:00:02.0"].host_usages[0].detail == "/ (vda1)" and by["0000:00:02.0"].driver == "virtio-pci"
    assert by["0000:00:02.0"].child_drivers == [] and by["0000:00:02.0"].class_name == "SCSI storage controller"
    assert [u.kind for u in by["0000:00:03.0"].used_by] == ["net", "route"]
    assert by["0000:00:04.0"].used_by == []
    assert by["0000:00:1c.0"].bridge and by["0000:00:1c.0"].class_name == "PCI bridge"
    vfio = by["0000:02:00.0"]
    assert vfio.driver == "vfio-pci" and vfio.host_usages == []
    assert [(u.kind, u.detail) for u in vfio.used_by] == [("domain", "hd (config, live)")]
    sata = by["0000:00:1f.2"]
    assert sata.iommu_group == 5 and [str(m.bdf) for m in sata.iommu_members] == ["0000:00:1f.0", "0000:00:1f.3"]
    stick = by["002.004"]
    assert stick.kind == "usb" and stick.child_drivers == ["usb-storage"] and stick.class_name == "Mass Storage"
    assert [u.detail for u in stick.used_by] == ["/media/stick (sdb1)"]
    assert match_usb(parse_usb_spec("host:0781:5567"), [d.as_usb_device() for d in inv.devices
                                                       if d.kind == "usb"]).nodedev == "usb_2_1"
    assert inv.iommu is not None and inv.iommu.present and inv.facts_root == root
    assert inv.to_dict()["host_facts"] == "snapshot"  # a copy, not this machine's live tree (no temp path shown)


def test_inventory_without_host_facts_is_marked_unchecked():
    node = parse_nodedev_xml(PCI_XML)
    assert node is not None
    inv = build_inventory([node], assignments_from_xml("g", DOMAINS, "live"), None)
    dev = inv.devices[0]
    assert dev.host_usages is None and dev.to_dict()["host_use_checked"] is False
    assert [str(m.bdf) for m in dev.iommu_members] == ["0000:06:10.0"]  # from libvirt's iommuGroup
    assert inv.iommu is not None and inv.iommu.present  # libvirt shows groups only when there is an IOMMU


def test_cli_host_list_json_and_table(cli, fixture_host, monkeypatch):
    uri, root = fixture_host
    monkeypatch.setattr(inventory, "local_root", lambda conn: root)
    doc = cli("-c", uri, "-o", "json", "host", "list", "--pci").json()
    assert doc["iommu"]["present"] is True and all(d["kind"] == "pci" for d in doc["devices"])
    by = {d["address"]: d for d in doc["devices"]}
    assert by["0000:00:02.0"]["used_by"][0] == {"by": "host", "kind": "mount", "detail": "/ (vda1)"}
    assert by["0000:02:00.0"]["used_by"] == [{"by": "domain", "kind": "domain", "detail": "hd (config, live)"}]
    table = cli("-c", uri, "host", "list")
    assert table.code == 0, table.err
    assert "host: mount / (vda1)" in table.out and "domain hd (config, live)" in table.out
    assert "002.004" in table.out and "host: mount /media/stick (sdb1)" in table.out
    assert "5: also 0000:00:1f.0 lpc_ich, 0000:00:1f.3 i801_smbus" in table.out
    usb_only = cli("-c", uri, "-o", "json", "host", "list", "--usb").json()
    assert [d["address"] for d in usb_only["devices"]] == ["002.004"]


def test_cli_test_driver_is_not_this_host(cli, fixture_host):
    uri, _ = fixture_host
    doc = cli("-c", uri, "-o", "json", "host", "list").json()
    assert doc["host_facts"] is None and not any(d["host_use_checked"] for d in doc["devices"])
    assert "host: not checked" in cli("-c", uri, "host", "list").out


# -- the real host, through the machine's libvirtd (read-only) -------------------------------------------------


@pytest.fixture(scope="module")
def real_host_doc():
    try:
        libvirt.openReadOnly("qemu:///system").close()
    except libvirt.libvirtError:
        pytest.skip("qemu:///system is not reachable here")
    return None


def test_real_host_list_flags_root_disk_nic_and_no_iommu(cli, real_host_doc):
    r = cli("-c", "qemu:///system", "-o", "json", "host", "list", "--pci")
    assert r.code == 0, r.err
    doc = r.json()
    by = {d["address"]: d for d in doc["devices"]}
    root_bdf = root_fs_pci_function()
    if root_bdf is not None:
        used = by[root_bdf]["used_by"]
        assert any(u["by"] == "host" and u["kind"] == "mount" and u["detail"].startswith("/ (") for u in used), used
    iface = default_route_iface()
    if iface and (nic := next((a for a in by if a in os.path.realpath(f"/sys/class/net/{iface}")), None)):
        assert {"by": "host", "kind": "route", "detail": f"default route via {iface}"} in by[nic]["used_by"]
    groups = Path("/sys/kernel/iommu_groups")
    has_iommu = groups.is_dir() and any(groups.iterdir())
    assert doc["iommu"]["present"] is has_iommu
    if not has_iommu:
        assert "intel_iommu=on" in doc["iommu"]["hint"]
