"""Option types reused by several commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

DomainArg = Annotated[str, typer.Argument(metavar="DOMAIN", help="Domain name, UUID or id (as in virsh).")]

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
