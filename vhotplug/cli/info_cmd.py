"""``vhotplug info pci|usb``: QEMU's own view of a running guest's PCI and USB devices (read-only)."""

from __future__ import annotations

import libvirt
import typer

from vhotplug import errors
from vhotplug.cli import output
from vhotplug.cli.options import DomainArg
from vhotplug.cli.state import OutputFormat, state
from vhotplug.virt.connection import connection, is_running, lookup_domain
from vhotplug.virt.errors import translate

app = typer.Typer(
    no_args_is_help=True,
    help="What QEMU itself says a running guest has: `info pci` and `info usb` of the QEMU monitor, "
         "read through libvirt (read-only; libvirt logs the domain as tainted \"custom-monitor\").",
)

PCI_COLUMNS = [("address", "ADDRESS"), ("vendor_device", "VENDOR:DEVICE"), ("class_name", "CLASS"),
               ("qdev_id", "ID (LIBVIRT ALIAS)"), ("behind", "BEHIND")]
USB_COLUMNS = [("device", "DEVICE"), ("port", "PORT"), ("speed", "SPEED"), ("product", "PRODUCT"),
               ("id", "ID (LIBVIRT ALIAS)")]


def _running_qemu_domain(conn: libvirt.virConnect, domain: str, what: str) -> libvirt.virDomain:
    """The domain, refused unless QEMU runs it: only then is there a monitor to ask."""
    try:
        driver = conn.getType()
    except libvirt.libvirtError as exc:
        raise translate(exc, "asking libvirt for its hypervisor type") from exc
    dom = lookup_domain(conn, domain)
    if driver != "QEMU":
        raise errors.Unsupported(f"`vhotplug info {what}` reads QEMU's monitor: {dom.name()} is a {driver} "
                                 "domain, not a QEMU one")
    if not is_running(dom):
        raise errors.OperationInvalid(
            f"{dom.name()} is not running: QEMU's monitor exists only while the domain runs",
            hint=f"`vhotplug list {dom.name()}` shows the devices of its definition",
        )
    return dom


@app.command("pci")
def info_pci(ctx: typer.Context, domain: DomainArg) -> None:
    """QEMU's PCI functions of DOMAIN (QMP query-pci), with their libvirt aliases.

    One row per PCI function, bridges recursed into: the address as the guest
    numbered its buses (what lspci in the guest shows; the bus can differ from
    the bus index in libvirt's XML), vendor:device, class, QEMU's device id,
    which is libvirt's alias (net0, ua-nic1, hostdev0; "-" for devices libvirt
    did not name), and the bridge the function sits behind.

    Reads QEMU's monitor through libvirt, as `virsh qemu-monitor-command` does.
    Read-only, but libvirt marks the domain as tainted ("custom-monitor") in
    its log, as it does for virsh. Needs a running QEMU domain.
    """

    from vhotplug.virt import monitor

    st = state(ctx)
    with connection(st.uri) as conn:
        dom = _running_qemu_domain(conn, domain, "pci")
        functions = monitor.query_pci(dom)
        name = dom.name()
    if st.output is OutputFormat.json:
        output.json_out({"domain": name, "source": "QMP query-pci", "functions": [f.to_dict() for f in functions]})
        return
    rows = [{**f.to_dict(), "class_name": f.class_name, "behind": f.bridge_id or f.bridge} for f in functions]
    output.table(rows, PCI_COLUMNS, title=f"PCI functions of {name} (QEMU query-pci; guest bus numbers):")


@app.command("usb")
def info_usb(ctx: typer.Context, domain: DomainArg) -> None:
    """QEMU's USB devices of DOMAIN (HMP info usb), with their libvirt aliases.

    One row per device: DEVICE is bus.address as the guest assigned it (0.0
    until the guest has enumerated the device), PORT is the port in libvirt's
    XML, then speed, product and QEMU's device id, which is libvirt's alias
    (ua-usb1, input2). Lines of QEMU's answer that are not devices are shown
    as they are.

    Reads QEMU's monitor through libvirt, as `virsh qemu-monitor-command` does.
    Read-only, but libvirt marks the domain as tainted ("custom-monitor") in
    its log, as it does for virsh. Needs a running QEMU domain.
    """

    from vhotplug.virt import monitor

    st = state(ctx)
    with connection(st.uri) as conn:
        dom = _running_qemu_domain(conn, domain, "usb")
        rows = monitor.info_usb(dom)
        name = dom.name()
    devices = [r for r in rows if r.parsed]
    unparsed = [r.raw for r in rows if not r.parsed]
    if st.output is OutputFormat.json:
        output.json_out({"domain": name, "source": "HMP info usb", "devices": [r.to_dict() for r in devices],
                         "unparsed": unparsed})
        return
    if devices:
        output.table([r.to_dict() for r in devices], USB_COLUMNS,
                     title=f"USB devices of {name} (QEMU info usb):")
    elif not unparsed:
        typer.echo(f"No USB devices in {name} (QEMU info usb answered nothing).")
    if unparsed:
        if devices:
            typer.echo("")
        typer.echo(f"QEMU's info usb for {name} also said (not understood as devices, shown as is):")
        for line in unparsed:
            typer.echo(f"  {line}")
