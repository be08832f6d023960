"""NIC requests: every refusal, byte-stable XML, and XML that libvirt's schema and libvirt itself accept.

The helpers at the top (schema check, libvirt round trip, template scan) are
shared with test_disk_spec.py.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import re
from pathlib import Path

import libvirt
import pytest
from lxml import etree

from tests.conftest import golden
from vhotplug import errors, templates
from vhotplug.devices import common, nic
from vhotplug.devices.common import check_id, choose_id, id_from_alias, next_free_id, set_alias, user_alias
from vhotplug.devices.nic import NIC_MODELS, NicSpec, nic_spec, nic_xml

DOMAIN_RNG = Path("/usr/share/libvirt/schemas/domain.rng")
TEST_URI = "test:///default"
MAC = "52:54:00:12:34:56"


# ---------------------------------------------------------------- shared helpers


def as_domain(device: etree._Element, *, name: str = "x") -> etree._Element:
    """The smallest domain libvirt's schema accepts, holding a copy of ``device``."""
    dom = etree.Element("domain", type="qemu")
    etree.SubElement(dom, "name").text = name
    etree.SubElement(dom, "memory").text = "65536"
    os_el = etree.SubElement(dom, "os")
    etree.SubElement(os_el, "type").text = "hvm"
    etree.SubElement(dom, "devices").append(copy.deepcopy(device))
    return dom


@functools.cache
def _domain_schema() -> etree.RelaxNG:
    return etree.RelaxNG(etree.parse(str(DOMAIN_RNG)))


def assert_schema_valid(device: etree._Element) -> None:
    """Fail unless ``device``, inside a minimal domain, validates against libvirt's RelaxNG."""
    if not DOMAIN_RNG.exists():
        pytest.skip(f"libvirt's schemas are not installed ({DOMAIN_RNG})")
    schema = _domain_schema()
    assert schema.validate(as_domain(device)), str(schema.error_log)


def libvirt_round_trip(device: etree._Element, name: str) -> etree._Element:
    """``device`` as libvirt's test driver parses and re-serializes it (found again by its alias).

    Hot-plug first; the test driver has no attach (VIR_ERR_NO_SUPPORT), so then
    define a domain holding the device, with libvirt's own schema validation on.
    """
    alias = device.find("alias").get("name")
    xml = etree.tostring(device, encoding="unicode")
    conn = libvirt.open(TEST_URI)
    try:
        running = conn.createXML(etree.tostring(as_domain(etree.Element("memballoon", model="none"),
                                                          name=name + "-live"), encoding="unicode"), 0)
        try:
            running.attachDeviceFlags(xml, 0)
            out = running.XMLDesc(0)
        except libvirt.libvirtError as e:
            if e.get_error_code() != libvirt.VIR_ERR_NO_SUPPORT:
                raise
            out = None
        finally:
            running.destroy()
        if out is None:
            dom = conn.defineXMLFlags(etree.tostring(as_domain(device, name=name), encoding="unicode"),
                                      libvirt.VIR_DOMAIN_DEFINE_VALIDATE)
            try:
                out = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
            finally:
                dom.undefine()
    finally:
        conn.close()
    found = etree.fromstring(out.encode()).xpath(f"devices/*[alias/@name='{alias}']")
    assert len(found) == 1, f"libvirt dropped the device or its alias {alias}:\n{out}"
    return found[0]


# ---------------------------------------------------------------- templates


@pytest.mark.parametrize("path", sorted(templates.template_dir().glob("*.xml")), ids=lambda p: p.name)
def test_templates_have_no_placeholders(path: Path) -> None:
    # Templates are filled through lxml; a placeholder means someone is formatting XML as text.
    text = path.read_text()
    for token in ("{", "$", "%("):
        assert token not in text, f"{path.name} contains {token!r}: fill templates through lxml, not text"
    etree.fromstring(text.encode())  # and it is well-formed


