"""Locks between vhotplug processes, proven with real processes contending for real flock locks.

Each child is a small Python program driven over its stdin/stdout: it says ``ready`` once imported, tries
its locks when told ``go`` and reports the outcome, then releases when told ``release``. The test decides
the order of events through those pipes, never by sleeping; every wait is bounded.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vhotplug import errors
from vhotplug.addresses import Bdf, UsbDevice
from vhotplug.host import lock

REPO = Path(__file__).resolve().parents[2]
LIMIT = 30.0  # seconds any one step may take before the test fails instead of hanging
KEY = "pci-0000_06_10_1"

CHILD = r"""
import json, sys
from vhotplug.host import lock

args = json.loads(sys.argv[1])

def say(*words):
    print(*words, flush=True)

say("ready")
sys.stdin.readline()  # "go"
try:
    for _ in range(args["cycles"]):
        with lock.acquire(args["keys"], wait=args["wait"], timeout=args["timeout"]):
            pass
    if not args["hold"]:
        say("done")
        sys.exit(0)
    held = lock.acquire(args["keys"], wait=args["wait"], timeout=args["timeout"])
except lock.Busy as exc:
    say("busy", json.dumps({"message": exc.message, "pid": exc.pid, "key": exc.key}))
    sys.exit(0)
say("locked")
sys.stdin.readline()  # "release"
held.release()
say("released")
"""


class Child:
    """A process running CHILD, with line-based, time-bounded talk over its pipes."""

    def __init__(self, keys: list[str], *, wait: bool = False, timeout: float | None = None, cycles: int = 0) -> None:
        args = {"keys": keys, "wait": wait, "timeout": timeout, "cycles": cycles, "hold": cycles == 0}
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, json.dumps(args)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
        )
        self.pid = self.proc.pid
        self._buffer = b""

    def send(self, word: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(word.encode() + b"\n")
        self.proc.stdin.flush()

    def line(self, timeout: float = LIMIT) -> str:
        """The child's next line; fails the test if none comes within ``timeout``."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        # Raw reads into our own buffer: a buffered reader could hold a second line that select() then
        # never reports.
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                pytest.fail(f"child {self.pid} said nothing within {timeout} s")
            chunk = os.read(fd, 4096)
            if not chunk:
                pytest.fail(f"child {self.pid} exited with {self.proc.wait(LIMIT)} before saying anything more")
            self._buffer += chunk
        text, _, self._buffer = self._buffer.partition(b"\n")
        return text.decode()

    def expect(self, word: str) -> str:
        text = self.line()
        assert text.split(" ", 1)[0] == word, f"child {self.pid}: expected {word!r}, got {text!r}"
        return text

    def busy(self) -> dict:
        return json.loads(self.expect("busy").split(" ", 1)[1])

    def finish(self) -> None:
        assert self.proc.wait(LIMIT) == 0


@pytest.fixture
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("VHOTPLUG_RUN_DIR", str(tmp_path))
    return tmp_path


@pytest.fixture
def spawn(run_dir: Path) -> Iterator:
    """Start children that are ready (imported) and waiting for ``go``; kill any left at the end."""
    children: list[Child] = []

    def start(keys: list[str], **kwargs: object) -> Child:
        child = Child(keys, **kwargs)  # type: ignore[arg-type]
        children.append(child)
        child.expect("ready")
        return child

    yield start
    for child in children:
        if child.proc.poll() is None:
            child.proc.kill()  # only processes this test started, by their own handle
        child.proc.wait(LIMIT)
        for pipe in (child.proc.stdin, child.proc.stdout):
            if pipe is not None:
                pipe.close()


def holding(spawn, keys: list[str]) -> Child:
    child = spawn(keys)
    child.send("go")
    child.expect("locked")
    return child


def wait_until_blocked(pid: int, path: Path) -> None:
    """Return once ``pid`` is queued in the kernel for the flock on ``path`` (as /proc/locks shows).

    This is the one place that polls: no pipe can tell us that a process is inside flock(2), and without
    this the test would not know that the waiter really waited.
    """
    inode = f":{os.stat(path).st_ino} "
    deadline = time.monotonic() + LIMIT
    while time.monotonic() < deadline:
        for entry in Path("/proc/locks").read_text().splitlines():
            if "-> FLOCK" in entry and f" {pid} " in entry and inode in entry:
                return
        time.sleep(0.01)
    pytest.fail(f"PID {pid} never queued for the lock on {path}")


