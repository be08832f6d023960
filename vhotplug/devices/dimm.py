"""A memory DIMM for hot-add: validated spec and XML from ``xml_templates/memory-dimm.xml``."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from lxml import etree

from vhotplug import errors, templates
from vhotplug.devices.common import choose_id, set_alias, user_alias
from vhotplug.units import format_size, parse_size

DEFAULT_BLOCK_BYTES = 128 << 20  # x86-64 Linux memory block size below 64 GiB of RAM


@dataclass(frozen=True)
class DimmSpec:
    size_bytes: int
    node: int
    alias: str


def dimm_spec(*, size: str, node: int = 0, id: str | None = None, used_aliases: Iterable[str] = (),
              block_bytes: int = DEFAULT_BLOCK_BYTES, numa_cells: int = 1) -> DimmSpec:
    """Validate a DIMM request: size a whole number of the guest's memory blocks, an existing NUMA node."""
    size_bytes = parse_size(size)
    if size_bytes % block_bytes:
        raise errors.InvalidRequest(
            f"DIMM size {format_size(size_bytes)} is not a multiple of the guest's memory block size "
            f"{format_size(block_bytes)}",
            hint=f"the guest onlines memory in {format_size(block_bytes)} blocks: use a multiple of that",
        )
    if not 0 <= node < max(numa_cells, 1):
        raise errors.InvalidRequest(f"NUMA node {node} does not exist: the domain has {numa_cells} cell(s) "
                                    f"(0-{numa_cells - 1})")
    return DimmSpec(size_bytes, node, user_alias(choose_id(id, prefix="dimm", used_aliases=used_aliases)))


def dimm_xml(spec: DimmSpec) -> etree._Element:
    root = templates.load("memory-dimm")
    size = root.find("target/size")
    size.set("unit", "KiB")
    size.text = str(spec.size_bytes // 1024)
    root.find("target/node").text = str(spec.node)
    set_alias(root, spec.alias)
    return root
