"""Connection sharing: frames, socket naming, the client channel, and when sharing is off."""

from __future__ import annotations

import shutil
import socket
import struct
import tempfile
from pathlib import Path

import pytest

from vhotplug.guest import mux
from vhotplug.guest.target import SSHTarget


@pytest.fixture(autouse=True)
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    short = Path(tempfile.mkdtemp(prefix="vhmux-", dir="/tmp"))  # Unix socket paths must stay short
    monkeypatch.setenv("VHOTPLUG_RUN_DIR", str(short))
    monkeypatch.delenv("VHOTPLUG_SSH_PERSIST", raising=False)
    yield short
    shutil.rmtree(short)


def test_frames_round_trip_and_end():
    a, b = socket.socketpair()
    with a, b:
        mux.send_frame(a, b"o", b"hello\n")
        mux.send_frame(a, b"x", struct.pack(">i", 3))
        assert mux.recv_frame(b) == (b"o", b"hello\n")
        assert mux.recv_frame(b) == (b"x", struct.pack(">i", 3))
        a.close()
        assert mux.recv_frame(b) is None


def test_oversized_frame_is_refused():
    a, b = socket.socketpair()
    with a, b:
        a.sendall(struct.pack(">cI", b"o", 1 << 30))
        with pytest.raises(OSError, match="oversized"):
            mux.recv_frame(b)


def test_socket_names_separate_every_login_detail(tmp_path):
    base = SSHTarget("127.0.0.1", 2222, "root", tmp_path / "k", tmp_path / "kh")
    variants = [SSHTarget("127.0.0.1", 2223, "root", tmp_path / "k", tmp_path / "kh"),
                SSHTarget("127.0.0.1", 2222, "admin", tmp_path / "k", tmp_path / "kh"),
                SSHTarget("127.0.0.1", 2222, "root", tmp_path / "k2", tmp_path / "kh"),
                SSHTarget("127.0.0.1", 2222, "root", tmp_path / "k", tmp_path / "kh2"),
                SSHTarget("127.0.0.2", 2222, "root", tmp_path / "k", tmp_path / "kh")]
    names = {mux.socket_path(t) for t in [base, *variants]}
    assert len(names) == 6
    same_but_other_source = SSHTarget("127.0.0.1", 2222, "root", tmp_path / "k", tmp_path / "kh", source="metadata")
    assert mux.socket_path(same_but_other_source) == mux.socket_path(base)


def test_too_long_socket_dir_turns_sharing_off(monkeypatch):
    monkeypatch.setenv("VHOTPLUG_RUN_DIR", "/tmp/" + "x" * 120)
    assert mux.socket_path(SSHTarget("127.0.0.1")) is None
    assert mux.attach(SSHTarget("127.0.0.1")) is None


def test_no_master_stale_socket_and_sharing_off(monkeypatch, run_dir):
    target = SSHTarget("127.0.0.1", 2222)
    assert mux.attach(target) is None  # nothing there
    path = mux.socket_path(target)
    path.parent.mkdir(mode=0o700, parents=True)
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()  # a killed master's socket file: connection refused
    assert path.exists() and mux.attach(target) is None
    monkeypatch.setenv("VHOTPLUG_SSH_PERSIST", "0")
    assert mux.persist_seconds() == 0
    mux.start_master(target)  # off: nothing is started
    monkeypatch.setenv("VHOTPLUG_SSH_PERSIST", "soon")
    assert mux.persist_seconds() == 0


def test_hello_needs_the_masters_ok(run_dir):
    target = SSHTarget("127.0.0.1", 2222)
    path = mux.socket_path(target)
    path.parent.mkdir(mode=0o700, parents=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    with server:
        import threading

        def answer(reply: bytes) -> None:
            conn, _ = server.accept()
            with conn:
                assert mux.recv_frame(conn) == (b"q", b'{"op": "hello"}')
                mux.send_frame(conn, reply)

        for reply, expected in ((b"k", True), (b"E", False)):
            t = threading.Thread(target=answer, args=(reply,))
            t.start()
            client = mux.attach(target)
            t.join()
            assert (client is not None) is expected


def test_channel_demultiplexes_and_times_out():
    a, b = socket.socketpair()
    chan = mux.MuxChannel(b)
    with a:
        chan.settimeout(0.05)
        with pytest.raises(TimeoutError):
            chan.recv(10)
        mux.send_frame(a, b"e", b"warning\n")
        mux.send_frame(a, b"o", b"start 1.0 42 -\n")
        chan.settimeout(5)
        assert chan.recv(4096) == b"start 1.0 42 -\n"
        assert chan.recv_stderr_ready() and chan.recv_stderr(100) == b"warning\n"
        mux.send_frame(a, b"o", b"found")
        mux.send_frame(a, b"x", struct.pack(">i", 0))
        a.close()
        assert chan.status_event.wait(5) and chan.recv_exit_status() == 0
        assert chan.recv(4096) == b"found" and chan.recv(4096) == b""
    chan.close()


def test_channel_reports_the_masters_error():
    a, b = socket.socketpair()
    chan = mux.MuxChannel(b)
    with a:
        mux.send_frame(a, b"E", b"cannot open a channel to the guest: boom")
    with pytest.raises(mux.MuxError, match="boom"):
        chan.read_all(5)
    chan.close()


def test_peer_credentials_are_checked():
    a, b = socket.socketpair()
    with a, b:
        assert mux._same_user(a)


def test_a_socket_in_a_directory_others_can_enter_is_not_trusted(run_dir):
    target = SSHTarget("127.0.0.1", 2222)
    path = mux.socket_path(target)
    path.parent.mkdir(mode=0o700, parents=True)
    path.parent.chmod(0o777)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    with server:
        assert mux.attach(target) is None  # refused before even connecting
        path.parent.chmod(0o700)
        server.settimeout(0.01)
        assert mux._private_dir(path.parent)


def test_a_jump_host_is_part_of_the_login(tmp_path):
    direct = SSHTarget("127.0.0.1", 22, "root", tmp_path / "k", tmp_path / "kh")
    via = SSHTarget("127.0.0.1", 22, "root", tmp_path / "k", tmp_path / "kh", jump=SSHTarget("127.0.0.1", 2200))
    assert mux.socket_path(direct) != mux.socket_path(via)
    spec = mux._identity(via)
    assert mux._target(spec).jump == SSHTarget("127.0.0.1", 2200, source="shared connection")
