"""Shared by the lab, nested-lab and Xen-lab test suites: timing lines shown past pytest's capture, a suite's
whole span, its hypervisor guest booted once per session, and removal of lab domains a killed test run left
behind."""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import libvirt
import pytest

from vhotplug.lab import manager
from vhotplug.lab.nested import L1
from vhotplug.virt.connection import connection, open_connection


class Reporter:
    """Lines shown at once (past pytest's capture) and again in a section of the final summary."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.lines: list[str] = []

    def report(self, config: pytest.Config, line: str) -> None:
        self.lines.append(line.strip())
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        capman = config.pluginmanager.get_plugin("capturemanager")
        if reporter is not None and capman is not None:
            with capman.global_and_fixture_disabled():
                reporter.write_line(line)

    def summary(self, terminalreporter: pytest.TerminalReporter, *extra: str) -> None:
        if self.lines:
            terminalreporter.section(self.title)
            for line in (*self.lines, *extra):
                terminalreporter.write_line(line)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_labs(conn: libvirt.virConnect, pattern: re.Pattern[str]) -> list[str]:
    """Lab domains named by ``pattern`` (group 1: the pytest PID) whose run is gone; only lab-marked domains."""
    removed = []
    for lab in manager.list_labs(conn):
        m = pattern.match(lab.name)
        if m and int(m.group(1)) != os.getpid() and not alive(int(m.group(1))):
            manager.down(conn, lab.name)
            removed.append(lab.name)
    return removed


class Suite:
    """The tests under one folder (``tests/nested/``): their marker, and the span from the first one's start
    to the last one's end (its teardown, where the labs are removed, included)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.span: list[float] = []

    def mine(self, item: pytest.Item) -> bool:
        return self.folder in str(item.fspath)

    def mark(self, items: list[pytest.Item], marker: pytest.MarkDecorator) -> None:
        for item in items:
            if self.mine(item):
                item.add_marker(marker)

    def started(self, item: pytest.Item) -> None:
        if self.mine(item) and not self.span:
            self.span.append(time.monotonic())

    def ended(self, item: pytest.Item) -> None:
        if self.mine(item):
            del self.span[1:]
            self.span.append(time.monotonic())

    def seconds(self) -> float | None:
        return self.span[1] - self.span[0] if len(self.span) == 2 else None


@contextlib.contextmanager
def session_l1(config: pytest.Config, reporter: Reporter, uri: str, name: str, *,
               stale: Callable[[libvirt.virConnect], list[str]], up: Callable[[libvirt.virConnect, str], L1],
               describe: Callable[[L1], str]) -> Iterator[L1]:
    """A hypervisor guest (an L1) booted by ``up`` on ``uri`` for the session, removed afterwards; what
    ``stale`` finds of killed runs is removed first."""
    with connection(uri) as conn:
        removed = stale(conn)
    if removed:
        reporter.report(config, f"\nremoved lab domains left by killed test runs: {', '.join(removed)}")
    try:
        with connection(uri) as conn:
            booted = up(conn, name)
        reporter.report(config, f"\n{describe(booted)}")
        yield booted
    finally:
        with connection(uri) as conn:
            manager.down(conn, name)


def opened(uri: str) -> Iterator[libvirt.virConnect]:
    """A connection for a fixture (``yield from opened(URI)``), closed after the test."""
    conn = open_connection(uri)
    try:
        yield conn
    finally:
        conn.close()


# Read at import: tests point VHOTPLUG_STATE_DIR elsewhere for their own journals.
_SETUP_STATE = os.environ.get("VHOTPLUG_STATE_DIR", "/var/lib/vhotplug")


def pidfile() -> Path:
    """Where scripts/setup-host.sh recorded the daemons it started (as scripts/stop-daemons.sh reads it)."""
    return Path(os.environ.get("VHOTPLUG_PIDFILE") or f"{_SETUP_STATE}/daemons.pid")


def _read_pid(path: str) -> int:
    try:
        return int(Path(path).read_text().strip())
    except (OSError, ValueError):
        return 0


