"""Disks: validate what the user asked for, create a new image if asked, build ``<disk>`` XML.

A disk is either an existing image or block device (``path``) or a new sparse
raw image of ``size`` bytes, created as ``IMAGE_DIR/<id>.img`` only when the
attach is about to happen (:func:`create_image`) and removed again on rollback
(:func:`remove_created_image`). :func:`disk_spec` decides every value and
touches nothing.
"""

from __future__ import annotations

import itertools
import os
import re
import stat
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast, get_args

from lxml import etree

from vhotplug import errors, templates, units
from vhotplug.devices.common import choose_id, set_alias, user_alias
from vhotplug.virt.flavor import QEMU, Flavor

DiskBus = Literal["virtio", "scsi", "usb", "sata", "xen"]
DiskFormat = Literal["raw", "qcow2"]
SourceType = Literal["file", "block"]
DISK_BUSES: tuple[str, ...] = get_args(DiskBus)

QCOW2_MAGIC = b"QFI\xfb"
SERIAL_PREFIX = "vh-"
# virtio-blk reports at most 20 bytes of serial (VIRTIO_BLK_ID_BYTES).
SERIAL_MAX = 20
SECTOR = 512
# off_t's limit; real file systems stop far earlier and say so (EFBIG) when the image is created.
MAX_IMAGE_BYTES = 2**63 - SECTOR
IMAGE_MODE = 0o644
DIR_MODE = 0o755


@dataclass(frozen=True)
class DiskSpec:
    path: Path  # absolute; for a new image, where it will be created
    bus: DiskBus
    target: str  # guest-visible name libvirt reports, e.g. vdb
    readonly: bool
    alias: str  # "ua-" + id
    serial: str  # "vh-" + id: how the guest side finds the disk (/dev/disk/by-id/*vh-ID)
    fmt: DiskFormat
    create_bytes: int | None  # set: create a sparse raw image of this size at path
    source_type: SourceType = "file"
    driver: str = "qemu"  # <driver name=...>: qemu, or phy for Xen's blkback
    guest_serial: bool = True  # the guest can read the serial (Xen: it finds the disk by its name)


def target_prefix(bus: str) -> str:
    """``vd`` for virtio disks, ``xvd`` for Xen's, ``sd`` for the buses the guest sees as SCSI disks."""
    return {"virtio": "vd", "xen": "xvd"}.get(bus, "sd")


def _letters(index: int) -> str:
    # The kernel's sd/vd naming: a..z, then aa..az, ba.. (bijective base 26).
    name = ""
    index += 1
    while index:
        index, rem = divmod(index - 1, 26)
        name = chr(ord("a") + rem) + name
    return name


def target_names(bus: str) -> Iterator[str]:
    """``vda``, ``vdb``, ..., ``vdz``, ``vdaa``, ... (``sd...`` for non-virtio buses)."""
    prefix = target_prefix(bus)
    return (prefix + _letters(i) for i in itertools.count())


def next_free_target(bus: str, used_targets: Iterable[str]) -> str:
    """The first name for ``bus`` not in ``used_targets``."""
    used = set(used_targets)
    return next(name for name in target_names(bus) if name not in used)


def _check_target(target: str | None, bus: str, used_targets: set[str]) -> str:
    if target is None:
        return next_free_target(bus, used_targets)
    prefix = target_prefix(bus)
    if not re.fullmatch(prefix + "[a-z]+", target):
        raise errors.InvalidRequest(
            f"invalid target {target!r} for a {bus} disk",
            hint=f"{bus} disks are named {prefix}a, {prefix}b, ... (virtio: vd*, xen: xvd*, scsi/usb/sata: sd*); "
            "or leave --target out",
        )
    if target in used_targets:
        raise errors.InvalidRequest(
            f"target {target!r} is already used by another disk of the domain",
            hint=f"leave --target out to get the next free one ({next_free_target(bus, used_targets)})",
        )
    return target


