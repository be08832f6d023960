"""Option types reused by several commands."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer

from vhotplug import errors

#: The longest --timeout. NaN passed Click's minimum (it compares false) and never expired; inf and values
#: above ~1e10 s overflowed time_t inside the wait for libvirt's event (an OverflowError traceback).
MAX_TIMEOUT = 86400.0


def _domain_ref(value: str) -> str:
    # libvirt's names are UTF-8: undecodable argv bytes (lone surrogates to Python) made its binding raise
    # UnicodeEncodeError, a traceback, instead of "domain not found".
    if not _is_utf8(value):
        raise errors.InvalidRequest(f"invalid domain {value!r}: not valid UTF-8 (libvirt's names are)")
    return value


def _is_utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _timeout(value: float) -> float:
    if not math.isfinite(value) or value > MAX_TIMEOUT:
        raise typer.BadParameter(f"{value:g} is not in the range 0.1 to {MAX_TIMEOUT:g} seconds.")
    return value


DomainArg = Annotated[str, typer.Argument(metavar="DOMAIN", callback=_domain_ref,
                                          help="Domain name, UUID or id (as in virsh).")]

SSHOpt = Annotated[
    str | None,
    typer.Option("--ssh", metavar="USER@HOST[:PORT]",
                 help="Reach the guest here; default: the domain's metadata, else its interface addresses."),
]
SSHKeyOpt = Annotated[
    Path | None, typer.Option("--ssh-key", metavar="FILE", help="Private key for guest SSH.")
]
KnownHostsOpt = Annotated[
    Path | None,
    typer.Option("--known-hosts", metavar="FILE", help="known_hosts file for the guest (default ~/.ssh/known_hosts)."),
]
AcceptNewOpt = Annotated[
    bool,
    typer.Option("--accept-new-host-key",
                 help="Trust and record an unknown guest host key (a changed key is still refused)."),
]
LiveOpt = Annotated[bool, typer.Option("--live", help="Affect the running domain.")]
ConfigOpt = Annotated[bool, typer.Option("--config", help="Affect the persistent definition (next boot).")]
CurrentOpt = Annotated[bool, typer.Option("--current", help="Affect the current state: live if running, else config.")]
PersistentOpt = Annotated[
    bool, typer.Option("--persistent", help="Affect the definition, and the running domain if it runs.")
]
PrintXmlOpt = Annotated[bool, typer.Option("--print-xml", help="Print the device XML and change nothing.")]
VerifyOpt = Annotated[
    bool | None,
    typer.Option("--verify/--no-verify",
                 help="Check inside the guest over SSH (default: on when the guest's SSH access is known)."),
]
TimeoutOpt = Annotated[float, typer.Option("--timeout", min=0.1, callback=_timeout,
                                           help="Seconds to wait for the guest.")]
WaitLockOpt = Annotated[
    bool,
    typer.Option("--wait-lock",
                 help="If another vhotplug holds the domain or device, wait for it instead of failing (exit 13)."),
]
SSHJumpOpt = Annotated[
    str | None,
    typer.Option("--ssh-jump", metavar="USER@HOST[:PORT]",
                 help="Reach the guest through this host (OpenSSH's ProxyJump); its host key is checked too, "
                      "with the same --ssh-key and --known-hosts."),
]
