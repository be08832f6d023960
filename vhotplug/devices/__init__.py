"""Device specs and their libvirt XML: one small module per device kind.

Each kind has a frozen ``*Spec`` dataclass, a ``*_spec(...)`` function that
validates the user's request against the domain's current devices and decides
every value (id, alias, MAC, target), and a ``*_xml(spec)`` function that turns
the spec into an lxml element from ``xml_templates/``. Nothing here talks to
libvirt; callers pass in what the domain already uses.
"""

from __future__ import annotations

from vhotplug.devices.common import check_id, id_from_alias, next_free_id, user_alias
from vhotplug.devices.disk import DiskSpec, create_image, disk_spec, disk_xml, remove_created_image
from vhotplug.devices.nic import NicSpec, nic_spec, nic_xml

__all__ = [
    "DiskSpec",
    "NicSpec",
    "check_id",
    "create_image",
    "disk_spec",
    "disk_xml",
    "id_from_alias",
    "next_free_id",
    "nic_spec",
    "nic_xml",
    "remove_created_image",
    "user_alias",
]
