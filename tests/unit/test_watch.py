"""The guest watcher and ping, without a guest.

The watcher tests are "honest": the exact command line ``start_watch`` would send over
SSH runs here under each guest shell in turn (busybox sh, the lab guest's; dash, Debian's
/bin/sh; bash, the RHEL family's and an ordinary user's login shell), against a fake sysfs
built in tmp_path with the same layout the lab guest shows (see tests/lab/test_watch.py).
Ping is tested against a scripted session that answers each argv with canned output.
"""

from __future__ import annotations

import math
import os
import select
import shlex
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vhotplug import errors
from vhotplug.guest import watch as watch_mod
from vhotplug.guest.ping import (
    PingResult,
    check_iface,
    parse_addresses,
    parse_lease,
    parse_ping,
    ping_through,
)
from vhotplug.guest.ssh import Result
from vhotplug.guest.watch import (
    WATCH_SCRIPT,
    Identity,
    Seen,
    parse_line,
    start_watch,
    wait_for,
    watch_command,
)

BUSYBOX = shutil.which("busybox") or "/bin/busybox"
needs_busybox = pytest.mark.skipif(not os.access(BUSYBOX, os.X_OK), reason="needs busybox (the guest's shell)")
#: The shells a guest's ``sh`` may be: busybox ash (the lab guest), dash (Debian, Ubuntu), bash (the RHEL family,
#: where /bin/sh is bash in POSIX mode).
SHELLS = {"busybox": BUSYBOX, "dash": "/bin/dash", "bash": "/bin/bash"}
#: What every guest script appends to PATH (vhotplug.guest.shell.PREAMBLE).
SYSTEM_PATH = ("/usr/sbin", "/sbin", "/usr/bin", "/bin")


def login_shell(name: str) -> list[str]:
    """How the SSH server starts the user's shell for an exec request. A shell that is missing fails the test:
    every guest script must be shown to run under all three."""
    path = SHELLS[name]
    if not os.access(path, os.X_OK):
        pytest.fail(f"{path} is missing: the guest scripts must be run under {name} (install it)")
    return [path, "sh"] if name == "busybox" else [path]


def guest_bin(bindir: Path, name: str) -> Path:
    """A guest's own PATH entry: ``sh`` is shell ``name``; busybox also brings ``usleep``, as in the lab image.
    dash and bash guests have no usleep, and the system directories the scripts append must not have one
    either, or the ``sleep`` fallback would go untested."""
    bindir.mkdir(exist_ok=True)
    login_shell(name)
    (bindir / "sh").symlink_to(SHELLS[name])
    if name == "busybox":
        (bindir / "usleep").symlink_to(BUSYBOX)
    else:
        found = [d for d in SYSTEM_PATH if os.path.exists(f"{d}/usleep") or os.path.exists(f"{d}/udhcpc")]
        assert not found, f"this host has usleep/udhcpc in {found}: the {name} runs would not test their absence"
    return bindir

# --------------------------------------------------------------------------------------------------
# identity and command line


def test_identity_normalises_mac_to_lower_case():
    assert Identity("nic", "52:54:00:AB:CD:EF").value == "52:54:00:ab:cd:ef"


@pytest.mark.parametrize("kind,value", [
    ("nic", "52:54:00:ab:cd"), ("nic", "52-54-00-ab-cd-ef"), ("nic", "52:54:00:ab:cd:ef\n"),
    ("nic", "$(reboot)"), ("disk", ""), ("disk", "a" * 21), ("disk", "vh d1"), ("disk", "x;reboot"),
    ("disk", "$(id)"), ("disk", "vh-d1\n"), ("usb", "1-1"),
    ("pci", "8086:100"), ("pci", "0x8086:0x100e"), ("pci", "8086-100e"), ("pci", "8086:100e\n"),
    ("pci", "808g:100e"), ("pci", "$(id):1234"), ("pci", ""), ("pci", "0000:00:02.0"),
    ("usb", "46f4"), ("usb", "46f4:00011"), ("usb", " 46f4:0001"), ("usb", "46f4:0001;x"), ("nvme", "8086:100e"),
])
def test_identity_refuses_bad_values(kind, value):
    with pytest.raises(errors.InvalidRequest):
        Identity(kind, value)


def test_pci_and_usb_ids_are_normalised_and_described():
    pci = Identity("pci", "8086:100E")
    assert pci.value == "8086:100e" and pci.describe() == "PCI function 8086:100e"
    usb = Identity("usb", "46F4:0001")
    assert usb.value == "46f4:0001" and usb.describe() == "USB device 46f4:0001"
    odd = Identity("pci", "Beef:C0DE")
    assert shlex.split(watch_command(odd, present=False, timeout=2))[5:] == ["pci", "beef:c0de", "0", "200", "", ""]
    assert "beef" not in WATCH_SCRIPT.lower()


def test_command_passes_identity_as_an_argument_never_in_the_script():
    cmd = watch_command(Identity("disk", "vh-d1"), present=True, timeout=30)
    assert shlex.split(cmd) == ["exec", "sh", "-c", WATCH_SCRIPT, "sh", "disk", "vh-d1", "1", "3000", "", ""]
    assert "vh-d1" not in WATCH_SCRIPT
    absent = shlex.split(watch_command(Identity("nic", "52:54:00:00:00:01"), present=False, timeout=0.004))
    assert absent[5:] == ["nic", "52:54:00:00:00:01", "0", "1", "", ""]


@pytest.mark.parametrize("timeout", [0, -1, math.nan, math.inf, watch_mod.MAX_TIMEOUT + 1])
def test_command_refuses_bad_timeouts(timeout):
    with pytest.raises(errors.InvalidRequest):
        watch_command(Identity("disk", "vh-d1"), present=True, timeout=timeout)


def test_parse_lines():
    assert parse_line("start 12.34 215 -") == watch_mod.WatchLine("start", 12.34, pid=215)
    assert parse_line("start 1.00 9 eth1").name == "eth1"
    found = parse_line("found sdb sd 13.50 polls=56 pci=0000:03:00.0 usb=2-1 scsi=7:0:0:0")
    assert (found.word, found.name, found.driver, found.uptime) == ("found", "sdb", "sd", 13.5)
    assert found.detail == {"polls": "56", "pci": "0000:03:00.0", "usb": "2-1", "scsi": "7:0:0:0"}
    gone = parse_line("found - - 14.00 polls=2 was=eth1")
    assert (gone.name, gone.driver, gone.detail["was"]) == ("", "-", "eth1")
    assert parse_line("timeout 40.00 polls=900 last=eth2").detail == {"polls": "900", "last": "eth2"}


