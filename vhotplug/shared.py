"""Directories that every vhotplug user of a host shares: root and operators in libvirt's group.

libvirt lets a member of the ``libvirt`` group hot-plug into ``qemu:///system`` domains, so vhotplug's own
bookkeeping must be shared the same way: the locks that keep two runs off one domain or device, the record
of a detach still pending, the passthrough journal. A lock file root made and an operator cannot reopen
would let both proceed, or refuse one for no reason. So the shared directories are owned by the libvirt
group with the setgid bit (files made in them belong to that group whoever makes them) and are
group-writable; files vhotplug makes there are group-writable too (``group_writable``), whatever the umask.
The journal's directory is not world-readable (2770); the others are (2775). What is private to one user
(SSH connection-sharing sockets) lives in a directory of that user's own inside (``guest.mux.socket_dir``).

Only root can create a directory under ``/run`` or ``/var/lib``: an operator who runs vhotplug before root
ever did gets one line saying so (``make setup`` creates them).
"""

from __future__ import annotations

import contextlib
import grp
import os
import stat
from pathlib import Path

from vhotplug import errors

#: The group libvirt's own socket is shared with (Debian's and Fedora's packages).
GROUP = "libvirt"


def _group_id() -> int | None:
    try:
        return grp.getgrnam(os.environ.get("VHOTPLUG_GROUP", GROUP)).gr_gid
    except KeyError:
        return None  # no libvirt group on this host: root-only, as before


def shared_dir(path: Path, *, world_readable: bool = True, what: str = "the directory",
               env: str = "VHOTPLUG_RUN_DIR") -> Path:
    """``path`` (and its missing parents), shared with the libvirt group; returned as is when it exists.

    ``what`` names it in errors; ``env`` is the variable that moves it elsewhere (said in the hint)."""
    if path.is_dir():
        return path
    mode = 0o2775 if world_readable else 0o2770
    missing = [p for p in (path, *path.parents) if not p.exists()]
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=mode)
        except FileExistsError:
            continue  # another vhotplug made it meanwhile
        except PermissionError as exc:
            raise errors.VhotplugError(
                f"cannot create {what} {directory}: {exc.strerror} (only root can create it)",
                hint="run `make setup`, or any vhotplug command once as root: it creates the directories "
                     f"vhotplug shares with the {GROUP} group; or point {env} to a directory of yours",
            ) from exc
        except OSError as exc:
            raise errors.VhotplugError(f"cannot create {what} {path}: {exc.strerror}",
                                       hint=f"point {env} to a writable directory") from exc
        _share(directory, mode)
    return path


def _share(directory: Path, mode: int) -> None:
    """Give a directory we just made to the libvirt group, setgid and group-writable (mkdir's mode met the
    umask; chmod does not)."""
    gid = _group_id()
    with contextlib.suppress(PermissionError):  # an operator's own directory stays in its own group
        if gid is not None and os.geteuid() == 0:
            os.chown(directory, -1, gid)
        os.chmod(directory, mode)


def group_writable(fd: int) -> None:
    """Make a file we own (just created in a shared directory) readable and writable by the group."""
    st = os.fstat(fd)
    if st.st_uid == os.geteuid() and (st.st_mode & 0o060) != 0o060:
        os.fchmod(fd, stat.S_IMODE(st.st_mode) | 0o060)
