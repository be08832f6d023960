"""Host PCI and USB devices: libvirt's node devices merged with sysfs facts and who uses each one.

libvirt is the source of the device list (``listAllDevices``), so a remote URI lists the remote host's
devices. The sysfs facts (driver, IOMMU group members, and above all who on the host uses the device)
describe the machine vhotplug runs on, so they are read only when the connection is to this machine;
for a remote host they are reported as not checked rather than taken from the wrong machine.
"""

from __future__ import annotations

import gzip
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import libvirt
from lxml import etree

from vhotplug.addresses import Bdf, UsbDevice
from vhotplug.host.sysfs import IOMMU_HINT, IommuStatus, Sysfs
from vhotplug.host.usage import Assignment, GroupMember, HostUse, Usage, domain_assignments, domain_usages
from vhotplug.virt.errors import translate

PCI_IDS_PATHS = ("/usr/share/misc/pci.ids", "/usr/share/hwdata/pci.ids", "/usr/share/pci.ids",
                 "/usr/share/misc/pci.ids.gz")
USB_IDS_PATHS = ("/usr/share/misc/usb.ids", "/usr/share/hwdata/usb.ids", "/var/lib/usbutils/usb.ids",
                 "/usr/share/usb.ids")

# Used when no pci.ids is installed (Debian's minimal images have none): the PCI base classes and the
# subclasses one meets when choosing a device to pass through.
_PCI_CLASSES = {
    0x00: "Unclassified device", 0x01: "Mass storage controller", 0x02: "Network controller",
    0x03: "Display controller", 0x04: "Multimedia controller", 0x05: "Memory controller", 0x06: "Bridge",
    0x07: "Communication controller", 0x08: "Generic system peripheral", 0x09: "Input device controller",
    0x0A: "Docking station", 0x0B: "Processor", 0x0C: "Serial bus controller", 0x0D: "Wireless controller",
    0x0E: "Intelligent controller", 0x0F: "Satellite communications controller", 0x10: "Encryption controller",
    0x11: "Signal processing controller", 0x12: "Processing accelerators", 0x13: "Non-Essential Instrumentation",
    0x40: "Coprocessor", 0xFF: "Unassigned class",
}
_PCI_SUBCLASSES = {
    0x0100: "SCSI storage controller", 0x0101: "IDE interface", 0x0104: "RAID bus controller",
    0x0106: "SATA controller", 0x0107: "Serial Attached SCSI controller", 0x0108: "Non-Volatile memory controller",
    0x0200: "Ethernet controller", 0x0280: "Network controller", 0x0300: "VGA compatible controller",
    0x0302: "3D controller", 0x0403: "Audio device", 0x0600: "Host bridge", 0x0601: "ISA bridge",
    0x0604: "PCI bridge", 0x0609: "PCI bridge (semi-transparent)", 0x0C03: "USB controller",
    0x0C05: "SMBus", 0x1080: "Encryption controller",
}
_USB_CLASSES = {
    0x01: "Audio", 0x02: "Communications", 0x03: "Human Interface Device", 0x06: "Imaging", 0x07: "Printer",
    0x08: "Mass Storage", 0x09: "Hub", 0x0A: "CDC Data", 0x0B: "Smart Card", 0x0E: "Video",
    0xE0: "Wireless", 0xEF: "Miscellaneous Device", 0xFE: "Application Specific", 0xFF: "Vendor Specific",
}

_IDS_VENDOR = re.compile(r"([0-9a-f]{4})\s+(.*)")
_IDS_CLASS = re.compile(r"C ([0-9a-f]{2})\s+(.*)")
_IDS_SUB = re.compile(r"\t([0-9a-f]{2,4})\s+(.*)")


@dataclass(frozen=True)
class NodeDev:
    """The facts of one libvirt node device (``virsh nodedev-dumpxml``) that ``host list`` shows."""

    name: str
    kind: str  # "pci" or "usb"
    path: str | None = None
    driver: str | None = None
    bdf: Bdf | None = None
    bus: int | None = None
    device: int | None = None
    vendor_id: int | None = None
    product_id: int | None = None
    vendor_name: str | None = None
    product_name: str | None = None
    class_code: int | None = None
    iommu_group: int | None = None
    iommu_members: tuple[Bdf, ...] = ()


