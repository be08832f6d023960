"""The guest probe: parsing its output, and the script run by each guest shell (busybox sh, dash, bash) on a
guest-like tree (and on the lab in tests/lab)."""

from __future__ import annotations

import subprocess

import pytest

from tests.unit.test_watch import SHELLS, FakeSys, login_shell
from vhotplug.guest.probe import PROBE_SCRIPT, parse_cpu_list, parse_probe

SAMPLE = """\
[pci]
0000:00:00.0 0x8086 0x29c0 0x060000 -
0000:01:00.0 0x1af4 0x1041 0x020000 virtio-pci
[net]
eth0 52:54:00:aa:bb:01 up virtio_net virtio0
[block]
vda 2097152 0 vh-data
sr0 0 1 -
[cpu]
online 0-1,3
present 0-3
possible 0-3
[memory]
memtotal_kib 481234
block_size 0x8000000
blocks_online 4
blocks_offline 1
"""


def test_parse_probe():
    v = parse_probe(SAMPLE)
    assert [p.vendor_device for p in v.pci] == ["8086:29c0", "1af4:1041"]
    assert v.pci[1].driver == "virtio-pci" and v.pci[0].driver == "-"
    assert v.net[0].mac == "52:54:00:aa:bb:01" and v.net[0].driver == "virtio_net"
    assert v.block[0].size_bytes == 1 << 30 and v.block[0].serial == "vh-data" and v.block[1].readonly
    assert v.online_cpu_count == 3 and v.cpus_present == "0-3"
    assert v.memtotal_kib == 481234 and v.memory_block_bytes == 128 << 20
    assert (v.memory_blocks_online, v.memory_blocks_offline) == (4, 1)


def test_parse_probe_tolerates_missing_sections():
    v = parse_probe("[cpu]\nonline 0\n")
    assert v.pci == [] and v.online_cpu_count == 1 and v.memtotal_kib == 0


def test_cpu_list():
    assert parse_cpu_list("0-2,5,7-8") == [0, 1, 2, 5, 7, 8]
    assert parse_cpu_list("") == []


# -- the script itself, run by busybox sh against a guest-like tree ----------------------------------------


@pytest.mark.parametrize("shell", list(SHELLS))
def test_probe_script_reads_a_guest_tree(tmp_path, shell):
    """The script's own output, parsed: PCI functions with their drivers, interfaces, disks with serials from
    virtio-blk, SCSI VPD and USB, CPUs and memory blocks. An empty /sys/block glob yields no bogus disk."""
    root = tmp_path / "guest root $(x) ;'"  # quoted, never pasted: the path has shell syntax in it
    fake = FakeSys(root)
    try:
        assert parse_probe(run_probe(root, shell)).block == []
        func = fake.add_pci("0000:01:00.0", "8086:100e", driver="e1000")
        fake.add_netdev(func, "eth1")
        (root / "sys/class/net/eth1/address").write_text("52:54:00:12:34:56\n")
        (root / "sys/class/net/eth1/operstate").write_text("up\n")
        fake.add_virtio_disk("vda", "vh-d1")
        fake.add_scsi_disk("sda", "vh d2 ")  # a space inside (one word for the parser) and one trailing
        fake.add_usb_disk("sdb", "vh-d3")
        for name in ("vda", "sda", "sdb"):
            (root / "sys/block" / name / "size").write_text("32768\n")
            (root / "sys/block" / name / "ro").write_text("0\n")
        cpu = root / "sys/devices/system/cpu"
        cpu.mkdir(parents=True)
        for f, v in (("online", "0-1"), ("present", "0-3"), ("possible", "0-3")):
            (cpu / f).write_text(f"{v}\n")
        mem = root / "sys/devices/system/memory"
        for i, state in enumerate(("online", "online", "offline")):
            (mem / f"memory{i}").mkdir(parents=True)
            (mem / f"memory{i}/state").write_text(f"{state}\n")
        (mem / "block_size_bytes").write_text("8000000\n")
        (root / "proc/meminfo").write_text("MemTotal:        1001 kB\nMemFree:  5 kB\n")
        view = parse_probe(run_probe(root, shell))
    finally:
        fake.stop()
    assert [(p.address, p.vendor_device, p.driver) for p in view.pci] == [("0000:01:00.0", "8086:100e", "e1000")]
    assert [(n.name, n.mac, n.state, n.driver, n.pci_address) for n in view.net] == [
        ("eth1", "52:54:00:12:34:56", "up", "e1000", "0000:01:00.0")]
    assert {(b.name, b.size_bytes, b.serial) for b in view.block} == {
        ("vda", 32768 * 512, "vh-d1"), ("sda", 32768 * 512, "vh_d2"), ("sdb", 32768 * 512, "vh-d3")}
    assert (view.cpus_online, view.cpus_present, view.memtotal_kib) == ("0-1", "0-3", 1001)
    assert (view.memory_block_bytes, view.memory_blocks_online, view.memory_blocks_offline) == (0x8000000, 2, 1)


def run_probe(root, shell: str = "busybox") -> str:
    done = subprocess.run([*login_shell(shell), "-c", PROBE_SCRIPT, "sh", str(root)], capture_output=True, text=True,
                          timeout=30, check=False)
    # To its last line: dash once stopped at a bash-only ${s// /_} ("Bad substitution") and lost the rest.
    assert done.returncode == 0 and "blocks_offline" in done.stdout, done.stderr
    return done.stdout
