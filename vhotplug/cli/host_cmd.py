"""``vhotplug host``: the host's own devices that could be passed through, and who uses each one (read-only)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from vhotplug.cli import output
from vhotplug.cli.state import OutputFormat, state
from vhotplug.virt.connection import connection
from vhotplug.virt.flavor import QEMU, Flavor, flavor_of

if TYPE_CHECKING:
    from vhotplug.host.inventory import HostDevice, HostInventory

app = typer.Typer(no_args_is_help=True, help="The host's PCI and USB devices: IOMMU groups and who uses them.")

PCI_COLUMNS = [("address", "ADDRESS"), ("ids", "VENDOR:PRODUCT"), ("description", "NAME"), ("class", "CLASS"),
               ("driver", "DRIVER"), ("iommu", "IOMMU GROUP"), ("used_by", "USED BY")]
USB_COLUMNS = [("address", "BUS.DEV"), ("ids", "VENDOR:PRODUCT"), ("description", "NAME"), ("class", "CLASS"),
               ("driver", "DRIVER"), ("used_by", "USED BY"), ("name", "NODE DEVICE")]
_MAX_USAGES_SHOWN = 4


@app.command("list")
def list_host(
    ctx: typer.Context,
    pci: Annotated[bool, typer.Option("--pci", help="Only PCI devices.")] = False,
    usb: Annotated[bool, typer.Option("--usb", help="Only USB devices.")] = False,
) -> None:
    """List the host's PCI and USB devices (libvirt node devices) and who uses each one.

    For each: address, vendor:product (with names from libvirt or pci.ids/usb.ids), class, bound
    driver, IOMMU group and its other members, and who uses it: the host (a mount, swap, an LVM/md/dm
    member, a network interface that is up with addresses or carries the default route) or a domain
    (a <hostdev> in its live XML or definition). Host use is read from this machine's sysfs for a
    local URI, and over SSH (a read-only snapshot, python3 on the host) for qemu+ssh://. Changes nothing.
    """
    st = state(ctx)
    if not pci and not usb:
        pci = usb = True
    with connection(st.uri) as conn:
        from vhotplug.host import inventory  # host-side code only for host commands
        from vhotplug.host.facts import facts_for_uri

        facts = facts_for_uri(conn.getURI())
        inv = inventory.host_inventory(conn, pci=pci, usb=usb, root=facts.root)
        flavor = flavor_of(conn)
    if st.output is OutputFormat.json:
        output.json_out({**inv.to_dict(), "hypervisor": flavor.name,
                         "iommu_visible_to_host": flavor.host_iommu_visible})
        return
    _print(inv, pci=pci, usb=usb, flavor=flavor)


def _print(inv: HostInventory, *, pci: bool, usb: bool, flavor: Flavor = QEMU) -> None:
    if inv.facts_root is None:
        where = "not checked: the libvirt host is not this machine"
    elif str(inv.facts_root) == "/":
        where = "read from this machine's sysfs"
    else:
        where = "read over SSH from the libvirt host"
    if pci:
        rows = [_pci_row(d) for d in inv.devices if d.kind == "pci"]
        output.table(rows, PCI_COLUMNS, title=f"Host PCI devices (libvirt node devices; host use {where}):")
        typer.echo("")
        typer.echo(_iommu_line(inv) if flavor.host_iommu_visible else
                   f"IOMMU: {flavor.label} owns it and dom0 cannot see it; the hypervisor refuses a passthrough "
                   "itself when it has none")
    if usb:
        if pci:
            typer.echo("")
        rows = [_usb_row(d) for d in inv.devices if d.kind == "usb"]
        output.table(rows, USB_COLUMNS, title=f"Host USB devices (libvirt node devices; host use {where}):")


def _iommu_line(inv: HostInventory) -> str:
    if inv.iommu is None:
        return "IOMMU: unknown"
    if inv.iommu.present:
        return f"IOMMU: present ({inv.iommu.groups} groups)"
    return f"IOMMU: none on this host, so no PCI device can be passed through.\n  To fix: {inv.iommu.hint}"


def _common(dev: HostDevice) -> dict[str, object]:
    driver = dev.driver or ""
    if dev.child_drivers:
        driver = f"{driver} ({', '.join(dev.child_drivers)})" if driver else ", ".join(dev.child_drivers)
    klass = " ".join(x for x in (dev.class_text, dev.class_name) if x)
    return {"name": dev.name, "address": dev.address, "ids": dev.vendor_product, "description": dev.description,
            "class": klass, "driver": driver, "used_by": _used_by(dev)}


def _pci_row(dev: HostDevice) -> dict[str, object]:
    row = _common(dev)
    if dev.iommu_group is not None:
        others = [f"{m.bdf} {m.driver or 'no driver'}" + (" bridge" if m.bridge else "") for m in dev.iommu_members]
        row["iommu"] = f"{dev.iommu_group}" + (f": also {', '.join(others)}" if others else " (alone)")
    if dev.bridge:
        row["class"] = f"{row['class']} [bridge]"
    return row


def _usb_row(dev: HostDevice) -> dict[str, object]:
    return _common(dev)


def _used_by(dev: HostDevice) -> str:
    # The kinds whose detail does not say what it is get their kind in front ("mount /", "swap vdb1").
    parts = [u.detail if u.kind in ("net", "route") else f"{u.kind} {u.detail}" for u in dev.host_usages or []]
    if len(parts) > _MAX_USAGES_SHOWN:
        parts = [*parts[:_MAX_USAGES_SHOWN], f"… {len(parts) - _MAX_USAGES_SHOWN} more (-o json)"]
    text = "host: " + "; ".join(parts) if parts else ""
    if dev.host_usages is None:
        text = "host: not checked"
    if dev.domain_usages:
        doms = "domain " + "; ".join(u.detail for u in dev.domain_usages)
        text = f"{text}; {doms}" if text else doms
    return text
