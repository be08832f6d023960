"""Run a guest-side step as root: directly when the SSH user is root, through ``sudo -n`` when it is not.

Privileged steps: onlining/offlining CPUs and memory blocks, bringing a NIC up, getting and adding its address,
and pinging through it. For an ordinary user they run as ``sudo -n /bin/sh -c SCRIPT sh ARGS`` (a single command
as ``sudo -n /bin/sh -c 'exec "$@"' sh ARGV``): always the one program, so one sudoers rule allows all of them
(:func:`sudoers_rule`), and ``-n`` makes sudo fail at once where it would wait for a password nobody types.
Steps that only read (the watcher, the probe, ``ip addr show``) run as the user.

:func:`require` asks sudo once, before a command changes anything in the domain, so a user whose sudo wants a
password gets one line naming the rule (exit code 16) and the live domain is as it was.
"""

from __future__ import annotations

from vhotplug import errors
from vhotplug.guest import shell
from vhotplug.guest.ssh import GuestSession

#: The program sudo is asked to run: present on every Linux guest, and the one path the sudoers rule names.
ROOT_SHELL = "/bin/sh"
SUDO = ["sudo", "-n", ROOT_SHELL]
# A single command, with the PATH a script gets (sudo's secure_path may be unset).
_EXEC = shell.script('exec "$@"')


def guest_user(session: GuestSession) -> str:
    """The user the session logs in as (a session without a target, such as a test double: root, as before)."""
    return getattr(getattr(session, "target", None), "user", "root")


def needs_sudo(session: GuestSession) -> bool:
    return guest_user(session) != "root"


def sudoers_rule(user: str) -> str:
    """The sudoers line that lets ``user`` run vhotplug's privileged steps without a password."""
    return f"{user} ALL=(root) NOPASSWD: {ROOT_SHELL}"


def script_argv(session: GuestSession, text: str, *args: str, privileged: bool) -> list[str]:
    """Fixed script ``text`` with positional ``args``, as root when ``privileged`` (see the module)."""
    if privileged and needs_sudo(session):
        return [*SUDO, "-c", text, "sh", *args]
    return shell.sh_argv(text, *args)


def command_argv(session: GuestSession, argv: list[str], *, privileged: bool) -> list[str]:
    """One command, as root when ``privileged``; a root login runs it as it is (the lab guest: unchanged)."""
    if not needs_sudo(session):
        return argv
    return [*SUDO, "-c", _EXEC, "sh", *argv] if privileged else shell.sh_argv(_EXEC, *argv)


def require(session: GuestSession, what: str) -> None:
    """Raise :class:`errors.GuestPrivilege` unless the session's user may run the privileged steps.

    ``what`` says what would have needed root ("online the new CPUs"). Call it before anything changes:
    it runs ``sudo -n /bin/sh -c 'exit 0'``, the program the steps run through, so a narrower rule fails
    here too rather than halfway. A root login is not asked anything.
    """
    if not needs_sudo(session):
        return
    user = guest_user(session)
    result = session.run([*SUDO, "-c", "exit 0"], timeout=30, check=False)
    if result.status == 0:
        return
    said = (result.stderr.strip() or result.stdout.strip() or f"exit {result.status}").splitlines()[-1][:200]
    rule = sudoers_rule(user)
    if result.status == 127 or "not found" in said:
        problem = f"the guest has no sudo ({said})"
    else:
        problem = f"sudo -n refused: {said}"
        if "tty" in said:  # "sorry, you must have a tty to run sudo": older RHEL's Defaults requiretty
            rule += f" and Defaults:{user} !requiretty"
    raise errors.GuestPrivilege(f"guest user {user} cannot {what} as root: {problem}; "
                                f"the guest's sudoers needs: {rule}")
