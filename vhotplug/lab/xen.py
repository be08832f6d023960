"""The Xen lab: Xen and its dom0 booted as one L1 domain under the host's libvirtd (TCG), managed over xen+ssh.

``vhotplug lab up --xen`` boots, as an ordinary libvirt domain on this machine (q35, a virtual Intel
IOMMU), the Xen hypervisor straight from QEMU's multiboot loader with the host's Debian kernel as dom0.
dom0 is an L1 of the nested lab's kind (:mod:`vhotplug.lab.nested`, same ``/init``, ssh wrapper, key
pinning, boot and reuse): its root is the host's ``/`` over 9p with the unpacked Xen packages as a
second read-only layer above it, under a tmpfs. It runs xenstored, xenconsoled, dropbear, virtlogd and
libvirtd with the Xen (libxl) driver, and owns a spare e1000e (8086:10d3) at :data:`E1000E_BDF` to pass
through to its guests. ``vhotplug -c URI lab up`` then defines the lab guest inside it as a Xen PV domU
(:mod:`vhotplug.lab.xenpv`).

Nothing of Xen is installed on, or run on, this machine: its packages are fetched with ``apt-get
download`` and unpacked with ``dpkg-deb -x`` (no maintainer scripts) into the lab directory::

    $VHOTPLUG_LAB_DIR/xen/debs/*.deb        the package set (resolve_packages), checked by SHA-256
    $VHOTPLUG_LAB_DIR/xen/root/             the unpacked tree: dom0's upper lower layer (9p tag xenroot)
    $VHOTPLUG_LAB_DIR/xen/root.stamp        which debs the tree was unpacked from (redone when they change)
    $VHOTPLUG_LAB_DIR/xen/xen-VER-amd64     the hypervisor, gunzipped for QEMU's multiboot loader
    $VHOTPLUG_LAB_DIR/xen/vmlinuz-KVER, initrd.img, keys, stamp.json   dom0's kernel and initramfs
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import libvirt

from vhotplug import errors, templates
from vhotplug.lab import image as lab_image
from vhotplug.lab import nested
from vhotplug.lab.domain import check_name, mgmt_mac
from vhotplug.lab.nested import L1, L1Image, Profile

KIND = "xen"
DEFAULT_NAME = "vhotplug-xen"
XEN_VERSION = "4.17"
#: What dom0 needs of Xen; resolve_packages adds their Xen libraries (and anything the host lacks).
ROOT_PACKAGES: tuple[str, ...] = (
    f"xen-hypervisor-{XEN_VERSION}-amd64", f"xen-utils-{XEN_VERSION}", "xen-utils-common", "xenstore-utils",
    "libvirt-daemon-driver-xen",
)
#: Pinned to the host's own libvirt (dom0 runs the host's libvirtd with this driver module).
LIBVIRT_PACKAGE = "libvirt-daemon"
_XEN_NAME = re.compile(r"^(lib)?xen")

MEMORY_MIB = 3072
VCPUS = 2
DOM0_MEMORY = "1024M"
#: Xen's command line: its console on the first serial port (the domain's serial log), dom0's share.
XEN_CMDLINE = (f"console=com1 com1=115200,8n1 dom0_mem={DOM0_MEMORY},max:{DOM0_MEMORY} dom0_max_vcpus={VCPUS} "
               "noreboot iommu=1")
DOM0_CMDLINE = "console=hvc0 earlyprintk=xen quiet"
XEN_TAG = "xenroot"

#: The spare e1000e dom0 owns, to give to its guests: behind the only pcie-root-port (pcie.0 slot 1), so
#: the firmware numbers its bus 1. Directly on pcie.0 libvirt's Xen driver cannot reset it for passthrough.
E1000E_IDS = (0x8086, 0x10D3)
E1000E_BDF = "0000:01:00.0"
E1000E_NODEDEV = "pci_0000_01_00_0"

#: The Xen lab's dom0: the nested lab's /init with a root.sh, inittab and sysinit of its own.
BOOT_FILES: dict[str, tuple[str, int]] = {
    nested.INIT_FILE: ("init", 0o755),
    nested.BASE_FILE: ("vhotplug/base.sh", 0o644),
    "dom0/root.sh": ("vhotplug/root.sh", 0o644),
    "dom0/inittab": ("vhotplug/inittab", 0o644),
    "dom0/sysinit.sh": ("vhotplug/sysinit.sh", 0o755),
}
#: Loaded by /init for the 9p root and the management NIC; sysinit.sh modprobes the Xen ones from that root.
MODULES: tuple[str, ...] = ("virtio_pci", "virtio_net", "9pnet_virtio", "9p", "overlay")
HOST_PROGRAMS: dict[str, str] = {
    "/usr/sbin/libvirtd": "libvirt-daemon-system",
    "/usr/sbin/virtlogd": "libvirt-daemon-system",
    "/usr/sbin/dropbear": "dropbear-bin",
    "/sbin/modprobe": "kmod",
}
PROFILE = Profile(KIND, BOOT_FILES, MODULES, MODULES, HOST_PROGRAMS)

DEBS_DIR = "debs"
ROOT_DIR = "root"
ROOT_STAMP = "root.stamp"
_APT_TIMEOUT = 600


@dataclass(frozen=True)
class Deb:
    """One package file of the set, as ``apt-get download --print-uris`` names it."""

    package: str
    filename: str
    size: int
    sha256: str


@dataclass(frozen=True)
class XenTree:
    """The unpacked Xen packages and the hypervisor taken from them."""

    root: Path
    hypervisor: Path
    debs: tuple[str, ...]
    stamp: str  # changes whenever the package set does


def xen_dir() -> Path:
    return nested.image_dir(KIND)


# --------------------------------------------------------------------------------------------------
# the package set


def _apt(argv: list[str], what: str, *, cwd: Path | None = None, check: bool = True) -> str:
    tool = lab_image.need_tool(argv[0], "apt" if argv[0].startswith("apt") else "dpkg")
    try:
        proc = subprocess.run([tool, *argv[1:]], capture_output=True, text=True, check=False, cwd=cwd,
                              timeout=_APT_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise errors.LabError(f"{what}: {argv[0]} failed: {exc}") from exc
    if check and proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise errors.LabError(f"{what}: `{' '.join(argv)}` failed: {detail[-1] if detail else proc.returncode}",
                              hint="run `apt-get update` (the package lists may be missing or stale)")
    return proc.stdout


def parse_depends(text: str) -> dict[str, list[list[str]]]:
    """``apt-cache depends`` output: package -> its Depends/PreDepends, each a group of alternatives.

    Virtual names (``<python3:any>``) are left out; their providers are listed as real dependencies too.
    """
    out: dict[str, list[list[str]]] = {}
    current: list[list[str]] | None = None
    group: list[str] = []
    for line in text.splitlines():
        if line and not line[0].isspace():
            current = out.setdefault(line.strip(), [])
            group = []
            continue
        m = re.match(r"^ ([ |])(?:Pre)?Depends: (\S+)$", line)
        if current is None or m is None:
            continue
        name = m.group(2)
        if not name.startswith("<"):
            group.append(name.split(":", 1)[0])
        if m.group(1) != "|":  # the last alternative of its group
            if group:
                current.append(group)
            group = []
    return out


def resolve_packages(depends: Callable[[list[str]], dict[str, list[list[str]]]],
                     installed: Callable[[Iterable[str]], set[str]],
                     roots: Iterable[str] = ROOT_PACKAGES) -> list[str]:
    """The packages to unpack: ``roots``, the Xen ones they need (``libxen*``, ``xen*``, always), and any
    other dependency this host does not have installed (dom0 runs the host's own userland otherwise).

    ``depends``: package names -> their dependency groups (:func:`parse_depends`); ``installed``: which of
    the names are installed here. Alternatives are satisfied by any member already chosen or installed.
    """
    chosen: list[str] = []
    todo = list(dict.fromkeys(roots))
    while todo:
        chosen += todo
        groups = [g for deps in depends(todo).values() for g in deps]
        names = {n for g in groups for n in g}
        have = installed(names) | set(chosen)
        todo = []
        for group in groups:
            xen = [n for n in group if _XEN_NAME.match(n)]
            if xen:
                pick = xen[0] if xen[0] not in have else None
            else:
                pick = None if any(n in have for n in group) else group[0]
            if pick is not None and pick not in todo:
                todo.append(pick)
    return chosen


def _apt_depends(names: list[str]) -> dict[str, list[list[str]]]:
    flags = ["--no-recommends", "--no-suggests", "--no-conflicts", "--no-breaks", "--no-replaces", "--no-enhances"]
    return parse_depends(_apt(["apt-cache", "depends", *flags, *names], "resolving the Xen packages"))


def installed_packages(names: Iterable[str]) -> set[str]:
    """Which of ``names`` dpkg has installed on this machine (read from its database; nothing is run of them)."""
    names = sorted(set(names))
    if not names:
        return set()
    out = _apt(["dpkg-query", "-W", "-f", "${Package}\t${db:Status-Abbrev}\n", *names],
               "reading the host's package list", check=False)
    return {line.split("\t")[0] for line in out.splitlines() if "\t" in line and line.split("\t")[1].startswith("ii")}


def _host_version(package: str) -> str | None:
    out = _apt(["dpkg-query", "-W", "-f", "${Version}", package], "reading the host's package list", check=False)
    return out.strip() or None


def parse_print_uris(text: str) -> list[Deb]:
    """``apt-get download --print-uris`` output: ``'URI' FILENAME SIZE SHA256:HEX`` per package."""
    debs = []
    for line in text.splitlines():
        m = re.match(r"^'[^']+' ((\S+?)_[^_\s/]+_[^_\s/]+\.deb) (\d+) SHA256:([0-9a-f]{64})$", line.strip())
        if m:
            debs.append(Deb(m.group(2), m.group(1), int(m.group(3)), m.group(4)))
    return debs


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_debs(out: Path) -> list[Deb]:
    """The Xen package set as .debs in ``out``: only the missing or damaged ones are downloaded; others removed."""
    packages = resolve_packages(_apt_depends, installed_packages)
    version = _host_version(LIBVIRT_PACKAGE)
    spec = {p: f"{p}={version}" if p == "libvirt-daemon-driver-xen" and version else p for p in packages}
    debs = parse_print_uris(_apt(["apt-get", "download", "--print-uris", *spec.values()],
                                 "locating the Xen packages"))
    missing = sorted(set(packages) - {d.package for d in debs})
    if missing:
        raise errors.LabError(f"apt knows no download for {', '.join(missing)}",
                              hint="run `apt-get update` (Debian 12 has Xen 4.17)")
    out.mkdir(parents=True, exist_ok=True)
    need = [d for d in debs if not (out / d.filename).is_file() or _sha256(out / d.filename) != d.sha256]
    if need:
        # apt-get download puts the files in its working directory; it installs nothing.
        _apt(["apt-get", "download", *(spec[d.package] for d in need)], "downloading the Xen packages", cwd=out)
        bad = [d.filename for d in need if not (out / d.filename).is_file() or _sha256(out / d.filename) != d.sha256]
        if bad:
            raise errors.LabError(f"downloaded Xen packages do not match apt's checksums: {', '.join(bad)}")
    keep = {d.filename for d in debs}
    for old in out.glob("*.deb"):
        if old.name not in keep:
            old.unlink()
    return debs


# --------------------------------------------------------------------------------------------------
# the unpacked tree


def tree_stamp(debs: Iterable[Deb]) -> str:
    return hashlib.sha256("".join(f"{d.filename} {d.sha256}\n" for d in sorted(debs, key=lambda d: d.filename))
                          .encode()).hexdigest()[:16]


def _hypervisor_gz(root: Path) -> Path:
    found = sorted(root.glob("boot/xen-*-amd64.gz"))
    if not found:
        raise errors.LabError(f"no boot/xen-*-amd64.gz in the unpacked Xen packages ({root})")
    return found[-1]


def _unpack(out: Path, debs: list[Deb]) -> XenTree:
    """``dpkg-deb -x`` every package into a fresh tree (no maintainer script runs), then swap it in."""
    stamp = tree_stamp(debs)
    root = out / ROOT_DIR
    stamp_file = out / ROOT_STAMP
    with contextlib.suppress(OSError, errors.LabError):  # no tree yet, or an incomplete one
        if stamp_file.read_text().strip() == stamp and root.is_dir():
            gz = _hypervisor_gz(root)
            hypervisor = out / gz.name.removesuffix(".gz")
            if hypervisor.is_file():
                return XenTree(root, hypervisor, tuple(d.filename for d in debs), stamp)
    new, old = out / ".root-new", out / ".root-old"
    for d in (new, old):
        shutil.rmtree(d, ignore_errors=True)
    new.mkdir()
    for deb in debs:
        _apt(["dpkg-deb", "-x", str(out / DEBS_DIR / deb.filename), str(new)], f"unpacking {deb.filename}")
    os.chmod(new, 0o755)  # QEMU (another user) serves it over 9p
    gz = _hypervisor_gz(new)
    hypervisor = out / gz.name.removesuffix(".gz")
    lab_image.atomic_write(hypervisor, gzip.decompress(gz.read_bytes()))
    if root.exists():
        root.rename(old)
    new.rename(root)
    shutil.rmtree(old, ignore_errors=True)
    lab_image.atomic_write(stamp_file, f"{stamp}\n".encode())
    return XenTree(root, hypervisor, tuple(d.filename for d in debs), stamp)


def prepare_xen() -> XenTree:
    """Fetch (what is missing of) the Xen packages and unpack them, unless the tree is of the same debs."""
    nested.prepare_root()
    out = xen_dir()
    try:
        if not out.is_dir():
            out.mkdir()
            os.chmod(out, 0o755)
        with lab_image.locked_dir(out):
            debs = fetch_debs(out / DEBS_DIR)
            return _unpack(out, debs)
    except OSError as exc:
        raise errors.LabError(f"preparing the Xen packages in {out} failed: {exc}") from exc


# --------------------------------------------------------------------------------------------------
# the domain XML


def give_mac(name: str) -> str:
    """A stable MAC for the e1000e dom0 gives away (distinct from the management NIC's)."""
    return mgmt_mac(f"{name}/e1000e")


def multiboot_modules(name: str, image: L1Image) -> str:
    """QEMU's multiboot module list for ``<initrd>``: dom0's kernel with its command line, then its initramfs.

    QEMU splits the list at commas; nothing in it may have one (paths are plain: see nested.safe_path).
    """
    kernel = nested.safe_path(image.kernel, "dom0 kernel")
    initrd = nested.safe_path(image.initrd, "dom0 initramfs")
    args = f"{DOM0_CMDLINE} {nested.boot_args(name)} vhotplug.lower={XEN_TAG}"
    if "," in args:
        raise errors.LabError(f"dom0's command line cannot contain a comma: {args!r}")
    return f"{kernel} {args},{initrd}"


def build_id(image: L1Image, tree: XenTree) -> str:
    """Changes when dom0's image or the Xen packages do: a running Xen lab of another build is replaced."""
    return hashlib.sha256(f"{image.build_id}/{tree.stamp}".encode()).hexdigest()[:16] if image.build_id else ""


def planned_tree() -> XenTree:
    """The tree prepare_xen makes, by its paths (for XML previews and tests)."""
    out = xen_dir()
    return XenTree(out / ROOT_DIR, out / f"xen-{XEN_VERSION}-amd64", (), "")


def xen_xml(name: str, port: int, *, image: L1Image | None = None, tree: XenTree | None = None) -> str:
    """The domain XML of the Xen lab ``name`` (Xen + dom0) with dom0's SSH forwarded from ``127.0.0.1:port``."""
    check_name(name)
    image = image or nested.planned_image(KIND)
    tree = tree or planned_tree()
    root = templates.load("lab-xen")
    root.find("os/kernel").text = nested.safe_path(tree.hypervisor, "Xen hypervisor")
    root.find("os/initrd").text = multiboot_modules(name, image)
    root.find("os/cmdline").text = XEN_CMDLINE
    nested.fill_l1_domain(root, name, port, image, driver="xen", kind=KIND, machine="q35",
                          build_id=build_id(image, tree))
    devices = root.find("devices")
    devices.xpath("filesystem[target/@dir=$tag]/source", tag=XEN_TAG)[0].set(
        "dir", nested.safe_path(tree.root, "Xen package tree"))
    devices.find("interface/mac").set("address", give_mac(name))
    return templates.tostring(root)


# --------------------------------------------------------------------------------------------------
# lifecycle


def find_xen(conn: libvirt.virConnect, name: str) -> L1 | None:
    """The Xen lab named ``name`` from its domain metadata; None if there is none."""
    return nested.find_l1(conn, name, kind=KIND)


def up_xen(conn: libvirt.virConnect, name: str = DEFAULT_NAME, *, timeout: float = 180.0) -> L1:
    """Boot the Xen lab ``name`` (fetching and building what is missing) and wait until libvirtd in dom0
    answers over its ``xen+ssh`` URI.

    A running Xen lab of the same build that answers is reused as it is; a stopped, unreachable or
    outdated one, or another lab domain of that name, is replaced; any other domain of that name is refused.
    """
    check_name(name)
    tree = prepare_xen()
    image = nested.build_image(PROFILE)
    found = nested.reuse_or_remove(conn, name, kind=KIND, build_id=build_id(image, tree))
    if found is not None:
        return found
    return nested.boot_l1(conn, name, image, lambda port: xen_xml(name, port, image=image, tree=tree),
                          driver="xen", kind=KIND, timeout=timeout)
