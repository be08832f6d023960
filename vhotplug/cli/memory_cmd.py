"""``vhotplug memory add|remove|balloon``: DIMM hot-plug with the guest's blocks onlined, and the balloon."""

from __future__ import annotations

import contextlib
from typing import Annotated

import typer

from vhotplug import errors, templates
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
from vhotplug.host import lock
from vhotplug.units import format_size, parse_size
from vhotplug.virt.connection import connection, domain_xml, is_running, lookup_domain, resolve_affect
from vhotplug.virt.devices import used_names
from vhotplug.virt.flavor import flavor_of

app = typer.Typer(no_args_is_help=True, help="Hot-add/remove memory DIMMs (onlined in the guest) and balloon.")

SizeArg = Annotated[str, typer.Argument(help="Size like virsh: 512M, 1G, 131072KiB (bare number: MiB).")]


@app.command()
def add(
    ctx: typer.Context, domain: DomainArg, size: SizeArg,
    node: Annotated[int, typer.Option(help="Guest NUMA node for the DIMM.")] = 0,
    online_type: Annotated[str, typer.Option(help="How the guest onlines it: online or online_movable "
                                             "(movable memory can be removed again).")] = "online_movable",
    id: Annotated[str | None, typer.Option("--id", help="Device id; alias ua-ID (default dimmN).")] = None,
    live: LiveOpt = False, config: ConfigOpt = False, current: CurrentOpt = False, persistent: PersistentOpt = False,
    print_xml: PrintXmlOpt = False, verify: VerifyOpt = None, timeout: TimeoutOpt = 30.0,
    ssh: SSHOpt = None, ssh_key: SSHKeyOpt = None, known_hosts: KnownHostsOpt = None,
    accept_new_host_key: AcceptNewOpt = False, ssh_jump: SSHJumpOpt = None, wait_lock: WaitLockOpt = False,
) -> None:
    """Hot-add a memory DIMM, online its memory blocks in the guest, and check MemTotal grew by its size."""
    from vhotplug.devices.dimm import DEFAULT_BLOCK_BYTES, dimm_spec, dimm_xml  # memory commands only
    from vhotplug.guest import hotplug
    from vhotplug.ops.memory import add_dimm, check_room, layout

    if online_type not in ("online", "online_movable"):
        raise errors.InvalidRequest(f"invalid --online-type {online_type!r}: expected online or online_movable")
    st = state(ctx)
    with connection(st.uri) as conn, contextlib.ExitStack() as held:
        dom = lookup_domain(conn, domain)
        flavor = flavor_of(conn)
        if not flavor.dimm:
            raise flavor.unsupported("hot-plug memory devices (DIMMs): libxl has none",
                                     hint=f"give the guest memory with the balloon, up to its maximum: "
                                     f"`vhotplug memory balloon {dom.name()} SIZE`")
        held.enter_context(lock.acquire([lock.domain_key(dom.UUIDString())], wait=wait_lock))
        affect = resolve_affect(dom, live=live, config=config, current=current, persistent=persistent)
        flags, is_live = affect.flags, affect.live
        xml = domain_xml(dom, inactive=not is_live)
        lay = layout(xml)
        session = None if print_xml else open_guest(
            dom, verify=verify, live=is_live, ssh=ssh, ssh_key=ssh_key, known_hosts=known_hosts,
            accept_new_host_key=accept_new_host_key, ssh_jump=ssh_jump, timeout=timeout)
        with session or contextlib.nullcontext():
            block = hotplug.block_bytes(session) if session else DEFAULT_BLOCK_BYTES
            spec = dimm_spec(size=size, node=node, id=id, used_aliases=used_names(xml).aliases, block_bytes=block,
                             numa_cells=lay.numa_cells)
            element = dimm_xml(spec)
            if print_xml:
                typer.echo(templates.tostring(element), nl=False)
                return
            check_room(lay, spec.size_bytes)
            outcome = add_dimm(conn, dom, spec, element, flags=flags, live=is_live, session=session,
                               online_type=online_type, block_bytes=block, timeout=timeout)
    if st.output is OutputFormat.json:
        output.json_out({"domain": domain, "memory_added": outcome.to_dict()})
        return
    typer.echo(f"added DIMM {outcome.alias} ({format_size(outcome.size_bytes)}) to {domain} "
               f"in {outcome.seconds * 1000:.0f} ms")
    if outcome.memtotal_after_kib is not None:
        how = "onlined by the guest" if outcome.onlined_by == "guest" else online_type
        typer.echo(f"guest: blocks {', '.join(map(str, outcome.blocks))} {how}; MemTotal "
                   f"{outcome.memtotal_before_kib} -> {outcome.memtotal_after_kib} KiB")


