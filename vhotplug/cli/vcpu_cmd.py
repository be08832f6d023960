"""``vhotplug vcpu set|add|remove``: the seed's `cpu_set N online` plus the guest's half of the job."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

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
    SSHJumpOpt,
    SSHKeyOpt,
    SSHOpt,
    TimeoutOpt,
    VerifyOpt,
    WaitLockOpt,
)
from vhotplug.cli.state import OutputFormat, state
from vhotplug.host import lock
from vhotplug.virt.connection import connection, lookup_domain, resolve_affect

if TYPE_CHECKING:
    from vhotplug.ops.vcpu import VcpuOutcome

app = typer.Typer(no_args_is_help=True, help="Hot-add and hot-remove vCPUs, onlining/offlining them in the guest.")

CountArg = Annotated[int, typer.Argument(help="How many vCPUs to add or remove.")]


def _run(ctx: typer.Context, domain: str, *, target: int | None, delta: int, live: bool, config: bool,
         current: bool, persistent: bool, verify: bool | None, timeout: float, ssh: str | None,
         ssh_key: Path | None, known_hosts: Path | None, accept_new_host_key: bool, wait_lock: bool,
         ssh_jump: str | None) -> None:
    from vhotplug.ops.vcpu import counts, set_vcpus  # vcpu commands only

    st = state(ctx)
    with connection(st.uri) as conn, contextlib.ExitStack() as held:
        dom = lookup_domain(conn, domain)
        held.enter_context(lock.acquire([lock.domain_key(dom.UUIDString())], wait=wait_lock))
        affect = resolve_affect(dom, live=live, config=config, current=current, persistent=persistent)
        is_live, is_config = affect.live, affect.config
        n = target if target is not None else counts(dom, live=is_live)[0] + delta
        session = open_guest(dom, verify=verify, live=is_live, ssh=ssh, ssh_key=ssh_key, known_hosts=known_hosts,
                             accept_new_host_key=accept_new_host_key, ssh_jump=ssh_jump, timeout=timeout)
        with session or contextlib.nullcontext():
            outcome = set_vcpus(conn, dom, n, live=is_live, config=is_config, session=session, timeout=timeout)
    _report(st.output, domain, outcome)


def _report(fmt: OutputFormat, domain: str, o: VcpuOutcome) -> None:
    if fmt is OutputFormat.json:
        output.json_out({"domain": domain, "vcpus": o.to_dict()})
        return
    where = "live" if o.live else "definition"
    typer.echo(f"vCPUs of {domain} ({where}): {o.before} -> {o.after} in {o.seconds * 1000:.0f} ms")
    if o.guest_online:
        by = " (onlined by the guest)" if o.onlined_by == "guest" else ""
        typer.echo(f"guest: CPUs {o.guest_online} online{by}, {o.guest_cpuinfo} in /proc/cpuinfo")
    for note in o.notes:
        typer.echo(f"note: {note}")


_FLAG_HELP = "Also: --live/--config/--current/--persistent as in virsh setvcpus."


@app.command("set")
def set_(ctx: typer.Context, domain: DomainArg, count: Annotated[int, typer.Argument(help="vCPUs wanted.")],
         live: LiveOpt = False, config: ConfigOpt = False, current: CurrentOpt = False,
         persistent: PersistentOpt = False, verify: VerifyOpt = None, timeout: TimeoutOpt = 30.0,
         ssh: SSHOpt = None, ssh_key: SSHKeyOpt = None, known_hosts: KnownHostsOpt = None,
         accept_new_host_key: AcceptNewOpt = False, ssh_jump: SSHJumpOpt = None,
         wait_lock: WaitLockOpt = False) -> None:
    """Set the vCPU count; new CPUs are onlined in the guest, removed ones offlined first."""
    _run(ctx, domain, target=count, delta=0, live=live, config=config, current=current, persistent=persistent,
         verify=verify, timeout=timeout, ssh=ssh, ssh_key=ssh_key, known_hosts=known_hosts,
         accept_new_host_key=accept_new_host_key, wait_lock=wait_lock,
         ssh_jump=ssh_jump)


@app.command()
def add(ctx: typer.Context, domain: DomainArg, count: CountArg = 1,
        live: LiveOpt = False, config: ConfigOpt = False, current: CurrentOpt = False,
        persistent: PersistentOpt = False, verify: VerifyOpt = None, timeout: TimeoutOpt = 30.0,
        ssh: SSHOpt = None, ssh_key: SSHKeyOpt = None, known_hosts: KnownHostsOpt = None,
        accept_new_host_key: AcceptNewOpt = False, ssh_jump: SSHJumpOpt = None,
         wait_lock: WaitLockOpt = False) -> None:
    """Hot-add COUNT vCPUs (default 1) and online them in the guest (`echo 1 > .../cpuN/online`)."""
    _run(ctx, domain, target=None, delta=count, live=live, config=config, current=current, persistent=persistent,
         verify=verify, timeout=timeout, ssh=ssh, ssh_key=ssh_key, known_hosts=known_hosts,
         accept_new_host_key=accept_new_host_key, wait_lock=wait_lock,
         ssh_jump=ssh_jump)


@app.command()
def remove(ctx: typer.Context, domain: DomainArg, count: CountArg = 1,
           live: LiveOpt = False, config: ConfigOpt = False, current: CurrentOpt = False,
           persistent: PersistentOpt = False, verify: VerifyOpt = None, timeout: TimeoutOpt = 30.0,
           ssh: SSHOpt = None, ssh_key: SSHKeyOpt = None, known_hosts: KnownHostsOpt = None,
           accept_new_host_key: AcceptNewOpt = False, ssh_jump: SSHJumpOpt = None,
         wait_lock: WaitLockOpt = False) -> None:
    """Offline COUNT vCPUs (default 1) in the guest, then hot-remove them and reconcile the outcome.

    If libvirt times out while the guest did eject the CPUs (seen with QEMU 7.2 under TCG), both views are
    reported and the exit code is 12.
    """
    _run(ctx, domain, target=None, delta=-count, live=live, config=config, current=current, persistent=persistent,
         verify=verify, timeout=timeout, ssh=ssh, ssh_key=ssh_key, known_hosts=known_hosts,
         accept_new_host_key=accept_new_host_key, wait_lock=wait_lock,
         ssh_jump=ssh_jump)
