"""Fast checks of the nested lab's L1: its domain XML, the ssh wrapper and the image (the boot is tests/nested)."""

from __future__ import annotations

import gzip
import os
import re
import shlex
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import libvirt
import pytest
from lxml import etree

from tests.unit.conftest import DOMAIN_RNG, NS, fake_l1_image
from vhotplug import errors
from vhotplug.guest.target import target_from_metadata
from vhotplug.host.facts import ssh_target_from_uri
from vhotplug.lab import image, manager, nested
from vhotplug.lab.domain import LabSpec, build_domain_xml, mgmt_mac
from vhotplug.lab.image import CpioEntry, read_cpio
from vhotplug.lab.nested import L1Image

NAME = "vhn-t-unit"
PORT = 40022


def _image(lab: Path) -> L1Image:
    return fake_l1_image(lab, "l1")


def _xml(lab: Path) -> etree._Element:
    return etree.fromstring(nested.l1_xml(NAME, PORT, image=_image(lab)).encode())


# ---------------------------------------------------------------------------------------------- domain XML


def test_l1_xml_hypervisor_devices(lab_dir: Path) -> None:
    root = _xml(lab_dir)
    assert root.get("type") == "qemu" and root.findtext("name") == NAME
    assert root.find("os/type").get("machine") == "q35"
    assert root.findtext("os/kernel") == str(lab_dir / "l1/vmlinuz-6.1.0-test")
    assert root.findtext("os/initrd") == str(lab_dir / "l1/initrd.img")
    cmdline = root.findtext("os/cmdline").split()
    assert {"intel_iommu=on", f"vhotplug.mgmt_mac={mgmt_mac(NAME)}", f"vhotplug.labdir={lab_dir}"} <= set(cmdline)

    assert root.find("features/ioapic").get("driver") == "qemu"
    (iommu,) = root.findall("devices/iommu")
    assert iommu.get("model") == "intel"
    assert dict(iommu.find("driver").attrib) == {"intremap": "on", "caching_mode": "on"}

    (nic,) = root.findall("devices/interface")
    assert nic.get("type") == "user" and nic.find("model").get("type") == "e1000"
    assert dict(nic.find("address").attrib) == {"type": "pci", "domain": "0x0000", "bus": "0x00", "slot": "0x05",
                                                "function": "0x0"}
    assert nic.find("mac").get("address") == nested.give_mac(NAME) != mgmt_mac(NAME)
    assert root.xpath("devices/controller[@type='usb']/@model") == ["qemu-xhci"]
    assert [(i.get("type"), i.get("bus")) for i in root.findall("devices/input")] == [("tablet", "usb")]
    assert root.find("devices/serial/source").get("path") == str(lab_dir / "domains" / NAME / "serial.log")


def test_l1_xml_shares_host_root_and_lab_dir_read_only(lab_dir: Path) -> None:
    shares = {fs.find("target").get("dir"): fs for fs in _xml(lab_dir).findall("devices/filesystem")}
    assert set(shares) == {"hostroot", "vhlab"}
    assert shares["hostroot"].find("source").get("dir") == "/"
    assert shares["vhlab"].find("source").get("dir") == str(lab_dir)
    for fs in shares.values():
        assert (fs.get("type"), fs.get("accessmode"), fs.get("multidevs")) == ("mount", "squash", "remap")
        assert fs.find("readonly") is not None


def test_l1_xml_forwards_ssh_on_loopback_only(lab_dir: Path) -> None:
    args = _xml(lab_dir).xpath("qemu:commandline/qemu:arg/@value", namespaces=NS)
    forwards = [fwd for a in args for fwd in re.findall(r"hostfwd=[^,]*", a)]
    assert forwards == [f"hostfwd=tcp:127.0.0.1:{PORT}-:22"]
    netdev = args[args.index("-netdev") + 1]
    assert netdev.startswith("user,") and "0.0.0.0" not in netdev
    device = args[args.index("-device") + 1]
    assert f"mac={mgmt_mac(NAME)}" in device and "addr=0x1e" in device


