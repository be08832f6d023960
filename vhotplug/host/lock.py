"""Locks that keep two vhotplug processes off the same host device or domain at the same time.

Taking a device from the host and giving it to a guest is several steps (host detach, attach, verify,
maybe roll back); two processes interleaving those steps on one device or one domain would each undo
the other's work. So every such operation first takes ``flock(2)`` locks on small files under
``$VHOTPLUG_RUN_DIR/locks`` (default ``/run/vhotplug/locks``), one per key:
``domain-<uuid>``, ``pci-0000_06_10_1``, ``usb-2-4`` (see :func:`domain_key`, :func:`pci_key`,
:func:`usb_key`).

Why flock and not a PID file checked by hand: the kernel drops an flock lock when the last descriptor of
its open file goes away, so a holder that is killed (even by SIGKILL) or crashes frees its locks at once;
there is never a stale lock to clean up. The files are left in place on purpose: unlinking a lock file
races with a process that has it open and is about to lock it (both would then "hold" it). The holder
writes its PID into the file only so that the one that finds it busy can say who holds it; the lock
itself is the flock, never the file's contents.

Descriptors are opened close-on-exec, so programs vhotplug runs never inherit a lock. A *forked* child
(``os.fork``, multiprocessing's fork start method) shares the open file and keeps the lock alive until it
exits too: fork only before taking locks.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType

from vhotplug import errors
from vhotplug.addresses import Bdf, UsbDevice
from vhotplug.errors import ExitCode
from vhotplug.shared import group_writable, shared_dir

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")
_PID = re.compile(r"[0-9]{1,10}")
_CMDLINE_MAX = 200
_HINT = "another vhotplug is working on it: wait until it has finished, or pass --wait-lock to wait for it"


class Busy(errors.VhotplugError):
    """A lock is held by another process (or, by mistake, by another part of this one)."""

    # Refused before anything changed; the lead may give "busy" its own code later.
    exit_code = ExitCode.BUSY

    def __init__(self, message: str, *, key: str, pid: int | None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.key = key
        self.pid = pid


def lock_dir() -> Path:
    """Where lock files live: ``$VHOTPLUG_RUN_DIR/locks``, by default ``/run/vhotplug/locks``."""
    return Path(os.environ.get("VHOTPLUG_RUN_DIR") or "/run/vhotplug") / "locks"


def lock_path(key: str) -> Path:
    """The lock file for ``key``; characters outside ``[A-Za-z0-9_.-]`` become ``_``.

    Two keys that differ only in such characters share a file: that locks too much, never too little.
    """
    if not key:
        raise ValueError("a lock key cannot be empty")
    # The suffix also keeps keys like "." or ".." from naming the directory itself.
    return lock_dir() / f"{_UNSAFE.sub('_', key)}.lock"


def domain_key(uuid: str) -> str:
    """The lock key of a domain; by UUID, since names can change and ids do on every start."""
    return f"domain-{uuid}"


def pci_key(bdf: Bdf) -> str:
    """The lock key of a host PCI function, e.g. ``pci-0000_06_10_1``."""
    return f"pci-{bdf.domain:04x}_{bdf.bus:02x}_{bdf.slot:02x}_{bdf.function:x}"


def usb_key(device: UsbDevice) -> str:
    """The lock key of a host USB device, e.g. ``usb-2-4`` (bus 2, device 4)."""
    return f"usb-{device.bus}-{device.device}"


class Locks:
    """Locks held by this process; released by :meth:`release` or on leaving a ``with`` block."""

    def __init__(self, held: list[tuple[str, int]]) -> None:
        self._held = held

    @property
    def keys(self) -> tuple[str, ...]:
        """The keys held, in the order they were taken."""
        return tuple(key for key, _ in self._held)

    def release(self) -> None:
        """Release every lock still held; releasing twice is harmless."""
        held, self._held = self._held, []
        _release_all(held)

    def __enter__(self) -> Locks:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"Locks({list(self.keys)!r})"


def acquire(keys: Iterable[str], *, wait: bool = False, timeout: float | None = None) -> Locks:
    """Lock every key, or none: raise :class:`Busy` if one is held elsewhere (after ``timeout`` if ``wait``).

    Keys are taken in the sorted order of their lock files, so two processes that want the same keys
    (in whatever order they name them) never deadlock: one gets them all first. ``timeout`` bounds the
    whole call, not each key; without it, ``wait`` waits as long as it takes (Ctrl-C still interrupts).
    Locks already taken are released again when a later one cannot be had.
    """
    files: dict[str, str] = {}
    for key in keys:
        files.setdefault(lock_path(key).name, key)
    deadline = None if timeout is None else time.monotonic() + max(timeout, 0.0)
    directory = _ensure_dir()
    held: list[tuple[str, int]] = []
    try:
        for name in sorted(files):
            key = files[name]
            held.append((key, _take(key, directory / name, wait=wait, deadline=deadline, timeout=timeout)))
    except BaseException:
        _release_all(held)
        raise
    return Locks(held)


def holder(key: str) -> int | None:
    """The PID in ``key``'s lock file: its holder's, or a killed holder's (a clean release clears it)."""
    return _recorded_pid(lock_path(key))


def _recorded_pid(path: Path) -> int | None:
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return None
    return int(text) if _PID.fullmatch(text) else None


def _ensure_dir() -> Path:
    # Shared with the libvirt group: root and operators lock the same files (vhotplug.shared).
    return shared_dir(lock_dir(), what="the lock directory")


