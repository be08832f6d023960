"""``vhotplug list``: the hot-pluggable devices of a domain, and the guest's own view."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer

from vhotplug.cli import output
from vhotplug.cli.options import AcceptNewOpt, DomainArg, KnownHostsOpt, SSHJumpOpt, SSHKeyOpt, SSHOpt
from vhotplug.cli.state import OutputFormat, state
from vhotplug.guest.ssh import GuestSession
from vhotplug.guest.target import resolve_target
from vhotplug.virt.connection import connection, domain_xml, is_running, lookup_domain
from vhotplug.virt.devices import hotpluggable_devices

if TYPE_CHECKING:
    from vhotplug.guest.probe import GuestView

DEVICE_COLUMNS = [("kind", "KIND"), ("alias", "ALIAS"), ("address", "GUEST ADDRESS"),
                  ("model", "MODEL/BUS"), ("source", "SOURCE"), ("identity", "MAC/TARGET")]


def list_devices(
    ctx: typer.Context,
    domain: DomainArg,
    guest: Annotated[bool, typer.Option("--guest", help="Also show the guest's own view over SSH (like lspci -k).")]
    = False,
    inactive: Annotated[bool, typer.Option("--inactive", help="Read the persistent definition, not the live XML.")]
    = False,
    ssh: SSHOpt = None,
    ssh_key: SSHKeyOpt = None,
    known_hosts: KnownHostsOpt = None,
    accept_new_host_key: AcceptNewOpt = False, ssh_jump: SSHJumpOpt = None,
) -> None:
    """List the hot-pluggable devices of DOMAIN (disks, NICs, hostdevs, DIMMs, ...).

    With --guest, also log into the guest and show what it sees: PCI functions
    with their bound drivers, network interfaces, block devices, CPUs and memory.
    """
    st = state(ctx)
    with connection(st.uri) as conn:
        dom = lookup_domain(conn, domain)
        running = is_running(dom)
        devices = hotpluggable_devices(domain_xml(dom, inactive=inactive or not running))
        view: GuestView | None = None
        if guest:
            target = resolve_target(dom, ssh=ssh, key=ssh_key, known_hosts=known_hosts, jump=ssh_jump)
            with GuestSession(target, accept_new_host_key=accept_new_host_key, share=True) as session:
                from vhotplug.guest.probe import guest_view  # only --guest needs it

                view = guest_view(session)
        name = dom.name()

    if st.output is OutputFormat.json:
        doc: dict[str, Any] = {"domain": name, "running": running,
                               "xml": "inactive" if inactive or not running else "live",
                               "devices": [d.to_dict() for d in devices]}
        if view is not None:
            doc["guest"] = view.to_dict()
        output.json_out(doc)
        return
    which = "persistent definition" if inactive or not running else "live"
    output.table([d.to_dict() for d in devices], DEVICE_COLUMNS,
                 title=f"Hot-pluggable devices of {name} (libvirt, {which}):")
    if view is not None:
        _print_guest(view)


def _print_guest(view: GuestView) -> None:
    typer.echo("")
    output.table([vars(p) for p in view.pci],
                 [("address", "PCI ADDRESS"), ("vendor_device", "VENDOR:DEVICE"), ("pci_class", "CLASS"),
                  ("driver", "DRIVER")], title="Guest PCI functions:")
    typer.echo("")
    output.table([vars(n) for n in view.net],
                 [("name", "IFACE"), ("mac", "MAC"), ("state", "STATE"), ("driver", "DRIVER"),
                  ("pci_address", "DEVICE")], title="Guest network interfaces:")
    typer.echo("")
    output.table([{**vars(b), "size": f"{b.size_bytes / 2**20:.0f} MiB"} for b in view.block],
                 [("name", "BLOCK"), ("size", "SIZE"), ("readonly", "RO"), ("serial", "SERIAL")],
                 title="Guest block devices:")
    typer.echo("")
    typer.echo(f"Guest CPUs: online {view.cpus_online or '-'} ({view.online_cpu_count}), "
               f"present {view.cpus_present or '-'}, possible {view.cpus_possible or '-'}")
    typer.echo(f"Guest memory: MemTotal {view.memtotal_kib / 1024:.0f} MiB, "
               f"blocks online {view.memory_blocks_online}, offline {view.memory_blocks_offline} "
               f"(block size {view.memory_block_bytes // 2**20} MiB)")
