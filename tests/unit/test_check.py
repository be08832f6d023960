"""``check``: facts and rows from domain XML, the guest script's output parsed and judged, and the command
through libvirt's test driver."""

from __future__ import annotations

import subprocess

import pytest
from lxml import etree

from tests.conftest import GOLDEN
from vhotplug.errors import ExitCode
from vhotplug.ops import check as c
from vhotplug.ops import prepare as p

PLAIN = (GOLDEN / "prepare-plain-q35.xml").read_text()
LAB_LIVE = (GOLDEN / "lab-live-q35.xml").read_text()
NODE_URI = f"test://{GOLDEN / 'prepare-node.xml'}"
FULL = p.PrepareRequest(max_vcpus=4, max_memory_kib=2 << 20, slots=4, pcie_ports=4)

# What GUEST_SCRIPT printed in the lab guest (kernel from an initramfs: no config file), after prepare.
SYSFS_OUT = """[kernel]
release 6.1.0-56-amd64
[sysfs]
pci_slots 40
pciehp yes
acpiphp yes
memory yes
memory_blocks 5
cpu_online_files 1
cpuhp_states yes
cpus_present 0-1
cpus_possible 0-3
"""

# The Debian 12 kernel's config, as the script's grep leaves it.
CONFIG_OUT = """[kernel]
release 6.1.0-56-amd64
[config /boot/config-6.1.0-56-amd64]
CONFIG_HOTPLUG_CPU=y
CONFIG_ACPI_HOTPLUG_CPU=y
CONFIG_ACPI_HOTPLUG_MEMORY=y
CONFIG_MEMORY_HOTPLUG=y
# CONFIG_MEMORY_HOTPLUG_DEFAULT_ONLINE is not set
CONFIG_MEMORY_HOTREMOVE=y
CONFIG_HOTPLUG_PCI_PCIE=y
CONFIG_HOTPLUG_PCI=y
CONFIG_HOTPLUG_PCI_ACPI=y
[sysfs]
pci_slots 3
pciehp yes
acpiphp yes
memory yes
memory_blocks 4
cpu_online_files 0
cpuhp_states yes
cpus_present 0
cpus_possible 0-3
"""


def rows(xml: str, config: str | None = None, name: str = "dom") -> dict[str, c.Row]:
    facts = c.domain_facts(xml)
    return {r.item: r for r in c.evaluate_domain(name, facts, c.domain_facts(config) if config else None)}


def prepared_plain() -> str:
    return p.to_text(p.plan(p.parse_xml(PLAIN), FULL).root)


# -- libvirt's side -----------------------------------------------------

def test_facts_of_the_plain_lab():
    f = c.domain_facts(PLAIN)
    assert (f.pcie, f.machine, f.free_root_ports, f.free_bridge_slots) == (True, "pc-q35-7.2", 1, 31)
    assert (f.vcpus_current, f.vcpus_max, f.memory_kib) == (1, 1, 512 * 1024)
    assert (f.max_memory_kib, f.slots, f.slots_used, f.numa_cells) == (None, 0, 0, 0)
    assert (f.balloon, f.usb, f.scsi) == ("virtio", ["qemu-xhci"], ["virtio-scsi"])


def test_plain_lab_rows_say_what_to_do():
    r = rows(PLAIN, name="vhl")
    assert [x.status for x in r.values()] == ["ok", "not possible", "not possible", "ok", "ok", "ok"]
    assert r["vcpu"].detail.startswith("1/1 vCPUs") and "vhotplug prepare vhl --max-vcpus 4" in r["vcpu"].fix
    assert "no <maxMemory>" in r["memory"].detail
    assert "vhotplug prepare vhl --max-memory 2G --slots 4" in r["memory"].fix
    assert r["memory"].facts["max_memory_kib"] is None and r["memory"].facts["numa_cells"] == 0
    assert r["pci"].facts["free_root_ports"] == 1


def test_prepared_definition_rows_are_all_ok():
    r = rows(prepared_plain())
    assert all(x.ok for x in r.values()), [x.to_dict() for x in r.values() if not x.ok]
    assert r["vcpu"].facts == {"current": 1, "max": 4, "room": 3}
    assert r["memory"].facts["slots_free"] == 4 and r["memory"].facts["room_kib"] == (2048 - 512) * 1024
    assert r["pci"].facts["free_root_ports"] == 4


