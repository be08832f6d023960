"""Build the lab guest: the Debian kernel plus a tiny busybox + dropbear initramfs.

A libvirt domain boots the result directly (``<kernel>``/``<initrd>``/``<cmdline>``).
Everything lives in one output directory::

    vmlinuz-KVER                  copy of /boot/vmlinuz-KVER
    initrd.img                    gzip'd newc cpio, packed here in pure Python (deterministic)
    dropbear_ecdsa_host_key       the guest's SSH host key (0600), also inside the initramfs
    host_key.pub                  its "ecdsa-sha2-nistp256 AAAA..." line, for a known_hosts entry
    id_lab, id_lab.pub            the client key (0600) whose public line is root's authorized_keys
    stamp.json                    the inputs of the last build; a matching stamp means "up to date"

Keys are generated once and kept across rebuilds; only a missing key file is regenerated.
The guest's ``/init`` is the fixed file ``init.sh`` next to this module.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import paramiko

from vhotplug.errors import LabError

#: Bump when the layout or content of the image changes in a way the other inputs do not capture.
FORMAT_VERSION = 2

BOOT_DIR = Path("/boot")
MODULES_DIR = Path("/lib/modules")
BUSYBOX = Path("/bin/busybox")
DROPBEAR = Path("/usr/sbin/dropbear")
INIT_SCRIPT = Path(__file__).with_name("init.sh")

#: Refuse to produce an initramfs bigger than this (compressed).
MAX_INITRD_BYTES = 25 * 2**20

#: Drivers the lab guest loads at boot, so hot-plugged devices bind without any userspace helper.
MODULES: tuple[str, ...] = (
    "virtio_pci", "virtio_net", "virtio_blk", "virtio_scsi", "virtio_balloon", "virtio_console",
    "virtio_rng", "virtio_mem", "e1000", "e1000e", "8139cp", "8139too", "xhci_pci", "xhci_hcd",
    "ehci_pci", "ehci_hcd", "uhci_hcd", "ohci_pci", "usb_storage", "uas", "sd_mod", "sr_mod",
    "ahci", "libahci", "ata_piix", "usbhid", "hid_generic",
)
#: Without these the guest cannot be reached at all.
REQUIRED_MODULES: tuple[str, ...] = ("virtio_pci", "virtio_net")
#: The Xen PV front ends (the same image boots as a Xen PV domU): loaded only when /sys/hypervisor/type
#: says xen, from a list of their own, so a QEMU/KVM guest loads exactly what it did without them.
XEN_MODULES: tuple[str, ...] = ("xen_netfront", "xen_blkfront", "xen_pcifront")

KERNEL_PREFIX = "vmlinuz-"
INITRD_NAME = "initrd.img"
# ECDSA P-256, not Ed25519: dropbear 2022 signs Ed25519 with slow reference code,
# and under TCG that alone made every SSH handshake into the lab ~60 ms slower.
HOST_KEY_NAME = "dropbear_ecdsa_host_key"
HOST_KEY_ALGO = "ecdsa-sha2-nistp256"
HOST_KEY_PUB_NAME = "host_key.pub"
CLIENT_KEY_NAME = "id_lab"
STAMP_NAME = "stamp.json"
LOCK_NAME = ".lock"
#: Inside the guest: /lib/modules/KVER/<this>, one absolute .ko path per line, in load order.
MODULE_ORDER_NAME = "vhotplug-modules.order"
#: The same for XEN_MODULES (init.sh loads it under Xen only).
XEN_MODULE_ORDER_NAME = "vhotplug-xen-modules.order"

GUEST_HOSTNAME = "vhotplug-lab"
DROPBEAR_CMD = f"/usr/sbin/dropbear -F -E -s -r /etc/dropbear/{HOST_KEY_NAME} -p 22"

_BUILD_HINT = "run `vhotplug lab build`"


@dataclass(frozen=True)
class GuestImage:
    """A built lab guest image (all paths inside the output directory)."""

    kver: str
    kernel: Path
    initrd: Path
    host_key_pub: str
    client_key: Path
    client_key_pub: str


# --------------------------------------------------------------------------------------------------
# newc cpio


@dataclass(frozen=True)
class CpioEntry:
    """One member of a newc archive: ``name`` is relative (no leading slash), ``mode`` a full st_mode.

    A regular file's content is ``data`` or, read when the archive is written, the file ``source``;
    a symlink's ``data`` is its target.
    """

    name: str
    mode: int
    data: bytes = b""
    source: Path | None = None
    rdevmajor: int = 0
    rdevminor: int = 0

    def content(self) -> bytes:
        return self.source.read_bytes() if self.source is not None else self.data


_NEWC_MAGIC = b"070701"
_NEWC_HEADER_LEN = 110
_TRAILER = "TRAILER!!!"


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def _newc_header(ino: int, mode: int, nlink: int, size: int, rdev: tuple[int, int], namesize: int) -> bytes:
    # ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check
    fields = (ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev[0], rdev[1], namesize, 0)
    return _NEWC_MAGIC + b"".join(b"%08X" % f for f in fields)


def write_cpio(entries: Iterable[CpioEntry], out: BinaryIO) -> int:
    """Write ``entries`` as a newc archive (sorted by name, uid/gid 0, mtime 0); return the entry count.

    Sorting puts every directory before its contents, and makes the archive byte-for-byte
    reproducible for the same inputs.
    """
    by_name: dict[str, CpioEntry] = {}
    for entry in entries:
        name = entry.name.strip("/")
        if not name or name in by_name:
            raise ValueError(f"cpio: empty or duplicate member name {entry.name!r}")
        by_name[name] = entry
    ino = 0
    for name in sorted(by_name):
        entry = by_name[name]
        ino += 1
        data = b"" if stat.S_ISDIR(entry.mode) else entry.content()
        raw_name = name.encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(entry.mode) else 1
        header = _newc_header(ino, entry.mode, nlink, len(data), (entry.rdevmajor, entry.rdevminor),
                              len(raw_name))
        out.write(header + raw_name + _pad4(_NEWC_HEADER_LEN + len(raw_name)))
        out.write(data + _pad4(len(data)))
    trailer = _TRAILER.encode() + b"\0"
    out.write(_newc_header(0, 0, 1, 0, (0, 0), len(trailer)) + trailer
              + _pad4(_NEWC_HEADER_LEN + len(trailer)))
    return ino


def read_cpio(data: bytes) -> list[CpioEntry]:
    """Parse a newc archive (uncompressed) back into entries, stopping at the trailer."""
    entries: list[CpioEntry] = []
    pos = 0
    while True:
        header = data[pos:pos + _NEWC_HEADER_LEN]
        if len(header) < _NEWC_HEADER_LEN or header[:6] != _NEWC_MAGIC:
            raise ValueError(f"cpio: bad header at offset {pos}")
        fields = [int(header[6 + 8 * i:14 + 8 * i], 16) for i in range(13)]
        mode, size, rdevmajor, rdevminor, namesize = fields[1], fields[6], fields[9], fields[10], fields[11]
        pos += _NEWC_HEADER_LEN
        name = data[pos:pos + namesize - 1].decode()
        pos += namesize + len(_pad4(_NEWC_HEADER_LEN + namesize))
        if name == _TRAILER:
            return entries
        body = data[pos:pos + size]
        pos += size + len(_pad4(size))
        entries.append(CpioEntry(name, mode, body, rdevmajor=rdevmajor, rdevminor=rdevminor))


def tree_entries(root: Path) -> Iterator[CpioEntry]:
    """Entries for everything under ``root`` (not ``root`` itself): dirs, regular files, symlinks."""

    def walk(directory: Path, prefix: str) -> Iterator[CpioEntry]:
        with os.scandir(directory) as it:
            children = sorted(it, key=lambda e: e.name)
        for child in children:
            name = f"{prefix}{child.name}"
            st = child.stat(follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                yield CpioEntry(name, stat.S_IFLNK | 0o777, os.readlink(child.path).encode())
            elif stat.S_ISDIR(st.st_mode):
                yield CpioEntry(name, stat.S_IFDIR | stat.S_IMODE(st.st_mode))
                yield from walk(Path(child.path), f"{name}/")
            elif stat.S_ISREG(st.st_mode):
                yield CpioEntry(name, stat.S_IFREG | stat.S_IMODE(st.st_mode), source=Path(child.path))
            else:
                raise ValueError(f"cpio: unsupported file type: {child.path}")

    yield from walk(root, "")


# --------------------------------------------------------------------------------------------------
# host prerequisites


def need_tool(name: str, package: str) -> str:
    """Absolute path of an external tool (also looked up in the sbin dirs), or LabError."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/bin", "/bin"])
    found = shutil.which(name, path=path)
    if found is None:
        raise LabError(f"building the lab image needs `{name}`, which is not installed",
                       hint=f"apt-get install {package}")
    return found


