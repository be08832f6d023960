"""Decide whether and how a command checks inside the guest, and open the one SSH session."""

from __future__ import annotations

from pathlib import Path

import libvirt

from vhotplug import errors
from vhotplug.guest.ssh import GuestSession
from vhotplug.guest.target import resolve_target, target_from_metadata

#: How long a login may be tried for a command without --timeout (check, list --guest).
DEFAULT_LOGIN_TIMEOUT = 30.0


def open_guest(dom: libvirt.virDomain, *, verify: bool | None, live: bool, ssh: str | None, ssh_key: Path | None,
               known_hosts: Path | None, accept_new_host_key: bool,
               ssh_jump: str | None = None, timeout: float = DEFAULT_LOGIN_TIMEOUT) -> GuestSession | None:
    """A connected session when the guest should be checked, else None.

    ``verify=None`` (the default) checks when the guest's access is *known*: given
    with --ssh or recorded in the domain's metadata. Connecting happens before
    anything changes, so an unreachable guest leaves the domain untouched. The login is tried again
    while it fails for a reason that may pass, for up to ``timeout`` (the command's --timeout).
    """
    if verify is False:
        return None
    if not live:
        if verify:
            raise errors.InvalidRequest("--verify checks the running guest: it needs a live change",
                                        hint="drop --verify, or use --live/--persistent on a running domain")
        return None
    recorded = None if ssh else target_from_metadata(dom.XMLDesc(0))
    if verify is None and not ssh and recorded is None:
        return None
    target = resolve_target(dom, ssh=ssh, key=ssh_key, known_hosts=known_hosts, metadata=recorded, jump=ssh_jump)
    return GuestSession(target, accept_new_host_key=accept_new_host_key, share=True, login_timeout=timeout).connect()
