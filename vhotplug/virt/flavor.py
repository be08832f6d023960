"""What a libvirt hypervisor driver can hot-plug, and the device XML it takes: decided once, from the driver.

Commands never test for Xen themselves: they ask the connection's :class:`Flavor`. Two are known:

- ``QEMU`` (qemu:///system, also KVM): everything vhotplug does was built on it.
- ``Xen`` (libvirt's libxl driver, xen:///system): measured on Xen 4.17 with libvirt 9.0 and a PV
  guest (the Xen lab). Differences found there, each one a field below:

  * disks: only ``<driver name='phy'/>`` (blkback; a raw file is put on a loop device), bus ``xen``,
    names ``xvdX``. The ``qemu`` driver, qcow2 and the virtio/SCSI/SATA/USB buses need a device
    model a PV guest does not have. A Xen disk carries no serial the guest can read: the guest
    finds it by its name, which blkfront takes from the target.
  * NICs: ``bridge`` or ``network`` only (no user-mode networking), no model (netfront); MACs in
    Xen's 00:16:3e range.
  * detach: no ``virDomainDetachDeviceAlias`` (detach by the device's full XML), and no
    DEVICE_REMOVED event: libxl removes the device before the call returns.
  * memory: no DIMMs ("memory devices are not supported by this driver"); the balloon only.
  * host devices: PCI through pciback (Xen owns the IOMMU, dom0 cannot see it; libxl leaves the
    function on pciback, so giving it back takes removing its pciback slot first); no USB.
  * a PV domain takes PCI devices live only if it was started with ``<passthrough state='on'/>``;
    PVH domains take none (Xen 4.17).

Other drivers (the test driver, ...) are treated like QEMU: their XML is QEMU's.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import libvirt
from lxml import etree

from vhotplug import errors

XEN_MAC_OUI = "00:16:3e"
QEMU_MAC_OUI = "52:54:00"


@dataclass(frozen=True)
class Flavor:
    name: str  # "qemu" or "xen"
    label: str  # for messages: "QEMU/KVM", "Xen (libxl)"
    disk_buses: tuple[str, ...]
    disk_bus: str  # the default
    disk_driver: str  # <driver name=...>
    disk_formats: tuple[str, ...]
    disk_serial: bool  # the guest can read <serial> (else it finds the disk by name)
    nic_models: tuple[str, ...]  # empty: no <model> (the driver's only one)
    nic_model: str | None  # the default
    nic_sources: tuple[str, ...]
    mac_oui: str
    detach_by_alias: bool  # virDomainDetachDeviceAlias exists
    removal_event: bool  # DEVICE_REMOVED is emitted (else the detach call is synchronous)
    dimm: bool
    usb_hostdev: bool
    pci_stub: str  # the host driver that holds a PCI function for guests
    host_iommu_visible: bool  # the host's own kernel sees the IOMMU (/sys/kernel/iommu_groups)

    def unsupported(self, what: str, *, hint: str | None = None) -> errors.Unsupported:
        return errors.Unsupported(f"{self.label} cannot {what}", hint=hint)


QEMU = Flavor(
    name="qemu", label="QEMU/KVM",
    disk_buses=("virtio", "scsi", "usb", "sata"), disk_bus="virtio", disk_driver="qemu",
    disk_formats=("raw", "qcow2"), disk_serial=True,
    nic_models=("virtio", "e1000", "e1000e", "rtl8139"), nic_model="virtio",
    nic_sources=("user", "network", "bridge"), mac_oui=QEMU_MAC_OUI,
    detach_by_alias=True, removal_event=True, dimm=True, usb_hostdev=True, pci_stub="vfio-pci",
    host_iommu_visible=True,
)

XEN = Flavor(
    name="xen", label="Xen (libxl)",
    disk_buses=("xen",), disk_bus="xen", disk_driver="phy", disk_formats=("raw",), disk_serial=False,
    nic_models=(), nic_model=None, nic_sources=("bridge", "network"), mac_oui=XEN_MAC_OUI,
    detach_by_alias=False, removal_event=False, dimm=False, usb_hostdev=False, pci_stub="pciback",
    host_iommu_visible=False,
)

_BY_DRIVER = {"QEMU": QEMU, "Xen": XEN}


def flavor_for_driver(driver: str) -> Flavor:
    """The flavor of a libvirt driver name as ``virConnectGetType`` returns it (QEMU, Xen, Test, ...)."""
    return _BY_DRIVER.get(driver, QEMU)


# A connection's driver never changes: asked once per connection (over xen+ssh each ask is a round trip).
_KNOWN: weakref.WeakKeyDictionary[libvirt.virConnect, Flavor] = weakref.WeakKeyDictionary()


def flavor_of(conn: libvirt.virConnect) -> Flavor:
    """The flavor of the hypervisor behind ``conn``."""
    found = _KNOWN.get(conn)
    if found is None:
        try:
            found = flavor_for_driver(conn.getType())
        except libvirt.libvirtError:
            return QEMU
        _KNOWN[conn] = found
    return found


# -- Xen domain kinds --------------------------------------------------------------------------------------

def xen_guest_kind(xml: str | bytes | etree._Element) -> str:
    """``pv``, ``pvh`` or ``hvm`` for a Xen domain's XML (libvirt: os/type ``linux``, ``xenpvh``, ``hvm``)."""
    root = xml if isinstance(xml, etree._Element) else etree.fromstring(xml.encode() if isinstance(xml, str)
                                                                         else xml)
    os_type = (root.findtext("os/type") or "").strip()
    machine = root.find("os/type")
    if os_type == "xenpvh" or (machine is not None and machine.get("machine") == "xenpvh"):
        return "pvh"
    return "hvm" if os_type == "hvm" else "pv"


def xen_passthrough_on(xml: str | bytes | etree._Element) -> bool:
    """True when the domain XML has ``<features><xen><passthrough state='on'/>``."""
    root = xml if isinstance(xml, etree._Element) else etree.fromstring(xml.encode() if isinstance(xml, str)
                                                                         else xml)
    return bool(root.xpath("features/xen/passthrough[@state='on']"))
