"""The nested lab's L1: a hypervisor guest under the host's libvirtd that runs a libvirtd of its own.

L1 lets passthrough be exercised on devices that are not this machine's: it owns an emulated e1000
(pcie.0 slot 5, alone in its IOMMU group behind an emulated Intel IOMMU) and a USB tablet, and is
managed like any remote hypervisor, over ``qemu+ssh://root@127.0.0.1:PORT/system``.

L1 has no disk image. Its root is the host's ``/`` shared read-only over 9p under a tmpfs overlay,
so it runs the host's own libvirtd, QEMU, dropbear and udevd; the boot files (``/init``, root.sh,
inittab, sysinit, qemu.conf, one udev rule) are the fixed files in ``vhotplug/lab/l1/``. The lab directory is
shared a second time, read-only and uncached, at the same path: L2 guests inside L1 boot from files
the host writes there, and L1 sees them as they are now. Files::

    $VHOTPLUG_LAB_DIR/l1/vmlinuz-KVER        private copy: libvirt chowns <kernel>/<initrd> while a domain runs
    $VHOTPLUG_LAB_DIR/l1/initrd.img          busybox + the modules L1 needs + /init + its keys
    $VHOTPLUG_LAB_DIR/l1/dropbear_ecdsa_host_key, host_key.pub, id_lab, id_lab.pub, stamp.json
    $VHOTPLUG_LAB_DIR/domains/NAME/known_hosts   L1's host key at its forwarded port (OpenSSH and paramiko)
    $VHOTPLUG_LAB_DIR/domains/NAME/ssh-wrapper   the URI's command=: ssh that uses only these files
    $VHOTPLUG_LAB_DIR/domains/NAME/serial.log

The QEMU capability cache in L1 is not seeded: libvirtd's first probe costs a few seconds per boot,
and a seed would have to follow every QEMU and libvirt upgrade of the host to stay correct.

The machinery here (image, ssh wrapper, URI, boot and reuse) is shared with the Xen lab
(:mod:`vhotplug.lab.xen`), whose dom0 is an L1 of another :class:`Profile`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shlex
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from urllib.parse import quote

import libvirt
from lxml import etree

from vhotplug import errors, templates
from vhotplug.guest.ssh import wait_for_ssh
from vhotplug.guest.target import METADATA_NS, SSHTarget, metadata_element, target_from_metadata
from vhotplug.lab import image as lab_image
from vhotplug.lab import manager
from vhotplug.lab.domain import add_mgmt_nic, check_name, mgmt_mac
from vhotplug.virt.connection import open_connection, still_running
from vhotplug.virt.errors import translate

#: Bump when the L1 image changes in a way the other inputs (boot files, modules, kernel) do not capture.
FORMAT_VERSION = 1
KIND = "l1"

#: The files under vhotplug/lab/ (here: l1/) and where they go in the initramfs (/init installs the others).
#: /init, shared by every L1 profile, sources /vhotplug/root.sh: the profile's own preparation of the root.
INIT_FILE = "l1/init"
#: Sourced by every profile's sysinit.sh: the log line, /dev/pts, /dev/shm, the /dev/fd links, cgroup2.
BASE_FILE = "l1/base.sh"
BOOT_FILES: dict[str, tuple[str, int]] = {
    INIT_FILE: ("init", 0o755),
    "l1/root.sh": ("vhotplug/root.sh", 0o644),
    BASE_FILE: ("vhotplug/base.sh", 0o644),
    "l1/inittab": ("vhotplug/inittab", 0o644),
    "l1/sysinit.sh": ("vhotplug/sysinit.sh", 0o755),
    "l1/qemu.conf": ("vhotplug/qemu.conf", 0o644),
    "l1/udev.rules": ("vhotplug/udev.rules", 0o644),
}
#: Loaded by /init before switch_root: L1's udev has no rules that load modules, so nothing would later.
MODULES: tuple[str, ...] = (
    "virtio_pci", "virtio_net", "9pnet_virtio", "9p", "overlay",
    "vfio_pci", "vfio_iommu_type1", "e1000", "xhci_pci", "usbhid", "hid_generic", "ahci", "sd_mod",
)
#: Without these L1 has no root, no network, or nothing to pass through with.
REQUIRED_MODULES: tuple[str, ...] = (
    "virtio_pci", "virtio_net", "9pnet_virtio", "9p", "overlay", "vfio_pci", "vfio_iommu_type1",
)
#: Host programs L1 runs through its 9p root (program -> Debian package).
HOST_PROGRAMS: dict[str, str] = {
    "/usr/sbin/libvirtd": "libvirt-daemon-system",
    "/usr/sbin/virtlogd": "libvirt-daemon-system",
    "/usr/bin/qemu-system-x86_64": "qemu-system-x86",
    "/usr/sbin/dropbear": "dropbear-bin",
    "/lib/systemd/systemd-udevd": "udev",
    "/bin/udevadm": "udev",
}

MEMORY_MIB = 1536
VCPUS = 2
#: The PCI function and USB device L1 owns, to give to its L2 guests.
E1000_SLOT = 5
E1000_NODEDEV = "pci_0000_00_05_0"
TABLET_IDS = (0x0627, 0x0001)

#: Inside L1: the lab directory is a read-only, uncached view of the host's; what L1's libvirt writes
#: (its guests' serial logs) belongs on L1's own file system, in this directory (tmpfs, made at boot).
GUEST_LOG_DIR = manager.REMOTE_LOG_DIR

INITRD_NAME = "initrd.img"
STAMP_NAME = "stamp.json"
WRAPPER_NAME = "ssh-wrapper"
ROOT_TAG = "hostroot"
LAB_TAG = "vhlab"
SSH_HOST = "127.0.0.1"
POLL_INTERVAL = 0.25
#: How long a running L1 may take to prove it is usable before ``up_l1`` replaces it.
REUSE_SSH_SECONDS = 5.0
REUSE_LIBVIRT_SECONDS = 15.0
#: One attempt to reach libvirtd in L1 (an ssh login and a call; ~3 s under TCG) is given up after this.
LIBVIRT_ATTEMPT_SECONDS = 30.0

# Paths written into the wrapper script, the URI and ssh -o options. ssh splits option values at
# whitespace and expands % and ~ in them, so only plain characters are accepted at all.
_SAFE_PATH = re.compile(r"^/[A-Za-z0-9._+/-]*$")
_META = {"vh": METADATA_NS}


@dataclass(frozen=True)
class Profile:
    """What makes one kind of L1: its boot files, the modules its initramfs loads, the host programs it runs.

    ``kind`` names the image directory (``$VHOTPLUG_LAB_DIR/KIND``) and the ``vh:lab kind=`` of its domains.
    """

    kind: str
    boot_files: Mapping[str, tuple[str, int]]
    modules: tuple[str, ...]
    required_modules: tuple[str, ...]
    host_programs: Mapping[str, str]
    format_version: int = FORMAT_VERSION
    extra_inputs: Mapping[str, object] = field(default_factory=dict)


L1_PROFILE = Profile(KIND, BOOT_FILES, MODULES, REQUIRED_MODULES, HOST_PROGRAMS)


@dataclass(frozen=True)
class L1Image:
    """A built L1 image (paths under ``$VHOTPLUG_LAB_DIR/l1``)."""

    kver: str
    kernel: Path
    initrd: Path
    host_key_pub: str
    client_key: Path
    build_id: str  # changes whenever anything the image is built from changes


@dataclass(frozen=True)
class L1:
    """A running (or defined) L1 and how to reach it."""

    name: str
    target: SSHTarget
    uri: str
    state: str
    boot_seconds: float = 0.0  # start -> SSH answered (0 when an already running L1 was reused)
    libvirt_seconds: float = 0.0  # start -> libvirtd answered over ``uri``
    kind: str = KIND

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name, "kind": self.kind, "state": self.state, "uri": self.uri,
            "ssh": str(self.target),
            "key": str(self.target.key) if self.target.key else None,
            "known_hosts": str(self.target.known_hosts) if self.target.known_hosts else None,
            "boot_seconds": round(self.boot_seconds, 2), "libvirt_seconds": round(self.libvirt_seconds, 2),
        }


# --------------------------------------------------------------------------------------------------
# paths


def image_dir(kind: str = KIND) -> Path:
    """Where the image of an L1 profile is built: ``$VHOTPLUG_LAB_DIR/KIND``."""
    return manager.lab_root() / kind


def l1_dir() -> Path:
    return image_dir(KIND)


def safe_path(path: Path | str, what: str) -> str:
    """``path`` as text if it is absolute and made of plain characters only; LabError otherwise."""
    text = str(path)
    if not _SAFE_PATH.match(text) or "/../" in f"{text}/":
        raise errors.LabError(
            f"{what} {text!r} cannot be used by the nested lab: it goes into an ssh command line and a "
            "libvirt URI, so only an absolute path of letters, digits and ._+-/ is accepted",
            hint="use plain paths (VHOTPLUG_LAB_DIR, where the lab's files go, defaults to /var/lib/vhotplug/lab)",
        )
    return text


@dataclass(frozen=True)
class DomainFiles:
    """An L1's files on this machine, under ``$VHOTPLUG_LAB_DIR/domains/NAME`` (``lab down`` removes them)."""

    known_hosts: Path
    wrapper: Path
    serial_log: Path
    sata_disk: Path