# --- two real processes ------------------------------------------------------------------------------


def test_two_processes_one_key_exactly_one_proceeds(spawn) -> None:
    first, second = spawn([KEY]), spawn([KEY])
    first.send("go")
    second.send("go")
    outcomes = {child: child.line() for child in (first, second)}
    winners = [child for child, text in outcomes.items() if text == "locked"]
    losers = [child for child, text in outcomes.items() if text.startswith("busy ")]
    assert len(winners) == 1 and len(losers) == 1, outcomes
    report = json.loads(outcomes[losers[0]].split(" ", 1)[1])
    # The loser may have looked in the instant between the winner's flock and its writing the PID.
    assert report["pid"] in (winners[0].pid, None)
    assert report["key"] == KEY
    winners[0].send("release")
    winners[0].expect("released")
    for child in (first, second):
        child.finish()


def test_busy_names_the_holder_by_pid_and_command_line(spawn) -> None:
    holder = holding(spawn, [KEY])
    second = spawn([KEY])
    second.send("go")
    report = second.busy()
    assert report["pid"] == holder.pid
    assert report["message"].startswith(f"busy: {KEY} is held by PID {holder.pid} ({sys.executable} -c ")
    second.finish()

    with pytest.raises(lock.Busy) as exc:  # the same seen in-process, with what the CLI shows
        lock.acquire([KEY])
    assert exc.value.pid == holder.pid
    assert exc.value.exit_code == errors.ExitCode.BUSY
    assert isinstance(exc.value, errors.VhotplugError)
    assert exc.value.hint is not None and "--wait-lock" in exc.value.hint


@pytest.mark.parametrize("timeout", [None, LIMIT], ids=["blocking", "with-timeout"])
def test_a_waiter_proceeds_once_the_holder_releases(spawn, timeout: float | None) -> None:
    holder = holding(spawn, [KEY])
    waiter = spawn([KEY], wait=True, timeout=timeout)
    waiter.send("go")
    wait_until_blocked(waiter.pid, lock.lock_path(KEY))
    holder.send("release")
    holder.expect("released")
    waiter.expect("locked")
    assert lock.holder(KEY) == waiter.pid
    waiter.send("release")
    waiter.expect("released")
    holder.finish()
    waiter.finish()


def test_a_wait_with_timeout_gives_up_and_leaves_no_lock_behind(spawn) -> None:
    holder = holding(spawn, [KEY])
    started = time.monotonic()
    with pytest.raises(lock.Busy) as exc:
        lock.acquire([KEY], wait=True, timeout=0.2)
    assert 0.2 <= time.monotonic() - started < LIMIT
    assert exc.value.pid == holder.pid
    assert exc.value.message.endswith(", still after waiting 0.2 s")
    holder.send("release")
    holder.expect("released")
    # The abandoned helper thread may grab the lock as the holder lets go; it must let go at once too.
    with lock.acquire([KEY], wait=True, timeout=LIMIT) as held:
        assert held.keys == (KEY,)
        assert lock.holder(KEY) == os.getpid()


def test_two_keys_in_opposite_order_never_deadlock(spawn) -> None:
    # Hundreds of rounds each, so the two really interleave; taken in the order given, they would soon
    # hold one key each and wait for the other until their timeout (reported as busy, failing the test).
    one = spawn(["domain-1", KEY], wait=True, timeout=LIMIT, cycles=300)
    other = spawn([KEY, "domain-1"], wait=True, timeout=LIMIT, cycles=300)
    one.send("go")
    other.send("go")
    one.expect("done")
    other.expect("done")
    one.finish()
    other.finish()


def test_a_killed_holder_frees_its_locks(spawn) -> None:
    holder = holding(spawn, [KEY, "domain-1"])
    os.kill(holder.pid, signal.SIGKILL)  # a process this test started, by its PID
    assert holder.proc.wait(LIMIT) == -signal.SIGKILL
    with lock.acquire([KEY, "domain-1"]) as held:  # no wait: it must be free now
        assert held.keys == ("domain-1", KEY)


def test_a_busy_later_key_releases_the_ones_already_taken(spawn) -> None:
    holding(spawn, ["b"])
    with pytest.raises(lock.Busy) as exc:
        lock.acquire(["b", "a"])  # "a" is taken first (sorted), then "b" is busy
    assert exc.value.key == "b"
    with lock.acquire(["a"]):  # would be busy ("held by this process") had "a" been kept
        pass


