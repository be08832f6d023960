"""``prepare``: the pure edits on domain XML (golden plain lab definition), every refusal, idempotence,
and the command through libvirt's test driver."""

from __future__ import annotations

from pathlib import Path

import pytest
from lxml import etree

from tests.conftest import GOLDEN, golden
from vhotplug import errors
from vhotplug.errors import ExitCode
from vhotplug.guest.target import SSHTarget
from vhotplug.lab.domain import LabSpec, build_domain_xml
from vhotplug.ops import prepare as p
from vhotplug.virt.slots import pci_room

PLAIN = (GOLDEN / "prepare-plain-q35.xml").read_text()  # `lab up --plain`, as libvirt 9.0 stores it
NODE_URI = f"test://{GOLDEN / 'prepare-node.xml'}"
FULL = p.PrepareRequest(max_vcpus=4, max_memory_kib=2 << 20, slots=4, pcie_ports=4)


def plain() -> etree._Element:
    return p.parse_xml(PLAIN)


def domain(body: str, *, vcpu: str = "<vcpu>2</vcpu>", memory_mib: int = 512) -> etree._Element:
    """A minimal domain with ``body`` added (cpu, maxMemory, devices...)."""
    return p.parse_xml(f"<domain type='kvm'><name>d</name><memory unit='MiB'>{memory_mib}</memory>{vcpu}"
                       f"<os><type machine='q35'>hvm</type></os>{body}</domain>")


def kinds(plan: p.Plan) -> list[str]:
    return [c.what for c in plan.changes]


# -- the full request on the plain lab ----------------------------------------

def test_plain_lab_becomes_hotplug_ready():
    old = plain()
    result = p.plan(old, FULL)
    new = result.root
    assert kinds(result) == ["vcpu", "maxMemory", "numa", "pcie-root-port"]
    vcpu = new.find("vcpu")
    assert (vcpu.get("current"), vcpu.text, vcpu.get("placement")) == ("1", "4", "static")
    mm = new.find("maxMemory")
    assert (mm.get("slots"), mm.get("unit"), mm.text) == ("4", "KiB", "2097152")
    assert mm.getnext().tag == "memory"  # placed where libvirt writes it
    cell = new.find("cpu/numa/cell")
    assert dict(cell.attrib) == {"id": "0", "cpus": "0-3", "memory": "524288", "unit": "KiB"}
    assert new.find("cpu/model").text == "qemu64"  # the existing <cpu> is kept, the cell goes inside
    assert pci_room(etree.tostring(old)).free_root_ports == 1
    assert pci_room(etree.tostring(new)).free_root_ports == 4
    assert new.xpath("devices/controller[@model='pcie-root-port']/@index")[-3:] == ["8", "9", "10"]
    assert old.find("maxMemory") is None  # the input is not touched
    golden("prepare-plain-q35-prepared.xml", p.to_text(new))


def test_second_run_changes_nothing():
    first = p.plan(plain(), FULL)
    again = p.plan(p.parse_xml(p.to_text(first.root)), FULL)
    assert again.changes == [] and not again.changed
    assert p.to_text(again.root) == p.to_text(first.root)


def test_change_texts():
    texts = [str(c) for c in p.plan(plain(), FULL).changes]
    assert texts == ["vcpu: 1 of 1 -> 1 of 4", "maxMemory: none -> 2 GiB with 4 slots",
                     "numa: no cell -> cell 0 (vCPUs 0-3, 512 MiB)", "pcie-root-port: 1 free -> 4 free (3 added)"]


