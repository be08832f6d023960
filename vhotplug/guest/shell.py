"""What every guest-side script starts with, so that one script runs alike under dash, bash and busybox sh.

A guest's ``sh`` may be dash (Debian, Ubuntu), bash in POSIX mode (the RHEL family) or busybox ash (the lab
guest, Alpine), and its SSH user may be an ordinary one whose PATH lacks ``/usr/sbin`` and ``/sbin`` (where
Debian keeps ``ip`` helpers, ``dhclient``, ``ethtool``). So the scripts vhotplug sends use POSIX sh only (no
``[[``, arrays, ``${var//a/b}``, ``local``), begin with :data:`PREAMBLE`, and run as ``sh -c SCRIPT sh ARGS``
(:func:`sh_argv`): the same shell whatever the user's login shell is.
"""

from __future__ import annotations

import shlex

# PATH: the user's own entries first, then the system directories a non-root login leaves out.
# nap USEC SECONDS: busybox's usleep where the guest has one (the lab guest: as before), else sleep with a
# fraction (GNU coreutils and busybox both take one; Debian has no usleep). Chosen once, here: `command -v`
# is a builtin in all three shells, so the choice costs no fork, and each nap stays one.
PREAMBLE = r"""PATH=${PATH:+$PATH:}/usr/sbin:/sbin:/usr/bin:/bin; export PATH
if command -v usleep >/dev/null 2>&1; then nap() { usleep "$1"; }; else nap() { sleep "$2"; }; fi
"""


#: dropbear refuses an exec request longer than this (its MAX_CMD_LEN); OpenSSH takes far more.
MAX_COMMAND = 9000


def compact(text: str) -> str:
    """``text`` without its comment lines and indentation: they are for readers of the source, and the
    command line that carries a script must stay under dropbear's MAX_COMMAND (the watcher came to 9.7 kB
    with them). Only whole-line comments go; no script of ours has a line inside quotes that starts so."""
    lines = (line.strip() for line in text.splitlines())
    return "\n".join(line for line in lines if line and not line.startswith("#")) + "\n"


def script(body: str) -> str:
    """A guest script: the preamble, then ``body`` (fixed text of vhotplug's, never a value), compacted."""
    return compact(PREAMBLE + body)


def sh_argv(text: str, *args: str) -> list[str]:
    """Run fixed script ``text`` with ``args`` as its positional parameters ($1, $2, ...)."""
    return ["sh", "-c", text, "sh", *args]


def sh_command(text: str, *args: str) -> str:
    """:func:`sh_argv` as one command line for the SSH server (each word quoted)."""
    return shlex.join(sh_argv(text, *args))
