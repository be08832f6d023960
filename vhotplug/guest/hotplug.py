"""Guest side of CPU and memory hot-plug: wait for sysfs to show the change, then online/offline.

Every script here is fixed text owned by vhotplug; CPU and block numbers reach it as
positional arguments (validated as integers first), and each wait is one bounded loop
inside the guest over the session's one connection. Writing a CPU's or memory block's state
needs root: for another SSH user it goes through sudo (:mod:`vhotplug.guest.privilege`).
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Iterable
from dataclasses import dataclass

from vhotplug import errors
from vhotplug.guest import privilege, shell
from vhotplug.guest.probe import parse_cpu_list
from vhotplug.guest.ssh import GuestSession, Result

SYS_CPU = "/sys/devices/system/cpu"
SYS_MEM = "/sys/devices/system/memory"

# $1 the file, $2 the wanted content, $3 deadline in 20 ms polls. Prints the content it last saw.
_WAIT_EQUALS = shell.script(r"""
f=$1 want=$2 n=$3 v=
while :; do
  read -r v < "$f" 2>/dev/null
  [ "$v" = "$want" ] && { echo "$v"; exit 0; }
  n=$((n - 1)); [ "$n" -le 0 ] && { echo "$v"; exit 1; }
  nap 20000 0.02
done
""")

# $1 a directory standing in for / ("" in a real guest; the unit tests point it at a fake sysfs),
# $2 deadline in 20 ms polls, $3... memory block numbers that must exist.
_WAIT_BLOCKS = shell.script(r"""
R=$1 n=$2; shift 2
while :; do
  ok=1
  for b in "$@"; do [ -e "$R/sys/devices/system/memory/memory$b/state" ] || ok=0; done
  [ "$ok" = 1 ] && exit 0
  n=$((n - 1)); [ "$n" -le 0 ] && exit 1
  nap 20000 0.02
done
""")

# $1 root (as above), $2 state to write (online/online_movable/online_kernel/offline), $3... block numbers.
# Prints "BLOCK STATE BY" for each: BY is "guest" when the block was in that state already (a guest whose
# udev rules or auto_online_blocks online new memory itself: the RHEL family), "vhotplug" when this wrote it,
# "-" when the write was refused (the reason on stderr). Privileged: runs as root.
_SET_BLOCKS = shell.script(r"""
R=$1 want=$2; shift 2; rc=0
for b in "$@"; do
  f=$R/sys/devices/system/memory/memory$b/state s=
  read -r s 2>/dev/null < "$f"
  case $want:$s in
    offline:offline|online*:online) by=guest ;;
    *) if echo "$want" > "$f"; then by=vhotplug; else by=- rc=1; fi; read -r s < "$f" ;;
  esac
  echo "$b ${s:-?} $by"
done
exit $rc
""")

# $1 root (as above), $2 0|1, $3... CPU numbers. Prints "CPU BY" for each, BY as for memory blocks.
# Privileged: runs as root.
_SET_CPUS = shell.script(r"""
R=$1 v=$2; shift 2; rc=0
for c in "$@"; do
  f=$R/sys/devices/system/cpu/cpu$c/online s=
  read -r s 2>/dev/null < "$f"
  if [ "$s" = "$v" ]; then by=guest; elif echo "$v" > "$f"; then by=vhotplug; else by=- rc=1; fi
  echo "$c $by"
done
exit $rc
""")

# $1 root (as above).
_CPU_STATE = shell.script(r"""
R=$1
read -r p < "$R/sys/devices/system/cpu/present"; read -r o < "$R/sys/devices/system/cpu/online"
echo "$p"; echo "$o"; grep -c '^processor' "$R/proc/cpuinfo"; awk '/^MemTotal:/ {print $2}' "$R/proc/meminfo"
""")


@dataclass(frozen=True)
class CpuMemState:
    present: list[int]
    online: list[int]
    cpuinfo: int
    memtotal_kib: int


def _ints(values: Iterable[int]) -> list[str]:
    out = []
    for v in values:
        if not isinstance(v, int) or v < 0:
            raise ValueError(f"not a CPU/block number: {v!r}")
        out.append(str(v))
    return out


def _run(session: GuestSession, text: str, *args: str, privileged: bool = False,
         timeout: float = 30.0) -> Result:
    """Run fixed script ``text`` with ``args``; a ``privileged`` one as root (through sudo for another user)."""
    argv = privilege.script_argv(session, text, *args, privileged=privileged)
    return session.run_script(shlex.join(argv), timeout=timeout, check=False)


def state(session: GuestSession, *, sysroot: str = "") -> CpuMemState:
    """Present and online CPUs, /proc/cpuinfo's count, MemTotal."""
    result = _run(session, _CPU_STATE, sysroot)
    lines = result.stdout.split()
    if result.status != 0 or len(lines) != 4:
        raise errors.GuestCommandFailed(f"could not read the guest's CPU and memory state (exit {result.status}): "
                                        f"{result.stderr.strip()[:300]}")
    return CpuMemState(parse_cpu_list(lines[0]), parse_cpu_list(lines[1]), int(lines[2]), int(lines[3]))