def test_diff_shows_only_the_edits():
    old = plain()
    diff = p.unified_diff(old, p.plan(old, FULL).root, "vhl")
    assert diff.startswith("--- vhl (definition)\n+++ vhl (prepared)\n")
    added = [line for line in diff.splitlines() if line.startswith("+") and not line.startswith("+++")]
    removed = [line for line in diff.splitlines() if line.startswith("-") and not line.startswith("---")]
    assert removed == ['-  <vcpu placement="static">1</vcpu>']
    assert '+  <vcpu placement="static" current="1">4</vcpu>' in added
    assert '+  <maxMemory slots="4" unit="KiB">2097152</maxMemory>' in added
    assert sum("pcie-root-port" in line for line in added) == 3
    assert p.unified_diff(old, old, "vhl") == ""


# -- vCPUs ------------------------------------------------------------------

def test_vcpu_keeps_the_current_count():
    result = p.plan(domain("", vcpu="<vcpu current='2'>4</vcpu>"), p.PrepareRequest(max_vcpus=8))
    vcpu = result.root.find("vcpu")
    assert (vcpu.get("current"), vcpu.text) == ("2", "8")
    assert str(result.changes[0]) == "vcpu: 2 of 4 -> 2 of 8"


def test_vcpu_down_to_current_drops_the_attribute():
    vcpu = p.plan(domain("", vcpu="<vcpu current='2'>4</vcpu>"), p.PrepareRequest(max_vcpus=2)).root.find("vcpu")
    assert vcpu.get("current") is None and vcpu.text == "2"


def test_vcpu_below_current_is_refused():
    with pytest.raises(errors.InvalidRequest, match="below the 2 vCPUs the domain boots with") as exc:
        p.plan(domain("", vcpu="<vcpu current='2'>4</vcpu>"), p.PrepareRequest(max_vcpus=1))
    assert exc.value.hint


@pytest.mark.parametrize("n", [0, -1])
def test_vcpu_below_one_is_refused(n):
    with pytest.raises(errors.InvalidRequest, match="at least 1 vCPU"):
        p.make_request(max_vcpus=n)
    with pytest.raises(errors.InvalidRequest, match="at least 1 vCPU"):
        p.set_max_vcpus(domain(""), n)


def test_vcpu_topology_scales_sockets_or_refuses():
    body = "<cpu><topology sockets='1' dies='1' cores='2' threads='1'/></cpu>"
    root = p.plan(domain(body), p.PrepareRequest(max_vcpus=6)).root
    assert root.find("cpu/topology").get("sockets") == "3"
    with pytest.raises(errors.InvalidRequest, match="does not fit the CPU topology") as exc:
        p.plan(domain(body), p.PrepareRequest(max_vcpus=5))
    assert "multiple of 2" in (exc.value.hint or "")


def test_vcpus_list_gets_new_hotpluggable_entries():
    body = "<vcpus><vcpu id='0' enabled='yes' hotpluggable='no'/><vcpu id='1' enabled='no' hotpluggable='yes'/></vcpus>"
    root = p.plan(domain(body, vcpu="<vcpu current='1'>2</vcpu>"), p.PrepareRequest(max_vcpus=4)).root
    entries = root.findall("vcpus/vcpu")
    assert [v.get("id") for v in entries] == ["0", "1", "2", "3"]
    assert entries[3].get("enabled") == "no" and entries[3].get("hotpluggable") == "yes"


def test_vcpupin_beyond_new_maximum_is_refused():
    body = "<cputune><vcpupin vcpu='3' cpuset='1'/></cputune>"
    with pytest.raises(errors.InvalidRequest, match="pins vCPU 3"):
        p.plan(domain(body, vcpu="<vcpu current='1'>4</vcpu>"), p.PrepareRequest(max_vcpus=2))


# -- memory -----------------------------------------------------------------

def test_slots_alone_defaults_max_to_four_times_memory_rounded():
    root = p.plan(domain("", memory_mib=500), p.PrepareRequest(slots=2)).root
    mm = root.find("maxMemory")
    assert mm.get("slots") == "2" and int(mm.text) == 2048 * 1024  # 2000 MiB rounded up to 128 MiB


