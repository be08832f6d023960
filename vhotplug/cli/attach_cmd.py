"""``vhotplug attach nic|disk``: add a device and prove it inside the guest."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Annotated
from urllib.parse import quote

import typer
from lxml import etree

from vhotplug import errors, templates
from vhotplug.cli import hostdev_cmd, output
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
from vhotplug.devices.disk import DiskSpec, create_image, disk_spec, disk_xml, remove_created_image
from vhotplug.devices.nic import nic_spec, nic_xml
from vhotplug.guest import privilege
from vhotplug.guest.ping import check_address, ping_through
from vhotplug.guest.ssh import GuestSession
from vhotplug.guest.watch import Identity
from vhotplug.host import lock
from vhotplug.ops.attach import AttachOutcome, attach_device
from vhotplug.virt.connection import connection, domain_xml, is_running, lookup_domain, resolve_affect
from vhotplug.virt.devices import used_names
from vhotplug.virt.flavor import QEMU, XEN, flavor_of
from vhotplug.virt.slots import CONVENTIONAL_MODELS, check_pci_room

app = typer.Typer(no_args_is_help=True, help="Hot-plug a device into a domain and verify it in the guest.")


def image_dir(domain: str) -> Path:
    """Where ``--size`` creates disk images: readable by QEMU, one folder per domain."""
    folder = domain
    if folder in ("", ".", "..") or "/" in folder or "\0" in folder:
        # libvirt accepts a domain named "." or ".." (it refuses only '/'): as a folder name that put the images
        # in, or above, the images directory itself. Such names get a folder of their own, percent-encoded.
        folder = quote(domain, safe="", errors="surrogatepass").replace(".", "%2E") or "%"
    return Path(os.environ.get("VHOTPLUG_IMAGE_DIR", "/var/lib/vhotplug/images")) / folder


@app.command()
def nic(
    ctx: typer.Context,
    domain: DomainArg,
    model: Annotated[str | None, typer.Option(
        help=f"NIC model: {', '.join(QEMU.nic_models)} (default {QEMU.nic_model}); Xen: none (netfront).")] = None,
    network: Annotated[str | None, typer.Option(help="Connect to this libvirt network.")] = None,
    bridge: Annotated[str | None, typer.Option(help="Connect to this host bridge (Xen: e.g. xenbr0).")] = None,
    user: Annotated[bool, typer.Option("--user", help="QEMU user-mode networking (the default on QEMU; "
                                       "Xen has none).")] = False,
    mac: Annotated[str | None, typer.Option(help=f"MAC address (default: a new {QEMU.mac_oui} one; "
                                            f"Xen: {XEN.mac_oui}).")] = None,
    id: Annotated[str | None, typer.Option("--id", help="Device id; stored as alias ua-ID (default nicN).")] = None,
    ping: Annotated[str | None, typer.Option(metavar="ADDR",
                                             help="After verifying, bring the NIC up and ping ADDR through it.")]
    = None,
    live: LiveOpt = False, config: ConfigOpt = False, current: CurrentOpt = False, persistent: PersistentOpt = False,
    print_xml: PrintXmlOpt = False, verify: VerifyOpt = None, timeout: TimeoutOpt = 30.0,
    ssh: SSHOpt = None, ssh_key: SSHKeyOpt = None, known_hosts: KnownHostsOpt = None,
    accept_new_host_key: AcceptNewOpt = False, ssh_jump: SSHJumpOpt = None, wait_lock: WaitLockOpt = False,
) -> None:
    """Hot-plug a NIC (the seed's `device_add` of a network card), then find it in the guest by its MAC.

    With --ping ADDR the guest brings the new interface up and pings through it
    (`ping -I IFACE ADDR`, as in the seed).
    """
    st = state(ctx)
    if ping is not None:
        check_address(ping)  # a bad --ping was refused only after the NIC was attached (and it stayed)
    with connection(st.uri) as conn, contextlib.ExitStack() as held:
        dom = lookup_domain(conn, domain)
        flavor = flavor_of(conn)
        held.enter_context(lock.acquire([lock.domain_key(dom.UUIDString())], wait=wait_lock))
        affect = resolve_affect(dom, live=live, config=config, current=current, persistent=persistent)
        flags, is_live = affect.flags, affect.live
        live_xml = domain_xml(dom) if is_running(dom) else ""
        used = used_names(live_xml, domain_xml(dom, inactive=True))
        spec = nic_spec(model=model, network=network, bridge=bridge, user=user, mac=mac, id=id,
                        used_aliases=used.aliases, used_macs=used.macs, flavor=flavor)
        element = nic_xml(spec)
        if print_xml:
            typer.echo(templates.tostring(element), nl=False)
            return
        if is_live and spec.model is not None:  # a model takes a PCI slot (Xen's netfront has none)
            check_pci_room(live_xml, conventional=spec.model in CONVENTIONAL_MODELS, what=f"a {spec.model} NIC")
        session = open_guest(dom, verify=verify, live=is_live, ssh=ssh, ssh_key=ssh_key, known_hosts=known_hosts,
                             accept_new_host_key=accept_new_host_key, ssh_jump=ssh_jump, timeout=timeout)
        if ping and session is None:
            raise errors.InvalidRequest("--ping needs the guest check: a live attach with guest SSH access",
                                        hint="pass --ssh USER@HOST (and --ssh-key)")
        with session or contextlib.nullcontext():
            if ping and session is not None:
                privilege.require(session, "bring the new NIC up and ping through it")  # before the attach
            outcome = attach_device(conn, dom, element, flags=flags, identity=Identity("nic", spec.mac),
                                    session=session, timeout=timeout)
            doc = outcome.to_dict()
            if ping and session is not None and outcome.guest is not None:
                doc["ping"] = _ping(session, outcome.guest.name, ping, alias=outcome.alias)
    _report(st.output, dom_name=domain, outcome=outcome, doc=doc)


@app.command()
def disk(
    ctx: typer.Context,
    domain: DomainArg,
    path: Annotated[Path | None, typer.Argument(help="Existing image file or block device.")] = None,
    size: Annotated[str | None, typer.Option(help="Create a new sparse raw image of this size (512M, 1G, ...).")]
    = None,
    bus: Annotated[str | None, typer.Option(
        help="virtio (the default), scsi, usb (USB storage) or sata (not hot-pluggable); Xen: xen only.")] = None,
    target: Annotated[str | None, typer.Option(help="Target name (vdb, sdb, xvdb); default: the first free one.")]
    = None,
    readonly: Annotated[bool, typer.Option("--readonly", help="Attach read-only.")] = False,
    id: Annotated[str | None, typer.Option("--id", help="Device id; alias ua-ID, serial vh-ID.")] = None,
    live: LiveOpt = False, config: ConfigOpt = False, current: CurrentOpt = False, persistent: PersistentOpt = False,
    print_xml: PrintXmlOpt = False, verify: VerifyOpt = None, timeout: TimeoutOpt = 30.0,
    ssh: SSHOpt = None, ssh_key: SSHKeyOpt = None, known_hosts: KnownHostsOpt = None,
    accept_new_host_key: AcceptNewOpt = False, ssh_jump: SSHJumpOpt = None, wait_lock: WaitLockOpt = False,
) -> None:
    """Hot-plug a disk (virtio, SCSI, or USB storage with --bus usb), then find it in the guest by its serial.

    On Xen the disk is a raw image or block device on the Xen host, given to the guest by blkback
    (driver phy, bus xen) and found in the guest by its name (xvdb, ...).
    """
    from vhotplug.host.inventory import is_remote_uri

    st = state(ctx)
    with connection(st.uri) as conn, contextlib.ExitStack() as held:
        dom = lookup_domain(conn, domain)
        flavor = flavor_of(conn)
        held.enter_context(lock.acquire([lock.domain_key(dom.UUIDString())], wait=wait_lock))
        affect = resolve_affect(dom, live=live, config=config, current=current, persistent=persistent)
        flags, is_live = affect.flags, affect.live
        live_xml = domain_xml(dom) if is_running(dom) else ""
        used = used_names(live_xml, domain_xml(dom, inactive=True))
        spec = disk_spec(path=path, size=size, bus=bus, target=target, readonly=readonly, id=id,
                         used_aliases=used.aliases, used_targets=used.targets, image_dir=image_dir(dom.name()),
                         flavor=flavor, local=not is_remote_uri(conn.getURI()))
        element = disk_xml(spec)
        if print_xml:
            typer.echo(templates.tostring(element), nl=False)
            return
        if is_live and flavor.name == "qemu":
            _check_disk_room(live_xml, spec)
        session = open_guest(dom, verify=verify, live=is_live, ssh=ssh, ssh_key=ssh_key, known_hosts=known_hosts,
                             accept_new_host_key=accept_new_host_key, ssh_jump=ssh_jump, timeout=timeout)
        if spec.create_bytes:
            create_image(spec)
        try:
            with session or contextlib.nullcontext():
                identity = Identity("disk", spec.serial) if spec.guest_serial else Identity("blockdev", spec.target)
                outcome = attach_device(conn, dom, element, flags=flags, identity=identity, session=session,
                                        timeout=timeout)
        except BaseException:
            if spec.create_bytes:
                remove_created_image(spec)
            raise
        doc = outcome.to_dict()
        if spec.create_bytes:
            doc["created_image"] = str(spec.path)
    _report(st.output, dom_name=domain, outcome=outcome, doc=doc)


def _check_disk_room(live_xml: str, spec: DiskSpec) -> None:
    root = etree.fromstring(live_xml.encode())
    if spec.bus == "sata":
        raise errors.InvalidRequest(
            "QEMU cannot hot-plug SATA (AHCI) disks into a running guest",
            hint="use --bus scsi or --bus usb, or --config to add the SATA disk at the next boot",
        )
    if spec.bus == "virtio":
        check_pci_room(live_xml, conventional=False, what="a virtio disk")
    elif spec.bus == "scsi" and not root.xpath("devices/controller[@type='scsi']"):
        check_pci_room(live_xml, conventional=False, what="a SCSI controller for the disk")
    elif spec.bus == "usb" and not root.xpath("devices/controller[@type='usb'][not(@model='none')]"):
        raise errors.InvalidRequest("the domain has no USB controller, so a USB disk cannot be hot-plugged",
                                    hint="add a qemu-xhci controller to the definition (takes effect at next boot)")


def _ping(session: GuestSession, iface: str, addr: str, *, alias: str) -> dict[str, object]:
    try:
        result = ping_through(session, iface, addr)
    except errors.VhotplugError as exc:
        exc.message += f" (the NIC {alias} stays attached)"
        raise
    return {"address": addr, "interface": iface, "sent": result.sent, "received": result.received,
            "rtt_ms_avg": result.rtt_ms_avg}


def _report(fmt: OutputFormat, *, dom_name: str, outcome: AttachOutcome, doc: dict[str, object]) -> None:
    if fmt is OutputFormat.json:
        output.json_out({"domain": dom_name, "attached": doc})
        return
    where = f" at {outcome.address}" if outcome.address != "-" else "" if outcome.live else " (persistent definition)"
    typer.echo(f"attached {outcome.kind} {outcome.alias} ({outcome.identity}) to {dom_name}{where} "
               f"in {outcome.libvirt_seconds * 1000:.0f} ms")
    if outcome.guest is not None:
        detail = "".join(f", {k} {v}" for k, v in outcome.guest.detail.items())
        typer.echo(f"guest: {outcome.guest.name} (driver {outcome.guest.driver}{detail}) seen "
                   f"{(outcome.guest_seen_seconds or 0) * 1000:.0f} ms after the attach")
    ping = doc.get("ping")
    if isinstance(ping, dict):
        typer.echo(f"ping {ping['address']} via {ping['interface']}: {ping['received']}/{ping['sent']} received, "
                   f"avg {ping['rtt_ms_avg']} ms")


# Host devices (PCI/USB passthrough) live in their own module; they are attach sub-commands too.
app.command("pci")(hostdev_cmd.pci)
app.command("usb")(hostdev_cmd.usb)
