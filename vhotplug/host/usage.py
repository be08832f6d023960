"""Who uses a host device: the host itself, or a domain.

The host side is read-only analysis of a sysfs/procfs tree below an injectable root (default ``/``):

- block devices below the device (``/sys/block/*`` links whose target lies under the device's sysfs
  directory, NVMe multipath heads through their controllers), their partitions, and what stacks on them
  (``holders``: device-mapper/LVM, md RAID, recursively); each of those mounted (``/proc/self/mountinfo``,
  matched by major:minor so ``/dev/root`` and ``/dev/mapper/…`` need no guessing) or used as swap
  (``/proc/swaps``);
- network interfaces below the device (``/sys/class/net/*``) and the interfaces stacked on them
  (``upper_*``: bridges, bonds, VLANs) that are up with addresses (IPv6 from ``/proc/net/if_inet6``, IPv4
  from ``ip -j -4 addr show``, the one subprocess, only for the live host) or carry a default route
  (``/proc/net/route``, ``/proc/net/ipv6_route``).

The domain side scans the XML of every domain, running or not, for a ``<hostdev>`` (or ``<interface
type='hostdev'>``) naming the device.

Taking a device that the host uses away from it can take the machine's root disk or its network; the
attach step refuses such devices with the reasons found here, so an uncertain answer leans to "used".
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import libvirt
from lxml import etree

from vhotplug import errors
from vhotplug.addresses import Bdf, parse_bdf
from vhotplug.host.snapshot import read_ipv4
from vhotplug.host.sysfs import PASSTHROUGH_DRIVERS, Sysfs
from vhotplug.virt.devices import source_bdf, xml_number
from vhotplug.virt.errors import translate

HOST_KINDS = ("mount", "swap", "holder", "net", "route")
_IFF_UP = 0x1
_IPV6_LINK_SCOPE = 0x20
_RTF_UP = 0x0001
_RTF_REJECT = 0x0200
_IP_TIMEOUT = 5.0


@dataclass(frozen=True)
class Usage:
    """One reason a device is in use: ``kind`` is mount, swap, holder, net, route (the host) or domain."""

    kind: str
    detail: str

    @property
    def by_host(self) -> bool:
        return self.kind != "domain"

    def __str__(self) -> str:
        return f"{self.kind} {self.detail}"

    def to_dict(self) -> dict[str, str]:
        return {"by": "host" if self.by_host else "domain", "kind": self.kind, "detail": self.detail}


@dataclass(frozen=True)
class GroupMember:
    """A PCI function in an IOMMU group: its driver, whether it is a bridge, and how the host uses it."""

    bdf: Bdf
    driver: str | None
    bridge: bool
    usages: tuple[Usage, ...] = ()

    @property
    def host_bound(self) -> bool:
        """Bound to a driver of the host's own (not vfio-pci/pci-stub, not unbound)."""
        return self.driver is not None and self.driver not in PASSTHROUGH_DRIVERS

    def to_dict(self) -> dict[str, object]:
        return {"address": str(self.bdf), "driver": self.driver, "bridge": self.bridge,
                "used_by": [u.to_dict() for u in self.usages]}


@dataclass(frozen=True)
class _Mount:
    majmin: str | None
    mountpoint: str
    source: str
    fstype: str = ""


@dataclass(frozen=True)
class _BlockNode:
    """A disk or partition: its name, ``MAJ:MIN`` and sysfs directory (under ``/sys/block``)."""

    name: str
    majmin: str | None
    sysdir: Path


