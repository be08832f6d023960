"""Memory hot-plug with the guest side done: DIMMs onlined/offlined by block, balloon verified."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import libvirt
from lxml import etree

from vhotplug import errors
from vhotplug.devices.dimm import DimmSpec
from vhotplug.guest import hotplug, privilege
from vhotplug.guest.ssh import GuestSession
from vhotplug.ops.attach import attached_after_all
from vhotplug.ops.detach import detach_live
from vhotplug.ops.prepare import size_kib
from vhotplug.units import format_size
from vhotplug.virt.devices import find_device
from vhotplug.virt.errors import translate


@dataclass(frozen=True)
class MemoryLayout:
    """What the domain XML says about memory hot-plug."""

    max_kib: int  # <maxMemory>, 0 when absent
    slots: int
    total_kib: int  # <memory>: boot memory plus DIMMs
    numa_cells: int
    dimms: int

    @property
    def free_slots(self) -> int:
        return self.slots - self.dimms


def layout(xml: str) -> MemoryLayout:
    root = etree.fromstring(xml.encode())
    max_el = root.find("maxMemory")
    return MemoryLayout(size_kib(max_el), int(max_el.get("slots", "0")) if max_el is not None else 0,
                        size_kib(root.find("memory")), len(root.findall("cpu/numa/cell")),
                        len(root.findall("devices/memory")))


def check_room(lay: MemoryLayout, size_bytes: int) -> None:
    """Refuse a DIMM the domain cannot take, before anything changes."""
    if lay.max_kib == 0 or lay.numa_cells == 0:
        missing = " and ".join(w for w, ok in (("<maxMemory>", lay.max_kib), ("a NUMA cell", lay.numa_cells)) if not ok)
        raise errors.InvalidRequest(
            f"the domain cannot take memory DIMMs: it has no {missing}",
            hint="run `vhotplug prepare DOMAIN --max-memory SIZE --slots N`, then restart the domain",
        )
    if lay.free_slots <= 0:
        raise errors.InvalidRequest(f"no free memory slot: all {lay.slots} slots hold a DIMM",
                                    hint="remove a DIMM, or raise --slots with `vhotplug prepare`")
    if lay.total_kib * 1024 + size_bytes > lay.max_kib * 1024:
        raise errors.InvalidRequest(
            f"a {format_size(size_bytes)} DIMM would take the domain to "
            f"{format_size(lay.total_kib * 1024 + size_bytes)}, "
            f"above its maxMemory of {format_size(lay.max_kib * 1024)}",
            hint="raise it with `vhotplug prepare DOMAIN --max-memory SIZE`",
        )


def dimm_blocks(el: etree._Element, block_bytes: int) -> list[int]:
    """The guest memory block numbers a DIMM covers, from its live base address and size."""
    addr = el.find("address[@type='dimm']")
    if addr is None or addr.get("base") is None:
        raise errors.VhotplugError("libvirt did not report the DIMM's base address; cannot find its memory blocks")
    base = int(addr.get("base", "0"), 0)
    size = size_kib(el.find("target/size")) * 1024
    return list(range(base // block_bytes, (base + size) // block_bytes))


@dataclass(frozen=True)
class MemoryOutcome:
    alias: str
    size_bytes: int
    blocks: list[int]
    memtotal_before_kib: int | None = None
    memtotal_after_kib: int | None = None
    seconds: float = 0.0
    onlined_by: str = ""  # an added DIMM's blocks: "guest" (it onlined them itself) or "vhotplug"; else ""

    def to_dict(self) -> dict[str, object]:
        doc: dict[str, object] = {"alias": self.alias, "size": format_size(self.size_bytes),
                                  "blocks": self.blocks, "seconds": round(self.seconds, 3)}
        if self.memtotal_after_kib is not None:
            doc["guest"] = {"memtotal_before_kib": self.memtotal_before_kib,
                            "memtotal_after_kib": self.memtotal_after_kib}
        if self.onlined_by:
            doc["onlined_by"] = self.onlined_by
        return doc


def add_dimm(conn: libvirt.virConnect, dom: libvirt.virDomain, spec: DimmSpec, xml: etree._Element, *,
             flags: int, live: bool, session: GuestSession | None, online_type: str, block_bytes: int,
             timeout: float) -> MemoryOutcome:
    """Hot-add a DIMM; in the guest, online exactly its blocks and check MemTotal grew by its size."""
    start = time.monotonic()
    if session is not None and live:
        # Before libvirt is asked: onlining the blocks needs root, and a refusal then would mean a rollback.
        privilege.require(session, "online the new memory blocks")
    before = hotplug.state(session).memtotal_kib if session else None
    try:
        dom.attachDeviceFlags(etree.tostring(xml, encoding="unicode"), flags)
    except errors.ConnectionLost as exc:
        attached_after_all(dom, spec.alias, flags, timeout, exc)  # or raises: it did not happen
    except libvirt.libvirtError as exc:
        raise translate(exc, f"hot-adding DIMM {spec.alias}") from exc
    if not live:
        return MemoryOutcome(spec.alias, spec.size_bytes, [], seconds=time.monotonic() - start)
    blocks = dimm_blocks(find_device(dom.XMLDesc(0), spec.alias)[1], block_bytes)
    if session is None:
        return MemoryOutcome(spec.alias, spec.size_bytes, blocks, seconds=time.monotonic() - start)
    try:
        hotplug.wait_blocks(session, blocks, timeout=timeout)
        # A guest may online them itself (udev rules, auto_online_blocks): already online counts, and is said so.
        placed = hotplug.set_blocks(session, blocks, online_type)
        after = hotplug.state(session).memtotal_kib
        _check_delta(before or 0, after, spec.size_bytes // 1024, block_bytes, "grew")
    except errors.VhotplugError as exc:
        _roll_back(conn, dom, spec.alias, blocks, session, timeout)
        exc.message += f" (the DIMM {spec.alias} was removed again)"
        raise
    return MemoryOutcome(spec.alias, spec.size_bytes, blocks, before, after, time.monotonic() - start,
                         hotplug.onlined_by(p.by for p in placed.values()))


def _check_delta(before: int, after: int, want_kib: int, block_bytes: int, verb: str) -> None:
    delta = abs(after - before)
    if abs(delta - want_kib) > block_bytes // 1024 // 2:
        raise errors.Inconsistent(f"the guest's MemTotal {verb} by {delta} KiB, not the DIMM's {want_kib} KiB "
                                  f"({before} -> {after} KiB)")


def _roll_back(conn: libvirt.virConnect, dom: libvirt.virDomain, alias: str, blocks: list[int],
               session: GuestSession, timeout: float) -> None:
    # Blocks never onlined, or some refused: the detach below says what is left.
    with contextlib.suppress(errors.VhotplugError):
        hotplug.set_blocks(session, blocks, "offline")
    detach_live(conn, dom, alias, timeout=timeout)


def remove_dimm(conn: libvirt.virConnect, dom: libvirt.virDomain, ref: str, *, session: GuestSession | None,
                block_bytes: int, timeout: float) -> MemoryOutcome:
    """Offline the DIMM's blocks in the guest, then unplug it and wait; check MemTotal shrank."""
    start = time.monotonic()
    device, el = find_device(dom.XMLDesc(0), ref)
    if device.kind != "memory":
        raise errors.InvalidRequest(f"{ref!r} is a {device.kind}, not a memory DIMM", hint="use `vhotplug detach`")
    size_bytes = size_kib(el.find("target/size")) * 1024
    blocks = dimm_blocks(el, block_bytes)
    before = None
    if session is not None:
        privilege.require(session, "offline the DIMM's memory blocks")
        before = hotplug.state(session).memtotal_kib
        # Offline first: a guest still using the memory refuses here, and nothing has changed.
        hotplug.set_blocks(session, blocks, "offline")
    try:
        detach_live(conn, dom, device.alias, timeout=timeout)
    except errors.VhotplugError:
        if session is not None:
            hotplug.set_blocks(session, blocks, "online_movable")  # give the guest its memory back
        raise
    after = None
    if session is not None:
        after = hotplug.state(session).memtotal_kib
        _check_delta(before or 0, after, size_bytes // 1024, block_bytes, "shrank")
    return MemoryOutcome(device.alias, size_bytes, blocks, before, after, time.monotonic() - start)


def balloon(dom: libvirt.virDomain, size_bytes: int, *, session: GuestSession | None,
            timeout: float) -> tuple[int, int | None, int | None]:
    """Set the balloon target; with a session wait until the guest's MemTotal moved by the difference.

    Returns (previous current memory KiB, guest MemTotal before, after).
    """
    target_kib = size_bytes // 1024
    info = dom.info()
    max_kib = info[1]
    try:
        # The balloon's own figure: dom.info()'s current memory lags right after a change.
        cur_kib = int(dom.memoryStats().get("actual", info[2]))
    except libvirt.libvirtError:
        cur_kib = info[2]
    if target_kib > max_kib:
        raise errors.InvalidRequest(f"balloon target {format_size(size_bytes)} is above the domain's memory "
                                    f"{format_size(max_kib * 1024)}",
                                    hint="the balloon only moves within the memory the domain has")
    if target_kib < 64 * 1024:
        raise errors.InvalidRequest(f"balloon target {format_size(size_bytes)} would starve the guest (minimum 64 MiB)")
    before = hotplug.state(session).memtotal_kib if session else None
    try:
        dom.setMemoryFlags(target_kib, libvirt.VIR_DOMAIN_AFFECT_LIVE)
    except libvirt.libvirtError as exc:
        raise translate(exc, "setting the balloon target") from exc
    if session is None or before is None:
        return cur_kib, None, None
    want = before - (cur_kib - target_kib)
    deadline = time.monotonic() + timeout
    after = before
    while time.monotonic() < deadline:  # the balloon driver moves in steps: a bounded poll
        after = hotplug.state(session).memtotal_kib
        if abs(after - want) <= 4096:
            return cur_kib, before, after
        time.sleep(0.1)
    raise errors.Timeout(f"the guest's MemTotal is {after} KiB after {timeout:g} s, expected about {want} KiB "
                         f"(balloon {cur_kib} -> {target_kib} KiB)")