def test_l1_xml_metadata_marks_an_l1_lab(lab_dir: Path) -> None:
    root = _xml(lab_dir)
    (lab,) = root.xpath("metadata/vh:guest/vh:lab", namespaces=NS)
    ddir = lab_dir / "domains" / NAME
    assert lab.get("kind") == "l1" and lab.get("image") == "0123456789abcdef"
    uri = lab.get("uri")
    assert uri == nested.l1_uri(PORT, key=lab_dir / "l1/id_lab", known_hosts=ddir / "known_hosts",
                                wrapper=ddir / "ssh-wrapper")
    parts = urlsplit(uri)
    assert (parts.scheme, parts.hostname, parts.port, parts.username, parts.path) == (
        "qemu+ssh", "127.0.0.1", PORT, "root", "/system")
    assert parse_qs(parts.query) == {"keyfile": [str(lab_dir / "l1/id_lab")],
                                     "known_hosts": [str(ddir / "known_hosts")],
                                     "command": [str(ddir / "ssh-wrapper")]}
    target = target_from_metadata(root)
    assert target is not None
    assert (target.host, target.port, target.user) == ("127.0.0.1", PORT, "root")
    assert (target.key, target.known_hosts) == (lab_dir / "l1/id_lab", ddir / "known_hosts")


@pytest.mark.skipif(not DOMAIN_RNG.is_file(), reason="needs libvirt's schemas (libvirt-daemon)")
def test_l1_xml_is_valid_for_libvirt(lab_dir: Path) -> None:
    schema = etree.RelaxNG(file=str(DOMAIN_RNG))
    assert schema.validate(etree.ElementTree(_xml(lab_dir))), schema.error_log