@app.command()
def remove(
    ctx: typer.Context, domain: DomainArg,
    device: Annotated[str, typer.Argument(metavar="ID", help="The DIMM's id or alias.")],
    verify: VerifyOpt = None, timeout: TimeoutOpt = 30.0,
    ssh: SSHOpt = None, ssh_key: SSHKeyOpt = None, known_hosts: KnownHostsOpt = None,
    accept_new_host_key: AcceptNewOpt = False, ssh_jump: SSHJumpOpt = None, wait_lock: WaitLockOpt = False,
) -> None:
    """Offline a DIMM's memory blocks in the guest, unplug it and wait, and check MemTotal shrank."""
    from vhotplug.devices.dimm import DEFAULT_BLOCK_BYTES  # memory commands only
    from vhotplug.guest import hotplug
    from vhotplug.ops.memory import remove_dimm

    st = state(ctx)
    with connection(st.uri) as conn, contextlib.ExitStack() as held:
        dom = lookup_domain(conn, domain)
        held.enter_context(lock.acquire([lock.domain_key(dom.UUIDString())], wait=wait_lock))
        if not is_running(dom):
            raise errors.OperationInvalid(f"{domain} is not running: use `vhotplug detach --config` for the "
                                          "definition")
        session = open_guest(dom, verify=verify, live=True, ssh=ssh, ssh_key=ssh_key, known_hosts=known_hosts,
                             accept_new_host_key=accept_new_host_key, ssh_jump=ssh_jump, timeout=timeout)
        with session or contextlib.nullcontext():
            block = hotplug.block_bytes(session) if session else DEFAULT_BLOCK_BYTES
            outcome = remove_dimm(conn, dom, device, session=session, block_bytes=block, timeout=timeout)
    if st.output is OutputFormat.json:
        output.json_out({"domain": domain, "memory_removed": outcome.to_dict()})
        return
    typer.echo(f"removed DIMM {outcome.alias} ({format_size(outcome.size_bytes)}) from {domain} "
               f"in {outcome.seconds * 1000:.0f} ms")
    if outcome.memtotal_after_kib is not None:
        typer.echo(f"guest: blocks {', '.join(map(str, outcome.blocks))} offlined first; MemTotal "
                   f"{outcome.memtotal_before_kib} -> {outcome.memtotal_after_kib} KiB")


@app.command("balloon")
def balloon_cmd(
    ctx: typer.Context, domain: DomainArg, size: SizeArg,
    verify: VerifyOpt = None, timeout: TimeoutOpt = 30.0,
    ssh: SSHOpt = None, ssh_key: SSHKeyOpt = None, known_hosts: KnownHostsOpt = None,
    accept_new_host_key: AcceptNewOpt = False, ssh_jump: SSHJumpOpt = None, wait_lock: WaitLockOpt = False,
) -> None:
    """Set the live balloon target (the seed's ballooning) and wait until the guest's MemTotal follows."""
    from vhotplug.ops.memory import balloon  # memory commands only

    st = state(ctx)
    size_bytes = parse_size(size)
    with connection(st.uri) as conn, contextlib.ExitStack() as held:
        dom = lookup_domain(conn, domain)
        held.enter_context(lock.acquire([lock.domain_key(dom.UUIDString())], wait=wait_lock))
        if not is_running(dom):
            raise errors.OperationInvalid(f"{domain} is not running: the balloon only works on a running guest")
        session = open_guest(dom, verify=verify, live=True, ssh=ssh, ssh_key=ssh_key, known_hosts=known_hosts,
                             accept_new_host_key=accept_new_host_key, ssh_jump=ssh_jump, timeout=timeout)
        with session or contextlib.nullcontext():
            prev, before, after = balloon(dom, size_bytes, session=session, timeout=timeout)
    doc = {"domain": domain, "balloon": {"from_kib": prev, "to_kib": size_bytes // 1024,
                                         "guest_memtotal_before_kib": before, "guest_memtotal_after_kib": after}}
    if st.output is OutputFormat.json:
        output.json_out(doc)
        return
    typer.echo(f"balloon of {domain}: {format_size(prev * 1024)} -> {format_size(size_bytes)}")
    if after is not None:
        typer.echo(f"guest: MemTotal {before} -> {after} KiB")
