"""One vhotplug process for the concurrency tests: ``attach pci`` against its own fake libvirt.

Run as ``python -m tests.unit.passthrough_worker HOSTROOT GATE [vhotplug args...]``. The fake's host detach
writes ``GATE/in-PID`` (with the time) and then waits for ``GATE/go``, so the test can hold the first
process in the middle of the operation (locks held) while it starts the second.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

from tests.unit.fakevirt import FakeConnection, FakeNodeDevice
from vhotplug.addresses import parse_bdf
from vhotplug.cli import hostdev_cmd, main
from vhotplug.ops import passthrough

GATE_WAIT = 60.0


def _main() -> int:
    hostroot, gate, args = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
    conn = FakeConnection()
    conn.add_pci(parse_bdf("00:04.0"), driver="e1000e")
    conn.add_domain()
    real_detach = FakeNodeDevice.detachFlags

    def held_detach(self: FakeNodeDevice, driver: str | None, flags: int) -> None:
        (gate / f"in-{os.getpid()}").write_text(f"{time.time()}\n")
        deadline = time.monotonic() + GATE_WAIT
        while not (gate / "go").exists():  # bounded poll on a file the test creates
            if time.monotonic() > deadline:
                raise TimeoutError("the test never opened the gate")
            time.sleep(0.01)
        real_detach(self, driver, flags)
        (gate / f"out-{os.getpid()}").write_text(f"{time.time()}\n")

    FakeNodeDevice.detachFlags = held_detach  # type: ignore[method-assign]

    @contextlib.contextmanager
    def fake_connection(uri: str | None):
        yield conn

    hostdev_cmd.connection = fake_connection  # type: ignore[assignment]
    real_facts = passthrough.facts_root_for
    passthrough.facts_root_for = lambda c, override=None: real_facts(c, hostroot)  # type: ignore[assignment]
    code = main.run(args)
    print(f"finished {time.time()}", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(_main())