@pytest.mark.parametrize("line", ["", "start", "start 1.0 x -", "found eth1 e1000", "found a b -1.0",
                                  "found a b 1.0 junk", "hello 1 2 3", "timeout x"])
def test_parse_refuses_unexpected_lines(line):
    with pytest.raises(ValueError):
        parse_line(line)


# --------------------------------------------------------------------------------------------------
# a fake guest: busybox sh over a fake sysfs


class FakeSys:
    """A directory laid out like the lab guest's /sys and /proc, with a running /proc/uptime."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.devices = root / "sys/devices/pci0000:00"
        for d in ("sys/class/net", "sys/block", "proc", "sys/bus"):
            (root / d).mkdir(parents=True, exist_ok=True)
        self._t0 = time.monotonic() - 100.0
        self._stop = threading.Event()
        self.tick()
        self._clock = threading.Thread(target=self._run_clock, daemon=True)
        self._clock.start()

    def tick(self) -> None:
        tmp = self.root / "proc/.uptime"
        tmp.write_text(f"{time.monotonic() - self._t0:.2f} 1.00\n")
        os.replace(tmp, self.root / "proc/uptime")  # atomic: the watcher never reads half a line

    def _run_clock(self) -> None:
        while not self._stop.wait(0.005):
            self.tick()

    def stop(self) -> None:
        self._stop.set()
        self._clock.join()

    def _link(self, link: Path, target: Path) -> None:
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(target, link.parent))  # relative, like the kernel's

    def _driver(self, dev: Path, bus: str, driver: str) -> None:
        drv = self.root / "sys/bus" / bus / "drivers" / driver
        drv.mkdir(parents=True, exist_ok=True)
        self._link(dev / "driver", drv)

    def add_nic(self, name: str, mac: str, pci: str, *, driver: str = "virtio_net", bound: bool = True) -> Path:
        func = self.devices / "0000:00:01.6" / pci
        dev = func / "virtio5" if driver == "virtio_net" else func
        net = dev / "net" / name
        net.mkdir(parents=True)
        (func / "vendor").write_text("0x1af4\n")
        (net / "address").write_text(f"{mac}\n")
        self._link(net / "device", dev)
        self._link(self.root / "sys/class/net" / name, net)
        if bound:
            self.bind(dev, "virtio" if driver == "virtio_net" else "pci", driver)
        return dev

    def bind(self, dev: Path, bus: str, driver: str) -> None:
        self._driver(dev, bus, driver)

    def remove_nic(self, name: str) -> None:
        link = self.root / "sys/class/net" / name
        target = link.resolve()
        link.unlink()
        shutil.rmtree(target)

    def _block(self, name: str, parent: Path, bus: str, driver: str) -> Path:
        block = parent / "block" / name
        block.mkdir(parents=True)
        (block / "dev").write_text("254:0\n")
        self._link(block / "device", parent)
        self._driver(parent, bus, driver)
        self._link(self.root / "sys/block" / name, block)
        return block

    def add_virtio_disk(self, name: str, serial: str, pci: str = "0000:07:00.0") -> None:
        dev = self.devices / "0000:00:01.5" / pci / "virtio4"
        dev.mkdir(parents=True)
        block = self._block(name, dev, "virtio", "virtio_blk")
        (block / "serial").write_text(serial)  # no newline, like virtio-blk's

    def add_xen_disk(self, name: str, vbd: str = "vbd-51728") -> None:
        """A blkfront disk as a Xen PV guest shows it: no serial anywhere, the name is the target's."""
        dev = self.root / "sys/devices" / vbd
        dev.mkdir(parents=True)
        self._block(name, dev, "xen", "vbd")

    def add_scsi_disk(self, name: str, serial: str, hctl: str = "0:0:0:1", pci: str = "0000:04:00.0") -> None:
        h, _, t, _ = hctl.split(":")
        sdev = self.devices / "0000:00:01.2" / pci / "virtio1" / f"host{h}" / f"target{h}:0:{t}" / hctl
        sdev.mkdir(parents=True)
        raw = serial.encode()
        (sdev / "vpd_pg80").write_bytes(bytes([0, 0x80, 0, len(raw)]) + raw)
        (sdev / "vendor").write_text("QEMU    \n")
        self._block(name, sdev, "scsi", "sd")

    def add_usb_disk(self, name: str, serial: str, port: str = "2-1", host: int = 7) -> None:
        usbdev = self.devices / "0000:00:01.1" / "0000:03:00.0" / "usb2" / port
        sdev = usbdev / f"{port}:1.0" / f"host{host}" / f"target{host}:0:0" / f"{host}:0:0:0"
        sdev.mkdir(parents=True)
        (usbdev / "serial").write_text(f"{serial}\n")
        (usbdev.parent / "serial").write_text("0000:03:00.0\n")  # the root hub's, never a disk's
        self._block(name, sdev, "scsi", "sd")

    def add_pci(self, bdf: str, ids: str, *, cls: str = "0x020000", driver: str | None = None,
                parent: str = "0000:00:02.0") -> Path:
        """A PCI function behind a root port, listed in /sys/bus/pci/devices like the kernel's."""
        func = self.devices / parent / bdf
        func.mkdir(parents=True)
        vendor, device = ids.split(":")
        (func / "vendor").write_text(f"0x{vendor}\n")
        (func / "device").write_text(f"0x{device}\n")
        (func / "class").write_text(f"{cls}\n")
        self._link(self.root / "sys/bus/pci/devices" / bdf, func)
        if driver:
            self.bind(func, "pci", driver)
        return func

    def add_netdev(self, func: Path, name: str, *, virtio: int | None = None) -> None:
        """The interface of a NIC function: below virtioN for virtio-net, right below it for e1000."""
        dev = func / f"virtio{virtio}" if virtio is not None else func
        net = dev / "net" / name
        net.mkdir(parents=True)
        self._link(net / "device", dev)
        self._link(self.root / "sys/class/net" / name, net)

    def remove_pci(self, bdf: str) -> None:
        link = self.root / "sys/bus/pci/devices" / bdf
        target = link.resolve()
        link.unlink()
        shutil.rmtree(target)

    def add_usb(self, name: str, ids: str, *, busnum: int, devnum: int, iface_driver: str | None = None) -> Path:
        """A USB device (root hub usbN, or N-P below it) with one interface, both listed on the usb bus."""
        hc = self.devices / "0000:00:01.1" / "0000:03:00.0"
        dev = hc / name if name.startswith("usb") else hc / f"usb{name.split('-')[0]}" / name
        dev.mkdir(parents=True)
        vendor, product = ids.split(":")
        for attr, value in (("idVendor", vendor), ("idProduct", product), ("busnum", busnum), ("devnum", devnum)):
            (dev / attr).write_text(f"{value}\n")
        self._link(self.root / "sys/bus/usb/devices" / name, dev)
        self._driver(dev, "usb", "usb")
        iface_name = f"{busnum}-0:1.0" if name.startswith("usb") else f"{name}:1.0"
        iface = dev / iface_name
        iface.mkdir()
        self._link(self.root / "sys/bus/usb/devices" / iface_name, iface)
        if iface_driver:
            self.bind(iface, "usb", iface_driver)
        return iface

    def remove_usb(self, name: str) -> None:
        devices = self.root / "sys/bus/usb/devices"
        target = (devices / name).resolve()
        for link in devices.glob(f"{name}*"):
            if link.name == name or link.name.startswith(f"{name}:"):
                link.unlink()
        shutil.rmtree(target)

    def remove_block(self, name: str) -> None:
        link = self.root / "sys/block" / name
        target = link.resolve()
        link.unlink()
        shutil.rmtree(target)


