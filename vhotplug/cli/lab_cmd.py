"""``vhotplug lab``: the project's own test guest (busybox + dropbear on the Debian kernel)."""

from __future__ import annotations

import os
import shlex
import shutil
from typing import Annotated

import typer

from vhotplug import errors
from vhotplug.cli import output
from vhotplug.cli.state import OutputFormat, state
from vhotplug.guest.target import SSHTarget
from vhotplug.lab import DEFAULT_NAME
from vhotplug.lab.domain import Accel, Machine
from vhotplug.virt.connection import connection

app = typer.Typer(no_args_is_help=True, help="Build, boot and reach the lab guest used to prove hot-plug.")

NameOpt = Annotated[str, typer.Option("--name", "-n", help="Lab domain name.")]


@app.command()
def build(
    ctx: typer.Context,
    kver: Annotated[str | None, typer.Option(help="Kernel version from /boot (default: newest).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Rebuild even if up to date (keeps the SSH keys).")]
    = False,
) -> None:
    """Build the lab guest image: Debian kernel + busybox/dropbear initramfs."""
    from vhotplug.lab import manager  # the lab's machinery only for lab commands

    img = manager.build(kver=kver, force=force)
    if state(ctx).output is OutputFormat.json:
        output.json_out({"kver": img.kver, "kernel": str(img.kernel), "initrd": str(img.initrd)})
        return
    size = img.initrd.stat().st_size / 2**20
    typer.echo(f"lab image ready: kernel {img.kver}, {img.initrd} ({size:.1f} MiB)")


@app.command()
def up(
    ctx: typer.Context,
    name: NameOpt = DEFAULT_NAME,
    machine: Annotated[str, typer.Option(help="Machine type: q35 (PCIe root ports) or pc (i440fx).")] = "q35",
    accel: Annotated[str, typer.Option(help="Domain type: qemu (TCG, works everywhere) or kvm.")] = "qemu",
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the guest's SSH.")] = 180.0,
    print_xml: Annotated[bool, typer.Option("--print-xml", help="Print the domain XML and change nothing.")]
    = False,
    plain: Annotated[bool, typer.Option("--plain", help="Define it NOT hotplug-ready (no maxMemory/NUMA cell, "
                                        "1 vCPU of 1, one free root port): for `vhotplug prepare`.")] = False,
    nested: Annotated[bool, typer.Option("--nested", help="Boot L1 instead: a hypervisor guest with a virtual "
                                         "Intel IOMMU and its own libvirtd, devices to pass through (an e1000, a "
                                         "USB tablet), reached over qemu+ssh (its URI is printed).")] = False,
    xen: Annotated[bool, typer.Option("--xen", help="Boot the Xen lab instead: Xen and its dom0 (libvirtd with "
                                      "the Xen driver, a spare e1000e to pass through), reached over xen+ssh "
                                      "(its URI is printed); -c URI lab up then boots a PV lab guest in it.")]
    = False,
) -> None:
    """Define and boot the lab domain, wait until its SSH answers, print the boot time.

    Idempotent: a running lab domain that answers is left as it is; a stale one is
    replaced. How to reach the guest is recorded in the domain's <metadata>, so
    every vhotplug command finds it. With -c pointing at an L1's URI, the lab guest
    (L2) is defined inside L1 and reached through L1 as a jump host; at the Xen lab's
    URI it is a Xen PV domU, reached through dom0.
    """
    from vhotplug.lab import manager  # the lab's machinery only for lab commands

    if nested and xen:
        raise errors.InvalidRequest("--nested and --xen boot different labs: choose one")
    if nested or xen:
        _up_l1(ctx, name, timeout=timeout, xen=xen)
        return
    m, a = _machine(machine), _accel(accel)
    if print_xml:
        typer.echo(manager.planned_xml(name, machine=m, accel=a, plain=plain), nl=False)
        return
    with connection(state(ctx).uri) as conn:
        result = manager.up(conn, name, machine=m, accel=a, timeout=timeout, plain=plain)
    lab = result.domain
    if state(ctx).output is OutputFormat.json:
        output.json_out({**lab.to_dict(), "boot_seconds": round(result.boot_seconds, 2),
                         "already_running": result.already_running})
    elif result.already_running:
        typer.echo(f"lab domain {lab.name} already running; SSH at {lab.target}")
    else:
        shape = f"{lab.machine}, {lab.accel}{', plain' if lab.plain else ''}"
        typer.echo(f"lab domain {lab.name} booted to SSH in {result.boot_seconds:.1f} s ({shape}); "
                   f"SSH at {lab.target}")


L1_DEFAULT_NAME = "vhotplug-l1"


