"""A read-only copy of the sysfs/procfs facts that decide "does the host use this device?", for any host.

The host-use checks (:mod:`vhotplug.host.usage`) read a tree below a root directory. For the machine
vhotplug runs on that root is ``/``; for a remote hypervisor (``qemu+ssh://``) vhotplug runs
``SNAPSHOT_SCRIPT`` there over SSH (``python3 -``, standard library only, reads and prints, changes
nothing), and :func:`materialize` rebuilds the answer as a small tree in a local temporary directory,
with the same relative symbolic links the kernel makes. The same checks then run on it unchanged.

Collected: the symbolic links under ``/sys/bus/{pci,usb}/devices``, ``/sys/block``, ``/sys/class/net``,
``/sys/kernel/iommu_groups`` and ``/dev/{mapper,disk/by-*}``; below ``/sys/devices`` (without power,
queue and similar subtrees) the directories, the links that tie devices together (``driver``,
``iommu_group``, ``holders/*``, ``upper_*``, ``master``, NVMe controllers) and a short list of small
attribute files; ``/proc/self/mountinfo``, ``/proc/swaps`` and the routing/address tables; and the IPv4
addresses from ``ip -j -4 addr show`` (kept in ``IPV4_FILE`` inside the tree).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

#: Inside a materialized tree: the remote host's IPv4 addresses (sysfs does not have them).
IPV4_FILE = ".vhotplug/ipv4.json"

SNAPSHOT_SCRIPT = r'''
import json, os, subprocess, sys
R = sys.argv[1] if len(sys.argv) > 1 else ""
ATTRS = {"class", "vendor", "device", "dev", "partition", "flags", "operstate", "busnum", "devnum",
         "bDeviceClass", "bInterfaceClass", "idVendor", "idProduct", "name", "uuid", "address", "mount_tag"}
SKIP = {"power", "msi_irqs", "wakeup", "statistics", "queue", "trace", "mq", "integrity", "slaves",
        "queues", "bdi", "firmware_node", "subsystem", "ptp", "hwmon"}
LINKS = {"driver", "iommu_group", "master"}
links, files, dirs = {}, {}, []

def link(p):
    try:
        links[p] = os.readlink(R + p)
    except OSError:
        pass

def text(p, limit=4096):
    try:
        with open(R + p, errors="replace") as f:
            files[p] = f.read(limit)
    except OSError:
        pass

def entries(base, depth=1):
    try:
        names = sorted(os.listdir(R + base))
    except OSError:
        return
    for n in names:
        p = base + "/" + n
        if os.path.islink(R + p):
            link(p)
        elif depth > 1 and os.path.isdir(R + p):
            entries(p, depth - 1)

for base in ("/sys/bus/pci/devices", "/sys/bus/usb/devices", "/sys/block", "/sys/class/net", "/dev/mapper"):
    entries(base)
entries("/dev/disk", 2)
try:
    groups = os.listdir(R + "/sys/kernel/iommu_groups")
except OSError:
    groups = []
dirs.append("/sys/kernel/iommu_groups")
for g in groups:
    dirs.append("/sys/kernel/iommu_groups/%s/devices" % g)
    entries("/sys/kernel/iommu_groups/%s/devices" % g)

def walk(top):
    for path, subdirs, names in os.walk(R + top):
        rel = path[len(R):]
        dirs.append(rel)
        for n in subdirs + names:
            p = rel + "/" + n
            if os.path.islink(R + p):
                if n in LINKS or n.startswith("upper_") or n.startswith("nvme") or rel.endswith("/holders"):
                    link(p)
            elif n in ATTRS and os.path.isfile(R + p):
                text(p)
        subdirs[:] = [d for d in subdirs if d not in SKIP and not os.path.islink(path + "/" + d)]

for top in ("/sys/devices/virtual/block", "/sys/devices/virtual/net", "/sys/devices/virtual/nvme-subsystem"):
    walk(top)
try:
    tops = sorted(os.listdir(R + "/sys/devices"))
except OSError:
    tops = []
for t in tops:
    if t.startswith("pci") or t == "platform":
        walk("/sys/devices/" + t)
for p in ("/proc/self/mountinfo", "/proc/self/mounts", "/proc/swaps", "/proc/net/route",
          "/proc/net/ipv6_route", "/proc/net/if_inet6"):
    text(p, 1 << 20)
ipv4 = None
if not R:
    try:
        out = subprocess.run(["ip", "-j", "-4", "addr", "show"], capture_output=True, text=True, timeout=5).stdout
        ipv4 = {i["ifname"]: ["%s/%s" % (a["local"], a["prefixlen"]) for a in i.get("addr_info", [])]
                for i in json.loads(out or "[]")}
    except Exception:
        ipv4 = None
json.dump({"version": 1, "links": links, "files": files, "dirs": dirs, "ipv4": ipv4}, sys.stdout)
'''


def _inside(root: Path, path: str) -> Path:
    """``root/path`` for an absolute ``path`` that must stay below ``root`` (the host is not trusted)."""
    target = Path(os.path.normpath(root / path.lstrip("/")))
    if not target.is_relative_to(root) or ".." in Path(path).parts:
        raise ValueError(f"path outside the snapshot: {path!r}")
    return target


def materialize(doc: dict[str, object], root: Path) -> Path:
    """Rebuild a snapshot as a tree below ``root`` (created); return ``root``.

    Link targets are kept as the host wrote them (relative, as the kernel makes them); an absolute
    target is re-rooted below ``root`` so that nothing ever points outside the snapshot.
    """
    if doc.get("version") != 1:
        raise ValueError("unknown snapshot version")
    root.mkdir(parents=True, exist_ok=True)
    for d in doc.get("dirs") or []:  # type: ignore[union-attr]
        _inside(root, str(d)).mkdir(parents=True, exist_ok=True)
    for path, content in (doc.get("files") or {}).items():  # type: ignore[union-attr]
        f = _inside(root, path)
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(str(content))
    for path, target in (doc.get("links") or {}).items():  # type: ignore[union-attr]
        link = _inside(root, path)
        link.parent.mkdir(parents=True, exist_ok=True)
        target = str(target)
        if target.startswith("/"):
            target = os.path.relpath(_inside(root, target), link.parent)
        elif not Path(os.path.normpath(link.parent / target)).is_relative_to(root):
            raise ValueError(f"link {path!r} points outside the snapshot")
        if link.is_symlink() or link.exists():
            continue
        os.symlink(target, link)
    if doc.get("ipv4") is not None:
        ipv4 = _inside(root, IPV4_FILE)
        ipv4.parent.mkdir(parents=True, exist_ok=True)
        ipv4.write_text(json.dumps(doc["ipv4"]))
    return root


def read_ipv4(root: Path) -> dict[str, list[str]] | None:
    """The IPv4 addresses a materialized snapshot carries, or None."""
    try:
        doc = json.loads((root / IPV4_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict):
        return None
    return {str(k): [str(a) for a in v] for k, v in doc.items() if isinstance(v, list)}
