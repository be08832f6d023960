"""Hostile input (issue #12, item 6): every CLI argument that reaches XML, a guest command, a path or a file name,
fuzzed over argv with a fixed example budget (``derandomize=True``: the same examples on every run, in CI too).

Each CLI example runs the real entry point in-process (the ``cli`` fixture: ``main(argv)`` and its one error
boundary) against libvirt's test driver, or the recording fake for host devices, and asserts more than the exit
code:

- the exit code is a documented one the command may give, and nothing escapes as a Python exception
  (``cli`` lets anything but SystemExit through) or a "Traceback" on stderr;
- a refusal is one line ``vhotplug: error: ...`` (and at most a hint line), or Click's usage report (exit 2);
  stderr never carries raw control characters or undecodable text: the user's text is quoted, not echoed;
- ``--print-xml`` output parses, has exactly the one expected root element with exactly the expected elements
  and attributes (no element, attribute, comment or entity smuggled in), no control characters, and the
  user's value round-trips exactly as the attribute or text it belongs in;
- guest command lines built from user text split (``shlex.split``) back into the exact argv, each value one
  whole word; file names made from user text stay inside their directory.

Hostile values: quotes, ``$()`` and backticks, newlines, NULs, other control characters, ``..`` and ``/``,
XML markup and entities, undecodable argv bytes (lone surrogates, as Python decodes them), other scripts'
digits, very long and huge-number values, and valid values with any of these before or after them.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import math
import operator
import os
import re
import shlex
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote

import pytest
from hypothesis import HealthCheck, assume, event, example, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from lxml import etree

from tests.conftest import CliResult
from tests.unit.fakevirt import FakeConnection
from tests.unit.test_host_usage import build_host
from vhotplug import errors
from vhotplug.addresses import parse_bdf
from vhotplug.cli import attach_cmd, detach_cmd, hostdev_cmd
from vhotplug.cli.options import MAX_TIMEOUT
from vhotplug.errors import ExitCode
from vhotplug.guest import hotplug, mux, ping
from vhotplug.guest.ssh import GuestSession, Result
from vhotplug.guest.target import SSHTarget
from vhotplug.guest.watch import WATCH_SCRIPT, Identity, watch_command
from vhotplug.host import journal, lock
from vhotplug.ops import passthrough
from vhotplug.units import parse_size
from vhotplug.virt import pending

TEST_URI = "test:///default"
DOMAIN = "test"  # the test driver's running domain: disk vda, NIC aa:bb:cc:dd:ee:ff
DOCUMENTED = frozenset(int(code) for code in ExitCode)
# What a refusal may exit with: refused (5), not found (3), unsupported (6), a usage error (2).
REFUSED = {ExitCode.USAGE, ExitCode.NOT_FOUND, ExitCode.INVALID, ExitCode.UNSUPPORTED}


def fuzz(examples: int):
    """The fixed budget: the same ``examples`` examples on every run, no example database, no deadline."""
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


# ------------------------------------------------------------------------------------------------ hostile text

HOSTILE = [
    "", " ", "\t", "'", '"', "\\", "'; reboot #", '"; reboot #', "$(reboot)", "`reboot`", "${IFS}x", "a;b", "a|b",
    "a&&b", "a\nb", "\n", "\r\n", "\x00", "a\x00b", "\x01", "\x1b[2J", "\x7f", "\x85", "..", "../..",
    "../../etc/passwd", "/", "a/b", "~", "*", "-", "--", "-h", "--help", "<x/>", "&amp;", "&#0;", "]]>", "<!--",
    '"/><x y="', "'/><x y='", "\u2028", "\ufeff", "\ufffe", "\udcff", "\ud800", "\U0001f600", "\u0661", "\u00b2",
    "\uff10", "\u00e9", "A" * 300, "9" * 5000, "9" * 12, "-1", "0", "0x10", "1e400", "nan",
]
# Characters that matter to a shell, XML, a path or a terminal, mixed into random text.
SPECIAL = [*"'\"\\$`;|&<>()[]{}*?~!#%=:,./-_ \t\n\r\x00\x01\x1b\x7f\x85",
           "\u2028", "\ufeff", "\ufffe", "\udcff", "\ud800", "\u0661", "\u00b2"]

_pieces = st.one_of(
    st.sampled_from(HOSTILE),
    st.text(st.one_of(st.characters(), st.sampled_from(SPECIAL)), max_size=24),
)


def hostile(*valid: str) -> st.SearchStrategy[str]:
    """Hostile text; with ``valid`` values also those values as they are (the success path must be covered too)
    and with hostile text before or after them."""
    if not valid:
        return _pieces
    good = st.sampled_from(valid)
    return st.one_of(good, st.builds(operator.add, good, _pieces), st.builds(operator.add, _pieces, good), _pieces)


def maybe(*valid: str) -> st.SearchStrategy[str | None]:
    """An optional argument: left out, a valid value, or hostile text (so that each example has a fair chance to
    get through to the XML with the hostile part where it is)."""
    return st.one_of(st.none(), st.sampled_from(valid), hostile(*valid))


def possible_argv(text: str) -> bool:
    """Text an exec'd process can have in its argv: no NUL, and only the surrogates undecodable bytes give."""
    try:
        return b"\0" not in os.fsencode(text)
    except UnicodeEncodeError:
        return False