class HostUse:
    """What the host uses, read once from the tree below ``root`` and then asked about many devices.

    ``ipv4`` maps interface names to their IPv4 addresses (``10.0.0.2/24``); when None it is read with
    ``ip -j -4 addr show`` for the live host, and taken as "no IPv4 addresses" for a fixture tree.
    """

    def __init__(self, root: str | os.PathLike[str] = "/", *,
                 ipv4: Mapping[str, Sequence[str]] | None = None) -> None:
        self.sysfs = Sysfs(root)
        self._ipv4_given = ipv4
        self._node_names: dict[str, str | None] = {}

    # -- public queries ------------------------------------------------------------------------------------

    def pci_usages(self, bdf: Bdf | str) -> list[Usage]:
        """How the host uses PCI function ``bdf`` (and everything below it, e.g. behind a bridge)."""
        bdf = parse_bdf(bdf) if isinstance(bdf, str) else bdf
        if not self.sysfs.pci_exists(bdf):
            raise errors.DeviceNotFound(f"no PCI device {bdf} on the host (not in /sys/bus/pci/devices)")
        return self.usages_under(self.sysfs.pci_device_path(bdf))

    def usages_under(self, device_path: Path) -> list[Usage]:
        """How the host uses the device whose resolved sysfs directory is ``device_path`` (PCI or USB)."""
        device_path = self.sysfs.resolve(device_path)
        found: list[Usage] = []
        for disk in self._disks_under(device_path):
            found.extend(self._block_usages(disk))
        for iface in self._ifaces_under(device_path):
            found.extend(self._net_usages(iface))
        for tag in self._9p_tags_under(device_path):
            found.extend(self._9p_usages(tag))
        return _unique(found)

    # -- virtio-9p shares (a VM whose root is the hypervisor host's tree, like the nested lab's L1) --------------

    def _9p_tags_under(self, device_path: Path) -> list[str]:
        """Mount tags of the virtio-9p channels below the device (``virtio1/mount_tag``)."""
        tags = []
        with contextlib.suppress(OSError):
            for child in sorted(device_path.iterdir()):
                if (tag := self.sysfs.read(child / "mount_tag")) is not None:
                    tags.append(tag.rstrip("\x00"))
        return tags

    def _9p_usages(self, tag: str) -> list[Usage]:
        mounted = [m for m in self._mounts if m.fstype == "9p" and m.source == tag]
        if mounted:
            return [Usage("mount", f"{m.mountpoint} (9p {tag})") for m in mounted]
        root = next((m for m in self._mounts if m.mountpoint == "/"), None)
        if root is not None and root.fstype in ("overlay", "9p"):
            # The share can sit below an overlay root whose lower layer was mounted before switch_root and
            # is no longer listed; nothing says it is not, so it counts as used (uncertain leans to used).
            return [Usage("mount", f"/ ({root.fstype} root, possibly on 9p {tag})")]
        return []

    def group_members(self, bdf: Bdf | str) -> list[GroupMember]:
        """Every function in ``bdf``'s IOMMU group (itself included) with driver, bridge flag and host use.

        Empty when the host has no IOMMU.
        """
        bdf = parse_bdf(bdf) if isinstance(bdf, str) else bdf
        members = []
        for member in self.sysfs.iommu_group_members(bdf):
            bridge = self.sysfs.is_bridge(member)
            # A bridge's "usage" would be everything behind it; the group check is about endpoints.
            usages = () if bridge else tuple(self.usages_under(self.sysfs.pci_device_path(member)))
            members.append(GroupMember(member, self.sysfs.pci_driver(member), bridge, usages))
        return members

    def group_endpoints_in_host_use(self, bdf: Bdf | str) -> list[GroupMember]:
        """The other endpoints of ``bdf``'s IOMMU group that are still bound to a host driver.

        VFIO can give a group to a guest only when every endpoint in it is bound to vfio-pci (or
        pci-stub) or to no driver; bridges do not count. Each member carries its host usages, so a
        refusal can say which of them hold a mount or an interface.
        """
        bdf = parse_bdf(bdf) if isinstance(bdf, str) else bdf
        return [m for m in self.group_members(bdf) if m.bdf != bdf and not m.bridge and m.host_bound]

    # -- block devices -------------------------------------------------------------------------------------

    @cached_property
    def _disks(self) -> dict[str, Path]:
        """``/sys/block`` entries: name -> resolved sysfs directory."""
        base = self.sysfs.path("/sys/block")
        try:
            return {e.name: self.sysfs.resolve(e) for e in sorted(base.iterdir())}
        except OSError:
            return {}

    def _disks_under(self, device_path: Path) -> list[str]:
        found = []
        for name, real in self._disks.items():
            if real.is_relative_to(device_path) or self._nvme_head_under(real, device_path):
                found.append(name)
        return found

    def _nvme_head_under(self, real: Path, device_path: Path) -> bool:
        # With NVMe native multipath, /sys/block/nvme0n1 lives under virtual/nvme-subsystem/nvme-subsysN,
        # not under the PCI function; the subsystem links to its controllers, which are.
        subsystem = real.parent
        if not subsystem.name.startswith("nvme-subsys"):
            return False
        try:
            links = [e for e in subsystem.iterdir() if e.is_symlink() and e.name.startswith("nvme")]
        except OSError:
            return False
        return any(self.sysfs.resolve(link).is_relative_to(device_path) for link in links)

    def _nodes_of(self, disk: str) -> list[_BlockNode]:
        """The disk and its partitions."""
        sysdir = self.sysfs.path(f"/sys/block/{disk}")
        nodes = [_BlockNode(disk, self.sysfs.read(sysdir / "dev"), sysdir)]
        try:
            entries = sorted(sysdir.iterdir())
        except OSError:
            entries = []
        for entry in entries:
            if entry.is_dir() and (entry / "partition").exists():
                nodes.append(_BlockNode(entry.name, self.sysfs.read(entry / "dev"), entry))
        return nodes

    def _block_usages(self, disk: str, chain: str = "", seen: set[str] | None = None) -> list[Usage]:
        """Mounts, swap and holders of ``disk`` and its partitions, following holders (dm, md) down."""
        seen = set() if seen is None else seen
        if disk in seen:
            return []
        seen.add(disk)
        found: list[Usage] = []
        for node in self._nodes_of(disk):
            label = self._label(node.name) + chain
            found.extend(Usage("mount", f"{mp} ({label})") for mp in self._mountpoints(node))
            if self._is_swap(node):
                found.append(Usage("swap", label))
            try:
                holders = sorted(e.name for e in (node.sysdir / "holders").iterdir())
            except OSError:
                holders = []
            for holder in holders:
                found.append(Usage("holder", f"{self._holder_kind(holder)} {self._label(holder)} on {label}"))
                found.extend(self._block_usages(holder, f" on {label}", seen))
        return found

    def _label(self, name: str) -> str:
        """``vg-srv`` for a device-mapper device (its name is what users know), else the kernel name."""
        return self._dm_names_by_node.get(name, name)

    def _holder_kind(self, name: str) -> str:
        if name.startswith("dm-"):
            uuid = self.sysfs.read(self.sysfs.path(f"/sys/block/{name}/dm/uuid")) or ""
            for prefix, kind in (("LVM-", "LVM"), ("CRYPT-", "dm-crypt"), ("mpath-", "multipath")):
                if uuid.startswith(prefix):
                    return kind
            return "device-mapper"
        if self.sysfs.path(f"/sys/block/{name}/md").exists():
            return "md RAID"
        return "holder"

    @cached_property
    def _dm_names_by_node(self) -> dict[str, str]:
        names = {}
        for node in self._disks:
            if node.startswith("dm-") and (name := self.sysfs.read(self.sysfs.path(f"/sys/block/{node}/dm/name"))):
                names[node] = name
        return names

    @cached_property
    def _dm_nodes_by_name(self) -> dict[str, str]:
        return {name: node for node, name in self._dm_names_by_node.items()}

    def _node_name_of(self, source: str) -> str | None:
        """The kernel block device name a ``/dev/…`` path in mounts or swaps stands for."""
        if source in self._node_names:
            return self._node_names[source]
        name = None
        if source.startswith("/dev/mapper/") and source[len("/dev/mapper/"):] in self._dm_nodes_by_name:
            name = self._dm_nodes_by_name[source[len("/dev/mapper/"):]]
        elif source.startswith("/dev/"):
            # /dev/disk/by-*/… and /dev/mapper/… are links to the node; resolve them when the tree has them.
            name = os.path.basename(os.path.realpath(self.sysfs.path(source)))
        self._node_names[source] = name
        return name

    @cached_property
    def _mounts(self) -> list[_Mount]:
        text = self.sysfs.read(self.sysfs.path("/proc/self/mountinfo"))
        if text is not None:
            return [m for line in text.splitlines() if (m := _parse_mountinfo(line))]
        text = self.sysfs.read(self.sysfs.path("/proc/self/mounts")) or ""
        mounts = []
        for line in text.splitlines():
            fields = line.split()
            if len(fields) >= 2:
                mounts.append(_Mount(None, _unescape(fields[1]), _unescape(fields[0]),
                                     fields[2] if len(fields) > 2 else ""))
        return mounts

    def _mountpoints(self, node: _BlockNode) -> list[str]:
        points = []
        for mount in self._mounts:
            if (node.majmin and mount.majmin == node.majmin) or self._node_name_of(mount.source) == node.name:
                points.append(mount.mountpoint)
        # "/" first: it is the one that matters most; bind mounts repeat a mount point, list it once.
        return sorted(dict.fromkeys(points), key=lambda p: (p != "/", p))

    @cached_property
    def _swaps(self) -> list[tuple[str, str]]:
        text = self.sysfs.read(self.sysfs.path("/proc/swaps")) or ""
        swaps = []
        for line in text.splitlines()[1:]:
            fields = line.split()
            if len(fields) >= 2:
                swaps.append((_unescape(fields[0]), fields[1]))
        return swaps

    def _is_swap(self, node: _BlockNode) -> bool:
        for filename, kind in self._swaps:
            if kind == "partition" and self._node_name_of(filename) == node.name:
                return True
            if kind == "file" and self.sysfs.is_live_host and node.majmin:
                # A swap file lives on a file system; its device is the one to protect.
                with contextlib.suppress(OSError):
                    st = os.stat(filename)
                    if f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}" == node.majmin:
                        return True
        return False

    # -- network interfaces --------------------------------------------------------------------------------

    @cached_property
    def _ifaces(self) -> dict[str, Path]:
        base = self.sysfs.path("/sys/class/net")
        try:
            return {e.name: self.sysfs.resolve(e) for e in sorted(base.iterdir())}
        except OSError:
            return {}

    def _ifaces_under(self, device_path: Path) -> list[str]:
        return [name for name, real in self._ifaces.items() if real.is_relative_to(device_path)]

    def _uppers(self, iface: str) -> list[str]:
        """Interfaces stacked on ``iface`` (bridge, bond, VLAN, macvlan), recursively, in order found."""
        found: list[str] = []
        todo = [iface]
        while todo:
            current = todo.pop(0)
            try:
                entries = sorted(self.sysfs.path(f"/sys/class/net/{current}").iterdir())
            except OSError:
                continue
            for entry in entries:
                name = entry.name[len("upper_"):] if entry.name.startswith("upper_") else None
                if entry.name == "master":
                    name = self.sysfs.link_name(entry)
                if name and name != iface and name not in found:
                    found.append(name)
                    todo.append(name)
        return found

    def _net_usages(self, iface: str) -> list[Usage]:
        found = []
        for name in [iface, *self._uppers(iface)]:
            label = name if name == iface else f"{name} over {iface}"
            if self._is_up(name):
                addrs = [*self._ipv4_of(name), *self._ipv6.get(name, [])]
                if addrs:
                    found.append(Usage("net", f"{label} is up with {', '.join(addrs)}"))
                elif self._ipv4 is None:
                    found.append(Usage("net", f"{label} is up (its IPv4 addresses could not be read)"))
            if name in self._default_routes:
                found.append(Usage("route", f"default route via {label}"))
        return found

    def _is_up(self, name: str) -> bool:
        flags = self.sysfs.read(self.sysfs.path(f"/sys/class/net/{name}/flags"))
        try:
            return bool(int(flags or "0", 16) & _IFF_UP)
        except ValueError:
            return True  # unreadable: assume up rather than hand the interface away

    def _ipv4_of(self, name: str) -> list[str]:
        return list((self._ipv4 or {}).get(name, []))

    @cached_property
    def _ipv4(self) -> Mapping[str, Sequence[str]] | None:
        if self._ipv4_given is not None:
            return self._ipv4_given
        if not self.sysfs.is_live_host:  # a snapshot of another host carries its addresses (or none)
            return read_ipv4(self.sysfs.root) or {}
        return _ip_addr_v4()

    @cached_property
    def _ipv6(self) -> dict[str, list[str]]:
        text = self.sysfs.read(self.sysfs.path("/proc/net/if_inet6")) or ""
        addrs: dict[str, list[str]] = {}
        for line in text.splitlines():
            fields = line.split()
            if len(fields) < 6:
                continue
            try:
                scope = int(fields[3], 16)
                addr = ipaddress.IPv6Address(int(fields[0], 16))
                prefix = int(fields[2], 16)
            except ValueError:
                continue
            if scope & _IPV6_LINK_SCOPE or addr.is_loopback:  # every up interface has a link-local address
                continue
            addrs.setdefault(fields[5], []).append(f"{addr}/{prefix}")
        return addrs

    @cached_property
    def _default_routes(self) -> set[str]:
        names = set()
        text = self.sysfs.read(self.sysfs.path("/proc/net/route")) or ""
        for line in text.splitlines()[1:]:
            f = line.split()
            with contextlib.suppress(ValueError, IndexError):
                if f[1] == "00000000" and f[7] == "00000000" and int(f[3], 16) & _RTF_UP:
                    names.add(f[0])
        text = self.sysfs.read(self.sysfs.path("/proc/net/ipv6_route")) or ""
        for line in text.splitlines():
            f = line.split()
            with contextlib.suppress(ValueError, IndexError):
                flags = int(f[8], 16)
                # The kernel keeps an unreachable ::/0 on lo; that is not a route anywhere.
                if int(f[0], 16) == 0 and f[1] == "00" and flags & _RTF_UP and not flags & _RTF_REJECT \
                        and f[9] != "lo":
                    names.add(f[9])
        return names


