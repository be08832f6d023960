"""``prepare`` and ``check`` on a real, initially unprepared ("plain") lab domain.

The plain domain refuses vCPU and DIMM hot-add; ``prepare`` changes only its definition;
after a stop and start the same hot-adds succeed, and ``check`` reports each stage the way
libvirt's XML and the guest's sysfs show it.
"""

from __future__ import annotations

import os
import time

import libvirt
import pytest
from lxml import etree

from tests.lab.conftest import URI, report
from vhotplug.errors import ExitCode
from vhotplug.guest.ssh import wait_for_ssh
from vhotplug.guest.target import target_from_metadata
from vhotplug.virt.slots import pci_room

LIVE = libvirt.VIR_DOMAIN_AFFECT_LIVE
DIMM = "<memory model='dimm'><target><size unit='KiB'>131072</size><node>0</node></target></memory>"
PREPARE = ("--max-vcpus", "4", "--max-memory", "2G", "--slots", "4", "--pcie-ports", "4")


def xml(dom: libvirt.virDomain, *, inactive: bool = False) -> etree._Element:
    return etree.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0).encode())


def vcpu(root: etree._Element) -> tuple[str | None, str]:
    el = root.find("vcpu")
    return el.get("current"), el.text


def rows(cli, name: str) -> dict[str, dict]:
    r = cli("-c", URI, "-o", "json", "check", name)
    assert r.code == 0, r.err
    doc = r.json()
    return {row["item"]: row for row in doc["rows"]}


