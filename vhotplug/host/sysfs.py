"""Read-only facts about host PCI and USB devices and the IOMMU, from a sysfs tree.

Every path is taken below an injectable root (default ``/``) so that tests can point it at a fixture tree
built in a temporary directory. Symbolic links are resolved with ``os.path.realpath``: the kernel's links
are relative (``/sys/block/vda -> ../devices/pci0000:00/0000:00:02.0/virtio1/block/vda``), so a fixture
tree with relative links resolves inside itself.

Nothing here writes: this module is also used on machines whose PCI devices are their own root disk.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from vhotplug import errors
from vhotplug.addresses import Bdf, parse_bdf

# Drivers that hold a PCI function for passthrough rather than for the host's own use.
PASSTHROUGH_DRIVERS = frozenset({"vfio-pci", "pci-stub", "pciback", "xen-pciback"})
# PCI class codes (base class + subclass) of PCI-to-PCI bridges: normal (0x0604) and semi-transparent
# (0x0609). A bridge cannot be assigned to a guest; the devices behind it would go with it.
_BRIDGE_CLASSES = frozenset({0x0604, 0x0609})

IOMMU_HINT = (
    "enable the IOMMU: VT-d (Intel) or AMD-Vi/IOMMU (AMD) in the firmware setup, and intel_iommu=on "
    "(Intel) or amd_iommu=on (AMD) on the kernel command line (e.g. GRUB_CMDLINE_LINUX in "
    "/etc/default/grub, then update-grub and reboot); /sys/kernel/iommu_groups then lists the groups"
)


@dataclass(frozen=True)
class IommuStatus:
    """Whether the host has a working IOMMU (groups in ``/sys/kernel/iommu_groups``)."""

    present: bool
    groups: int
    hint: str | None = None

    def to_dict(self) -> dict[str, object]:
        return {"present": self.present, "groups": self.groups, "hint": self.hint}


class Sysfs:
    """A sysfs tree (and the procfs next to it) below ``root``; every method only reads."""

    def __init__(self, root: str | os.PathLike[str] = "/") -> None:
        self.root = Path(root)

    @property
    def is_live_host(self) -> bool:
        """True when this is the running machine's own ``/`` (not a fixture tree)."""
        return os.path.realpath(self.root) == "/"

    def path(self, absolute: str | os.PathLike[str]) -> Path:
        """Map a host path such as ``/sys/block`` (as libvirt or the kernel write it) below the root."""
        return self.root / str(absolute).lstrip("/")

    def resolve(self, path: Path) -> Path:
        """``path`` with every symbolic link resolved (kernel links are relative, so this stays in the root)."""
        return Path(os.path.realpath(path))

    @staticmethod
    def read(path: Path) -> str | None:
        """The stripped contents of a small sysfs/procfs file, or None when it cannot be read."""
        try:
            return path.read_text(errors="replace").strip()
        except OSError:
            return None

    @staticmethod
    def link_name(path: Path) -> str | None:
        """The last component of a symbolic link's target (``driver -> ../../bus/pci/drivers/ahci``)."""
        try:
            return os.path.basename(os.readlink(path))
        except OSError:
            return None

    # -- PCI ---------------------------------------------------------------------------------------------

    def pci_dir(self, bdf: Bdf) -> Path:
        """``/sys/bus/pci/devices/BDF`` below the root (may not exist)."""
        return self.path(f"/sys/bus/pci/devices/{bdf}")

    def pci_exists(self, bdf: Bdf) -> bool:
        return self.pci_dir(bdf).exists()

    def pci_device_path(self, bdf: Bdf) -> Path:
        """The PCI function's real directory under ``/sys/devices`` (links resolved)."""
        return self.resolve(self.pci_dir(bdf))

    def pci_class(self, bdf: Bdf) -> int | None:
        """The 24-bit class code (``0x010802``), or None."""
        return _hex(self.read(self.pci_dir(bdf) / "class"))

    def pci_ids(self, bdf: Bdf) -> tuple[int | None, int | None]:
        """(vendor id, device id) from sysfs."""
        d = self.pci_dir(bdf)
        return _hex(self.read(d / "vendor")), _hex(self.read(d / "device"))

    def driver(self, device_dir: Path) -> str | None:
        """The driver bound to a device directory, or None when none is."""
        return self.link_name(device_dir / "driver")

    def pci_driver(self, bdf: Bdf) -> str | None:
        return self.driver(self.pci_dir(bdf))

    def child_drivers(self, device_dir: Path) -> list[str]:
        """Drivers bound to the device's direct children (``virtio1`` -> ``virtio_blk``), sorted, unique.

        For virtio-pci the function's own driver says little; the child's says what the device is for.
        """
        found: set[str] = set()
        try:
            entries = list(device_dir.iterdir())
        except OSError:
            return []
        for entry in entries:
            if entry.is_dir() and not entry.is_symlink() and (name := self.driver(entry)):
                found.add(name)
        return sorted(found)

    def is_bridge(self, bdf: Bdf) -> bool:
        """True for a PCI-to-PCI bridge (class 0x0604xx or 0x0609xx)."""
        code = self.pci_class(bdf)
        return code is not None and (code >> 8) in _BRIDGE_CLASSES

    # -- IOMMU -------------------------------------------------------------------------------------------

    def iommu_status(self) -> IommuStatus:
        """Present when ``/sys/kernel/iommu_groups`` has at least one group; else the hint how to enable it."""
        groups_dir = self.path("/sys/kernel/iommu_groups")
        try:
            count = sum(1 for entry in groups_dir.iterdir() if entry.name.isdigit())
        except OSError:
            count = 0
        if count:
            return IommuStatus(True, count)
        return IommuStatus(False, 0, IOMMU_HINT)

    def iommu_group(self, bdf: Bdf) -> int | None:
        """The number of the device's IOMMU group, or None (no IOMMU, or no such device)."""
        name = self.link_name(self.pci_dir(bdf) / "iommu_group")
        return int(name) if name and name.isdigit() else None

    def iommu_group_members(self, bdf: Bdf) -> list[Bdf]:
        """Every PCI function in the device's IOMMU group, the device itself included, sorted."""
        members_dir = self.pci_dir(bdf) / "iommu_group" / "devices"
        try:
            names = [entry.name for entry in members_dir.iterdir()]
        except OSError:
            return []
        members = []
        for name in names:
            with contextlib.suppress(errors.InvalidRequest):  # a member that is not a PCI function is not listed
                members.append(parse_bdf(name))
        return sorted(members)

    # -- USB ---------------------------------------------------------------------------------------------

    def usb_dir(self, bus: int, device: int) -> Path | None:
        """The sysfs directory of USB device BUS.DEVICE (``/sys/bus/usb/devices/2-1.4``), or None."""
        base = self.path("/sys/bus/usb/devices")
        try:
            entries = list(base.iterdir())
        except OSError:
            return None
        for entry in entries:
            if ":" in entry.name:  # an interface (2-1.4:1.0), not a device
                continue
            if _int(self.read(entry / "busnum")) == bus and _int(self.read(entry / "devnum")) == device:
                return entry
        return None

    def usb_interface_drivers(self, device_dir: Path) -> list[str]:
        """Drivers bound to a USB device's interfaces (``usb-storage``, ``usbhid``), sorted, unique."""
        found: set[str] = set()
        try:
            entries = list(device_dir.iterdir())
        except OSError:
            return []
        for entry in entries:
            if ":" in entry.name and (name := self.driver(entry)):
                found.add(name)
        return sorted(found)

    def usb_class(self, device_dir: Path) -> int | None:
        """``bDeviceClass`` (0x00 means: given per interface; then the first interface's class)."""
        code = _hex(self.read(device_dir / "bDeviceClass"))
        if code:
            return code
        try:
            interfaces = sorted(e for e in device_dir.iterdir() if ":" in e.name)
        except OSError:
            return code
        for entry in interfaces:
            if (sub := _hex(self.read(entry / "bInterfaceClass"))) is not None:
                return sub
        return code


def _hex(text: str | None) -> int | None:
    if not text:
        return None
    try:
        return int(text, 16)
    except ValueError:
        return None


def _int(text: str | None) -> int | None:
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        return None


def is_bridge(bdf: Bdf | str, root: str | os.PathLike[str] = "/") -> bool:
    """True when the host PCI function ``bdf`` is a PCI-to-PCI bridge (class 0x0604xx/0x0609xx)."""
    return Sysfs(root).is_bridge(parse_bdf(bdf) if isinstance(bdf, str) else bdf)


def iommu_status(root: str | os.PathLike[str] = "/") -> IommuStatus:
    """Whether the host has an IOMMU; when not, ``hint`` says how to enable it."""
    return Sysfs(root).iommu_status()