def _int(text: str | None, base: int = 10) -> int | None:
    if text is None:
        return None
    text = text.strip()
    try:
        return int(text, 16) if text.lower().startswith("0x") else int(text, base)
    except ValueError:
        return None


def _text(el: etree._Element | None) -> str | None:
    if el is None or not (el.text or "").strip():
        return None
    return el.text.strip()


def parse_nodedev_xml(xml: str) -> NodeDev | None:
    """A PCI or USB node device from its XML; None for any other kind of node device."""
    root = etree.fromstring(xml.encode())
    name = root.findtext("name") or "?"
    path = root.findtext("path")
    driver = root.findtext("driver/name")
    cap = root.find("capability")
    if cap is None:
        return None
    vendor, product = cap.find("vendor"), cap.find("product")
    ids = {
        "vendor_id": _int(vendor.get("id")) if vendor is not None else None,
        "product_id": _int(product.get("id")) if product is not None else None,
        "vendor_name": _text(vendor), "product_name": _text(product),
    }
    kind = cap.get("type")
    if kind == "pci":
        parts = [_int(cap.findtext(k)) for k in ("domain", "bus", "slot", "function")]
        bdf = Bdf(*parts) if None not in parts else None  # type: ignore[arg-type]
        group = cap.find("iommuGroup")
        members = tuple(sorted(
            Bdf(*(_int(a.get(k)) or 0 for k in ("domain", "bus", "slot", "function")))
            for a in (group.findall("address") if group is not None else [])
        ))
        return NodeDev(name, "pci", path, driver, bdf=bdf, class_code=_int(cap.findtext("class"), 16),
                       iommu_group=_int(group.get("number")) if group is not None else None,
                       iommu_members=members, **ids)
    if kind == "usb_device":
        return NodeDev(name, "usb", path, driver, bus=_int(cap.findtext("bus")),
                       device=_int(cap.findtext("device")), **ids)
    return None


class IdsDb:
    """pci.ids / usb.ids (the first that exists), read once and only for the vendors asked about."""

    def __init__(self, paths: Iterable[str], sysfs: Sysfs) -> None:
        self._path = next((p for p in (sysfs.path(x) for x in paths) if p.is_file()), None)
        self._vendors: dict[int, tuple[str, dict[int, str]]] = {}
        self._classes: dict[int, str] = {}
        self._loaded = False

    @property
    def available(self) -> bool:
        return self._path is not None

    def load(self, vendors: set[int]) -> None:
        """Read the names of ``vendors`` and their products, and the class names."""
        if self._loaded or self._path is None:
            return
        self._loaded = True
        opener = gzip.open if self._path.suffix == ".gz" else open
        try:
            with opener(self._path, "rt", encoding="utf-8", errors="replace") as fh:
                self._parse(fh, vendors)
        except OSError:
            return

    def _parse(self, lines: Iterable[str], vendors: set[int]) -> None:
        current: dict[int, str] | None = None
        klass: int | None = None
        for line in lines:
            if not line.strip() or line.startswith("#"):
                continue
            if not line.startswith("\t"):
                current, klass = None, None
                if m := _IDS_VENDOR.fullmatch(line.rstrip("\n")):
                    vid = int(m[1], 16)
                    if vid in vendors:
                        current = {}
                        self._vendors[vid] = (m[2], current)
                elif m := _IDS_CLASS.fullmatch(line.rstrip("\n")):
                    klass = int(m[1], 16)
                    self._classes[klass] = m[2]
                continue
            if line.startswith("\t\t"):
                continue
            if (m := _IDS_SUB.fullmatch(line.rstrip("\n"))) is None:
                continue
            if current is not None:
                current[int(m[1], 16)] = m[2]
            elif klass is not None:
                self._classes[(klass << 8) | int(m[1], 16)] = m[2]

    def names(self, vendor: int | None, product: int | None) -> tuple[str | None, str | None]:
        if vendor is None or vendor not in self._vendors:
            return None, None
        vname, products = self._vendors[vendor]
        return vname, products.get(product) if product is not None else None

    def class_name(self, code: int) -> str | None:
        """The name for a class code given as base (``0x02``) or base+subclass (``0x0200``)."""
        return self._classes.get(code)


