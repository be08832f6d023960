"""``vhotplug attach pci|usb``: give a host device to a guest (the seed's pci-stub + device_add, usb_add)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import libvirt
import typer

from vhotplug import errors, templates
from vhotplug.addresses import UsbDevice, parse_bdf, parse_usb_spec
from vhotplug.cli import output
from vhotplug.cli.guest_access import open_guest
from vhotplug.cli.options import (
    AcceptNewOpt,
    ConfigOpt,
    CurrentOpt,
    DomainArg,
    KnownHostsOpt,
    LiveOpt,
    PersistentOpt,
    PrintXmlOpt,
    SSHJumpOpt,
    SSHKeyOpt,
    SSHOpt,
    TimeoutOpt,
    VerifyOpt,
    WaitLockOpt,
)
from vhotplug.cli.state import OutputFormat, state
from vhotplug.guest import privilege
from vhotplug.guest.ping import check_address, ping_through
from vhotplug.host import lock
from vhotplug.virt.connection import connection, lookup_domain, resolve_affect

if TYPE_CHECKING:
    from vhotplug.ops.passthrough import HostdevPlan, PassthroughOutcome

IdOpt = Annotated[str | None, typer.Option("--id", help="Device id; stored as alias ua-ID (default pciN / usbN).")]
ForceOpt = Annotated[bool, typer.Option(
    "--force", help="Pass the device through even though the host uses it (a mount, an interface). "
                    "Overrides nothing else: no IOMMU, a bridge, a shared IOMMU group or another domain's "
                    "device are always refused.")]


def pci(
    ctx: typer.Context,
    domain: DomainArg,
    device: Annotated[str, typer.Argument(metavar="BDF",
                                          help="Host PCI address: 06:10.1, 0000:06:10.1 or pci_0000_06_10_1.")],
    managed: Annotated[bool | None, typer.Option(
        "--managed/--unmanaged",
        help="managed: libvirt moves the device between its host driver and vfio-pci itself. unmanaged: vhotplug "
             "does it (journaled, rolled back on failure). Default: unmanaged for a live-only attach, managed "
             "when the definition changes (so the next boot finds it).")] = None,
    id: IdOpt = None,
    force: ForceOpt = False,
    ping: Annotated[str | None, typer.Option(metavar="ADDR",
                                             help="For a NIC: bring its interface up in the guest and ping ADDR.")]
    = None,
    live: LiveOpt = False, config: ConfigOpt = False, current: CurrentOpt = False, persistent: PersistentOpt = False,
    print_xml: PrintXmlOpt = False, verify: VerifyOpt = None, timeout: TimeoutOpt = 30.0,
    ssh: SSHOpt = None, ssh_key: SSHKeyOpt = None, known_hosts: KnownHostsOpt = None,
    accept_new_host_key: AcceptNewOpt = False, ssh_jump: SSHJumpOpt = None, wait_lock: WaitLockOpt = False,
) -> None:
    """Give a host PCI function to a guest: checks, host detach (vfio-pci), attach, verify in the guest.

    Refused before anything changes when the host has no IOMMU (exit 6), or the device is a bridge,
    shares its IOMMU group with devices the host still drives, belongs to a domain already, or is used
    by the host (exit 14; --force overrides only the last). The guest check waits for the device's
    vendor:device with a driver bound (lspci -k), and names its interface for a NIC (ethtool -i).
    Any failure or Ctrl-C gives the device back to its host driver.
    """
    from vhotplug.ops.passthrough import facts_root_for, plan_pci  # host-side modules: only these commands pay

    st = state(ctx)
    bdf = parse_bdf(device)
    if ping is not None:
        check_address(ping)  # a bad --ping was refused only after the device was passed through
    with connection(st.uri) as conn:
        dom = lookup_domain(conn, domain)
        affect = resolve_affect(dom, live=live, config=config, current=current, persistent=persistent)
        is_managed = managed if managed is not None else affect.config
        facts = facts_root_for(conn)
        if print_xml:
            plan = plan_pci(conn, dom, bdf, managed=is_managed, id=id, force=force, facts_root=facts.root,
                            facts_note=facts.why_not, check=False, live=affect.live)
            typer.echo(templates.tostring(plan.element), nl=False)
            return
        if ping and not affect.live:
            raise errors.InvalidRequest("--ping needs a live attach")
        keys = [lock.domain_key(dom.UUIDString()), lock.pci_key(bdf)]
        with lock.acquire(keys, wait=wait_lock):
            plan = plan_pci(conn, dom, bdf, managed=is_managed, id=id, force=force, facts_root=facts.root,
                            facts_note=facts.why_not, live=affect.live)
            outcome, doc = _attach(conn, dom, plan, affect_flags=affect.flags, live=affect.live, verify=verify,
                                   timeout=timeout, ssh=ssh, ssh_key=ssh_key, known_hosts=known_hosts,
                                   accept_new_host_key=accept_new_host_key, ssh_jump=ssh_jump, ping=ping, uri=st.uri)
    _report(st.output, domain, outcome, doc)


def usb(
    ctx: typer.Context,
    domain: DomainArg,
    device: Annotated[str, typer.Argument(
        metavar="SPEC", help="host:VENDOR:PRODUCT, host:BUS.DEV, VENDOR:PRODUCT, BUS.DEV or a port (2-1.4).")],
    id: IdOpt = None,
    force: ForceOpt = False,
    live: LiveOpt = False, config: ConfigOpt = False, current: CurrentOpt = False, persistent: PersistentOpt = False,
    print_xml: PrintXmlOpt = False, verify: VerifyOpt = None, timeout: TimeoutOpt = 30.0,
    ssh: SSHOpt = None, ssh_key: SSHKeyOpt = None, known_hosts: KnownHostsOpt = None,
    accept_new_host_key: AcceptNewOpt = False, ssh_jump: SSHJumpOpt = None, wait_lock: WaitLockOpt = False,
) -> None:
    """Give a host USB device to a guest (the seed's usb_add host:...), then find it in the guest by its ids.

    A VENDOR:PRODUCT that several host devices share is refused with the list: name one by host:BUS.DEV.
    Hubs, devices another domain has, and devices the host uses (a mounted USB disk) are refused
    (exit 14; --force overrides only host use).
    """
    from vhotplug.host import nodedev
    from vhotplug.ops.passthrough import check_usb_supported, facts_root_for, plan_usb

    st = state(ctx)
    spec = parse_usb_spec(device)
    with connection(st.uri) as conn:
        dom = lookup_domain(conn, domain)
        check_usb_supported(conn)
        affect = resolve_affect(dom, live=live, config=config, current=current, persistent=persistent)
        facts = facts_root_for(conn)
        if print_xml:
            plan = plan_usb(conn, dom, spec, id=id, force=force, facts_root=facts.root, facts_note=facts.why_not,
                            check=False)
            typer.echo(templates.tostring(plan.element), nl=False)
            return
        found = nodedev.find_usb(conn, spec)
        keys = [lock.domain_key(dom.UUIDString()),
                lock.usb_key(UsbDevice(found.bus or 0, found.device or 0, found.vendor_id or 0, found.product_id or 0))]
        with lock.acquire(keys, wait=wait_lock):
            plan = plan_usb(conn, dom, spec, id=id, force=force, facts_root=facts.root, facts_note=facts.why_not)
            outcome, doc = _attach(conn, dom, plan, affect_flags=affect.flags, live=affect.live, verify=verify,
                                   timeout=timeout, ssh=ssh, ssh_key=ssh_key, known_hosts=known_hosts,
                                   accept_new_host_key=accept_new_host_key, ssh_jump=ssh_jump, ping=None, uri=st.uri)
    _report(st.output, domain, outcome, doc)


def _attach(conn: libvirt.virConnect, dom: libvirt.virDomain, plan: HostdevPlan, *, affect_flags: int, live: bool,
            verify: bool | None, timeout: float, ssh: str | None, ssh_key: Path | None, known_hosts: Path | None,
            accept_new_host_key: bool, ssh_jump: str | None, ping: str | None,
            uri: str | None) -> tuple[PassthroughOutcome, dict[str, object]]:
    from vhotplug.ops.passthrough import attach_hostdev

    session = open_guest(dom, verify=verify, live=live, ssh=ssh, ssh_key=ssh_key, known_hosts=known_hosts,
                         accept_new_host_key=accept_new_host_key, ssh_jump=ssh_jump, timeout=timeout)
    if ping and session is None:
        raise errors.InvalidRequest("--ping needs the guest check: a live attach with guest SSH access",
                                    hint="pass --ssh USER@HOST (and --ssh-key)")
    with session or contextlib.nullcontext():
        if ping and session is not None:
            privilege.require(session, "bring the device's interface up and ping through it")  # before the host detach
        outcome = attach_hostdev(conn, dom, plan, flags=affect_flags, session=session, timeout=timeout, uri=uri)
        doc = outcome.to_dict()
        seen = outcome.attach.guest
        if ping and session is not None and seen is not None:
            iface = seen.detail.get("net")
            if not iface:
                raise errors.GuestCommandFailed(f"{plan.label} has no network interface in the guest to ping "
                                                f"through (it stays attached as {plan.alias})")
            result = ping_through(session, iface, ping)
            doc["ping"] = {"address": ping, "interface": iface, "sent": result.sent, "received": result.received,
                           "rtt_ms_avg": result.rtt_ms_avg}
    return outcome, doc


def _report(fmt: OutputFormat, dom_name: str, outcome: PassthroughOutcome, doc: dict[str, object]) -> None:
    if fmt is OutputFormat.json:
        output.json_out({"domain": dom_name, "attached": doc})
        return
    plan, att = outcome.plan, outcome.attach
    host = ""
    if outcome.host_detached:
        host = f"; taken from its host driver {plan.host_driver}"
    elif plan.kind == "pci" and plan.managed:
        host = "; libvirt manages its host driver"
    where = f" at {att.address}" if att.address != "-" else "" if att.live else " (persistent definition)"
    typer.echo(f"attached {plan.label} as {att.alias} to {dom_name}{where} in {att.libvirt_seconds * 1000:.0f} ms"
               f"{host}")
    for refusal in plan.refusals_overridden:
        typer.echo(f"forced past: {refusal.reason}")
    if att.guest is not None:
        detail = "".join(f", {k} {v}" for k, v in att.guest.detail.items() if k not in ("polls",))
        typer.echo(f"guest: {att.guest.name} (driver {att.guest.driver}{detail}) seen "
                   f"{(att.guest_seen_seconds or 0) * 1000:.0f} ms after the attach")
    ping = doc.get("ping")
    if isinstance(ping, dict):
        typer.echo(f"ping {ping['address']} via {ping['interface']}: {ping['received']}/{ping['sent']} received, "
                   f"avg {ping['rtt_ms_avg']} ms")