def our_libvirtd() -> int:
    """The PID of the libvirtd that this run's set-up started and that answers now; fails the test otherwise
    (a libvirtd somebody else started is never restarted)."""
    path = pidfile()
    with contextlib.suppress(OSError):
        recorded = [int(words[1]) for words in (line.split() for line in path.read_text().splitlines())
                    if len(words) == 2 and words[0] == "libvirtd"]
        running = _read_pid("/run/libvirtd.pid")
        if running in recorded and _comm(running) == "libvirtd":
            return running
    pytest.fail(f"this test restarts the libvirtd that `make setup` started (recorded in {path}); the one "
                "answering now was not started by it: stop it and run `make setup`")


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def restart_libvirtd(uri: str, *, down_for: float = 0.0, timeout: float = 120.0,
                     config: Path | None = None) -> tuple[int, float]:
    """Stop the libvirtd this run started (by PID), keep it down ``down_for`` seconds, start it again and wait
    until ``uri`` answers; the new PID replaces the old one in the pidfile (so `make stop-daemons` still ends
    exactly ours). Running domains live on (QEMU does not depend on libvirtd). ``config``: the daemon's
    configuration file (``libvirtd -f``; default: the command line it was started with). Returns (new PID,
    seconds)."""
    import signal
    import subprocess

    old = our_libvirtd()
    # Started again as it was (make setup gives it -f with the socket settings), unless told otherwise.
    argv = [a.decode() for a in Path(f"/proc/{old}/cmdline").read_bytes().split(b"\0") if a]
    if config is not None:
        argv = ["libvirtd", "-d", "-f", str(config)]
    started = time.monotonic()
    os.kill(old, signal.SIGTERM)
    deadline = started + timeout
    while _comm(old) == "libvirtd" and not _zombie(old):  # bounded poll: no event tells that another process ended
        assert time.monotonic() < deadline, f"libvirtd {old} did not stop within {timeout:g} s"
        time.sleep(0.05)
    if down_for:
        time.sleep(down_for)  # the outage itself is what is being tested
    subprocess.run(argv, check=True)
    while True:
        new = _read_pid("/run/libvirtd.pid")
        if new and new != old:
            with contextlib.suppress(libvirt.libvirtError):
                libvirt.open(uri).close()
                break
        assert time.monotonic() < deadline, f"libvirtd did not answer on {uri} within {timeout:g} s"
        time.sleep(0.1)
    path = pidfile()
    lines = [f"libvirtd {new}" if line.split() == ["libvirtd", str(old)] else line
             for line in path.read_text().splitlines()]
    path.write_text("".join(f"{line}\n" for line in lines))
    return new, time.monotonic() - started


class StallingForward:
    """A TCP forward on 127.0.0.1 to a guest's SSH forward that the test controls: the guest's first bytes (its
    SSH banner) held back ``banner_delay`` seconds on every connection, and ``sever()`` cutting every
    connection open now (as a forward that stalls or an sshd that restarts does). Threads only; stopped by
    ``close()`` (a context manager)."""

    def __init__(self, port: int, *, banner_delay: float = 0.0) -> None:
        import socket
        import threading

        self.target = ("127.0.0.1", port)
        self.banner_delay = banner_delay
        self.accepted = 0
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket
        import threading

        while not self._closed.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            with self._lock:
                self.accepted += 1
                self._socks += [client, upstream]
            threading.Thread(target=self._pump, args=(upstream, client, self.banner_delay), daemon=True).start()
            threading.Thread(target=self._pump, args=(client, upstream, 0.0), daemon=True).start()

    def _pump(self, src, dst, delay: float) -> None:  # type: ignore[no-untyped-def]
        first = True
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            if not data:
                break
            if first and delay and self._closed.wait(delay):  # the banner, late (or never, once closed)
                break
            first = False
            try:
                dst.sendall(data)
            except OSError:
                break
        self._shut(src, dst)

    @staticmethod
    def _shut(*socks) -> None:  # type: ignore[no-untyped-def]
        import socket

        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def sever(self) -> int:
        """Cut every connection open now; returns how many there were."""
        with self._lock:
            socks, self._socks = self._socks, []
        self._shut(*socks)
        return len(socks) // 2

    def close(self) -> None:
        import socket

        self._closed.set()
        # A thread blocked in accept() keeps the socket listening past close(); shutdown() wakes it (Linux).
        with contextlib.suppress(OSError):
            self._server.shutdown(socket.SHUT_RDWR)
        self._server.close()
        self.sever()

    def __enter__(self) -> StallingForward:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