class _Exit:
    """Stands in for paramiko's Channel.status_event."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self._proc = proc

    def wait(self, timeout: float | None = None) -> bool:
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True


class LocalChannel:
    """A paramiko Channel look-alike whose command runs under a guest shell on this host."""

    def __init__(self, env: dict[str, str], procs: list[subprocess.Popen[bytes]], login: list[str]) -> None:
        self._env = env
        self._procs = procs
        self._login = login
        self._timeout: float | None = None
        self.command = ""
        self.closed = False
        self._stderr_drained = False

    def exec_command(self, command: str) -> None:
        # What an SSH server does with an exec request: hand the string to the user's shell.
        self.command = command
        self.proc = subprocess.Popen([*self._login, "-c", command], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=self._env)
        self._procs.append(self.proc)
        self.status_event = _Exit(self.proc)

    def settimeout(self, timeout: float | None) -> None:
        self._timeout = timeout

    def recv(self, nbytes: int) -> bytes:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], self._timeout)
        if not ready:
            raise TimeoutError
        return os.read(self.proc.stdout.fileno(), nbytes)

    def recv_stderr_ready(self) -> bool:
        # Like paramiko: true only while unread data is there (a pipe at EOF also selects readable).
        assert self.proc.stderr is not None
        if self._stderr_drained or self.proc.poll() is None:
            return False
        return bool(select.select([self.proc.stderr], [], [], 0)[0])

    def recv_stderr(self, nbytes: int) -> bytes:
        assert self.proc.stderr is not None
        self._stderr_drained = True  # read() below takes everything up to EOF
        return self.proc.stderr.read()

    def exit_status_ready(self) -> bool:
        return self.proc.poll() is not None

    def recv_exit_status(self) -> int:
        return self.proc.wait()

    def close(self) -> None:
        # Like an SSH channel close: our end goes away, the remote process is not signalled.
        self.closed = True


class LocalTransport:
    def __init__(self, env: dict[str, str], procs: list[subprocess.Popen[bytes]], login: list[str]) -> None:
        self._env, self._procs, self._login = env, procs, login
        self.channels: list[LocalChannel] = []

    def open_session(self, timeout: float | None = None) -> LocalChannel:
        chan = LocalChannel(self._env, self._procs, self._login)
        self.channels.append(chan)
        return chan


class LocalSession:
    """What a watch uses of GuestSession (``open_exec(command)``, ``run(argv)``), plus ``run_script``: commands
    run under the login shell ``shell`` (busybox sh by default) with PATH=``bindir``."""

    target = "local-busybox"

    def __init__(self, bindir: Path, shell: str = "busybox") -> None:
        self.env = {"PATH": str(bindir)}
        self.login = login_shell(shell)
        self.procs: list[subprocess.Popen[bytes]] = []
        self._transport = LocalTransport(self.env, self.procs, self.login)
        self.ran: list[list[str]] = []

    def transport(self) -> LocalTransport:
        return self._transport

    def open_exec(self, command: str, *, timeout: float = 30.0) -> LocalChannel:
        chan = self._transport.open_session(timeout=timeout)
        chan.exec_command(command)
        return chan

    def run(self, argv: list[str], *, timeout: float = 30.0, check: bool = True) -> Result:
        self.ran.append(argv)
        return self.run_script(shlex.join(argv), timeout=timeout, check=check)

    def run_script(self, script: str, *, timeout: float = 30.0, check: bool = True) -> Result:
        proc = subprocess.run([*self.login, "-c", script], capture_output=True, env=self.env, timeout=timeout,
                              check=False)
        result = Result(proc.returncode, proc.stdout.decode(), proc.stderr.decode())
        if check and result.status != 0:
            raise errors.GuestCommandFailed(f"command failed (exit {result.status}): {result.stderr.strip()}")
        return result

    def alive(self, pid: int) -> bool:
        proc = next(p for p in self.procs if p.pid == pid)
        return proc.poll() is None

    def connected(self) -> bool:
        return True


class SeveredSession(LocalSession):
    """A session whose SSH connection can be cut (``sever``): every open channel then reads end-of-stream,
    as paramiko's do when the transport dies, until ``reconnect`` logs in again (or fails to)."""

    def __init__(self, bindir: Path, shell: str = "busybox") -> None:
        super().__init__(bindir, shell)
        self.up = True
        self.reconnects: list[float] = []
        self.refuse_login = False

    def sever(self) -> None:
        self.up = False
        for chan in self._transport.channels:
            chan.recv = lambda _n: b""  # type: ignore[method-assign]

    def connected(self) -> bool:
        return self.up

    def reconnect(self, deadline: float, *, worth_it=None) -> None:  # type: ignore[no-untyped-def]
        self.reconnects.append(deadline - time.monotonic())
        if self.refuse_login:
            raise errors.GuestUnreachable("cannot reach guest at local-busybox: Connection refused")
        self.up = True


