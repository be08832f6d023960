"""Fast checks of the lab image builder (the real boot is exercised by the lab tests)."""

from __future__ import annotations

import gzip
import io
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import paramiko
import pytest

from vhotplug.errors import LabError
from vhotplug.lab import image
from vhotplug.lab.image import CpioEntry, GuestImage, read_cpio, tree_entries, write_cpio


def _host_kver() -> str | None:
    try:
        return image.default_kver()
    except LabError:
        return None


KVER = _host_kver()
HAVE_MODPROBE = shutil.which("modprobe", path="/usr/sbin:/sbin:/usr/bin:/bin") is not None
needs_kernel = pytest.mark.skipif(KVER is None or not HAVE_MODPROBE,
                                  reason="needs linux-image-amd64 and kmod on the host")
needs_busybox = pytest.mark.skipif(not image.BUSYBOX.is_file(), reason="needs busybox-static")
needs_all = pytest.mark.skipif(
    KVER is None or not HAVE_MODPROBE or not image.BUSYBOX.is_file() or not image.DROPBEAR.is_file()
    or shutil.which("dropbearkey") is None
    or not os.access(image.BOOT_DIR / f"vmlinuz-{KVER}", os.R_OK),
    reason="needs linux-image-amd64, kmod, busybox-static and dropbear-bin on the host",
)


# ---------------------------------------------------------------------------------------------- cpio


def _sample_tree(root: Path) -> None:
    (root / "bin").mkdir()
    (root / "bin/busybox").write_bytes(b"\x7fELF" + bytes(range(256)) * 3)
    os.chmod(root / "bin/busybox", 0o755)
    os.symlink("/bin/busybox", root / "bin/sh")
    (root / "etc").mkdir()
    (root / "etc/odd").write_bytes(b"abc")  # length not a multiple of 4
    (root / "root/.ssh").mkdir(parents=True)
    os.chmod(root / "root", 0o700)
    (root / "empty").write_bytes(b"")


def test_cpio_round_trip(tmp_path: Path) -> None:
    _sample_tree(tmp_path)
    entries = [*tree_entries(tmp_path), CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdevmajor=5, rdevminor=1)]
    buf = io.BytesIO()
    assert write_cpio(entries, buf) == len(entries)
    parsed = {e.name: e for e in read_cpio(buf.getvalue())}

    assert list(parsed) == sorted(parsed)  # sorted, so directories come first
    assert parsed["bin/busybox"].data == (tmp_path / "bin/busybox").read_bytes()
    assert stat.S_IMODE(parsed["bin/busybox"].mode) == 0o755
    assert stat.S_ISLNK(parsed["bin/sh"].mode) and parsed["bin/sh"].data == b"/bin/busybox"
    assert parsed["etc/odd"].data == b"abc" and parsed["empty"].data == b""
    assert stat.S_ISDIR(parsed["root"].mode) and stat.S_IMODE(parsed["root"].mode) == 0o700
    console = parsed["dev/console"]
    assert stat.S_ISCHR(console.mode) and (console.rdevmajor, console.rdevminor) == (5, 1)

    again = io.BytesIO()
    write_cpio(reversed(entries), again)
    assert again.getvalue() == buf.getvalue()  # deterministic whatever the input order