def test_running_but_not_restarted_is_told_to_restart():
    r = rows(PLAIN, config=prepared_plain())
    for item in ("vcpu", "memory"):
        assert not r[item].ok and "stop and start the domain" in r[item].fix, item


def test_no_free_root_port():
    root = etree.fromstring(PLAIN.encode())
    etree.SubElement(root.xpath("devices/controller[@index='6']")[0], "target", hotplug="off")
    r = rows(etree.tostring(root, encoding="unicode"), name="vhl")["pci"]
    assert not r.ok and "no free pcie-root-port" in r.detail
    assert r.fix.startswith("vhotplug prepare vhl --pcie-ports 4")


def test_memory_without_numa_and_with_full_slots():
    no_numa = PLAIN.replace("<memory unit='KiB'>", "<maxMemory slots='1' unit='KiB'>1048576</maxMemory>"
                                                    "<memory unit='KiB'>")
    r = rows(no_numa)["memory"]
    assert not r.ok and "no NUMA cell" in r.detail
    root = p.parse_xml(prepared_plain())
    for _ in range(4):
        dimm = etree.SubElement(root.find("devices"), "memory", model="dimm")
        etree.SubElement(etree.SubElement(dimm, "target"), "size", unit="KiB").text = "131072"
    root.find("memory").text = str(512 * 1024 + 4 * 131072)
    r = rows(p.to_text(root), name="vhl")["memory"]
    assert not r.ok and "every DIMM slot is used" in r.detail and "--slots 8" in r.fix
    assert r.facts["slots_used"] == 4 and r.facts["slots_free"] == 0


def test_no_balloon_usb_scsi():
    root = p.parse_xml(PLAIN)
    for el in root.xpath("devices/controller[@type='usb' or @type='scsi'] | devices/memballoon"):
        el.getparent().remove(el)
    r = rows(p.to_text(root))
    for item, fix in (("balloon", "memballoon"), ("usb", "qemu-xhci"), ("scsi", "virtio-scsi")):
        assert not r[item].ok and fix in r[item].fix, item


def test_pc_machine_counts_conventional_slots():
    xml = ("<domain><name>d</name><memory>524288</memory><vcpu current='1'>2</vcpu>"
           "<os><type machine='pc-i440fx-7.2'>hvm</type></os>"
           "<devices><controller type='pci' index='0' model='pci-root'/></devices></domain>")
    r = rows(xml)["pci"]
    assert r.ok and r.facts["pcie"] is False and r.facts["free_conventional_slots"] == 31


def test_the_running_lab_is_ready():
    r = rows(LAB_LIVE)
    assert all(x.ok for x in r.values())
    assert r["pci"].facts["free_root_ports"] == 8 and r["memory"].facts["slots"] == 4


# -- the guest's side ---------------------------------------------------

def test_parse_sysfs_only():
    k = c.parse_guest(SYSFS_OUT)
    assert k.release == "6.1.0-56-amd64" and k.config_source is None and k.config == {}
    assert k.sysfs["pciehp"] == "yes" and k.sysfs["cpus_possible"] == "0-3"
    assert k.to_dict()["source"] == "sysfs"


def test_sysfs_evidence_rows():
    r = {x.item: x for x in c.evaluate_guest(c.parse_guest(SYSFS_OUT))}
    assert list(r) == ["guest-pci", "guest-memory", "guest-cpu"]
    assert all(x.ok and x.facts["source"] == "sysfs" for x in r.values())
    assert "pciehp and acpiphp" in r["guest-pci"].detail and r["guest-pci"].facts["pci_slots"] == 40
    assert r["guest-memory"].facts["memory_blocks"] == 5
    assert "up to 4 CPU(s)" in r["guest-cpu"].detail


def test_sysfs_without_evidence():
    out = ("[kernel]\nrelease 4.0\n[sysfs]\npci_slots 0\npciehp no\nacpiphp no\nmemory no\nmemory_blocks 0\n"
           "cpu_online_files 0\ncpuhp_states no\ncpus_present 0\ncpus_possible 0\n")
    r = {x.item: x for x in c.evaluate_guest(c.parse_guest(out))}
    assert not any(x.ok for x in r.values())
    assert "CONFIG_MEMORY_HOTPLUG" in r["guest-memory"].fix and "CONFIG_HOTPLUG_CPU" in r["guest-cpu"].fix
    assert "pciehp" in r["guest-pci"].fix


