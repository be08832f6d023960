"""The exception family every layer raises, and the exit code each maps to.

Lower layers raise these (translating libvirt/paramiko errors ``from`` the
original); only the CLI boundary turns them into a message and an exit code.
The codes are part of the public interface (README, "Exit codes").
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    FAILURE = 1  # an operation failed for a reason not listed below
    USAGE = 2  # bad command line (also what Typer/Click use)
    NOT_FOUND = 3  # domain, device or lab not found
    CONNECTION = 4  # cannot connect to libvirt (bad URI, daemon down, auth)
    INVALID = 5  # refused before anything changed: invalid value or state
    UNSUPPORTED = 6  # the hypervisor/guest cannot do this
    GUEST_UNREACHABLE = 7  # guest SSH: no route, refused, timed out, auth failed
    GUEST_HOST_KEY = 8  # guest SSH host key unknown or mismatched
    GUEST_COMMAND = 9  # a command inside the guest failed
    TIMEOUT = 10  # waited for an outcome that did not come in time
    LAB = 11  # the lab could not be built or booted
    INCONSISTENT = 12  # libvirt and the guest disagree about the outcome (both states are reported)
    BUSY = 13  # another vhotplug process holds the domain or host device (its PID is named)
    UNSAFE = 14  # refused: the host device is used by the host or a domain, is a bridge, or shares its IOMMU group
    RECOVERY = 15  # an operation could not be rolled back: the journal keeps it for `vhotplug recover`
    GUEST_PRIVILEGE = 16  # the guest user cannot run the privileged step: sudo asks for a password
    INTERRUPTED = 130  # Ctrl-C


class VhotplugError(Exception):
    """Base of every error a user can cause or meet; never shown as a traceback."""

    exit_code: ExitCode = ExitCode.FAILURE

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class NotFound(VhotplugError):
    exit_code = ExitCode.NOT_FOUND


class DomainNotFound(NotFound):
    pass


class DeviceNotFound(NotFound):
    pass


class ConnectionFailed(VhotplugError):
    exit_code = ExitCode.CONNECTION


class ConnectionLost(ConnectionFailed):
    """The libvirt connection went away in the middle of a command (libvirtd restarted, its socket closed)."""


class InvalidRequest(VhotplugError):
    """Refused before anything changed."""

    exit_code = ExitCode.INVALID


class OperationInvalid(InvalidRequest):
    """libvirt says the object is in the wrong state for this (e.g. domain not running)."""


class Unsupported(VhotplugError):
    exit_code = ExitCode.UNSUPPORTED


class LibvirtFailure(VhotplugError):
    exit_code = ExitCode.FAILURE


class GuestUnreachable(VhotplugError):
    exit_code = ExitCode.GUEST_UNREACHABLE

    def __init__(self, message: str, *, hint: str | None = None, final: bool = False) -> None:
        super().__init__(message, hint=hint)
        #: Trying again cannot help (authentication was refused); otherwise a login may be retried.
        self.final = final


class GuestHostKeyError(VhotplugError):
    exit_code = ExitCode.GUEST_HOST_KEY


class GuestCommandFailed(VhotplugError):
    exit_code = ExitCode.GUEST_COMMAND


class GuestPrivilege(VhotplugError):
    """The guest's SSH user is not root and cannot become root without a password (``sudo -n`` refused);
    raised before anything in the domain changes."""

    exit_code = ExitCode.GUEST_PRIVILEGE


class Timeout(VhotplugError):
    exit_code = ExitCode.TIMEOUT


class LabError(VhotplugError):
    exit_code = ExitCode.LAB


class UnsafeDevice(VhotplugError):
    """Giving this host device to a guest could take something from the host or another domain."""

    exit_code = ExitCode.UNSAFE


class RecoveryNeeded(VhotplugError):
    """A multi-step operation failed and so did its rollback; the journal keeps what is left to undo."""

    exit_code = ExitCode.RECOVERY


class Interrupted(VhotplugError):
    """Ctrl-C, after vhotplug put things back as they were (the message says how)."""

    exit_code = ExitCode.INTERRUPTED


class Inconsistent(VhotplugError):
    """libvirt and the guest disagree about what happened; the message gives both views."""

    exit_code = ExitCode.INCONSISTENT