def test_l1_xml_refuses_bad_input(lab_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(errors.InvalidRequest):
        nested.l1_xml("bad name", PORT, image=_image(lab_dir))
    for port in (0, 65536, True):
        with pytest.raises(errors.InvalidRequest):
            nested.l1_xml(NAME, port, image=_image(lab_dir))
    monkeypatch.setenv("VHOTPLUG_LAB_DIR", "/var/lib/with space/lab")
    with pytest.raises(errors.LabError, match="only an absolute path"):
        nested.l1_xml(NAME, PORT, image=_image(lab_dir))


def test_uri_escapes_and_vhotplug_reads_it_back(tmp_path: Path) -> None:
    key, known, wrapper = tmp_path / "k+ey", tmp_path / "known_hosts", tmp_path / "wr+p"
    uri = nested.l1_uri(2222, key=key, known_hosts=known, wrapper=wrapper)
    assert "k%2Bey" in uri and "+" not in urlsplit(uri).query  # '+' would read back as a space
    target = ssh_target_from_uri(uri)  # how `vhotplug host list` logs in to read host facts
    assert target is not None and (target.key, target.known_hosts, target.port) == (key, known, 2222)
    assert parse_qs(urlsplit(uri).query)["command"] == [str(wrapper)]


# ---------------------------------------------------------------------------------------------- metadata readers


class _Dom:
    def __init__(self, xml: str, state: int = libvirt.VIR_DOMAIN_RUNNING) -> None:
        self.xml, self.st = xml, state

    def name(self) -> str:
        return etree.fromstring(self.xml.encode()).findtext("name")

    def XMLDesc(self, flags: int = 0) -> str:
        return self.xml

    def state(self) -> list[int]:
        return [self.st, 0]


class _Conn:
    def __init__(self, *doms: _Dom) -> None:
        self.doms = {d.name(): d for d in doms}

    def listAllDomains(self, flags: int = 0) -> list[_Dom]:
        return list(self.doms.values())

    def lookupByName(self, name: str) -> _Dom:
        if name not in self.doms:
            exc = libvirt.libvirtError("no domain")
            exc.err = (libvirt.VIR_ERR_NO_DOMAIN, 0, "no domain", libvirt.VIR_ERR_ERROR, "", None, None, 0, 0)
            raise exc
        return self.doms[name]


def _plain_lab_xml(name: str, lab: Path) -> str:
    target = nested.l1_target(name, 2200, _image(lab))
    spec = LabSpec(name=name, kernel=lab / "k", initrd=lab / "i", serial_log=lab / "s", ssh=target)
    return build_domain_xml(spec)


def test_find_l1_reads_metadata_and_manager_sees_a_lab(lab_dir: Path) -> None:
    l1_dom = _Dom(nested.l1_xml(NAME, PORT, image=_image(lab_dir)), libvirt.VIR_DOMAIN_SHUTOFF)
    conn = _Conn(l1_dom, _Dom(_plain_lab_xml("vhl-other", lab_dir)))

    l1 = nested.find_l1(conn, NAME)
    assert l1 is not None and l1.state == "shut off"
    assert l1.target.port == PORT and l1.target.source == "lab metadata"
    assert l1.uri.startswith(f"qemu+ssh://root@127.0.0.1:{PORT}/system?")
    assert l1.to_dict()["uri"] == l1.uri and l1.to_dict()["kind"] == "l1"
    assert nested.find_l1(conn, "vhl-other") is None  # a lab, but not an L1
    assert nested.find_l1(conn, "vhn-missing") is None

    # The existing lab tooling (list, status, down) treats an L1 as one of its own.
    labs = {lab.name: lab for lab in manager.list_labs(conn)}
    assert set(labs) == {NAME, "vhl-other"}
    assert (labs[NAME].machine, labs[NAME].accel, labs[NAME].target.port) == ("q35", "qemu", PORT)


# ---------------------------------------------------------------------------------------------- ssh wrapper


def _fake_ssh(tmp_path: Path) -> Path:
    fake = tmp_path / "fake-ssh"
    fake.write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done\n')
    fake.chmod(0o755)
    return fake


def test_wrapper_passes_libvirts_arguments_verbatim(tmp_path: Path) -> None:
    key, known = tmp_path / "id_lab", tmp_path / "known_hosts"
    wrapper = nested.write_ssh_wrapper(tmp_path / "ssh-wrapper", key=key, known_hosts=known, ssh=_fake_ssh(tmp_path))
    assert stat.S_IMODE(wrapper.stat().st_mode) == 0o755
    # What libvirt's ssh transport appends, run with the scrubbed environment libvirt uses.
    remote = "which virt-ssh-helper 1>/dev/null 2>&1; if test $? = 0; then virt-ssh-helper 'qemu:///system'; fi"
    tail = ["-p", "40022", "-l", "root", "-i", str(key), "-T", "-e", "none", "--", "127.0.0.1", "sh", "-c", remote]
    out = subprocess.run([str(wrapper), *tail], env={}, capture_output=True, text=True, check=True).stdout
    argv = out.splitlines()
    assert argv[len(argv) - len(tail):] == tail
    options = argv[:len(argv) - len(tail)]
    assert options[:2] == ["-F", "none"]
    pairs = dict(options[i + 1].split("=", 1) for i in range(2, len(options), 2) if options[i] == "-o")
    assert pairs["UserKnownHostsFile"] == str(known) and pairs["IdentityFile"] == str(key)
    assert pairs["StrictHostKeyChecking"] == "yes" and pairs["BatchMode"] == "yes"
    assert pairs["GlobalKnownHostsFile"] == "/dev/null" and pairs["IdentitiesOnly"] == "yes"
    assert pairs["IdentityAgent"] == "none" and pairs["ControlMaster"] == "no"


def test_wrapper_exec_line_is_shell_quoted(tmp_path: Path) -> None:
    script = nested.ssh_wrapper_script(key=tmp_path / "k", known_hosts=tmp_path / "kh", ssh="/usr/bin/ssh")
    (exec_line,) = [line for line in script.splitlines() if line.startswith("exec ")]
    words = shlex.split(exec_line)
    assert words[0] == "exec" and words[1] == "/usr/bin/ssh" and words[-1] == "$@"
    assert exec_line.endswith(' "$@"')  # the arguments pass through as separate words
    assert f"UserKnownHostsFile={tmp_path / 'kh'}" in words


@pytest.mark.parametrize("bad", ["relative/known_hosts", "/tmp/a b", "/tmp/$(touch x)", "/tmp/a'b", "/tmp/a\"b",
                                 "/tmp/%d", "/tmp/~x", "/tmp/a\nb", "/tmp/a;b", "/tmp/../etc/x"])
def test_wrapper_refuses_unsafe_paths(tmp_path: Path, bad: str) -> None:
    with pytest.raises(errors.LabError):
        nested.write_ssh_wrapper(tmp_path / "w", key=tmp_path / "k", known_hosts=Path(bad), ssh="/usr/bin/ssh")
    with pytest.raises(errors.LabError):
        nested.ssh_wrapper_script(key=Path(bad), known_hosts=tmp_path / "kh", ssh="/usr/bin/ssh")
    assert not (tmp_path / "w").exists()


@pytest.mark.skipif(shutil.which("ssh") is None, reason="needs the OpenSSH client")
def test_openssh_reads_the_wrapper_options_as_meant(tmp_path: Path) -> None:
    """``ssh -G`` prints the configuration it would use, without connecting."""
    key, known = tmp_path / "id_lab", tmp_path / "known_hosts"
    wrapper = nested.write_ssh_wrapper(tmp_path / "ssh-wrapper", key=key, known_hosts=known)
    out = subprocess.run([str(wrapper), "-G", "-p", "40022", "127.0.0.1"], env={}, capture_output=True, text=True,
                         check=True, timeout=30).stdout
    config: dict[str, list[str]] = {}
    for line in out.splitlines():
        k, _, v = line.partition(" ")
        config.setdefault(k, []).append(v)
    assert config["userknownhostsfile"] == [str(known)]
    assert config["globalknownhostsfile"] == ["/dev/null"]
    assert config["identityfile"] == [str(key)]
    assert config["stricthostkeychecking"] == ["true"] and config["batchmode"] == ["yes"]
    assert config["identitiesonly"] == ["yes"] and config["port"] == ["40022"]


# ---------------------------------------------------------------------------------------------- image


def _host_kver() -> str | None:
    try:
        return image.default_kver()
    except errors.LabError:
        return None


KVER = _host_kver()
_MISSING = [p for p in nested.HOST_PROGRAMS if not os.access(p, os.X_OK)]
needs_host = pytest.mark.skipif(
    KVER is None or _MISSING or not image.BUSYBOX.is_file()
    or shutil.which("modprobe", path="/usr/sbin:/sbin:/usr/bin:/bin") is None
    or shutil.which("dropbearkey") is None or not os.access(image.BOOT_DIR / f"vmlinuz-{KVER}", os.R_OK),
    reason="needs linux-image-amd64, kmod, busybox-static, dropbear-bin, libvirt-daemon-system, qemu-system-x86, udev",
)


@pytest.fixture(scope="module")
def built() -> Iterator[tuple[Path, L1Image]]:
    if needs_host.args[0]:
        pytest.skip(needs_host.kwargs["reason"])
    # QEMU must reach the files, so the lab directory needs world-searchable parents (pytest's are 0700).
    base = Path(tempfile.mkdtemp(prefix="vhn-unit-"))
    try:
        base.chmod(0o755)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("VHOTPLUG_LAB_DIR", str(base / "lab"))
            yield base / "lab", nested.build_l1()
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def lab_env(built: tuple[Path, L1Image], monkeypatch: pytest.MonkeyPatch) -> tuple[Path, L1Image]:
    monkeypatch.setenv("VHOTPLUG_LAB_DIR", str(built[0]))
    return built


def _members(img: L1Image) -> dict[str, CpioEntry]:
    return {e.name: e for e in read_cpio(gzip.decompress(img.initrd.read_bytes()))}


def _boot_file(name: str) -> bytes:
    return (resources.files("vhotplug.lab") / name).read_bytes()


def _ident(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


def test_build_l1_outputs(lab_env: tuple[Path, L1Image]) -> None:
    lab, img = lab_env
    assert img.initrd == lab / "l1/initrd.img" and img.kernel == lab / f"l1/vmlinuz-{img.kver}"
    boot_kernel = image.BOOT_DIR / f"vmlinuz-{img.kver}"
    # A private copy (libvirt chowns <kernel> while the domain runs), readable by QEMU.
    assert img.kernel.read_bytes() == boot_kernel.read_bytes()
    assert img.kernel.stat().st_ino != boot_kernel.stat().st_ino and not img.kernel.is_symlink()
    for path in (img.kernel, img.initrd):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert stat.S_IMODE(img.client_key.stat().st_mode) == 0o600
    assert img.host_key_pub == (lab / "l1/host_key.pub").read_text().strip()
    assert re.fullmatch(r"[0-9a-f]{16}", img.build_id)


def test_initramfs_contents(lab_env: tuple[Path, L1Image]) -> None:
    lab, img = lab_env
    m = _members(img)
    assert m["init"].data == _boot_file("l1/init") and stat.S_IMODE(m["init"].mode) == 0o755
    shipped = {f"l1/{p.name}" for p in (Path(nested.__file__).parent / "l1").iterdir()}
    assert shipped == set(nested.BOOT_FILES)  # every boot file goes in, and only those
    for name, (dest, mode) in nested.BOOT_FILES.items():
        assert m[dest].data == _boot_file(name) and stat.S_IMODE(m[dest].mode) == mode, name
    auth = m["vhotplug/authorized_keys"]
    assert auth.data.decode().strip() == (lab / "l1/id_lab.pub").read_text().strip()
    assert stat.S_IMODE(auth.mode) == 0o600
    host_key = m[f"vhotplug/{image.HOST_KEY_NAME}"]
    assert host_key.data == (lab / "l1" / image.HOST_KEY_NAME).read_bytes() and stat.S_IMODE(host_key.mode) == 0o600
    assert stat.S_ISREG(m["bin/busybox"].mode) and stat.S_ISCHR(m["dev/console"].mode)
    applets = {n.rsplit("/", 1)[-1] for n, e in m.items() if stat.S_ISLNK(e.mode)}
    assert {"sh", "insmod", "mount", "switch_root", "poweroff", "readlink", "ip"} <= applets

    order = m["vhotplug/modules.order"].data.decode().split()
    assert all(p.lstrip("/") in m and p.endswith(".ko") for p in order)  # decompressed for busybox insmod
    names = {p.rsplit("/", 1)[-1] for p in order}
    assert {"9p.ko", "9pnet_virtio.ko", "overlay.ko", "vfio.ko", "vfio_iommu_type1.ko", "vfio-pci.ko",
            "e1000.ko", "virtio_net.ko", "xhci-pci.ko", "usbhid.ko"} <= names
    assert len(order) == len(set(order))


def test_boot_files_agree_with_each_other() -> None:
    init, inittab = _boot_file("l1/init").decode(), _boot_file("l1/inittab").decode()
    # /init installs the host key where the inittab's dropbear reads it.
    assert "/etc/vhotplug-l1/dropbear_ecdsa_host_key" in inittab
    assert "/vhotplug/dropbear_ecdsa_host_key $N/etc/vhotplug-l1/" in init
    assert "mount -t 9p" in init and f" {nested.ROOT_TAG} " in init and f" {nested.LAB_TAG} " in init
    # L2 guests boot from files under the lab directory: /init must not hide it behind a tmpfs.
    hidden = re.search(r"for d in ([^;]*); do\s+mount -t tmpfs", init, re.S)
    assert hidden is not None
    dirs = hidden.group(1).replace("\\\n", " ").split()
    assert "/run" in dirs and "/var/lib/libvirt" in dirs
    for d in dirs:
        assert not "/var/lib/vhotplug/lab/".startswith(f"{d.rstrip('/')}/"), d


def test_up_to_date_build_is_reused(lab_env: tuple[Path, L1Image]) -> None:
    lab, img = lab_env
    before = {p.name: _ident(p) for p in (lab / "l1").iterdir() if not p.name.startswith(".")}
    assert nested.build_l1() == img
    assert {p.name: _ident(p) for p in (lab / "l1").iterdir() if not p.name.startswith(".")} == before


def test_changed_boot_file_rebuilds_keeping_keys(lab_env: tuple[Path, L1Image],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    lab, img = lab_env
    keys = {n: (lab / "l1" / n).read_bytes() for n in ("id_lab", "id_lab.pub", image.HOST_KEY_NAME)}
    old_initrd = _ident(img.initrd)
    real = nested._boot_file
    monkeypatch.setattr(nested, "_boot_file",
                        lambda name: real(name) + (b"# changed\n" if name == "l1/sysinit.sh" else b""))
    again = nested.build_l1()
    assert again.build_id != img.build_id and _ident(again.initrd) != old_initrd
    assert _members(again)["vhotplug/sysinit.sh"].data.endswith(b"# changed\n")
    assert {n: (lab / "l1" / n).read_bytes() for n in keys} == keys
    monkeypatch.setattr(nested, "_boot_file", real)
    assert nested.build_l1().build_id == img.build_id  # back to the same inputs, same build


def test_force_rebuild_is_deterministic(lab_env: tuple[Path, L1Image]) -> None:
    _, img = lab_env
    old_ident, old_bytes = _ident(img.initrd), img.initrd.read_bytes()
    again = nested.build_l1(force=True)
    assert again == img and _ident(again.initrd) != old_ident
    assert again.initrd.read_bytes() == old_bytes


def test_sata_controller_and_disk_to_give_away(tmp_path):
    from lxml import etree as et

    root = et.fromstring(nested.l1_xml("vhn-sata", 2222).encode())
    ctl = root.find("devices/controller[@type='sata'][@index='1']")
    assert ctl.find("address").get("slot") == "0x06" and ctl.find("address").get("bus") == "0x00"
    disk = root.find("devices/disk")
    assert disk.findtext("serial") == "vh-l1sata" and disk.find("address").get("controller") == "1"
    assert disk.find("source").get("file").endswith("/domains/vhn-sata/sata.img")
    image = tmp_path / "sata.img"
    nested.write_sata_disk(image)
    data = image.read_bytes()
    assert len(data) == 16 << 20 and data[510:512] == b"\x55\xaa" and data[446 + 4] == 0x83
    assert int.from_bytes(data[446 + 8:446 + 12], "little") == 2048


def test_lab_ssh_reaches_l2_through_l1_with_both_keys_pinned():
    import shutil
    import subprocess

    from vhotplug.cli.lab_cmd import _ssh_options
    from vhotplug.guest.target import SSHTarget

    l1 = SSHTarget("127.0.0.1", 4000, "root", Path("/lab/l1/id"), Path("/lab/l1/known_hosts"))
    l2 = SSHTarget("127.0.0.1", 5000, "root", Path("/lab/id"), Path("/lab/l2/known_hosts"), jump=l1)
    opts = _ssh_options(l2)
    assert opts[opts.index("-p") + 1] == "5000" and "UserKnownHostsFile=/lab/l2/known_hosts" in opts
    proxy = next(o for o in opts if o.startswith("ProxyCommand="))
    assert "-p 4000" in proxy and "UserKnownHostsFile=/lab/l1/known_hosts" in proxy and "-W %h:%p" in proxy
    if shutil.which("ssh"):  # OpenSSH reads them as meant
        shown = subprocess.run(["ssh", "-G", *opts, "root@127.0.0.1"], capture_output=True, text=True).stdout
        assert "proxycommand" in shown and "-W 127.0.0.1:5000" in shown.replace("%h:%p", "127.0.0.1:5000")
