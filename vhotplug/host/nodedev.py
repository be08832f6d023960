"""libvirt node devices: find a host PCI/USB device, and move a PCI function between its host driver and VFIO.

``virNodeDeviceDetachFlags`` is the seed's pci-stub step done by libvirt (unbind from the host driver,
bind to vfio-pci); ``virNodeDeviceReAttach`` gives the function back to its host driver. Both work on the
hypervisor the connection points to, so they work over a remote URI too.

This module changes the host only in :func:`detach_from_host` and :func:`reattach_to_host`; callers check
the device first (:mod:`vhotplug.host.safety`) and journal the step (:mod:`vhotplug.host.journal`).
"""

from __future__ import annotations

import time

import libvirt

from vhotplug import errors
from vhotplug.addresses import Bdf, UsbDevice, UsbSpec, match_usb
from vhotplug.host.inventory import NodeDev, parse_nodedev_xml
from vhotplug.host.sysfs import PASSTHROUGH_DRIVERS
from vhotplug.virt.connection import RECONNECT_WINDOW, Connection, reopen_if_lost
from vhotplug.virt.errors import translate


def lookup_pci(conn: libvirt.virConnect, bdf: Bdf) -> tuple[libvirt.virNodeDevice, NodeDev]:
    """The node device of host PCI function ``bdf`` and its parsed facts; DeviceNotFound if there is none."""
    try:
        dev = conn.nodeDeviceLookupByName(bdf.nodedev_name)
        node = parse_nodedev_xml(dev.XMLDesc(0))
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_NODE_DEVICE:
            raise errors.DeviceNotFound(f"no PCI device {bdf} on the host",
                                        hint="`vhotplug host list --pci` shows the host's PCI devices") from exc
        raise translate(exc, f"looking up host PCI device {bdf}") from exc
    if node is None or node.kind != "pci":
        raise errors.DeviceNotFound(f"{bdf.nodedev_name} is not a PCI device")
    return dev, node


#: While a function moves between drivers its sysfs ``driver`` link is briefly missing, and libvirt's
#: XMLDesc then fails ("cannot resolve driver link"): read again, for at most this long.
DRIVER_SETTLE = 2.0


def current_driver(dev: libvirt.virNodeDevice) -> str | None:
    """The driver bound to the node device now (re-read from libvirt), or None."""
    deadline = time.monotonic() + DRIVER_SETTLE
    while True:
        try:
            node = parse_nodedev_xml(dev.XMLDesc(0))
            return node.driver if node else None
        except libvirt.libvirtError as exc:
            if time.monotonic() >= deadline or exc.get_error_code() == libvirt.VIR_ERR_NO_NODE_DEVICE:
                raise translate(exc, f"reading node device {dev.name()}") from exc
            time.sleep(0.05)  # bounded: the kernel finishes the rebind within milliseconds


def on_passthrough_driver(driver: str | None) -> bool:
    """True when the function is held for passthrough (vfio-pci, pci-stub, ...) or bound to nothing."""
    return driver is None or driver in PASSTHROUGH_DRIVERS


def current(conn: libvirt.virConnect, dev: libvirt.virNodeDevice) -> libvirt.virNodeDevice:
    """``dev`` as the connection knows it now: looked up again when libvirtd went away and ``conn`` was (or is
    now) reopened, since a node device object stays bound to the connection it came from."""
    if reopen_if_lost(conn, time.monotonic() + RECONNECT_WINDOW, during=f"looking at {dev.name()}") or (
            isinstance(conn, Connection) and dev.connect() is not conn.raw):
        try:
            return conn.nodeDeviceLookupByName(dev.name())
        except libvirt.libvirtError as exc:
            raise translate(exc, f"finding {dev.name()} again after reconnecting") from exc
    return dev


def detach_from_host(dev: libvirt.virNodeDevice) -> None:
    """Unbind the function from its host driver and bind it to vfio-pci (``virsh nodedev-detach``)."""
    try:
        dev.detachFlags(None, 0)
    except libvirt.libvirtError as exc:
        raise translate(exc, f"taking {dev.name()} from its host driver") from exc


def reattach_to_host(conn: libvirt.virConnect, dev: libvirt.virNodeDevice) -> None:
    """Give the function back to its host driver (``virsh nodedev-reattach``).

    On Xen, pciback's own claim on it is cleared first (:mod:`vhotplug.host.pciback`), or the reprobe
    would hand it to pciback again.
    """
    from vhotplug.virt.flavor import flavor_of

    if flavor_of(conn).pci_stub == "pciback":
        from vhotplug.addresses import parse_bdf
        from vhotplug.host import pciback

        pciback.release(conn.getURI(), parse_bdf(dev.name()))
    try:
        dev.reAttach()
    except libvirt.libvirtError as exc:
        raise translate(exc, f"giving {dev.name()} back to its host driver") from exc


def usb_nodes(conn: libvirt.virConnect) -> list[NodeDev]:
    """Every host USB device libvirt knows (``virsh nodedev-list --cap usb_device``)."""
    try:
        devs = conn.listAllDevices(libvirt.VIR_CONNECT_LIST_NODE_DEVICES_CAP_USB_DEV)
    except libvirt.libvirtError as exc:
        raise translate(exc, "listing host USB devices") from exc
    found = []
    for dev in devs:
        try:
            node = parse_nodedev_xml(dev.XMLDesc(0))
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_NODE_DEVICE:  # unplugged while we listed
                continue
            raise translate(exc, "reading a host USB device") from exc
        if node is not None and node.kind == "usb":
            found.append(node)
    return found


def find_usb(conn: libvirt.virConnect, spec: UsbSpec) -> NodeDev:
    """The one host USB device ``spec`` names; a spec matching several is refused with the candidates."""
    nodes = usb_nodes(conn)
    candidates = [UsbDevice(n.bus or 0, n.device or 0, n.vendor_id or 0, n.product_id or 0,
                            name=" ".join(x for x in (n.vendor_name, n.product_name) if x), nodedev=n.name)
                  for n in nodes]
    chosen = match_usb(spec, candidates)
    return next(n for n in nodes if n.name == chosen.nodedev)