def need_file(path: Path, package: str, what: str) -> None:
    if not path.is_file():
        raise LabError(f"building the lab image needs {what} ({path}), which is missing",
                       hint=f"apt-get install {package}")


def _run(argv: list[str], what: str) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=120)
    except OSError as exc:
        raise LabError(f"{what}: cannot run {argv[0]}: {exc.strerror}") from exc
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"{what}: {argv[0]} did not finish in 120 s") from exc
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise LabError(f"{what}: `{' '.join(argv)}` failed: {detail[-1] if detail else proc.returncode}")
    return proc.stdout


def _version_key(kver: str) -> tuple[tuple[int, int | str], ...]:
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"[.\-+~_]", kver) if p)


def default_kver(*, boot_dir: Path | None = None, modules_dir: Path | None = None) -> str:
    """The newest kernel with both ``/boot/vmlinuz-KVER`` and ``/lib/modules/KVER``."""
    boot_dir = boot_dir or BOOT_DIR
    modules_dir = modules_dir or MODULES_DIR
    kvers = [p.name[len(KERNEL_PREFIX):] for p in boot_dir.glob(f"{KERNEL_PREFIX}*")]
    usable = [k for k in kvers if k and (modules_dir / k).is_dir()]
    if not usable:
        found = ", ".join(sorted(kvers)) or "none"
        raise LabError(f"no kernel with modules found for the lab guest ({boot_dir}/{KERNEL_PREFIX}*: {found})",
                       hint="apt-get install linux-image-amd64")
    return max(usable, key=_version_key)