def domain_files(name: str) -> DomainFiles:
    ddir = manager.domain_dir(name)
    return DomainFiles(ddir / "known_hosts", ddir / WRAPPER_NAME, ddir / "serial.log", ddir / "sata.img")


def ssh_uri(driver: str, port: int, *, key: Path, known_hosts: Path, wrapper: Path) -> str:
    """The ``DRIVER+ssh`` URI of an L1 forwarded at ``127.0.0.1:port`` (``qemu`` for L1, ``xen`` for dom0).

    ``known_hosts=`` is not used by libvirt's ssh transport (the wrapper pins the key); it is there
    for vhotplug's own SSH login to the same host (``host list`` reads host facts over it).
    """
    if driver not in ("qemu", "xen"):
        raise errors.InvalidRequest(f"invalid libvirt driver {driver!r} for an L1 URI: expected qemu or xen")
    params = (("keyfile", key), ("known_hosts", known_hosts), ("command", wrapper))
    query = "&".join(f"{k}={quote(safe_path(v, k), safe='/')}" for k, v in params)
    return f"{driver}+ssh://root@{SSH_HOST}:{_check_port(port)}/system?{query}"


def l1_uri(port: int, *, key: Path, known_hosts: Path, wrapper: Path) -> str:
    """The ``qemu+ssh`` URI of an L1 forwarded at ``127.0.0.1:port``."""
    return ssh_uri("qemu", port, key=key, known_hosts=known_hosts, wrapper=wrapper)