def detect_format(path: Path) -> DiskFormat:
    """``qcow2`` if the image starts with the qcow2 magic, else ``raw``."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(QCOW2_MAGIC))
    except OSError as e:
        raise errors.InvalidRequest(
            f"cannot read disk image {path}: {e.strerror}",
            hint="vhotplug reads the first bytes to tell qcow2 from raw; run it as a user who can read the image",
        ) from e
    return "qcow2" if head == QCOW2_MAGIC else "raw"


def _check_path_text(path: Path) -> str:
    """``path`` as text, if it can go into libvirt's XML as it is; else :class:`errors.InvalidRequest`.

    The hostile-input fuzz found these as tracebacks: lxml refuses control characters (ValueError) and
    lone surrogates (UnicodeEncodeError: file name bytes that are not UTF-8, which libvirt's UTF-8 XML
    cannot name either). Tabs and newlines would go in, escaped, but broke the one-line error messages and
    reach QEMU's command line; no disk image is worth that.
    """
    text = str(path)
    bad = next((c for c in text if unicodedata.category(c) in ("Cc", "Cs") or c in "\ufffe\uffff"), None)
    if bad is not None:
        why = "not valid UTF-8" if unicodedata.category(bad) == "Cs" else f"it contains the character {bad!r}"
        raise errors.InvalidRequest(f"invalid disk path {text!r}: {why}",
                                    hint="rename the image (or link to it) without control characters")
    return text


def _existing_source(path: Path) -> tuple[Path, SourceType]:
    # abspath, not resolve(): keep symlinks such as /dev/disk/by-id/... as the user gave them,
    # as virt-install does; they are the stable names.
    _check_path_text(path)
    absolute = Path(os.path.abspath(path.expanduser()))
    try:
        mode = absolute.stat().st_mode
    except OSError as e:
        raise errors.InvalidRequest(f"disk image not found: {absolute}",
                                    hint="give an existing image file or block device, or --size for a new one") from e
    if stat.S_ISREG(mode):
        return absolute, "file"
    if stat.S_ISBLK(mode):
        return absolute, "block"
    raise errors.InvalidRequest(f"disk image not found: {absolute}",
                                hint="that path is not a regular file or block device")


def _new_image_bytes(size: str) -> int:
    nbytes = units.parse_size(size)
    # QEMU exposes whole sectors; a tail would be silently cut off or refused.
    if nbytes % SECTOR:
        raise errors.InvalidRequest(f"invalid disk size {size!r}: {nbytes} bytes is not a multiple of {SECTOR}",
                                    hint="give a size in K, M or G, e.g. 64M")
    if nbytes > MAX_IMAGE_BYTES:
        raise errors.InvalidRequest(f"invalid disk size {size!r}: larger than a file can be (8 EiB)",
                                    hint="give a size in M, G or T, e.g. 10G")
    return nbytes


def disk_spec(
    *,
    path: Path | None,
    size: str | None,
    bus: str | None = None,
    target: str | None = None,
    readonly: bool = False,
    id: str | None = None,  # shadows the builtin on purpose: the user calls it --id
    used_aliases: Iterable[str] = (),
    used_targets: Iterable[str] = (),
    image_dir: Path,
    flavor: Flavor = QEMU,
    local: bool = True,
) -> DiskSpec:
    """Validate a disk request against the domain's current devices and decide every value.

    Exactly one of ``path`` (an existing image or block device) and ``size``
    (a new sparse raw image ``image_dir/<id>.img``, created later by
    :func:`create_image`) must be given. Nothing on disk is changed here.

    ``flavor`` (the hypervisor driver) decides the buses, driver and formats. ``local``: the
    hypervisor runs on this machine; when not, an image there cannot be looked at (nor created) here.
    """
    bus = flavor.disk_bus if bus is None else bus
    if bus not in flavor.disk_buses:
        if bus in DISK_BUSES:
            raise flavor.unsupported(f"attach a disk on the {bus} bus",
                                     hint=f"use --bus {' or '.join(flavor.disk_buses)} (the default)")
        raise errors.InvalidRequest(f"unknown disk bus {bus!r}",
                                    hint=f"choose one of {', '.join(flavor.disk_buses)}")
    if path is None and size is None:
        raise errors.InvalidRequest("a disk needs --path (an existing image) or --size (a new image)",
                                    hint="--path attaches an image you have; --size 1G creates a new sparse raw image")
    if path is not None and size is not None:
        raise errors.InvalidRequest(f"give --path or --size, not both (got --path {str(path)!r} and --size {size!r})",
                                    hint="--path attaches an image you have; --size 1G creates a new sparse raw image")
    if readonly and bus == "sata":
        # libvirt refuses it too ("readonly sata disks are not supported"): QEMU's ide-hd has no read-only mode.
        raise errors.InvalidRequest("a read-only disk cannot be on the sata bus", hint="use --bus virtio, scsi or usb")
    device_id = choose_id(id, prefix="disk", used_aliases=used_aliases)
    serial = SERIAL_PREFIX + device_id
    if len(serial) > SERIAL_MAX:  # check_id's length limit keeps this from happening
        raise errors.InvalidRequest(f"id {device_id!r} too long for the disk serial {serial!r}",
                                    hint=f"the serial is '{SERIAL_PREFIX}' + id, at most {SERIAL_MAX} characters")
    dev = _check_target(target, bus, set(used_targets))

    create_bytes: int | None = None
    if size is not None and not local:
        raise errors.InvalidRequest(
            "--size creates the image on this machine, and the hypervisor is another host",
            hint="create the image there and give its path (e.g. `truncate -s 64M /var/lib/xen/data.img`)")
    if size is not None:
        create_bytes = _new_image_bytes(size)
        source = Path(os.path.abspath(image_dir.expanduser())) / f"{device_id}.img"
        if os.path.lexists(source):
            raise errors.InvalidRequest(f"disk image already exists: {source}",
                                        hint="choose another --id, remove the file, or attach it with --path")
        source_type: SourceType = "file"
        fmt: DiskFormat = "raw"
    elif local:
        assert path is not None
        source, source_type = _existing_source(path)
        fmt = detect_format(source)
    else:  # on the hypervisor's host: libvirt says whether it exists; only its form is checked here
        assert path is not None
        source = _remote_source(path)
        source_type = "block" if str(source).startswith("/dev/") else "file"
        fmt = "raw"
    if fmt not in flavor.disk_formats:
        raise flavor.unsupported(f"attach a {fmt} image ({source})",
                                 hint=f"convert it to raw first: qemu-img convert -O raw {source} IMAGE.raw")
    return DiskSpec(path=source, bus=cast(DiskBus, bus), target=dev, readonly=readonly,
                    alias=user_alias(device_id), serial=serial, fmt=fmt, create_bytes=create_bytes,
                    source_type=source_type, driver=flavor.disk_driver, guest_serial=flavor.disk_serial)


def _remote_source(path: Path) -> Path:
    """A path on the hypervisor's host: absolute, one line, normalised (it cannot be looked at from here)."""
    text = _check_path_text(path)
    if not text.startswith("/"):
        raise errors.InvalidRequest(f"invalid disk path {text!r}: the hypervisor is another host, so give the "
                                    "absolute path there", hint="e.g. /var/lib/xen/data.img")
    return Path(os.path.normpath(text))


