"""Shared test helpers: run the CLI in-process and capture what a user sees."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from vhotplug.cli.main import main

REPO = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).resolve().parent / "golden"


@dataclass
class CliResult:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch):
    """Call ``vhotplug ARGS`` through the real entry point and its error boundary."""
    monkeypatch.delenv("LIBVIRT_DEFAULT_URI", raising=False)

    def run(*args: str) -> CliResult:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            main(list(args))
        cap = capsys.readouterr()
        return CliResult(int(exc.value.code or 0), cap.out, cap.err)

    return run


def golden(name: str, actual: str) -> None:
    """Compare ``actual`` with tests/golden/NAME; write it when missing or VHOTPLUG_REGEN=1."""
    path = GOLDEN / name
    if os.environ.get("VHOTPLUG_REGEN") == "1" or not path.exists():
        path.write_text(actual)
        if os.environ.get("CI"):
            pytest.fail(f"golden file {name} was missing in CI (now written): commit it")
    assert actual == path.read_text(), f"output differs from golden file {path} (VHOTPLUG_REGEN=1 rewrites)"