def _ip_addr_v4() -> dict[str, list[str]] | None:
    """IPv4 addresses per interface from ``ip -j -4 addr show`` (read-only), or None when unavailable."""
    ip = shutil.which("ip") or next((p for p in ("/usr/sbin/ip", "/sbin/ip") if os.path.exists(p)), None)
    if ip is None:
        return None
    try:
        proc = subprocess.run([ip, "-j", "-4", "addr", "show"], capture_output=True, text=True,
                              timeout=_IP_TIMEOUT, check=False)
        data = json.loads(proc.stdout) if proc.returncode == 0 else None
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    if not isinstance(data, list):
        return None
    addrs: dict[str, list[str]] = {}
    for link in data:
        for info in link.get("addr_info", []) if isinstance(link, dict) else []:
            if info.get("family") == "inet" and info.get("local"):
                addrs.setdefault(link.get("ifname", "?"), []).append(f"{info['local']}/{info.get('prefixlen', 32)}")
    return addrs


def _parse_mountinfo(line: str) -> _Mount | None:
    # ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTIONS
    fields = line.split()
    try:
        sep = fields.index("-", 6)
        return _Mount(fields[2], _unescape(fields[4]), _unescape(fields[sep + 2]), fields[sep + 1])
    except (ValueError, IndexError):
        return None