def reap(session: LocalSession) -> None:
    """End the watchers a test started (by their own handles, nothing else) and close their pipes."""
    for proc in session.procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


@pytest.fixture(params=list(SHELLS))
def fake(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[FakeSys, SeveredSession]]:
    # The guest's PATH: its sh (busybox with its usleep applet, as in the lab image; dash; bash).
    bindir = guest_bin(tmp_path / "bin", request.param)
    # A space and shell syntax in the root path prove the arguments are quoted, not pasted.
    sysfs = FakeSys(tmp_path / "guest root $(x) ;'")
    session = SeveredSession(bindir, request.param)
    yield sysfs, session
    sysfs.stop()
    reap(session)


def watch(session: LocalSession, sysfs: FakeSys, kind: str, value: str, *, present: bool = True,
          timeout: float = 10.0) -> watch_mod.Watch:
    return start_watch(session, Identity(kind, value), present=present, timeout=timeout,
                       sysroot=str(sysfs.root))


def later(delay: float, action) -> threading.Thread:
    """Do ``action`` from another thread after ``delay`` s: the hot-plug the watch waits for."""
    timer = threading.Timer(delay, action)
    timer.start()
    return timer


@needs_busybox
def test_nic_already_present(fake):
    sysfs, session = fake
    sysfs.add_nic("eth1", "52:54:00:11:22:33", "0000:08:00.0")
    with watch(session, sysfs, "nic", "52:54:00:11:22:33") as w:
        assert w.initial == "eth1" and w.pid > 0
        seen = w.result()
    assert seen.name == "eth1" and seen.driver == "virtio_net"
    assert seen.detail["pci"] == "0000:08:00.0" and seen.detail["polls"] == "1"
    assert seen.guest_seconds == 0.0
    assert session.transport().channels[0].closed


@needs_busybox
def test_nic_appears_after_start_and_only_once_bound(fake):
    sysfs, session = fake
    sysfs.add_nic("eth0", "52:54:00:00:00:01", "0000:00:1e.0")
    with watch(session, sysfs, "nic", "52:54:00:11:22:44") as w:
        assert w.initial == ""
        started = time.monotonic()
        # e1000 sits directly on its PCI function; first the interface, its driver later.
        dev = sysfs.add_nic("eth2", "52:54:00:11:22:44", "0000:02:01.0", driver="e1000", bound=False)
        later(0.3, lambda: sysfs.bind(dev, "pci", "e1000")).join()
        seen = w.result()
    assert (seen.name, seen.driver, seen.detail["pci"]) == ("eth2", "e1000", "0000:02:01.0")
    assert int(seen.detail["polls"]) > 3
    assert 0.2 <= seen.guest_seconds <= time.monotonic() - started + 0.5
    assert w.host_time(seen) <= w.finished_at + 0.5


@needs_busybox
def test_unbound_nic_times_out_with_a_reason(fake):
    sysfs, session = fake
    sysfs.add_nic("eth3", "52:54:00:11:22:55", "0000:09:00.0", bound=False)
    with pytest.raises(errors.Timeout, match=r"NIC with MAC 52:54:00:11:22:55 within 0.3 s \(eth3 has that MAC "
                                             r"but no driver bound\); guest clock, \d+ polls"):
        watch(session, sysfs, "nic", "52:54:00:11:22:55", timeout=0.3).result()


@needs_busybox
def test_nic_goes_away(fake):
    sysfs, session = fake
    sysfs.add_nic("eth1", "52:54:00:11:22:33", "0000:08:00.0")
    with watch(session, sysfs, "nic", "52:54:00:11:22:33", present=False) as w:
        assert w.initial == "eth1"
        later(0.2, lambda: sysfs.remove_nic("eth1")).join()
        seen = w.result()
    assert seen == Seen("", "-", seen.guest_seconds, {"polls": seen.detail["polls"], "was": "eth1"})
    assert seen.guest_seconds >= 0.15


@needs_busybox
def test_virtio_disk_by_serial(fake):
    sysfs, session = fake
    sysfs.add_virtio_disk("vda", "vh-d10")  # a longer serial that ends like the one we want
    with watch(session, sysfs, "disk", "d1") as w:
        later(0.1, lambda: sysfs.add_virtio_disk("vdb", "d1", pci="0000:0a:00.0")).join()
        seen = w.result()
    assert (seen.name, seen.driver, seen.detail["pci"]) == ("vdb", "virtio_blk", "0000:0a:00.0")
    assert "usb" not in seen.detail and "scsi" not in seen.detail


@pytest.mark.parametrize("serial", ["vh-d2", "vh-0123456", "A" * 20, "x"])
@needs_busybox
def test_scsi_disk_by_vpd_page(fake, serial):
    # "vh-0123456" is 10 bytes long: its VPD length byte is a newline.
    sysfs, session = fake
    sysfs.add_scsi_disk("sda", f"zz{serial}", hctl="0:0:0:0")  # ends with our serial: must not match
    with watch(session, sysfs, "disk", serial) as w:
        assert w.initial == ""
        later(0.1, lambda: sysfs.add_scsi_disk("sdb", serial, hctl="0:0:0:1")).join()
        seen = w.result()
    assert (seen.name, seen.driver) == ("sdb", "sd")
    assert seen.detail["scsi"] == "0:0:0:1" and seen.detail["pci"] == "0000:04:00.0"


@needs_busybox
def test_usb_disk_by_usb_device_serial(fake):
    sysfs, session = fake
    with watch(session, sysfs, "disk", "vh-d3") as w:
        later(0.1, lambda: sysfs.add_usb_disk("sdc", "vh-d3")).join()
        seen = w.result()
    assert (seen.name, seen.driver) == ("sdc", "sd")
    assert seen.detail["usb"] == "2-1" and seen.detail["scsi"] == "7:0:0:0"
    assert seen.detail["pci"] == "0000:03:00.0"


