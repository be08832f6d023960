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
from urllib.parse import quote

from vhotplug import errors
from vhotplug.shared import group_writable, shared_dir


def run_dir() -> Path:
    return Path(os.environ.get("VHOTPLUG_RUN_DIR", "/run/vhotplug"))


def _path(uuid: str, alias: str) -> Path:
    # detach looks up the user's own text here too (an earlier request for "DEVICE"): percent-encoded, so
    # '/' and NUL cannot leave the directory or reach open(); libvirt's aliases ([A-Za-z0-9_.-]) are kept.
    return run_dir() / "pending-detach" / f"{_quote(uuid)}-{_quote(alias)}.json"


def _quote(text: str) -> str:
    return quote(text, safe="", errors="surrogatepass")  # undecodable argv bytes too, never an exception


def record(uuid: str, dom_id: int, alias: str) -> None:
    """Remember that a detach of ``alias`` was sent to the running domain ``uuid``/``dom_id``."""
    path = _path(uuid, alias)
    # Shared with the libvirt group: an operator's pending request is root's to wait for, and the other way.
    shared_dir(path.parent, what="the pending-detach directory")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o664)
        group_writable(fd)
        with os.fdopen(fd, "w") as fh:
            json.dump({"id": dom_id, "alias": alias, "since": time.time(), "pid": os.getpid()}, fh)
        tmp.replace(path)
    except OSError as exc:
        raise errors.VhotplugError(f"cannot record the detach request in {path.parent}: {exc.strerror or exc}",
                                   hint="vhotplug's users share it through the libvirt group: be in that group, "
                                        "or run as root") from exc


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