def _unescape(text: str) -> str:
    r"""Undo the kernel's octal escapes in mount tables (``\040`` for a space)."""
    if "\\" not in text:
        return text
    out, i = [], 0
    while i < len(text):
        chunk = text[i + 1:i + 4]
        if text[i] == "\\" and len(chunk) == 3 and all(c in "01234567" for c in chunk):
            out.append(chr(int(chunk, 8)))
            i += 4
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def _unique(usages: Iterable[Usage]) -> list[Usage]:
    return list(dict.fromkeys(usages))


def pci_host_usages(bdf: Bdf | str, root: str | os.PathLike[str] = "/") -> list[Usage]:
    """How the host uses PCI function ``bdf`` (mounts, swap, holders, interfaces); empty when unused."""
    return HostUse(root).pci_usages(bdf)


def group_endpoints_in_host_use(bdf: Bdf | str, root: str | os.PathLike[str] = "/") -> list[GroupMember]:
    """The other endpoints of ``bdf``'s IOMMU group still bound to host drivers (see ``HostUse``)."""
    return HostUse(root).group_endpoints_in_host_use(bdf)


# -- the domain side ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Assignment:
    """A host device named in a domain's XML: a PCI function, or a USB device by ids and/or address."""

    domain: str
    where: str  # "live" (the running domain) or "config" (its persistent definition)
    kind: str  # "pci" or "usb"
    bdf: Bdf | None = None
    vendor: int | None = None
    product: int | None = None
    bus: int | None = None
    device: int | None = None

    def matches_pci(self, bdf: Bdf) -> bool:
        return self.kind == "pci" and self.bdf == bdf

    def matches_usb(self, vendor: int | None, product: int | None, bus: int | None, device: int | None) -> bool:
        """As libvirt resolves a USB hostdev: ids and address must agree where the XML gives them."""
        if self.kind != "usb" or (self.vendor is None and self.bus is None):
            return False
        if self.vendor is not None and (self.vendor, self.product) != (vendor, product):
            return False
        return self.bus is None or (self.bus, self.device) == (bus, device)


