"""Detaches that were asked for and not yet seen through, remembered across invocations.

libvirt accepts a second detach of a device whose unplug is still pending, and
for PCIe native hot-plug a second request can even cancel the first (it is the
same attention button). So vhotplug never re-sends: before asking, it records
the request here; a later ``vhotplug detach`` of the same device in the same
run of the domain (same UUID and id) only waits. Records of a domain that was
restarted since, or of a device that is gone, are stale and ignored.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path


def run_dir() -> Path:
    return Path(os.environ.get("VHOTPLUG_RUN_DIR", "/run/vhotplug"))


def _path(uuid: str, alias: str) -> Path:
    return run_dir() / "pending-detach" / f"{uuid}-{alias}.json"


def record(uuid: str, dom_id: int, alias: str) -> None:
    """Remember that a detach of ``alias`` was sent to the running domain ``uuid``/``dom_id``."""
    path = _path(uuid, alias)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"id": dom_id, "alias": alias, "since": time.time(), "pid": os.getpid()}))
    tmp.replace(path)


def pending_since(uuid: str, dom_id: int, alias: str) -> float | None:
    """When a still-valid detach of ``alias`` was sent (wall clock), or None."""
    path = _path(uuid, alias)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if data.get("id") != dom_id:  # the domain was restarted: the request died with it
        clear(uuid, alias)
        return None
    return float(data.get("since", 0.0))


def clear(uuid: str, alias: str) -> None:
    with contextlib.suppress(OSError):
        _path(uuid, alias).unlink()