def _check_port(port: int) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise errors.InvalidRequest(f"invalid port {port!r} for the L1 SSH forward: expected 1-65535")
    return port


# --------------------------------------------------------------------------------------------------
# the ssh wrapper


def ssh_wrapper_script(*, key: Path, known_hosts: Path, ssh: Path | str | None = None) -> str:
    """The wrapper libvirt runs as ``command=``: ssh with L1's own known_hosts and key, nothing of ``~/.ssh``.

    libvirt runs it with a scrubbed environment, so everything is in the script itself. One plain
    connection per call: OpenSSH connection sharing failed intermittently under libvirt.
    """
    ssh = ssh or shutil.which("ssh", path="/usr/bin:/bin:/usr/local/bin")
    if not ssh:
        raise errors.LabError("the nested lab needs the OpenSSH client (ssh), which is not installed",
                              hint="apt-get install openssh-client")
    argv = [
        safe_path(ssh, "ssh program"), "-F", "none",
        "-o", "BatchMode=yes",
        "-o", "StrictHostKeyChecking=yes",
        "-o", f"UserKnownHostsFile={safe_path(known_hosts, 'known_hosts file')}",
        "-o", "GlobalKnownHostsFile=/dev/null",
        "-o", "CheckHostIP=no",
        "-o", "UpdateHostKeys=no",
        "-o", "IdentitiesOnly=yes",
        "-o", f"IdentityFile={safe_path(key, 'key file')}",
        "-o", "IdentityAgent=none",
        "-o", "ControlMaster=no",
        "-o", "ControlPath=none",
        "-o", "ConnectTimeout=10",
        "-o", "LogLevel=ERROR",
    ]
    return (
        "#!/bin/sh\n"
        "# ssh for libvirt's qemu+ssh transport to a vhotplug nested-lab L1 (the URI's command=).\n"
        "# Generated by vhotplug; libvirt runs it with a scrubbed environment, so all settings are here.\n"
        f"exec {shlex.join(argv)} \"$@\"\n"
    )