def clean(text: str) -> bool:
    """No control characters and nothing undecodable: what may reach XML, a guest command or a terminal."""
    return not any(unicodedata.category(c) in ("Cc", "Cs") for c in text)


# ------------------------------------------------------------------------------------------------ the checks


def check_result(r: CliResult, allowed: set[int] | frozenset[int]) -> None:
    """What holds for every example: a documented code, no traceback, a refusal as one quoted line."""
    if currently_in_test_context():
        event(f"exit {r.code}")  # --hypothesis-show-statistics: how many examples took each way
    assert r.code in DOCUMENTED, (r.code, r.err)
    assert r.code in allowed, (r.code, r.err)
    assert "Traceback" not in r.err and "Traceback" not in r.out
    assert clean(r.err.replace("\n", "")), f"raw control characters or undecodable text on stderr: {r.err!r}"
    if r.code == ExitCode.OK:
        return
    assert r.out == "", r.out
    if r.code == ExitCode.USAGE:  # Click's own report: usage, then the error
        assert "Error:" in r.err, r.err
        return
    lines = r.err.split("\n")
    assert lines[-1] == "" and lines[0].startswith("vhotplug: error: "), r.err
    assert len(lines) == 2 or (len(lines) == 3 and lines[1].startswith("vhotplug: hint: ")), r.err


def device_xml(out: str, root_tag: str) -> etree._Element:
    """The printed XML: parsed without entities or network, one root of ``root_tag``, elements only."""
    assert clean(out.replace("\n", "")), f"control characters in the XML: {out!r}"
    parser = etree.XMLParser(resolve_entities=False, no_network=True, remove_blank_text=True, huge_tree=False)
    root = etree.fromstring(out.encode(), parser)
    assert root.tag == root_tag
    assert root.getroottree().docinfo.doctype == ""
    assert root.getprevious() is None and root.getnext() is None  # no comment or PI beside the root
    for el in root.iter():
        assert isinstance(el.tag, str), f"not an element: {el!r}"  # no comment, PI or entity inside
        for value in [*el.attrib.values(), el.text or ""]:
            assert clean(value), f"control characters in {el.tag}: {value!r}"
    return root


def shape(root: etree._Element) -> list[tuple[str, tuple[str, ...]]]:
    """Every element (by path) with its attribute names: what must match exactly, whatever the user typed."""
    tree = root.getroottree()
    return [(tree.getpath(el), tuple(sorted(el.attrib))) for el in root.iter()]