@pytest.mark.skipif(shutil.which("cpio") is None, reason="needs the cpio tool")
def test_cpio_tool_reads_archive(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    _sample_tree(src)
    buf = io.BytesIO()
    write_cpio(tree_entries(src), buf)
    listing = subprocess.run(["cpio", "-t", "--quiet"], input=buf.getvalue(), capture_output=True, check=True)
    assert listing.stdout.decode().split() == sorted(e.name for e in tree_entries(src))
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(["cpio", "-i", "-d", "--quiet"], input=buf.getvalue(), cwd=out, check=True)
    assert (out / "etc/odd").read_bytes() == b"abc"
    assert os.readlink(out / "bin/sh") == "/bin/busybox"


def test_cpio_rejects_duplicates() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        write_cpio([CpioEntry("a", stat.S_IFREG | 0o644), CpioEntry("/a", stat.S_IFREG | 0o644)], io.BytesIO())


# ---------------------------------------------------------------------------------------------- host inputs


def test_default_kver_picks_newest_with_modules(tmp_path: Path) -> None:
    boot, mods = tmp_path / "boot", tmp_path / "modules"
    boot.mkdir()
    mods.mkdir()
    for k in ("6.1.0-9-amd64", "6.1.0-10-amd64", "6.5.0-1-amd64"):
        (boot / f"vmlinuz-{k}").write_bytes(b"")
    for k in ("6.1.0-9-amd64", "6.1.0-10-amd64"):  # 6.5 has no modules
        (mods / k).mkdir()
    assert image.default_kver(boot_dir=boot, modules_dir=mods) == "6.1.0-10-amd64"


def test_default_kver_without_kernel_is_lab_error(tmp_path: Path) -> None:
    with pytest.raises(LabError) as err:
        image.default_kver(boot_dir=tmp_path, modules_dir=tmp_path)
    assert err.value.hint and "apt-get install linux-image-amd64" in err.value.hint


def test_build_with_unknown_kver_is_lab_error(tmp_path: Path) -> None:
    with pytest.raises(LabError) as err:
        image.build_image(tmp_path / "out", kver="0.0.0-nonexistent")
    assert "0.0.0-nonexistent" in str(err.value)
    assert err.value.hint and "apt-get install" in err.value.hint
    assert not (tmp_path / "out").exists()


@needs_kernel
def test_missing_busybox_names_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(image, "BUSYBOX", tmp_path / "no-busybox")
    with pytest.raises(LabError) as err:
        image.build_image(tmp_path / "out")
    assert err.value.hint == "apt-get install busybox-static"


@needs_busybox
def test_applet_links_have_no_self_link() -> None:
    links = image.busybox_applet_links()
    assert "bin/busybox" not in links
    assert all(not rel.startswith("/") and rel.rsplit("/", 1)[-1] != "busybox" for rel in links)
    assert set(links.values()) == {"/bin/busybox"}
    names = {rel.rsplit("/", 1)[-1] for rel in links}
    assert {"sh", "init", "insmod", "ip", "mount", "ping"} <= names


@needs_kernel
def test_resolve_modules_orders_dependencies() -> None:
    assert KVER is not None
    mods = image.resolve_modules(KVER, ["virtio_net", "virtio_pci", "no_such_module_xyz"])
    names = [p.name for p in mods]
    assert "virtio_net.ko" in names and "virtio_pci.ko" in names
    assert len(names) == len(set(names))
    if "virtio.ko" in names:  # a modular virtio core loads before its drivers
        assert names.index("virtio.ko") < names.index("virtio_net.ko")


@needs_kernel
def test_resolve_modules_fails_without_required() -> None:
    assert KVER is not None
    with pytest.raises(LabError, match="no_such_module_xyz"):
        image.resolve_modules(KVER, ["no_such_module_xyz"], required=["no_such_module_xyz"])


# ---------------------------------------------------------------------------------------------- builds


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, GuestImage]]:
    if needs_all.args[0]:
        pytest.skip(needs_all.kwargs["reason"])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(image, "MODULES", ("virtio_pci", "virtio_net"))  # keep the build quick
        out = tmp_path_factory.mktemp("lab") / "image"
        yield out, image.build_image(out)


@pytest.fixture
def fresh_copy(built: tuple[Path, GuestImage], tmp_path: Path,
               monkeypatch: pytest.MonkeyPatch) -> tuple[Path, GuestImage]:
    """A private copy of the built image (same stamp), for tests that change it."""
    monkeypatch.setattr(image, "MODULES", ("virtio_pci", "virtio_net"))
    out = tmp_path / "image"
    shutil.copytree(built[0], out)
    return out, image.build_image(out)