def test_config_is_preferred_over_sysfs():
    k = c.parse_guest(CONFIG_OUT)
    assert k.config_source == "/boot/config-6.1.0-56-amd64"
    assert k.option("CONFIG_HOTPLUG_PCI_PCIE") == "y" and k.option("CONFIG_MEMORY_HOTPLUG_DEFAULT_ONLINE") == "n"
    assert k.option("CONFIG_HOTPLUG") == "absent"  # merged into the kernel in 3.7
    assert set(k.to_dict()["config"]) == set(c.KERNEL_OPTIONS)
    r = {x.item: x for x in c.evaluate_guest(k)}
    assert all(x.ok for x in r.values())
    assert "CONFIG_HOTPLUG_PCI_PCIE=y" in r["guest-pci"].detail and "/boot/config-" in r["guest-pci"].detail
    assert "DIMMs can be removed" in r["guest-memory"].detail


@pytest.mark.parametrize("line, item", [("# CONFIG_HOTPLUG_PCI is not set", "guest-pci"),
                                        ("# CONFIG_ACPI_HOTPLUG_MEMORY is not set", "guest-memory"),
                                        ("CONFIG_HOTPLUG_CPU=n", "guest-cpu")])
def test_config_missing_option(line, item):
    key = line.lstrip("# ").split("=")[0].split()[0]
    out = "\n".join(line if x.startswith(key + "=") else x for x in CONFIG_OUT.splitlines())
    r = {x.item: x for x in c.evaluate_guest(c.parse_guest(out))}
    assert not r[item].ok and "=n" in r[item].detail and r[item].fix
    assert sum(x.ok for x in r.values()) == 2


def test_old_kernel_without_hotplug():
    out = CONFIG_OUT.replace("[sysfs]", "# CONFIG_HOTPLUG is not set\n[sysfs]")
    assert not any(x.ok for x in c.evaluate_guest(c.parse_guest(out)))


def test_guest_script_runs_under_a_plain_posix_shell():
    """The script is fixed text for busybox sh; dash (stricter) must run it and give parseable output."""
    done = subprocess.run(["sh", "-c", c.GUEST_SCRIPT], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    k = c.parse_guest(done.stdout)
    assert k.release and {"pciehp", "acpiphp", "memory", "cpuhp_states"} <= set(k.sysfs)
    assert len(c.evaluate_guest(k)) == 3


# -- the command (libvirt's test driver) -------------------------------------

def test_cli_json_rows_and_unreachable_guest(cli):
    doc = cli("-c", NODE_URI, "-o", "json", "check", "plainvm").json()
    assert doc["domain"] == "plainvm" and doc["running"] and doc["xml"] == "live"
    by = {r["item"]: r for r in doc["rows"]}
    assert by["vcpu"]["status"] == "not possible" and by["vcpu"]["facts"]["max"] == 1
    assert by["balloon"]["status"] == "not possible" and by["usb"]["status"] == "ok"
    # The metadata names the guest but it cannot be reached: reported, not fatal.
    assert by["guest"]["status"] == "unknown" and "guest not checked" in by["guest"]["detail"]
    assert doc["guest"] is None


def test_cli_no_guest_and_table(cli):
    r = cli("-c", NODE_URI, "check", "plainvm", "--no-guest")
    assert r.code == 0, r.err
    assert "Hot-plug readiness of plainvm (live)" in r.out and "WHAT TO DO" in r.out
    assert "vhotplug prepare plainvm --max-vcpus 4" in r.out and "guest not checked" not in r.out


def test_cli_explicit_ssh_failure_is_an_error(cli, tmp_path):
    known = tmp_path / "known_hosts"
    known.write_text("")
    r = cli("-c", NODE_URI, "check", "plainvm", "--ssh", "root@127.0.0.1:1", "--known-hosts", str(known))
    assert r.code == ExitCode.GUEST_UNREACHABLE, r.err
    assert "Traceback" not in r.err


def test_cli_unknown_domain(cli):
    assert cli("-c", NODE_URI, "check", "nosuch").code == ExitCode.NOT_FOUND
