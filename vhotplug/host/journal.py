"""The intent journal: what a multi-step passthrough operation is about to do, kept until it is done.

Giving a host device to a guest is several steps (take it from its host driver, attach it, verify it in
the guest). Before each step that changes something, vhotplug writes the step into a small JSON file under
``$VHOTPLUG_STATE_DIR/journal`` (default ``/var/lib/vhotplug/journal``), and removes the file when the
operation has finished or has been rolled back completely. A file that outlives its process (killed,
power cut, a rollback that failed too) says what may be half-done: every later command reports it, and
``vhotplug recover`` repairs it by looking at the real state, since a step written down may or may not
have happened before the process died.

Files are written to a temporary name, fsynced and renamed, so a reader never sees half a record.
A record belongs to a live process when its PID exists *and* has the same start time (``/proc/PID/stat``
field 22) as when it was written: a recycled PID does not keep a dead run's record alive.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vhotplug import errors
from vhotplug.shared import group_writable, shared_dir

#: Steps, in the order an operation takes them; ``recover`` undoes or completes each by looking.
HOST_DETACH = "host-detach"  # take the PCI function from its host driver (nodedev detach)
GUEST_ATTACH = "guest-attach"  # attachDeviceFlags
GUEST_DETACH = "guest-detach"  # detach from the guest (and wait)
HOST_REATTACH = "host-reattach"  # give the PCI function back to its host driver
ROLLBACK_FAILED = "rollback-failed"


def state_dir() -> Path:
    """``$VHOTPLUG_STATE_DIR``, by default ``/var/lib/vhotplug``."""
    return Path(os.environ.get("VHOTPLUG_STATE_DIR") or "/var/lib/vhotplug")


def journal_dir() -> Path:
    return state_dir() / "journal"


def process_start(pid: int) -> int | None:
    """The start time of process ``pid`` in clock ticks since boot, or None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after its last ')'.
    fields = stat[stat.rfind(")") + 2:].split()
    try:
        return int(fields[19])  # field 22 overall
    except (IndexError, ValueError):
        return None


@dataclass
class Entry:
    """One operation in progress: who runs it, on what, and the steps begun so far."""

    op: str  # "attach" or "detach"
    kind: str  # "pci" or "usb"
    device: str  # what the user named: 0000:06:10.1, 002.004 0781:5567
    domain: str
    domain_uuid: str
    uri: str | None
    alias: str
    nodedev: str | None = None  # libvirt's node device name (pci_0000_06_10_1)
    host_driver: str | None = None  # the driver the device had before (e1000); None: none bound
    managed: bool = False
    flags: int = 0
    keep_detached: bool = False
    steps: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    pid: int = 0
    pid_start: int | None = None
    started: float = 0.0
    id: str = ""

    @property
    def path(self) -> Path:
        return journal_dir() / f"{self.id}.json"

    @property
    def alive(self) -> bool:
        """True while the process that wrote it is still running (same PID *and* start time)."""
        return self.pid > 0 and process_start(self.pid) == self.pid_start and self.pid_start is not None

    def describe(self) -> str:
        what = f"{self.op} {self.kind} {self.device}"
        prep = "to" if self.op == "attach" else "from"
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        done = ", ".join(self.steps) or "nothing begun"
        return f"{what} {prep} {self.domain} (PID {self.pid}, {when}; steps begun: {done})"

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _write(entry: Entry) -> None:
    directory = journal_dir()
    try:
        # Shared with the libvirt group (not with everyone): an operator's record is root's to recover too.
        shared_dir(directory, world_readable=False, what="the journal directory", env="VHOTPLUG_STATE_DIR")
        tmp = directory / f".{entry.id}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o660)
        group_writable(fd)
        with os.fdopen(fd, "w") as f:
            json.dump(entry.to_dict(), f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, entry.path)
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as exc:
        raise errors.VhotplugError(
            f"cannot write the journal in {directory}: {exc.strerror or exc}",
            hint="be in the libvirt group (the journal is shared with it) or run as root; or point "
                 "VHOTPLUG_STATE_DIR to a writable directory",
        ) from exc


def begin(entry: Entry) -> Entry:
    """Record a new operation (before its first change); fills in id, PID and time."""
    import uuid  # only writers need it

    entry.pid = os.getpid()
    entry.pid_start = process_start(entry.pid)
    entry.started = time.time()
    entry.id = f"{time.strftime('%Y%m%dT%H%M%S')}-{entry.pid}-{uuid.uuid4().hex[:8]}"
    _write(entry)
    return entry


def step(entry: Entry, name: str, note: str | None = None) -> None:
    """Record that step ``name`` is about to be taken (write-ahead: before the call that makes it)."""
    if name not in entry.steps:
        entry.steps.append(name)
    if note:
        entry.notes.append(note)
    _write(entry)


def finish(entry: Entry) -> None:
    """The operation is over (done, or rolled back completely): forget it."""
    with contextlib.suppress(FileNotFoundError):
        entry.path.unlink()


def _load(path: Path) -> Entry | None:
    try:
        doc = json.loads(path.read_text())
        known = {k: v for k, v in doc.items() if k in Entry.__dataclass_fields__}
        entry = Entry(**known)
    except (OSError, ValueError, TypeError):
        return None
    if not entry.id or entry.path.name != path.name:
        return None
    return entry


def entries() -> list[Entry]:
    """Every record in the journal, oldest first; unreadable files are skipped (see :func:`unreadable`)."""
    found = []
    for path in _files():
        if (entry := _load(path)) is not None:
            found.append(entry)
    return sorted(found, key=lambda e: (e.started, e.id))


def unreadable() -> list[Path]:
    """Journal files that cannot be parsed (shown by ``recover``, never deleted by it)."""
    return [p for p in _files() if _load(p) is None]


def _files() -> Iterable[Path]:
    try:
        names = os.listdir(journal_dir())
    except OSError:
        return []
    return [journal_dir() / n for n in sorted(names) if n.endswith(".json") and not n.startswith(".")]


def stale() -> list[Entry]:
    """Records whose process is gone: operations that may be half-done."""
    return [e for e in entries() if not e.alive]


def stale_warning() -> str | None:
    """The line every command prints while the journal holds records of dead runs (None when clean).

    Cheap on the common path: one ``listdir`` of a directory that usually does not exist.
    """
    if not _files():
        return None
    left = stale()
    if not left:
        return None
    first = left[0].describe()
    more = f" (and {len(left) - 1} more)" if len(left) > 1 else ""
    return f"an interrupted operation may be half-done: {first}{more}; run `vhotplug recover`"