def _up_l1(ctx: typer.Context, name: str, *, timeout: float, xen: bool) -> None:
    """The nested lab's L1, or the Xen lab (Xen + dom0, an L1 of another profile)."""
    from vhotplug.lab import nested
    from vhotplug.lab import xen as xen_lab

    if name == DEFAULT_NAME:
        name = xen_lab.DEFAULT_NAME if xen else L1_DEFAULT_NAME
    with connection(state(ctx).uri) as conn:
        l1 = xen_lab.up_xen(conn, name, timeout=timeout) if xen else nested.up_l1(conn, name, timeout=timeout)
    what, shape = ("Xen lab", "Xen 4.17 + dom0, q35, TCG") if xen else ("L1", "q35, virtual Intel IOMMU, TCG")
    if state(ctx).output is OutputFormat.json:
        output.json_out(l1.to_dict())
        return
    if l1.boot_seconds:
        typer.echo(f"{what} {l1.name} booted to SSH in {l1.boot_seconds:.1f} s, its libvirtd answered after "
                   f"{l1.libvirt_seconds:.1f} s ({shape})")
    else:
        typer.echo(f"{what} {l1.name} already running")
    typer.echo(f"libvirt in {'dom0' if xen else 'L1'}: -c '{l1.uri}'")


@app.command()
def down(ctx: typer.Context, name: NameOpt = DEFAULT_NAME) -> None:
    """Stop and undefine the lab domain (only domains vhotplug's lab created)."""
    from vhotplug.lab import manager  # the lab's machinery only for lab commands

    with connection(state(ctx).uri) as conn:
        removed = manager.down(conn, name)
    typer.echo(f"lab domain {name} removed" if removed else f"no lab domain {name}")


@app.command()
def status(ctx: typer.Context, name: Annotated[str | None, typer.Option("--name", "-n")] = None) -> None:
    """Show lab domains: state, machine, and how to reach them."""
    from vhotplug.lab import manager  # the lab's machinery only for lab commands

    with connection(state(ctx).uri) as conn:
        labs = manager.status(conn, name)
    rows = [lab.to_dict() for lab in labs]
    if state(ctx).output is OutputFormat.json:
        output.json_out(rows)
        return
    output.table(rows, [("name", "NAME"), ("state", "STATE"), ("machine", "MACHINE"), ("accel", "ACCEL"),
                        ("ssh", "SSH"), ("serial_log", "SERIAL LOG")])


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def ssh(ctx: typer.Context, name: NameOpt = DEFAULT_NAME) -> None:
    """Open a shell in the lab guest (extra arguments run as a command), host key checked."""
    from vhotplug.lab import manager  # the lab's machinery only for lab commands

    with connection(state(ctx).uri) as conn:
        lab = manager.status(conn, name)[0]
    if lab.target is None or lab.target.key is None or lab.target.known_hosts is None:
        raise errors.NotFound(f"lab domain {name} has no SSH metadata")
    client = shutil.which("ssh")
    if client is None:
        raise errors.VhotplugError("the ssh client is not installed", hint="apt-get install openssh-client")
    argv = [client, *_ssh_options(lab.target), f"{lab.target.user}@{lab.target.host}", *ctx.args]
    os.execv(client, argv)


def _ssh_options(t: SSHTarget) -> list[str]:
    """OpenSSH options for a lab target; a jump host (the nested lab's L1) becomes a ProxyCommand with its
    own key and known_hosts, so both hops are host-key checked."""
    opts = ["-F", "none", "-p", str(t.port), "-o", "StrictHostKeyChecking=yes", "-o", "IdentitiesOnly=yes",
            "-o", "BatchMode=yes"]
    if t.key:
        opts += ["-i", str(t.key)]
    if t.known_hosts:
        opts += ["-o", f"UserKnownHostsFile={t.known_hosts}"]
    if t.jump is not None:
        client = shutil.which("ssh") or "ssh"
        hop = [client, *_ssh_options(t.jump), "-W", "%h:%p", f"{t.jump.user}@{t.jump.host}"]
        # ssh splits ProxyCommand with a shell: quote each word.
        opts += ["-o", "ProxyCommand=" + shlex.join(hop).replace("%", "%%").replace("%%h:%%p", "%h:%p")]
    return opts


def _machine(value: str) -> Machine:
    if value not in ("q35", "pc"):
        raise errors.InvalidRequest(f"invalid --machine {value!r}: expected q35 or pc")
    return value  # type: ignore[return-value]


def _accel(value: str) -> Accel:
    if value not in ("qemu", "kvm"):
        raise errors.InvalidRequest(f"invalid --accel {value!r}: expected qemu (TCG) or kvm")
    if value == "kvm" and not os.path.exists("/dev/kvm"):
        raise errors.Unsupported("--accel kvm needs /dev/kvm on this host")
    return value  # type: ignore[return-value]
