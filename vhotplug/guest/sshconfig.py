"""``--ssh HOST`` as ``ssh HOST`` would read it: through the user's OpenSSH client configuration.

The file is ``$VHOTPLUG_SSH_CONFIG`` (set by the global ``--ssh-config FILE``, like ``ssh -F``), else
``~/.ssh/config``. From the ``Host`` block(s) matching HOST, vhotplug takes HostName, User, Port, the first
IdentityFile and UserKnownHostsFile, and ProxyJump (hops separated by commas, each an alias or
``[user@]host[:port]`` again, as OpenSSH allows). What the command line says wins, as with ssh: ``user@`` over
User, ``:port`` over Port, ``--ssh-key`` over IdentityFile, ``--known-hosts`` over UserKnownHostsFile,
``--ssh-jump`` over ProxyJump. Host keys are still checked strictly (StrictHostKeyChecking is not read), and
the ssh-agent is used when no key file is named, as ssh does.

paramiko's parser reads the file (Host patterns, negation, Match canonical/final, %-tokens), and is imported
only when there is a file to read.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from vhotplug import errors
from vhotplug.guest.target import SSHTarget, check_host, check_port, check_user, split_ssh_spec

#: ProxyJump hops followed at most (an alias whose ProxyJump names itself would loop).
MAX_HOPS = 8


def config_path() -> Path:
    return Path(os.environ.get("VHOTPLUG_SSH_CONFIG") or Path.home() / ".ssh" / "config")


def _lookup(host: str, path: Path) -> dict[str, object]:
    """The options ``path`` sets for ``host`` (empty when the file does not exist or says nothing of it)."""
    if not path.is_file():
        if "VHOTPLUG_SSH_CONFIG" in os.environ:
            raise errors.InvalidRequest(f"SSH config file {path} does not exist",
                                        hint="check --ssh-config or VHOTPLUG_SSH_CONFIG")
        return {}
    import paramiko

    try:
        found = dict(paramiko.SSHConfig.from_path(str(path)).lookup(host))
    except (OSError, UnicodeDecodeError, paramiko.SSHException, ValueError) as exc:
        raise errors.InvalidRequest(f"cannot read the SSH config file {path}: {exc}") from exc
    if found.get("hostname") == host:
        del found["hostname"]  # paramiko echoes the name back when no block renames it
    return found


def _first_path(value: object) -> Path | None:
    """First of IdentityFile/UserKnownHostsFile (paramiko gives a list, or a space-separated string)."""
    items = value if isinstance(value, list) else str(value or "").split()
    for item in items:
        if item and item.lower() != "none":
            return Path(os.path.expanduser(str(item)))
    return None


def resolve_spec(spec: str, *, path: Path | None = None, _hops: int = 0) -> SSHTarget:
    """The login ``ssh SPEC`` would make: ``[user@]host[:port]`` completed from the SSH config file."""
    path = path or config_path()
    user, host, port = split_ssh_spec(spec)
    found = _lookup(host, path)
    name = str(found.get("hostname") or host)
    target = SSHTarget(
        host=check_host(name),
        port=check_port(port if port is not None else found.get("port", 22)),
        user=check_user(user or str(found.get("user") or "root"), spec),
        key=_first_path(found.get("identityfile")),
        known_hosts=_first_path(found.get("userknownhostsfile")),
        source=f"{path} (Host {host})" if found else "command line",
    )
    jump = str(found.get("proxyjump") or "")
    if jump and jump.lower() != "none":
        if _hops >= MAX_HOPS:
            raise errors.InvalidRequest(f"ProxyJump in {path} goes more than {MAX_HOPS} hops deep (a loop?)")
        hop = None
        for part in jump.split(","):  # the first hop is reached first; each next one through it
            nxt = resolve_spec(part.strip(), path=path, _hops=_hops + 1)
            hop = replace(nxt, jump=hop) if hop is not None else nxt
        target = replace(target, jump=hop)
    return target