def assignments_from_xml(domain: str, xml: str, where: str) -> list[Assignment]:
    """The PCI and USB host devices that one domain XML assigns (``<hostdev>``, ``<interface type='hostdev'>``)."""
    try:
        root = etree.fromstring(xml.encode())
    except etree.XMLSyntaxError:
        return []
    found = []
    for src in root.xpath("devices/hostdev[@mode='subsystem' or not(@mode)]/source"
                          " | devices/interface[@type='hostdev']/source"):
        parent = src.getparent()
        kind = parent.get("type") if parent.tag == "hostdev" else "pci"
        addr = src.find("address")
        if kind == "pci":
            if (bdf := source_bdf(parent)) is not None:
                found.append(Assignment(domain, where, "pci", bdf=bdf))
        elif kind == "usb":
            vendor, product = src.find("vendor"), src.find("product")
            found.append(Assignment(
                domain, where, "usb",
                vendor=xml_number(vendor.get("id")) if vendor is not None else None,
                product=xml_number(product.get("id")) if product is not None else None,
                bus=xml_number(addr.get("bus")) if addr is not None else None,
                device=xml_number(addr.get("device")) if addr is not None else None,
            ))
    return found


def domain_assignments(conn: libvirt.virConnect) -> list[Assignment]:
    """Host devices assigned by every domain: a running one's live XML, and every persistent definition."""
    try:
        domains = conn.listAllDomains(0)
    except libvirt.libvirtError as exc:
        raise translate(exc, "listing domains") from exc
    found: list[Assignment] = []
    for dom in domains:
        try:
            name = dom.name()
            if dom.isActive():
                found.extend(assignments_from_xml(name, dom.XMLDesc(0), "live"))
            if dom.isPersistent():
                found.extend(assignments_from_xml(name, dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE), "config"))
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:  # went away while we looked
                continue
            raise translate(exc, "reading domain XML") from exc
    return found


def domain_usages(assignments: Iterable[Assignment], *, bdf: Bdf | None = None,
                  usb: tuple[int | None, int | None, int | None, int | None] | None = None) -> list[Usage]:
    """One ``domain`` usage per domain that assigns the device, e.g. ``guest1 (live, config)``.

    ``usb`` is (vendor, product, bus, device) of a host USB device.
    """
    wheres: dict[str, list[str]] = {}
    for a in assignments:
        if (bdf is not None and a.matches_pci(bdf)) or (usb is not None and a.matches_usb(*usb)):
            lst = wheres.setdefault(a.domain, [])
            if a.where not in lst:
                lst.append(a.where)
    return [Usage("domain", f"{name} ({', '.join(sorted(w))})") for name, w in sorted(wheres.items())]
