"""Hot-plug into a real Xen PV guest through libvirt's libxl driver, with vhotplug commands only (over xen+ssh),
every check made inside the domU (and, for the host side, inside dom0).

The seed's section 1.4 (``xl pci-assignable-add``, ``xl pci-attach``, check in the guest, ``xl pci-detach``)
is :func:`test_seed_plan_1_4_nic_passthrough`; then a vNIC, a disk, vCPUs and the balloon the same way, and
what libxl cannot do, each refused before anything changes. Domain names carry the pytest PID.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator

import libvirt
import pytest
from lxml import etree

from tests.xen.conftest import XenGuest, report
from vhotplug.guest.ssh import GuestSession
from vhotplug.host import journal
from vhotplug.lab import xen
from vhotplug.lab.nested import L1

E1000E = xen.E1000E_BDF
IDS = "{:04x}:{:04x}".format(*xen.E1000E_IDS)  # 8086:10d3


@pytest.fixture(autouse=True)
def own_journal(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VHOTPLUG_STATE_DIR", str(tmp_path / "state"))


def in_domu(guest: XenGuest, script: str) -> str:
    assert guest.info.target is not None
    with GuestSession(guest.info.target) as s:
        return s.run(["sh", "-c", script], timeout=60).stdout


def in_dom0(lab: L1, script: str) -> str:
    with GuestSession(lab.target) as s:
        return s.run(["sh", "-c", script], timeout=60).stdout


# The seed's checks, in the guest: lspci -n (vendor:device of every function), lspci -k / ethtool -i
# (the bound driver), ifconfig (the interface and its state).
LSPCI = r"""
for d in /sys/bus/pci/devices/*; do
  [ -e "$d" ] || continue
  drv=-; [ -e "$d/driver" ] && drv=$(basename "$(readlink "$d/driver")")
  net=-; for n in "$d"/net/*; do [ -e "$n" ] && net="${n##*/}:$(cat "$n/operstate")"; done
  echo "${d##*/} $(cat "$d/vendor" | cut -c3-):$(cat "$d/device" | cut -c3-) $drv $net"
