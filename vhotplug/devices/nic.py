"""Network interfaces: validate what the user asked for, then build ``<interface>`` XML.

Validation (:func:`nic_spec`) and XML (:func:`nic_xml`) are separate steps, as in
virtinst: the spec holds every decided value (id, MAC, source), so the XML is a
pure function of it and byte-stable.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal, cast, get_args

from lxml import etree

from vhotplug import errors, templates
from vhotplug.devices.common import choose_id, set_alias, user_alias
from vhotplug.virt.flavor import QEMU, Flavor

NicModel = Literal["virtio", "e1000", "e1000e", "rtl8139"]
SourceType = Literal["user", "network", "bridge"]
NIC_MODELS: tuple[str, ...] = get_args(NicModel)
SOURCE_TYPES: tuple[str, ...] = get_args(SourceType)

_MAC = re.compile(r"[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}")
_SOURCE_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
# Linux interface names are at most IFNAMSIZ - 1 characters; a longer bridge cannot exist.
_BRIDGE_MAX = 15
# QEMU/KVM's OUI, the prefix libvirt uses for the MACs it generates.
QEMU_OUI = "52:54:00"
_MAC_DRAWS = 1000


@dataclass(frozen=True)
class NicSpec:
    model: NicModel | None  # None: no <model> (Xen's netfront, its only one)
    source_type: SourceType
    source: str | None  # network or bridge name; None for user networking
    mac: str  # lower case, colon-separated
    alias: str  # "ua-" + id


def check_mac(mac: str) -> str:
    """``mac`` in lower case if it is a usable unicast address, else :class:`errors.InvalidRequest`."""
    if not _MAC.fullmatch(mac):
        raise errors.InvalidRequest(f"invalid MAC address {mac!r}",
                                    hint="give six hex pairs separated by ':', e.g. 52:54:00:12:34:56")
    mac = mac.lower()
    if int(mac[:2], 16) & 1:
        raise errors.InvalidRequest(
            f"invalid MAC address {mac!r}: it is a multicast address (lowest bit of the first octet set)",
            hint="a NIC needs a unicast address; the first octet must be even, e.g. 52:54:00:...",
        )
    if mac == "00:00:00:00:00:00":
        raise errors.InvalidRequest(f"invalid MAC address {mac!r}: all zeros",
                                    hint="give a real address, or leave --mac out to get one generated")
    return mac


def generate_mac(used_macs: Iterable[str] = (), oui: str = QEMU_OUI) -> str:
    """A random MAC in the hypervisor's range (QEMU's by default, as libvirt generates them), not in ``used_macs``."""
    used = {m.lower() for m in used_macs}
    for _ in range(_MAC_DRAWS):
        mac = oui + "".join(f":{b:02x}" for b in secrets.token_bytes(3))
        if mac not in used:
            return mac
    raise errors.VhotplugError(f"could not draw a free MAC address in {oui}:xx:xx:xx after {_MAC_DRAWS} tries",
                               hint="give one with --mac")


def _check_source_name(kind: str, name: str) -> str:
    if not _SOURCE_NAME.fullmatch(name):
        raise errors.InvalidRequest(f"invalid {kind} name {name!r}",
                                    hint="use 1 to 64 letters, digits, '_', '.', ':' or '-'")
    if kind == "bridge" and len(name) > _BRIDGE_MAX:
        raise errors.InvalidRequest(f"invalid bridge name {name!r}: longer than {_BRIDGE_MAX} characters",
                                    hint="Linux interface names have at most 15 characters; see `ip link`")
    return name


def _source(network: str | None, bridge: str | None, user: bool,
            flavor: Flavor = QEMU) -> tuple[SourceType, str | None]:
    given = [flag for flag, on in (("--network", network is not None), ("--bridge", bridge is not None),
                                   ("--user", user)) if on]
    if len(given) > 1:
        raise errors.InvalidRequest(f"a NIC has one source, got {' and '.join(given)}",
                                    hint="give one of --network NAME, --bridge BR or --user")
    if network is not None:
        return "network", _check_source_name("network", network)
    if bridge is not None:
        return "bridge", _check_source_name("bridge", bridge)
    if "user" not in flavor.nic_sources:
        hint = "connect it to a bridge (--bridge BR, e.g. xenbr0) or a libvirt network (--network NAME)"
        if user:
            raise flavor.unsupported("give a NIC user-mode networking: there is none", hint=hint)
        raise errors.InvalidRequest(f"a NIC on {flavor.label} needs a source: there is no user-mode networking",
                                    hint=hint)
    return "user", None


def _model(model: str | None, flavor: Flavor) -> str | None:
    if not flavor.nic_models:  # the driver has one model and takes no <model>
        if model not in (None, "netfront"):
            raise flavor.unsupported(f"emulate the NIC model {model!r}", hint="leave --model out: the guest gets "
                                     "a paravirtual NIC (netfront)")
        return None
    model = flavor.nic_model if model is None else model
    if model not in flavor.nic_models:
        raise errors.InvalidRequest(f"unknown NIC model {model!r}",
                                    hint=f"choose one of {', '.join(flavor.nic_models)}")
    return model


def nic_spec(
    *,
    model: str | None = None,
    network: str | None = None,
    bridge: str | None = None,
    user: bool = False,
    mac: str | None = None,
    id: str | None = None,  # shadows the builtin on purpose: the user calls it --id
    used_aliases: Iterable[str] = (),
    used_macs: Iterable[str] = (),
    flavor: Flavor = QEMU,
) -> NicSpec:
    """Validate a NIC request against the domain's current devices and decide every value.

    ``used_aliases`` and ``used_macs`` come from the domain's XML; a given id or
    MAC already there is refused. Without ``mac`` one is drawn at random in the
    hypervisor's range; without ``id`` the next free ``nicN`` is taken. ``flavor``
    (the hypervisor driver) decides which models and sources there are.
    """
    chosen = _model(model, flavor)
    source_type, source = _source(network, bridge, user, flavor)
    used_macs = {m.lower() for m in used_macs}
    if mac is None:
        mac = generate_mac(used_macs, flavor.mac_oui)
    else:
        mac = check_mac(mac)
        if mac in used_macs:
            raise errors.InvalidRequest(f"duplicate MAC address {mac}: the domain already has a NIC with it",
                                        hint="give another --mac, or leave it out to get a fresh one")
    device_id = choose_id(id, prefix="nic", used_aliases=used_aliases)
    return NicSpec(model=cast(NicModel | None, chosen), source_type=source_type, source=source, mac=mac,
                   alias=user_alias(device_id))


def nic_xml(spec: NicSpec) -> etree._Element:
    """The ``<interface>`` element for ``spec``, from ``xml_templates/interface.xml``."""
    root = templates.load("interface")
    root.set("type", spec.source_type)
    root.find("mac").set("address", spec.mac)
    source = root.find("source")
    if spec.source_type == "user":
        root.remove(source)
    elif spec.source is None:
        raise ValueError(f"a {spec.source_type} NIC needs a source name")
    else:
        source.set(spec.source_type, spec.source)
    if spec.model is None:
        root.remove(root.find("model"))
    else:
        root.find("model").set("type", spec.model)
    set_alias(root, spec.alias)
    return root