@dataclass
class HostDevice:
    """One host device as ``host list`` reports it."""

    name: str
    kind: str
    address: str
    vendor_id: int | None = None
    product_id: int | None = None
    vendor: str | None = None
    product: str | None = None
    class_code: int | None = None
    class_name: str | None = None
    driver: str | None = None
    child_drivers: list[str] = field(default_factory=list)
    bridge: bool = False
    iommu_group: int | None = None
    iommu_members: list[GroupMember] = field(default_factory=list)  # the group's other functions
    host_usages: list[Usage] | None = None  # None: not checked (not this machine)
    domain_usages: list[Usage] = field(default_factory=list)
    bus: int | None = None
    device: int | None = None

    @property
    def used_by(self) -> list[Usage]:
        return [*(self.host_usages or []), *self.domain_usages]

    @property
    def vendor_product(self) -> str:
        v = f"{self.vendor_id:04x}" if self.vendor_id is not None else "????"
        p = f"{self.product_id:04x}" if self.product_id is not None else "????"
        return f"{v}:{p}"

    @property
    def description(self) -> str:
        return " ".join(x for x in (self.vendor, self.product) if x)

    @property
    def class_text(self) -> str | None:
        """The class code as lspci/lsusb write it: 24 bits for PCI (``0x020000``), 8 for USB (``0x08``)."""
        if self.class_code is None:
            return None
        return f"0x{self.class_code:06x}" if self.kind == "pci" else f"0x{self.class_code:02x}"

    def as_usb_device(self) -> UsbDevice:
        """For ``addresses.match_usb``."""
        return UsbDevice(self.bus or 0, self.device or 0, self.vendor_id or 0, self.product_id or 0,
                         name=self.description, nodedev=self.name)

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name, "kind": self.kind, "address": self.address,
            "vendor_id": f"{self.vendor_id:04x}" if self.vendor_id is not None else None,
            "product_id": f"{self.product_id:04x}" if self.product_id is not None else None,
            "vendor": self.vendor, "product": self.product,
            "class": self.class_text, "class_name": self.class_name,
            "driver": self.driver, "child_drivers": self.child_drivers, "bridge": self.bridge,
            "iommu_group": self.iommu_group, "iommu_group_members": [m.to_dict() for m in self.iommu_members],
            "host_use_checked": self.host_usages is not None,
            "in_use": bool(self.used_by),
            "used_by": [u.to_dict() for u in self.used_by],
        }


@dataclass
class HostInventory:
    """The host's PCI/USB devices, its IOMMU status and where the host-side facts came from."""

    devices: list[HostDevice]
    iommu: IommuStatus | None  # None: not known (remote host whose devices show no IOMMU group either)
    facts_root: Path | None  # the tree the sysfs facts were read from; None: not this machine
    uri: str = ""

    def to_dict(self) -> dict[str, object]:
        return {
            "uri": self.uri,
            # Where host use was read: "local" (this machine's /), "snapshot" (a copy, taken over SSH for a
            # remote host and gone when the command ends), or None (not read).
            "host_facts": None if self.facts_root is None else "local" if str(self.facts_root) == "/" else "snapshot",
            "iommu": self.iommu.to_dict() if self.iommu else None,
            "devices": [d.to_dict() for d in self.devices],
        }


def is_local_uri(uri: str) -> bool:
    """True when a libvirt URI names a driver on this machine (no host part; not the test driver).

    A loopback host with an explicit port is *not* this machine: that is a forward, typically into a
    VM (the nested lab's L1 is ``qemu+ssh://root@127.0.0.1:PORT/system``).
    """
    parts = urlsplit(uri)
    driver = parts.scheme.split("+", 1)[0]
    if driver in ("test", ""):
        return False
    host = parts.hostname or ""
    return host == "" or (host in ("localhost", "127.0.0.1", "::1") and parts.port is None)


