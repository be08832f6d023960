"""Where to read a hypervisor host's own facts (sysfs, mounts, routes) for the host-use checks.

- A local URI (``qemu:///system``): this machine's ``/``.
- ``qemu+ssh://[user@]host[:port]/...?keyfile=KEY[&known_hosts=FILE]``: the same host over SSH, with the
  same user, port and key as libvirt's own transport and strict host-key checking; a read-only snapshot
  (:mod:`vhotplug.host.snapshot`) is copied into a temporary directory removed when vhotplug exits.
- Anything else (TLS, TCP, the test driver): unknown, and the checks say so.
"""

from __future__ import annotations

import atexit
import getpass
import json
import shlex
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from vhotplug import errors
from vhotplug.guest.target import SSHTarget, check_host, check_port
from vhotplug.host.inventory import is_local_uri
from vhotplug.host.snapshot import SNAPSHOT_SCRIPT, materialize

SNAPSHOT_TIMEOUT = 60.0
_TEMP_DIRS: list[Path] = []


def cleanup() -> None:
    """Remove the snapshot copies this process made (also run at exit; the CLI calls it before its fast exit)."""
    while _TEMP_DIRS:
        shutil.rmtree(_TEMP_DIRS.pop(), ignore_errors=True)


atexit.register(cleanup)


@dataclass(frozen=True)
class HostFacts:
    """A tree to read host facts from (None: none could be read) and, if none, why."""

    root: Path | None
    why_not: str | None = None


def ssh_target_from_uri(uri: str) -> SSHTarget | None:
    """The SSH login a ``driver+ssh://`` libvirt URI uses; None for other transports."""
    parts = urlsplit(uri)
    if not parts.scheme.endswith("+ssh") or not parts.hostname:
        return None
    query = parse_qs(parts.query)
    key = query.get("keyfile", [None])[0]
    known = query.get("known_hosts", [None])[0]
    return SSHTarget(host=check_host(parts.hostname), port=check_port(parts.port or 22),
                     user=unquote(parts.username) if parts.username else getpass.getuser(),
                     key=Path(key) if key else None, known_hosts=Path(known) if known else None,
                     source="the libvirt URI")


def facts_for_uri(uri: str) -> HostFacts:
    """The host facts for the hypervisor ``uri`` names (see the module docstring)."""
    if is_local_uri(uri):
        return HostFacts(Path("/"))
    target = ssh_target_from_uri(uri)
    if target is None:
        return HostFacts(None, f"the host of {uri} is not this machine and not reached over SSH")
    try:
        return HostFacts(remote_snapshot(target))
    except errors.VhotplugError as exc:
        return HostFacts(None, f"reading the host's facts over SSH failed: {exc.message}")


def remote_snapshot(target: SSHTarget) -> Path:
    """Run the snapshot script on ``target`` and rebuild its answer locally; the tree's root."""
    from vhotplug.guest.ssh import GuestSession  # paramiko only when a remote host is checked

    with GuestSession(target) as session:
        result = session.run_script(shlex.join(["python3", "-c", SNAPSHOT_SCRIPT]), timeout=SNAPSHOT_TIMEOUT,
                                    check=False)
    if result.status != 0:
        raise errors.GuestCommandFailed(f"the snapshot script failed on {target} (exit {result.status}): "
                                        f"{result.stderr.strip()[:200] or 'no error output'}",
                                        hint="the hypervisor host needs python3")
    try:
        doc = json.loads(result.stdout)
        root = Path(tempfile.mkdtemp(prefix="vhotplug-hostfacts-"))
        _TEMP_DIRS.append(root)
        return materialize(doc, root)
    except (ValueError, TypeError, OSError) as exc:
        raise errors.GuestCommandFailed(f"the host facts from {target} are unusable: {exc}") from exc
