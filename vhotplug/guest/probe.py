"""The guest's own view of its hardware, read from sysfs/procfs in one round trip.

This is the seed's in-guest check (``lspci -k``, ``ip link``, ``fdisk -l``,
``ls /sys/devices/system/cpu``) as data. The script is fixed text owned by
vhotplug and only needs a POSIX sh (dash, bash or busybox) with ``tail`` and ``tr``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from vhotplug.guest import shell
from vhotplug.guest.ssh import GuestSession

PROBE_SCRIPT = shell.script(r"""
R=${1:-}
# Shell builtins only where it repeats (read, cd -P, parameter expansion): every fork costs, and under
# nested TCG one costs ~50 ms, which made this script take a minute there.
r() { v=; read -r v 2>/dev/null < "$1"; }
lnk() { v=-; [ -L "$1" ] && cd -P "$1" 2>/dev/null && { v=${PWD##*/}; cd /; }; }
echo '[pci]'
for d in "$R"/sys/bus/pci/devices/*; do
  [ -e "$d/vendor" ] || continue
  r "$d/vendor"; ven=$v; r "$d/device"; dev=$v; r "$d/class"; cls=$v; lnk "$d/driver"
  echo "${d##*/} $ven $dev $cls $v"
done
echo '[net]'
for n in "$R"/sys/class/net/*; do
  [ -e "$n/address" ] || continue
  [ "${n##*/}" = lo ] && continue
  r "$n/address"; mac=$v; r "$n/operstate"; st=$v; lnk "$n/device/driver"; drv=$v; lnk "$n/device"
  echo "${n##*/} $mac $st $drv $v"
done
# The disk's serial sits at the nearest level above the block device that has one (the
# rule guest/watch.py matches by): virtio-blk "serial", SCSI "vpd_pg80" (4-byte header,
# then the serial), USB mass storage "serial" on its USB device.
serial_of() {
  s=
  cd -P "$1" 2>/dev/null || { s=-; return; }
  d=$PWD; cd /
  while [ -n "$d" ] && [ "$d" != "$R/sys/devices" ]; do
    if [ -f "$d/serial" ]; then r "$d/serial"; s=$v; break; fi
    if [ -f "$d/vpd_pg80" ]; then s=$(tail -c +5 "$d/vpd_pg80" | tr -cd '\040-\176'); s=${s%"${s##*[! ]}"}; break; fi
    d=${d%/*}
  done
  [ -n "$s" ] || s=-
}
# under S: u=S with each space made an underscore (one word for the parser; bash-only substitution stops dash).
under() {
  u= t=$1
  while :; do
    case $t in *' '*) u=$u${t%%' '*}_ t=${t#*' '} ;; *) u=$u$t; return ;; esac
  done
}
echo '[block]'
for b in "$R"/sys/block/*; do
  [ -e "$b" ] || continue
  case "${b##*/}" in loop*|ram*|zram*) continue ;; esac
  serial_of "$b"
  r "$b/size"; size=$v; r "$b/ro"; under "$s"
  echo "${b##*/} $size $v $u"
done
echo '[cpu]'
r "$R/sys/devices/system/cpu/online"; echo "online $v"
r "$R/sys/devices/system/cpu/present"; echo "present $v"
r "$R/sys/devices/system/cpu/possible"; echo "possible $v"
echo '[memory]'
mt=
while read -r k val _; do [ "$k" = MemTotal: ] && { mt=$val; break; }; done < "$R/proc/meminfo"
echo "memtotal_kib $mt"
r "$R/sys/devices/system/memory/block_size_bytes"; echo "block_size 0x$v"
on=0; off=0
for m in "$R"/sys/devices/system/memory/memory*/state; do
  r "$m"
  case "$v" in online) on=$((on+1)) ;; offline) off=$((off+1)) ;; esac
done
echo "blocks_online $on"
echo "blocks_offline $off"
""")


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
    # Through sh -c: the same POSIX shell whatever the user's login shell is.
    return parse_probe(session.run_script(shell.sh_command(PROBE_SCRIPT), timeout=PROBE_TIMEOUT).stdout)