def _open(path: Path) -> int:
    # O_NOFOLLOW: a symlink planted in the lock directory must not make root truncate another file.
    flags = os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        fd = os.open(path, flags | os.O_RDWR | os.O_CREAT, 0o664)
    except PermissionError:
        try:
            # A file another user made before files were group-writable: flock needs only a descriptor,
            # so lock it read-only (the holder's PID is then not recorded in it).
            return os.open(path, flags | os.O_RDONLY)
        except OSError as exc:
            raise _unopenable(path, exc) from exc
    except OSError as exc:
        raise _unopenable(path, exc) from exc
    with contextlib.suppress(OSError):
        group_writable(fd)  # whatever our umask: the next user of the libvirt group must reopen it
    return fd


def _unopenable(path: Path, exc: OSError) -> errors.VhotplugError:
    return errors.VhotplugError(
        f"cannot open the lock file {path}: {exc.strerror}",
        hint=f"vhotplug's users share {path.parent} through the libvirt group: be in that group, or run as root",
    )


def _take(key: str, path: Path, *, wait: bool, deadline: float | None, timeout: float | None) -> int:
    """Open and lock ``path``; the locked descriptor, with our PID written in."""
    fd = _open(path)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                raise _busy(key, path, waited=None) from None
            if deadline is None:
                # A plain blocking flock: nothing to time out, and SIGINT interrupts it (PEP 475).
                fcntl.flock(fd, fcntl.LOCK_EX)
            else:
                os.close(fd)
                fd = -1
                fd = _take_within(key, path, deadline, timeout)
        _record_pid(fd)
        return fd
    except BaseException as exc:
        if fd >= 0:
            os.close(fd)
        if isinstance(exc, OSError):  # not contention (that is Busy) but e.g. ENOLCK on a network filesystem
            raise errors.VhotplugError(f"cannot lock {path}: {exc.strerror or exc}") from exc
        raise


def _take_within(key: str, path: Path, deadline: float, timeout: float | None) -> int:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise _busy(key, path, waited=timeout)
    fd = _Waiter(path).wait(remaining)
    if fd is None:
        raise _busy(key, path, waited=timeout)
    return fd


class _Waiter:
    """A blocking flock in a helper thread, so that the caller can stop waiting after a timeout.

    flock(2) has no timeout, and the alternatives are worse: SIGALRM works only in the main thread and
    races with other uses of the alarm; polling LOCK_NB lets a steady stream of other lockers starve us
    and wakes up for nothing. The thread opens its own descriptor: if the caller gives up, the thread is
    left blocked in flock until the holder lets go, then closes that descriptor at once, so a late
    success is never kept (nor is a descriptor number closed under someone else's feet).
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._guard = threading.Lock()
        self._done = threading.Event()
        self._fd: int | None = None
        self._error: BaseException | None = None
        self._abandoned = False

    def wait(self, timeout: float) -> int | None:
        """The locked descriptor, or None if the lock was still held elsewhere after ``timeout`` seconds."""
        threading.Thread(target=self._run, name=f"vhotplug-lock {self._path.name}", daemon=True).start()
        try:
            self._done.wait(timeout)
        except BaseException:  # Ctrl-C while waiting: we want nothing any more
            fd = self._abandon()
            if fd is not None:
                os.close(fd)
            raise
        fd = self._abandon()
        if fd is None and self._error is not None:
            raise self._error
        return fd

    def _abandon(self) -> int | None:
        """Stop waiting; the descriptor if the thread got the lock already, else the thread releases it."""
        with self._guard:
            self._abandoned = True
            fd, self._fd = self._fd, None
        return fd

    def _run(self) -> None:
        try:
            fd = _open(self._path)
        except errors.VhotplugError as exc:
            self._finish(None, exc)
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:
            os.close(fd)
            self._finish(None, exc)
            return
        self._finish(fd, None)

    def _finish(self, fd: int | None, error: BaseException | None) -> None:
        with self._guard:
            if not self._abandoned:
                self._fd, self._error = fd, error
                fd = None
        if fd is not None:
            os.close(fd)
        self._done.set()


def _record_pid(fd: int) -> None:
    with contextlib.suppress(OSError):  # a descriptor opened read-only (see _open) locks without it
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)


def _release_all(held: list[tuple[str, int]]) -> None:
    for _, fd in reversed(held):
        # Clear the PID first, while still holding the lock, so nobody reads a finished holder's PID.
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)  # closing our only descriptor of the open file releases the flock


def _busy(key: str, path: Path, *, waited: float | None) -> Busy:
    pid = _recorded_pid(path)
    if pid is None:
        # Locked, but the holder has not written its PID yet (or has just let go).
        who = "another process"
    elif pid == os.getpid():
        who = f"this process (PID {pid})"
    else:
        command = _command_line(pid)
        who = f"PID {pid} ({command})" if command else f"PID {pid}"
    message = f"busy: {key} is held by {who}"
    if waited is not None:
        message += f", still after waiting {waited:g} s"
    return Busy(message, key=key, pid=pid, hint=_HINT)


def _command_line(pid: int) -> str | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    words = [word.decode(errors="replace") for word in raw.split(b"\0") if word]
    command = " ".join(words)
    if len(command) > _CMDLINE_MAX:
        command = command[: _CMDLINE_MAX - 1] + "…"
    return command or None
