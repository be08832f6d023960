"""One paramiko connection per command into the guest, host keys strictly checked.

Every remote command is built from an argv list with ``shlex.join`` (or is a
fixed script shipped with vhotplug): user text is never pasted into a shell line.

A session made with ``share=True`` (the CLI's) first looks for a connection-sharing
master for the same target (:mod:`vhotplug.guest.mux`) and runs its commands through
it; without one it connects itself and starts one in the background for the next
command. paramiko is imported only when this process connects itself.
"""

from __future__ import annotations

import logging
import shlex
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from vhotplug import errors
from vhotplug.guest import mux
from vhotplug.guest.target import SSHTarget

if TYPE_CHECKING:
    import paramiko

#: First and longest pause between two login attempts (doubling in between).
LOGIN_BACKOFF = (0.2, 3.0)

# paramiko's transport thread logs failed handshakes (expected while a guest boots)
# with tracebacks; we report errors ourselves, so keep its log off the terminal.
logging.getLogger("paramiko").addHandler(logging.NullHandler())


@dataclass(frozen=True)
class Result:
    status: int
    stdout: str
    stderr: str


class GuestSession:
    """An SSH connection to a guest; use as a context manager."""

    def __init__(self, target: SSHTarget, *, accept_new_host_key: bool = False,
                 connect_timeout: float = 10.0, share: bool = False, login_timeout: float | None = None) -> None:
        """``connect_timeout`` bounds one login attempt. With ``login_timeout`` (a command's --timeout),
        a login that fails for a reason that may pass (refused, reset, no banner yet, the transport closed
        during authentication) is tried again with backoff until that many seconds have passed, and the
        banner and authentication may each take up to the whole of it (a guest under load answers late)."""
        self.target = target
        self._accept_new = accept_new_host_key
        self._timeout = connect_timeout
        self._login_timeout = login_timeout
        self._share = share
        self._client: paramiko.SSHClient | None = None
        self._mux: mux.MuxClient | None = None
        self._jump: GuestSession | None = None
        #: Logins that failed and were tried again (for reports).
        self.retries = 0

    @property
    def shared(self) -> bool:
        """True when commands go through a connection-sharing master (no SSH handshake of our own)."""
        return self._mux is not None

    # -- connection -----------------------------------------------------
    def connect(self) -> GuestSession:
        if self._share and (client := mux.attach(self.target)) is not None:
            self._mux = client
            return self
        self._login()
        if self._share:
            mux.start_master(self.target)
        return self

    def reconnect(self, deadline: float, *, worth_it: Callable[[], bool] | None = None) -> None:
        """Log in again after the connection died (sshd restarted, a stalled forward): directly, retrying
        until ``deadline`` (a ``time.monotonic()`` value) while ``worth_it()`` (e.g. "the domain still
        runs") holds."""
        self.close()
        self._login(deadline, worth_it)

    def _login(self, deadline: float | None = None, worth_it: Callable[[], bool] | None = None) -> None:
        """``_connect_direct``, tried again with backoff while it fails for a reason that may pass."""
        if deadline is None:
            if self._login_timeout is None:
                self._connect_direct()
                return
            deadline = time.monotonic() + self._login_timeout
        pause = LOGIN_BACKOFF[0]
        while True:
            remaining = deadline - time.monotonic()
            try:
                self._connect_direct(patience=max(remaining, self._timeout))
                return
            except errors.GuestHostKeyError:
                raise  # a wrong or unknown key does not fix itself
            except errors.GuestUnreachable as exc:
                if exc.final or time.monotonic() + pause >= deadline or (worth_it and not worth_it()):
                    raise
            self.retries += 1
            time.sleep(pause)  # bounded by the deadline; a guest that refuses has nothing to wait on
            pause = min(pause * 2, LOGIN_BACKOFF[1])

    def _connect_direct(self, patience: float | None = None) -> None:
        """One login. ``patience``: how long the banner and authentication may take (default: one attempt's
        ``connect_timeout``); the TCP connect itself is always bounded by ``connect_timeout``."""
        import paramiko

        t = self.target
        client = paramiko.SSHClient()
        known = t.known_hosts or Path.home() / ".ssh" / "known_hosts"
        if known.exists():
            try:
                client.load_host_keys(str(known))
            except (OSError, paramiko.SSHException) as exc:
                raise errors.GuestHostKeyError(f"cannot read known_hosts file {known}: {exc}") from exc
        elif not self._accept_new:
            raise errors.GuestHostKeyError(
                f"no known_hosts file at {known}, so the host key of {t} cannot be verified",
                hint="pass --known-hosts FILE, or --accept-new-host-key to trust and record it",
            )
        if self._accept_new:
            known.parent.mkdir(parents=True, exist_ok=True)
            client.set_missing_host_key_policy(_record_new_key(known))
        else:
            client.set_missing_host_key_policy(paramiko.RejectPolicy())
        try:
            sock = self._open_socket(patience)
            client.connect(
                t.host, port=t.port, username=t.user, sock=sock,
                key_filename=str(t.key) if t.key else None,
                # With our own socket, paramiko's ``timeout`` bounds the key exchange (start_client), which
                # returns *without* an error when it runs out ("No existing session" follows at auth).
                timeout=patience or self._timeout, banner_timeout=patience or self._timeout,
                auth_timeout=patience or self._timeout,
                allow_agent=t.key is None, look_for_keys=t.key is None,
            )
        except paramiko.BadHostKeyException as exc:
            client.close()
            raise errors.GuestHostKeyError(
                f"host key of {t} does not match {known}: possible man-in-the-middle, or the guest was rebuilt",
                hint="remove the stale entry from the known_hosts file if the change is expected",
            ) from exc
        except paramiko.AuthenticationException as exc:
            client.close()
            raise errors.GuestUnreachable(f"SSH authentication to {t} failed: {exc}",
                                          hint="check --ssh-key", final=True) from exc
        except paramiko.SSHException as exc:
            client.close()
            if "not found in known_hosts" in str(exc):
                raise errors.GuestHostKeyError(
                    f"host key of {t} is not in {known}",
                    hint="add it to the known_hosts file, or pass --accept-new-host-key to trust it once",
                ) from exc
            raise errors.GuestUnreachable(f"SSH to {t} failed: {exc}") from exc
        except (OSError, EOFError) as exc:
            client.close()
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
            raise errors.GuestUnreachable(f"cannot reach guest at {t} ({t.source}): {reason}") from exc
        self._client = client

    def _open_socket(self, patience: float | None) -> Any:
        """A TCP connection to the guest, or a channel to it through the jump host (ProxyJump)."""
        t = self.target
        if t.jump is None:
            return _open_socket(t, self._timeout)
        # The jump host is logged into first, with its own host-key check, then forwards to the guest.
        self._jump = GuestSession(t.jump, accept_new_host_key=self._accept_new, connect_timeout=self._timeout)
        self._jump._connect_direct(patience)
        try:
            return self._jump.transport().open_channel("direct-tcpip", (t.host, t.port), ("127.0.0.1", 0),
                                                       timeout=patience or self._timeout)
        except ssh_errors() as exc:
            self._jump.close()
            raise errors.GuestUnreachable(f"jump host {t.jump} cannot reach {t.host}:{t.port}: {exc}") from exc

    def connected(self) -> bool:
        """Whether the connection still stands (the sharing master still answers, or our transport is up)."""
        if self._mux is not None:
            return self._mux.hello()
        transport = self._client.get_transport() if self._client is not None else None
        return transport is not None and transport.is_active()

    def close(self) -> None:
        self._mux = None
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._jump is not None:
            self._jump.close()
            self._jump = None

    def __enter__(self) -> GuestSession:
        return self.connect() if self._client is None and self._mux is None else self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- commands -------------------------------------------------------
    def run(self, argv: list[str], *, timeout: float = 30.0, check: bool = True) -> Result:
        """Run a command given as an argv list (quoted here, never pasted)."""
        return self.run_script(shlex.join(argv), timeout=timeout, check=check)

    def run_script(self, script: str, *, timeout: float = 30.0, check: bool = True) -> Result:
        """Run a fixed shell script that vhotplug owns (no user text inside)."""
        if self._client is None and self._mux is None:
            self.connect()
        try:
            if self._mux is not None:
                chan = self.open_exec(script, timeout=timeout)
                try:
                    raw_out, raw_err, status = chan.read_all(timeout)  # type: ignore[union-attr]
                finally:
                    chan.close()
                out, err = raw_out.decode(errors="replace"), raw_err.decode(errors="replace")
            else:
                assert self._client is not None
                stdin, stdout, stderr = self._client.exec_command(script, timeout=timeout)
                stdin.close()
                out = stdout.read().decode(errors="replace")
                err = stderr.read().decode(errors="replace")
                status = stdout.channel.recv_exit_status()
        except TimeoutError as exc:
            raise errors.Timeout(f"command in guest {self.target} did not finish within {timeout:g} s") from exc
        except ssh_errors() as exc:
            raise errors.GuestUnreachable(f"lost the SSH connection to {self.target}: {exc}") from exc
        result = Result(status, out, err)
        if check and status != 0:
            first = script.splitlines()[0] if script else ""
            raise errors.GuestCommandFailed(
                f"command in guest failed (exit {status}): {first[:80]}: {err.strip()[:300]}"
            )
        return result

    def open_exec(self, command: str, *, timeout: float = 30.0) -> Any:
        """Start ``command`` on a channel of its own and return that channel (paramiko's, or the
        sharing master's with the same recv/recv_stderr/status_event/recv_exit_status/close).

        A master that went away since ``connect`` is dropped before the command is sent, and the
        session connects itself instead, so a command never runs twice.
        """
        if self._mux is not None:
            try:
                return self._mux.open_exec(command, timeout=timeout)
            except OSError:
                self._mux = None
                self._login()
        chan = self.transport().open_session(timeout=timeout)
        chan.exec_command(command)
        return chan

    def transport(self) -> paramiko.Transport:
        """The live SSH transport (connecting first if needed), for callers that open their own channel.

        A long-running guest-side watcher needs a channel it can read while other commands
        run on the same connection; ``run`` cannot give it one.
        """
        if self._client is None:
            self._login()
        assert self._client is not None
        transport = self._client.get_transport()
        if transport is None or not transport.is_active():
            raise errors.GuestUnreachable(f"the SSH connection to {self.target} is closed")
        return transport


