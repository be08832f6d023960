"""The guest's own view of its hardware, read from sysfs/procfs in one round trip.

This is the seed's in-guest check (``lspci -k``, ``ip link``, ``fdisk -l``,
``ls /sys/devices/system/cpu``) as data. The script is fixed text owned by
vhotplug and only needs busybox.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from vhotplug.guest.ssh import GuestSession

PROBE_SCRIPT = r"""
r() { cat "$1" 2>/dev/null | tr -d '\n' ; }
lnk() { if [ -L "$1" ]; then l=$(readlink "$1"); echo "${l##*/}"; else echo -; fi; }
echo '[pci]'
for d in /sys/bus/pci/devices/*; do
  [ -e "$d/vendor" ] || continue
  echo "${d##*/} $(r $d/vendor) $(r $d/device) $(r $d/class) $(lnk $d/driver)"
done
echo '[net]'
for n in /sys/class/net/*; do
  [ -e "$n/address" ] || continue
  [ "${n##*/}" = lo ] && continue
  echo "${n##*/} $(r $n/address) $(r $n/operstate) $(lnk $n/device/driver) $(lnk $n/device)"
done
# The disk's serial sits at the nearest level above the block device that has one (the
# rule guest/watch.py matches by): virtio-blk "serial", SCSI "vpd_pg80" (4-byte header,
# then the serial), USB mass storage "serial" on its USB device.
serial_of() {
  d=$(readlink -f "$1"); s=
  while [ -n "$d" ] && [ "$d" != /sys/devices ]; do
    if [ -f "$d/serial" ]; then s=$(r "$d/serial"); break; fi
    if [ -f "$d/vpd_pg80" ]; then s=$(tail -c +5 "$d/vpd_pg80" | tr -cd '\040-\176'); s=${s%"${s##*[! ]}"}; break; fi
    d=${d%/*}
  done
  [ -n "$s" ] || s=-
}
echo '[block]'
for b in /sys/block/*; do
  case "${b##*/}" in loop*|ram*|zram*) continue ;; esac
  serial_of "$b"
  echo "${b##*/} $(r $b/size) $(r $b/ro) $(echo "$s" | tr ' ' '_')"
done
echo '[cpu]'
echo "online $(r /sys/devices/system/cpu/online)"
echo "present $(r /sys/devices/system/cpu/present)"
echo "possible $(r /sys/devices/system/cpu/possible)"
echo '[memory]'
echo "memtotal_kib $(awk '/^MemTotal:/ {print $2}' /proc/meminfo)"
echo "block_size 0x$(r /sys/devices/system/memory/block_size_bytes)"
on=0; off=0
for m in /sys/devices/system/memory/memory*/state; do
  case "$(r $m)" in online) on=$((on+1)) ;; offline) off=$((off+1)) ;; esac
done
echo "blocks_online $on"
echo "blocks_offline $off"
"""


@dataclass(frozen=True)
class PciFunction:
    address: str  # guest PCI address, 0000:01:00.0
    vendor_device: str  # 8086:100e
    pci_class: str  # 0x020000
    driver: str  # bound driver or "-"


@dataclass(frozen=True)
class NetInterface:
    name: str
    mac: str
    state: str
    driver: str
    pci_address: str  # the underlying device (PCI address, or virtio bus name)


@dataclass(frozen=True)
class BlockDevice:
    name: str
    size_bytes: int
    readonly: bool
    serial: str


@dataclass
class GuestView:
    pci: list[PciFunction] = field(default_factory=list)
    net: list[NetInterface] = field(default_factory=list)
    block: list[BlockDevice] = field(default_factory=list)
    cpus_online: str = ""
    cpus_present: str = ""
    cpus_possible: str = ""
    memtotal_kib: int = 0
    memory_block_bytes: int = 0
    memory_blocks_online: int = 0
    memory_blocks_offline: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def online_cpu_count(self) -> int:
        return len(parse_cpu_list(self.cpus_online))


def parse_cpu_list(text: str) -> list[int]:
    """Expand the kernel's CPU list format (``0-2,5``) into numbers."""
    cpus: list[int] = []
    for part in filter(None, text.strip().split(",")):
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return cpus


def _strip_hex(value: str) -> str:
    return value[2:] if value.startswith("0x") else value


def parse_probe(output: str) -> GuestView:
    """Parse the probe script's output; tolerant of missing sections."""
    view = GuestView()
    section = ""
    for raw in output.splitlines():
        line = raw.strip()
        if not line:
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        f = line.split()
        if section == "pci" and len(f) >= 5:
            view.pci.append(PciFunction(f[0], f"{_strip_hex(f[1])}:{_strip_hex(f[2])}", f[3], f[4]))
        elif section == "net" and len(f) >= 5:
            view.net.append(NetInterface(f[0], f[1], f[2], f[3], f[4]))
        elif section == "block" and len(f) >= 4:
            view.block.append(BlockDevice(f[0], int(f[1]) * 512, f[2] == "1", f[3]))
        elif section == "cpu" and f[0] in ("online", "present", "possible"):
            setattr(view, f"cpus_{f[0]}", f[1] if len(f) > 1 else "")
        elif section == "memory" and len(f) == 2:
            key, value = f
            if key == "memtotal_kib" and value.isdigit():
                view.memtotal_kib = int(value)
            elif key == "block_size" and value != "0x":
                view.memory_block_bytes = int(value, 16)
            elif key == "blocks_online":
                view.memory_blocks_online = int(value)
            elif key == "blocks_offline":
                view.memory_blocks_offline = int(value)
    return view


#: The probe reads a few hundred sysfs files with a fork or two each: ~1 s on the lab guest, but about a
#: minute in the nested lab's L2 (TCG inside TCG).
PROBE_TIMEOUT = 180.0


def guest_view(session: GuestSession) -> GuestView:
    """Run the probe in the guest and parse what it saw."""
    return parse_probe(session.run_script(PROBE_SCRIPT, timeout=PROBE_TIMEOUT).stdout)