@needs_busybox
def test_nearest_serial_decides(fake):
    sysfs, session = fake
    sysfs.add_usb_disk("sdc", "outer")
    # A USB stick whose SCSI device answers VPD page 0x80 itself: that serial is the disk's.
    sdev = (sysfs.root / "sys/block/sdc").resolve().parent.parent
    (sdev / "vpd_pg80").write_bytes(b"\x00\x80\x00\x05inner")
    assert watch(session, sysfs, "disk", "inner", timeout=5).result().name == "sdc"
    with pytest.raises(errors.Timeout):
        watch(session, sysfs, "disk", "outer", timeout=0.2).result()


@needs_busybox
def test_disk_goes_away(fake):
    sysfs, session = fake
    sysfs.add_usb_disk("sdc", "vh-d3")
    with watch(session, sysfs, "disk", "vh-d3", present=False) as w:
        later(0.1, lambda: sysfs.remove_block("sdc")).join()
        seen = w.result()
    assert seen.name == "" and seen.detail["was"] == "sdc"


@needs_busybox
def test_disk_that_stays_times_out(fake):
    sysfs, session = fake
    sysfs.add_virtio_disk("vda", "vh-d1")
    start = time.monotonic()
    with pytest.raises(errors.Timeout, match=r"did not drop the disk with serial vh-d1 within 0.25 s \(still vda\)"):
        watch(session, sysfs, "disk", "vh-d1", present=False, timeout=0.25).result()
    assert time.monotonic() - start < 3


@needs_busybox
def test_cancel_stops_the_watcher(fake):
    sysfs, session = fake
    w = watch(session, sysfs, "nic", "52:54:00:99:99:99", timeout=60)
    assert session.alive(w.pid)
    w.cancel()
    assert not session.alive(w.pid) and w.done
    assert session.ran == [["kill", str(w.pid)]]
    w.cancel()  # idempotent
    assert len(session.ran) == 1
    with pytest.raises(errors.InvalidRequest, match="cancelled"):
        w.result()


@needs_busybox
def test_context_exit_cancels_an_unfinished_watch(fake):
    sysfs, session = fake
    with watch(session, sysfs, "disk", "vh-never", timeout=60) as w:
        pid = w.pid
    assert not session.alive(pid)


@needs_busybox
def test_watcher_that_dies_is_reported(fake):
    sysfs, session = fake
    sysfs.stop()  # first: its clock would write uptime again
    (sysfs.root / "proc/uptime").unlink()
    with pytest.raises(errors.GuestCommandFailed, match="stopped without an answer"):
        watch(session, sysfs, "nic", "52:54:00:11:22:33")


@needs_busybox
def test_wait_for_is_start_plus_result(fake):
    sysfs, session = fake
    sysfs.add_virtio_disk("vda", "vh-d1")
    seen = wait_for(session, Identity("disk", "vh-d1"), present=True, timeout=5, sysroot=str(sysfs.root))
    assert (seen.name, seen.driver, seen.detail["polls"]) == ("vda", "virtio_blk", "1")


# --------------------------------------------------------------------------------------------------
# PCI functions and USB devices by vendor:device ids, against the devices there at the first look

MGMT = "0000:01:00.0"  # the lab's management NIC: virtio-net, 1af4:1041 like any hot-plugged one


def lab_like_pci(sysfs: FakeSys) -> None:
    """Functions a q35 lab guest has before a hot-plug: a virtio NIC with the ids we watch for."""
    sysfs.add_netdev(sysfs.add_pci(MGMT, "1af4:1041", driver="virtio-pci", parent="0000:00:02.0"), "eth0",
                     virtio=0)
    sysfs.add_pci("0000:00:1f.2", "8086:2922", cls="0x010601", driver="ahci", parent="")
    sysfs.add_pci("0000:02:00.0", "1af4:1042", cls="0x010000", driver="virtio-pci", parent="0000:00:02.1")


@pytest.fixture
def short_grace(monkeypatch):
    """The script with a 0.2 s BIND_GRACE instead of 2 s, to see the grace end without a slow test."""
    assert "grace=200\n" in WATCH_SCRIPT
    monkeypatch.setattr(watch_mod, "WATCH_SCRIPT", WATCH_SCRIPT.replace("grace=200\n", "grace=20\n"))


@needs_busybox
def test_pci_new_function_not_the_old_one_and_only_once_bound(fake):
    sysfs, session = fake
    lab_like_pci(sysfs)
    with watch(session, sysfs, "pci", "1AF4:1041") as w:
        assert w.initial == MGMT  # already there: must never be the answer
        started = time.monotonic()
        func = sysfs.add_pci("0000:07:00.0", "1af4:1041", parent="0000:00:02.6")

        def probe() -> None:  # virtio-pci's probe: the interface below virtio5, then the driver link
            sysfs.add_netdev(func, "eth1", virtio=5)
            sysfs.bind(func, "pci", "virtio-pci")

        later(0.3, probe).join()
        seen = w.result()
    assert (seen.name, seen.driver) == ("0000:07:00.0", "virtio-pci")
    assert seen.detail == {"polls": seen.detail["polls"], "pci": "0000:07:00.0", "net": "eth1"}
    assert int(seen.detail["polls"]) > 3
    assert 0.2 <= seen.guest_seconds <= time.monotonic() - started + 0.5


@needs_busybox
def test_pci_function_already_there_is_not_new(fake):
    sysfs, session = fake
    lab_like_pci(sysfs)
    with pytest.raises(errors.Timeout, match=r"did not show the PCI function 1af4:1041 within 0.2 s; guest clock"):
        watch(session, sysfs, "pci", "1af4:1041", timeout=0.2).result()


@needs_busybox
def test_pci_unbound_new_function_times_out_with_a_reason(fake):
    sysfs, session = fake
    lab_like_pci(sysfs)
    with watch(session, sysfs, "pci", "8086:100e", timeout=0.4) as w:
        assert w.initial == ""
        sysfs.add_pci("0000:08:00.0", "8086:100e", parent="0000:00:02.7")
        with pytest.raises(errors.Timeout, match=r"PCI function 8086:100e within 0.4 s \(0000:08:00.0 is present "
                                                 r"but no driver bound\); guest clock, \d+ polls"):
            w.result()


