"""May this host device be taken from the host and given to a guest? The checks made before anything changes.

The seed's SATA example begins "make sure the host does not boot from this controller"; vhotplug makes
that check (and the others below) itself, every time, and refuses with every reason it found:

- PCI: the host has no IOMMU; the function is a PCI bridge; its IOMMU group holds other endpoints still
  bound to host drivers; a domain already has it; the host uses it (a mount, swap, an LVM/md member, an
  interface that is up with addresses or carries the default route).
- USB: a hub (or a root hub); a domain already has it; the host uses it (e.g. a mounted USB disk).

Only the host-use reasons can be overridden (``--force``): the others would fail later anyway, or take
something from another guest. When the host's own sysfs cannot be read (a remote hypervisor), host use is
not known, and an unknown answer is treated like "used" until the operator says ``--force``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vhotplug import errors
from vhotplug.addresses import Bdf
from vhotplug.host.inventory import NodeDev
from vhotplug.host.sysfs import IOMMU_HINT, Sysfs
from vhotplug.host.usage import Assignment, GroupMember, HostUse, Usage, domain_usages

_BRIDGE_CLASSES = (0x0604, 0x0609)
_USB_HUB_CLASS = 0x09
_LINUX_FOUNDATION = 0x1D6B  # vendor of the kernel's root hubs


@dataclass(frozen=True)
class Refusal:
    """One reason not to pass a device through; ``check`` names it for scripts (JSON) and tests."""

    check: str  # iommu, bridge, group, assigned, host-use, host-use-unknown, hub
    reason: str
    forceable: bool = False

    def to_dict(self) -> dict[str, object]:
        return {"check": self.check, "reason": self.reason, "forceable": self.forceable}


class Refused(errors.UnsafeDevice):
    """The checks said no; ``refusals`` lists why. Exit code 6 when the host has no IOMMU, else 14."""

    def __init__(self, message: str, refusals: list[Refusal], *, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.refusals = refusals
        if any(r.check == "iommu" for r in refusals):
            self.exit_code = errors.ExitCode.UNSUPPORTED


def _usages(usages: list[Usage] | tuple[Usage, ...]) -> str:
    return ", ".join(str(u) for u in usages)


def _member(m: GroupMember) -> str:
    use = f": {_usages(m.usages)}" if m.usages else ""
    return f"{m.bdf} ({m.driver}{use})"


def pci_refusals(node: NodeDev, *, facts_root: Path | None, assignments: list[Assignment],
                 members: list[GroupMember] | None = None, facts_note: str | None = None,
                 iommu_visible: bool = True) -> list[Refusal]:
    """Every reason not to give host PCI function ``node`` to a guest (empty: it may go).

    ``facts_root`` is the host's own tree (``/``) when the hypervisor is this machine, else None; then
    ``members`` (the IOMMU group's other functions as libvirt reports them) stand in for sysfs.
    ``iommu_visible`` False: the hypervisor owns the IOMMU and the host kernel cannot see it (Xen's
    dom0); then the hypervisor refuses the assignment itself if it has none, and no IOMMU check is made here.
    """
    bdf = node.bdf
    assert bdf is not None
    found: list[Refusal] = []
    sysfs = Sysfs(facts_root) if facts_root is not None else None
    local = sysfs is not None and sysfs.pci_exists(bdf)
    iommu = sysfs.iommu_status().present if sysfs is not None else node.iommu_group is not None
    if not iommu and iommu_visible:
        found.append(Refusal("iommu", f"the host has no IOMMU, so {bdf} cannot be isolated for a guest "
                             f"(/sys/kernel/iommu_groups is empty)"))
    code = sysfs.pci_class(bdf) if local and sysfs is not None else node.class_code
    if code is not None and (code >> 8) in _BRIDGE_CLASSES:
        found.append(Refusal("bridge", f"{bdf} is a PCI bridge: the devices behind it would go with it"))
    use = HostUse(facts_root) if local and facts_root is not None else None
    if use is not None:
        others = use.group_endpoints_in_host_use(bdf)
    else:
        others = [m for m in (members or []) if m.bdf != bdf and not m.bridge and m.host_bound]
    if others:
        group = sysfs.iommu_group(bdf) if local and sysfs is not None else node.iommu_group
        found.append(Refusal(
            "group", f"its IOMMU group {group} also holds {', '.join(_member(m) for m in others)}, still bound "
            "to host drivers; a group goes to a guest whole"))
    assigned = domain_usages(assignments, bdf=bdf)
    if assigned:
        found.append(Refusal("assigned", f"{bdf} is already assigned to {_usages_domains(assigned)}"))
    found += _host_use(str(bdf), use.pci_usages(bdf) if use is not None else None, facts_note)
    return found


def _host_use(name: str, usages: list[Usage] | None, facts_note: str | None) -> list[Refusal]:
    """The host-use refusal (``usages`` None: they could not be read), or none."""
    if usages is None:
        return [Refusal("host-use-unknown", f"cannot see whether the host uses {name} "
                        f"({facts_note or 'its sysfs is not on this machine'})", forceable=True)]
    if usages:
        return [Refusal("host-use", f"the host uses {name}: {_usages(usages)}", forceable=True)]
    return []


def _usages_domains(usages: list[Usage]) -> str:
    return "domain " + ", ".join(u.detail for u in usages)


def usb_refusals(node: NodeDev, *, facts_root: Path | None, assignments: list[Assignment],
                 usb_class: int | None = None, facts_note: str | None = None) -> list[Refusal]:
    """Every reason not to give host USB device ``node`` to a guest (empty: it may go)."""
    found: list[Refusal] = []
    name = f"USB device {node.bus or 0:03d}.{node.device or 0:03d}"
    if node.vendor_id == _LINUX_FOUNDATION or usb_class == _USB_HUB_CLASS:
        found.append(Refusal("hub", f"{name} is a hub: pass the devices plugged into it instead"))
    assigned = domain_usages(assignments, usb=(node.vendor_id, node.product_id, node.bus, node.device))
    if assigned:
        found.append(Refusal("assigned", f"{name} is already assigned to {_usages_domains(assigned)}"))
    sysfs = Sysfs(facts_root) if facts_root is not None else None
    udir = None
    if sysfs is not None:
        udir = sysfs.path(node.path) if node.path else None
        if (udir is None or not udir.exists()) and node.bus is not None and node.device is not None:
            udir = sysfs.usb_dir(node.bus, node.device)
    usages = None
    if facts_root is not None and udir is not None and udir.exists():
        usages = HostUse(facts_root).usages_under(udir)
    found += _host_use(name, usages, facts_note)
    return found


def enforce(refusals: list[Refusal], *, force: bool, what: str) -> None:
    """Raise when any refusal stands (``force`` drops only the host-use ones); else return.

    No IOMMU is exit code 6 (the host cannot do it); any other reason is exit code 14 (unsafe).
    """
    left = [r for r in refusals if not (force and r.forceable)]
    if not left:
        return
    reasons = "; ".join(r.reason for r in left)
    message = f"refusing to give {what} to a guest: {reasons}"
    if set_aside := [r for r in refusals if force and r.forceable]:
        message += f" (--force set aside: {'; '.join(r.reason for r in set_aside)})"
    hints = []
    if any(r.check == "iommu" for r in left):
        hints.append(IOMMU_HINT)
    if not force and any(r.forceable for r in left):
        hints.append("--force overrides the host-use check only, if you are sure the host can do without it")
    raise Refused(message, left, hint="; ".join(hints) or None)


def describe_pci(bdf: Bdf, node: NodeDev) -> str:
    ids = ""
    if node.vendor_id is not None and node.product_id is not None:
        ids = f" [{node.vendor_id:04x}:{node.product_id:04x}]"
    return f"PCI device {bdf}{ids}"
