"""Guest side of CPU and memory hot-plug: wait for sysfs to show the change, then online/offline.

Every script here is fixed text owned by vhotplug; CPU and block numbers reach it as
positional arguments (validated as integers first), and each wait is one bounded loop
inside the guest over the session's one connection.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Iterable
from dataclasses import dataclass

from vhotplug import errors
from vhotplug.guest.probe import parse_cpu_list
from vhotplug.guest.ssh import GuestSession

SYS_CPU = "/sys/devices/system/cpu"
SYS_MEM = "/sys/devices/system/memory"

# $1 the file, $2 the wanted content, $3 deadline in 20 ms polls. Prints the content it last saw.
_WAIT_EQUALS = r"""
f=$1 want=$2 n=$3 v=
while :; do
  read -r v < "$f" 2>/dev/null
  [ "$v" = "$want" ] && { echo "$v"; exit 0; }
  n=$((n - 1)); [ "$n" -le 0 ] && { echo "$v"; exit 1; }
  usleep 20000
done
"""

# $1 deadline in 20 ms polls, $2... memory block numbers that must exist.
_WAIT_BLOCKS = r"""
n=$1; shift
while :; do
  ok=1
  for b in "$@"; do [ -e "/sys/devices/system/memory/memory$b/state" ] || ok=0; done
  [ "$ok" = 1 ] && exit 0
  n=$((n - 1)); [ "$n" -le 0 ] && exit 1
  usleep 20000
done
"""

# $1 state to write (online/online_movable/offline), $2... block numbers. Reports each result.
_SET_BLOCKS = r"""
want=$1; shift; rc=0
for b in "$@"; do
  f=/sys/devices/system/memory/memory$b/state
  if echo "$want" > "$f" 2>/dev/null; then :; else rc=1; fi
  read -r s < "$f"; echo "$b $s"
done
exit $rc
"""

# $1 0|1, $2... CPU numbers.
_SET_CPUS = r"""
v=$1; shift; rc=0
for c in "$@"; do echo "$v" > "/sys/devices/system/cpu/cpu$c/online" 2>/dev/null || rc=1; done
exit $rc
"""

_CPU_STATE = r"""
read -r p < /sys/devices/system/cpu/present; read -r o < /sys/devices/system/cpu/online
echo "$p"; echo "$o"; grep -c '^processor' /proc/cpuinfo; awk '/^MemTotal:/ {print $2}' /proc/meminfo
"""


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


def _sh(script: str, *args: str) -> str:
    return shlex.join(["sh", "-c", script, "sh", *args])


def state(session: GuestSession) -> CpuMemState:
    """Present and online CPUs, /proc/cpuinfo's count, MemTotal."""
    lines = session.run_script(_CPU_STATE).stdout.split()
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


def wait_equals(session: GuestSession, path: str, want: str, *, timeout: float) -> tuple[bool, str, float]:
    """Wait in the guest until the sysfs file ``path`` reads ``want``: (reached, last value, seconds)."""
    polls = max(1, int(timeout / 0.02))
    start = time.monotonic()
    result = session.run_script(_sh(_WAIT_EQUALS, path, want, str(polls)), timeout=timeout + 15, check=False)
    return result.status == 0, result.stdout.strip(), time.monotonic() - start


def set_cpus_online(session: GuestSession, cpus: Iterable[int], online: bool) -> None:
    cpus = list(cpus)
    if not cpus:
        return
    result = session.run_script(_sh(_SET_CPUS, "1" if online else "0", *_ints(cpus)), check=False)
    if result.status != 0:
        verb = "online" if online else "offline"
        raise errors.GuestCommandFailed(f"the guest could not {verb} CPU(s) {cpu_list(cpus)}: {result.stderr.strip()}")


def wait_blocks(session: GuestSession, blocks: list[int], *, timeout: float) -> float:
    """Wait until every memory block in ``blocks`` exists in the guest; seconds taken."""
    start = time.monotonic()
    polls = max(1, int(timeout / 0.02))
    result = session.run_script(_sh(_WAIT_BLOCKS, str(polls), *_ints(blocks)), timeout=timeout + 15, check=False)
    if result.status != 0:
        raise errors.Timeout(f"the guest did not show memory blocks {cpu_list(blocks)} within {timeout:g} s")
    return time.monotonic() - start


def set_blocks(session: GuestSession, blocks: list[int], state_name: str) -> dict[int, str]:
    """Write ``state_name`` to each block's state; return the state each block ended in.

    Raises GuestCommandFailed when any block refused (e.g. offlining memory still in use).
    """
    if state_name not in ("online", "online_movable", "online_kernel", "offline"):
        raise ValueError(state_name)
    result = session.run_script(_sh(_SET_BLOCKS, state_name, *_ints(blocks)), check=False)
    states = {int(b): s for b, s in (line.split() for line in result.stdout.splitlines() if line.strip())}
    if result.status != 0:
        bad = [b for b, s in states.items() if (s == "offline") != (state_name == "offline")]
        raise errors.GuestCommandFailed(
            f"the guest could not set memory block(s) {cpu_list(bad) or cpu_list(blocks)} {state_name} "
            f"(now: {', '.join(f'{b} {s}' for b, s in sorted(states.items()))})"
        )
    return states


def block_bytes(session: GuestSession) -> int:
    """The guest's memory block size (the unit it onlines hot-added memory in)."""
    text = session.run(["cat", f"{SYS_MEM}/block_size_bytes"]).stdout.strip()
    return int(text, 16)