def _ident(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


def _members(img: GuestImage) -> dict[str, CpioEntry]:
    return {e.name: e for e in read_cpio(gzip.decompress(img.initrd.read_bytes()))}


def test_built_image_files(built: tuple[Path, GuestImage]) -> None:
    out, img = built
    assert img.kernel == out / f"vmlinuz-{img.kver}" and img.kernel.stat().st_size > 1_000_000
    assert img.initrd == out / "initrd.img"
    assert 0 < img.initrd.stat().st_size < image.MAX_INITRD_BYTES
    assert img.host_key_pub.startswith("ecdsa-sha2-nistp256 ") and len(img.host_key_pub.split()) == 2
    assert (out / "host_key.pub").read_text().strip() == img.host_key_pub
    assert stat.S_IMODE(img.client_key.stat().st_mode) == 0o600
    key = paramiko.ECDSAKey.from_private_key_file(str(img.client_key))
    assert img.client_key_pub == f"{key.get_name()} {key.get_base64()}"
    assert image.load_image(out) == img


def test_initramfs_contents(built: tuple[Path, GuestImage]) -> None:
    _, img = built
    m = _members(img)
    init = m["init"]
    assert stat.S_IMODE(init.mode) == 0o755 and init.data == image.INIT_SCRIPT.read_bytes()
    assert stat.S_ISREG(m["bin/busybox"].mode)  # the binary itself, never a link to itself
    for name, entry in m.items():
        if stat.S_ISLNK(entry.mode):
            assert entry.data.decode().lstrip("/") != name, f"{name} links to itself"
    assert stat.S_ISLNK(m["bin/sh"].mode)
    assert stat.S_ISREG(m["usr/sbin/dropbear"].mode)
    assert any(n.startswith(("lib64/ld-linux", "lib/ld-linux")) for n in m) or not image.elf_deps(image.DROPBEAR)
    auth = m["root/.ssh/authorized_keys"]
    assert auth.data.decode().strip() == img.client_key_pub and stat.S_IMODE(auth.mode) == 0o600
    assert stat.S_IMODE(m["root/.ssh"].mode) == 0o700 and stat.S_IMODE(m["root"].mode) == 0o700
    assert m[f"etc/dropbear/{image.HOST_KEY_NAME}"].data == (built[0] / image.HOST_KEY_NAME).read_bytes()
    assert m["etc/passwd"].data.startswith(b"root:x:0:0:root:/root:/bin/sh")
    assert b"dropbear -F -E -s -r /etc/dropbear/dropbear_ecdsa_host_key -p 22" in m["etc/inittab"].data
    order = m[f"lib/modules/{img.kver}/{image.MODULE_ORDER_NAME}"].data.decode().split()
    assert any(p.endswith("/virtio_net.ko") for p in order)
    assert all(p.lstrip("/") in m for p in order)
    assert stat.S_ISCHR(m["dev/console"].mode)
    assert all(e.name != "proc/sys/kernel/hotplug" for e in m.values())


def test_up_to_date_build_is_reused(fresh_copy: tuple[Path, GuestImage]) -> None:
    out, img = fresh_copy
    before = {p.name: _ident(p) for p in out.iterdir() if not p.name.startswith(".")}
    assert image.build_image(out) == img
    assert {p.name: _ident(p) for p in out.iterdir() if not p.name.startswith(".")} == before


def test_force_rebuilds_but_keeps_keys(fresh_copy: tuple[Path, GuestImage]) -> None:
    out, img = fresh_copy
    keys = {n: (out / n).read_bytes() for n in ("id_lab", "id_lab.pub", image.HOST_KEY_NAME, "host_key.pub")}
    old_initrd, old_bytes = _ident(img.initrd), img.initrd.read_bytes()
    again = image.build_image(out, force=True)
    assert again == img
    assert _ident(again.initrd) != old_initrd
    assert again.initrd.read_bytes() == old_bytes  # deterministic archive
    assert {n: (out / n).read_bytes() for n in keys} == keys


def test_changed_inputs_rebuild_but_keep_keys(fresh_copy: tuple[Path, GuestImage],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    out, img = fresh_copy
    old_initrd = _ident(img.initrd)
    monkeypatch.setattr(image, "FORMAT_VERSION", image.FORMAT_VERSION + 1000)
    again = image.build_image(out)
    assert _ident(again.initrd) != old_initrd
    assert (again.host_key_pub, again.client_key_pub) == (img.host_key_pub, img.client_key_pub)


def test_missing_client_key_is_regenerated(fresh_copy: tuple[Path, GuestImage]) -> None:
    out, img = fresh_copy
    img.client_key.unlink()
    with pytest.raises(LabError):
        image.load_image(out)
    again = image.build_image(out)
    assert again.client_key_pub != img.client_key_pub
    assert again.host_key_pub == img.host_key_pub
    assert stat.S_IMODE(again.client_key.stat().st_mode) == 0o600
    assert _members(again)["root/.ssh/authorized_keys"].data.decode().strip() == again.client_key_pub


def test_load_image_without_build_is_lab_error(tmp_path: Path) -> None:
    with pytest.raises(LabError) as err:
        image.load_image(tmp_path)
    assert err.value.hint and "vhotplug lab build" in err.value.hint