def _open_socket(t: SSHTarget, timeout: float) -> socket.socket:
    """A TCP connection with Nagle off: SSH's many small request/reply packets otherwise
    meet delayed ACKs, which measured ~40 ms per round trip against the lab guest."""
    sock = socket.create_connection((t.host, t.port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def ssh_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "the SSH connection failed": paramiko's only once it is loaded
    (a process that never imported it cannot meet them)."""
    pm = sys.modules.get("paramiko")
    return (OSError, EOFError, pm.SSHException) if pm is not None else (OSError, EOFError)


def _record_new_key(path: Path) -> paramiko.MissingHostKeyPolicy:
    """--accept-new-host-key: trust an unknown key once and append it (a changed key still fails)."""
    import paramiko

    class _RecordNewKey(paramiko.MissingHostKeyPolicy):
        def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
            client.get_host_keys().add(hostname, key.get_name(), key)
            with path.open("a") as fh:
                fh.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")

    return _RecordNewKey()


def wait_for_ssh(target: SSHTarget, *, deadline: float, interval: float = 0.25,
                 attempt_timeout: float = 2.0) -> float:
    """Poll until the guest's SSH server completes a verified login; return seconds waited.

    Bounded by ``deadline`` (a ``time.monotonic()`` value). Host-key problems are not
    retried: they will not fix themselves. ``attempt_timeout`` bounds one login attempt (a guest
    reached through a jump host under nested TCG needs several seconds for one handshake).
    """
    start = time.monotonic()
    last: errors.VhotplugError | None = None
    while time.monotonic() < deadline:
        session = GuestSession(target, connect_timeout=max(0.5, min(attempt_timeout, deadline - time.monotonic())))
        try:
            with session:
                session.run(["true"], timeout=10)
            return time.monotonic() - start
        except errors.GuestHostKeyError:
            raise
        except (errors.GuestUnreachable, errors.Timeout) as exc:
            last = exc
        time.sleep(interval)
    raise errors.Timeout(f"guest SSH at {target} did not answer in time: {last}")