# ---------------------------------------------------------------- ids and aliases (devices/common.py)


@pytest.mark.parametrize("name", ["a", "0", "nic0", "my-disk_2", "A" * 16, "x-"])
def test_check_id_accepts(name: str) -> None:
    assert check_id(name) == name


@pytest.mark.parametrize("name", ["", "-a", "_a", "a" * 17, "a b", "a.b", "ua:x", "é", "a/b", "a\n"])
def test_check_id_refuses(name: str) -> None:
    with pytest.raises(errors.InvalidRequest) as exc:
        check_id(name)
    assert f"invalid device id {name!r}" in exc.value.message
    assert exc.value.hint is not None and "16" in exc.value.hint


def test_user_alias_round_trip() -> None:
    assert user_alias("data") == "ua-data"
    assert id_from_alias("ua-data") == "data"
    assert id_from_alias("net0") is None  # libvirt's own alias
    assert id_from_alias("ua-") is None
    assert id_from_alias("ua-bad.name") is None
    with pytest.raises(errors.InvalidRequest):
        user_alias("bad id")


def test_next_free_id_is_deterministic() -> None:
    assert next_free_id("nic", []) == "nic0"
    assert next_free_id("nic", ["ua-nic0", "ua-nic2", "net0", "nic1"]) == "nic1"
    assert next_free_id("disk", (f"ua-disk{i}" for i in range(12))) == "disk12"


def test_choose_id() -> None:
    assert choose_id(None, prefix="nic", used_aliases=["ua-nic0"]) == "nic1"
    assert choose_id("mine", prefix="nic", used_aliases=["ua-nic0"]) == "mine"
    with pytest.raises(errors.InvalidRequest, match="duplicate id 'nic0'"):
        choose_id("nic0", prefix="nic", used_aliases=["ua-nic0"])


def test_set_alias_reuses_the_element() -> None:
    dev = etree.fromstring("<interface><alias name='old'/><model/></interface>")
    set_alias(dev, "ua-new")
    assert etree.tostring(dev) == b'<interface><alias name="ua-new"/><model/></interface>'
    bare = etree.Element("disk")
    set_alias(bare, "ua-d")
    assert bare.find("alias").get("name") == "ua-d"
    with pytest.raises(ValueError):
        set_alias(bare, "net0")


# ---------------------------------------------------------------- nic_spec


def test_defaults() -> None:
    spec = nic_spec()
    assert (spec.model, spec.source_type, spec.source, spec.alias) == ("virtio", "user", None, "ua-nic0")
    assert re.fullmatch(r"52:54:00(:[0-9a-f]{2}){3}", spec.mac)


def test_sources() -> None:
    assert nic_spec(network="default", mac=MAC).source_type == "network"
    assert nic_spec(network="default", mac=MAC).source == "default"
    assert (nic_spec(bridge="br0", mac=MAC).source_type, nic_spec(bridge="br0", mac=MAC).source) == ("bridge", "br0")
    assert (nic_spec(user=True, mac=MAC).source_type, nic_spec(user=True, mac=MAC).source) == ("user", None)


@pytest.mark.parametrize(
    "kw",
    [
        {"network": "default", "bridge": "br0"},
        {"network": "default", "user": True},
        {"bridge": "br0", "user": True},
        {"network": "default", "bridge": "br0", "user": True},
    ],
)
def test_one_source_only(kw: dict[str, object]) -> None:
    with pytest.raises(errors.InvalidRequest) as exc:
        nic_spec(mac=MAC, **kw)  # type: ignore[arg-type]
    assert "a NIC has one source" in exc.value.message
    for key in kw:
        assert f"--{key}" in exc.value.message


@pytest.mark.parametrize("name", ["default", "net-1", "a.b", "ovs:x", "N_1", "n" * 64])
def test_network_names_accepted(name: str) -> None:
    assert nic_spec(network=name, mac=MAC).source == name


