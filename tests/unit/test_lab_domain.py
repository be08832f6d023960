"""The lab domain XML is hotplug-ready and valid against libvirt's schema."""

from __future__ import annotations

from pathlib import Path

import pytest
from lxml import etree

from vhotplug import errors
from vhotplug.guest.target import SSHTarget, target_from_metadata
from vhotplug.lab.domain import LabSpec, build_domain_xml, check_name, mgmt_mac

QEMU = {"qemu": "http://libvirt.org/schemas/domain/qemu/1.0"}


def spec(machine: str = "q35", **kw) -> LabSpec:
    target = SSHTarget("127.0.0.1", 40022, "root", Path("/var/lib/vhotplug/lab/image/id_lab"),
                       Path("/var/lib/vhotplug/lab/domains/t/known_hosts"))
    return LabSpec(name="vhl-unit", kernel=Path("/k"), initrd=Path("/i"), serial_log=Path("/s.log"),
                   ssh=target, machine=machine, **kw)  # type: ignore[arg-type]


def parse(machine: str = "q35", **kw) -> etree._Element:
    return etree.fromstring(build_domain_xml(spec(machine, **kw)).encode())


def test_q35_is_hotplug_ready():
    d = parse()
    assert d.get("type") == "qemu"
    assert d.find("os/type").get("machine") == "q35"
    assert d.xpath("count(devices/controller[@model='pcie-root'])") == 1
    assert d.xpath("count(devices/controller[@model='pcie-root-port'])") >= 8
    assert d.xpath("count(devices/controller[@model='pcie-to-pci-bridge'])") == 1
    vcpu = d.find("vcpu")
    assert (vcpu.get("current"), vcpu.text) == ("1", "4")
    assert d.find("maxMemory").get("slots") == "4"
    assert d.find("cpu/numa/cell") is not None
    assert d.xpath("count(devices/controller[@type='usb'][@model='qemu-xhci'])") == 1
    assert d.xpath("count(devices/controller[@type='scsi'][@model='virtio-scsi'])") == 1
    assert d.find("devices/serial").get("type") == "file"
    assert d.find("devices/serial/source").get("path") == "/s.log"


def test_management_nic_only_on_loopback():
    args = etree.fromstring(build_domain_xml(spec()).encode()).xpath("qemu:commandline/qemu:arg/@value",
                                                                     namespaces=QEMU)
    netdev = args[args.index("-netdev") + 1]
    assert "hostfwd=tcp:127.0.0.1:40022-:22" in netdev and netdev.count("hostfwd") == 1
    assert f"mac={mgmt_mac('vhl-unit')}" in args[args.index("-device") + 1]


def test_cmdline_keeps_hotplugged_memory_offline():
    cmdline = parse().find("os/cmdline").text
    assert "memhp_default_state=offline" in cmdline and "console=ttyS0" in cmdline


def test_metadata_tells_how_to_reach_the_guest():
    t = target_from_metadata(parse())
    assert t is not None and (t.host, t.port) == ("127.0.0.1", 40022)
    assert t.known_hosts == Path("/var/lib/vhotplug/lab/domains/t/known_hosts")


def test_pc_machine_and_kvm():
    d = parse("pc", accel="kvm")
    assert d.get("type") == "kvm" and d.find("os/type").get("machine") == "pc"
    assert d.xpath("count(devices/controller[starts-with(@model, 'pcie')])") == 0
    assert d.xpath("count(devices/controller[@model='pci-root'])") == 1


@pytest.fixture(scope="module")
def domain_schema() -> etree.RelaxNG:
    schema = Path("/usr/share/libvirt/schemas/domain.rng")
    assert schema.exists(), "libvirt's schemas missing: make setup installs libvirt-clients"
    return etree.RelaxNG(etree.parse(str(schema)))


@pytest.mark.parametrize("machine", ["q35", "pc"])
def test_valid_against_libvirt_schema(machine, domain_schema):
    doc = etree.fromstring(build_domain_xml(spec(machine)).encode())
    assert domain_schema.validate(doc), domain_schema.error_log


@pytest.mark.parametrize("name", ["", "-x", "a b", "a/b", "x" * 65, "name;rm"])
def test_bad_names(name):
    with pytest.raises(errors.InvalidRequest):
        check_name(name)