def write_ssh_wrapper(path: Path, *, key: Path, known_hosts: Path, ssh: Path | str | None = None) -> Path:
    """Write the wrapper (0755, atomically) and return its path."""
    safe_path(path, "ssh wrapper")
    script = ssh_wrapper_script(key=key, known_hosts=known_hosts, ssh=ssh)
    lab_image.atomic_write(path, script.encode(), 0o755)
    return path


# --------------------------------------------------------------------------------------------------
# the image


def _boot_file(rel: str) -> bytes:
    """A boot file shipped with vhotplug, by its path under ``vhotplug/lab`` (``l1/init``)."""
    directory, _, name = rel.partition("/")
    try:
        return (resources.files("vhotplug.lab") / directory / name).read_bytes()
    except OSError as exc:
        raise errors.LabError(f"the L1 boot file {rel} is missing from the vhotplug installation: {exc}",
                              hint="reinstall vhotplug") from exc


def _inputs(kver: str, profile: Profile) -> dict[str, object]:
    """What the image is built from; the same inputs (and keys) mean the build is up to date."""
    sources = (lab_image.BOOT_DIR / f"{lab_image.KERNEL_PREFIX}{kver}",
               lab_image.MODULES_DIR / kver / "modules.dep", lab_image.BUSYBOX)
    return {
        "format": profile.format_version,
        "kver": kver,
        "boot_files": {n: hashlib.sha256(_boot_file(n)).hexdigest() for n in profile.boot_files},
        "modules": [*profile.modules, "", *profile.required_modules],
        "sources": {str(p): lab_image.fingerprint(p) for p in sources},
        **profile.extra_inputs,
    }


def _build_id(inputs: dict[str, object], host_pub: str, client_pub: str) -> str:
    doc = json.dumps({"inputs": inputs, "host": host_pub, "client": client_pub}, sort_keys=True)
    return hashlib.sha256(doc.encode()).hexdigest()[:16]


def _image_from(out: Path, stamp: dict[str, object]) -> L1Image | None:
    """The image the stamp describes, if every output file is there and the keys are the stamped ones."""
    kver, build_id = stamp.get("kver"), stamp.get("build_id")
    if not isinstance(kver, str) or not isinstance(build_id, str):
        return None
    kernel, initrd = out / f"{lab_image.KERNEL_PREFIX}{kver}", out / INITRD_NAME
    client_key = out / lab_image.CLIENT_KEY_NAME
    pub_file = out / lab_image.HOST_KEY_PUB_NAME
    files = (kernel, initrd, client_key, out / f"{lab_image.CLIENT_KEY_NAME}.pub", out / lab_image.HOST_KEY_NAME,
             pub_file)
    if not all(f.is_file() for f in files):
        return None
    host_pub = lab_image.parse_pub(pub_file.read_text(), lab_image.HOST_KEY_ALGO)
    client_pub = (out / f"{lab_image.CLIENT_KEY_NAME}.pub").read_text().strip()
    if host_pub is None or host_pub != stamp.get("host_key_pub") or client_pub != stamp.get("client_key_pub"):
        return None
    if client_pub != lab_image.public_line(lab_image.load_private_key(client_key)):
        return None
    return L1Image(kver, kernel, initrd, host_pub, client_key, build_id)


def _stage(staging: Path, modules: list[Path], host_key: Path, client_pub: str, profile: Profile) -> None:
    """Lay out the initramfs: busybox, the modules, /init, and under /vhotplug what /init installs."""
    for d in ("proc", "sys", "dev", "lower", "rw", "newroot", "bin", "sbin", "usr/bin", "usr/sbin", "vhotplug"):
        (staging / d).mkdir(parents=True, exist_ok=True)
        os.chmod(staging / d, 0o755)
    lab_image.copy_in(staging, lab_image.BUSYBOX, "bin/busybox", 0o755)
    for rel, target in lab_image.busybox_applet_links(lab_image.BUSYBOX).items():
        link = staging / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, link)
    for dep in lab_image.elf_deps(lab_image.BUSYBOX):
        lab_image.copy_in(staging, dep, str(dep), 0o755)

    for name, (dest, mode) in profile.boot_files.items():
        (staging / dest).write_bytes(_boot_file(name))
        os.chmod(staging / dest, mode)
    lab_image.copy_in(staging, host_key, f"vhotplug/{lab_image.HOST_KEY_NAME}", 0o600)
    (staging / "vhotplug/authorized_keys").write_text(f"{client_pub}\n")
    os.chmod(staging / "vhotplug/authorized_keys", 0o600)

    loaded = [lab_image.copy_module(staging, ko) for ko in modules]
    (staging / "vhotplug/modules.order").write_text("".join(f"{p}\n" for p in loaded))


