"""The lab guest as a Xen PV domU: its domain XML (``xml_templates/lab-xenpv.xml``) and its address.

``vhotplug -c XEN_URI lab up`` defines the ordinary lab guest inside the Xen lab's dom0 (see
:mod:`vhotplug.lab.xen`) when the connection's driver is Xen: the same kernel and initramfs, seen in
dom0 through its read-only share of the lab directory. Its management NIC is a netfront on dom0's
bridge ``xenbr0``, which has the link-local ``169.254.100.1/16`` and routes nowhere: the domU gets
``169.254.100.N/16`` (N from 2, unique among the lab domains of that host, chosen when it is defined)
and is reached over SSH on port 22 through dom0 as the jump host.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable
from pathlib import Path

from vhotplug import errors, templates
from vhotplug.lab.domain import LabSpec, check_name, lab_metadata

MACHINE = "xenpv"
ACCEL = "xen"
#: dom0's bridge for the domUs' management NICs, its address, and the network on it (link-local only).
BRIDGE = "xenbr0"
GATEWAY = ipaddress.IPv4Address("169.254.100.1")
NETWORK = ipaddress.IPv4Network("169.254.0.0/16")
#: Lab domUs get 169.254.100.FIRST_HOST .. 169.254.100.LAST_HOST.
FIRST_HOST, LAST_HOST = 2, 254
SSH_PORT = 22
#: In dom0: xenconsoled logs each domU's console here, as guest-NAME.log (see vhotplug/lab/dom0/sysinit.sh).
CONSOLE_LOG_DIR = Path("/var/log/libvirt/xen-console")


def console_log(name: str) -> Path:
    return CONSOLE_LOG_DIR / f"guest-{check_name(name)}.log"


def xen_mac(name: str) -> str:
    """A stable MAC in Xen's range (00:16:3e) for the domU's management NIC."""
    tail = bytearray(hashlib.sha256(f"{name}/xen".encode()).digest()[:3])
    tail[0] &= 0x7F  # the half of the range Xen's tools leave to the administrator's own choice
    return "00:16:3e:" + ":".join(f"{b:02x}" for b in tail)


def pick_address(used: Iterable[str]) -> str:
    """The first ``169.254.100.N`` (N >= FIRST_HOST) not in ``used`` (the other lab domains' SSH hosts)."""
    taken = set(used)
    base = int(GATEWAY) - 1
    for n in range(FIRST_HOST, LAST_HOST + 1):
        addr = str(ipaddress.IPv4Address(base + n))
        if addr not in taken:
            return addr
    raise errors.LabError(f"no free lab address left on the Xen bridge {BRIDGE} "
                          f"({FIRST_HOST}-{LAST_HOST} of {GATEWAY} are taken)",
                          hint="remove a Xen lab guest with `vhotplug -c URI lab down --name NAME`")


def _check_address(host: str) -> ipaddress.IPv4Address:
    try:
        addr = ipaddress.IPv4Address(host)
    except ValueError as exc:
        raise errors.InvalidRequest(f"invalid Xen lab guest address {host!r}: {exc}") from exc
    if addr not in NETWORK or addr == GATEWAY or addr in (NETWORK.network_address, NETWORK.broadcast_address):
        raise errors.InvalidRequest(f"Xen lab guest address {host} is not a host address of {NETWORK} "
                                    f"other than the bridge's {GATEWAY}")
    return addr


def kernel_cmdline(mac: str, host: str) -> str:
    """The domU's command line: Xen's console, and its management address for the lab's /init."""
    addr = _check_address(host)
    return (f"console=hvc0 quiet memhp_default_state=offline vhotplug.mgmt_mac={mac} "
            f"vhotplug.mgmt_ip={addr}/{NETWORK.prefixlen} vhotplug.mgmt_gw={GATEWAY}")


def build_xenpv_xml(spec: LabSpec) -> str:
    """The full domain XML of a lab guest as a Xen PV domU; its SSH target's host is its address."""
    check_name(spec.name)
    if spec.plain:
        raise errors.Unsupported("a plain (not hotplug-ready) lab guest exists for QEMU/KVM only")
    if spec.ssh.port != SSH_PORT:
        raise errors.InvalidRequest(f"a Xen lab guest is reached on port {SSH_PORT}, not {spec.ssh.port}")
    root = templates.load("lab-xenpv")
    root.find("name").text = spec.name
    os_el = root.find("os")
    os_el.find("kernel").text = str(spec.kernel)
    os_el.find("initrd").text = str(spec.initrd)
    mac = xen_mac(spec.name)
    os_el.find("cmdline").text = kernel_cmdline(mac, spec.ssh.host)
    root.find("devices/interface/mac").set("address", mac)
    root.find("metadata").append(lab_metadata(spec))
    return templates.tostring(root)