def is_remote_uri(uri: str) -> bool:
    """True when the hypervisor of a libvirt URI runs on another host (or in a VM behind a forward), so
    files its device XML names live there. The test driver runs in-process: its files are this machine's."""
    parts = urlsplit(uri)
    host = parts.hostname or ""
    return host != "" and not (host in ("localhost", "127.0.0.1", "::1") and parts.port is None)


def local_root(conn: libvirt.virConnect) -> Path | None:
    """``/`` when the connection's node devices are this machine's, else None (its sysfs says nothing)."""
    try:
        uri = conn.getURI()
    except libvirt.libvirtError:
        return None
    return Path("/") if is_local_uri(uri) else None


def _nodedevs(conn: libvirt.virConnect, flag: int) -> list[NodeDev]:
    try:
        devs = conn.listAllDevices(flag)
    except libvirt.libvirtError as exc:
        raise translate(exc, "listing host node devices") from exc
    found = []
    for dev in devs:
        try:
            xml = dev.XMLDesc(0)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_NODE_DEVICE:  # unplugged while we listed
                continue
            raise translate(exc, f"reading node device {dev.name()}") from exc
        if (parsed := parse_nodedev_xml(xml)) is not None:
            found.append(parsed)
    return found


def host_inventory(conn: libvirt.virConnect, *, pci: bool = True, usb: bool = True,
                   root: str | os.PathLike[str] | None = None) -> HostInventory:
    """The host's PCI and/or USB devices with who uses each one.

    ``root`` is the tree to read host facts from; by default ``/`` when ``conn`` is to this machine
    (``local_root``), else none are read.
    """
    facts_root = Path(root) if root is not None else local_root(conn)
    nodes: list[NodeDev] = []
    if pci:
        nodes += _nodedevs(conn, libvirt.VIR_CONNECT_LIST_NODE_DEVICES_CAP_PCI_DEV)
    if usb:
        nodes += _nodedevs(conn, libvirt.VIR_CONNECT_LIST_NODE_DEVICES_CAP_USB_DEV)
    assignments = domain_assignments(conn)
    pci_nodes = {n.bdf: n for n in nodes if n.bdf is not None}
    return build_inventory(nodes, assignments, facts_root, pci_nodes=pci_nodes, uri=_uri(conn))


def _uri(conn: libvirt.virConnect) -> str:
    try:
        return conn.getURI()
    except libvirt.libvirtError:
        return ""


def build_inventory(nodes: list[NodeDev], assignments: list[Assignment], facts_root: Path | None, *,
                    pci_nodes: dict[Bdf, NodeDev] | None = None, uri: str = "") -> HostInventory:
    """Merge parsed node devices, domain assignments and (when ``facts_root``) sysfs facts; no libvirt calls."""
    pci_nodes = pci_nodes if pci_nodes is not None else {n.bdf: n for n in nodes if n.bdf is not None}
    sysfs = Sysfs(facts_root) if facts_root is not None else None
    use = HostUse(facts_root) if facts_root is not None else None
    pci_db = IdsDb(PCI_IDS_PATHS, sysfs) if sysfs else None
    usb_db = IdsDb(USB_IDS_PATHS, sysfs) if sysfs else None
    vendors = {n.vendor_id for n in nodes if n.vendor_id is not None and not n.vendor_name}
    for db, kind in ((pci_db, "pci"), (usb_db, "usb")):
        if db is not None and any(n.kind == kind for n in nodes):
            db.load(vendors)
    devices = []
    for node in nodes:
        if node.kind == "pci":
            devices.append(_pci_device(node, sysfs, use, pci_db, pci_nodes, assignments))
        else:
            devices.append(_usb_device(node, sysfs, use, usb_db, assignments))
    devices.sort(key=lambda d: (d.kind != "pci", d.address))
    if sysfs is not None:
        iommu: IommuStatus | None = sysfs.iommu_status()
    elif any(n.iommu_group is not None for n in nodes):
        iommu = IommuStatus(True, len({n.iommu_group for n in nodes if n.iommu_group is not None}))
    elif any(n.kind == "pci" for n in nodes):
        iommu = IommuStatus(False, 0, IOMMU_HINT)  # libvirt reports groups whenever the kernel has them
    else:
        iommu = None
    return HostInventory(devices, iommu, facts_root, uri)


