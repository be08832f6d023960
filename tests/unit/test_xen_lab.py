"""Fast checks of the Xen lab: both domain XMLs, the package set, the domU's address and command line, the
reuse decisions, and what init.sh makes of its options (the boots are tests/xen)."""

from __future__ import annotations

import gzip
import os
import re
import shutil
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
from vhotplug.guest.target import SSHTarget, target_from_metadata
from vhotplug.lab import image, manager, nested, xen, xenpv
from vhotplug.lab.domain import LabSpec, build_domain_xml, mgmt_mac
from vhotplug.lab.image import read_cpio
from vhotplug.lab.nested import L1, L1Image

NAME = "vhx-t-unit"
PORT = 40122


def _image(lab: Path) -> L1Image:
    return fake_l1_image(lab, "xen")


def _tree(lab: Path) -> xen.XenTree:
    return xen.XenTree(lab / "xen/root", lab / "xen/xen-4.17-amd64", ("a.deb",), "fedcba9876543210")


def _xen_xml(lab: Path) -> etree._Element:
    return etree.fromstring(xen.xen_xml(NAME, PORT, image=_image(lab), tree=_tree(lab)).encode())


# ---------------------------------------------------------------------------------------------- the Xen lab's XML


def test_xen_xml_boots_xen_with_dom0_as_multiboot_modules(lab_dir: Path) -> None:
    root = _xen_xml(lab_dir)
    assert root.get("type") == "qemu" and root.findtext("name") == NAME
    assert root.find("os/type").get("machine") == "q35"
    assert root.findtext("os/kernel") == str(lab_dir / "xen/xen-4.17-amd64")
    assert root.findtext("os/cmdline") == xen.XEN_CMDLINE
    assert {"console=com1", "com1=115200,8n1", "dom0_mem=1024M,max:1024M", "dom0_max_vcpus=2", "noreboot",
            "iommu=1"} == set(xen.XEN_CMDLINE.split())
    # QEMU's multiboot loader: "KERNEL ARGS,INITRD", and nothing else may carry a comma.
    kernel_and_args, initrd = root.findtext("os/initrd").split(",")
    kernel, *args = kernel_and_args.split()
    assert kernel == str(lab_dir / "xen/vmlinuz-6.1.0-test") and initrd == str(lab_dir / "xen/initrd.img")
    assert {"console=hvc0", f"vhotplug.mgmt_mac={mgmt_mac(NAME)}", f"vhotplug.labdir={lab_dir}",
            f"vhotplug.lower={xen.XEN_TAG}"} <= set(args)
    # The module list is not a file: libvirt's DAC driver must not try to relabel it.
    assert [(s.get("type"), s.get("model")) for s in root.findall("seclabel")] == [("none", "dac")]


def test_xen_xml_machine(lab_dir: Path) -> None:
    root = _xen_xml(lab_dir)
    assert root.findtext("memory") == "3072" and root.find("memory").get("unit") == "MiB"
    assert root.findtext("vcpu") == "2"
    model = root.find("cpu/model")
    assert (model.text, model.get("vendor_id"), root.find("cpu").get("mode")) == ("qemu64", "GenuineIntel", "custom")
    assert root.find("features/ioapic").get("driver") == "qemu"
    (iommu,) = root.findall("devices/iommu")
    assert iommu.get("model") == "intel" and iommu.find("driver").get("intremap") == "on"
    assert root.find("devices/serial/source").get("path") == str(lab_dir / "domains" / NAME / "serial.log")


