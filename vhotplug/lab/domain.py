"""The lab guest's libvirt domain XML, built from ``xml_templates/lab-domain.xml`` with lxml."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lxml import etree

from vhotplug import errors, templates
from vhotplug.guest.target import METADATA_NS, SSHTarget, metadata_element

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
#: xenpv/xen: the lab guest as a Xen PV domU (vhotplug.lab.xenpv), chosen by the connection's driver.
Machine = Literal["q35", "pc", "xenpv"]
Accel = Literal["qemu", "kvm", "xen"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")
# The template's own PCIe devices each take a root port on q35 (libvirt places
# them there), and so does the pcie-to-pci-bridge: those come on top of the
# free ports asked for.
_PCIE_DEVICES = "controller[@type='usb' or @type='scsi'] | memballoon | rng"
# The "plain" lab is what a typical domain looks like before `vhotplug prepare`: one
# free root port, no maxMemory, no NUMA cell, no vCPUs to add.
PLAIN_FREE_ROOT_PORTS = 1


@dataclass(frozen=True)
class LabSpec:
    name: str
    kernel: Path
    initrd: Path
    serial_log: Path
    ssh: SSHTarget
    machine: Machine = "q35"
    accel: Accel = "qemu"
    free_root_ports: int = 8
    memory_mib: int = 512
    image_id: str = ""
    plain: bool = False  # not hotplug-ready: the domain `vhotplug prepare` is proven on


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise errors.InvalidRequest(
            f"invalid lab domain name {name!r}: use letters, digits and _.+- (at most 64, not starting with a sign)"
        )
    return name


def mgmt_mac(name: str) -> str:
    """A stable, locally administered (QEMU range) MAC for the lab's management NIC."""
    digest = hashlib.sha256(name.encode()).digest()
    return "52:54:00:" + ":".join(f"{b:02x}" for b in digest[:3])


def kernel_cmdline(mac: str) -> str:
    # memhp_default_state=offline: hot-added memory must stay offline until
    # vhotplug onlines it (tests check that it does).
    return f"console=ttyS0 edd=off quiet memhp_default_state=offline vhotplug.mgmt_mac={mac}"


def _controller(index: int, model: str, before: etree._Element) -> None:
    ctl = etree.Element("controller", type="pci", index=str(index), model=model)
    before.addprevious(ctl)


def _make_plain(root: etree._Element) -> None:
    """Strip what makes the template hotplug-ready: maxMemory, the NUMA cell, spare vCPUs."""
    root.remove(root.find("maxMemory"))
    cpu = root.find("cpu")
    cpu.remove(cpu.find("numa"))
    if len(cpu) == 0 and not cpu.attrib:
        root.remove(cpu)
    vcpu = root.find("vcpu")
    vcpu.attrib.pop("current", None)
    vcpu.text = "1"


def lab_metadata(spec: LabSpec) -> etree._Element:
    """The ``<vh:guest>`` element of a lab guest: its SSH login and ``<vh:lab>`` (what `lab up` compares)."""
    meta = metadata_element(spec.ssh)
    lab = etree.SubElement(meta, f"{{{METADATA_NS}}}lab")
    lab.set("machine", spec.machine)
    lab.set("accel", spec.accel)
    lab.set("serial-log", str(spec.serial_log))
    if spec.image_id:
        lab.set("image", spec.image_id)
    if spec.plain:
        lab.set("plain", "yes")  # `lab up` compares it: a plain lab never stands in for a ready one
    return meta


def build_domain_xml(spec: LabSpec) -> str:
    """The full domain XML for a lab guest."""
    check_name(spec.name)
    root = templates.load("lab-domain")
    root.set("type", spec.accel)
    root.find("name").text = spec.name
    os_el = root.find("os")
    os_el.find("type").set("machine", spec.machine)
    os_el.find("kernel").text = str(spec.kernel)
    os_el.find("initrd").text = str(spec.initrd)
    mac = mgmt_mac(spec.name)
    os_el.find("cmdline").text = kernel_cmdline(mac)
    for path in ("memory", "currentMemory", "cpu/numa/cell"):
        el = root.find(path)
        el.set("unit", "MiB")
        if path == "cpu/numa/cell":
            el.set("memory", str(spec.memory_mib))
        else:
            el.text = str(spec.memory_mib)
    if spec.plain:
        _make_plain(root)

    root.find("metadata").append(lab_metadata(spec))

    devices = root.find("devices")
    first = devices[0]
    if spec.machine == "q35":
        _controller(0, "pcie-root", first)
        free = PLAIN_FREE_ROOT_PORTS if spec.plain else spec.free_root_ports
        ports = free + len(devices.xpath(_PCIE_DEVICES)) + 1
        for index in range(1, ports + 1):
            _controller(index, "pcie-root-port", first)
        _controller(ports + 1, "pcie-to-pci-bridge", first)
        nic_addr = "bus=pcie.0,addr=0x1e"
    else:
        _controller(0, "pci-root", first)
        nic_addr = "bus=pci.0,addr=0x1f"  # the last slot: libvirt fills pci.0 from the bottom

    devices.find("serial/source").set("path", str(spec.serial_log))

    add_mgmt_nic(root, spec.ssh.host, spec.ssh.port, mac, nic_addr)
    return templates.tostring(root)


def add_mgmt_nic(root: etree._Element, host: str, port: int, mac: str, nic_addr: str) -> None:
    """The management NIC: user-mode networking with SSH forwarded from ``host:port`` (loopback) only.

    libvirt 9.0 has no portForward for type='user', so it goes on the QEMU command line and stays
    invisible to libvirt (it is not a hot-plug target). ``nic_addr``: its PCI placement (bus=..,addr=..).
    """
    cmdline = root.find(f"{{{QEMU_NS}}}commandline")
    args = [
        "-netdev", f"user,id=vhmgmt,net=10.0.2.0/24,hostfwd=tcp:{host}:{port}-:22",
        "-device", f"virtio-net-pci,netdev=vhmgmt,mac={mac},{nic_addr},romfile=",
    ]
    for value in args:
        etree.SubElement(cmdline, f"{{{QEMU_NS}}}arg", value=value)