def test_max_memory_alone_defaults_to_four_slots():
    root = p.plan(domain(""), p.make_request(max_memory="3G")).root
    assert (root.find("maxMemory").get("slots"), root.find("maxMemory").text) == ("4", str(3 << 20))


def test_existing_max_memory_keeps_what_is_not_asked():
    body = "<maxMemory slots='2' unit='GiB'>4</maxMemory><cpu><numa><cell id='0' cpus='0-1' memory='512' " \
           "unit='MiB'/></numa></cpu>"
    result = p.plan(domain(body), p.PrepareRequest(slots=8))
    mm = result.root.find("maxMemory")
    assert (mm.get("slots"), mm.text, mm.get("unit")) == ("8", str(4 << 20), "KiB")
    assert kinds(result) == ["maxMemory"]
    # Same values in another unit: nothing to do.
    assert p.plan(domain(body), p.make_request(max_memory="4096M", slots=2)).changes == []


def test_max_memory_below_memory_is_refused():
    with pytest.raises(errors.InvalidRequest, match="below the domain's memory 512 MiB"):
        p.plan(domain(""), p.make_request(max_memory="256M"))


def test_max_memory_counts_existing_dimms():
    body = ("<maxMemory slots='4' unit='MiB'>2048</maxMemory><devices><memory model='dimm'><target>"
            "<size unit='MiB'>256</size><node>0</node></target></memory></devices>")
    # <memory> (768 MiB) includes the DIMM: the boot memory in the new NUMA cell does not.
    root = p.plan(domain(body, memory_mib=768), p.PrepareRequest(slots=4)).root
    assert root.find("cpu/numa/cell").get("memory") == str(512 * 1024)
    with pytest.raises(errors.InvalidRequest, match="below the domain's memory 768 MiB"):
        p.plan(domain(body, memory_mib=768), p.make_request(max_memory="640M"))
    two = body.replace("</devices>", "<memory model='dimm'><target><size unit='MiB'>128</size></target></memory>"
                                     "</devices>")
    with pytest.raises(errors.InvalidRequest, match="fewer than the 2 DIMMs"):
        p.plan(domain(two, memory_mib=896), p.PrepareRequest(slots=1))


@pytest.mark.parametrize("slots", [0, -1, 256])
def test_slots_out_of_range_are_refused(slots):
    with pytest.raises(errors.InvalidRequest, match="expected 1-255"):
        p.make_request(slots=slots)


@pytest.mark.parametrize("size, why", [("abc", "expected a whole number"), ("-1G", "negative"),
                                       ("1.5G", "whole numbers"), ("0", "greater than zero"),
                                       ("1000b", "whole number of KiB")])
def test_bad_sizes_are_refused(size, why):
    with pytest.raises(errors.InvalidRequest, match=why):
        p.make_request(max_memory=size)


def test_empty_request_is_refused_with_the_options():
    with pytest.raises(errors.InvalidRequest, match="nothing to prepare") as exc:
        p.make_request()
    for option in ("--max-vcpus", "--max-memory", "--slots", "--pcie-ports"):
        assert option in (exc.value.hint or "")


# -- NUMA -------------------------------------------------------------------

def test_numa_only_with_memory_hotplug():
    assert kinds(p.plan(plain(), p.PrepareRequest(max_vcpus=2))) == ["vcpu"]


def test_numa_cell_created_when_no_cpu_element():
    root = p.plan(domain("<features><acpi/></features>"), p.PrepareRequest(slots=2)).root
    assert root.find("features").getnext().tag == "cpu"
    assert root.find("cpu/numa/cell").get("cpus") == "0-1"