def _check_host(profile: Profile) -> None:
    lab_image.need_file(lab_image.BUSYBOX, "busybox-static", "a static busybox")
    for program, package in profile.host_programs.items():
        if not os.access(program, os.X_OK):
            raise errors.LabError(f"the {profile.kind} lab runs the host's {program} inside its L1, and it is not "
                                  "installed", hint=f"apt-get install {package}")


def prepare_root() -> Path:
    """The lab directory, created if needed and reachable by QEMU (an unprivileged user)."""
    root = manager.lab_root()
    safe_path(root, "lab directory")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise errors.LabError(f"cannot create the lab directory {root}: {exc.strerror}") from exc
    for path in (root, *root.parents):
        if path.stat().st_mode & 0o001 == 0:
            raise errors.LabError(
                f"lab directory {root} is not reachable by the QEMU process: {path} is not world-searchable",
                hint="set VHOTPLUG_LAB_DIR to a directory under /var/lib or /srv",
            )
    return root


def build_l1(*, kver: str | None = None, force: bool = False) -> L1Image:
    """Build (or reuse) the nested lab's L1 image in ``$VHOTPLUG_LAB_DIR/l1``."""
    return build_image(L1_PROFILE, kver=kver, force=force)


def build_image(profile: Profile, *, kver: str | None = None, force: bool = False) -> L1Image:
    """Build (or reuse) the image of an L1 ``profile`` in ``$VHOTPLUG_LAB_DIR/KIND``.

    The existing image is returned untouched when its stamp matches the current inputs (unless
    ``force``). Keys are generated only when their files are missing, and kept across rebuilds.
    """
    prepare_root()
    kver = kver or lab_image.default_kver()
    kernel_src = lab_image.check_kver(kver)
    _check_host(profile)
    out = image_dir(profile.kind)
    try:
        if not out.is_dir():
            out.mkdir()
            os.chmod(out, 0o755)  # QEMU (another user) reads the kernel and initrd
        with lab_image.locked_dir(out):
            return _build_locked(out, kver, kernel_src, force, profile)
    except OSError as exc:
        raise errors.LabError(f"building the {profile.kind} image in {out} failed: {exc}") from exc


def _build_locked(out: Path, kver: str, kernel_src: Path, force: bool, profile: Profile) -> L1Image:
    inputs = _inputs(kver, profile)
    stamp = lab_image.read_stamp(out)
    if not force and stamp is not None and stamp.get("inputs") == inputs:
        image = _image_from(out, stamp)
        if image is not None:
            return image
    lab_image.remove_leftovers(out)
    host_pub = lab_image.ensure_host_key(out)
    client_pub = lab_image.ensure_client_key(out)
    modules = lab_image.resolve_modules(kver, profile.modules, required=profile.required_modules)
    initrd = out / INITRD_NAME
    with tempfile.TemporaryDirectory(dir=out, prefix=".staging-") as tmp:
        _stage(Path(tmp), modules, out / lab_image.HOST_KEY_NAME, client_pub, profile)
        lab_image.pack_initramfs(Path(tmp), initrd)
    kernel = out / f"{lab_image.KERNEL_PREFIX}{kver}"
    try:
        lab_image.atomic_copy(kernel_src, kernel)
    except OSError as exc:
        raise errors.LabError(f"cannot copy the kernel {kernel_src}: {exc.strerror}",
                              hint="run as root (the kernel under /boot may be readable by root only)") from exc
    for old in out.glob(f"{lab_image.KERNEL_PREFIX}*"):
        if old != kernel:
            old.unlink()
    build_id = _build_id(inputs, host_pub, client_pub)
    new_stamp = {"inputs": inputs, "kver": kver, "build_id": build_id, "host_key_pub": host_pub,
                 "client_key_pub": client_pub, "modules": [p.name for p in modules],
                 "initrd_bytes": initrd.stat().st_size}
    lab_image.atomic_write(out / STAMP_NAME, (json.dumps(new_stamp, indent=2, sort_keys=True) + "\n").encode())
    return L1Image(kver, kernel, initrd, host_pub, out / lab_image.CLIENT_KEY_NAME, build_id)