def test_xen_xml_e1000e_is_the_only_device_behind_a_root_port_at_the_exported_bdf(lab_dir: Path) -> None:
    devices = _xen_xml(lab_dir).find("devices")
    (port,) = devices.xpath("controller[@model='pcie-root-port']")
    assert port.get("index") == "1"
    assert devices.xpath("controller[@type='usb']/@model") == ["none"]  # no USB controller libvirt would place
    (nic,) = devices.findall("interface")
    assert nic.get("type") == "user" and nic.find("model").get("type") == "e1000e"
    assert nic.find("mac").get("address") == xen.give_mac(NAME) != mgmt_mac(NAME)
    addr = nic.find("address")
    assert addr.get("bus") == "0x01" == f"0x{int(port.get('index')):02x}"
    bdf = f"{int(addr.get('domain'), 16):04x}:{int(addr.get('bus'), 16):02x}:{int(addr.get('slot'), 16):02x}." \
          f"{int(addr.get('function'), 16)}"
    assert bdf == xen.E1000E_BDF and "pci_" + re.sub(r"[:.]", "_", bdf) == xen.E1000E_NODEDEV
    assert xen.E1000E_IDS == (0x8086, 0x10D3)
    # Every other PCI device has its address on pcie.0, so nothing else gets a root port (and a bus number).
    pci = devices.xpath("filesystem | disk | hostdev | interface | controller[@type='pci'][@model!='pcie-root']")
    assert len(pci) == 5
    for dev in pci:
        if dev is not nic:
            assert dev.find("address").get("bus") == "0x00", etree.tostring(dev)


def test_xen_xml_shares(lab_dir: Path) -> None:
    shares = {fs.find("target").get("dir"): fs for fs in _xen_xml(lab_dir).findall("devices/filesystem")}
    assert set(shares) == {"hostroot", xen.XEN_TAG, nested.LAB_TAG}
    assert shares["hostroot"].find("source").get("dir") == "/"
    assert shares[xen.XEN_TAG].find("source").get("dir") == str(lab_dir / "xen/root")
    assert shares[nested.LAB_TAG].find("source").get("dir") == str(lab_dir)
    for fs in shares.values():
        assert fs.find("readonly") is not None and fs.get("accessmode") == "squash"


def test_xen_xml_forwards_ssh_on_loopback_only_and_marks_a_xen_lab(lab_dir: Path) -> None:
    root = _xen_xml(lab_dir)
    args = root.xpath("qemu:commandline/qemu:arg/@value", namespaces=NS)
    assert [f for a in args for f in re.findall(r"hostfwd=[^,]*", a)] == [f"hostfwd=tcp:127.0.0.1:{PORT}-:22"]
    assert f"mac={mgmt_mac(NAME)}" in args[args.index("-device") + 1]
    (lab,) = root.xpath("metadata/vh:guest/vh:lab", namespaces=NS)
    assert lab.get("kind") == "xen" and lab.get("image") == xen.build_id(_image(lab_dir), _tree(lab_dir))
    parts = urlsplit(lab.get("uri"))
    assert (parts.scheme, parts.hostname, parts.port, parts.path) == ("xen+ssh", "127.0.0.1", PORT, "/system")
    ddir = lab_dir / "domains" / NAME
    assert parse_qs(parts.query) == {"keyfile": [str(lab_dir / "xen/id_lab")],
                                     "known_hosts": [str(ddir / "known_hosts")],
                                     "command": [str(ddir / "ssh-wrapper")]}
    target = target_from_metadata(root)
    assert target is not None and (target.host, target.port, target.key) == ("127.0.0.1", PORT, lab_dir / "xen/id_lab")


def test_build_id_follows_the_image_and_the_packages(lab_dir: Path) -> None:
    img, tree = _image(lab_dir), _tree(lab_dir)
    base = xen.build_id(img, tree)
    assert re.fullmatch(r"[0-9a-f]{16}", base)
    assert xen.build_id(L1Image(*[*vars(img).values()][:5], "1111111111111111"), tree) != base
    assert xen.build_id(img, xen.XenTree(tree.root, tree.hypervisor, tree.debs, "0" * 16)) != base


