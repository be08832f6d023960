"""``vhotplug check``: what can be hot-plugged into a domain now, why not, and what to do (read-only)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import libvirt
import typer

from vhotplug import errors
from vhotplug.cli import output
from vhotplug.cli.guest_access import open_guest
from vhotplug.cli.options import AcceptNewOpt, DomainArg, KnownHostsOpt, SSHJumpOpt, SSHKeyOpt, SSHOpt
from vhotplug.cli.state import OutputFormat, state
from vhotplug.guest.ssh import GuestSession
from vhotplug.virt.connection import connection, domain_xml, is_running, lookup_domain
from vhotplug.virt.flavor import flavor_of

if TYPE_CHECKING:
    from vhotplug.ops.check import CheckReport, Row

COLUMNS = [("item", "ITEM"), ("status", "STATUS"), ("detail", "DETAILS"), ("fix", "WHAT TO DO")]
_GUEST_ERRORS = (errors.GuestUnreachable, errors.GuestHostKeyError, errors.Timeout)


def check(
    ctx: typer.Context,
    domain: DomainArg,
    guest: Annotated[
        bool | None,
        typer.Option("--guest/--no-guest",
                     help="Check the guest kernel over SSH (default: when its access is known: --ssh or metadata)."),
    ] = None,
    ssh: SSHOpt = None,
    ssh_key: SSHKeyOpt = None,
    known_hosts: KnownHostsOpt = None,
    accept_new_host_key: AcceptNewOpt = False, ssh_jump: SSHJumpOpt = None,
) -> None:
    """Show what can be hot-plugged into DOMAIN now, why not, and what to do.

    Rows: PCI slots, vCPUs, memory (DIMMs), balloon, USB, SCSI (on Xen: PCI
    passthrough, NICs, disks, vCPUs, balloon, and what libxl cannot do), read from the
    live XML (and the definition, to tell a prepared domain to restart). With
    guest access, also the guest kernel's hot-plug support: its config when
    readable, else evidence in sysfs. Changes nothing; exits 0 whatever it finds.
    """
    from vhotplug.ops.check import check as run_check  # only this command needs it
    from vhotplug.ops.vcpu import host_cap

    st = state(ctx)
    with connection(st.uri) as conn:
        dom = lookup_domain(conn, domain)
        running = is_running(dom)
        if guest and not running:
            raise errors.InvalidRequest(f"--guest needs a running domain: {dom.name()} is not running")
        name = dom.name()
        live_xml = domain_xml(dom)
        config_xml = domain_xml(dom, inactive=True) if running else None
        session, note = _guest_session(dom, guest, running, ssh, ssh_key, known_hosts, accept_new_host_key,
                                       ssh_jump)
        with session or contextlib.nullcontext():
            report = run_check(name, running=running, live_xml=live_xml, config_xml=config_xml,
                               session=session, guest_note=note, flavor=flavor_of(conn),
                               vcpu_cap=host_cap(conn) if running else None)
    _print(st.output, report)


def _guest_session(dom: libvirt.virDomain, guest: bool | None, running: bool, ssh: str | None,
                   ssh_key: Path | None, known_hosts: Path | None,
                   accept_new: bool, ssh_jump: str | None = None) -> tuple[GuestSession | None, Row | None]:
    """(session, None) when the guest is checked, else (None, a row saying why not)."""
    from vhotplug.ops.check import guest_not_checked

    if guest is False:
        return None, None
    if not running:
        return None, guest_not_checked("the domain is not running")
    explicit = bool(guest or ssh)
    try:
        session = open_guest(dom, verify=guest, live=True, ssh=ssh, ssh_key=ssh_key, known_hosts=known_hosts,
                             accept_new_host_key=accept_new, ssh_jump=ssh_jump)
    except _GUEST_ERRORS as exc:
        if explicit:  # asked for by name: failing to reach it is the command's failure
            raise
        return None, guest_not_checked("", error=exc)
    if session is None:
        return None, guest_not_checked("its SSH access is not known",
                                       "pass --ssh USER@HOST[:PORT] (and --ssh-key) to check the guest kernel")
    return session, None


def _print(fmt: OutputFormat, report: CheckReport) -> None:
    if fmt is OutputFormat.json:
        output.json_out(report.to_dict())
        return
    where = "live" if report.running else "definition; the domain is not running"
    output.table([r.to_dict() for r in report.rows], COLUMNS, title=f"Hot-plug readiness of {report.domain} "
                 f"({where}):")
    if report.guest is not None:
        source = report.guest.config_source or "sysfs (no kernel config readable in the guest)"
        typer.echo(f"\nguest kernel {report.guest.release or '?'}: checked from {source}")
