"""Share one SSH connection to a guest between vhotplug commands (like OpenSSH's ControlPersist).

Every vhotplug command that checks inside a guest needs an SSH connection, and the handshake is the
largest part of a short command's time (~100 ms into the TCG lab guest, plus ~30 ms to import paramiko).
So, as OpenSSH does with ``ControlMaster``/``ControlPersist``, the first command that reaches a guest
also starts a small background *master* process that logs into the guest (host key strictly checked,
exactly as the command did) and listens on a Unix socket; later commands run their guest commands over
that socket and skip both the handshake and paramiko. The master exits when it has had no client for
``$VHOTPLUG_SSH_PERSIST`` seconds (default 60; 0 turns sharing off) or when its connection to the guest ends.

Safety: sockets live in ``$VHOTPLUG_RUN_DIR/ssh`` (mode 0700), named by a hash of everything that decides
the login (user, host, port, key file, known_hosts file), so a different key or known_hosts file never
shares a connection; the master serves only peers with its own uid (``SO_PEERCRED``). Commands still reach
the guest as ``sh -c`` lines built by vhotplug (``shlex.join``), never pasted user text.

Protocol, one Unix connection per remote command: the client sends a ``q`` frame (JSON ``{"op": "exec",
"command": ...}`` or ``{"op": "hello"}``); the master answers ``o`` (stdout bytes), ``e`` (stderr bytes),
``x`` (exit status) and ``E`` (error text) frames. Closing the Unix connection closes the remote channel.
A frame is one type byte, a 4-byte big-endian length, and the payload.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vhotplug.errors import VhotplugError
from vhotplug.shared import shared_dir

if TYPE_CHECKING:
    from vhotplug.guest.target import SSHTarget

_HEADER = struct.Struct(">cI")
_MAX_FRAME = 1 << 20
_SOCK_PATH_MAX = 100  # sun_path is 108 bytes on Linux
DEFAULT_PERSIST = 60.0
HELLO_TIMEOUT = 2.0


def persist_seconds() -> float:
    """How long a master outlives its last client; 0 (or garbage) turns sharing off."""
    try:
        return max(0.0, float(os.environ.get("VHOTPLUG_SSH_PERSIST", DEFAULT_PERSIST)))
    except ValueError:
        return 0.0


def socket_dir() -> Path:
    """Per user (a socket there speaks for that user's logins): ``ssh`` for root, ``ssh-UID`` for others."""
    uid = os.geteuid()
    return Path(os.environ.get("VHOTPLUG_RUN_DIR") or "/run/vhotplug") / ("ssh" if uid == 0 else f"ssh-{uid}")


def _identity(target: SSHTarget) -> dict[str, object]:
    return {"user": target.user, "host": target.host, "port": target.port,
            "key": str(target.key.resolve()) if target.key else None,
            "known_hosts": str(target.known_hosts.resolve()) if target.known_hosts else None,
            "jump": _identity(target.jump) if target.jump else None}


def socket_path(target: SSHTarget) -> Path | None:
    """The master's socket for ``target``; None when the path would not fit a Unix socket."""
    digest = hashlib.sha256(json.dumps(_identity(target), sort_keys=True).encode()).hexdigest()[:20]
    path = socket_dir() / f"{digest}.sock"
    return path if len(str(path)) <= _SOCK_PATH_MAX else None


# -- frames ---------------------------------------------------------------------------------------------------


def send_frame(sock: socket.socket, kind: bytes, payload: bytes = b"") -> None:
    sock.sendall(_HEADER.pack(kind, len(payload)) + payload)


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def recv_frame(sock: socket.socket) -> tuple[bytes, bytes] | None:
    """The next (type, payload), or None at end of stream."""
    head = _recv_exact(sock, _HEADER.size)
    if head is None:
        return None
    kind, size = _HEADER.unpack(head)
    if size > _MAX_FRAME:
        raise OSError(f"oversized frame ({size} bytes)")
    payload = _recv_exact(sock, size) if size else b""
    if payload is None:
        return None
    return kind, payload


# -- the client side ------------------------------------------------------------------------------------------


class MuxError(OSError):
    """The master could not run the command (its channel failed); the message says why."""


class MuxChannel:
    """One remote command through the master, with the parts of paramiko's Channel vhotplug uses."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._cond = threading.Condition()
        self._out = b""
        self._err = b""
        self._eof = False
        self._error: str | None = None
        self._status = -1
        self._timeout: float | None = None
        self.status_event = threading.Event()
        threading.Thread(target=self._reader, name="vhotplug-mux-reader", daemon=True).start()

    def _reader(self) -> None:
        try:
            while (frame := recv_frame(self._sock)) is not None:
                kind, payload = frame
                with self._cond:
                    if kind == b"o":
                        self._out += payload
                    elif kind == b"e":
                        self._err += payload
                    elif kind == b"x":
                        self._status = struct.unpack(">i", payload)[0]
                        self.status_event.set()
                    elif kind == b"E":
                        self._error = payload.decode(errors="replace")
                    self._cond.notify_all()
        except OSError:
            pass
        with self._cond:
            self._eof = True
            self._cond.notify_all()
        self.status_event.set()

    def settimeout(self, timeout: float | None) -> None:
        self._timeout = timeout

    def recv(self, n: int) -> bytes:
        """Up to ``n`` bytes of stdout; b"" at the end; TimeoutError after ``settimeout`` seconds."""
        deadline = None if self._timeout is None else time.monotonic() + self._timeout
        with self._cond:
            while not self._out and not self._eof:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError("timed out")
                self._cond.wait(remaining)
            if self._error is not None and not self._out:
                raise MuxError(self._error)
            data, self._out = self._out[:n], self._out[n:]
            return data

    def recv_stderr_ready(self) -> bool:
        with self._cond:
            return bool(self._err)

    def recv_stderr(self, n: int) -> bytes:
        with self._cond:
            data, self._err = self._err[:n], self._err[n:]
            return data

    def read_all(self, timeout: float) -> tuple[bytes, bytes, int]:
        """Everything until the command ends: (stdout, stderr, exit status); TimeoutError after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._eof:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("timed out")
                self._cond.wait(remaining)
            if self._error is not None:
                raise MuxError(self._error)
            return self._out, self._err, self._status

    def recv_exit_status(self) -> int:
        self.status_event.wait()
        return self._status

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()


class MuxClient:
    """A live master for one guest target; each command opens its own Unix connection to it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _connect(self, timeout: float) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(str(self.path))
        except OSError:
            sock.close()
            raise
        return sock

    def open_exec(self, command: str, timeout: float = 10.0) -> MuxChannel:
        sock = self._connect(timeout)
        try:
            send_frame(sock, b"q", json.dumps({"op": "exec", "command": command}).encode())
        except OSError:
            sock.close()
            raise
        sock.settimeout(None)
        return MuxChannel(sock)

    def hello(self) -> bool:
        """True when a master of our own uid answers and its guest connection is up."""
        try:
            with self._connect(HELLO_TIMEOUT) as sock:
                if not _same_user(sock):  # whoever listens there must be us: it speaks for the guest
                    return False
                send_frame(sock, b"q", b'{"op": "hello"}')
                frame = recv_frame(sock)
        except OSError:
            return False
        return frame is not None and frame[0] == b"k"


def attach(target: SSHTarget) -> MuxClient | None:
    """A live master for ``target``, or None (sharing off, none running, or it no longer works)."""
    if persist_seconds() <= 0 or (path := socket_path(target)) is None or not path.exists():
        return None
    if not _private_dir(path.parent):
        return None
    client = MuxClient(path)
    return client if client.hello() else None


_started: list[subprocess.Popen[bytes]] = []


def start_master(target: SSHTarget) -> None:
    """Start a master for ``target`` in the background (it logs in itself); never waits for it.

    A command exits long before its master does (init then reaps it); a long-lived caller reaps
    the ones that have ended each time it starts another.
    """
    _started[:] = [p for p in _started if p.poll() is None]
    persist = persist_seconds()
    if persist <= 0 or (path := socket_path(target)) is None:
        return
    try:
        shared_dir(path.parent.parent)  # an operator makes its own directory in the one root shares
        path.parent.mkdir(mode=0o700, exist_ok=True)
        os.chmod(path.parent, 0o700)
        spec = json.dumps({**_identity(target), "source": target.source})
        _started.append(subprocess.Popen(
            [sys.executable, "-m", "vhotplug.guest.mux", str(path), spec, str(persist)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, close_fds=True, cwd="/"))
    except (OSError, VhotplugError):
        pass  # sharing is an optimisation: the command goes on with its own connection


# -- the master -----------------------------------------------------------------------------------------------


class Master:
    """Holds one SSH connection to a guest and runs clients' commands over it."""

    def __init__(self, path: Path, target: SSHTarget, persist: float) -> None:
        self.path, self.target, self.persist = path, target, persist
        self._active = 0
        self._lock = threading.Lock()
        self._last = time.monotonic()

    def serve(self) -> int:
        from vhotplug import errors
        from vhotplug.guest.ssh import GuestSession

        try:
            session = GuestSession(self.target).connect()  # strict host key check, no sharing
        except errors.VhotplugError:
            return 1
        with session:
            server = self._bind()
            if server is None:
                return 0
            ino = os.stat(self.path).st_ino
            try:
                self._loop(server, session)
            finally:
                server.close()
                with contextlib.suppress(OSError):
                    if os.stat(self.path).st_ino == ino:  # still ours, not a successor's
                        self.path.unlink()
        return 0

    def _bind(self) -> socket.socket | None:
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            server.bind(str(self.path))
        except OSError:
            if MuxClient(self.path).hello():  # another master won the race
                server.close()
                return None
            with contextlib.suppress(OSError):
                self.path.unlink()  # a dead master's socket
            try:
                server.bind(str(self.path))
            except OSError:
                server.close()
                return None
        finally:
            os.umask(old)
        server.listen(16)
        server.settimeout(1.0)
        return server

    def _loop(self, server: socket.socket, session: object) -> None:
        transport = session.transport()  # type: ignore[attr-defined]
        while transport.is_active():
            with self._lock:
                idle = self._active == 0 and time.monotonic() - self._last > self.persist
            if idle:
                return
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            if not _same_user(conn):
                conn.close()
                continue
            with self._lock:
                self._active += 1
            threading.Thread(target=self._client, args=(conn, transport), daemon=True).start()

    def _client(self, conn: socket.socket, transport: object) -> None:
        try:
            _serve_client(conn, transport)
        except OSError:
            pass
        finally:
            conn.close()
            with self._lock:
                self._active -= 1
                self._last = time.monotonic()


def _private_dir(directory: Path) -> bool:
    """The socket directory is ours and nobody else can enter it (else a socket there proves nothing)."""
    try:
        st = os.lstat(directory)
    except OSError:
        return False
    return st.st_uid == os.getuid() and (st.st_mode & 0o077) == 0 and not os.path.islink(directory)


def _same_user(conn: socket.socket) -> bool:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid == os.getuid()


def _serve_client(conn: socket.socket, transport: object) -> None:
    import paramiko

    conn.settimeout(HELLO_TIMEOUT)
    frame = recv_frame(conn)
    if frame is None or frame[0] != b"q":
        return
    request = json.loads(frame[1])
    if request.get("op") == "hello":
        send_frame(conn, b"k" if transport.is_active() else b"E", b"")  # type: ignore[attr-defined]
        return
    if request.get("op") != "exec" or not isinstance(request.get("command"), str):
        send_frame(conn, b"E", b"bad request")
        return
    conn.settimeout(None)
    try:
        chan = transport.open_session(timeout=10)  # type: ignore[attr-defined]
        chan.exec_command(request["command"])
    except (paramiko.SSHException, OSError, EOFError) as exc:
        send_frame(conn, b"E", f"cannot open a channel to the guest: {exc or type(exc).__name__}".encode())
        return
    try:
        _relay(conn, chan)
    finally:
        chan.close()


def _relay(conn: socket.socket, chan: object) -> None:
    """Copy the channel's stdout/stderr to the client until the command ends or the client goes."""
    while True:
        # stdout and the channel's closing wake select at once; stderr is drained on every pass.
        ready, _, _ = select.select([conn, chan], [], [], 0.05)
        if conn in ready and not conn.recv(4096, socket.MSG_PEEK):
            return  # the client closed: the caller closes the channel, ending the remote command
        while chan.recv_ready():  # type: ignore[attr-defined]
            send_frame(conn, b"o", chan.recv(65536))  # type: ignore[attr-defined]
        while chan.recv_stderr_ready():  # type: ignore[attr-defined]
            send_frame(conn, b"e", chan.recv_stderr(65536))  # type: ignore[attr-defined]
        if chan.exit_status_ready() and chan.eof_received:  # type: ignore[attr-defined]
            while chan.recv_ready():  # type: ignore[attr-defined]
                send_frame(conn, b"o", chan.recv(65536))  # type: ignore[attr-defined]
            while chan.recv_stderr_ready():  # type: ignore[attr-defined]
                send_frame(conn, b"e", chan.recv_stderr(65536))  # type: ignore[attr-defined]
            send_frame(conn, b"x", struct.pack(">i", chan.recv_exit_status()))  # type: ignore[attr-defined]
            return


def _main(argv: list[str]) -> int:
    import signal


    # `kill PID` ends a master cleanly (its socket removed), as an idle timeout does.
    signal.signal(signal.SIGTERM, lambda _sig, _frame: sys.exit(0))
    path, spec, persist = Path(argv[0]), json.loads(argv[1]), float(argv[2])
    return Master(path, _target(spec), persist).serve()


def _target(spec: dict[str, Any]) -> SSHTarget:
    from vhotplug.guest.target import SSHTarget

    return SSHTarget(host=spec["host"], port=int(spec["port"]), user=spec["user"],
                     key=Path(spec["key"]) if spec.get("key") else None,
                     known_hosts=Path(spec["known_hosts"]) if spec.get("known_hosts") else None,
                     source=spec.get("source", "shared connection"),
                     jump=_target(spec["jump"]) if spec.get("jump") else None)


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