def test_prepare_makes_a_plain_domain_hotplug_ready(cli, conn, request):
    name = f"vhl-plain-{os.getpid()}"
    started = time.monotonic()
    try:
        up = cli("-c", URI, "-o", "json", "lab", "up", "--name", name, "--plain")
        assert up.code == 0, up.err
        assert up.json()["plain"] is True
        report(request.config, f"\nlab {name}: plain, booted to SSH in {up.json()['boot_seconds']:.1f} s")
        dom = conn.lookupByName(name)
        same = cli("-c", URI, "-o", "json", "lab", "up", "--name", name, "--plain")  # the metadata records plain
        assert same.code == 0 and same.json()["already_running"], same.err

        # -- before: libvirt's XML has no room, and check says so -------------------
        live = xml(dom)
        assert live.find("maxMemory") is None and live.find("cpu/numa/cell") is None
        assert vcpu(live) == (None, "1")
        assert pci_room(etree.tostring(live)).free_root_ports in (0, 1)
        r = rows(cli, name)
        assert r["memory"]["status"] == "not possible" and "no <maxMemory>" in r["memory"]["detail"]
        assert r["memory"]["facts"]["max_memory_kib"] is None and r["memory"]["facts"]["numa_cells"] == 0
        assert r["vcpu"]["status"] == "not possible" and r["vcpu"]["facts"] == {"current": 1, "max": 1, "room": 0}
        assert r["pci"]["facts"]["free_root_ports"] in (0, 1)
        assert f"vhotplug prepare {name} --max-vcpus" in r["vcpu"]["fix"]
        # The guest side, from sysfs (the lab kernel has no /boot and no /proc/config.gz).
        assert r["guest-cpu"]["facts"]["source"] == "sysfs" and r["guest-cpu"]["facts"]["cpus_possible"] == "0"
        assert r["guest-memory"]["status"] == "ok" and r["guest-pci"]["status"] == "ok"

        # ... and the unprepared domain refuses both hot-adds.
        with pytest.raises(libvirt.libvirtError, match="greater than max allowable vcpus"):
            dom.setVcpusFlags(2, LIVE)
        with pytest.raises(libvirt.libvirtError, match=r"NUMA|maxMemory"):
            dom.attachDeviceFlags(DIMM, LIVE)

        # -- prepare: the definition changes, the running domain does not ------------
        done = cli("-c", URI, "prepare", name, *PREPARE)
        assert done.code == 0, done.err
        assert "takes effect at the next boot (the running domain is unchanged)" in done.out
        config = xml(dom, inactive=True)
        assert vcpu(config) == ("1", "4")
        assert (config.find("maxMemory").get("slots"), int(config.find("maxMemory").text)) == ("4", 2 << 20)
        assert config.find("maxMemory").get("unit") == "KiB"
        assert config.find("cpu/numa/cell").get("cpus") == "0-3"
        assert pci_room(etree.tostring(config)).free_root_ports >= 4
        live = xml(dom)
        assert live.find("maxMemory") is None and live.find("cpu/numa/cell") is None and vcpu(live) == (None, "1")

        again = cli("-c", URI, "-o", "json", "prepare", name, *PREPARE)
        assert again.code == 0 and again.json()["already_ready"] and not again.json()["defined"]
        assert etree.tostring(xml(dom, inactive=True)) == etree.tostring(config)
        assert "already hotplug-ready" in cli("-c", URI, "prepare", name, *PREPARE).out
        r = rows(cli, name)  # running on the old definition: check says to restart
        assert r["vcpu"]["status"] == "not possible" and "stop and start" in r["vcpu"]["fix"]

        # -- restart: the port forward is in the definition, so the metadata stays valid
        dom.destroy()
        dom.create()
        target = target_from_metadata(dom.XMLDesc(0))
        assert target is not None
        wait_for_ssh(target, deadline=time.monotonic() + 180)

        live = xml(dom)
        assert vcpu(live) == ("1", "4") and live.find("maxMemory").get("slots") == "4"
        r = rows(cli, name)
        assert r["memory"]["status"] == "ok", r["memory"]
        assert r["memory"]["facts"]["slots_free"] == 4 and r["memory"]["facts"]["numa_cells"] == 1
        assert r["memory"]["facts"]["max_memory_kib"] == 2 << 20
        assert r["vcpu"]["status"] == "ok" and r["vcpu"]["facts"] == {"current": 1, "max": 4, "room": 3}
        assert r["pci"]["status"] == "ok" and r["pci"]["facts"]["free_root_ports"] >= 4
        for item in ("guest-pci", "guest-memory", "guest-cpu"):
            assert r[item]["status"] == "ok" and r[item]["facts"]["source"] == "sysfs", r[item]
        assert r["guest-cpu"]["facts"]["cpus_possible"] == "0-3"  # the guest kernel sees the new maximum

        # -- issue 4's acceptance sequence, with vhotplug's own commands, on the prepared domain --
        v = cli("-c", URI, "-o", "json", "vcpu", "set", name, "3")
        assert v.code == 0, v.err
        assert v.json()["vcpus"]["guest"] == {"online": "0-2", "cpuinfo": 3}
        assert dom.vcpusFlags(LIVE) == 3
        m = cli("-c", URI, "-o", "json", "memory", "add", name, "128M", "--id", "prep")
        assert m.code == 0, m.err
        g = m.json()["memory_added"]["guest"]
        assert g["memtotal_after_kib"] - g["memtotal_before_kib"] == 128 * 1024
        r = rows(cli, name)
        assert r["vcpu"]["facts"] == {"current": 3, "max": 4, "room": 1}
        assert r["memory"]["facts"]["slots_used"] == 1 and r["memory"]["facts"]["slots_free"] == 3
        m = cli("-c", URI, "-o", "json", "memory", "remove", name, "prep")
        assert m.code == 0, m.err
        g = m.json()["memory_removed"]["guest"]
        assert g["memtotal_before_kib"] - g["memtotal_after_kib"] == 128 * 1024
        b = cli("-c", URI, "-o", "json", "memory", "balloon", name, "384M")
        assert b.code == 0, b.err
        assert b.json()["balloon"]["guest_memtotal_after_kib"] < b.json()["balloon"]["guest_memtotal_before_kib"]
        v = cli("-c", URI, "vcpu", "set", name, "2", "--timeout", "8")
        assert v.code in (0, ExitCode.INCONSISTENT), v.err  # 12: QEMU 7.2/TCG never confirms a vCPU unplug
    finally:
        down = cli("-c", URI, "lab", "down", "--name", name)
        report(request.config, f"lab {name}: prepare/check test took {time.monotonic() - started:.1f} s "
                               f"({down.out.strip()})")


def test_check_on_the_ready_lab(lab, cli):
    """The default lab is defined hotplug-ready: check agrees, and prepare has nothing to add."""
    r = rows(cli, lab.name)
    assert r["memory"]["facts"]["max_memory_kib"] == 2 << 20 and r["memory"]["facts"]["numa_cells"] == 1
    assert r["vcpu"]["facts"]["max"] == 4 and r["pci"]["facts"]["pcie"] is True
    for item in ("balloon", "usb", "scsi", "guest-pci", "guest-memory", "guest-cpu"):
        assert r[item]["status"] == "ok", r[item]
    assert r["guest-cpu"]["facts"]["cpus_possible"] == "0-3"
    dry = cli("-c", URI, "-o", "json", "prepare", lab.name, "--max-vcpus", "4", "--max-memory", "2G", "--slots", "4",
              "--print-xml").json()
    assert dry["already_ready"] and dry["diff"] == "" and not dry["defined"]
