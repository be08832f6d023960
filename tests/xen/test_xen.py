"""The Xen lab end to end: Xen and its libvirt in dom0, the PV lab guest reached through dom0, the spare
e1000e on dom0's own driver, and `lab up` reusing what runs."""

from __future__ import annotations

import ipaddress
import time
from dataclasses import replace

import libvirt
import pytest
from lxml import etree

from tests.conftest import CliResult
from tests.xen.conftest import XenGuest, report
from vhotplug.guest.ssh import GuestSession
from vhotplug.lab import manager, nested, xen, xenpv
from vhotplug.lab.nested import L1


def test_dom0_runs_xen_and_libvirts_xen_driver(xen_lab: L1, xen_conn: libvirt.virConnect) -> None:
    assert xen_conn.getType() == "Xen"
    assert xen_conn.getHostname() == "vhotplug-xen-dom0"  # dom0's libvirtd, not this machine's
    assert xen_conn.lookupByID(0).name() == "Domain-0"
    assert "Domain-0" in [d.name() for d in xen_conn.listAllDomains(0)]
    assert xen_lab.uri.startswith("xen+ssh://root@127.0.0.1:") and xen_lab.kind == "xen"
    assert 0 < xen_lab.boot_seconds <= xen_lab.libvirt_seconds
    with GuestSession(xen_lab.target) as dom0:
        out = dom0.run(["sh", "-c", "cat /sys/hypervisor/type /sys/hypervisor/version/major "
                                    "/sys/hypervisor/version/minor /proc/sys/net/ipv4/ip_forward"]).stdout.split()
    assert out[:3] == ["xen", *xen.XEN_VERSION.split(".")]
    assert out[3] == "0"  # dom0 routes nothing: its guests reach dom0 and nothing beyond


def test_xen_lab_is_a_lab_domain_on_the_host(xen_lab: L1, host_conn: libvirt.virConnect) -> None:
    labs = {lab.name: lab for lab in manager.list_labs(host_conn)}
    assert (labs[xen_lab.name].kind, labs[xen_lab.name].state, labs[xen_lab.name].uri) == ("xen", "running",
                                                                                            xen_lab.uri)
    found = xen.find_xen(host_conn, xen_lab.name)
    assert found is not None and (found.uri, found.target) == (xen_lab.uri, replace(xen_lab.target,
                                                                                    source="lab metadata"))
    assert nested.find_l1(host_conn, xen_lab.name) is None  # not a nested lab's L1


def test_spare_e1000e_is_on_dom0s_e1000e_driver_at_its_bdf(xen_conn: libvirt.virConnect) -> None:
    dev = etree.fromstring(xen_conn.nodeDeviceLookupByName(xen.E1000E_NODEDEV).XMLDesc(0).encode())
    assert dev.findtext("driver/name") == "e1000e"
    cap = dev.find("capability[@type='pci']")
    ids = (int(cap.find("vendor").get("id"), 16), int(cap.find("product").get("id"), 16))
    assert ids == xen.E1000E_IDS
    bdf = f"{int(cap.findtext('domain')):04x}:{int(cap.findtext('bus')):02x}:{int(cap.findtext('slot')):02x}." \
          f"{int(cap.findtext('function'))}"
    assert bdf == xen.E1000E_BDF
    assert dev.findtext("path").endswith(f"/{xen.E1000E_BDF}")


def test_domu_answers_ssh_through_dom0_and_runs_on_xen(xen_lab: L1, xen_guest: XenGuest) -> None:
    target = xen_guest.info.target
    assert target is not None and target.port == xenpv.SSH_PORT
    assert ipaddress.IPv4Address(target.host) in xenpv.NETWORK and target.host != str(xenpv.GATEWAY)
    assert target.jump is not None
    assert (target.jump.host, target.jump.port, target.jump.key) == (xen_lab.target.host, xen_lab.target.port,
                                                                     xen_lab.target.key)
    with GuestSession(target) as guest:
        kind = guest.run(["cat", "/sys/hypervisor/type"]).stdout.strip()
        addrs = guest.run(["ip", "-o", "-4", "addr", "show"]).stdout
        routes = guest.run(["ip", "-4", "route"]).stdout
        modules = guest.run(["cat", "/proc/modules"]).stdout
    assert kind == "xen"
    assert f"inet {target.host}/16" in addrs
    assert f"default via {xenpv.GATEWAY}" in routes and "10.0.2." not in routes
    assert {"xen_netfront", "xen_blkfront"} <= {line.split()[0] for line in modules.splitlines()}


def test_domu_is_a_pv_lab_guest(xen_guest: XenGuest, xen_conn: libvirt.virConnect) -> None:
    dom = xen_conn.lookupByName(xen_guest.name)
    root = etree.fromstring(dom.XMLDesc(0).encode())
    assert root.get("type") == "xen" and root.find("os/type").get("machine") == "xenpv"
    assert root.find("devices/interface/source").get("bridge") == xenpv.BRIDGE
    (lab,) = [lab for lab in manager.list_labs(xen_conn) if lab.name == xen_guest.name]
    assert (lab.kind, lab.machine, lab.accel, lab.state) == ("guest", "xenpv", "xen", "running")
    assert lab.serial_log == str(xenpv.console_log(xen_guest.name))


def test_lab_up_again_reuses_both(xen_lab: L1, xen_guest: XenGuest, host_conn: libvirt.virConnect,
                                  cli, request: pytest.FixtureRequest) -> None:  # type: ignore[no-untyped-def]
    qemu_id = host_conn.lookupByName(xen_lab.name).ID()
    started = time.monotonic()
    res: CliResult = cli("-o", "json", "lab", "up", "--xen", "--name", xen_lab.name)
    took = time.monotonic() - started
    assert res.code == 0, res.err
    again = res.json()
    assert (again["kind"], again["uri"], again["boot_seconds"]) == ("xen", xen_lab.uri, 0.0)
    assert host_conn.lookupByName(xen_lab.name).ID() == qemu_id  # the same QEMU process, not a reboot
    res = cli("-c", xen_lab.uri, "-o", "json", "lab", "up", "--name", xen_guest.name)
    assert res.code == 0, res.err
    assert res.json()["already_running"] is True and res.json()["ssh"] == str(xen_guest.info.target)
    report(request.config, f"lab up --xen on the running Xen lab (reused): {took:.2f} s")
