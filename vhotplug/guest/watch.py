"""Watch, inside the guest, for a device to show up or go away: by MAC, disk serial or name, PCI or USB ids.

The caller starts a watch *before* it asks libvirt to act (like registering for an
event), then acts, then collects the result::

    with start_watch(session, Identity("nic", mac), present=True, timeout=30) as watch:
        dom.attachDeviceFlags(xml, flags)
        seen = watch.result()

The watcher is one fixed POSIX sh script (``WATCH_SCRIPT``: dash, bash, busybox) run on its own channel of
the session's existing SSH connection. The identity reaches it as a positional argument
(``sh -c SCRIPT sh ARGS``, quoted with ``shlex.join``), never pasted into script text. It
prints ``start`` right after its first look at sysfs (so a change made once ``start_watch``
has returned cannot be missed), polls every ~20 ms with shell builtins, and prints one
``found``/``timeout`` line. Times come from the guest's /proc/uptime.

A NIC is reported by its final name: where udev runs, it renames a new interface a moment after it
appears (``eth0`` -> ``enp8s0``), so the watcher follows the MAC until udev is done with it (see
``RENAME_GRACE``; ``renamed_from=`` says the first name). A guest without udev waits for nothing.

What identifies a disk, as seen on the lab guest (QEMU 7.2, libvirt 9, Debian 6.1 kernel):
virtio-blk has ``/sys/block/vdX/serial``; a SCSI disk (virtio-scsi) has no serial file, only
``vpd_pg80`` on its scsi_device (4-byte header, then the serial); a USB disk (usb-storage)
has no VPD page, and libvirt's ``<serial>`` shows up as ``serial`` on the USB device
directory (``.../usb2/2-1/serial``). The watcher walks up from the block device and lets
the nearest level that has either file decide.

PCI functions (``Identity("pci", "8086:100e")``) and USB devices (``Identity("usb",
"46f4:0001")``) are known by vendor:device ids, which the guest may already show for other
devices (every modern virtio-net function is 1af4:1041; the lab's management NIC, on pcie.0,
is transitional 1af4:1000). So the watcher records the
matching devices at its first look (``Watch.initial``, comma-separated) and only counts
changes against that set: "present" is a *new* match (a PCI function with a driver bound;
a USB device, preferably with an interface driver bound), "absent" is one of the initial
matches gone (``was=``). A new network-class function is reported once its interface
shows (``net=``), a new virtio-blk function once its disk shows (``block=``), a new USB device
once an interface driver is bound, each at most
``BIND_GRACE`` later (then without it: a device the guest has no driver for).
"""

from __future__ import annotations

import contextlib
import re
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal

from vhotplug import errors
from vhotplug.guest import shell
from vhotplug.guest.ssh import GuestSession, ssh_errors

Kind = Literal["nic", "disk", "blockdev", "pci", "usb"]

MAC_RE = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
SERIAL_RE = re.compile(r"[A-Za-z0-9_.-]{1,20}")
IDS_RE = re.compile(r"[0-9a-f]{4}:[0-9a-f]{4}")
# A disk known by its kernel name (Xen's blkfront names it after the target: xvdb).
BLOCKDEV_RE = re.compile(r"[a-z]{2,4}[a-z]{1,3}")

#: Longest watch accepted; a guest-side loop should never outlive a test run by accident.
MAX_TIMEOUT = 3600.0
#: How long the watcher may take to print ``start`` (exec over SSH on a slow TCG guest).
START_TIMEOUT = 30.0
#: Extra host-side patience after the guest's own deadline, for the last line to arrive.
RESULT_GRACE = 10.0
#: How long to wait for the SSH server to report the watcher's exit before closing its channel.
CLOSE_WAIT = 5.0
#: Guest seconds a new PCI NIC may take to show its interface, or a new USB device to get an
#: interface driver, once it is otherwise there; after that it is reported without them.
BIND_GRACE = 2.0
#: Where udev runs, it renames a new interface a moment after it appears (eth0 -> enp8s0): the name is
#: followed until udev is done with the device, or (udev keeping no database entry for it) has held this long
#: with udev's queue empty, for at most RENAME_GRACE guest seconds. A guest without udev waits for nothing.
RENAME_SETTLE = 0.2
RENAME_GRACE = 2.0

