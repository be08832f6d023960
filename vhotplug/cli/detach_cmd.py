"""``vhotplug detach``: remove a device and wait until the guest really let go."""

from __future__ import annotations

import contextlib
from typing import Annotated

import libvirt
import typer
from lxml import etree

from vhotplug import errors
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
    SSHJumpOpt,
    SSHKeyOpt,
    SSHOpt,
    TimeoutOpt,
    VerifyOpt,
    WaitLockOpt,
)
from vhotplug.cli.state import OutputFormat, state
from vhotplug.host import lock
from vhotplug.ops.detach import detach_device
from vhotplug.virt.connection import connection, domain_xml, lookup_domain, resolve_affect
from vhotplug.virt.devices import find_device, source_bdf


def detach(
    ctx: typer.Context,
    domain: DomainArg,
    device: Annotated[str, typer.Argument(metavar="DEVICE",
                                          help="Device id/alias, MAC, target (vdb, sda) or guest PCI address.")],
    live: LiveOpt = False, config: ConfigOpt = False, current: CurrentOpt = False, persistent: PersistentOpt = False,
    verify: VerifyOpt = None, timeout: TimeoutOpt = 30.0,
    ssh: SSHOpt = None, ssh_key: SSHKeyOpt = None, known_hosts: KnownHostsOpt = None,
    accept_new_host_key: AcceptNewOpt = False, ssh_jump: SSHJumpOpt = None,
    keep_detached: Annotated[bool, typer.Option(
        "--keep-detached", help="For an unmanaged host PCI device: leave it on vfio-pci instead of giving it back "
                                "to its host driver.")] = False,
    wait_lock: WaitLockOpt = False,
) -> None:
    """Hot-unplug DEVICE (the seed's `device_del`) and wait for the outcome.

    On a running domain vhotplug waits for libvirt's DEVICE_REMOVED event (up to
    --timeout), confirms in the live XML, and checks in the guest that the device
    is gone. A guest that does not release it in time gives exit code 10 and the
    device is reported as still attached; running the command again waits for the
    same request without re-sending it.

    A host PCI device (hostdev, unmanaged) goes back to its host driver afterwards
    unless --keep-detached. Host devices can also be named host:BDF or
    host:VENDOR:PRODUCT.
    """
    st = state(ctx)
    with connection(st.uri) as conn:
        dom = lookup_domain(conn, domain)
        affect = resolve_affect(dom, live=live, config=config, current=current, persistent=persistent)
        is_live, is_config = affect.live, affect.config
        element = _hostdev_element(dom, device, live=is_live)
        keys = [lock.domain_key(dom.UUIDString())]
        if element is not None and (bdf := source_bdf(element)) is not None:
            keys.append(lock.pci_key(bdf))
        elif keep_detached:
            raise errors.InvalidRequest(f"--keep-detached is for host PCI devices; {device!r} is not one")
        with lock.acquire(keys, wait=wait_lock):
            session = open_guest(dom, verify=verify, live=is_live, ssh=ssh, ssh_key=ssh_key, known_hosts=known_hosts,
                                 accept_new_host_key=accept_new_host_key, ssh_jump=ssh_jump, timeout=timeout)
            with session or contextlib.nullcontext():
                if element is not None:
                    from vhotplug.ops.passthrough import detach_hostdev  # host-side modules: hostdevs only

                    host = detach_hostdev(conn, dom, device, element, live=is_live, config=is_config,
                                          session=session, timeout=timeout, keep_detached=keep_detached,
                                          uri=st.uri)
                    outcome, doc = host.detach, host.to_dict()
                else:
                    outcome = detach_device(conn, dom, device, live=is_live, config=is_config, session=session,
                                            timeout=timeout)
                    host, doc = None, outcome.to_dict()
    if st.output is OutputFormat.json:
        output.json_out({"domain": domain, "detached": doc})
        return
    parts = []
    if outcome.live and outcome.libvirt_seconds is None:
        parts.append("the guest had already completed an earlier pending request")
    elif outcome.live:
        note = " (an earlier request was still pending: not re-sent)" if outcome.was_pending else ""
        if outcome.busy_refusals:
            note += f" (QEMU said the guest was busy {outcome.busy_refusals}x first: asked again)"
        if outcome.reconnects:
            note += f" (libvirtd went away meanwhile: reconnected {outcome.reconnects}x)"
        parts.append(f"released by the guest in {(outcome.libvirt_seconds or 0) * 1000:.0f} ms{note}")
    if outcome.config:
        parts.append("removed from the persistent definition")
    typer.echo(f"detached {outcome.kind} {outcome.alias} ({outcome.identity}) from {domain}: " + "; ".join(parts))
    if outcome.guest is not None:
        typer.echo(f"guest: gone {(outcome.guest_gone_seconds or 0) * 1000:.0f} ms after the request")
    if host is not None and host.kind == "pci":
        if host.reattached:
            typer.echo(f"host: given back to its driver ({host.driver_now or 'none bound'})")
        else:
            typer.echo(f"host: left on {host.driver_now or 'no driver'}")


def _hostdev_element(dom: libvirt.virDomain, ref: str, *, live: bool) -> etree._Element | None:
    """The ``<hostdev>`` element ``ref`` names, or None when it names another kind (or nothing: said later)."""
    try:
        device, element = find_device(domain_xml(dom, inactive=not live), ref)
    except errors.DeviceNotFound:
        return None
    return element if device.kind == "hostdev" else None