def cpu_list(cpus: Iterable[int]) -> str:
    """The kernel's list format for a set of CPUs (``0-2,5``)."""
    nums = sorted(set(cpus))
    parts: list[str] = []
    i = 0
    while i < len(nums):
        j = i
        while j + 1 < len(nums) and nums[j + 1] == nums[j] + 1:
            j += 1
        parts.append(str(nums[i]) if i == j else f"{nums[i]}-{nums[j]}")
        i = j + 1
    return ",".join(parts)


def onlined_by(bys: Iterable[str]) -> str:
    """Who onlined them: "guest" when the guest had onlined every one itself, else "vhotplug" (some or all)."""
    bys = list(bys)
    return "guest" if bys and all(b == "guest" for b in bys) else "vhotplug"


def wait_equals(session: GuestSession, path: str, want: str, *, timeout: float,
                sysroot: str = "") -> tuple[bool, str, float]:
    """Wait in the guest until the sysfs file ``path`` reads ``want``: (reached, last value, seconds)."""
    polls = max(1, int(timeout / 0.02))
    start = time.monotonic()
    result = _run(session, _WAIT_EQUALS, sysroot + path, want, str(polls), timeout=timeout + 15)
    return result.status == 0, result.stdout.strip(), time.monotonic() - start


def set_cpus_online(session: GuestSession, cpus: Iterable[int], online: bool, *,
                    sysroot: str = "") -> dict[int, str]:
    """Online (or offline) ``cpus`` in the guest, as root; for each, who did it: "guest" when it already was
    (a guest whose udev rules online new CPUs themselves), else "vhotplug"."""
    cpus = list(cpus)
    if not cpus:
        return {}
    result = _run(session, _SET_CPUS, sysroot, "1" if online else "0", *_ints(cpus), privileged=True)
    by = {int(c): b for c, b in (line.split() for line in result.stdout.splitlines() if len(line.split()) == 2)}
    if result.status != 0:
        verb = "online" if online else "offline"
        bad = [c for c in cpus if by.get(c, "-") == "-"]
        raise errors.GuestCommandFailed(f"the guest could not {verb} CPU(s) {cpu_list(bad or cpus)}: "
                                        f"{result.stderr.strip()[:300]}")
    return by


def wait_blocks(session: GuestSession, blocks: list[int], *, timeout: float, sysroot: str = "") -> float:
    """Wait until every memory block in ``blocks`` exists in the guest; seconds taken."""
    start = time.monotonic()
    polls = max(1, int(timeout / 0.02))
    result = _run(session, _WAIT_BLOCKS, sysroot, str(polls), *_ints(blocks), timeout=timeout + 15)
    if result.status != 0:
        raise errors.Timeout(f"the guest did not show memory blocks {cpu_list(blocks)} within {timeout:g} s")
    return time.monotonic() - start


@dataclass(frozen=True)
class BlockState:
    state: str  # what the block's state file reads now
    by: str  # "guest": it was in the wanted state already; "vhotplug": written by us; "-": refused


def set_blocks(session: GuestSession, blocks: list[int], state_name: str, *,
               sysroot: str = "") -> dict[int, BlockState]:
    """Write ``state_name`` to each block's state, as root; return the state each block ended in and who put it
    there (a block already in that state counts as the guest's doing: udev rules, auto_online_blocks).

    Raises GuestCommandFailed when any block refused (e.g. offlining memory still in use).
    """
    if state_name not in ("online", "online_movable", "online_kernel", "offline"):
        raise ValueError(state_name)
    result = _run(session, _SET_BLOCKS, sysroot, state_name, *_ints(blocks), privileged=True)
    states = {int(f[0]): BlockState(f[1], f[2]) for f in (line.split() for line in result.stdout.splitlines())
              if len(f) == 3}
    if result.status != 0:
        bad = [b for b, s in states.items() if (s.state == "offline") != (state_name == "offline")]
        why = result.stderr.strip().splitlines()
        raise errors.GuestCommandFailed(
            f"the guest could not set memory block(s) {cpu_list(bad) or cpu_list(blocks)} {state_name} "
            f"(now: {', '.join(f'{b} {s.state}' for b, s in sorted(states.items()))})"
            + (f": {why[0][:200]}" if why else "")  # the first complaint: the write's
        )
    return states


def block_bytes(session: GuestSession) -> int:
    """The guest's memory block size (the unit it onlines hot-added memory in)."""
    text = session.run(["cat", f"{SYS_MEM}/block_size_bytes"]).stdout.strip()
    return int(text, 16)