def test_numa_last_cell_is_widened_for_new_vcpus():
    body = ("<maxMemory slots='2' unit='MiB'>2048</maxMemory><cpu><numa>"
            "<cell id='0' cpus='0' memory='256' unit='MiB'/><cell id='1' cpus='1' memory='256' unit='MiB'/>"
            "</numa></cpu>")
    result = p.plan(domain(body), p.PrepareRequest(max_vcpus=4))
    cells = result.root.findall("cpu/numa/cell")
    assert [c.get("cpus") for c in cells] == ["0", "1-3"]
    assert str(result.changes[-1]) == "numa: cell 1 vCPUs 1 -> cell 1 vCPUs 1-3"
    assert p.plan(result.root, p.PrepareRequest(max_vcpus=4)).changes == []


def test_numa_gap_is_filled_into_the_last_cell():
    body = "<cpu><numa><cell id='0' cpus='0,2' memory='512' unit='MiB'/></numa></cpu>"
    root = p.plan(domain(body, vcpu="<vcpu>3</vcpu>"), p.PrepareRequest(max_vcpus=3)).root
    assert root.find("cpu/numa/cell").get("cpus") == "0-2"


def test_numa_cells_beyond_the_new_maximum_are_refused():
    body = "<cpu><numa><cell id='0' cpus='0-3' memory='512' unit='MiB'/></numa></cpu>"
    with pytest.raises(errors.InvalidRequest, match="NUMA cell 0 lists vCPU\\(s\\) 2-3") as exc:
        p.plan(domain(body, vcpu="<vcpu current='1'>4</vcpu>"), p.PrepareRequest(max_vcpus=2))
    assert "cpus=" in (exc.value.hint or "")


@pytest.mark.parametrize("text, cpus, canonical", [("0-3,^2,5", {0, 1, 3, 5}, "0-1,3,5"), ("7", {7}, "7"),
                                                   ("0-1,2-3", {0, 1, 2, 3}, "0-3"), ("", set(), "")])
def test_cpuset_syntax(text, cpus, canonical):
    assert p.parse_cpuset(text) == cpus
    assert p.format_cpuset(cpus) == canonical


# -- root ports ---------------------------------------------------------------

def test_root_ports_already_enough():
    assert p.plan(plain(), p.PrepareRequest(pcie_ports=1)).changes == []


def test_hotplug_off_port_does_not_count():
    root = plain()
    free_port = root.xpath("devices/controller[@model='pcie-root-port'][@index='6']")[0]
    etree.SubElement(free_port, "target", hotplug="off")
    result = p.plan(root, p.PrepareRequest(pcie_ports=1))
    assert str(result.changes[0]) == "pcie-root-port: 0 free -> 1 free (1 added)"


def test_root_ports_on_pc_are_refused():
    root = p.parse_xml("<domain><name>d</name><memory>524288</memory><vcpu>1</vcpu>"
                       "<devices><controller type='pci' index='0' model='pci-root'/></devices></domain>")
    with pytest.raises(errors.InvalidRequest, match="needs a PCIe machine"):
        p.plan(root, p.PrepareRequest(pcie_ports=2))
    assert p.plan(root, p.PrepareRequest(pcie_ports=0)).changes == []


def test_negative_and_too_many_root_ports_are_refused():
    with pytest.raises(errors.InvalidRequest, match="expected 0 or more"):
        p.make_request(pcie_ports=-1)
    with pytest.raises(errors.InvalidRequest, match="indexes would pass 255"):
        p.plan(plain(), p.PrepareRequest(pcie_ports=300))


# -- the command (libvirt's test driver: every open re-reads the node file) ------------------

def test_cli_prepares_and_says_next_boot(cli):
    r = cli("-c", NODE_URI, "prepare", "plainvm", "--max-vcpus", "4", "--max-memory", "2G", "--slots", "4",
            "--pcie-ports", "4")
    assert r.code == 0, r.err
    assert "vcpu: 1 of 1 -> 1 of 4" in r.out and "maxMemory: none -> 2 GiB with 4 slots" in r.out
    assert "takes effect at the next boot (the running domain is unchanged)" in r.out