# Positional arguments: $1 kind (nic|disk|pci|usb), $2 MAC, serial or VVVV:PPPP ids,
# $3 1=present 0=absent, $4 deadline in centiseconds of guest uptime from start, $5 a
# directory standing in for / ("" in a real guest; the unit tests point it at a fake sysfs), $6 (optional,
# pci/usb) the devices that matched at an earlier watcher's first look, comma-separated: a watch resumed
# after a lost SSH connection counts changes against those, not against what it finds now.
#
# Every step inside the loop is a builtin (read, [, case, cd -P, arithmetic) except the
# ~20 ms nap (usleep, or sleep 0.02 where there is none), so one poll stays cheap even under TCG.
# ``cd -P DIR; $PWD`` replaces ``readlink -f`` for the same reason. POSIX sh only (dash, bash, busybox).
WATCH_SCRIPT = shell.script(r"""
export LC_ALL=C
kind=$1 want=$2 present=$3 limit=$4 R=$5 grace=@GRACE@
settle_cs=@SETTLE@ rename_cs=@RENAME@
top=$R/sys/devices
# /proc/uptime is "SECONDS.CC": centiseconds without octal surprises from a leading 0.
tick() { read -r up _ 2>/dev/null < "$R/proc/uptime"; cs=$(( ${up%.*} * 100 + 1${up#*.} - 100 )); }
# The byte that precedes a serial of our length in a SCSI VPD page 0x80 (its length byte);
# the trailing x survives command substitution when that byte is a newline.
lenc=
[ "$kind" = disk ] && { lenc=$(printf "\\$(printf %o ${#want})x"); lenc=${lenc%x}; }

# whence DIR: nearest PCI function and USB device above a physical sysfs path.
whence() {
  d=$1 pci= usb=
  while [ -n "$d" ] && [ "$d" != "$top" ]; do
    b=${d##*/}
    case $b in
      *:*:*.[0-7]) [ -z "$pci" ] && pci=$b ;;
      usb[0-9]*|*:*) ;;
      [0-9]*-[0-9]*) [ -z "$usb" ] && usb=$b ;;
    esac
    d=${d%/*}
  done
  extra=
  [ -n "$pci" ] && extra="$extra pci=$pci"
  [ -n "$usb" ] && extra="$extra usb=$usb"
}

# drvof PATH: basename of the driver link, or -.
drvof() { drv=-; if cd -P "$1" 2>/dev/null; then drv=${PWD##*/}; fi; }

# nic_scan: name=interface carrying MAC $want ("" if none); bound=1 when its driver is bound.
nic_scan() {
  name= bound=0
  for n in "$R"/sys/class/net/*; do
    a=
    read -r a 2>/dev/null < "$n/address"
    if [ "$a" = "$want" ]; then
      name=${n##*/}
      [ -e "$n/device/driver" ] && bound=1
      return 0
    fi
  done
}

# serial_at DIR: ok=1 when the identity level at or above DIR carries serial $want.
# The nearest level with a serial file decides: virtio-blk has block/vdX/serial,
# SCSI has vpd_pg80 on the scsi_device, USB mass storage has serial on the USB device.
serial_at() {
  d=$1 ok=0
  while [ -n "$d" ] && [ "$d" != "$top" ]; do
    if [ -f "$d/serial" ]; then
      s=
      read -r s 2>/dev/null < "$d/serial"
      [ "$s" = "$want" ] && ok=1
      return
    fi
    if [ -f "$d/vpd_pg80" ]; then
      # 4-byte header (type, 0x80, length hi, length lo) then the serial. read drops
      # NUL bytes; joining lines keeps a newline length byte. The page matches when it
      # ends with our length byte followed by our serial: serial bytes are printable,
      # so that pair can only be the header's end.
      v= l= nl='
'
      while IFS= read -r l || [ -n "$l" ]; do v="$v$l$nl"; l=; done 2>/dev/null < "$d/vpd_pg80"
      v=${v%"$nl"}
      case $v in *"$lenc$want") ok=1 ;; esac
      return
    fi
    d=${d%/*}
  done
}

# disk_scan: name=block device whose serial is $want ("" if none), dev=its physical path.
disk_scan() {
  name=
  for b in "$R"/sys/block/*; do
    case ${b##*/} in loop*|ram*|zram*|'*') continue ;; esac
    cd -P "$b" 2>/dev/null || continue
    dev=$PWD
    serial_at "$dev"
    if [ "$ok" = 1 ]; then name=${b##*/}; return 0; fi
  done
}

# pci/usb: the ids as sysfs prints them (PCI "0x8086", USB "46f4").
wv=${want%:*} wp=${want#*:}
[ "$kind" = pci ] && { wv=0x$wv wp=0x$wp; }
bus=$R/sys/bus/$kind/devices

# ids_scan: cur=" NAME NAME " (space-delimited) of the devices on $bus with ids $want.
ids_scan() {
  cur=' '
  if [ "$kind" = pci ]; then vf=vendor pf=device; else vf=idVendor pf=idProduct; fi
  for d in "$bus"/*; do
    [ "$kind" = usb ] && case ${d##*/} in *:*) continue ;; esac  # an interface (2-1:1.0)
    v=
    read -r v 2>/dev/null < "$d/$vf"
    [ "$v" = "$wv" ] || continue
    v=
    read -r v 2>/dev/null < "$d/$pf"
    [ "$v" = "$wp" ] && cur="$cur${d##*/} "
  done
}

# commas LIST: lst=the words of LIST joined by commas.
commas() { lst=; for b in $1; do lst=${lst:+$lst,}$b; done; }

# waiting NAME: true for the first $grace cs since NAME was first seen waiting.
waiting() {
  [ "$wb" = "$1" ] || { wb=$1 wcs=$cs; }
  [ $((cs - wcs)) -lt "$grace" ]
}

# firstof GLOB...: hit=name of the first existing path among the words ("" if none).
firstof() { hit=; for k in "$@"; do [ -e "$k" ] && { hit=${k##*/}; return; }; done; }

# nic_nn / pci_nn: nn=the current name of the interface found (by its MAC / under the new function).
nic_nn() { nic_scan; nn=$name; }
pci_nn() { firstof "$bus/$name"/net/* "$bus/$name"/virtio*/net/*; nn=$hit; }

# settle FUNC: nn=the interface's final name. With udev running (its control socket), follow the name
# with FUNC until udev's database has the interface (udev renames before it writes that entry) or, for a
# udev that keeps none, until the name has held $settle_cs with udev's queue empty; at most $rename_cs.
# Without udev (the lab guest: no rename comes) it returns at once: no extra poll. ren=" renamed_from=OLD".
settle() {
  ren= orig=$nn
  [ -e "$R/run/udev/control" ] || return 0
  s0=$cs since=$cs prev=$nn
  while :; do
    ix=
    read -r ix 2>/dev/null < "$R/sys/class/net/$nn/ifindex"
    [ -n "$ix" ] && [ -e "$R/run/udev/data/n$ix" ] && break
    [ $((cs - since)) -ge "$settle_cs" ] && [ ! -e "$R/run/udev/queue" ] && break
    [ $((cs - s0)) -ge "$rename_cs" ] && break
    nap 20000 0.02
    tick
    polls=$((polls + 1))
    "$1"
    [ -n "$nn" ] || nn=$prev  # between the old name and the new one: keep the last seen
    [ "$nn" = "$prev" ] || { prev=$nn since=$cs; }
  done
  [ "$nn" = "$orig" ] || ren=" renamed_from=$orig"
}

# ids_new: name=first device in $cur but not in $init that is ready (drv, and for pci net,
# blk; for usb busdev set); last/need say what keeps a new one from being ready.
ids_new() {
  name= last= need=
  for b in $cur; do
    case $init in *" $b "*) continue ;; esac
    d=$bus/$b
    if [ "$kind" = pci ]; then
      [ -e "$d/driver" ] || { last=$b need=driver; continue; }
      firstof "$d"/net/* "$d"/virtio*/net/*
      net=$hit
      drvof "$d/driver"
      firstof "$d"/block/* "$d"/virtio*/block/*
      blk=$hit
      c=
      read -r c 2>/dev/null < "$d/class"
      if [ -z "$net" ]; then
        case $c in 0x02*) waiting "$b" && { last=$b need=net; continue; } ;; esac
      fi
      # virtio-blk: virtio-pci binds first, the disk follows (seen on the lab: reported without it).
      # Other storage controllers (AHCI) have their disks further down, found by the guest later.
      if [ -z "$blk" ] && [ "$drv" = virtio-pci ]; then
        case $c in 0x01*) waiting "$b" && { last=$b need=block; continue; } ;; esac
      fi
    else
      drv=
      for i in "$d"/*:*/driver; do [ -e "$i" ] && { drvof "$i"; break; }; done
      if [ -z "$drv" ]; then
        waiting "$b" && { last=$b need=driver; continue; }
        drv=usb
      fi
      bn=? dn=?
      read -r bn 2>/dev/null < "$d/busnum"
      read -r dn 2>/dev/null < "$d/devnum"
    fi
    name=$b
    return 0
  done
}

polls=0 last= need=
while :; do
  tick
  case $kind in
    nic) nic_scan ;;
    disk) disk_scan ;;
    blockdev) name=; cd -P "$R/sys/block/$want" 2>/dev/null && { name=$want; dev=$PWD; } ;;
    *) ids_scan ;;
  esac
  [ -n "$name" ] && last=$name
  # "start" follows the first look, so once the host has read it the initial state is on
  # record: a change the host causes afterwards cannot slip in before the watcher looked.
  if [ "$polls" = 0 ]; then
    end=$((cs + limit))
    first=$name
    if [ -n "$6" ]; then  # a resumed watch: the devices matching at the first watch's look
      init=' '
      for b in $(IFS=,; echo $6); do init="$init$b "; done
    else
      init=$cur
    fi
    case $kind in pci|usb) commas "$init"; first=$lst ;; esac
    echo "start $up $$ ${first:--}"
  fi
  polls=$((polls + 1))
  if [ "$kind" = pci ] || [ "$kind" = usb ]; then
    if [ "$present" = 1 ]; then
      ids_new
      if [ -n "$name" ]; then
        if [ "$kind" = pci ]; then
          ren=
          [ -n "$net" ] && { up0=$up nn=$net; settle pci_nn; net=$nn up=$up0; }
          echo "found $name $drv $up polls=$polls pci=$name${net:+ net=$net}${blk:+ block=$blk}$ren"
        else
          echo "found $name $drv $up polls=$polls usb=$name busdev=$bn.$dn"
        fi
        exit 0
      fi
    else
      # Absent: one of the devices matching at the first look is no longer there (or no
      # longer matches). With none at the first look there is nothing to wait for.
      gone= left=
      for b in $init; do
        case $cur in *" $b "*) left="$left $b" ;; *) [ -z "$gone" ] && gone=$b ;; esac
      done
      if [ -n "$gone" ] || [ "$init" = ' ' ]; then
        echo "found - - $up polls=$polls${gone:+ was=$gone}"
        exit 0
      fi
      commas "$left"
      last=$lst
    fi
  elif [ "$present" = 1 ]; then
    if [ -n "$name" ]; then
      if [ "$kind" = nic ] && [ "$bound" = 1 ]; then
        up0=$up nn=$name
        settle nic_nn  # the time reported stays the first sighting's
        name=$nn up=$up0
        drvof "$R/sys/class/net/$name/device/driver"
        cd -P "$R/sys/class/net/$name/device" 2>/dev/null && whence "$PWD"
        echo "found $name $drv $up polls=$polls$extra$ren"
        exit 0
      fi
      if [ "$kind" = disk ] || [ "$kind" = blockdev ]; then
        drvof "$R/sys/block/$name/device/driver"
        whence "$dev"
        scsi=
        if cd -P "$R/sys/block/$name/device" 2>/dev/null; then
          case ${PWD##*/} in *:*:*:*) scsi=" scsi=${PWD##*/}" ;; esac
        fi
        echo "found $name $drv $up polls=$polls$extra$scsi"
        exit 0
      fi
    fi
  elif [ -z "$name" ]; then
    echo "found - - $up polls=$polls${last:+ was=$last}"
    exit 0
  fi
  if [ "$cs" -ge "$end" ]; then
    echo "timeout $up polls=$polls${last:+ last=$last}${need:+ need=$need}"
    exit 1
  fi
  nap 20000 0.02
done
""").replace("@GRACE@", str(round(BIND_GRACE * 100))).replace(  # our constants: the identity is never pasted in
    "@SETTLE@", str(round(RENAME_SETTLE * 100))).replace("@RENAME@", str(round(RENAME_GRACE * 100)))


