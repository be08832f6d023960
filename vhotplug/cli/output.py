"""Render results as a table for people or JSON for scripts."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import typer


def table(rows: Iterable[Mapping[str, Any]], columns: Sequence[tuple[str, str]], *, title: str | None = None) -> None:
    """Print ``rows`` as a table with ``columns`` given as (key, header) pairs."""
    from tabulate import tabulate  # only table output needs it: JSON callers skip the import

    data = [[_cell(row.get(key)) for key, _ in columns] for row in rows]
    if title:
        typer.echo(title)
    if data:
        typer.echo(tabulate(data, headers=[h for _, h in columns], tablefmt="simple", disable_numparse=True))
    else:
        typer.echo("  (none)")


def json_out(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2, sort_keys=False, default=str))


def _cell(value: Any) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)