@needs_busybox
def test_pci_disk_function_reports_its_block_device(fake):
    sysfs, session = fake
    lab_like_pci(sysfs)
    with watch(session, sysfs, "pci", "1af4:1042") as w:
        assert w.initial == "0000:02:00.0"
        func = sysfs.add_pci("0000:09:00.0", "1af4:1042", cls="0x010000", parent="0000:00:02.3")
        block = func / "virtio7" / "block" / "vdb"
        block.mkdir(parents=True)
        sysfs.bind(func, "pci", "virtio-pci")
        seen = w.result()
    assert (seen.name, seen.driver, seen.detail["block"]) == ("0000:09:00.0", "virtio-pci", "vdb")
    assert "net" not in seen.detail


@needs_busybox
def test_pci_nic_bound_waits_for_its_interface(fake):
    # e1000 sits right on the function; its interface comes after the driver link here.
    sysfs, session = fake
    with watch(session, sysfs, "pci", "8086:100e") as w:
        func = sysfs.add_pci("0000:00:03.0", "8086:100e", driver="e1000", parent="")
        later(0.3, lambda: sysfs.add_netdev(func, "eth2")).join()
        seen = w.result()
    assert (seen.driver, seen.detail["net"]) == ("e1000", "eth2")
    assert seen.guest_seconds >= 0.2


@needs_busybox
def test_pci_nic_without_interface_times_out_saying_so(fake):
    sysfs, session = fake
    sysfs.add_pci("0000:00:03.0", "8086:100e", driver="e1000", parent="")
    with watch(session, sysfs, "pci", "8086:100e", timeout=0.3) as w:
        sysfs.add_pci("0000:00:04.0", "8086:100e", driver="e1000", parent="")
        with pytest.raises(errors.Timeout, match=r"\(0000:00:04.0 is present, bound, but shows no network "
                                                 r"interface yet\)"):
            w.result()


@needs_busybox
def test_pci_nic_without_interface_is_reported_after_the_grace(fake, short_grace):
    sysfs, session = fake
    with watch(session, sysfs, "pci", "8086:100e") as w:
        sysfs.add_pci("0000:00:04.0", "8086:100e", driver="vfio-pci", parent="")
        seen = w.result()
    assert (seen.name, seen.driver) == ("0000:00:04.0", "vfio-pci") and "net" not in seen.detail
    assert seen.guest_seconds >= 0.15


@needs_busybox
def test_pci_function_goes_away(fake):
    sysfs, session = fake
    lab_like_pci(sysfs)
    sysfs.add_netdev(sysfs.add_pci("0000:07:00.0", "1af4:1041", driver="virtio-pci", parent="0000:00:02.6"),
                     "eth1", virtio=5)
    with watch(session, sysfs, "pci", "1af4:1041", present=False) as w:
        assert w.initial == f"{MGMT},0000:07:00.0"
        # A third one arriving is no removal; the count drops only with the detach.
        later(0.1, lambda: sysfs.add_pci("0000:08:00.0", "1af4:1041", parent="0000:00:02.7")).join()
        later(0.2, lambda: sysfs.remove_pci("0000:07:00.0")).join()
        seen = w.result()
    assert seen == Seen("", "-", seen.guest_seconds, {"polls": seen.detail["polls"], "was": "0000:07:00.0"})
    assert seen.guest_seconds >= 0.25


@needs_busybox
def test_pci_function_that_stays_times_out_naming_them(fake):
    sysfs, session = fake
    lab_like_pci(sysfs)
    with pytest.raises(errors.Timeout, match=r"did not drop the PCI function 1af4:1041 within 0.2 s "
                                             r"\(still 0000:01:00.0\)"):
        watch(session, sysfs, "pci", "1af4:1041", present=False, timeout=0.2).result()


@needs_busybox
def test_pci_absent_with_nothing_matching_returns_at_once(fake):
    sysfs, session = fake
    lab_like_pci(sysfs)
    seen = wait_for(session, Identity("pci", "8086:100e"), present=False, timeout=5, sysroot=str(sysfs.root))
    assert seen == Seen("", "-", seen.guest_seconds, {"polls": "1"})


def lab_like_usb(sysfs: FakeSys) -> None:
    """Root hubs and a USB stick with the ids QEMU's usb-storage has, before the hot-plug."""
    sysfs.add_usb("usb1", "1d6b:0002", busnum=1, devnum=1, iface_driver="hub")
    sysfs.add_usb("usb2", "1d6b:0003", busnum=2, devnum=1, iface_driver="hub")
    sysfs.add_usb("1-1", "46f4:0001", busnum=1, devnum=2, iface_driver="usb-storage")


@needs_busybox
def test_usb_new_device_reported_with_its_interface_driver(fake):
    sysfs, session = fake
    lab_like_usb(sysfs)
    with watch(session, sysfs, "usb", "46F4:0001") as w:
        assert w.initial == "1-1"
        iface = sysfs.add_usb("2-1", "46f4:0001", busnum=2, devnum=3)
        later(0.3, lambda: sysfs.bind(iface, "usb", "usb-storage")).join()
        seen = w.result()
    assert (seen.name, seen.driver) == ("2-1", "usb-storage")
    assert seen.detail == {"polls": seen.detail["polls"], "usb": "2-1", "busdev": "2.3"}
    assert seen.guest_seconds >= 0.2


@needs_busybox
def test_usb_device_without_interface_driver(fake, short_grace):
    sysfs, session = fake
    lab_like_usb(sysfs)
    with watch(session, sysfs, "usb", "46f4:0001") as w:
        sysfs.add_usb("1-2", "46f4:0001", busnum=1, devnum=4)
        seen = w.result()
    assert (seen.name, seen.driver, seen.detail["busdev"]) == ("1-2", "usb", "1.4")
    assert seen.guest_seconds >= 0.15


@needs_busybox
def test_usb_device_waiting_for_a_driver_times_out_saying_so(fake):
    sysfs, session = fake
    with watch(session, sysfs, "usb", "46f4:0001", timeout=0.3) as w:
        sysfs.add_usb("1-2", "46f4:0001", busnum=1, devnum=4)
        with pytest.raises(errors.Timeout, match=r"USB device 46f4:0001 within 0.3 s \(1-2 is present but no "
                                                 r"interface driver bound yet\)"):
            w.result()