def test_xen_xml_refuses_paths_that_would_break_the_module_list(lab_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VHOTPLUG_LAB_DIR", "/var/lib/vh,lab")
    with pytest.raises(errors.LabError, match="only an absolute path"):
        xen.xen_xml(NAME, PORT, image=_image(Path("/var/lib/vh,lab")), tree=_tree(lab_dir))


# ---------------------------------------------------------------------------------------------- the PV domU's XML


def _pv_spec(host: str = "169.254.100.7", **kw: object) -> LabSpec:
    jump = SSHTarget("127.0.0.1", PORT, "root", Path("/lab/xen/id_lab"), Path("/lab/domains/x/known_hosts"))
    target = SSHTarget(host, 22, "root", Path("/lab/image/id_lab"), Path("/lab/domains/pv/known_hosts"), jump=jump)
    return LabSpec(name="vhx-pv", kernel=Path("/lab/image/vmlinuz-6.1"), initrd=Path("/lab/image/initrd.img"),
                   serial_log=xenpv.console_log("vhx-pv"), ssh=target, machine="xenpv", accel="xen",
                   image_id="6.1", **kw)  # type: ignore[arg-type]


def test_xenpv_xml() -> None:
    root = etree.fromstring(xenpv.build_xenpv_xml(_pv_spec()).encode())
    assert root.get("type") == "xen" and root.findtext("name") == "vhx-pv"
    ostype = root.find("os/type")
    assert (ostype.text, ostype.get("machine"), ostype.get("arch")) == ("linux", "xenpv", "x86_64")
    assert root.findtext("os/kernel") == "/lab/image/vmlinuz-6.1"
    assert root.findtext("os/initrd") == "/lab/image/initrd.img"
    cmdline = root.findtext("os/cmdline").split()
    mac = xenpv.xen_mac("vhx-pv")
    assert {"console=hvc0", f"vhotplug.mgmt_mac={mac}", "vhotplug.mgmt_ip=169.254.100.7/16",
            "vhotplug.mgmt_gw=169.254.100.1", "memhp_default_state=offline"} <= set(cmdline)
    vcpu = root.find("vcpu")
    assert (vcpu.get("current"), vcpu.text) == ("1", "2")
    assert int(root.findtext("currentMemory")) == 256 < int(root.findtext("memory")) == 512  # room to balloon up
    assert root.find("features/xen/passthrough").get("state") == "on"
    (nic,) = root.findall("devices/interface")
    assert nic.get("type") == "bridge" and nic.find("source").get("bridge") == xenpv.BRIDGE
    assert nic.find("mac").get("address") == mac and mac.startswith("00:16:3e:")
    assert nic.find("alias").get("name") == "ua-mgmt"
    (console,) = root.findall("devices/console")
    assert console.get("type") == "pty" and console.find("target").get("type") == "xen"
    (lab,) = root.xpath("metadata/vh:guest/vh:lab", namespaces=NS)
    assert (lab.get("machine"), lab.get("accel")) == ("xenpv", "xen")
    assert lab.get("serial-log") == "/var/log/libvirt/xen-console/guest-vhx-pv.log"
    target = target_from_metadata(root)
    assert target is not None and (target.host, target.port) == ("169.254.100.7", 22)
    assert target.jump is not None and (target.jump.host, target.jump.port) == ("127.0.0.1", PORT)


@pytest.mark.skipif(not DOMAIN_RNG.is_file(), reason="needs libvirt's schemas (libvirt-daemon)")
def test_both_xmls_are_valid_for_libvirt(lab_dir: Path) -> None:
    schema = etree.RelaxNG(file=str(DOMAIN_RNG))
    for root in (_xen_xml(lab_dir), etree.fromstring(xenpv.build_xenpv_xml(_pv_spec()).encode())):
        assert schema.validate(etree.ElementTree(root)), schema.error_log


@pytest.mark.parametrize("host", ["169.254.100.1", "10.0.2.15", "169.255.0.2", "169.254.255.255", "fe80::1",
                                  "nohost"])
def test_xenpv_refuses_addresses_off_the_bridge(host: str) -> None:
    with pytest.raises(errors.InvalidRequest):
        xenpv.build_xenpv_xml(_pv_spec(host))


def test_xenpv_refuses_plain_and_other_ports() -> None:
    with pytest.raises(errors.Unsupported):
        xenpv.build_xenpv_xml(_pv_spec(plain=True))
    spec = _pv_spec()
    with pytest.raises(errors.InvalidRequest):
        xenpv.build_xenpv_xml(LabSpec(**{**vars(spec), "ssh": SSHTarget(spec.ssh.host, 2222)}))


def test_pick_address() -> None:
    assert xenpv.pick_address([]) == "169.254.100.2"
    assert xenpv.pick_address(["169.254.100.2", "169.254.100.3", "127.0.0.1"]) == "169.254.100.4"
    assert xenpv.pick_address(["169.254.100.3"]) == "169.254.100.2"  # a gap is reused
    assert xenpv.pick_address(f"169.254.100.{n}" for n in range(2, 254)) == "169.254.100.254"
    with pytest.raises(errors.LabError, match="no free lab address"):
        xenpv.pick_address(f"169.254.100.{n}" for n in range(2, 255))


# ---------------------------------------------------------------------------------------------- manager: by driver


class _Conn:
    def __init__(self, driver: str, uri: str = "qemu:///system", doms: list[object] | None = None) -> None:
        self.driver, self.uri, self.doms = driver, uri, doms or []

    def getType(self) -> str:
        return self.driver

    def getURI(self) -> str:
        return self.uri

    def listAllDomains(self, flags: int = 0) -> list[object]:
        return self.doms


def test_the_driver_picks_the_lab_guest_xml() -> None:
    qemu = manager._flavour(_Conn("QEMU"), "pc", "kvm", True)
    assert (qemu.machine, qemu.accel, qemu.xml, qemu.xen) == ("pc", "kvm", build_domain_xml, False)
    x = manager._flavour(_Conn("Xen"), "q35", "qemu", False)
    assert (x.machine, x.accel, x.xml, x.xen) == ("xenpv", "xen", xenpv.build_xenpv_xml, True)
    with pytest.raises(errors.Unsupported):
        manager._flavour(_Conn("Xen"), "q35", "qemu", True)


def test_xen_spec_and_jump_from_a_xen_ssh_uri(lab_dir: Path) -> None:
    uri = nested.ssh_uri("xen", PORT, key=lab_dir / "xen/id_lab", known_hosts=lab_dir / "kh", wrapper=lab_dir / "w")
    jump = manager.remote_jump(_Conn("Xen", uri))
    assert jump is not None
    assert (jump.host, jump.port, jump.user, jump.key, jump.known_hosts) == (
        "127.0.0.1", PORT, "root", lab_dir / "xen/id_lab", lab_dir / "kh")
    spec = manager._spec("vhx-pv", "xenpv", "xen", Path("/k"), Path("/i"), Path("/key"), "6.1", False, jump,
                         "169.254.100.3")
    assert (spec.ssh.host, spec.ssh.port, spec.ssh.jump) == ("169.254.100.3", 22, jump)
    assert spec.serial_log == xenpv.console_log("vhx-pv")
    assert manager.known_hosts_line("169.254.100.3", 22, "ecdsa AAA") == "169.254.100.3 ecdsa AAA\n"
    assert manager.known_hosts_line("127.0.0.1", 2200, "ecdsa AAA") == "[127.0.0.1]:2200 ecdsa AAA\n"


# ---------------------------------------------------------------------------------------------- reuse decisions


class _Dom:
    def __init__(self, xml: str, active: bool = True) -> None:
        self.xml, self.active = xml, active

    def name(self) -> str:
        return etree.fromstring(self.xml.encode()).findtext("name")

    def XMLDesc(self, flags: int = 0) -> str:
        return self.xml

    def state(self) -> list[int]:
        return [libvirt.VIR_DOMAIN_RUNNING if self.active else libvirt.VIR_DOMAIN_SHUTOFF, 0]


class _DomConn:
    def __init__(self, dom: _Dom) -> None:
        self.dom = dom

    def lookupByName(self, name: str) -> _Dom:
        return self.dom


@pytest.mark.parametrize(("active", "same_build", "usable", "reused"), [
    (True, True, True, True), (True, False, True, False), (True, True, False, False), (False, True, True, False),
])
def test_reuse_or_remove(lab_dir: Path, monkeypatch: pytest.MonkeyPatch, active: bool, same_build: bool,
                         usable: bool, reused: bool) -> None:
    img, tree = _image(lab_dir), _tree(lab_dir)
    conn = _DomConn(_Dom(xen.xen_xml(NAME, PORT, image=img, tree=tree), active))
    removed: list[str] = []
    monkeypatch.setattr(manager, "down", lambda c, name: removed.append(name) or True)
    monkeypatch.setattr(nested, "_usable", lambda l1: usable)
    want = xen.build_id(img, tree) if same_build else "another-build"
    found = nested.reuse_or_remove(conn, NAME, kind=xen.KIND, build_id=want)
    if reused:
        assert isinstance(found, L1) and found.kind == "xen" and found.uri.startswith("xen+ssh://") and not removed
    else:
        assert found is None and removed == [NAME]
    # A Xen lab is not a nested L1 (and the other way round): asked as an L1 it is replaced.
    removed.clear()
    assert nested.reuse_or_remove(conn, NAME, kind=nested.KIND, build_id=want) is None and removed == [NAME]


# ---------------------------------------------------------------------------------------------- packages


DEPENDS = """\
xen-hypervisor-4.17-amd64
xen-utils-4.17
  Depends: libc6
  Depends: libxenmisc4.17
  Depends: libyajl2
  Depends: <python3:any>
    python3
  Depends: xen-utils-common
xen-utils-common
 |Depends: sysvinit-utils
  Depends: lsb-base
  Depends: xenstore-utils
  Depends: libxenhypfs1
xenstore-utils
  Depends: libxenstore4
libvirt-daemon-driver-xen
  Depends: libvirt-daemon
  Depends: libxenmisc4.17
  Depends: libfoo-missing1
libxenmisc4.17
  PreDepends: libxencall1:amd64
"""


def test_parse_depends() -> None:
    deps = xen.parse_depends(DEPENDS)
    assert deps["xen-hypervisor-4.17-amd64"] == []
    assert deps["xen-utils-4.17"] == [["libc6"], ["libxenmisc4.17"], ["libyajl2"], ["xen-utils-common"]]
    assert deps["xen-utils-common"] == [["sysvinit-utils", "lsb-base"], ["xenstore-utils"], ["libxenhypfs1"]]
    assert deps["libxenmisc4.17"] == [["libxencall1"]]


def test_resolve_packages_takes_xen_ones_and_what_the_host_lacks() -> None:
    table = xen.parse_depends(DEPENDS)
    asked: list[list[str]] = []

    def depends(names: list[str]) -> dict[str, list[list[str]]]:
        asked.append(names)
        return {n: table.get(n, []) for n in names}

    host = {"libc6", "libyajl2", "python3", "sysvinit-utils", "libvirt-daemon"}
    got = xen.resolve_packages(depends, lambda names: set(names) & host)
    assert got[:5] == list(xen.ROOT_PACKAGES)
    assert set(got[5:]) == {"libxenmisc4.17", "libxenhypfs1", "libxenstore4", "libfoo-missing1", "libxencall1"}
    assert len(got) == len(set(got))
    assert "lsb-base" not in got  # its alternative sysvinit-utils is installed
    assert len(asked) <= 3 and all(len(batch) == len(set(batch)) for batch in asked)


def test_parse_print_uris_and_stamp() -> None:
    text = ("'http://mirror.invalid/pool/x/xen-utils-common_4.17.7%2b13-0%2bdeb12u1_amd64.deb' "
            f"xen-utils-common_4.17.7+13-0+deb12u1_amd64.deb 277480 SHA256:{'a' * 64}\n"
            "W: something apt says\n"
            "'http://mirror.invalid/pool/l/libvirt-daemon-driver-xen_9.0.0-4_amd64.deb' "
            f"libvirt-daemon-driver-xen_9.0.0-4_amd64.deb 193212 SHA256:{'b' * 64}\n")
    debs = xen.parse_print_uris(text)
    assert [(d.package, d.size) for d in debs] == [("xen-utils-common", 277480), ("libvirt-daemon-driver-xen", 193212)]
    assert debs[0].filename == "xen-utils-common_4.17.7+13-0+deb12u1_amd64.deb" and debs[0].sha256 == "a" * 64
    stamp = xen.tree_stamp(debs)
    assert stamp == xen.tree_stamp(reversed(debs))
    assert stamp != xen.tree_stamp([debs[0], xen.Deb(debs[1].package, debs[1].filename, 1, "c" * 64)])


def test_unpack_is_cached_by_the_deb_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """dpkg-deb -x runs only when the set changed; the hypervisor is gunzipped from the tree."""
    calls: list[list[str]] = []

    def fake_apt(argv: list[str], what: str, **kw: object) -> str:
        calls.append(argv)
        dest = Path(argv[-1])
        (dest / "boot").mkdir(parents=True, exist_ok=True)
        (dest / "boot/xen-4.17-amd64.gz").write_bytes(gzip.compress(b"XEN" + argv[-2].encode()))
        return ""

    monkeypatch.setattr(xen, "_apt", fake_apt)
    debs = [xen.Deb("xen-hypervisor-4.17-amd64", "h.deb", 1, "a" * 64)]
    tree = xen._unpack(tmp_path, debs)
    assert tree.hypervisor == tmp_path / "xen-4.17-amd64" and tree.hypervisor.read_bytes().startswith(b"XEN")
    assert tree.root == tmp_path / "root" and len(calls) == 1 and calls[0][:2] == ["dpkg-deb", "-x"]
    assert xen._unpack(tmp_path, debs) == tree and len(calls) == 1
    changed = [xen.Deb("xen-hypervisor-4.17-amd64", "h2.deb", 1, "b" * 64)]
    assert xen._unpack(tmp_path, changed).stamp != tree.stamp and len(calls) == 2
    assert not any(p.name.startswith(".root-") for p in tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------- boot files


def _shipped(rel: str) -> str:
    return (resources.files("vhotplug.lab") / rel).read_text()


def test_dom0_boot_files_agree_with_the_python_side() -> None:
    sysinit, inittab, root_sh = (_shipped(f"dom0/{n}") for n in ("sysinit.sh", "inittab", "root.sh"))
    assert f"ip link add {xenpv.BRIDGE} type bridge" in sysinit
    assert f"ip addr add {xenpv.GATEWAY}/{xenpv.NETWORK.prefixlen} dev {xenpv.BRIDGE}" in sysinit
    assert "echo 0 >/proc/sys/net/ipv4/ip_forward" in sysinit  # domUs reach dom0 only
    assert f"--log=guest --log-dir={xenpv.CONSOLE_LOG_DIR}" in sysinit
    assert "modprobe e1000e" in sysinit and sysinit.index(". /etc/vhotplug-l1/base.sh") < sysinit.index("$X/")
    assert "ln -sf /proc/self/fd /dev/fd" in _shipped(nested.BASE_FILE)  # Xen's block hotplug script needs it
    assert "xen-[0-9]*/bin" in sysinit  # not /usr/lib/xen-common/bin
    for daemon in ("xenstored", "xen-init-dom0", "xenconsoled"):
        assert f'"$X/{daemon}"' in sysinit
    assert sysinit.index("xenstored") < sysinit.index("xen-init-dom0") < sysinit.index("xenconsoled")
    assert "/usr/sbin/libvirtd" in inittab and "/etc/vhotplug-l1/dropbear_ecdsa_host_key" in inittab
    assert "libvirt_driver_qemu.so" in root_sh and str(xenpv.CONSOLE_LOG_DIR) in root_sh
    assert set(xen.BOOT_FILES) == {nested.INIT_FILE, nested.BASE_FILE, "dom0/root.sh", "dom0/inittab",
                                   "dom0/sysinit.sh"}
    assert {dest for dest, _ in xen.BOOT_FILES.values()} == {dest for dest, _ in nested.BOOT_FILES.values()
                                                              if dest != "vhotplug/qemu.conf"
                                                              and dest != "vhotplug/udev.rules"}


def test_l1_init_mounts_the_extra_lower_layer_above_the_host_root() -> None:
    init = _shipped(nested.INIT_FILE)
    assert "vhotplug.lower=*) lower=" in init and "layers=/extra:/lower" in init
    assert "lowerdir=$layers," in init and ". /vhotplug/root.sh" in init


def _init_options(cmdline: str) -> tuple[str, str, str]:
    """Run the option parsing of the lab guest's init.sh (from its text) on ``cmdline``."""
    text = image.INIT_SCRIPT.read_text()
    start = text.index("# The management address")
    end = text.index("esac\n", text.index('case "$ip4/$gw4"')) + len("esac\n")
    block = text[start:end].replace("$(cat /proc/cmdline)", "$CMDLINE")
    script = f'log() {{ echo "LOG $*" >&2; }}\n{block}\necho "$mac|$ip4|$gw4"\n'
    shell = "/bin/busybox" if os.access("/bin/busybox", os.X_OK) else "/bin/sh"
    argv = [shell, "sh", "-c", script] if shell.endswith("busybox") else [shell, "-c", script]
    out = subprocess.run(argv, env={"CMDLINE": cmdline, "PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
                         check=True, timeout=30).stdout
    mac, ip4, gw4 = out.strip().split("|")
    return mac, ip4, gw4


def test_init_sh_options() -> None:
    assert _init_options("console=ttyS0 quiet vhotplug.mgmt_mac=52:54:00:AA:BB:CC") == (
        "52:54:00:aa:bb:cc", "10.0.2.15/24", "10.0.2.2")  # QEMU/KVM: unchanged
    pv = xenpv.kernel_cmdline("00:16:3e:01:02:03", "169.254.100.9")
    assert _init_options(pv) == ("00:16:3e:01:02:03", "169.254.100.9/16", "169.254.100.1")
    for bad in ("vhotplug.mgmt_ip=1.2.3.4;reboot", "vhotplug.mgmt_gw=$(x)", "vhotplug.mgmt_ip=1.2.3.4/8/9",
                "vhotplug.mgmt_ip="):
        assert _init_options(bad)[1:] == ("10.0.2.15/24", "10.0.2.2"), bad


def test_init_sh_loads_the_xen_front_ends_only_under_xen() -> None:
    text = image.INIT_SCRIPT.read_text()
    guard = text.index('if [ "$(cat /sys/hypervisor/type 2>/dev/null)" = xen ]; then')
    assert text.index(image.XEN_MODULE_ORDER_NAME) > guard
    assert image.MODULE_ORDER_NAME in text[:guard]
    assert set(image.XEN_MODULES) == {"xen_netfront", "xen_blkfront", "xen_pcifront"}
    assert not set(image.XEN_MODULES) & set(image.MODULES)  # a QEMU/KVM guest loads what it did before


# ---------------------------------------------------------------------------------------------- the dom0 image


def _host_ready() -> bool:
    try:
        kver = image.default_kver()
    except errors.LabError:
        return False
    return (all(os.access(p, os.X_OK) for p in xen.HOST_PROGRAMS) and image.BUSYBOX.is_file()
            and shutil.which("dropbearkey") is not None and os.access(image.BOOT_DIR / f"vmlinuz-{kver}", os.R_OK))


@pytest.fixture(scope="module")
def dom0_image() -> Iterator[tuple[Path, L1Image]]:
    if not _host_ready():
        pytest.skip("needs linux-image-amd64, busybox-static, dropbear-bin, libvirt-daemon-system, kmod")
    base = Path(tempfile.mkdtemp(prefix="vhx-unit-"))
    try:
        base.chmod(0o755)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("VHOTPLUG_LAB_DIR", str(base / "lab"))
            yield base / "lab", nested.build_image(xen.PROFILE)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_dom0_initramfs(dom0_image: tuple[Path, L1Image]) -> None:
    lab, img = dom0_image
    assert img.initrd == lab / "xen/initrd.img" and img.kernel == lab / f"xen/vmlinuz-{img.kver}"
    members = {e.name: e for e in read_cpio(gzip.decompress(img.initrd.read_bytes()))}
    for rel, (dest, _) in xen.BOOT_FILES.items():
        assert members[dest].data == (resources.files("vhotplug.lab") / rel).read_bytes(), rel
    assert "vhotplug/qemu.conf" not in members and "vhotplug/udev.rules" not in members
    names = {p.rsplit("/", 1)[-1] for p in members["vhotplug/modules.order"].data.decode().split()}
    assert {"9p.ko", "9pnet_virtio.ko", "overlay.ko", "virtio_net.ko"} <= names and "vfio.ko" not in names
    # Its own keys and stamp, next to (not shared with) the nested lab's L1.
    assert (lab / "xen/id_lab").is_file() and not (lab / "l1").exists()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VHOTPLUG_LAB_DIR", str(lab))
        assert nested.build_image(xen.PROFILE) == img  # up to date: reused