@dataclass(frozen=True)
class Identity:
    """How a device is recognised inside the guest: a NIC by MAC, a disk by serial, a PCI
    function or USB device by ``vendor:device`` ids (4 hex digits each, e.g. ``8086:100e``)."""

    kind: Kind
    value: str

    def __post_init__(self) -> None:
        if self.kind == "nic":
            mac = self.value.lower()
            if not MAC_RE.fullmatch(mac):
                raise errors.InvalidRequest(f"not a MAC address: {self.value!r}",
                                            hint="use six hex pairs separated by colons, e.g. 52:54:00:12:34:56")
            # Sysfs prints MACs in lower case; normalise so the guest-side comparison is exact.
            object.__setattr__(self, "value", mac)
        elif self.kind == "disk":
            if not SERIAL_RE.fullmatch(self.value):
                raise errors.InvalidRequest(
                    f"disk serial {self.value!r} cannot be watched for",
                    hint="a serial of 1 to 20 characters from A-Z a-z 0-9 _ . -",
                )
        elif self.kind == "blockdev":
            if not BLOCKDEV_RE.fullmatch(self.value):
                raise errors.InvalidRequest(f"not a block device name: {self.value!r}",
                                            hint="a kernel disk name such as xvdb or vdc")
        elif self.kind in ("pci", "usb"):
            ids = self.value.lower()
            if not IDS_RE.fullmatch(ids):
                example = "8086:100e" if self.kind == "pci" else "46f4:0001"
                raise errors.InvalidRequest(f"not {self.kind.upper()} vendor:device ids: {self.value!r}",
                                            hint=f"four hex digits each, without 0x, e.g. {example}")
            # Sysfs prints the ids in lower case; normalise so the guest-side comparison is exact.
            object.__setattr__(self, "value", ids)
        else:
            raise errors.InvalidRequest(f"unknown identity kind {self.kind!r} (nic, disk, blockdev, pci or usb)")

    def describe(self) -> str:
        return {
            "nic": f"NIC with MAC {self.value}",
            "disk": f"disk with serial {self.value}",
            "blockdev": f"disk {self.value}",
            "pci": f"PCI function {self.value}",
            "usb": f"USB device {self.value}",
        }[self.kind]


