"""What every hot-plugged device shares: the user's id and the libvirt alias made from it.

The user names a device with ``--id`` (QEMU's ``device_add ...,id=NAME``);
libvirt keeps such a name only as a *user alias*, which must start with
``ua-``. So the id ``mydisk`` becomes ``<alias name='ua-mydisk'/>`` and later
commands find the device by that alias.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable

from lxml import etree

from vhotplug import errors

ALIAS_PREFIX = "ua-"
ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_-]{0,15}"
_ID = re.compile(ID_PATTERN)
# Short enough that "vh-" + id fits virtio-blk's 20-character serial.
ID_MAX = 16


def check_id(name: str) -> str:
    """``name`` if it is a valid device id, else :class:`errors.InvalidRequest`."""
    if not _ID.fullmatch(name):
        raise errors.InvalidRequest(
            f"invalid device id {name!r}",
            hint=f"use 1 to {ID_MAX} letters, digits, '_' or '-', starting with a letter or digit (e.g. data1)",
        )
    return name


def user_alias(device_id: str) -> str:
    """The libvirt user alias for ``device_id``: ``ua-`` + id."""
    return ALIAS_PREFIX + check_id(device_id)


def id_from_alias(alias: str) -> str | None:
    """The device id inside a user alias; None for aliases libvirt made up (``net0``) or we could not have set."""
    if not alias.startswith(ALIAS_PREFIX):
        return None
    name = alias[len(ALIAS_PREFIX) :]
    return name if _ID.fullmatch(name) else None


def next_free_id(prefix: str, used_aliases: Iterable[str]) -> str:
    """The first of ``prefix0``, ``prefix1``, ... whose alias is not in ``used_aliases``.

    Deterministic on purpose: the same domain state always yields the same id,
    so a retried command names the device the same way.
    """
    used = set(used_aliases)
    for n in itertools.count():
        candidate = check_id(f"{prefix}{n}")
        if user_alias(candidate) not in used:
            return candidate
    raise AssertionError("unreachable")  # itertools.count() never ends


def choose_id(device_id: str | None, *, prefix: str, used_aliases: Iterable[str]) -> str:
    """The id for a new device: the user's (checked, refused if taken) or the next free ``prefixN``."""
    used = set(used_aliases)
    if device_id is None:
        return next_free_id(prefix, used)
    check_id(device_id)
    if user_alias(device_id) in used:
        raise errors.InvalidRequest(
            f"duplicate id {device_id!r}: the domain already has a device with alias {user_alias(device_id)!r}",
            hint="choose another --id, or leave it out to get the next free one",
        )
    return device_id


def set_alias(device: etree._Element, alias: str) -> etree._Element:
    """Give ``device`` the child ``<alias name=ALIAS/>``, reusing an existing ``<alias>`` so order is kept."""
    if id_from_alias(alias) is None:
        raise ValueError(f"not a user alias: {alias!r}")
    el = device.find("alias")
    if el is None:
        el = etree.SubElement(device, "alias")
    el.attrib.clear()
    el.set("name", alias)
    return el