@pytest.mark.parametrize("name", ["", "two words", "a/b", "n" * 65, "é", "x'y", "<br>"])
@pytest.mark.parametrize("kind", ["network", "bridge"])
def test_source_names_refused(kind: str, name: str) -> None:
    with pytest.raises(errors.InvalidRequest) as exc:
        nic_spec(mac=MAC, **{kind: name})  # type: ignore[arg-type]
    assert f"invalid {kind} name {name!r}" in exc.value.message


def test_bridge_name_longer_than_a_linux_interface_name() -> None:
    assert nic_spec(bridge="b" * 15, mac=MAC).source == "b" * 15
    with pytest.raises(errors.InvalidRequest, match="longer than 15"):
        nic_spec(bridge="b" * 16, mac=MAC)


@pytest.mark.parametrize("model", NIC_MODELS)
def test_models_accepted(model: str) -> None:
    assert nic_spec(model=model, mac=MAC).model == model


@pytest.mark.parametrize("model", ["", "Virtio", "virtio-net-pci", "ne2k_pci", "vmxnet3"])
def test_models_refused(model: str) -> None:
    with pytest.raises(errors.InvalidRequest) as exc:
        nic_spec(model=model, mac=MAC)
    assert f"unknown NIC model {model!r}" in exc.value.message
    assert exc.value.hint == "choose one of virtio, e1000, e1000e, rtl8139"


def test_mac_normalized_to_lower_case() -> None:
    assert nic_spec(mac="52:54:00:AB:cD:EF").mac == "52:54:00:ab:cd:ef"


@pytest.mark.parametrize("mac", ["52:54:00:12:34", "52-54-00-12-34-56", "52:54:00:12:34:5g", "525400123456",
                                 "52:54:00:12:34:56:78", "52:54:00:12:34:5", " 52:54:00:12:34:56", ""])
def test_mac_format_refused(mac: str) -> None:
    with pytest.raises(errors.InvalidRequest) as exc:
        nic_spec(mac=mac)
    assert f"invalid MAC address {mac!r}" in exc.value.message
    assert exc.value.hint is not None and "six hex pairs" in exc.value.hint


@pytest.mark.parametrize("mac", ["01:00:5e:00:00:01", "33:33:00:00:00:01", "ff:ff:ff:ff:ff:ff", "53:54:00:12:34:56"])
def test_multicast_mac_refused(mac: str) -> None:
    with pytest.raises(errors.InvalidRequest, match="multicast"):
        nic_spec(mac=mac)


def test_zero_mac_refused() -> None:
    with pytest.raises(errors.InvalidRequest, match="all zeros"):
        nic_spec(mac="00:00:00:00:00:00")


def test_locally_administered_unicast_accepted() -> None:
    assert nic_spec(mac="02:00:00:00:00:01").mac == "02:00:00:00:00:01"


def test_duplicate_mac_refused_whatever_the_case() -> None:
    with pytest.raises(errors.InvalidRequest) as exc:
        nic_spec(mac="52:54:00:aa:bb:cc", used_macs=["52:54:00:AA:BB:CC"])
    assert exc.value.message.startswith("duplicate MAC address 52:54:00:aa:bb:cc")


def test_generated_mac_avoids_used_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    draws = iter([b"\x12\x34\x56", b"\x12\x34\x56", b"\xab\xcd\xef"])
    monkeypatch.setattr(nic.secrets, "token_bytes", lambda n: next(draws))
    assert nic_spec(used_macs=["52:54:00:12:34:56"]).mac == "52:54:00:ab:cd:ef"


def test_generated_mac_gives_up_when_every_draw_collides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nic.secrets, "token_bytes", lambda n: b"\x00\x00\x01")
    with pytest.raises(errors.VhotplugError, match="could not draw a free MAC"):
        nic_spec(used_macs=["52:54:00:00:00:01"])