@needs_busybox
def test_usb_device_goes_away(fake):
    sysfs, session = fake
    lab_like_usb(sysfs)
    sysfs.add_usb("2-1", "46f4:0001", busnum=2, devnum=3, iface_driver="usb-storage")
    with watch(session, sysfs, "usb", "46f4:0001", present=False) as w:
        assert w.initial == "1-1,2-1"
        later(0.2, lambda: sysfs.remove_usb("2-1")).join()
        seen = w.result()
    assert seen == Seen("", "-", seen.guest_seconds, {"polls": seen.detail["polls"], "was": "2-1"})
    assert seen.guest_seconds >= 0.15
    assert (sysfs.root / "sys/bus/usb/devices/1-1:1.0").exists()  # only the one removed went


@needs_busybox
def test_usb_device_that_stays_times_out(fake):
    sysfs, session = fake
    lab_like_usb(sysfs)
    with pytest.raises(errors.Timeout, match=r"did not drop the USB device 46f4:0001 within 0.2 s \(still 1-1\)"):
        watch(session, sysfs, "usb", "46f4:0001", present=False, timeout=0.2).result()


# --------------------------------------------------------------------------------------------------
# ping

BUSYBOX_PING = """\
PING 10.0.2.2 (10.0.2.2): 56 data bytes
64 bytes from 10.0.2.2: seq=0 ttl=255 time=3.537 ms
64 bytes from 10.0.2.2: seq=2 ttl=255 time=0.878 ms

--- 10.0.2.2 ping statistics ---
3 packets transmitted, 2 packets received, 33% packet loss
round-trip min/avg/max = 0.764/1.726/3.537 ms
"""

IPUTILS_PING = """\
--- 10.0.2.2 ping statistics ---
3 packets transmitted, 3 received, 0% packet loss, time 2003ms
rtt min/avg/max/mdev = 0.301/0.412/0.530/0.092 ms
"""

NO_REPLY = """\
PING 10.0.2.2 (10.0.2.2): 56 data bytes

--- 10.0.2.2 ping statistics ---
1 packets transmitted, 0 packets received, 100% packet loss
"""


def test_parse_ping():
    assert parse_ping(BUSYBOX_PING) == (3, 2, 1.726)
    assert parse_ping(IPUTILS_PING) == (3, 3, 0.412)
    assert parse_ping(NO_REPLY) == (1, 0, None)
    with pytest.raises(errors.GuestCommandFailed):
        parse_ping("ping: bad address")


def test_parse_lease_and_addresses():
    assert parse_lease("udhcpc: lease of 10.0.2.15 obtained from 10.0.2.2, lease time 86400") == "10.0.2.15"
    assert parse_lease("udhcpc: lease of 10.0.2.15 obtained, lease time 86400") == "10.0.2.15"
    assert parse_lease("udhcpc: lease of 10.0.2.999 obtained") is None
    assert parse_lease("udhcpc: no lease, failing") is None
    shown = "3: eth1    inet 10.0.2.15/32 scope global eth1\\       valid_lft forever\n"
    assert parse_addresses(shown, 4) == ["10.0.2.15"]
    assert parse_addresses("3: eth1    inet6 fe80::1/64 scope link\n", 6) == ["fe80::1"]
    assert parse_addresses("", 4) == []


@pytest.mark.parametrize("name", ["", "a" * 16, "eth 1", "eth1;reboot", "$(id)", "..", "eth/1"])
def test_check_iface_refuses(name):
    with pytest.raises(errors.InvalidRequest):
        check_iface(name)


class ScriptedSession:
    """Answers each argv from a table of (argv prefix, Result); records what was asked."""

    target = "scripted"

    def __init__(self, answers: list[tuple[list[str], Result]]) -> None:
        self.answers = answers
        self.ran: list[list[str]] = []

    def run(self, argv: list[str], *, timeout: float = 30.0, check: bool = True) -> Result:
        assert timeout > 0
        self.ran.append(argv)
        for prefix, result in self.answers:
            if argv[:len(prefix)] == prefix:
                if check and result.status != 0:
                    raise errors.GuestCommandFailed(f"exit {result.status}")
                return result
        raise AssertionError(f"unexpected command {argv}")


OK = Result(0, "", "")


def test_ping_leases_a_32_then_pings_bound_to_the_interface():
    dhcp_out = ("udhcpc: started, v1.35.0\nudhcpc: broadcasting discover\n"
                "udhcpc: lease of 10.0.2.15 obtained from 10.0.2.2, lease time 86400\n")
    s = ScriptedSession([
        (["ip", "link"], OK),
        (["ip", "-o", "-4", "addr", "show"], Result(0, "", "")),
        (["sh", "-c"], Result(0, dhcp_out, "")),
        (["ip", "addr", "add"], OK),
        (["ping"], Result(0, BUSYBOX_PING, "")),
    ])
    result = ping_through(s, "eth1", "10.0.2.2")
    assert result == PingResult(3, 2, 1.726, "10.0.2.15")
    assert s.ran[0] == ["ip", "link", "set", "dev", "eth1", "up"]
    assert s.ran[1] == ["ip", "-o", "-4", "addr", "show", "dev", "eth1"]
    assert s.ran[2][:3] == ["sh", "-c", s.ran[2][2]] and s.ran[2][3:] == ["sh", "eth1"]
    assert "eth1" not in s.ran[2][2]  # the interface is an argument, not part of the script
    assert s.ran[3] == ["ip", "addr", "add", "10.0.2.15/32", "dev", "eth1"]
    assert s.ran[4] == ["ping", "-c", "3", "-W", "2", "-I", "eth1", "10.0.2.2"]


def test_ping_keeps_an_existing_address():
    s = ScriptedSession([
        (["ip", "link"], OK),
        (["ip", "-o", "-4", "addr", "show"], Result(0, "3: eth1    inet 192.0.2.7/24 scope global eth1\n", "")),
        (["ping"], Result(0, IPUTILS_PING, "")),
    ])
    assert ping_through(s, "eth1", "10.0.2.3", count=2).source_addr == "192.0.2.7"
    assert [a[0] for a in s.ran] == ["ip", "ip", "ping"]
    assert s.ran[-1][:3] == ["ping", "-c", "2"]


