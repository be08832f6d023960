"""Who uses a host device: fixture sysfs trees built in tmp_path, the real host (read-only), domain XML."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from vhotplug import errors
from vhotplug.addresses import parse_bdf
from vhotplug.host.sysfs import Sysfs, iommu_status, is_bridge
from vhotplug.host.usage import (
    HostUse,
    Usage,
    assignments_from_xml,
    domain_usages,
    group_endpoints_in_host_use,
    pci_host_usages,
)

_BDF = re.compile(r"[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]")


class FakeHost:
    """A small sysfs/procfs tree shaped like the kernel's, with relative links as the kernel makes them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        for d in ("sys/block", "sys/class/net", "sys/bus/pci/devices", "sys/kernel/iommu_groups", "proc/self",
                  "proc/net"):
            (root / d).mkdir(parents=True, exist_ok=True)
        self.mountinfo: list[str] = []
        self.swaps: list[str] = []
        self.routes: list[str] = []
        self.inet6: list[str] = []

    def _link(self, link: Path, target: Path) -> None:
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(target, link.parent), link)

    def _write(self, path: Path, text: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")

    def pci(self, bdf: str, klass: int, *, driver: str | None = None, group: int | None = None,
            parent: str | None = None, vendor: int = 0x8086, device: int = 0x1234) -> Path:
        """A PCI function under the root complex or below ``parent`` (a bridge's directory)."""
        base = self.root / "sys/devices/pci0000:00"
        ddir = (self.pci_path(parent) if parent else base) / bdf
        self._write(ddir / "class", f"0x{klass:06x}")
        self._write(ddir / "vendor", f"0x{vendor:04x}")
        self._write(ddir / "device", f"0x{device:04x}")
        self._link(self.root / "sys/bus/pci/devices" / bdf, ddir)
        if driver:
            drv = self.root / "sys/bus/pci/drivers" / driver
            drv.mkdir(parents=True, exist_ok=True)
            self._link(ddir / "driver", drv)
        if group is not None:
            gdir = self.root / "sys/kernel/iommu_groups" / str(group)
            (gdir / "devices").mkdir(parents=True, exist_ok=True)
            self._link(ddir / "iommu_group", gdir)
            self._link(gdir / "devices" / bdf, ddir)
        return ddir

    def pci_path(self, bdf: str) -> Path:
        return Path(os.path.realpath(self.root / "sys/bus/pci/devices" / bdf))

    def disk(self, ddir: Path, majmin: str, partitions: dict[str, str] | None = None) -> Path:
        """A disk whose sysfs directory is ``ddir`` (its name is the last part), partitions name -> MAJ:MIN."""
        name = ddir.name
        self._write(ddir / "dev", majmin)
        (ddir / "holders").mkdir(parents=True, exist_ok=True)
        for part, pmm in (partitions or {}).items():
            self._write(ddir / part / "dev", pmm)
            self._write(ddir / part / "partition", "1")
            (ddir / part / "holders").mkdir(parents=True, exist_ok=True)
        self._link(self.root / "sys/block" / name, ddir)
        return ddir

    def dm(self, name: str, majmin: str, dm_name: str, uuid: str, on: list[Path]) -> None:
        """A device-mapper device ``dm-N`` holding the block nodes ``on`` (disk or partition dirs)."""
        ddir = self.root / "sys/devices/virtual/block" / name
        self._write(ddir / "dev", majmin)
        self._write(ddir / "dm/name", dm_name)
        self._write(ddir / "dm/uuid", uuid)
        (ddir / "holders").mkdir(parents=True, exist_ok=True)
        self._link(self.root / "sys/block" / name, ddir)
        for node in on:
            self._link(node / "holders" / name, ddir)

    def nic(self, parent: Path, name: str, *, up: bool, master: str | None = None) -> Path:
        ndir = parent / "net" / name
        self._write(ndir / "flags", "0x1003" if up else "0x1002")
        self._write(ndir / "operstate", "up" if up else "down")
        self._link(self.root / "sys/class/net" / name, ndir)
        if master:
            mdir = self.root / "sys/devices/virtual/net" / master
            self._link(ndir / "master", mdir)
            self._link(ndir / f"upper_{master}", mdir)
        return ndir

    def virtual_nic(self, name: str, *, up: bool) -> None:
        ndir = self.root / "sys/devices/virtual/net" / name
        self._write(ndir / "flags", "0x1003" if up else "0x1002")
        self._link(self.root / "sys/class/net" / name, ndir)

    def mount(self, majmin: str, mountpoint: str, source: str, fstype: str = "ext4") -> None:
        n = len(self.mountinfo) + 20
        self.mountinfo.append(f"{n} 1 {majmin} / {mountpoint} rw,relatime shared:{n} - {fstype} {source} rw")

    def finish(self) -> Path:
        self._write(self.root / "proc/self/mountinfo", "\n".join(self.mountinfo))
        self._write(self.root / "proc/swaps", "\n".join(["Filename\tType\tSize\tUsed\tPriority", *self.swaps]))
        header = "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\tMTU\tWindow\tIRTT"
        self._write(self.root / "proc/net/route", "\n".join([header, *self.routes]))
        self._write(self.root / "proc/net/ipv6_route", "")
        self._write(self.root / "proc/net/if_inet6", "\n".join(self.inet6))
        return self.root


def build_host(root: Path) -> FakeHost:
    """The fixture machine the tests below and test_host_inventory.py share.

    - 00:02.0 virtio disk vda: vda1 is / (mounted as /dev/root), vda2 is an LVM PV for vg-srv at /srv
    - 00:03.0 NIC eth0, up, 192.0.2.2/24, default route
    - 00:04.0 NIC eth1, down
    - 00:05.0 virtio disk vdb: vdb1 is swap
    - 00:06.0 NIC eth2, up without addresses, in bridge br0 which has an address
    - 00:1c.0 PCI bridge, behind it 01:00.0 NVMe (multipath head nvme0n1, mounted at /data)
    - IOMMU group 5: 00:1f.0 ISA bridge (lpc_ich), 00:1f.2 SATA (ahci, sda at /home), 00:1f.3 SMBus (i801_smbus)
    - 02:00.0 NIC bound to vfio-pci, alone in group 7
    """
    h = FakeHost(root)
    g = iter(range(10, 100))
    vda_fn = h.pci("0000:00:02.0", 0x010000, driver="virtio-pci", group=next(g), vendor=0x1AF4, device=0x1042)
    vda = h.disk(vda_fn / "virtio1/block/vda", "254:0", {"vda1": "254:1", "vda2": "254:2"})
    h.dm("dm-0", "253:0", "vg-srv", "LVM-abcdef", on=[vda / "vda2"])
    h.mount("254:1", "/", "/dev/root")
    h.mount("253:0", "/srv", "/dev/mapper/vg-srv")
    h.mount("254:1", "/var/lib/bind\\040mount", "/dev/root")

    eth0_fn = h.pci("0000:00:03.0", 0x020000, driver="virtio-pci", group=next(g), vendor=0x1AF4, device=0x1041)
    h.nic(eth0_fn / "virtio2", "eth0", up=True)
    h.routes.append("eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0")
    h.inet6 += ["fd000000000000000000000000000002 02 40 00 80     eth0",  # global: counts
                "fe8000000000000000fc00fffe000001 02 40 20 80     eth0",  # link-local: every up NIC has one
                "fe8000000000000000fc00fffe000002 03 40 20 80     eth1"]

    eth1_fn = h.pci("0000:00:04.0", 0x020000, driver="e1000e", group=next(g))
    h.nic(eth1_fn, "eth1", up=False)

    vdb_fn = h.pci("0000:00:05.0", 0x010000, driver="virtio-pci", group=next(g), vendor=0x1AF4, device=0x1042)
    h.disk(vdb_fn / "virtio3/block/vdb", "254:16", {"vdb1": "254:17"})
    h.swaps.append("/dev/vdb1\tpartition\t1048572\t0\t-2")

    eth2_fn = h.pci("0000:00:06.0", 0x020000, driver="igb", group=next(g))
    h.virtual_nic("br0", up=True)
    h.nic(eth2_fn, "eth2", up=True, master="br0")

    h.pci("0000:00:1c.0", 0x060400, driver="pcieport", group=next(g))
    nvme_fn = h.pci("0000:01:00.0", 0x010802, driver="nvme", group=next(g), parent="0000:00:1c.0")
    ctrl = nvme_fn / "nvme" / "nvme0"
    ctrl.mkdir(parents=True)
    subsys = h.root / "sys/devices/virtual/nvme-subsystem/nvme-subsys0"
    h._link(subsys / "nvme0", ctrl)
    h.disk(subsys / "nvme0n1", "259:0")  # the multipath head: in the subsystem, not under the PCI function
    h.mount("259:0", "/data", "/dev/nvme0n1", "xfs")

    h.pci("0000:00:1f.0", 0x060100, driver="lpc_ich", group=5)
    sata = h.pci("0000:00:1f.2", 0x010601, driver="ahci", group=5)
    h.disk(sata / "ata1/host0/target0:0:0/0:0:0:0/block/sda", "8:0", {"sda1": "8:1"})
    h.mount("0:45", "/home", "/dev/sda1", "btrfs")  # btrfs: an anonymous MAJ:MIN, only the name matches
    h.pci("0000:00:1f.3", 0x0C0500, driver="i801_smbus", group=5)

    h.pci("0000:02:00.0", 0x020000, driver="vfio-pci", group=7)
    h.finish()
    return h


IPV4 = {"eth0": ["192.0.2.2/24"], "br0": ["10.1.0.1/24"]}


@pytest.fixture
def host(tmp_path: Path) -> HostUse:
    build_host(tmp_path)
    return HostUse(tmp_path, ipv4=IPV4)


def test_root_disk_mount_and_lvm_holder(host):
    used = host.pci_usages("0000:00:02.0")
    assert Usage("mount", "/ (vda1)") in used
    assert used[0] == Usage("mount", "/ (vda1)")  # "/" comes first
    assert Usage("mount", "/var/lib/bind mount (vda1)") in used  # \040 in mountinfo is a space
    assert Usage("holder", "LVM vg-srv on vda2") in used
    assert Usage("mount", "/srv (vg-srv on vda2)") in used


def test_nic_up_with_default_route(host):
    assert host.pci_usages("00:03.0") == [Usage("net", "eth0 is up with 192.0.2.2/24, fd00::2/64"),
                                         Usage("route", "default route via eth0")]


def test_nic_down_is_not_used(host):
    assert host.pci_usages("00:04.0") == []


def test_swap_disk(host):
    assert host.pci_usages("00:05.0") == [Usage("swap", "vdb1")]


def test_bridge_port_with_address_on_the_bridge(host):
    assert host.pci_usages("00:06.0") == [Usage("net", "br0 over eth2 is up with 10.1.0.1/24")]


def test_nvme_multipath_head_found_through_controller_and_behind_bridge(host):
    assert host.pci_usages("01:00.0") == [Usage("mount", "/data (nvme0n1)")]
    # The bridge carries everything behind it.
    assert host.pci_usages("00:1c.0") == [Usage("mount", "/data (nvme0n1)")]


def test_btrfs_mount_matched_by_name(host):
    assert host.pci_usages("00:1f.2") == [Usage("mount", "/home (sda1)")]


def test_vfio_bound_device_is_not_host_used(host, tmp_path):
    assert host.pci_usages("pci_0000_02_00_0") == []
    assert Sysfs(tmp_path).pci_driver(parse_bdf("02:00.0")) == "vfio-pci"
    assert group_endpoints_in_host_use("02:00.0", tmp_path) == []


def test_multi_member_iommu_group(host, tmp_path):
    members = host.group_members("00:1f.3")
    assert [str(m.bdf) for m in members] == ["0000:00:1f.0", "0000:00:1f.2", "0000:00:1f.3"]
    assert [m.driver for m in members] == ["lpc_ich", "ahci", "i801_smbus"]
    others = group_endpoints_in_host_use("00:1f.3", tmp_path)
    assert [str(m.bdf) for m in others] == ["0000:00:1f.0", "0000:00:1f.2"]
    assert others[1].usages == (Usage("mount", "/home (sda1)"),)
    assert Sysfs(tmp_path).iommu_group(parse_bdf("00:1f.2")) == 5


def test_is_bridge(tmp_path):
    build_host(tmp_path)
    assert is_bridge("00:1c.0", tmp_path)
    assert not is_bridge("00:1f.0", tmp_path)  # an ISA bridge is not a PCI-to-PCI bridge
    assert not is_bridge("01:00.0", tmp_path)


def test_iommu_present_missing_and_empty(tmp_path):
    build_host(tmp_path / "a")
    assert iommu_status(tmp_path / "a").present and iommu_status(tmp_path / "a").groups == 9
    (tmp_path / "b/sys/kernel/iommu_groups").mkdir(parents=True)
    for root in (tmp_path / "b", tmp_path / "c"):  # empty, missing
        status = iommu_status(root)
        assert not status.present and "intel_iommu=on" in status.hint and "amd_iommu=on" in status.hint


def test_unknown_device_and_bad_address(host):
    with pytest.raises(errors.DeviceNotFound):
        host.pci_usages("00:1e.0")
    with pytest.raises(errors.InvalidRequest):
        pci_host_usages("not-a-bdf")


def test_up_nic_with_unreadable_ipv4_counts_as_used(tmp_path, monkeypatch):
    h = FakeHost(tmp_path)
    fn = h.pci("0000:00:03.0", 0x020000, driver="e1000e")
    h.nic(fn, "eth0", up=True)
    h.finish()
    use = HostUse(tmp_path)
    monkeypatch.setattr(use.sysfs.__class__, "is_live_host", property(lambda self: True))
    monkeypatch.setattr("vhotplug.host.usage._ip_addr_v4", lambda: None)
    assert [u.kind for u in use.pci_usages("00:03.0")] == ["net"]


# -- the real host (read-only) ----------------------------------------------------------------------------


def _pci_function_of(sys_path: str) -> str | None:
    """The last PCI function in a resolved sysfs path, following block ``slaves`` for dm/md."""
    real = os.path.realpath(sys_path)
    found = [p for p in real.split("/") if _BDF.fullmatch(p)]
    if found:
        return found[-1]
    slaves = Path(real) / "slaves"
    if not slaves.is_dir():
        slaves = Path(real).parent / "slaves"
    for slave in sorted(slaves.iterdir()) if slaves.is_dir() else []:
        if bdf := _pci_function_of(str(slave)):
            return bdf
    return None


def root_fs_pci_function() -> str | None:
    st = os.stat("/")
    return _pci_function_of(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}")


def default_route_iface() -> str | None:
    try:
        lines = Path("/proc/net/route").read_text().splitlines()[1:]
    except OSError:
        return None
    return next((f[0] for f in map(str.split, lines) if f[1] == "00000000" and f[7] == "00000000"), None)


def test_real_host_root_filesystem_device_is_used():
    bdf = root_fs_pci_function()
    if bdf is None:
        pytest.skip("/ is not on a PCI block device here")
    used = HostUse("/").pci_usages(bdf)
    assert any(u.kind == "mount" and u.detail.startswith("/ (") for u in used), used


def test_real_host_default_route_nic_is_used():
    iface = default_route_iface()
    bdf = _pci_function_of(f"/sys/class/net/{iface}") if iface else None
    if bdf is None:
        pytest.skip("no default route through a PCI NIC here")
    used = HostUse("/").pci_usages(bdf)
    assert Usage("route", f"default route via {iface}") in used


# -- the domain side ------------------------------------------------------------------------------------------

DOMAIN_XML = """<domain type='kvm'><name>g1</name><devices>
  <hostdev mode='subsystem' type='pci' managed='yes'>
    <source><address domain='0x0000' bus='0x02' slot='0x00' function='0x0'/></source>
  </hostdev>
  <interface type='hostdev' managed='yes'>
    <source><address type='pci' domain='0x0000' bus='0x03' slot='0x10' function='0x1'/></source>
  </interface>
  <hostdev mode='subsystem' type='usb'>
    <source><vendor id='0x0781'/><product id='0x5567'/></source>
  </hostdev>
  <hostdev mode='subsystem' type='usb'>
    <source><address bus='2' device='7'/></source>
  </hostdev>
  <hostdev mode='subsystem' type='usb'>
    <source><vendor id='0x046d'/><product id='0xc52b'/><address bus='1' device='3'/></source>
  </hostdev>
  <hostdev mode='capabilities' type='storage'><source><block>/dev/sdz</block></source></hostdev>
</devices></domain>"""


def test_domain_assignments_from_xml():
    found = assignments_from_xml("g1", DOMAIN_XML, "live")
    assert [(a.kind, str(a.bdf) if a.bdf else None) for a in found] == [
        ("pci", "0000:02:00.0"), ("pci", "0000:03:10.1"), ("usb", None), ("usb", None), ("usb", None)]
    assert assignments_from_xml("x", "<not xml", "live") == []


def test_domain_usages_match_pci_and_usb():
    found = [*assignments_from_xml("g1", DOMAIN_XML, "live"), *assignments_from_xml("g1", DOMAIN_XML, "config"),
             *assignments_from_xml("g2", DOMAIN_XML, "config")]
    assert domain_usages(found, bdf=parse_bdf("02:00.0")) == [Usage("domain", "g1 (config, live)"),
                                                             Usage("domain", "g2 (config)")]
    assert domain_usages(found, bdf=parse_bdf("03:10.1"))[0].detail == "g1 (config, live)"
    assert domain_usages(found, bdf=parse_bdf("03:10.0")) == []
    # USB by ids matches any bus/device; by address any ids; both must agree when both are given.
    assert len(domain_usages(found, usb=(0x0781, 0x5567, 5, 9))) == 2
    assert len(domain_usages(found, usb=(0x1234, 0x5678, 2, 7))) == 2
    assert len(domain_usages(found, usb=(0x046D, 0xC52B, 1, 3))) == 2
    assert domain_usages(found, usb=(0x046D, 0xC52B, 1, 4)) == []
    assert not Usage("domain", "g1").by_host and Usage("swap", "vdb1").by_host


# -- a VM whose root is its hypervisor's tree over virtio-9p (the nested lab's L1) -----------------------------


def _with_9p(root: Path, *, root_fs: str, extra_mount: str | None = None) -> HostUse:
    h = FakeHost(root)
    fn = h.pci("0000:01:00.0", 0x000200, driver="virtio-pci", group=7, vendor=0x1AF4, device=0x1049)
    h._write(fn / "virtio1" / "mount_tag", "hostroot\x00")
    h.mountinfo.append(f"28 1 0:23 / / rw,relatime - {root_fs} {root_fs} rw,lowerdir=/lower")
    if extra_mount:
        h.mountinfo.append(f"40 28 0:40 / {extra_mount} ro,relatime - 9p hostroot ro,trans=virtio")
    h.finish()
    return HostUse(root, ipv4={})


def test_9p_root_share_counts_as_used(tmp_path):
    assert _with_9p(tmp_path / "a", root_fs="overlay").pci_usages("01:00.0") == [
        Usage("mount", "/ (overlay root, possibly on 9p hostroot)")]
    assert _with_9p(tmp_path / "b", root_fs="ext4", extra_mount="/mnt/host").pci_usages("01:00.0") == [
        Usage("mount", "/mnt/host (9p hostroot)")]
    assert _with_9p(tmp_path / "c", root_fs="ext4").pci_usages("01:00.0") == []  # a share nobody mounted