@dataclass(frozen=True)
class Seen:
    """What the guest showed: its name for the device, the bound driver, and when (guest clock).

    ``detail`` always has ``polls``; for absence ``was`` (the name that went). Presence adds, for
    a NIC or disk: ``pci`` and ``usb`` (the PCI function / USB device above it), ``scsi`` (H:C:T:L);
    for a PCI function: ``pci`` (its BDF), ``net`` (its interface, if a NIC), ``block`` (a block
    device right below it, e.g. virtio-blk's); for a USB device: ``usb`` (e.g. 2-1), ``busdev``
    (BUS.DEV as in lsusb). A NIC (or a PCI function's ``net``) that udev renamed while the watcher
    followed it adds ``renamed_from`` (the name it first had).
    """

    name: str  # eth1, vdb, sda, a PCI BDF, a USB device (2-1); "" when the watch waited for absence
    driver: str  # nic: virtio_net/e1000...; disk: the block device's driver (virtio_blk, sd) or "-";
    #              pci: the function's driver (virtio-pci, e1000); usb: its first interface driver or "usb"
    guest_seconds: float  # guest clock, from the watch's start to the poll that saw the change
    detail: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class WatchLine:
    """One parsed line of the watcher's output."""

    word: Literal["start", "found", "timeout"]
    uptime: float
    name: str = ""
    driver: str = "-"
    pid: int = 0
    detail: dict[str, str] = field(default_factory=dict)


