"""One paramiko connection per command into the guest, host keys strictly checked.

Every remote command is built from an argv list with ``shlex.join`` (or is a
fixed script shipped with vhotplug): user text is never pasted into a shell line.
"""

from __future__ import annotations

import logging
import shlex
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import paramiko

from vhotplug import errors
from vhotplug.guest.target import SSHTarget

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
                 connect_timeout: float = 10.0) -> None:
        self.target = target
        self._accept_new = accept_new_host_key
        self._timeout = connect_timeout
        self._client: paramiko.SSHClient | None = None

    # -- connection -----------------------------------------------------
    def connect(self) -> GuestSession:
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
            client.set_missing_host_key_policy(_RecordNewKey(known))
        else:
            client.set_missing_host_key_policy(paramiko.RejectPolicy())
        try:
            sock = _open_socket(t, self._timeout)
            client.connect(
                t.host, port=t.port, username=t.user, sock=sock,
                key_filename=str(t.key) if t.key else None,
                timeout=self._timeout, banner_timeout=self._timeout, auth_timeout=self._timeout,
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
                                          hint="check --ssh-key") from exc
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
        return self

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def __enter__(self) -> GuestSession:
        return self.connect() if self._client is None else self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- commands -------------------------------------------------------
    def run(self, argv: list[str], *, timeout: float = 30.0, check: bool = True) -> Result:
        """Run a command given as an argv list (quoted here, never pasted)."""
        return self.run_script(shlex.join(argv), timeout=timeout, check=check)

    def run_script(self, script: str, *, timeout: float = 30.0, check: bool = True) -> Result:
        """Run a fixed shell script that vhotplug owns (no user text inside)."""
        if self._client is None:
            self.connect()
        assert self._client is not None
        try:
            stdin, stdout, stderr = self._client.exec_command(script, timeout=timeout)
            stdin.close()
            out = stdout.read().decode(errors="replace")
            err = stderr.read().decode(errors="replace")
            status = stdout.channel.recv_exit_status()
        except TimeoutError as exc:
            raise errors.Timeout(f"command in guest {self.target} did not finish within {timeout:g} s") from exc
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise errors.GuestUnreachable(f"lost the SSH connection to {self.target}: {exc}") from exc
        result = Result(status, out, err)
        if check and status != 0:
            first = script.splitlines()[0] if script else ""
            raise errors.GuestCommandFailed(
                f"command in guest failed (exit {status}): {first[:80]}: {err.strip()[:300]}"
            )
        return result

    def transport(self) -> paramiko.Transport:
        """The live SSH transport (connecting first if needed), for callers that open their own channel.

        A long-running guest-side watcher needs a channel it can read while other commands
        run on the same connection; ``run`` cannot give it one.
        """
        if self._client is None:
            self.connect()
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


class _RecordNewKey(paramiko.MissingHostKeyPolicy):
    """--accept-new-host-key: trust an unknown key once and append it (a changed key still fails)."""

    def __init__(self, path: Path) -> None:
        self._path = path

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        client.get_host_keys().add(hostname, key.get_name(), key)
        with self._path.open("a") as fh:
            fh.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")


def wait_for_ssh(target: SSHTarget, *, deadline: float, interval: float = 0.25) -> float:
    """Poll until the guest's SSH server completes a verified login; return seconds waited.

    Bounded by ``deadline`` (a ``time.monotonic()`` value). Host-key problems are not
    retried: they will not fix themselves.
    """
    start = time.monotonic()
    last: errors.VhotplugError | None = None
    while time.monotonic() < deadline:
        session = GuestSession(target, connect_timeout=max(0.5, min(2.0, deadline - time.monotonic())))
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