def test_ping_without_reply_raises_with_the_output():
    s = ScriptedSession([
        (["ip", "link"], OK),
        (["ip", "-o", "-4", "addr", "show"], Result(0, "1: lo    inet 127.0.0.1/8 scope host lo\n", "")),
        (["ping"], Result(1, NO_REPLY, "")),
    ])
    with pytest.raises(errors.GuestCommandFailed, match=r"no reply from 10\.0\.2\.2 through lo \(exit 1\)"
                                                        r"(.|\n)*100% packet loss"):
        ping_through(s, "lo", "10.0.2.2", count=1)


def test_ping_needs_a_dhcp_client_when_there_is_no_address():
    s = ScriptedSession([
        (["ip", "link"], OK),
        (["ip", "-o", "-4", "addr", "show"], OK),
        (["sh", "-c"], Result(0, "no-dhcp\n", "")),
    ])
    with pytest.raises(errors.GuestCommandFailed, match=r"no DHCP client .*looked for udhcpc, dhclient and dhcpcd"):
        ping_through(s, "eth1", "10.0.2.2")


def test_ping_without_lease_fails_before_pinging():
    s = ScriptedSession([
        (["ip", "link"], OK),
        (["ip", "-o", "-4", "addr", "show"], OK),
        (["sh", "-c"], Result(1, "udhcpc: no lease, failing\n", "")),
    ])
    with pytest.raises(errors.GuestCommandFailed, match="got no lease"):
        ping_through(s, "eth1", "10.0.2.2")
    assert all(a[0] != "ping" for a in s.ran)


@pytest.mark.parametrize("iface,addr,count", [("eth1", "10.0.2", 3), ("eth1", "host.example", 3),
                                               ("eth1;x", "10.0.2.2", 3), ("eth1", "10.0.2.2", 0)])
def test_ping_refuses_bad_arguments_before_running_anything(iface, addr, count):
    s = ScriptedSession([])
    with pytest.raises(errors.InvalidRequest):
        ping_through(s, iface, addr, count=count)
    assert s.ran == []


def test_stderr_reader_stops_at_end_of_stream():
    """A channel that keeps saying "ready" at EOF (empty reads) must not make vhotplug spin."""
    from types import SimpleNamespace

    from vhotplug.guest.watch import Watch

    class EofChannel:
        reads = 0

        def recv_stderr_ready(self) -> bool:
            return True

        def recv_stderr(self, nbytes: int) -> bytes:
            self.reads += 1
            assert self.reads < 5, "kept reading past the end of stderr"
            return b"oops\n" if self.reads == 1 else b""

    assert Watch._stderr(SimpleNamespace(_chan=EofChannel())) == "oops"  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# Xen blkfront disks: known by their name (the target), since nothing carries a serial into the guest


@needs_busybox
def test_xen_disk_found_by_name_then_gone(fake):
    sysfs, session = fake
    w = watch(session, sysfs, "blockdev", "xvdb")
    later(0.2, lambda: sysfs.add_xen_disk("xvdb"))
    seen = w.result()
    assert (seen.name, seen.driver) == ("xvdb", "vbd")
    w = watch(session, sysfs, "blockdev", "xvdb", present=False)
    later(0.2, lambda: sysfs.remove_block("xvdb"))
    assert w.result().detail.get("was") == "xvdb"


@needs_busybox
def test_xen_disk_watch_ignores_other_disks(fake):
    sysfs, session = fake
    sysfs.add_xen_disk("xvda", "vbd-51712")
    with pytest.raises(errors.Timeout, match="did not show the disk xvdb"):
        watch(session, sysfs, "blockdev", "xvdb", timeout=0.3).result()


@pytest.mark.parametrize("value", ["", "XVDB", "xvdb1", "../sda", "x", "xvdb;reboot"])
def test_blockdev_identity_refuses_what_is_not_a_disk_name(value):
    with pytest.raises(errors.InvalidRequest):
        Identity("blockdev", value)


@needs_busybox
def test_a_watch_whose_connection_dies_resumes_on_a_new_one(fake):
    """sshd restarted or a forward stalled mid-watch: log in again, watch on, report what this watch would have."""
    sysfs, session = fake
    with watch(session, sysfs, "nic", "52:54:00:12:34:56", timeout=10) as w:
        later(0.2, session.sever).join()
        later(0.3, lambda: sysfs.add_nic("eth1", "52:54:00:12:34:56", "0000:07:00.0")).join()
        seen = w.result()
    assert (seen.name, seen.driver) == ("eth1", "virtio_net") and seen.detail["resumed"] == "1"
    assert w.resumed == 1 and len(session.reconnects) == 1
    assert 8 < session.reconnects[0] <= 10  # the login may take what is left of the watch's time
    assert 0.4 <= seen.guest_seconds < 5  # counted from the first watcher's start


@needs_busybox
def test_a_resumed_pci_watch_counts_against_the_first_look(fake):
    """The function that appeared while the connection was down is new to this watch: the resumed watcher is
    told what matched at the first look, so it neither misses it nor takes the old one."""
    sysfs, session = fake
    lab_like_pci(sysfs)
    with watch(session, sysfs, "pci", "1af4:1041") as w:
        assert w.initial == MGMT
        later(0.1, session.sever).join()
        sysfs.add_netdev(sysfs.add_pci("0000:07:00.0", "1af4:1041", driver="virtio-pci", parent="0000:00:02.6"),
                         "eth1", virtio=5)
        seen = w.result()
    assert (seen.name, seen.detail["net"], seen.detail["resumed"]) == ("0000:07:00.0", "eth1", "1")
    resumed = session.transport().channels[-1].command
    assert shlex.split(resumed)[-1] == MGMT  # the first look, handed over as an argument


@needs_busybox
def test_a_guest_that_cannot_be_reached_again_is_reported_so(fake):
    sysfs, session = fake
    session.refuse_login = True
    with watch(session, sysfs, "disk", "vh-d1", timeout=5) as w:
        later(0.1, session.sever).join()
        with pytest.raises(errors.GuestUnreachable, match="could not log in again in time: cannot reach guest"):
            w.result()


def test_the_first_look_handed_to_a_resumed_watch_is_checked():
    with pytest.raises(errors.InvalidRequest):
        watch_command(Identity("pci", "8086:100e"), present=True, timeout=5, initial="0000:01:00.0;reboot")
    cmd = watch_command(Identity("pci", "8086:100e"), present=True, timeout=5, initial="0000:01:00.0,0000:02:00.0")
    assert shlex.split(cmd)[-1] == "0000:01:00.0,0000:02:00.0"