def planned_image(kind: str = KIND) -> L1Image:
    """The built image if there is one, else where build_image will put it (for XML previews)."""
    d = image_dir(kind)
    with contextlib.suppress(OSError, ValueError, errors.LabError):
        stamp = lab_image.read_stamp(d)
        if stamp is not None and (image := _image_from(d, stamp)) is not None:
            return image
    return L1Image("", d / "vmlinuz", d / INITRD_NAME, "", d / lab_image.CLIENT_KEY_NAME, "")


# --------------------------------------------------------------------------------------------------
# the domain XML


def give_mac(name: str) -> str:
    """A stable MAC for the e1000 L1 gives away (distinct from the management NIC's)."""
    return mgmt_mac(f"{name}/e1000")


def boot_args(name: str) -> str:
    """What /init of L1 ``name`` reads from its kernel command line: the management NIC's MAC, the lab directory."""
    return f"vhotplug.mgmt_mac={mgmt_mac(name)} vhotplug.labdir={safe_path(manager.lab_root(), 'lab directory')}"


def l1_target(name: str, port: int, image: L1Image) -> SSHTarget:
    """The SSH login of L1 ``name`` forwarded at ``127.0.0.1:port``, its host key pinned in its own file."""
    files = domain_files(name)
    return SSHTarget(SSH_HOST, _check_port(port), "root", image.client_key, files.known_hosts, source="lab metadata")


def fill_l1_domain(root: etree._Element, name: str, port: int, image: L1Image, *, driver: str, kind: str,
                   machine: str, build_id: str) -> None:
    """What every L1 domain has, filled into its template ``root``.

    The name, the share of the lab directory (``vhlab``), the serial log, the ``vh:guest`` metadata (the
    SSH login and ``vh:lab kind=... uri=... image=...``) and the management NIC: user networking with SSH
    forwarded on 127.0.0.1 only, on the QEMU command line so the host's libvirt does not list it as a
    device (as for the lab guest). The kernel command line is the caller's (with :func:`boot_args`).
    """
    files = domain_files(name)
    target = l1_target(name, port, image)
    lab_dir = safe_path(manager.lab_root(), "lab directory")
    uri = ssh_uri(driver, port, key=image.client_key, known_hosts=files.known_hosts, wrapper=files.wrapper)
    mac = mgmt_mac(name)

    root.find("name").text = name
    devices = root.find("devices")
    devices.xpath("filesystem[target/@dir=$tag]/source", tag=LAB_TAG)[0].set("dir", lab_dir)
    devices.find("serial/source").set("path", safe_path(files.serial_log, "serial log"))

    meta = metadata_element(target)
    lab = etree.SubElement(meta, f"{{{METADATA_NS}}}lab")
    lab.set("kind", kind)
    lab.set("machine", machine)
    lab.set("accel", root.get("type"))
    lab.set("serial-log", str(files.serial_log))
    lab.set("uri", uri)
    if build_id:
        lab.set("image", build_id)  # an L1 booted from another build is replaced, not reused
    root.find("metadata").append(meta)

    add_mgmt_nic(root, SSH_HOST, target.port, mac, "bus=pcie.0,addr=0x1e")


def l1_xml(name: str, port: int, *, image: L1Image | None = None, memory_mib: int = MEMORY_MIB,
           vcpus: int = VCPUS) -> str:
    """The domain XML of L1 ``name`` with SSH forwarded from ``127.0.0.1:port``.

    ``image``: the built image (default: the one in the lab directory, or its future paths).
    """
    check_name(name)
    image = image or planned_image()
    root = templates.load("lab-l1")
    for tag in ("memory", "currentMemory"):
        root.find(tag).text = str(int(memory_mib))
    root.find("vcpu").text = str(int(vcpus))
    root.find("os/kernel").text = str(image.kernel)
    root.find("os/initrd").text = str(image.initrd)
    root.find("os/cmdline").text = f"console=ttyS0 edd=off quiet intel_iommu=on {boot_args(name)}"
    fill_l1_domain(root, name, port, image, driver="qemu", kind=KIND, machine="q35", build_id=image.build_id)
    devices = root.find("devices")
    devices.find("interface/mac").set("address", give_mac(name))
    devices.find("disk/source").set("file", safe_path(domain_files(name).sata_disk, "SATA disk image"))
    return templates.tostring(root)