def test_busy_message_without_a_readable_holder(spawn) -> None:
    holding(spawn, [KEY])
    path = lock.lock_path(KEY)
    path.write_text("999999999\n")  # no such process: nothing to add after the PID
    with pytest.raises(lock.Busy) as exc:
        lock.acquire([KEY])
    assert exc.value.message == f"busy: {KEY} is held by PID 999999999"
    path.write_text("")  # locked but the PID not yet written
    with pytest.raises(lock.Busy) as exc:
        lock.acquire([KEY])
    assert exc.value.message == f"busy: {KEY} is held by another process"
    assert exc.value.pid is None


# --- in one process ----------------------------------------------------------------------------------


def test_the_holder_records_its_pid_and_clears_it_on_release(run_dir: Path) -> None:
    with lock.acquire([KEY]):
        assert lock.holder(KEY) == os.getpid()
        assert lock.lock_path(KEY).read_text() == f"{os.getpid()}\n"
    assert lock.holder(KEY) is None
    assert lock.lock_path(KEY).exists()  # kept on purpose: unlinking a lock file races


def test_keys_are_taken_sorted_and_once(run_dir: Path) -> None:
    held = lock.acquire(["usb-2-4", "domain-x", "usb-2-4"])
    assert held.keys == ("domain-x", "usb-2-4")
    held.release()
    held.release()  # harmless
    with lock.acquire(["domain-x", "usb-2-4"]):
        pass


def test_a_second_lock_in_the_same_process_is_busy_too(run_dir: Path) -> None:
    with lock.acquire([KEY]), pytest.raises(lock.Busy) as exc:
        lock.acquire([KEY])
    assert exc.value.message == f"busy: {KEY} is held by this process (PID {os.getpid()})"


def test_lock_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("VHOTPLUG_RUN_DIR", raising=False)
    assert lock.lock_dir() == Path("/run/vhotplug/locks")
    monkeypatch.setenv("VHOTPLUG_RUN_DIR", str(tmp_path))
    assert lock.lock_dir() == tmp_path / "locks"


@pytest.mark.parametrize(
    ("key", "name"),
    [
        ("pci-0000_06_10_1", "pci-0000_06_10_1.lock"),
        ("pci-0000:06:10.1", "pci-0000_06_10.1.lock"),
        ("domain-4dea22b3-1d52-d8f3-2516-782e98ab3fa0", "domain-4dea22b3-1d52-d8f3-2516-782e98ab3fa0.lock"),
        ("../../etc/passwd", ".._.._etc_passwd.lock"),
        ("..", "...lock"),
        ("dom ain/é", "dom_ain__.lock"),
    ],
)
def test_lock_path_stays_in_the_lock_dir(run_dir: Path, key: str, name: str) -> None:
    path = lock.lock_path(key)
    assert path == run_dir / "locks" / name
    with lock.acquire([key]):
        assert path.is_file()


def test_empty_key_is_a_programming_error(run_dir: Path) -> None:
    with pytest.raises(ValueError):
        lock.acquire([""])


def test_unusable_run_dir_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    monkeypatch.setenv("VHOTPLUG_RUN_DIR", str(not_a_dir))
    with pytest.raises(errors.VhotplugError) as exc:
        lock.acquire([KEY])
    assert f"cannot create the lock directory {not_a_dir}/locks" in exc.value.message
    assert exc.value.hint is not None and "VHOTPLUG_RUN_DIR" in exc.value.hint


def test_a_symlink_in_the_lock_dir_is_not_followed(run_dir: Path) -> None:
    victim = run_dir / "victim"
    victim.write_text("precious")
    (run_dir / "locks").mkdir()
    lock.lock_path(KEY).symlink_to(victim)
    with pytest.raises(errors.VhotplugError) as exc:
        lock.acquire([KEY])
    assert "cannot open the lock file" in exc.value.message
    assert victim.read_text() == "precious"


def test_key_helpers() -> None:
    assert lock.domain_key("4dea22b3-1d52-d8f3-2516-782e98ab3fa0") == "domain-4dea22b3-1d52-d8f3-2516-782e98ab3fa0"
    assert lock.pci_key(Bdf(0, 6, 0x10, 1)) == "pci-0000_06_10_1"
    assert lock.usb_key(UsbDevice(2, 4, 0x0781, 0x5567)) == "usb-2-4"
