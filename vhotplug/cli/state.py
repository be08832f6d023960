"""Options shared by every command (set by the top-level callback)."""

from __future__ import annotations

import enum
from dataclasses import dataclass

import typer


class OutputFormat(enum.StrEnum):
    table = "table"
    json = "json"


@dataclass
class AppState:
    uri: str | None = None
    output: OutputFormat = OutputFormat.table
    debug: bool = False


def state(ctx: typer.Context) -> AppState:
    """The global options, whichever sub-command we are in."""
    root = ctx.find_root()
    if not isinstance(root.obj, AppState):
        root.obj = AppState()
    return root.obj