# --------------------------------------------------------------------------------------------------
# lifecycle


def _read_l1(dom: libvirt.virDomain, kind: str = KIND) -> tuple[L1, str] | None:
    """The L1 of ``kind`` described by ``dom``'s metadata and the build it was booted from; None if not one."""
    try:
        xml = dom.XMLDesc(0)
        state = manager.STATES.get(dom.state()[0], "unknown")
    except libvirt.libvirtError:
        return None  # vanished meanwhile
    root = etree.fromstring(xml.encode())
    lab = root.xpath("//vh:guest/vh:lab[@kind=$kind]", namespaces=_META, kind=kind)
    target = target_from_metadata(root)
    if not lab or target is None or not lab[0].get("uri"):
        return None
    l1 = L1(dom.name(), replace(target, source="lab metadata"), lab[0].get("uri"), state, kind=kind)
    return l1, lab[0].get("image", "")


def find_l1(conn: libvirt.virConnect, name: str, *, kind: str = KIND) -> L1 | None:
    """The L1 named ``name`` from its domain metadata; None if there is no such domain or it is not one."""
    dom = manager.find_domain(conn, check_name(name))
    if dom is None:
        return None
    found = _read_l1(dom, kind)
    return found[0] if found else None


def _ask_libvirt(uri: str) -> Exception | None:
    """Open ``uri`` and ask for the version: None when libvirtd answered, else why not."""
    try:
        conn = open_connection(uri)
    except errors.ConnectionFailed as exc:
        return exc
    try:
        conn.getVersion()
        return None
    except libvirt.libvirtError as exc:
        return translate(exc)
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()


def _ask_libvirt_within(uri: str, seconds: float) -> Exception | None:
    """:func:`_ask_libvirt`, given up after ``seconds``: a libvirtd that accepted the connection but hangs
    (seen in a dom0 whose xenstored was missing) would block the open for ever. The abandoned attempt
    stays blocked in its daemon thread (and its ssh process) until this process exits."""
    result: list[Exception | None] = []
    worker = threading.Thread(target=lambda: result.append(_ask_libvirt(uri)), daemon=True,
                              name="vhotplug-libvirt-probe")
    worker.start()
    worker.join(max(seconds, 0.0))
    if not result:
        return errors.Timeout(f"no answer within {seconds:.0f} s")
    return result[0]


def wait_for_libvirt(uri: str, *, deadline: float, dom: libvirt.virDomain | None = None) -> float:
    """Poll until libvirtd answers ``getVersion`` over ``uri``; return seconds waited.

    Bounded by ``deadline`` (``time.monotonic()``), each attempt too; with ``dom``, stop early if that
    domain stops.
    """
    start = time.monotonic()
    last: Exception | None = None
    while time.monotonic() < deadline:
        if dom is not None and not still_running(dom):
            raise errors.LabError(f"L1 {dom.name()} stopped while waiting for its libvirtd")
        last = _ask_libvirt_within(uri, min(deadline - time.monotonic(), LIBVIRT_ATTEMPT_SECONDS))
        if last is None:
            return time.monotonic() - start
        time.sleep(POLL_INTERVAL)
    raise errors.Timeout(f"libvirtd in L1 did not answer over {uri} in time: {last}")


def _wait_ssh(dom: libvirt.virDomain, target: SSHTarget, deadline: float) -> None:
    """wait_for_ssh in short slices, failing at once when the domain stops (a failed /init powers off)."""
    while True:
        if not still_running(dom):
            raise errors.LabError(f"L1 {dom.name()} stopped during boot")
        try:
            wait_for_ssh(target, deadline=min(deadline, time.monotonic() + 5))
            return
        except errors.Timeout:
            if time.monotonic() >= deadline:
                raise


def _usable(l1: L1) -> bool:
    """A running L1 answers SSH and libvirt within a short bound."""
    try:
        wait_for_ssh(l1.target, deadline=time.monotonic() + REUSE_SSH_SECONDS)
        wait_for_libvirt(l1.uri, deadline=time.monotonic() + REUSE_LIBVIRT_SECONDS)
    except errors.VhotplugError:
        return False
    return True