def test_ids() -> None:
    assert nic_spec(mac=MAC, used_aliases=["ua-nic0", "ua-nic1", "net0"]).alias == "ua-nic2"
    assert nic_spec(mac=MAC, id="uplink").alias == "ua-uplink"
    with pytest.raises(errors.InvalidRequest) as exc:
        nic_spec(mac=MAC, id="uplink", used_aliases=["ua-uplink"])
    assert "duplicate id 'uplink'" in exc.value.message
    with pytest.raises(errors.InvalidRequest, match="invalid device id"):
        nic_spec(mac=MAC, id="up link")


def test_spec_is_frozen() -> None:
    spec = nic_spec(mac=MAC)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.mac = "52:54:00:00:00:02"  # type: ignore[misc]


# ---------------------------------------------------------------- nic_xml

# Every model once, every source once: adding a model or source without a golden file fails here.
CASES: list[tuple[str, str, dict[str, object]]] = [
    *((model, "user", {}) for model in NIC_MODELS),
    ("virtio", "network", {"network": "default"}),
    ("e1000e", "bridge", {"bridge": "br0"}),
]


def _case_spec(model: str, kw: dict[str, object]) -> NicSpec:
    return nic_spec(model=model, mac=MAC, id="mynic", **kw)  # type: ignore[arg-type]


def test_cases_cover_every_model_and_source() -> None:
    assert {m for m, _, _ in CASES} == set(NIC_MODELS)
    assert {s for _, s, _ in CASES} == set(nic.SOURCE_TYPES)


@pytest.mark.parametrize(("model", "source", "kw"), CASES, ids=[f"{m}-{s}" for m, s, _ in CASES])
def test_nic_xml_golden(model: str, source: str, kw: dict[str, object]) -> None:
    golden(f"nic-{model}-{source}.xml", templates.tostring(nic_xml(_case_spec(model, kw))))


@pytest.mark.parametrize(("model", "source", "kw"), CASES, ids=[f"{m}-{s}" for m, s, _ in CASES])
def test_nic_xml_is_valid_against_libvirt_schema(model: str, source: str, kw: dict[str, object]) -> None:
    assert_schema_valid(nic_xml(_case_spec(model, kw)))


@pytest.mark.parametrize(("model", "source", "kw"), CASES, ids=[f"{m}-{s}" for m, s, _ in CASES])
def test_libvirt_accepts_nic_xml(model: str, source: str, kw: dict[str, object]) -> None:
    spec = _case_spec(model, kw)
    back = libvirt_round_trip(nic_xml(spec), name=f"vhunit-nic-{model}-{source}")
    assert back.get("type") == spec.source_type
    assert back.find("mac").get("address") == spec.mac
    assert back.find("model").get("type") == spec.model
    if spec.source is None:
        assert back.find("source") is None
    else:
        assert back.find("source").get(spec.source_type) == spec.source


def test_nic_xml_shape() -> None:
    el = nic_xml(nic_spec(mac=MAC, id="n"))
    assert [c.tag for c in el] == ["mac", "model", "alias"]  # no <source> for user networking
    el = nic_xml(nic_spec(mac=MAC, id="n", bridge="br0"))
    assert [c.tag for c in el] == ["mac", "source", "model", "alias"]
    assert dict(el.find("source").attrib) == {"bridge": "br0"}


def test_nic_xml_is_byte_stable() -> None:
    spec = nic_spec(mac=MAC, id="n", network="default")
    first = templates.tostring(nic_xml(spec))
    assert all(templates.tostring(nic_xml(spec)) == first for _ in itertools.repeat(None, 3))


def test_nic_xml_needs_a_source_name_for_network() -> None:
    with pytest.raises(ValueError):
        nic_xml(NicSpec(model="virtio", source_type="network", source=None, mac=MAC, alias="ua-n"))


def test_common_alias_prefix_is_libvirts() -> None:
    # libvirt keeps user-chosen aliases only with this prefix.
    assert common.ALIAS_PREFIX == "ua-"