done
"""


def dom0_driver(lab: L1) -> str:
    return in_dom0(lab, f"basename $(readlink /sys/bus/pci/devices/{E1000E}/driver)").strip()


def pciback_slots(lab: L1) -> str:
    return in_dom0(lab, "cat /sys/bus/pci/drivers/pciback/slots 2>/dev/null || true")


def test_check_reports_what_the_xen_guest_can_hotplug(xen_guest: XenGuest, cli) -> None:  # type: ignore[no-untyped-def]
    res = cli("-c", xen_guest.uri, "-o", "json", "check", xen_guest.name)
    assert res.code == 0, res.err
    rows = {r["item"]: r for r in res.json()["rows"]}
    assert {i for i, r in rows.items() if r["ok"] is True} >= {"pci", "nic", "disk", "vcpu", "balloon"}
    assert {i for i in ("memory", "usb", "scsi") if rows[i]["ok"] is False} == {"memory", "usb", "scsi"}
    assert rows["pci"]["facts"] == {"xen_kind": "pv", "passthrough": True}
    assert rows["vcpu"]["facts"]["host_cap"] == 2  # libxl: no more vCPUs than the Xen lab's 2 CPUs
    assert "balloon" in rows["memory"]["fix"]


def test_seed_plan_1_4_nic_passthrough(xen_lab: L1, xen_guest: XenGuest, cli, request) -> None:  # type: ignore[no-untyped-def]
    """xl pci-assignable-add + pci-attach, lspci/ethtool -i/ping -I in the guest, pci-detach: as vhotplug commands."""
    res = cli("-c", xen_guest.uri, "-o", "json", "host", "list", "--pci")
    assert res.code == 0, res.err
    doc = res.json()
    nic = next(d for d in doc["devices"] if d["address"] == E1000E)
    assert (f"{nic['vendor_id']}:{nic['product_id']}", nic["driver"], nic["in_use"]) == (IDS, "e1000e", False)
    assert doc["hypervisor"] == "xen" and doc["iommu_visible_to_host"] is False
    before = in_domu(xen_guest, LSPCI)
    assert IDS not in before

    started = time.monotonic()
    res = cli("-c", xen_guest.uri, "-o", "json", "attach", "pci", xen_guest.name, E1000E, "--id", "pt",
              "--ping", "10.0.2.2", "--timeout", "60")
    assert res.code == 0, res.err
    attach_s = time.monotonic() - started
    att = res.json()["attached"]
    assert att["identity"] == IDS and att["host"]["driver_before"] == "e1000e" and att["host"]["detached_by_vhotplug"]
    assert att["guest"]["driver"] == "e1000e" and att["guest"]["net"].startswith("eth")
    assert att["ping"]["received"] == att["ping"]["sent"] == 3  # ping -I ethN 10.0.2.2, through the passed NIC
    # In the domU, as the seed checks it: the function is there, e1000e bound, its interface up.
    line = next(x for x in in_domu(xen_guest, LSPCI).splitlines() if IDS in x)
    assert line.split()[2] == "e1000e" and line.split()[3] == f"{att['guest']['net']}:up"
    assert dom0_driver(xen_lab) == "pciback"  # xl pci-assignable-add's state

    started = time.monotonic()
    res = cli("-c", xen_guest.uri, "-o", "json", "detach", xen_guest.name, "pt", "--timeout", "60")
    assert res.code == 0, res.err
    det = res.json()["detached"]
    assert det["host"] == {"reattached": True, "driver_now": "e1000e"} and "guest_gone_seconds" in det
    assert IDS not in in_domu(xen_guest, LSPCI)
    assert dom0_driver(xen_lab) == "e1000e"  # back on dom0's own driver, and pciback holds no claim on it
    assert E1000E not in pciback_slots(xen_lab)
    assert journal.entries() == []
    report(request.config, f"Xen plan 1.4 (PCI e1000e into the PV domU): attach+verify+ping {attach_s:.1f} s "
           f"(libvirt {att['libvirt_seconds']:.2f} s, guest saw e1000e bound {att['guest_seen_seconds']:.1f} s after "
           f"it), detach+gone+back on e1000e {time.monotonic() - started:.1f} s")


def test_vnic_hotplug(xen_guest: XenGuest, cli, request) -> None:  # type: ignore[no-untyped-def]
    res = cli("-c", xen_guest.uri, "-o", "json", "attach", "nic", xen_guest.name, "--bridge", "xenbr0", "--id", "vn",
              "--timeout", "60")
    assert res.code == 0, res.err
    att = res.json()["attached"]
    mac = att["identity"]
    assert mac.startswith("00:16:3e:") and att["guest"]["driver"] == "vif"
    names = in_domu(xen_guest, f"grep -l {mac} /sys/class/net/*/address")
    assert f"/sys/class/net/{att['guest']['name']}/address" in names
    res = cli("-c", xen_guest.uri, "-o", "json", "detach", xen_guest.name, "vn", "--timeout", "60")
    assert res.code == 0, res.err
    det = res.json()["detached"]
    assert "guest_gone_seconds" in det
    assert in_domu(xen_guest, f"grep -l {mac} /sys/class/net/*/address || true").strip() == ""
    report(request.config, f"Xen vNIC (netfront on xenbr0): attach {att['libvirt_seconds']:.1f} s, seen "
           f"{att['guest_seen_seconds']:.1f} s after; detach {det['libvirt_seconds']:.1f} s")


@pytest.fixture
def dom0_image(xen_lab: L1) -> Iterator[str]:
    path = f"/var/lib/xen/vh-test-{os.getpid()}.img"
    in_dom0(xen_lab, f"mkdir -p /var/lib/xen && truncate -s 64M {path}")
    yield path
    in_dom0(xen_lab, f"rm -f {path}")


def test_disk_hotplug(xen_guest: XenGuest, dom0_image: str, cli, request) -> None:  # type: ignore[no-untyped-def]
    res = cli("-c", xen_guest.uri, "-o", "json", "attach", "disk", xen_guest.name, dom0_image, "--id", "xd",
              "--timeout", "60")
    assert res.code == 0, res.err
    att = res.json()["attached"]
    name = att["identity"]
    assert re.fullmatch(r"xvd[a-z]", name) and att["guest"] == {**att["guest"], "name": name, "driver": "vbd"}
    sectors = in_domu(xen_guest, f"cat /sys/block/{name}/size").strip()
    assert int(sectors) * 512 == 64 << 20  # the guest's own view, as fdisk -l would show it
    res = cli("-c", xen_guest.uri, "-o", "json", "detach", xen_guest.name, "xd", "--timeout", "60")
    assert res.code == 0, res.err
    det = res.json()["detached"]
    assert in_domu(xen_guest, f"ls /sys/block/{name} 2>/dev/null || echo gone").strip() == "gone"
    report(request.config, f"Xen disk ({name}, phy on a 64 MiB file in dom0): attach {att['libvirt_seconds']:.1f} s, "
           f"seen {att['guest_seen_seconds']:.1f} s after; detach {det['libvirt_seconds']:.1f} s")


def test_vcpu_hotplug(xen_guest: XenGuest, cli, request) -> None:  # type: ignore[no-untyped-def]
    res = cli("-c", xen_guest.uri, "-o", "json", "vcpu", "set", xen_guest.name, "2")
    assert res.code == 0, res.err
    grown = res.json()["vcpus"]
    assert (grown["before"], grown["after"], grown["guest"]["online"]) == (1, 2, "0-1")
    assert in_domu(xen_guest, "cat /sys/devices/system/cpu/online").strip() == "0-1"
    res = cli("-c", xen_guest.uri, "vcpu", "set", xen_guest.name, "3")
    assert res.code == 5 and "exceed the maximum of 2" in res.err, res.err  # its definition's (the host cap: below)
    res = cli("-c", xen_guest.uri, "-o", "json", "vcpu", "set", xen_guest.name, "1")
    assert res.code == 0, res.err
    assert in_domu(xen_guest, "cat /sys/devices/system/cpu/online").strip() == "0"
    report(request.config, f"Xen vCPU 1 -> 2 (onlined in the guest): {grown['seconds']:.2f} s")


def meminfo_kib(guest: XenGuest) -> int:
    return int(in_domu(guest, "sed -n 's/^MemTotal: *\\([0-9]*\\) kB/\\1/p' /proc/meminfo").strip())


def test_balloon(xen_guest: XenGuest, cli) -> None:  # type: ignore[no-untyped-def]
    before = meminfo_kib(xen_guest)
    res = cli("-c", xen_guest.uri, "memory", "balloon", xen_guest.name, "200M")
    assert res.code == 0, res.err
    assert before - meminfo_kib(xen_guest) == 56 << 10  # 256 -> 200 MiB, as the guest counts it
    res = cli("-c", xen_guest.uri, "memory", "balloon", xen_guest.name, "256M")
    assert res.code == 0, res.err
    assert meminfo_kib(xen_guest) == before


@pytest.mark.parametrize("args, says", [
    (["memory", "add", "{dom}", "128M"], "cannot hot-plug memory devices (DIMMs)"),
    (["attach", "usb", "{dom}", "host:0627:0001"], "cannot pass a host USB device through"),
    (["attach", "nic", "{dom}", "--user"], "cannot give a NIC user-mode networking"),
    (["attach", "nic", "{dom}", "--bridge", "xenbr0", "--model", "e1000"], "cannot emulate the NIC model 'e1000'"),
    (["attach", "disk", "{dom}", "/var/lib/xen/x.img", "--bus", "virtio"], "cannot attach a disk on the virtio bus"),
    (["prepare", "{dom}", "--max-memory", "1G"], "cannot hot-plug memory devices"),
])
def test_what_libxl_cannot_do_is_refused(xen_guest: XenGuest, xen_conn: libvirt.virConnect, cli, args, says) -> None:  # type: ignore[no-untyped-def]
    before = xen_conn.lookupByName(xen_guest.name).XMLDesc(0), xen_conn.lookupByName(xen_guest.name).XMLDesc(
        libvirt.VIR_DOMAIN_XML_INACTIVE)
    res = cli("-c", xen_guest.uri, *[a.format(dom=xen_guest.name) for a in args])
    assert res.code == 6, res.err
    assert f"Xen (libxl) {says}" in res.err and "Traceback" not in res.err
    dom = xen_conn.lookupByName(xen_guest.name)
    assert (dom.XMLDesc(0), dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)) == before


def spare_domain_xml(xen_conn: libvirt.virConnect, guest: XenGuest, name: str, *, pvh: bool = False) -> str:
    """A second PV (or PVH) domain from the lab guest's definition: no NIC, no passthrough, no metadata,
    and room for 4 vCPUs (more than the Xen lab's 2 CPUs)."""
    root = etree.fromstring(xen_conn.lookupByName(guest.name).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE).encode())
    root.find("name").text = name
    root.find("vcpu").text = "4"
    for tag in ("uuid", "metadata", "features"):
        for el in root.findall(tag):
            root.remove(el)
    for el in root.findall("devices/interface"):
        el.getparent().remove(el)
    if pvh:
        os_type = root.find("os/type")
        os_type.text, os_type.attrib["machine"] = "xenpvh", "xenpvh"
    return etree.tostring(root, encoding="unicode")