def _names(node: NodeDev, db: IdsDb | None) -> tuple[str | None, str | None]:
    vendor, product = node.vendor_name, node.product_name
    if db is not None and (vendor is None or product is None):
        dv, dp = db.names(node.vendor_id, node.product_id)
        vendor, product = vendor or dv, product or dp
    return vendor, product


def _pci_class_name(code: int | None, db: IdsDb | None) -> str | None:
    if code is None:
        return None
    base, sub = code >> 16, code >> 8
    if db is not None and (name := db.class_name(sub) or db.class_name(base)):
        return name
    return _PCI_SUBCLASSES.get(sub) or _PCI_CLASSES.get(base)


def _pci_device(node: NodeDev, sysfs: Sysfs | None, use: HostUse | None, db: IdsDb | None,
                pci_nodes: dict[Bdf, NodeDev], assignments: list[Assignment]) -> HostDevice:
    bdf = node.bdf
    assert bdf is not None
    vendor, product = _names(node, db)
    dev = HostDevice(node.name, "pci", str(bdf), node.vendor_id, node.product_id, vendor, product,
                     node.class_code, driver=node.driver, iommu_group=node.iommu_group,
                     domain_usages=domain_usages(assignments, bdf=bdf))
    if sysfs is not None and use is not None and sysfs.pci_exists(bdf):
        pdir = sysfs.pci_dir(bdf)
        dev.driver = sysfs.driver(pdir)
        dev.child_drivers = sysfs.child_drivers(pdir)
        dev.class_code = sysfs.pci_class(bdf) if dev.class_code is None else dev.class_code
        dev.iommu_group = sysfs.iommu_group(bdf)
        dev.iommu_members = [m for m in use.group_members(bdf) if m.bdf != bdf]
        dev.host_usages = use.pci_usages(bdf)
    elif sysfs is not None:
        pass  # libvirt lists it, sysfs does not (hot-removed meanwhile?): leave it "not checked"
    else:
        dev.iommu_members = [_member_from_libvirt(b, pci_nodes) for b in node.iommu_members if b != bdf]
    dev.bridge = dev.class_code is not None and (dev.class_code >> 8) in (0x0604, 0x0609)
    dev.class_name = _pci_class_name(dev.class_code, db)
    return dev


def _member_from_libvirt(bdf: Bdf, pci_nodes: dict[Bdf, NodeDev]) -> GroupMember:
    node = pci_nodes.get(bdf)
    code = node.class_code if node else None
    return GroupMember(bdf, node.driver if node else None, code is not None and (code >> 8) in (0x0604, 0x0609))


def _usb_device(node: NodeDev, sysfs: Sysfs | None, use: HostUse | None, db: IdsDb | None,
                assignments: list[Assignment]) -> HostDevice:
    vendor, product = _names(node, db)
    address = f"{node.bus or 0:03d}.{node.device or 0:03d}"
    dev = HostDevice(node.name, "usb", address, node.vendor_id, node.product_id, vendor, product,
                     driver=node.driver, bus=node.bus, device=node.device,
                     domain_usages=domain_usages(assignments,
                                                 usb=(node.vendor_id, node.product_id, node.bus, node.device)))
    if sysfs is not None and use is not None:
        udir = sysfs.path(node.path) if node.path else None
        if (udir is None or not udir.exists()) and node.bus is not None and node.device is not None:
            udir = sysfs.usb_dir(node.bus, node.device)
        if udir is not None and udir.exists():
            dev.child_drivers = sysfs.usb_interface_drivers(udir)
            dev.class_code = sysfs.usb_class(udir)
            dev.host_usages = use.usages_under(udir)
    if dev.class_code is not None:
        dev.class_name = (db.class_name(dev.class_code) if db else None) or _USB_CLASSES.get(dev.class_code)
    return dev
