"""Xen's pciback: let go of a PCI function libxl has put in its slot list, so the host driver gets it back.

libxl marks a function it assigns to a guest as pciback's own (``new_slot``), and leaves it there after
the detach: ``virNodeDeviceReAttach`` then unbinds it and reprobes, and pciback takes it again (seen
with libvirt 9.0 and Xen 4.17). ``xl pci-assignable-remove`` clears the slot first; so does this,
before libvirt's reattach. The write goes to the hypervisor host: this machine's sysfs for a local
URI, else over the same SSH login libvirt's ``xen+ssh://`` transport uses.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from vhotplug import errors
from vhotplug.addresses import Bdf

PCIBACK_DIR = Path("/sys/bus/pci/drivers/pciback")
TIMEOUT = 30.0

# Fixed text; the address arrives as $1 (a canonical DDDD:BB:SS.F, quoted). Only a listed slot is removed.
_SCRIPT = r"""
d=/sys/bus/pci/drivers/pciback
[ -e "$d/slots" ] || exit 0
grep -qx "$1" "$d/slots" || exit 0
echo "$1" > "$d/remove_slot"
"""


def slots(text: str) -> set[str]:
    """The functions in pciback's ``slots`` file (one ``DDDD:BB:SS.F`` per line)."""
    return {line.strip() for line in text.splitlines() if line.strip()}


def release_local(bdf: Bdf, pciback_dir: Path = PCIBACK_DIR) -> bool:
    """Remove ``bdf`` from this machine's pciback slot list; True if it was there."""
    try:
        listed = slots((pciback_dir / "slots").read_text())
    except FileNotFoundError:
        return False  # no pciback loaded: nothing holds it
    except OSError as exc:
        raise errors.VhotplugError(f"cannot read {pciback_dir}/slots: {exc.strerror}") from exc
    if str(bdf) not in listed:
        return False
    try:
        (pciback_dir / "remove_slot").write_text(f"{bdf}\n")
    except OSError as exc:
        raise errors.VhotplugError(f"cannot remove {bdf} from pciback's slots: {exc.strerror}",
                                   hint=f"as root on the Xen host: echo {bdf} > {pciback_dir}/remove_slot") from exc
    return True


def release(uri: str | None, bdf: Bdf) -> None:
    """Remove ``bdf`` from pciback's slot list on the host of ``uri`` (a no-op when it is not listed)."""
    from vhotplug.host.facts import ssh_target_from_uri
    from vhotplug.host.inventory import is_local_uri

    if uri is None or is_local_uri(uri):
        release_local(bdf)
        return
    target = ssh_target_from_uri(uri)
    if target is None:
        raise errors.Unsupported(
            f"{bdf} stays on pciback: the Xen host of {uri} is not reached over SSH, so vhotplug cannot clear "
            "its pciback slot", hint=f"on the Xen host: xl pci-assignable-remove -r {bdf}")
    from vhotplug.guest.ssh import GuestSession  # paramiko only for a remote Xen host

    with GuestSession(target) as session:
        result = session.run_script(shlex.join(["sh", "-c", _SCRIPT, "sh", str(bdf)]), timeout=TIMEOUT,
                                    check=False)
    if result.status != 0:
        raise errors.VhotplugError(
            f"removing {bdf} from pciback's slots on {target} failed (exit {result.status}): "
            f"{result.stderr.strip()[:200] or 'no error output'}",
            hint=f"on the Xen host: xl pci-assignable-remove -r {bdf}")