def check_kver(kver: str) -> Path:
    """The kernel image for ``kver``; LabError if the kernel or its modules are missing."""
    if not kver or "/" in kver or kver.startswith("."):
        raise LabError(f"invalid kernel version {kver!r}")
    kernel = BOOT_DIR / f"{KERNEL_PREFIX}{kver}"
    if not kernel.is_file() or not (MODULES_DIR / kver).is_dir():
        missing = kernel if not kernel.is_file() else MODULES_DIR / kver
        raise LabError(f"kernel {kver} is not installed ({missing} is missing)",
                       hint=f"apt-get install linux-image-{kver} (or omit the kernel version to use the "
                            "newest installed one)")
    return kernel


def resolve_modules(kver: str, names: Iterable[str] = MODULES, *,
                    required: Iterable[str] = REQUIRED_MODULES) -> list[Path]:
    """Module files to load, dependencies first, each once (first occurrence wins).

    Names this kernel does not know are skipped; a missing ``required`` one is a LabError.
    Built-in modules need no file and are left out.
    """
    modprobe = need_tool("modprobe", "kmod")
    order: list[Path] = []
    seen: set[Path] = set()
    unknown: list[str] = []
    for name in names:
        proc = subprocess.run([modprobe, "-S", kver, "--show-depends", name],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            unknown.append(name)
            continue
        for line in proc.stdout.splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "insmod":
                path = Path(parts[1])
                if path not in seen:
                    seen.add(path)
                    order.append(path)
    bad = [n for n in required if n in unknown]
    if bad:
        raise LabError(f"kernel {kver} has no module {', '.join(bad)}: the lab guest could not reach its network",
                       hint="use a Debian kernel (apt-get install linux-image-amd64)")
    return order


def busybox_applet_links(busybox: Path | None = None) -> dict[str, str]:
    """Initramfs path -> symlink target for every busybox applet (never a link named like busybox)."""
    busybox = busybox or BUSYBOX
    need_file(busybox, "busybox-static", "a static busybox")
    names = _run([str(busybox), "--list"], "listing busybox applets").split()
    full: dict[str, str] = {}
    with contextlib.suppress(LabError):  # older busyboxes lack --list-full: everything goes to /bin
        for line in _run([str(busybox), "--list-full"], "listing busybox applets").split():
            full[line.rsplit("/", 1)[-1]] = line.strip("/")
    links: dict[str, str] = {}
    for name in names:
        if name == "busybox" or "/" in name:
            continue
        rel = full.get(name, f"bin/{name}")
        if rel == "bin/busybox":
            continue
        links[rel] = "/bin/busybox"
    return links


def elf_deps(binary: Path) -> list[Path]:
    """Shared libraries and ELF interpreter of ``binary`` per ``ldd`` ([] for a static binary)."""
    ldd = need_tool("ldd", "libc-bin")
    proc = subprocess.run([ldd, str(binary)], capture_output=True, text=True, check=False)
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        if "not a dynamic executable" in output or "statically linked" in output:
            return []
        raise LabError(f"ldd {binary} failed: {output.strip()}")
    deps: list[Path] = []
    for line in proc.stdout.splitlines():
        if "not found" in line:
            raise LabError(f"{binary} needs a library that is not installed: {line.strip()}")
        for token in line.split():
            if token.startswith("/") and Path(token) not in deps:
                deps.append(Path(token))
    return deps


# --------------------------------------------------------------------------------------------------
# keys and atomic files


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_copy(src: Path, dst: Path, mode: int = 0o644) -> None:
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.")
    try:
        with os.fdopen(fd, "wb") as out, src.open("rb") as inp:
            os.fchmod(out.fileno(), mode)
            shutil.copyfileobj(inp, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def parse_pub(text: str, key_type: str) -> str | None:
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == key_type:
            return f"{parts[0]} {parts[1]}"
    return None


def ensure_host_key(out_dir: Path) -> str:
    """Make sure the dropbear host key and host_key.pub exist; return the public line."""
    key = out_dir / HOST_KEY_NAME
    pub_file = out_dir / HOST_KEY_PUB_NAME
    if key.is_file() and pub_file.is_file():
        pub = parse_pub(pub_file.read_text(), HOST_KEY_ALGO)
        if pub:
            return pub
    dropbearkey = need_tool("dropbearkey", "dropbear-bin")
    if not key.is_file():
        tmp = out_dir / f".{HOST_KEY_NAME}.tmp{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        try:
            _run([dropbearkey, "-t", "ecdsa", "-s", "256", "-f", str(tmp)], "generating the lab SSH host key")
            os.chmod(tmp, 0o600)
            os.replace(tmp, key)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
    pub = parse_pub(_run([dropbearkey, "-y", "-f", str(key)], "reading the lab SSH host key"), HOST_KEY_ALGO)
    if pub is None:
        raise LabError(f"dropbearkey -y -f {key} printed no {HOST_KEY_ALGO} public key",
                       hint=f"delete {key} to generate a new one")
    atomic_write(pub_file, f"{pub}\n".encode())
    return pub


def load_private_key(path: Path) -> paramiko.PKey:
    errors: list[str] = []
    for cls in (paramiko.ECDSAKey, paramiko.RSAKey, paramiko.Ed25519Key):
        try:
            return cls.from_private_key_file(str(path))
        except (paramiko.SSHException, ValueError) as exc:
            errors.append(f"{cls.__name__}: {exc}")
    raise LabError(f"cannot load the lab client key {path}: {'; '.join(errors)}",
                   hint=f"delete {path} and {_BUILD_HINT} to generate a new one")


def public_line(key: paramiko.PKey) -> str:
    return f"{key.get_name()} {key.get_base64()}"


def ensure_client_key(out_dir: Path) -> str:
    """Make sure the client key (0600) and its .pub exist; return the public line."""
    path = out_dir / CLIENT_KEY_NAME
    if path.is_file():
        key = load_private_key(path)
    else:
        key = paramiko.ECDSAKey.generate(bits=256)
        fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{CLIENT_KEY_NAME}.")
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w") as f:
                key.write_private_key(f)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    if stat.S_IMODE(path.stat().st_mode) != 0o600:
        os.chmod(path, 0o600)
    pub = public_line(key)
    pub_file = path.with_name(f"{CLIENT_KEY_NAME}.pub")
    if not pub_file.is_file() or pub_file.read_text().strip() != pub:
        atomic_write(pub_file, f"{pub}\n".encode())
    return pub


# --------------------------------------------------------------------------------------------------
# the initramfs


def fingerprint(path: Path) -> str | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return f"{st.st_size}:{st.st_mtime_ns}"


def _inputs(kver: str) -> dict[str, object]:
    """What the image is built from; the same inputs (and keys) mean the build is up to date."""
    sources = (BOOT_DIR / f"{KERNEL_PREFIX}{kver}", MODULES_DIR / kver / "modules.dep", BUSYBOX, DROPBEAR)
    return {
        "format": FORMAT_VERSION,
        "kver": kver,
        "init_sha256": hashlib.sha256(INIT_SCRIPT.read_bytes()).hexdigest(),
        "modules_sha256": hashlib.sha256("\n".join((*MODULES, "", *REQUIRED_MODULES, "", *XEN_MODULES)).encode())
        .hexdigest(),
        "sources": {str(p): fingerprint(p) for p in sources},
    }


def _inittab() -> str:
    return (
        "# vhotplug lab guest: busybox init is PID 1 (it reaps orphans); dropbear is respawned.\n"
        f"::sysinit:/bin/echo {GUEST_HOSTNAME}: ready\n"
        f"::respawn:{DROPBEAR_CMD}\n"
        "::ctrlaltdel:/sbin/reboot\n"
        "::shutdown:/bin/umount -a -r\n"
    )


_STATIC_FILES: dict[str, tuple[str, int]] = {
    "etc/passwd": ("root:x:0:0:root:/root:/bin/sh\n", 0o644),
    # '*': no password can match, yet the account is not "locked" ('!'), which dropbear would refuse.
    "etc/shadow": ("root:*:19000:0:99999:7:::\n", 0o600),
    "etc/group": ("root:x:0:\ntty:x:5:\n", 0o644),
    "etc/shells": ("/bin/sh\n/bin/ash\n", 0o644),
    "etc/nsswitch.conf": ("passwd: files\ngroup: files\nshadow: files\nhosts: files\n", 0o644),
    "etc/hostname": (f"{GUEST_HOSTNAME}\n", 0o644),
    "etc/hosts": (f"127.0.0.1 localhost\n127.0.1.1 {GUEST_HOSTNAME}\n", 0o644),
}


def copy_in(staging: Path, src: Path, dest: str, mode: int) -> None:
    """Copy host file ``src`` (following symlinks) to ``staging/dest``."""
    target = staging / dest.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        shutil.copyfile(src, target)
    except OSError as exc:
        raise LabError(f"cannot copy {src} into the lab image: {exc.strerror}") from exc
    os.chmod(target, mode)


def copy_module(staging: Path, src: Path) -> str:
    """Copy a kernel module, decompressing .ko.xz/.ko.gz/.ko.zst (busybox insmod wants plain .ko)."""
    suffix = src.suffix
    if suffix not in (".xz", ".gz", ".zst"):
        copy_in(staging, src, str(src), 0o644)
        return str(src)
    plain = str(src)[: -len(suffix)]
    target = staging / plain.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".xz":
        target.write_bytes(lzma.decompress(src.read_bytes()))
    elif suffix == ".gz":
        target.write_bytes(gzip.decompress(src.read_bytes()))
    else:
        zstd = need_tool("zstd", "zstd")
        with target.open("wb") as out:
            subprocess.run([zstd, "-dc", str(src)], stdout=out, check=True)
    return plain


def _stage(staging: Path, kver: str, modules: list[Path], host_key: Path, client_pub: str,
           xen_modules: list[Path] | None = None) -> None:
    """Lay out the guest's root file system in ``staging`` (owners and times are set by the packer)."""
    for d, mode in (("proc", 0o755), ("sys", 0o755), ("dev", 0o755), ("run", 0o755), ("tmp", 0o1777),
                    ("var", 0o755), ("var/log", 0o755), ("var/tmp", 0o1777), ("etc/dropbear", 0o755),
                    ("root", 0o700), ("root/.ssh", 0o700), ("bin", 0o755), ("sbin", 0o755),
                    ("usr/bin", 0o755), ("usr/sbin", 0o755), ("lib", 0o755), ("mnt", 0o755)):
        (staging / d).mkdir(parents=True, exist_ok=True)
        os.chmod(staging / d, mode)
    os.symlink("/run", staging / "var/run")

    copy_in(staging, BUSYBOX, "bin/busybox", 0o755)
    for rel, target in busybox_applet_links(BUSYBOX).items():
        link = staging / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, link)
    for binary in (BUSYBOX, DROPBEAR):
        for dep in elf_deps(binary):
            copy_in(staging, dep, str(dep), 0o755)
    copy_in(staging, DROPBEAR, str(DROPBEAR), 0o755)
    copy_in(staging, host_key, f"etc/dropbear/{HOST_KEY_NAME}", 0o600)
    (staging / "root/.ssh/authorized_keys").write_text(f"{client_pub}\n")
    os.chmod(staging / "root/.ssh/authorized_keys", 0o600)

    for rel, (text, mode) in {**_STATIC_FILES, "etc/inittab": (_inittab(), 0o644)}.items():
        (staging / rel).write_text(text)
        os.chmod(staging / rel, mode)
    copy_in(staging, INIT_SCRIPT, "init", 0o755)

    for name, kos in ((MODULE_ORDER_NAME, modules), (XEN_MODULE_ORDER_NAME, xen_modules or [])):
        loaded = [copy_module(staging, ko) for ko in kos]
        order = staging / "lib/modules" / kver / name
        order.parent.mkdir(parents=True, exist_ok=True)
        order.write_text("".join(f"{p}\n" for p in loaded))


def pack_initramfs(staging: Path, dest: Path) -> None:
    """gzip'd newc cpio of ``staging`` (plus /dev/console) written atomically to ``dest``."""
    extra = [CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdevmajor=5, rdevminor=1)]
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
    try:
        with os.fdopen(fd, "wb") as raw:
            os.fchmod(raw.fileno(), 0o644)
            with gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=6, mtime=0) as gz:
                write_cpio([*tree_entries(staging), *extra], gz)
            raw.flush()
            os.fsync(raw.fileno())
        size = os.path.getsize(tmp)
        if size > MAX_INITRD_BYTES:
            raise LabError(f"the lab initramfs came out at {size / 2**20:.1f} MiB, over the "
                           f"{MAX_INITRD_BYTES // 2**20} MiB limit")
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# --------------------------------------------------------------------------------------------------
# public API