def _make_dirs(path: Path) -> None:
    # Explicit modes: under a strict umask QEMU (another user) could not reach the image;
    # libvirt relabels the image itself, never its directories.
    missing: list[Path] = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for d in reversed(missing):
        d.mkdir(exist_ok=True)
        d.chmod(DIR_MODE)


def create_image(spec: DiskSpec) -> None:
    """Create the new sparse raw image ``spec`` asks for (mode 0644, parent directories too).

    Refuses to touch an existing file: the spec was decided when it did not exist.
    """
    if spec.create_bytes is None:
        raise ValueError(f"{spec.path} is an existing image; nothing to create")
    try:
        _make_dirs(spec.path.parent)
        fd = os.open(spec.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, IMAGE_MODE)
    except FileExistsError as e:
        raise errors.InvalidRequest(f"disk image already exists: {spec.path}",
                                    hint="choose another --id, remove the file, or attach it with --path") from e
    except OSError as e:
        raise errors.VhotplugError(f"cannot create disk image {spec.path}: {e.strerror}") from e
    try:
        # The umask may have narrowed the mode; QEMU runs as another user and must read the file.
        os.fchmod(fd, IMAGE_MODE)
        os.ftruncate(fd, spec.create_bytes)
    except OSError as e:
        os.close(fd)
        spec.path.unlink(missing_ok=True)
        raise errors.VhotplugError(
            f"cannot create a {units.format_size(spec.create_bytes)} disk image {spec.path}: {e.strerror}"
        ) from e
    os.close(fd)


def remove_created_image(spec: DiskSpec) -> None:
    """Roll back :func:`create_image`; never removes an image the user gave with ``path``."""
    if spec.create_bytes is None:
        return
    try:
        if spec.path.is_symlink() or not spec.path.is_file():
            return  # not what create_image made: leave it alone
        spec.path.unlink()
    except FileNotFoundError:
        return
    except OSError as e:
        raise errors.VhotplugError(f"cannot remove the disk image vhotplug created, {spec.path}: {e.strerror}",
                                   hint="remove it by hand") from e


def disk_xml(spec: DiskSpec) -> etree._Element:
    """The ``<disk>`` element for ``spec``, from ``xml_templates/disk.xml``."""
    root = templates.load("disk")
    root.set("type", spec.source_type)
    driver = root.find("driver")
    driver.set("name", spec.driver)
    if spec.driver == "qemu":  # blkback (phy) takes no format: the image is raw
        driver.set("type", spec.fmt)
    root.find("source").set("file" if spec.source_type == "file" else "dev", str(spec.path))
    target = root.find("target")
    target.set("dev", spec.target)
    target.set("bus", spec.bus)
    if not spec.readonly:
        root.remove(root.find("readonly"))
    if spec.guest_serial:
        root.find("serial").text = spec.serial
    else:  # Xen: nothing carries it to the guest
        root.remove(root.find("serial"))
    set_alias(root, spec.alias)
    return root
