"""``vhotplug detach``: remove a device and wait until the guest really let go."""

from __future__ import annotations

import contextlib
from typing import Annotated

import typer

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
    SSHKeyOpt,
    SSHOpt,
    TimeoutOpt,
    VerifyOpt,
)
from vhotplug.cli.state import OutputFormat, state
from vhotplug.ops.detach import detach_device
from vhotplug.virt.connection import connection, lookup_domain, resolve_affect


def detach(
    ctx: typer.Context,
    domain: DomainArg,
    device: Annotated[str, typer.Argument(metavar="DEVICE",
                                          help="Device id/alias, MAC, target (vdb, sda) or guest PCI address.")],
    live: LiveOpt = False, config: ConfigOpt = False, current: CurrentOpt = False, persistent: PersistentOpt = False,
    verify: VerifyOpt = None, timeout: TimeoutOpt = 30.0,
    ssh: SSHOpt = None, ssh_key: SSHKeyOpt = None, known_hosts: KnownHostsOpt = None,
    accept_new_host_key: AcceptNewOpt = False,
) -> None:
    """Hot-unplug DEVICE (the seed's `device_del`) and wait for the outcome.

    On a running domain vhotplug waits for libvirt's DEVICE_REMOVED event (up to
    --timeout), confirms in the live XML, and checks in the guest that the device
    is gone. A guest that does not release it in time gives exit code 10 and the
    device is reported as still attached; running the command again waits for the
    same request without re-sending it.
    """
    st = state(ctx)
    with connection(st.uri) as conn:
        dom = lookup_domain(conn, domain)
        affect = resolve_affect(dom, live=live, config=config, current=current, persistent=persistent)
        is_live, is_config = affect.live, affect.config
        session = open_guest(dom, verify=verify, live=is_live, ssh=ssh, ssh_key=ssh_key, known_hosts=known_hosts,
                             accept_new_host_key=accept_new_host_key)
        with session or contextlib.nullcontext():
            outcome = detach_device(conn, dom, device, live=is_live, config=is_config, session=session,
                                    timeout=timeout)
    if st.output is OutputFormat.json:
        output.json_out({"domain": domain, "detached": outcome.to_dict()})
        return
    parts = []
    if outcome.live and outcome.libvirt_seconds is None:
        parts.append("the guest had already completed an earlier pending request")
    elif outcome.live:
        note = " (an earlier request was still pending: not re-sent)" if outcome.was_pending else ""
        parts.append(f"released by the guest in {(outcome.libvirt_seconds or 0) * 1000:.0f} ms{note}")
    if outcome.config:
        parts.append("removed from the persistent definition")
    typer.echo(f"detached {outcome.kind} {outcome.alias} ({outcome.identity}) from {domain}: " + "; ".join(parts))
    if outcome.guest is not None:
        typer.echo(f"guest: gone {(outcome.guest_gone_seconds or 0) * 1000:.0f} ms after the request")
