"""Disk requests: every refusal, image creation and rollback, byte-stable XML that libvirt accepts."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import libvirt
import pytest
from lxml import etree

from tests.conftest import golden
from tests.unit.test_nic_spec import assert_schema_valid, libvirt_round_trip
from vhotplug import errors, templates
from vhotplug.devices import disk
from vhotplug.devices.disk import (
    DISK_BUSES,
    DiskSpec,
    create_image,
    disk_spec,
    disk_xml,
    next_free_target,
    remove_created_image,
)
from vhotplug.virt.flavor import QEMU, XEN

# Never created by the tests that only build specs: the path must not exist for --size.
NOWHERE = Path("/nonexistent/vhotplug-images/lab")
MiB = 1024**2


def new(**kw: object) -> DiskSpec:
    """A spec for a new 64 MiB image, with keyword overrides."""
    args: dict[str, object] = {"path": None, "size": "64M", "image_dir": NOWHERE}
    args.update(kw)
    return disk_spec(**args)  # type: ignore[arg-type]


def image(tmp_path: Path, head: bytes = b"", name: str = "img") -> Path:
    path = tmp_path / name
    path.write_bytes(head + bytes(1024))
    return path


def block_device() -> Path | None:
    """A block device this user can read (read 4 bytes only), or None."""
    for path in sorted(Path("/dev").glob("loop*")) + sorted(Path("/dev").iterdir()):
        try:
            if stat.S_ISBLK(path.stat().st_mode) and os.access(path, os.R_OK):
                return path
        except OSError:
            continue
    return None


# ---------------------------------------------------------------- path or size


def test_needs_path_or_size() -> None:
    with pytest.raises(errors.InvalidRequest, match=r"needs --path .* or --size"):
        disk_spec(path=None, size=None, image_dir=NOWHERE)


def test_path_and_size_together_refused(tmp_path: Path) -> None:
    with pytest.raises(errors.InvalidRequest, match="not both"):
        disk_spec(path=image(tmp_path), size="1G", image_dir=NOWHERE)


def test_new_image_spec() -> None:
    spec = new(size="1G", id="data")
    assert spec.path == NOWHERE / "data.img"
    assert (spec.create_bytes, spec.fmt, spec.source_type) == (1024**3, "raw", "file")
    assert (spec.alias, spec.serial, spec.target, spec.bus, spec.readonly) == ("ua-data", "vh-data", "vda", "virtio",
                                                                               False)


def test_new_image_dir_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert new(image_dir=Path("imgs"), id="d").path == tmp_path / "imgs" / "d.img"


def test_new_image_size_errors_come_from_parse_size() -> None:
    with pytest.raises(errors.InvalidRequest, match=r"invalid size '1\.5G'"):
        new(size="1.5G")
    with pytest.raises(errors.InvalidRequest, match="greater than zero"):
        new(size="0")


def test_new_image_size_whole_sectors() -> None:
    assert new(size="512b").create_bytes == 512
    with pytest.raises(errors.InvalidRequest, match="not a multiple of 512"):
        new(size="1000b")
    with pytest.raises(errors.InvalidRequest, match="not a multiple of 512"):
        new(size="1KB")


def test_new_image_size_limit() -> None:
    with pytest.raises(errors.InvalidRequest, match="larger than a file can be"):
        new(size="8E")


def test_new_image_refused_when_file_exists(tmp_path: Path) -> None:
    (tmp_path / "data.img").write_bytes(b"keep me")
    with pytest.raises(errors.InvalidRequest) as exc:
        new(image_dir=tmp_path, id="data")
    assert exc.value.message == f"disk image already exists: {tmp_path / 'data.img'}"
    (tmp_path / "disk0.img").symlink_to(tmp_path / "missing")  # a dangling link counts too
    with pytest.raises(errors.InvalidRequest, match="already exists"):
        new(image_dir=tmp_path)


# ---------------------------------------------------------------- existing images


def test_existing_raw_image(tmp_path: Path) -> None:
    spec = disk_spec(path=image(tmp_path, b"\xeb\x63\x90"), size=None, image_dir=NOWHERE)
    assert (spec.path, spec.fmt, spec.source_type, spec.create_bytes) == (tmp_path / "img", "raw", "file", None)


def test_existing_qcow2_image(tmp_path: Path) -> None:
    spec = disk_spec(path=image(tmp_path, b"QFI\xfb\x00\x00\x00\x03"), size=None, image_dir=NOWHERE)
    assert spec.fmt == "qcow2"


@pytest.mark.parametrize("head", [b"", b"QFI", b"qfi\xfb", b"\xfbIFQ"])
def test_qcow2_needs_the_exact_magic(tmp_path: Path, head: bytes) -> None:
    path = tmp_path / "img"
    path.write_bytes(head)
    assert disk_spec(path=path, size=None, image_dir=NOWHERE).fmt == "raw"


def test_relative_path_made_absolute_keeping_symlinks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = image(tmp_path, name="real.img")
    (tmp_path / "link.img").symlink_to(real)
    monkeypatch.chdir(tmp_path)
    assert disk_spec(path=Path("real.img"), size=None, image_dir=NOWHERE).path == real
    assert disk_spec(path=Path("./sub/../link.img"), size=None, image_dir=NOWHERE).path == tmp_path / "link.img"


@pytest.mark.parametrize("what", ["missing", "directory", "char device", "dangling link"])
def test_path_must_be_file_or_block_device(tmp_path: Path, what: str) -> None:
    path = {"missing": tmp_path / "nope.img", "directory": tmp_path, "char device": Path("/dev/null"),
            "dangling link": tmp_path / "dangling"}[what]
    if what == "dangling link":
        path.symlink_to(tmp_path / "gone")
    with pytest.raises(errors.InvalidRequest) as exc:
        disk_spec(path=path, size=None, image_dir=NOWHERE)
    assert exc.value.message == f"disk image not found: {path}"
    assert exc.value.hint


def test_unreadable_image_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Root (as in CI) can read a mode-000 file, so the refusal is driven by a failing open().
    path = image(tmp_path)
    real_open = open

    def deny(file, *args, **kwargs):  # type: ignore[no-untyped-def]
        if Path(file) == path:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", deny)
    with pytest.raises(errors.InvalidRequest, match=r"cannot read disk image .*Permission denied"):
        disk_spec(path=path, size=None, image_dir=NOWHERE)


def test_block_device() -> None:
    dev = block_device()
    if dev is None:
        pytest.skip("no readable block device on this host")
    spec = disk_spec(path=dev, size=None, image_dir=NOWHERE)
    assert (spec.source_type, spec.path) == ("block", dev)


# ---------------------------------------------------------------- bus, target, id, serial, readonly


@pytest.mark.parametrize("bus", ["", "ide", "VIRTIO", "nvme", "fdc"])
def test_unknown_bus(bus: str) -> None:
    with pytest.raises(errors.InvalidRequest) as exc:
        new(bus=bus)
    assert exc.value.message == f"unknown disk bus {bus!r}"
    assert exc.value.hint == "choose one of virtio, scsi, usb, sata"


def test_readonly_sata_refused() -> None:
    with pytest.raises(errors.InvalidRequest, match="read-only disk cannot be on the sata bus"):
        new(bus="sata", readonly=True)
    assert new(bus="scsi", readonly=True).readonly


@pytest.mark.parametrize(("bus", "first"), [("virtio", "vda"), ("scsi", "sda"), ("usb", "sda"), ("sata", "sda")])
def test_first_free_target(bus: str, first: str) -> None:
    assert new(bus=bus).target == first


def test_targets_skip_used_names_across_buses() -> None:
    assert new(used_targets=["vda", "vdc"]).target == "vdb"
    assert new(bus="scsi", used_targets=["sda", "vda"]).target == "sdb"  # sda is the SATA disk's


def test_targets_past_z() -> None:
    used = [f"vd{chr(c)}" for c in range(ord("a"), ord("z") + 1)]
    assert new(used_targets=used).target == "vdaa"
    assert next_free_target("scsi", [*(f"sd{chr(c)}" for c in range(ord("a"), ord("z") + 1)), "sdaa"]) == "sdab"


@pytest.mark.parametrize(("index", "name"), [(0, "a"), (25, "z"), (26, "aa"), (27, "ab"), (51, "az"), (52, "ba"),
                                             (701, "zz"), (702, "aaa")])
def test_kernel_disk_letters(index: int, name: str) -> None:
    assert disk._letters(index) == name


@pytest.mark.parametrize(("bus", "target"), [("virtio", "vdb"), ("virtio", "vdaa"), ("scsi", "sdc"), ("usb", "sdq"),
                                             ("sata", "sdb")])
def test_given_target(bus: str, target: str) -> None:
    assert new(bus=bus, target=target).target == target


@pytest.mark.parametrize(("bus", "target"), [("virtio", "sda"), ("scsi", "vda"), ("usb", "vdb"), ("virtio", "vd"),
                                             ("virtio", "vd1"), ("virtio", "VDA"), ("virtio", "xvda"),
                                             ("sata", "hda"), ("scsi", "sda1"), ("virtio", "vda ")])
def test_target_must_match_bus(bus: str, target: str) -> None:
    with pytest.raises(errors.InvalidRequest) as exc:
        new(bus=bus, target=target)
    assert exc.value.message == f"invalid target {target!r} for a {bus} disk"


def test_used_target_refused_with_the_next_free_one() -> None:
    with pytest.raises(errors.InvalidRequest) as exc:
        new(target="vda", used_targets=["vda", "vdb"])
    assert "target 'vda' is already used" in exc.value.message
    assert exc.value.hint is not None and "(vdc)" in exc.value.hint


def test_ids_and_serial() -> None:
    assert new(used_aliases=["ua-disk0", "virtio-disk0"]).alias == "ua-disk1"
    spec = new(id="a" * 16)
    assert spec.serial == "vh-" + "a" * 16 and len(spec.serial) <= disk.SERIAL_MAX
    with pytest.raises(errors.InvalidRequest, match="duplicate id 'data'"):
        new(id="data", used_aliases=["ua-data"])
    with pytest.raises(errors.InvalidRequest, match="invalid device id"):
        new(id="a" * 17)


# ---------------------------------------------------------------- create_image / remove_created_image


def test_create_image_sparse_0644_with_parents(tmp_path: Path) -> None:
    spec = new(image_dir=tmp_path / "a" / "b", id="data", size="1G")
    old = os.umask(0o077)
    try:
        create_image(spec)
    finally:
        os.umask(old)
    st = spec.path.stat()
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o644
    assert st.st_size == 1024**3
    assert st.st_blocks * 512 < MiB  # sparse: nothing written
    for d in (tmp_path / "a", tmp_path / "a" / "b"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o755  # QEMU, another user, must reach the image


def test_create_image_refuses_an_existing_file(tmp_path: Path) -> None:
    spec = new(image_dir=tmp_path, id="data")
    spec.path.write_bytes(b"someone else's")  # appeared between spec and create
    with pytest.raises(errors.InvalidRequest, match="already exists"):
        create_image(spec)
    assert spec.path.read_bytes() == b"someone else's"


def test_create_image_needs_a_new_image_spec(tmp_path: Path) -> None:
    spec = disk_spec(path=image(tmp_path), size=None, image_dir=NOWHERE)
    with pytest.raises(ValueError):
        create_image(spec)


def test_create_image_os_errors(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    spec = new(image_dir=tmp_path / "file" / "sub", id="d")  # parent is a file
    with pytest.raises(errors.VhotplugError, match="cannot create disk image"):
        create_image(spec)


def test_create_image_removes_a_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = new(image_dir=tmp_path, id="d", size="1T")

    def efbig(fd: int, length: int) -> None:
        raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))

    monkeypatch.setattr(disk.os, "ftruncate", efbig)
    with pytest.raises(errors.VhotplugError, match=r"cannot create a 1 TiB disk image .*: File too large"):
        create_image(spec)
    assert not spec.path.exists()


def test_remove_created_image(tmp_path: Path) -> None:
    spec = new(image_dir=tmp_path, id="d")
    create_image(spec)
    remove_created_image(spec)
    assert not spec.path.exists()
    remove_created_image(spec)  # already gone: fine


def test_remove_never_touches_a_given_image(tmp_path: Path) -> None:
    path = image(tmp_path)
    remove_created_image(disk_spec(path=path, size=None, image_dir=NOWHERE))
    assert path.exists()


def test_remove_leaves_what_it_did_not_create(tmp_path: Path) -> None:
    spec = new(image_dir=tmp_path, id="d")
    spec.path.mkdir()
    remove_created_image(spec)
    assert spec.path.is_dir()


# ---------------------------------------------------------------- disk_xml

# Every bus once, plus qcow2 + read-only and a block device: a new bus without a golden file fails here.
CASES: dict[str, DiskSpec] = {
    **{bus: new(bus=bus, id="data", target={"virtio": "vdb", "xen": "xvdb"}.get(bus, "sdb"),
                flavor=XEN if bus == "xen" else QEMU) for bus in DISK_BUSES},
    "virtio-qcow2-readonly": DiskSpec(path=Path("/srv/images/base.qcow2"), bus="virtio", target="vdc", readonly=True,
                                      alias="ua-base", serial="vh-base", fmt="qcow2", create_bytes=None),
    "scsi-block": DiskSpec(path=Path("/dev/disk/by-id/wwn-0x5000c500a1b2c3d4"), bus="scsi", target="sdc",
                           readonly=False, alias="ua-lun", serial="vh-lun", fmt="raw", create_bytes=None,
                           source_type="block"),
}


def test_cases_cover_every_bus() -> None:
    assert {spec.bus for spec in CASES.values()} == set(DISK_BUSES)


@pytest.mark.parametrize("case", CASES)
def test_disk_xml_golden(case: str) -> None:
    golden(f"disk-{case}.xml", templates.tostring(disk_xml(CASES[case])))


@pytest.mark.parametrize("case", CASES)
def test_disk_xml_is_valid_against_libvirt_schema(case: str) -> None:
    assert_schema_valid(disk_xml(CASES[case]))


@pytest.mark.parametrize("case", CASES)
def test_libvirt_accepts_disk_xml(case: str) -> None:
    spec = CASES[case]
    back = libvirt_round_trip(disk_xml(spec), name=f"vhunit-disk-{case}")
    assert (back.get("type"), back.get("device")) == (spec.source_type, "disk")
    assert back.find("driver").get("name") == spec.driver
    assert back.find("driver").get("type") == (spec.fmt if spec.driver == "qemu" else None)  # phy: no format
    assert back.find("source").get("file" if spec.source_type == "file" else "dev") == str(spec.path)
    assert (back.find("target").get("dev"), back.find("target").get("bus")) == (spec.target, spec.bus)
    assert back.findtext("serial") == (spec.serial if spec.guest_serial else None)
    assert (back.find("readonly") is not None) == spec.readonly


def test_disk_xml_shape() -> None:
    el = disk_xml(CASES["virtio"])
    assert [c.tag for c in el] == ["driver", "source", "target", "serial", "alias"]
    assert list(el.find("target").attrib.items()) == [("dev", "vdb"), ("bus", "virtio")]
    assert [c.tag for c in disk_xml(CASES["virtio-qcow2-readonly"])] == ["driver", "source", "target", "readonly",
                                                                         "serial", "alias"]


def test_xml_checks_are_not_vacuous() -> None:
    # The schema and libvirt checks above must be able to fail.
    bad = disk_xml(CASES["virtio"])
    bad.find("target").set("bus", "floppy-ish")
    with pytest.raises(AssertionError):
        assert_schema_valid(bad)
    with pytest.raises(libvirt.libvirtError):
        libvirt_round_trip(bad, name="vhunit-disk-bad")
    assert etree.tostring(bad)  # still an element after both checks
