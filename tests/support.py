"""Shared by the lab, nested-lab and Xen-lab test suites: timing lines shown past pytest's capture, a suite's
whole span, its hypervisor guest booted once per session, and removal of lab domains a killed test run left
behind."""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Callable, Iterator

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