def _uptime(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"bad guest uptime {text!r}") from None
    if value < 0:
        raise ValueError(f"bad guest uptime {text!r}")
    return value


def _pairs(tokens: list[str]) -> dict[str, str]:
    detail: dict[str, str] = {}
    for token in tokens:
        key, sep, value = token.partition("=")
        if not sep or not key:
            raise ValueError(f"bad detail {token!r}")
        detail[key] = value
    return detail


def parse_line(line: str) -> WatchLine:
    """Parse ``start UP PID NAME|-``, ``found NAME DRIVER UP [k=v ...]`` or ``timeout UP [k=v ...]``.

    Raises ValueError on anything else: the script is ours, so other output is a bug to show.
    """
    f = line.split()
    if len(f) == 4 and f[0] == "start" and f[2].isdigit():
        return WatchLine("start", _uptime(f[1]), name="" if f[3] == "-" else f[3], pid=int(f[2]))
    if len(f) >= 4 and f[0] == "found":
        name = "" if f[1] == "-" else f[1]
        return WatchLine("found", _uptime(f[3]), name=name, driver=f[2], detail=_pairs(f[4:]))
    if len(f) >= 2 and f[0] == "timeout":
        return WatchLine("timeout", _uptime(f[1]), detail=_pairs(f[2:]))
    raise ValueError(f"unexpected line from the guest watcher: {line!r}")


