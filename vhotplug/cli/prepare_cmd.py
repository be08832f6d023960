"""``vhotplug prepare``: give a domain's definition room to hot-plug vCPUs, memory and PCIe devices."""

from __future__ import annotations

from typing import Annotated

import typer

from vhotplug.cli import output
from vhotplug.cli.options import DomainArg
from vhotplug.cli.state import OutputFormat, state
from vhotplug.virt.connection import connection, lookup_domain

NEXT_BOOT = "takes effect at the next boot (the running domain is unchanged)"


def prepare(
    ctx: typer.Context,
    domain: DomainArg,
    max_vcpus: Annotated[int | None, typer.Option("--max-vcpus", metavar="N",
                                                  help="Maximum vCPUs (the boot count stays).")] = None,
    max_memory: Annotated[str | None, typer.Option("--max-memory", metavar="SIZE",
                                                   help="maxMemory, like virsh: 4G, 4096M (bare number: MiB); "
                                                        "default with --slots: memory x 4.")] = None,
    slots: Annotated[int | None, typer.Option("--slots", metavar="N",
                                              help="DIMM slots, 1-255 (default with --max-memory: 4).")] = None,
    pcie_ports: Annotated[int | None, typer.Option("--pcie-ports", metavar="N",
                                                   help="Free pcie-root-ports wanted (q35); added as needed.")]
    = None,
    xen_passthrough: Annotated[bool, typer.Option("--xen-passthrough",
                                                  help="Xen: start the guest with PCI passthrough on (needed "
                                                       "before `attach pci` into a running PV/HVM guest).")]
    = False,
    print_xml: Annotated[bool, typer.Option("--print-xml",
                                            help="Print a diff of the definition and change nothing.")] = False,
) -> None:
    """Make the persistent definition of DOMAIN hotplug-ready (next boot).

    Sets <vcpu current='C'>N</vcpu>, <maxMemory slots='S'> with a NUMA cell
    (QEMU needs one for memory hot-plug) and, on q35, enough free
    pcie-root-ports; on Xen, PCI passthrough (--xen-passthrough). The running
    domain is not changed; a second run is a no-op.
    """
    from vhotplug.ops.prepare import make_request, prepare_domain  # only this command needs it

    st = state(ctx)
    req = make_request(max_vcpus=max_vcpus, max_memory=max_memory, slots=slots, pcie_ports=pcie_ports,
                       xen_passthrough=xen_passthrough)
    with connection(st.uri) as conn:
        outcome = prepare_domain(conn, lookup_domain(conn, domain), req, dry_run=print_xml)

    if st.output is OutputFormat.json:
        output.json_out(outcome.to_dict())
        return
    if print_xml:
        typer.echo(outcome.diff or f"{outcome.domain} is already hotplug-ready: no change", nl=not outcome.diff)
        return
    if not outcome.changes:
        typer.echo(f"{outcome.domain} is already hotplug-ready: nothing changed")
        return
    typer.echo(f"prepared {outcome.domain}:")
    for change in outcome.changes:
        typer.echo(f"  {change}")
    if outcome.running:
        typer.echo(f"this {NEXT_BOOT}: stop and start the domain (a reboot from inside the guest is not enough)")