@pytest.fixture
def spare(xen_conn: libvirt.virConnect) -> Iterator[list[libvirt.virDomain]]:
    made: list[libvirt.virDomain] = []
    yield made
    for dom in made:
        if dom.isActive():
            dom.destroy()
        dom.undefine()


def test_pvh_guest_refused_for_passthrough(xen_guest: XenGuest, xen_conn: libvirt.virConnect, spare, cli) -> None:  # type: ignore[no-untyped-def]
    name = f"vhx-pvh-{os.getpid()}"
    spare.append(xen_conn.defineXML(spare_domain_xml(xen_conn, xen_guest, name, pvh=True)))
    res = cli("-c", xen_guest.uri, "attach", "pci", name, E1000E, "--config")
    assert res.code == 6 and "it is a PVH guest" in res.err, res.err
    assert not etree.fromstring(spare[0].XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE).encode()).xpath("//hostdev")


def test_guest_without_passthrough_is_refused_then_prepared(xen_lab: L1, xen_guest: XenGuest,
                                                           xen_conn: libvirt.virConnect, spare, cli, request) -> None:  # type: ignore[no-untyped-def]
    """The 1.4 plan's precondition: a PV guest takes PCI devices live only when started with passthrough on.
    vhotplug refuses (nothing changed), `prepare --xen-passthrough` sets it, and after a restart it works."""
    name = f"vhx-np-{os.getpid()}"
    dom = xen_conn.defineXML(spare_domain_xml(xen_conn, xen_guest, name))
    spare.append(dom)
    dom.create()
    # libxl caps a running guest's vCPUs at the host's CPUs, below this definition's 4: refused by vhotplug.
    res = cli("-c", xen_guest.uri, "vcpu", "set", name, "3", "--no-verify")
    assert res.code == 5 and "exceed the 2 that Xen (libxl) allows a running guest" in res.err, res.err
    res = cli("-c", xen_guest.uri, "attach", "pci", name, E1000E, "--no-verify")
    assert res.code == 6 and "started without PCI passthrough" in res.err, res.err
    assert f"vhotplug prepare {name} --xen-passthrough" in res.err
    assert dom0_driver(xen_lab) == "e1000e"
    res = cli("-c", xen_guest.uri, "-o", "json", "prepare", name, "--xen-passthrough")
    assert res.code == 0, res.err
    assert res.json()["changes"] == [{"what": "xen passthrough", "before": "default", "after": "on"}]
    res = cli("-c", xen_guest.uri, "-o", "json", "check", name, "--no-guest")
    pci = next(r for r in res.json()["rows"] if r["item"] == "pci")
    assert pci["ok"] is False and "stop and start" in pci["fix"]
    dom.destroy()
    dom.create()
    started = time.monotonic()
    res = cli("-c", xen_guest.uri, "-o", "json", "attach", "pci", name, E1000E, "--id", "pt2", "--no-verify")
    assert res.code == 0, res.err
    assert dom0_driver(xen_lab) == "pciback"
    res = cli("-c", xen_guest.uri, "-o", "json", "detach", name, "pt2", "--no-verify")
    assert res.code == 0, res.err
    assert res.json()["detached"]["host"] == {"reattached": True, "driver_now": "e1000e"}
    assert dom0_driver(xen_lab) == "e1000e"
    report(request.config, f"Xen passthrough after prepare + restart: attach+detach {time.monotonic() - started:.1f} s")


def test_libxl_failure_says_where_its_reason_is(xen_lab: L1, xen_guest: XenGuest, xen_conn: libvirt.virConnect,
                                                cli) -> None:  # type: ignore[no-untyped-def]
    """libxl reports only "failed"; vhotplug points at the log that has the reason, and nothing is left attached."""
    res = cli("-c", xen_guest.uri, "attach", "nic", xen_guest.name, "--bridge", "vhnobr0", "--id", "bad")
    assert res.code == 1 and "libxenlight failed to attach network device" in res.err, res.err
    assert "/var/log/libvirt/libxl/libxl-driver.log" in res.err
    assert "Could not find bridge device vhnobr0" in in_dom0(xen_lab, "cat /var/log/libvirt/libxl/libxl-driver.log")
    assert "ua-bad" not in xen_conn.lookupByName(xen_guest.name).XMLDesc(0)