def reuse_or_remove(conn: libvirt.virConnect, name: str, *, kind: str, build_id: str) -> L1 | None:
    """The running L1 ``name`` of ``kind`` if it was booted from ``build_id`` and answers; else remove
    whatever lab domain has that name (a domain of that name that is not a lab domain is refused)."""
    dom = manager.find_domain(conn, check_name(name))
    if dom is None:
        return None
    found = _read_l1(dom, kind)
    if found is not None:
        l1, booted_from = found
        if l1.state == "running" and booted_from == build_id and _usable(l1):
            return l1
    manager.down(conn, name)  # refuses a domain that is not a lab domain
    return None


def up_l1(conn: libvirt.virConnect, name: str, *, timeout: float = 180.0) -> L1:
    """Boot L1 ``name`` (building what is missing) and wait until its libvirtd answers over its URI.

    A running L1 of the same build that answers is reused as it is; a stopped, unreachable or
    outdated one, or another lab domain of that name, is replaced. A domain of that name that is
    not a lab domain is refused.
    """
    check_name(name)
    image = build_l1()
    found = reuse_or_remove(conn, name, kind=KIND, build_id=image.build_id)
    if found is not None:
        return found
    files = domain_files(name)
    files.known_hosts.parent.mkdir(parents=True, exist_ok=True)
    write_sata_disk(files.sata_disk)
    return boot_l1(conn, name, image, lambda port: l1_xml(name, port, image=image), driver="qemu", kind=KIND,
                   timeout=timeout)


#: The disk on L1's spare SATA controller: 16 MiB, one Linux partition from sector 2048 (an MBR).
SATA_DISK_BYTES = 16 << 20


def write_sata_disk(path: Path) -> None:
    """A fresh, sparse disk image with an MBR and one partition, so the guest that gets the controller
    has something to list (the seed's ``fdisk -l``). Fresh on every boot: it holds no data."""
    sectors = SATA_DISK_BYTES // 512
    entry = bytes([0x00, 0, 0, 0, 0x83, 0, 0, 0]) + (2048).to_bytes(4, "little") + (sectors - 2048).to_bytes(
        4, "little")
    mbr = bytearray(512)
    mbr[446:462] = entry
    mbr[510:512] = b"\x55\xaa"
    with path.open("wb") as f:
        f.write(mbr)
        f.truncate(SATA_DISK_BYTES)
    os.chmod(path, 0o644)


def boot_l1(conn: libvirt.virConnect, name: str, image: L1Image, xml_for: Callable[[int], str], *, driver: str,
            kind: str, timeout: float) -> L1:
    """Define and start L1 ``name`` from ``xml_for(port)``, and wait until its libvirtd answers.

    The SSH forward's port is chosen here (free at this moment, on loopback only); the L1's host key is
    pinned for it in the domain's own known_hosts file, which the ssh wrapper of its URI uses.
    """
    files = domain_files(name)
    files.known_hosts.parent.mkdir(parents=True, exist_ok=True)
    target = l1_target(name, manager.free_port(), image)
    lab_image.atomic_write(files.known_hosts,
                            manager.known_hosts_line(target.host, target.port, image.host_key_pub).encode())
    write_ssh_wrapper(files.wrapper, key=image.client_key, known_hosts=files.known_hosts)
    files.serial_log.unlink(missing_ok=True)
    xml = xml_for(target.port)
    uri = ssh_uri(driver, target.port, key=image.client_key, known_hosts=files.known_hosts, wrapper=files.wrapper)
    dom, started = manager.define_and_start(conn, xml, f"L1 domain {name}")
    deadline = started + timeout
    try:
        _wait_ssh(dom, target, deadline)
        booted = time.monotonic() - started
        wait_for_libvirt(uri, deadline=deadline, dom=dom)
        ready = time.monotonic() - started
    except errors.VhotplugError as exc:
        with contextlib.suppress(libvirt.libvirtError):
            dom.destroy()
        raise errors.LabError(
            f"L1 {name} did not come up within {timeout:g} s ({exc}); last serial output "
            f"({files.serial_log}):\n{manager.serial_tail(files.serial_log)}",
            hint="the domain was stopped and left defined; `vhotplug lab down` removes it",
        ) from exc
    return L1(name, target, uri, "running", boot_seconds=booted, libvirt_seconds=ready, kind=kind)
