"""``vhotplug recover``: finish what a killed (or failed) passthrough operation left half-done."""

from __future__ import annotations

from typing import Annotated

import typer

from vhotplug import errors
from vhotplug.cli import output
from vhotplug.cli.options import TimeoutOpt, WaitLockOpt
from vhotplug.cli.state import OutputFormat, state
from vhotplug.host import journal, lock
from vhotplug.virt.connection import connection


def recover(
    ctx: typer.Context,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only list what the journal holds.")] = False,
    timeout: TimeoutOpt = 30.0,
    wait_lock: WaitLockOpt = False,
) -> None:
    """Repair operations a killed or failed vhotplug left half-done, from its journal.

    Before each step of a passthrough (host detach, attach) vhotplug writes it into
    $VHOTPLUG_STATE_DIR/journal (default /var/lib/vhotplug/journal). A record whose
    process is gone is repaired here by looking at the real state: an interrupted
    attach is undone (detached from the guest, given back to the host driver), an
    interrupted detach is completed. Every other command warns while such records exist.
    The hypervisor is the one the operation used, unless -c is given.
    """
    from vhotplug.ops.passthrough import entry_lock_keys, recover_entry  # host-side modules: only here

    st = state(ctx)
    stale = journal.stale()
    results: list[dict[str, object]] = []
    failed: errors.VhotplugError | None = None
    for entry in stale:
        doc: dict[str, object] = {"operation": entry.describe(), "record": str(entry.path), "actions": []}
        results.append(doc)
        if dry_run:
            continue
        try:
            with connection(st.uri or entry.uri) as conn, lock.acquire(entry_lock_keys(entry), wait=wait_lock):
                doc["actions"] = recover_entry(conn, entry, timeout=timeout)
            doc["recovered"] = True
        except errors.VhotplugError as exc:
            doc["recovered"], doc["error"] = False, exc.message
            failed = failed or exc
    unreadable = [str(p) for p in journal.unreadable()]
    if st.output is OutputFormat.json:
        output.json_out({"journal": str(journal.journal_dir()), "operations": results, "unreadable": unreadable})
    else:
        _print(results, unreadable, dry_run=dry_run)
    if failed is not None:
        raise errors.VhotplugError(f"could not recover every operation: {failed.message}",
                                   hint="fix the cause and run `vhotplug recover` again; the records are kept")


def _print(results: list[dict[str, object]], unreadable: list[str], *, dry_run: bool) -> None:
    if not results:
        typer.echo(f"nothing to recover: the journal ({journal.journal_dir()}) holds no interrupted operation")
    for doc in results:
        typer.echo(f"{'found' if dry_run else 'recovering'}: {doc['operation']}")
        for action in doc.get("actions") or []:  # type: ignore[union-attr]
            typer.echo(f"  {action}")
        if doc.get("recovered"):
            typer.echo("  done: record removed" if doc.get("actions") else "  nothing was left to undo: record removed")
        elif "error" in doc:
            typer.echo(f"  failed: {doc['error']}")
    for path in unreadable:
        typer.echo(f"unreadable journal record (left in place): {path}")