def read_stamp(out_dir: Path) -> dict[str, object] | None:
    try:
        stamp = json.loads((out_dir / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return None
    return stamp if isinstance(stamp, dict) else None


def _image_from(out_dir: Path, stamp: dict[str, object]) -> GuestImage | None:
    """The image the stamp describes, if every output file is there."""
    kver = stamp.get("kver")
    if not isinstance(kver, str):
        return None
    kernel = out_dir / f"{KERNEL_PREFIX}{kver}"
    initrd = out_dir / INITRD_NAME
    client_key = out_dir / CLIENT_KEY_NAME
    files = (kernel, initrd, client_key, out_dir / f"{CLIENT_KEY_NAME}.pub", out_dir / HOST_KEY_NAME,
             out_dir / HOST_KEY_PUB_NAME)
    if not all(f.is_file() for f in files):
        return None
    host_pub = parse_pub((out_dir / HOST_KEY_PUB_NAME).read_text(), HOST_KEY_ALGO)
    client_pub = (out_dir / f"{CLIENT_KEY_NAME}.pub").read_text().strip()
    if client_pub != public_line(load_private_key(client_key)):
        return None  # id_lab was replaced without its .pub
    if host_pub is None or host_pub != stamp.get("host_key_pub") or client_pub != stamp.get("client_key_pub"):
        return None
    return GuestImage(kver, kernel, initrd, host_pub, client_key, client_pub)


def load_image(out_dir: Path) -> GuestImage:
    """The image previously built in ``out_dir``; LabError if there is none or it is incomplete."""
    out_dir = Path(out_dir)
    stamp = read_stamp(out_dir)
    if stamp is None:
        raise LabError(f"no lab image in {out_dir}", hint=_BUILD_HINT)
    image = _image_from(out_dir, stamp)
    if image is None:
        raise LabError(f"the lab image in {out_dir} is incomplete or its keys changed since it was built",
                       hint=f"{_BUILD_HINT} (keeps the existing keys)")
    return image


def remove_leftovers(out_dir: Path) -> None:
    """Temp files and staging dirs of an interrupted build (called with the lock held)."""
    for path in out_dir.glob(".*"):
        if path.name == LOCK_NAME:
            continue
        if path.is_dir() and not path.is_symlink():
            if path.name.startswith(".staging-"):
                shutil.rmtree(path, ignore_errors=True)
        elif path.name.startswith(f".{KERNEL_PREFIX}") or any(
                path.name.startswith(f".{n}.")
                for n in (INITRD_NAME, STAMP_NAME, HOST_KEY_PUB_NAME, HOST_KEY_NAME, CLIENT_KEY_NAME)):
            path.unlink(missing_ok=True)


@contextlib.contextmanager
def locked_dir(out_dir: Path) -> Iterator[None]:
    with (out_dir / LOCK_NAME).open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def build_image(out_dir: Path, *, kver: str | None = None, force: bool = False) -> GuestImage:
    """Build the lab guest image in ``out_dir`` (created if needed) and return it.

    Returns the existing image untouched when its stamp matches the current inputs and every
    output exists (unless ``force``). SSH keys are generated only when their files are missing.
    """
    out_dir = Path(out_dir)
    kver = kver or default_kver()
    kernel_src = check_kver(kver)
    need_file(BUSYBOX, "busybox-static", "a static busybox")
    need_file(DROPBEAR, "dropbear-bin", "the dropbear SSH server")
    if not INIT_SCRIPT.is_file():
        raise LabError(f"the lab init script {INIT_SCRIPT} is missing from the vhotplug installation",
                       hint="reinstall vhotplug")
    try:
        if not out_dir.is_dir():
            out_dir.mkdir(parents=True)
            os.chmod(out_dir, 0o755)  # QEMU (another user) must read the kernel and initrd
    except OSError as exc:
        raise LabError(f"cannot create the lab image directory {out_dir}: {exc.strerror}") from exc

    try:
        return _build_locked(out_dir, kver, kernel_src, force)
    except OSError as exc:
        raise LabError(f"building the lab image in {out_dir} failed: {exc}") from exc


def _build_locked(out_dir: Path, kver: str, kernel_src: Path, force: bool) -> GuestImage:
    with locked_dir(out_dir):
        inputs = _inputs(kver)
        stamp = read_stamp(out_dir)
        if not force and stamp is not None and stamp.get("inputs") == inputs:
            image = _image_from(out_dir, stamp)
            if image is not None:
                if stat.S_IMODE(image.client_key.stat().st_mode) != 0o600:
                    os.chmod(image.client_key, 0o600)
                return image
        remove_leftovers(out_dir)

        host_pub = ensure_host_key(out_dir)
        client_pub = ensure_client_key(out_dir)
        modules = resolve_modules(kver)
        xen_modules = resolve_modules(kver, XEN_MODULES, required=())
        kernel = out_dir / f"{KERNEL_PREFIX}{kver}"
        initrd = out_dir / INITRD_NAME
        with tempfile.TemporaryDirectory(dir=out_dir, prefix=".staging-") as tmp:
            _stage(Path(tmp), kver, modules, out_dir / HOST_KEY_NAME, client_pub, xen_modules)
            pack_initramfs(Path(tmp), initrd)
        try:
            atomic_copy(kernel_src, kernel)
        except OSError as exc:
            raise LabError(f"cannot copy the kernel {kernel_src}: {exc.strerror}",
                           hint="run as root (the kernel under /boot may be readable by root only)") from exc
        for old in out_dir.glob(f"{KERNEL_PREFIX}*"):
            if old != kernel:
                old.unlink()
        new_stamp = {
            "inputs": inputs,
            "kver": kver,
            "host_key_pub": host_pub,
            "client_key_pub": client_pub,
            "modules": [p.name for p in modules],
            "xen_modules": [p.name for p in xen_modules],
            "initrd_bytes": initrd.stat().st_size,
        }
        atomic_write(out_dir / STAMP_NAME, (json.dumps(new_stamp, indent=2, sort_keys=True) + "\n").encode())
        return GuestImage(kver, kernel, initrd, host_pub, out_dir / CLIENT_KEY_NAME, client_pub)