def test_cli_json(cli):
    doc = cli("-c", NODE_URI, "-o", "json", "prepare", "plainvm", "--slots", "2").json()
    assert doc["defined"] and doc["running"] and not doc["already_ready"]
    assert [c["what"] for c in doc["changes"]] == ["maxMemory", "numa"]


def test_cli_print_xml_changes_nothing(cli):
    r = cli("-c", NODE_URI, "prepare", "plainvm", "--max-vcpus", "2", "--print-xml")
    assert r.code == 0, r.err
    assert r.out.startswith("--- plainvm (definition)") and '+  <vcpu placement="static" current="1">2</vcpu>' in r.out


def test_cli_already_ready(cli):
    r = cli("-c", NODE_URI, "prepare", "pcvm", "--max-vcpus", "4")
    assert r.code == 0 and "already hotplug-ready" in r.out


@pytest.mark.parametrize("args, message", [
    ((), "nothing to prepare"),
    (("--max-vcpus", "0"), "at least 1 vCPU"),
    (("--max-memory", "128M"), "below the domain's memory"),
    (("--slots", "300"), "expected 1-255"),
    (("--max-memory", "lots"), "invalid size 'lots'"),
])
def test_cli_refusals(cli, args, message):
    r = cli("-c", NODE_URI, "prepare", "plainvm", *args)
    assert r.code == ExitCode.INVALID, r.err
    assert message in r.err and "Traceback" not in r.err


def test_cli_refusal_on_pc_names_the_machine(cli):
    r = cli("-c", NODE_URI, "prepare", "pcvm", "--pcie-ports", "2")
    assert r.code == ExitCode.INVALID and "needs a PCIe machine" in r.err and "hint:" in r.err



# -- the schema, and the plain lab the lab test proves prepare on -------------

SCHEMA = Path("/usr/share/libvirt/schemas/domain.rng")


def test_prepared_definition_is_valid_against_libvirt_schema():
    assert SCHEMA.exists(), "libvirt's schemas missing: make setup installs libvirt-clients"
    schema = etree.RelaxNG(etree.parse(str(SCHEMA)))
    doc = etree.fromstring(p.to_text(p.plan(plain(), FULL).root).encode())
    assert schema.validate(doc), schema.error_log


def plain_lab(plain_flag: bool) -> etree._Element:
    target = SSHTarget("127.0.0.1", 40022, "root", Path("/k/id"), Path("/k/known_hosts"))
    spec = LabSpec(name="vhl-unit", kernel=Path("/k"), initrd=Path("/i"), serial_log=Path("/s.log"), ssh=target,
                   plain=plain_flag)
    return etree.fromstring(build_domain_xml(spec).encode())


def test_plain_lab_has_no_hotplug_room():
    d = plain_lab(True)
    assert d.find("maxMemory") is None and d.find("cpu") is None
    assert d.find("vcpu").text == "1" and d.find("vcpu").get("current") is None
    # One port beyond the usb, scsi, balloon, rng controllers/devices and the pcie-to-pci-bridge.
    assert d.xpath("count(devices/controller[@model='pcie-root-port'])") == 6
    assert d.xpath("string(metadata/*/*[local-name()='lab']/@plain)") == "yes"


def test_default_lab_is_unchanged_by_the_plain_variant():
    d = plain_lab(False)
    assert d.find("maxMemory") is not None and d.find("cpu/numa/cell") is not None
    assert (d.find("vcpu").get("current"), d.find("vcpu").text) == ("1", "4")
    assert d.xpath("count(devices/controller[@model='pcie-root-port'])") == 13
    assert d.xpath("metadata/*/*[local-name()='lab']/@plain") == []


def test_cli_print_xml_json_when_ready(cli):
    doc = cli("-c", NODE_URI, "-o", "json", "prepare", "pcvm", "--max-vcpus", "4", "--print-xml").json()
    assert doc["already_ready"] and doc["diff"] == "" and not doc["defined"] and not doc["next_boot"]