#: Names the watcher may be told matched earlier (PCI BDFs, USB device names), comma-separated.
INITIAL_RE = re.compile(r"[0-9A-Za-z:.\-]+(,[0-9A-Za-z:.\-]+)*")


def watch_command(identity: Identity, *, present: bool, timeout: float, sysroot: str = "",
                  initial: str = "") -> str:
    """The command line that runs the watcher: the fixed script plus quoted positional arguments."""
    if not 0 < timeout <= MAX_TIMEOUT:
        raise errors.InvalidRequest(f"watch timeout must be between 0 and {MAX_TIMEOUT:g} s, not {timeout:g}")
    if initial and not INITIAL_RE.fullmatch(initial):
        raise errors.InvalidRequest(f"not a list of device names: {initial!r}")
    centis = max(1, round(timeout * 100))
    # exec: the watcher itself is the process the SSH server waits on, so its PID is the one to stop.
    return "exec " + shlex.join(["sh", "-c", WATCH_SCRIPT, "sh", identity.kind, identity.value,
                                 "1" if present else "0", str(centis), sysroot, initial])


class Watch:
    """A running watcher in the guest; get the outcome with ``result()``, or ``cancel()`` it."""

    def __init__(self, session: GuestSession, channel: Any, identity: Identity, *, present: bool,
                 timeout: float, sysroot: str = "", worth_it: Callable[[], bool] | None = None) -> None:
        self._session = session
        self._sysroot = sysroot
        self._worth_it = worth_it
        self._chan = channel
        self.identity = identity
        self.present = present
        self.timeout = timeout
        self._buf = b""
        self._seen: Seen | None = None
        self._done = False
        #: Host ``time.monotonic()`` when the watcher's ``start`` line arrived (it was live by then).
        self.started_at = 0.0
        #: Guest uptime at that start.
        self.guest_started = 0.0
        #: Host ``time.monotonic()`` when the final line arrived (0 until then).
        self.finished_at = 0.0
        #: The guest's name for a matching device at the first look ("" if there was none then);
        #: for pci/usb all matching devices then, comma-separated (the ones a new match must not be).
        self.initial = ""
        self.pid = 0
        #: How often the SSH connection was lost and the watch resumed on a new one.
        self.resumed = 0

    # -- plumbing -------------------------------------------------------
    def _stderr(self) -> str:
        chunks: list[bytes] = []
        try:
            while self._chan.recv_stderr_ready():
                data = self._chan.recv_stderr(4096)
                if not data:  # end of the stream: never loop on an empty read
                    break
                chunks.append(data)
        except ssh_errors():
            pass
        return b"".join(chunks).decode(errors="replace").strip()

    def _readline(self, deadline: float) -> str | None:
        """Next stdout line, None at end of output; TimeoutError when ``deadline`` passes first."""
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            self._chan.settimeout(remaining)
            try:
                data = self._chan.recv(4096)
            except TimeoutError:
                raise TimeoutError from None
            except ssh_errors() as exc:
                raise errors.GuestUnreachable(f"lost the SSH connection to {self._session.target}: {exc}") from exc
            if not data:
                if self._buf:
                    line, self._buf = self._buf, b""
                    return line.decode(errors="replace")
                return None
            self._buf += data
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode(errors="replace")

    def _next(self, deadline: float) -> WatchLine:
        line = self._readline(deadline)
        if line is None and not self._session.connected():  # the end of the connection, not of the watcher
            self._finish(wait=False)
            raise errors.GuestUnreachable(f"lost the SSH connection to {self._session.target}")
        if line is None:
            stderr = self._stderr()
            status = self._finish()
            raise errors.GuestCommandFailed(
                f"the watcher for the {self.identity.describe()} stopped without an answer "
                f"(exit {status}): {stderr[:300] or 'no error output'}",
                hint="the guest needs a POSIX sh (dash, bash or busybox) and /proc, /sys mounted",
            )
        try:
            return parse_line(line)
        except ValueError as exc:
            self.cancel()
            raise errors.GuestCommandFailed(f"{exc} (stderr: {self._stderr()[:200]})") from exc

    def _finish(self, *, wait: bool = True) -> int:
        """Let the watcher's exit reach us, then close its channel; return its exit status (-1: unknown).

        Closing before the SSH server has reaped the process races dropbear: it can free the
        channel slot early and later close whichever new channel reused it (seen in the lab
        as "Channel closed" on the next watch).
        """
        self._done = True
        status = -1
        if wait and self._chan.status_event.wait(CLOSE_WAIT):
            status = self._chan.recv_exit_status()
        with contextlib.suppress(*ssh_errors()):
            self._chan.close()
        return status

    def _wait_start(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        try:
            first = self._next(deadline)
        except TimeoutError:
            self.cancel()
            raise errors.Timeout(f"the watcher in guest {self._session.target} did not start within "
                                 f"{START_TIMEOUT:g} s") from None
        if first.word != "start":
            self.cancel()
            raise errors.GuestCommandFailed(f"the guest watcher printed {first.word!r} before 'start'")
        self.started_at = time.monotonic()
        self.guest_started = first.uptime
        self.initial = first.name
        self.pid = first.pid

    # -- public ---------------------------------------------------------
    @property
    def done(self) -> bool:
        """True once the watcher has answered, timed out or been cancelled."""
        return self._done

    def host_time(self, seen: Seen) -> float:
        """Map a result's guest time onto the host's ``time.monotonic()`` clock (approximate)."""
        return self.started_at + seen.guest_seconds

    def result(self) -> Seen:
        """Block until the guest shows the wanted state; raise errors.Timeout if it never does."""
        if self._seen is not None:
            return self._seen
        if self._done:
            raise errors.InvalidRequest("this watch was cancelled")
        want = "show" if self.present else "drop"
        deadline = self.started_at + self.timeout + RESULT_GRACE
        try:
            line = self._next(deadline)
        except errors.GuestUnreachable as exc:
            return self._resume(exc)
        except TimeoutError:
            self.cancel()
            raise errors.Timeout(
                f"no answer from the guest watcher for the {self.identity.describe()} within "
                f"{self.timeout + RESULT_GRACE:g} s (host clock)",
            ) from None
        self.finished_at = time.monotonic()
        if line.word == "timeout":
            self._finish()
            polls = line.detail.get("polls", "?")
            if self.present:
                msg = f"the guest did not show the {self.identity.describe()} within {self.timeout:g} s"
                last, need = line.detail.get("last"), line.detail.get("need")
                if self.identity.kind == "nic" and last:
                    msg += f" ({last} has that MAC but no driver bound)"
                elif self.identity.kind == "pci" and last:
                    msg += {"driver": f" ({last} is present but no driver bound)",
                            "block": f" ({last} is present, bound, but shows no disk yet)"}.get(
                        need, f" ({last} is present, bound, but shows no network interface yet)")
                elif self.identity.kind == "usb" and last:
                    msg += f" ({last} is present but no interface driver bound yet)"
            else:
                held = f" (still {line.detail['last']})" if "last" in line.detail else ""
                msg = f"the guest did not drop the {self.identity.describe()} within {self.timeout:g} s{held}"
            raise errors.Timeout(f"{msg}; guest clock, {polls} polls")
        if line.word != "found":
            self.cancel()
            raise errors.GuestCommandFailed(f"the guest watcher printed {line.word!r} while waiting to {want}")
        self._finish()
        guest_seconds = max(0.0, round(line.uptime - self.guest_started, 2))
        self._seen = Seen(line.name, line.driver, guest_seconds, line.detail)
        return self._seen

    def _resume(self, lost: errors.GuestUnreachable) -> Seen:
        """The SSH connection died mid-watch (sshd restarted, a forward that stalled): log in again and watch
        on for what is left of the time, against the same first look, so the answer is the one this watch
        would have given. Raises GuestUnreachable when the guest cannot be reached again in that time."""
        self._done = True
        remaining = self.started_at + self.timeout - time.monotonic()
        what = f"the {self.identity.describe()} to {'show' if self.present else 'go'}"
        try:
            if remaining <= 0:
                raise lost
            self._session.reconnect(time.monotonic() + remaining, worth_it=self._worth_it)
            again = start_watch(self._session, self.identity, present=self.present, timeout=max(remaining, 1.0),
                                sysroot=self._sysroot, worth_it=self._worth_it,
                                initial=self.initial if self.identity.kind in ("pci", "usb") else "")
        except errors.GuestUnreachable as exc:
            raise errors.GuestUnreachable(f"lost the SSH connection to {self._session.target} while waiting for "
                                          f"{what}, and could not log in again in time: {exc.message}") from exc
        seen = again.result()
        self.resumed = 1 + again.resumed
        self.finished_at = again.finished_at
        # Guest time since this watch's start, across both watchers (host clock for the gap between them).
        since = max(0.0, round(again.started_at - self.started_at + seen.guest_seconds, 2))
        self._seen = Seen(seen.name, seen.driver, since, {**seen.detail, "resumed": str(self.resumed)})
        return self._seen

    def cancel(self) -> None:
        """Stop the watcher (idempotent). Closing the channel alone would leave it polling in the guest."""
        if self._done:
            return
        try:
            if self.pid > 0:
                self._session.run(["kill", str(self.pid)], timeout=10, check=False)
        except errors.VhotplugError:
            pass  # the guest-side loop still ends on its own deadline
        finally:
            self._finish()

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.cancel()


def start_watch(session: GuestSession, identity: Identity, *, present: bool, timeout: float,
                sysroot: str = "", initial: str = "", worth_it: Callable[[], bool] | None = None) -> Watch:
    """Start the in-guest watcher and return once it is live (its ``start`` line has arrived).

    ``present`` True waits for the device to appear with a driver bound (pci/usb: a device
    that did not match at the first look); False waits until the guest has no such device
    (pci/usb: until one of the devices matching at the first look is gone). ``timeout``
    (seconds) is enforced by the guest on its own clock. ``sysroot`` is for tests: a directory
    read in place of / (for /sys and /proc). ``initial``: see ``watch_command`` (a resumed watch). A watch
    whose SSH connection dies logs in again while ``worth_it()`` holds (default: until its time is up).
    """
    command = watch_command(identity, present=present, timeout=timeout, sysroot=sysroot, initial=initial)
    try:
        channel = session.open_exec(command, timeout=START_TIMEOUT)
    except ssh_errors() as exc:
        raise errors.GuestUnreachable(f"cannot start the watcher in guest {session.target}: {exc}") from exc
    watch = Watch(session, channel, identity, present=present, timeout=timeout, sysroot=sysroot, worth_it=worth_it)
    watch._wait_start()
    return watch


def wait_for(session: GuestSession, identity: Identity, *, present: bool, timeout: float,
             sysroot: str = "") -> Seen:
    """Start a watch and wait for its result (for when nothing needs doing in between)."""
    with start_watch(session, identity, present=present, timeout=timeout, sysroot=sysroot) as watch:
        return watch.result()