def texts(root: etree._Element) -> dict[str, str]:
    tree = root.getroottree()
    return {tree.getpath(el): el.text for el in root.iter() if el.text and el.text.strip()}


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Locks, journal, pending records and images in this test's own directories."""
    monkeypatch.setenv("VHOTPLUG_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("VHOTPLUG_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("VHOTPLUG_IMAGE_DIR", str(tmp_path / "images"))
    return tmp_path


# ------------------------------------------------------------------------------------------------ attach nic


@fuzz(100)
@given(id=maybe("nic7", "a", "A-b_9", "x" * 16), mac=maybe("52:54:00:12:34:56", "52:54:00:AB:cd:EF"),
       source=st.sampled_from([None, "--network", "--bridge"]),
       name=st.one_of(st.sampled_from(["default", "br0", "a.b:c-d"]), hostile("default", "br0", "a.b:c-d")),
       model=maybe("virtio", "e1000", "rtl8139"))
@example(id="nic7\n", mac=None, source=None, name="", model=None)
@example(id=None, mac="52:54:00:12:34:56\n", source=None, name="", model=None)
@example(id=None, mac=None, source="--network", name='default"/><x y="', model=None)
@example(id=None, mac=None, source=None, name="", model="virtio'; reboot #")
def test_attach_nic_print_xml(cli, env, id, mac, source, name, model):
    args = ["--connect=" + TEST_URI, "attach", "nic", "--print-xml"]
    args += [f"--id={id}"] * (id is not None) + [f"--mac={mac}"] * (mac is not None)
    args += [f"{source}={name}"] * (source is not None) + [f"--model={model}"] * (model is not None)
    r = cli(*args, "--", DOMAIN)
    check_result(r, REFUSED | {ExitCode.OK})
    if r.code != ExitCode.OK:
        return
    root = device_xml(r.out, "interface")
    kind = source[2:] if source else "user"
    expected = [("/interface", ("type",)), ("/interface/mac", ("address",))]
    expected += [("/interface/source", (kind,))] * (source is not None)
    expected += [("/interface/model", ("type",)), ("/interface/alias", ("name",))]
    assert shape(root) == expected and texts(root) == {}
    assert root.get("type") == kind
    address = root.find("mac").get("address")
    assert re.fullmatch(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}", address) and (mac is None or address == mac.lower())
    if source is not None:
        assert root.find("source").get(kind) == name
    assert root.find("model").get("type") == (model if model is not None else "virtio")
    alias = root.find("alias").get("name")
    assert (alias == f"ua-{id}") if id is not None else re.fullmatch(r"ua-nic[0-9]+", alias)


# ------------------------------------------------------------------------------------------------ attach disk


def _image(base: Path, name: str) -> Path | None:
    """A file called ``name`` in ``base``, when the file system can have one by that name."""
    if name in ("", ".", "..") or "/" in name or "\0" in name:
        return None
    try:
        if len(os.fsencode(name)) > 255:
            return None
        path = base / name
        path.write_bytes(b"")
    except (UnicodeEncodeError, OSError):
        return None
    return path


@fuzz(80)
@given(name=hostile("data.img", "a b.img", "\u00e9.img"), form=st.sampled_from(["absolute", "dotdot", "relative"]),
       target=maybe("vdb", "vdz"), id=maybe("data", "d-1"))
@example(name="a\x01b", form="absolute", target=None, id=None)  # lxml refused it: a ValueError traceback
@example(name="\udcff", form="absolute", target=None, id=None)  # undecodable bytes: UnicodeEncodeError traceback
@example(name="a\nb", form="absolute", target=None, id=None)  # broke the "not found" message over two lines
@example(name="$(reboot)'\"", form="dotdot", target=None, id=None)
def test_attach_disk_path_print_xml(cli, env, monkeypatch, name, form, target, id):
    base = env / "img"
    base.mkdir(exist_ok=True)
    made = _image(base, name)
    given_path = {"absolute": f"{base}/{name}", "dotdot": f"{base}/../img/{name}", "relative": f"img/{name}"}[form]
    monkeypatch.chdir(env)
    args = ["--connect=" + TEST_URI, "attach", "disk", "--print-xml"]
    args += [f"--target={target}"] * (target is not None) + [f"--id={id}"] * (id is not None)
    r = cli(*args, "--", DOMAIN, given_path)
    check_result(r, REFUSED | {ExitCode.OK})
    if r.code != ExitCode.OK:
        return
    assert made is not None or os.path.isfile(os.path.abspath(given_path)), "accepted a path that is no file"
    root = device_xml(r.out, "disk")
    assert shape(root) == [("/disk", ("device", "type")), ("/disk/driver", ("name", "type")),
                           ("/disk/source", ("file",)), ("/disk/target", ("bus", "dev")), ("/disk/serial", ()),
                           ("/disk/alias", ("name",))]
    assert root.find("source").get("file") == os.path.abspath(given_path)
    assert root.find("target").get("dev") == (target if target is not None else "vdb")
    alias = root.find("alias").get("name")
    assert alias == (f"ua-{id}" if id is not None else "ua-disk0")
    assert texts(root) == {"/disk/serial": "vh-" + alias[3:]}


@fuzz(50)
@given(size=st.one_of(st.sampled_from(["64M", "1G", "512b"]), hostile("64M", "1G", "512b", "131072KiB")),
       id=maybe("data"))
@example(size="-1G", id=None)
@example(size="99999999999999999999999999999999E", id=None)
@example(size="9" * 5000, id=None)  # Fraction()/int() refuse over 4300 digits: a ValueError traceback
@example(size="0." + "0" * 5000 + "1G", id=None)
@example(size="1G", id="../../x")
def test_attach_disk_size_print_xml(cli, env, size, id):
    args = ["--connect=" + TEST_URI, "attach", "disk", "--print-xml", f"--size={size}"]
    r = cli(*args, *[f"--id={id}"] * (id is not None), "--", DOMAIN)
    check_result(r, REFUSED | {ExitCode.OK})
    if r.code != ExitCode.OK:
        return
    root = device_xml(r.out, "disk")
    source = Path(root.find("source").get("file"))
    assert source.parent == env / "images" / DOMAIN and source.name == f"{id or 'disk0'}.img"
    assert parse_size(size) % 512 == 0
    assert not (env / "images").exists()  # --print-xml creates nothing


# ------------------------------------------------------------------------------------------------ memory add


@fuzz(50)
@given(size=st.one_of(st.sampled_from(["128M", "1G"]), hostile("128M", "1G", "262144KiB")), id=maybe("dimm3", "m"),
       node=maybe("0", "1"), online=maybe("online", "online_movable"))
@example(size="1G", id=None, node="99999999999999999999999", online=None)
@example(size="1G", id=None, node=None, online="online\n")
@example(size="0" * 5000 + "1G", id=None, node=None, online=None)  # a ValueError traceback in parse_size
def test_memory_add_print_xml(cli, env, size, id, node, online):
    args = ["--connect=" + TEST_URI, "memory", "add", "--print-xml"]
    args += [f"--id={id}"] * (id is not None) + [f"--node={node}"] * (node is not None)
    args += [f"--online-type={online}"] * (online is not None)
    r = cli(*args, "--", DOMAIN, size)
    check_result(r, REFUSED | {ExitCode.OK})
    if r.code != ExitCode.OK:
        return
    root = device_xml(r.out, "memory")
    assert shape(root) == [("/memory", ("model",)), ("/memory/target", ()), ("/memory/target/size", ("unit",)),
                           ("/memory/target/node", ()), ("/memory/alias", ("name",))]
    assert texts(root) == {"/memory/target/size": str(parse_size(size) // 1024), "/memory/target/node": "0"}
    assert online in (None, "online", "online_movable")
    alias = root.find("alias").get("name")
    assert alias == (f"ua-{id}" if id is not None else "ua-dimm0")


# ------------------------------------------------------------------------------------------------ domain, URI


@fuzz(60)
@given(domain=hostile(DOMAIN, "1", "6695eb01-f6a4-8304-79aa-97f2502e193f"),
       command=st.sampled_from([("list",), ("attach", "nic", "--print-xml"), ("memory", "add", "--print-xml"),
                                ("detach",), ("info", "usb")]))
@example(domain="\udcff", command=("list",))  # libvirt's binding raised UnicodeEncodeError
@example(domain="te\x00st", command=("attach", "nic", "--print-xml"))  # and ValueError for a NUL
def test_hostile_domain_names(cli, env, domain, command):
    tail = {"list": [], "attach": [], "memory": ["1G"], "detach": ["ua-none"], "info": []}[command[0]]
    r = cli("--connect=" + TEST_URI, *command, "--", domain, *tail)
    check_result(r, REFUSED | {ExitCode.OK, ExitCode.UNSUPPORTED})
    if r.code == ExitCode.OK:  # only the test domain, by name, id or UUID (lookup strips blanks, as virsh)
        assert domain.strip() in (DOMAIN, "1", "6695eb01-f6a4-8304-79aa-97f2502e193f"), domain


@pytest.mark.parametrize("ident", ["99999999999", "9" * 5000, "\u00b2", "\u0661"])
def test_numeric_domain_refs_outside_an_id_are_not_found(cli, env, ident):
    """Digit strings that are no libvirt domain id (above INT_MAX, over 4300 digits, other scripts' digits) are
    looked up as names: not found, never a traceback, and '\u0661' is not id 1."""
    r = cli("--connect=" + TEST_URI, "list", "--", ident)
    assert r.code == ExitCode.NOT_FOUND, r.err


@fuzz(30)
@given(uri=st.one_of(st.builds(operator.add, st.just(TEST_URI), _pieces),
                     st.sampled_from([h for h in HOSTILE if h and "\0" not in h])))
@example(uri="test:///default\udcff")  # libvirt's binding raised UnicodeEncodeError
@example(uri="test:///default\nx")  # split the "cannot connect" message over two lines
def test_hostile_uris(cli, env, uri):
    r = cli(f"--connect={uri}", "list", "--", DOMAIN)
    check_result(r, REFUSED | {ExitCode.OK, ExitCode.CONNECTION})
    assert r.code != ExitCode.OK or uri == TEST_URI or uri.startswith(TEST_URI)


@pytest.mark.parametrize("arg", ["a\x00b", "\x00", "/tmp/x\x00/../y", "\ud800", "a\udfffb"])
def test_impossible_argv_strings_are_refused(cli, env, arg):
    """No exec'd process has a NUL in its argv, nor a surrogate outside what undecodable bytes decode to; an
    embedding caller's is refused before anything parses it (typer's own os.stat of a Path raised)."""
    for args in (["attach", "disk", "--print-xml", "--", DOMAIN, arg], ["--connect=" + arg, "list", DOMAIN],
                 ["list", "--guest", f"--ssh-key={arg}", "--", DOMAIN]):
        r = cli(*args)
        check_result(r, {ExitCode.INVALID})
        assert "cannot come from a command line" in r.err


@fuzz(30)
@given(timeout=st.one_of(hostile("0.1", "30", "86400"), st.floats().map(repr)))
@example(timeout="nan")  # passed Click's minimum (NaN compares false) and never expired
@example(timeout="inf")  # OverflowError deep in the wait for libvirt's event
@example(timeout="1e10")
def test_hostile_timeouts(cli, env, timeout):
    r = cli("--connect=" + TEST_URI, "attach", "nic", "--print-xml", f"--timeout={timeout}", "--", DOMAIN)
    check_result(r, {ExitCode.OK, ExitCode.USAGE, ExitCode.INVALID})  # INVALID: a NUL (refused before Click)
    if r.code == ExitCode.OK:
        assert math.isfinite(float(timeout)) and 0.1 <= float(timeout) <= MAX_TIMEOUT


# ------------------------------------------------------------------------------------------------ SSH specs


def _check_login(t: SSHTarget, spec: str) -> None:
    """An accepted login: every part in the form it must have, and taken from what the user wrote."""
    assert re.fullmatch(r"[a-z_][a-z0-9_.-]{0,31}", t.user, re.IGNORECASE), t.user
    assert "@" not in spec.strip() or spec.strip().rsplit("@", 1)[0] == t.user
    assert 0 < t.port < 65536 and (str(t.port) in spec or t.port == 22)
    try:
        addr = ipaddress.ip_address(t.host)
    except ValueError:
        assert re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?", t.host), t.host
        assert t.host in spec
    else:
        assert str(addr) == t.host
        assert getattr(addr, "scope_id", None) is None or re.fullmatch(r"[A-Za-z0-9_.:-]{1,15}", addr.scope_id)


@fuzz(80)
@given(ssh=hostile("root@10.0.2.15:2222", "guest", "u_1@host.example:22", "[::1]:22", "[fe80::1%eth0]"),
       jump=maybe("root@10.0.0.1", "l1"), key=maybe("/tmp/id_lab", "key"))
@example(ssh="root\n@host", jump=None, key=None)  # "$" in re.match matched before the newline
@example(ssh="host\n:22", jump=None, key=None)
@example(ssh="[fe80::1%$(reboot)]:22", jump=None, key=None)  # ipaddress takes any zone text
@example(ssh="host:2_2", jump=None, key=None)  # int() took underscores, blanks and other scripts' digits
@example(ssh="host:\u0662\u0662", jump=None, key=None)
def test_ssh_specs(cli, env, monkeypatch, ssh, jump, key):
    seen: list[SSHTarget] = []

    def no_network(self: GuestSession) -> GuestSession:
        seen.append(self.target)
        raise errors.GuestUnreachable("fuzz: not connecting")

    monkeypatch.setattr(GuestSession, "connect", no_network)
    args = ["--connect=" + TEST_URI, "list", "--guest", f"--ssh={ssh}"]
    args += [f"--ssh-jump={jump}"] * (jump is not None) + [f"--ssh-key={key}"] * (key is not None)
    r = cli(*args, "--", DOMAIN)
    check_result(r, REFUSED | {ExitCode.GUEST_UNREACHABLE})
    if r.code != ExitCode.GUEST_UNREACHABLE:
        assert seen == []
        return
    assert r.err == "vhotplug: error: fuzz: not connecting\n" and len(seen) == 1
    target = seen[0]
    _check_login(target, ssh)
    if jump:  # an empty --ssh-jump is none
        assert target.jump is not None
        _check_login(target.jump, jump)
    if key is not None:
        assert target.key == Path(key)


# ------------------------------------------------------------------------------------------------ --ping


@fuzz(40)
@given(addr=hostile("10.0.2.2", "::1", "fe80::1%eth1"))
@example(addr="fe80::1%\x00")  # sshd would have cut the guest's command at the NUL
@example(addr="fe80::1%a b")
@example(addr="not-an-address")  # refused only after the NIC was attached
def test_ping_address_refused_before_anything_changes(cli, env, monkeypatch, addr):
    """An invalid --ping is refused before the attach, not after it (when the NIC had stayed attached)."""
    attached: list[str] = []

    class Session:
        def __enter__(self) -> Session:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

    def attach_device(*args: object, **kw: object) -> None:
        attached.append("attach")
        raise errors.Timeout("fuzz: stop after the attach was asked for")

    monkeypatch.setattr(attach_cmd, "open_guest", lambda *a, **kw: Session())
    monkeypatch.setattr(attach_cmd, "check_pci_room", lambda *a, **kw: None)
    monkeypatch.setattr(attach_cmd, "attach_device", attach_device)
    r = cli("--connect=" + TEST_URI, "attach", "nic", "--live", f"--ping={addr}", "--", DOMAIN)
    check_result(r, {ExitCode.INVALID, ExitCode.TIMEOUT})
    if r.code == ExitCode.INVALID:
        assert attached == [] and ("not an IP address" in r.err or "cannot come from a command line" in r.err)
    else:
        assert attached == ["attach"]
        _check_ping_address(addr)


def _check_ping_address(addr: str) -> None:
    """An accepted address: an IP address whose IPv6 zone, if any, is an interface name (not any text)."""
    zone = getattr(ipaddress.ip_address(addr), "scope_id", None)
    assert zone is None or re.fullmatch(r"[A-Za-z0-9_.:-]{1,15}", zone), addr


# ------------------------------------------------------------------------------------------------ host devices


@pytest.fixture
def fake(env: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, FakeConnection]:
    """The recording fake for host devices and detach; a fresh connection per example (``new()``)."""
    hostroot = env / "host"
    build_host(hostroot)
    holder: dict[str, FakeConnection] = {}

    @contextlib.contextmanager
    def fake_connection(uri: str | None) -> Iterator[FakeConnection]:
        yield holder["conn"]

    for module in (hostdev_cmd, detach_cmd):
        monkeypatch.setattr(module, "connection", fake_connection)
    real = passthrough.facts_root_for
    monkeypatch.setattr(passthrough, "facts_root_for", lambda c, override=None: real(c, hostroot))
    return holder


# Two devices with user aliases for detach to find (besides the lab XML's rng0), in the live XML and the definition.
_DEVICES = """<devices>
  <interface type='user'><mac address='52:54:00:00:00:01'/><model type='virtio'/><alias name='ua-nic0'/>
    <address type='pci' domain='0x0000' bus='0x06' slot='0x00' function='0x0'/></interface>
  <disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='/x.img'/>
    <target dev='vdb' bus='virtio'/><alias name='ua-data'/>
    <address type='pci' domain='0x0000' bus='0x07' slot='0x00' function='0x0'/></disk>
</devices>"""


def new(holder: dict[str, FakeConnection]) -> FakeConnection:
    conn = FakeConnection()
    conn.add_pci(parse_bdf("00:04.0"), driver="e1000e")  # free: eth1 down, alone in its group
    conn.add_usb(2, 4, 0x0781, 0x5567, ports="1")
    dom = conn.add_domain()
    for root in (dom.live, dom.config):
        root.find("devices").extend(list(etree.fromstring(_DEVICES)))
    holder["conn"] = conn
    return conn


@fuzz(50)
@given(bdf=hostile("00:04.0", "0000:00:04.0", "pci_0000_00_04_0"), id=maybe("nic9"))
@example(bdf="00:04.0\n", id=None)
@example(bdf="00:04.0", id="nic9'/><x a='")
def test_attach_pci_print_xml(cli, fake, bdf, id):
    new(fake)
    r = cli("attach", "pci", "--print-xml", *[f"--id={id}"] * (id is not None), "--", "guest1", bdf)
    check_result(r, REFUSED | {ExitCode.OK})
    if r.code != ExitCode.OK:
        return
    root = device_xml(r.out, "hostdev")
    guest_address = [("/hostdev/address", ("bus", "domain", "function", "slot", "type"))]  # chosen by vhotplug
    assert shape(root) in ([("/hostdev", ("managed", "mode", "type")), ("/hostdev/driver", ("name",)),
                            ("/hostdev/source", ()), ("/hostdev/source/address", ("bus", "domain", "function", "slot")),
                            ("/hostdev/alias", ("name",)), *extra] for extra in ([], guest_address))
    # Whatever was accepted named the one function there is.
    assert dict(root.find("source/address").attrib) == {"domain": "0x0000", "bus": "0x00", "slot": "0x04",
                                                         "function": "0x0"}
    assert root.find("alias").get("name") == (f"ua-{id}" if id is not None else "ua-pci0")


@fuzz(50)
@given(spec=hostile("host:0781:5567", "0781:5567", "host:002.004", "2.4", "2-1", "usb_2_1"),
       id=maybe("stick"))
@example(spec="host:0781:5567;reboot", id=None)
def test_attach_usb_print_xml(cli, fake, spec, id):
    new(fake)
    r = cli("attach", "usb", "--print-xml", *[f"--id={id}"] * (id is not None), "--", "guest1", spec)
    check_result(r, REFUSED | {ExitCode.OK})
    if r.code != ExitCode.OK:
        return
    root = device_xml(r.out, "hostdev")
    paths = [p for p, _ in shape(root)]
    assert paths in (["/hostdev", "/hostdev/source", "/hostdev/source/vendor", "/hostdev/source/product",
                      "/hostdev/source/address", "/hostdev/alias"],
                     ["/hostdev", "/hostdev/source", "/hostdev/source/vendor", "/hostdev/source/product",
                      "/hostdev/alias"])
    assert root.find("source/vendor").attrib == {"id": "0x0781"} and root.find("source/product").attrib == {
        "id": "0x5567"}
    address = root.find("source/address")
    assert address is None or dict(address.attrib) == {"bus": "2", "device": "4"}
    assert root.find("alias").get("name") == (f"ua-{id}" if id is not None else "ua-usb0")


def _names(dev: etree._Element) -> set[str]:
    """Every spelling ``detach`` accepts for a device of the fake's domain (lower case)."""
    alias = dev.find("alias").get("name", "") if dev.find("alias") is not None else ""
    names = {alias, alias.removeprefix("ua-")}
    mac, target, addr = dev.find("mac"), dev.find("target"), dev.find("address")
    if mac is not None:
        names.add(mac.get("address", ""))
    if dev.tag == "disk" and target is not None:
        names.add(target.get("dev", ""))
    if addr is not None and addr.get("type") == "pci":
        dom, bus, slot, fn = (int(addr.get(k), 16) for k in ("domain", "bus", "slot", "function"))
        full = f"{dom:04x}:{bus:02x}:{slot:02x}.{fn:x}"
        names.update({full, full[5:]})
    return {n.lower() for n in names if n}


@fuzz(60)
@given(ref=hostile("ua-nic0", "nic0", "data", "rng0", "52:54:00:00:00:01", "vdb", "0000:06:00.0", "07:00.0",
                   "host:00:04.0", "../../../../tmp/x"),
       config=st.booleans())
@example(ref="../../../../../../tmp/vhotplug-escape", config=False)  # became a path under pending-detach
@example(ref="a\x00b", config=False)
@example(ref="\udcff", config=False)
def test_detach_hostile_device_refs(cli, fake, monkeypatch, ref, config):
    conn = new(fake)
    dom = conn.domains[0]
    before = etree.fromstring(dom.snapshot()[0].encode())
    paths: list[Path] = []
    real_path = pending._path

    def spy(uuid: str, alias: str) -> Path:
        path = real_path(uuid, alias)
        paths.append(path)
        return path

    monkeypatch.setattr(pending, "_path", spy)
    r = cli("detach", "--live", "--no-verify", "--timeout=5", *["--config"] * config, "--", "guest1", ref)
    check_result(r, REFUSED | {ExitCode.OK})
    for path in paths:  # the user's text never leaves pending-detach/ nor reaches open() with a NUL
        assert path.parent == pending.run_dir() / "pending-detach" and "\0" not in str(path)
        assert os.path.normpath(path) == str(path) and path.name.endswith(".json")
    after = etree.fromstring(dom.snapshot()[0].encode())
    gone = [el for el in before.find("devices") if isinstance(el.tag, str) and el.find("alias") is not None
            and not after.xpath("devices/*[alias/@name=$a]", a=el.find("alias").get("name"))]
    if r.code != ExitCode.OK:
        assert gone == []  # a refusal changed nothing
        return
    assert len(gone) == 1
    names = _names(gone[0])
    wanted = ref.strip().lower()
    assert wanted in names or wanted.removeprefix("host:") in ("00:04.0", "0000:00:04.0"), (ref, names)


# ------------------------------------------------------------------------------------------------ guest commands


class RecordingSession(GuestSession):
    """A GuestSession whose ``run`` is the real one (argv quoted with shlex.join); the scripts it would send
    are recorded and answered like a guest with the interface ``eth1`` (no address until DHCP)."""

    def __init__(self, *, has_address: bool) -> None:  # no SSH, no paramiko
        self.scripts: list[str] = []
        self.has_address = has_address

    def run_script(self, script: str, *, timeout: float = 30.0, check: bool = True) -> Result:
        self.scripts.append(script)
        words = shlex.split(script)
        if words[:2] == ["ip", "-o"] and self.has_address:
            return Result(0, f"3: {words[-1]}    inet 10.0.2.16/24 brd 10.0.2.255 scope global {words[-1]}\n"
                          f"3: {words[-1]}    inet6 fe80::2/64 scope link\n", "")
        if words[:2] == ["sh", "-c"]:
            return Result(0, "udhcpc: lease of 10.0.2.15 obtained from 10.0.2.2, lease time 86400\n", "")
        if words[:1] == ["ping"]:
            return Result(0, "3 packets transmitted, 3 packets received, 0% packet loss\n"
                          "round-trip min/avg/max = 0.1/0.2/0.3 ms\n", "")
        return Result(0, "", "")


@fuzz(150)
@given(iface=hostile("eth1", "enp0s3", "br-lan.10"), addr=hostile("10.0.2.2", "::1", "fe80::1%eth1"),
       has_address=st.booleans())
@example(iface="eth1", addr="fe80::1%$(reboot)", has_address=True)  # ipaddress takes any zone text
@example(iface="eth1", addr="fe80::1%eth1\x00", has_address=True)  # sshd cuts the command at a NUL
@example(iface="eth1; reboot", addr="10.0.2.2", has_address=False)
def test_ping_commands_keep_each_value_one_word(iface, addr, has_address):
    session = RecordingSession(has_address=has_address)
    try:
        ping.ping_through(session, iface, addr)
    except errors.InvalidRequest:
        assert session.scripts == []  # refused before any command was sent
        return
    ip = str(ipaddress.ip_address(addr))
    family = "-6" if ":" in ip else "-4"
    expected = [["ip", "link", "set", "dev", iface, "up"], ["ip", "-o", family, "addr", "show", "dev", iface]]
    if family == "-4" and not has_address:
        expected += [["sh", "-c", ping.DHCP_SCRIPT, "sh", iface], ["ip", "addr", "add", "10.0.2.15/32", "dev", iface]]
    expected.append(["ping", "-c", "3", "-W", "2", "-I", iface, ip])
    assert [shlex.split(s) for s in session.scripts] == expected
    assert all(clean(s.replace(ping.DHCP_SCRIPT, "")) for s in session.scripts)  # no NUL or newline of the user's
    assert ping.IFACE_RE.fullmatch(iface)
    _check_ping_address(addr)


_IDENTITIES = {
    "nic": ("52:54:00:12:34:56", "52:54:00:AB:CD:EF"),
    "disk": ("vh-data", "vh-a.b_c"),
    "blockdev": ("xvdb", "vdc"),
    "pci": ("8086:100e", "1AF4:1041"),
    "usb": ("46f4:0001",),
}


@fuzz(150)
@given(pair=st.sampled_from(sorted(_IDENTITIES)).flatmap(lambda k: st.tuples(st.just(k), hostile(*_IDENTITIES[k]))),
       present=st.booleans(), timeout=st.floats(min_value=0.01, max_value=3600))
@example(pair=("disk", "vh-x'; reboot #"), present=True, timeout=1.0)
@example(pair=("nic", "52:54:00:12:34:56\n"), present=True, timeout=1.0)
def test_watch_command_keeps_the_identity_one_word(pair, present, timeout):
    kind, value = pair
    try:
        identity = Identity(kind, value)
    except errors.InvalidRequest:
        return
    assert identity.value in (value, value.lower()) and clean(identity.value)
    command = watch_command(identity, present=present, timeout=timeout)
    assert command.startswith("exec ")
    words = shlex.split(command)
    assert words[:9] == ["exec", "sh", "-c", WATCH_SCRIPT, "sh", kind, identity.value, "1" if present else "0",
                         str(max(1, round(timeout * 100)))]
    assert all(word == "" for word in words[9:])  # the optional arguments left out (sysroot, ...)


@fuzz(100)
@given(path=hostile("/sys/devices/system/cpu/cpu1/online"), want=hostile("1", "online"),
       timeout=st.floats(min_value=0.01, max_value=60))
def test_hotplug_scripts_take_values_as_arguments(path, want, timeout):
    session = RecordingSession(has_address=False)
    hotplug.wait_equals(session, path, want, timeout=timeout)
    polls = str(max(1, int(timeout / 0.02)))
    assert [shlex.split(s) for s in session.scripts] == [["sh", "-c", hotplug._WAIT_EQUALS, "sh", path, want, polls]]


@pytest.mark.parametrize("online_type", ["online\n", "offline ", "online; reboot", "$(reboot)", ""])
def test_hostile_block_states_never_reach_the_guest(online_type):
    session = RecordingSession(has_address=False)
    with pytest.raises(ValueError):
        hotplug.set_blocks(session, [1, 2], online_type)
    with pytest.raises(ValueError):
        hotplug.set_blocks(session, ["1; reboot"], "online")  # type: ignore[list-item]
    assert session.scripts == []


# ------------------------------------------------------------------------------------------------ paths


@fuzz(150)
@given(key=hostile("domain-6695eb01-f6a4-8304-79aa-97f2502e193f", "pci-0000_06_10_1", "usb-2-4"))
def test_lock_files_stay_in_the_lock_directory(env, key):
    try:
        path = lock.lock_path(key)
    except ValueError:
        assert key == ""
        return
    assert path.parent == lock.lock_dir() and re.fullmatch(r"[A-Za-z0-9_.-]+\.lock", path.name)
    assert lock.lock_path(lock.domain_key(key)).parent == lock.lock_dir()


@fuzz(150)
@given(uuid=hostile("6695eb01-f6a4-8304-79aa-97f2502e193f"), alias=hostile("ua-nic0", "net0", "pci.1"))
@example(uuid="6695eb01-f6a4-8304-79aa-97f2502e193f", alias="../../../../tmp/x")  # left pending-detach/
@example(uuid="6695eb01-f6a4-8304-79aa-97f2502e193f", alias="a\x00b")  # a NUL for open()
def test_pending_records_stay_in_their_directory(env, uuid, alias):
    path = pending._path(uuid, alias)
    assert path.parent == pending.run_dir() / "pending-detach"
    assert "/" not in path.name and "\0" not in path.name and path.name.endswith(".json")
    assert unquote(path.name[: -len(".json")], errors="surrogatepass") == f"{uuid}-{alias}"  # one record per alias
    if re.fullmatch(r"[A-Za-z0-9_.-]+", alias):  # libvirt's aliases keep their file names
        assert path.name == f"{uuid}-{alias}.json" or not re.fullmatch(r"[A-Za-z0-9_.-]+", uuid)
    if len(path.name) <= 255:
        pending.record(uuid, 7, alias)
        assert pending.pending_since(uuid, 7, alias) is not None
        assert pending.pending_since(uuid, 8, alias) is None  # the domain restarted: stale, and cleared
        assert list((pending.run_dir() / "pending-detach").iterdir()) == []


@fuzz(60)
@given(device=hostile("0000:06:10.1", "host:0781:5567"), domain=hostile("lab"), alias=hostile("ua-pci0"),
       uri=st.none() | hostile("qemu:///system"))
def test_journal_records_keep_hostile_text_and_their_place(env, device, domain, alias, uri):
    entry = journal.begin(journal.Entry(op="detach", kind="pci", device=device, domain=domain, domain_uuid="u",
                                        uri=uri, alias=alias))
    try:
        assert entry.path.parent == journal.journal_dir()
        assert re.fullmatch(r"[0-9T]+-[0-9]+-[0-9a-f]{8}\.json", entry.path.name)
        (back,) = journal.entries()
        assert (back.device, back.domain, back.alias, back.uri) == (device, domain, alias, uri)
        json.loads(entry.path.read_text())  # valid JSON whatever the text (surrogates escaped)
    finally:
        journal.finish(entry)
    assert journal.entries() == []


@fuzz(150)
@given(domain=hostile("lab", "web-1", "a.b"))
@example(domain="..")  # libvirt accepts a domain named "..": its images went above the images directory
@example(domain=".")
def test_image_folders_stay_in_the_image_directory(env, domain):
    folder = attach_cmd.image_dir(domain)
    base = env / "images"
    assert folder.parent == base and folder.name not in ("", ".", "..") and "\0" not in folder.name
    assert os.path.normpath(folder) == str(folder)
    if re.fullmatch(r"[A-Za-z0-9_.:+-]+", domain) and domain not in (".", ".."):
        assert folder.name == domain  # ordinary names keep their folder


@fuzz(80)
@given(user=hostile("root"), host=hostile("10.0.2.15", "guest"), key=st.none() | hostile("/tmp/id_lab"))
def test_ssh_sharing_sockets_are_named_by_a_hash(env, user, host, key):
    assume(key is None or possible_argv(key))  # the CLI refuses any other before
    target = SSHTarget(host=host, user=user, key=Path(key) if key is not None else None)
    path = mux.socket_path(target)
    assert path is None or (path.parent == mux.socket_dir() and re.fullmatch(r"[0-9a-f]{20}\.sock", path.name))
