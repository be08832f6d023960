"""Shared by the lab and nested-lab test suites: timing lines shown past pytest's capture, and removal of
lab domains a killed test run left behind."""

from __future__ import annotations

import os
import re

import libvirt
import pytest

from vhotplug.lab import manager


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
