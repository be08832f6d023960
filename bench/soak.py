"""Soak: many operators at once. W worker processes x C attach/detach cycles of a NIC over D lab domains.

Each cycle is what an operator types, as two processes of its own:

    vhotplug -c URI -o json attach nic DOM --id sWwCc --mac MAC --wait-lock --timeout 60
    vhotplug -c URI -o json detach DOM sWwCc --wait-lock --timeout 60

Worker ``w`` works on domain ``w % D``; every third cycle it takes the next domain (another worker's) instead,
so more processes queue on one domain's lock. While the workers run, this coordinator reads every domain's live XML
every few seconds (duplicates, devices that vanished while attached, devices still there after their detach
said they were gone); afterwards it checks the live XML and the guest's own view of every domain.

Counted as:

- *failed*: an operation whose exit code is not 0 (grouped by kind and exit code, first error line shown);
- *wrong*: exit 0 but the JSON names another alias or MAC than asked, an attach without the guest's name and
  driver (not verified), a detach of another alias or not checked in the guest, or a detach that said "gone"
  while a later live XML still had the device;
- *lost*: attached but the detach failed or never ran, a device that vanished from the live XML while it was
  attached, a ``ua-s*`` alias still in a live XML or a soak MAC still in a guest at the end, or a device the
  domain had before the run missing after it;
- *duplicated*: an alias or MAC twice in one live XML (any sample), or a MAC twice in the guest at the end.

Run with ``make soak`` (4 domains, 8 workers, 25 cycles); exits 1 if anything failed, was lost, duplicated or
wrong. ``run()`` is what ``tests/lab/test_soak.py`` calls with smaller numbers. Lab domains are named
``vhl-soak-N-PID``; ones whose PID is gone (a killed run) are removed first.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import queue
import re
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
#: Lab domains of this benchmark (group 1: the PID of the run that booted them).
SOAK_LAB = re.compile(r"^vhl-soak-\d+-(\d+)$")
#: Every third cycle a worker takes the next domain, another worker's.
CONTEND_EVERY = 3
KINDS = ("attach", "detach")


def lab_name(index: int, pid: int | None = None) -> str:
    return f"vhl-soak-{index}-{pid or os.getpid()}"


def device_id(worker: int, cycle: int) -> str:
    return f"s{worker}w{cycle}c"


def mac_for(worker: int, cycle: int) -> str:
    """Unique per worker and cycle (both below 256); 52:54:00:5a:WW:CC."""
    return f"52:54:00:5a:{worker:02x}:{cycle:02x}"


def domain_of(worker: int, cycle: int, domains: int) -> int:
    return (worker + (1 if cycle % CONTEND_EVERY == CONTEND_EVERY - 1 else 0)) % domains


# -- workers (spawned processes: they import only this module's top, not libvirt or vhotplug) -----------------


def _terminated(_sig: int, _frame: object) -> None:
    raise SystemExit(143)


def _run_op(argv: list[str], kill_after: float) -> tuple[int | None, str, str, float, float]:
    """One vhotplug process: (exit code or None if it had to be killed, stdout, stderr, start, end)."""
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        out, err = proc.communicate(timeout=kill_after)
        code: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        code = None
        err += f"\nsoak: killed after {kill_after:g} s"
    except BaseException:
        proc.kill()  # never leave a vhotplug behind (SIGTERM from the coordinator, Ctrl-C)
        proc.wait()
        raise
    return code, out, err, start, time.monotonic()


def _worker(worker: int, plan: list[tuple[int, str]], uri: str, op_timeout: float, kill_after: float,
            go: Any, results: Any) -> None:
    signal.signal(signal.SIGTERM, _terminated)
    try:
        _cycles(worker, plan, uri, op_timeout, kill_after, go, results)
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group; the coordinator reports it
        sys.exit(130)


def _cycles(worker: int, plan: list[tuple[int, str]], uri: str, op_timeout: float, kill_after: float,
            go: Any, results: Any) -> None:
    coordinator = os.getppid()
    go.wait(300)
    base = [sys.executable, "-m", "vhotplug", "-c", uri, "-o", "json"]
    wait = ["--wait-lock", "--timeout", f"{op_timeout:g}"]
    for cycle, dom in plan:
        if os.getppid() != coordinator:
            return  # the coordinator was killed: stop instead of working on for nobody
        ident, mac = device_id(worker, cycle), mac_for(worker, cycle)
        for kind, argv in (("attach", [*base, "attach", "nic", dom, "--id", ident, "--mac", mac, *wait]),
                           ("detach", [*base, "detach", dom, ident, *wait])):
            code, out, err, start, end = _run_op(argv, kill_after)
            doc = None
            with contextlib.suppress(ValueError):
                doc = json.loads(out) if out.strip() else None
            results.put({"worker": worker, "cycle": cycle, "kind": kind, "domain": dom, "alias": f"ua-{ident}",
                         "mac": mac, "code": code, "start": start, "end": end, "doc": doc,
                         "stdout": "" if doc is not None else out[-2000:], "stderr": err[-4000:]})
            if code != 0:
                break  # an attach that failed: nothing to detach (the end check finds it if it stayed)
    results.put({"worker": worker, "done": True})


# -- the coordinator ----------------------------------------------------------------------------------------


@dataclass
class Report:
    domains: int
    workers: int
    cycles: int
    uri: str
    names: list[str] = field(default_factory=list)
    boot_seconds: dict[str, float] = field(default_factory=dict)
    stale_removed: list[str] = field(default_factory=list)
    wall_seconds: float = 0.0
    ops: list[dict[str, Any]] = field(default_factory=list)
    samples: int = 0
    sample_max_gap: float = 0.0
    max_soak_devices: dict[str, int] = field(default_factory=dict)
    lost: dict[str, list[str]] = field(default_factory=dict)  # "DOMAIN ALIAS-or-MAC" -> why
    duplicated: dict[str, list[str]] = field(default_factory=dict)
    wrong: list[str] = field(default_factory=list)
    worker_errors: list[str] = field(default_factory=list)
    leftover_processes: list[str] = field(default_factory=list)

    # -- derived figures --

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [op for op in self.ops if op["kind"] == kind]

    @property
    def failures(self) -> list[dict[str, Any]]:
        return [op for op in self.ops if op["code"] != 0]

    def failure_kinds(self) -> list[dict[str, Any]]:
        groups: dict[tuple[str, str], dict[str, Any]] = {}
        for op in self.failures:
            code = "killed" if op["code"] is None else str(op["code"])
            group = groups.setdefault((op["kind"], code), {"kind": op["kind"], "exit_code": code, "count": 0,
                                                           "first_error": _first_error(op["stderr"]),
                                                           "first": f"{op['domain']} {op['alias']}"})
            group["count"] += 1
        return list(groups.values())

    def latency(self, kind: str) -> dict[str, float] | None:
        times = sorted(op["end"] - op["start"] for op in self.of_kind(kind))
        if not times:
            return None
        p95 = statistics.quantiles(times, n=20, method="inclusive")[18] if len(times) > 1 else times[0]
        return {"n": len(times), "p50": statistics.median(times), "p95": p95, "max": times[-1]}

    def overlaps(self) -> tuple[int, dict[str, int]]:
        """Pairs of operations of different workers on the same domain that ran at the same time, and the
        most operations running at once on each domain."""
        pairs = 0
        most: dict[str, int] = {}
        for name in self.names:
            ops = sorted((op for op in self.ops if op["domain"] == name), key=lambda op: op["start"])
            for i, a in enumerate(ops):
                for b in ops[i + 1:]:
                    if b["start"] >= a["end"]:
                        break
                    if b["worker"] != a["worker"]:
                        pairs += 1
            edges = sorted([(op["start"], 1) for op in ops] + [(op["end"], -1) for op in ops])
            running = peak = 0
            for _, step in edges:
                running += step
                peak = max(peak, running)
            most[name] = peak
        return pairs, most

    @property
    def ok(self) -> bool:
        return not (self.failures or self.lost or self.duplicated or self.wrong or self.worker_errors
                    or len(self.ops) != self.expected_ops)

    @property
    def expected_ops(self) -> int:
        return 2 * self.workers * self.cycles

    def to_dict(self) -> dict[str, Any]:
        pairs, most = self.overlaps()
        return {
            "domains": self.names, "workers": self.workers, "cycles": self.cycles, "uri": self.uri,
            "boot_seconds": {k: round(v, 2) for k, v in self.boot_seconds.items()},
            "stale_labs_removed": self.stale_removed,
            "wall_seconds": round(self.wall_seconds, 2),
            "operations": {k: len(self.of_kind(k)) for k in KINDS},
            "operations_expected": self.expected_ops,
            "failed": len(self.failures), "failures": self.failure_kinds(),
            "latency_seconds": {k: ({m: (round(v, 4) if m != "n" else v) for m, v in lat.items()}
                                    if (lat := self.latency(k)) else None) for k in KINDS},
            "overlapping_pairs_same_domain": pairs, "most_at_once_per_domain": most,
            "live_xml_samples": self.samples, "live_xml_max_gap_seconds": round(self.sample_max_gap, 2),
            "most_soak_devices_per_domain": self.max_soak_devices,
            "lost": len(self.lost), "duplicated": len(self.duplicated), "wrong": len(self.wrong),
            "lost_detail": self.lost, "duplicated_detail": self.duplicated, "wrong_detail": self.wrong,
            "worker_errors": self.worker_errors, "leftover_processes": self.leftover_processes,
            "ok": self.ok,
        }

    def lines(self) -> list[str]:
        pairs, most = self.overlaps()
        out = [f"soak: {self.domains} domains x {self.workers} workers x {self.cycles} cycles on {self.uri} "
               f"(nic attach + detach per cycle, --wait-lock, each a vhotplug process)"]
        n_ops = len(self.ops)
        rate = n_ops / self.wall_seconds if self.wall_seconds else 0.0
        out.append(f"operations: {n_ops} of {self.expected_ops} "
                   f"({', '.join(f'{k} {len(self.of_kind(k))}' for k in KINDS)}) in {self.wall_seconds:.1f} s wall "
                   f"({rate:.2f} ops/s)")
        for kind in KINDS:
            lat = self.latency(kind)
            if lat:
                out.append(f"latency {kind:<6}  p50 {lat['p50'] * 1000:7.0f} ms  p95 {lat['p95'] * 1000:7.0f} ms  "
                           f"max {lat['max'] * 1000:7.0f} ms  (n={lat['n']}, lock wait included)")
        out.append(f"failed operations: {len(self.failures)}")
        for g in self.failure_kinds():
            out.append(f"  {g['kind']} exit {g['exit_code']}: {g['count']}x, first ({g['first']}): {g['first_error']}")
        out.append(f"contention: {pairs} overlapping pairs of operations on one domain; most at once: "
                   + ", ".join(f"{k} {v}" for k, v in most.items()))
        out.append(f"live XML sampled {self.samples}x (largest gap {self.sample_max_gap:.1f} s); most soak NICs at "
                   "once: " + ", ".join(f"{k} {v}" for k, v in self.max_soak_devices.items()))
        out.append(f"devices lost: {len(self.lost)}, duplicated: {len(self.duplicated)}, "
                   f"wrong results: {len(self.wrong)}")
        for what, detail in (("lost", self.lost), ("duplicated", self.duplicated)):
            for key, why in list(detail.items())[:20]:
                why = list(dict.fromkeys(why))
                more = f" (+{len(why) - 3} more)" if len(why) > 3 else ""
                out.append(f"  {what} {key}: {'; '.join(why[:3])}{more}")
        out.extend(f"  wrong: {w}" for w in self.wrong[:20])
        out.extend(f"  worker: {e}" for e in self.worker_errors)
        out.extend(f"  left behind: {p}" for p in self.leftover_processes)
        out.append("OK" if self.ok else "NOT OK")
        return out


def _first_error(stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in lines:
        if line.startswith("vhotplug: error:"):
            return line
    if any(line.startswith("Traceback") for line in lines):
        return "traceback: " + lines[-1]
    return lines[0] if lines else "(no stderr)"


def _devices(xml: str) -> tuple[list[str], list[str]]:
    from lxml import etree

    root = etree.fromstring(xml.encode())
    # A <console> repeats its <serial>'s alias (serial0): libvirt's own pairing, one device.
    return ([str(a) for a in root.xpath("devices/*[not(self::console)]/alias/@name")],
            [str(m).lower() for m in root.xpath("devices/interface/mac/@address")])


def _is_soak(alias: str) -> bool:
    return alias.startswith("ua-s")


def remove_stale_soak_labs(conn: Any) -> list[str]:
    """vhl-soak-N-PID domains whose run is gone (tests/support.py's rule, with this benchmark's names)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from tests.support import remove_stale_labs

    return remove_stale_labs(conn, SOAK_LAB)


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run(domains: int = 4, workers: int = 8, cycles: int = 25, *, uri: str = "qemu:///system",
        op_timeout: float = 60.0, kill_after: float = 600.0, sample_every: float = 1.0, boot_timeout: float = 300.0,
        log: Callable[[str], None] = _log) -> Report:
    """Boot ``domains`` lab domains, run the workers, check, remove the domains; the figures and findings."""
    from vhotplug.lab import manager
    from vhotplug.virt.connection import connection

    if not (domains >= 1 and 1 <= workers <= 256 and 1 <= cycles <= 256):
        raise ValueError("need at least 1 domain, and 1..256 workers and cycles")
    report = Report(domains, workers, cycles, uri)
    with connection(uri) as conn:
        report.stale_removed = remove_stale_soak_labs(conn)
    if report.stale_removed:
        log(f"removed soak domains left by killed runs: {', '.join(report.stale_removed)}")
    names = [lab_name(i) for i in range(domains)]
    report.names = names
    targets = {}
    try:
        for name in names:  # one after another: 2 cores, TCG guests
            with connection(uri) as conn:
                up = manager.up(conn, name, timeout=boot_timeout)
            report.boot_seconds[name] = up.boot_seconds
            targets[name] = up.domain.target
            log(f"lab {name}: booted to SSH in {up.boot_seconds:.1f} s")
        _soak(report, targets, op_timeout=op_timeout, kill_after=kill_after, sample_every=sample_every, log=log)
    finally:
        with connection(uri) as conn:
            for name in names:
                try:
                    manager.down(conn, name)
                except Exception as exc:  # keep removing the others
                    log(f"could not remove {name}: {exc}")
        report.leftover_processes = _end_mux_masters(targets)
    return report


def _soak(report: Report, targets: dict[str, Any], *, op_timeout: float, kill_after: float, sample_every: float,
          log: Callable[[str], None]) -> None:
    from vhotplug.virt.connection import open_connection

    names = report.names
    conn = open_connection(report.uri)
    try:
        doms = {name: conn.lookupByName(name) for name in names}
        before = {name: _devices(dom.XMLDesc(0)) for name, dom in doms.items()}
        for name, (_, macs) in before.items():
            clash = {mac_for(w, c) for w in range(report.workers) for c in range(report.cycles)} & set(macs)
            if clash:
                raise RuntimeError(f"{name} already has a soak MAC: {clash}")
        samples: list[tuple[float, float, str, list[str], list[str]]] = []

        def sample() -> None:
            for name, dom in doms.items():
                t0 = time.monotonic()
                aliases, macs = _devices(dom.XMLDesc(0))
                samples.append((t0, time.monotonic(), name, aliases, macs))

        ctx = multiprocessing.get_context("spawn")  # not fork: see vhotplug/host/lock.py
        results = ctx.Queue()
        go = ctx.Event()
        procs = []
        finished = False
        try:
            for w in range(report.workers):
                plan = [(c, names[domain_of(w, c, len(names))]) for c in range(report.cycles)]
                p = ctx.Process(target=_worker, name=f"soak-worker-{w}",
                                args=(w, plan, report.uri, op_timeout, kill_after, go, results))
                p.start()
                procs.append(p)
            started = time.monotonic()
            go.set()
            done: set[int] = set()
            next_sample, next_progress = started, started + 30
            last_sample = None
            while len(done) < len(procs):
                now = time.monotonic()
                if now >= next_sample:
                    sample()
                    if last_sample is not None:
                        report.sample_max_gap = max(report.sample_max_gap, now - last_sample)
                    last_sample = now
                    next_sample = now + sample_every
                if now >= next_progress:
                    log(f"  {now - started:5.0f} s: {len(report.ops)}/{report.expected_ops} operations, "
                        f"{len(report.failures)} failed")
                    next_progress = now + 30
                with contextlib.suppress(queue.Empty):
                    item = results.get(timeout=min(0.5, max(0.01, next_sample - time.monotonic())))
                    if item.get("done"):
                        done.add(item["worker"])
                    else:
                        report.ops.append(item)
                for i, p in enumerate(procs):
                    if i not in done and not p.is_alive() and p.exitcode != 0:
                        # Drain what it sent before it died, then give up on it.
                        with contextlib.suppress(queue.Empty):
                            while True:
                                item = results.get(timeout=0.5)
                                if item.get("done"):
                                    done.add(item["worker"])
                                else:
                                    report.ops.append(item)
                        if i not in done:
                            report.worker_errors.append(f"worker {i} died with exit code {p.exitcode}")
                            done.add(i)
            report.wall_seconds = time.monotonic() - started
            sample()
            report.samples = len(samples) // len(names)
            finished = True
        finally:
            # Finished: they have said "done" and exit. Interrupted or failed: SIGTERM at once (a worker kills
            # its running vhotplug then), SIGKILL if one does not go.
            deadline = time.monotonic() + (10 if finished else 0)
            for p in procs:
                p.join(timeout=max(0.0, deadline - time.monotonic()))
            for p in procs:
                if p.is_alive():
                    p.terminate()
            for p in procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
                    p.join()
            results.close()
            results.join_thread()
        _check(report, doms, before, samples, targets)
    finally:
        with contextlib.suppress(Exception):
            conn.close()


def _check(report: Report, doms: dict[str, Any], before: dict[str, tuple[list[str], list[str]]],
           samples: list[tuple[float, float, str, list[str], list[str]]], targets: dict[str, Any]) -> None:
    from vhotplug.guest.probe import guest_view
    from vhotplug.guest.ssh import GuestSession

    def lost(domain: str, key: str, why: str) -> None:
        report.lost.setdefault(f"{domain} {key}", []).append(why)

    def dup(domain: str, key: str, why: str) -> None:
        report.duplicated.setdefault(f"{domain} {key}", []).append(why)

    by_alias: dict[str, dict[str, dict[str, Any]]] = {}
    for op in report.ops:
        by_alias.setdefault(op["alias"], {})[op["kind"]] = op
    mac_alias = {op["mac"]: op["alias"] for op in report.ops}

    # Each operation on its own.
    for alias, ops in sorted(by_alias.items()):
        att, det = ops.get("attach"), ops.get("detach")
        where = f"{att['domain']} {alias}" if att else alias
        for op in ops.values():
            if op["code"] == 0 and op["doc"] is None:
                report.wrong.append(f"{op['kind']} {where}: exit 0 without JSON: {op['stdout'][:200]!r}")
        if att and att["code"] == 0 and att["doc"] is not None:
            doc = att["doc"].get("attached", {})
            guest = doc.get("guest") or {}
            if doc.get("alias") != alias or str(doc.get("identity", "")).lower() != att["mac"]:
                report.wrong.append(f"attach {where} ({att['mac']}): answered alias {doc.get('alias')!r}, "
                                    f"identity {doc.get('identity')!r}")
            if not guest.get("name") or not guest.get("driver"):
                report.wrong.append(f"attach {where}: not verified in the guest (guest {guest or None})")
            if att["doc"].get("domain") != att["domain"]:
                report.wrong.append(f"attach {where}: answered for domain {att['doc'].get('domain')!r}")
        if det and det["code"] == 0 and det["doc"] is not None:
            doc = det["doc"].get("detached", {})
            if doc.get("alias") != alias or str(doc.get("identity", "")).lower() != det["mac"]:
                report.wrong.append(f"detach {where}: answered alias {doc.get('alias')!r}, "
                                    f"identity {doc.get('identity')!r}")
            if "guest_gone_seconds" not in doc:
                report.wrong.append(f"detach {where}: not checked in the guest ({doc})")
        if att and att["code"] == 0 and (det is None or det["code"] != 0):
            why = "never detached" if det is None else \
                f"detach exit {det['code']}: {_first_error(det['stderr'])}"
            lost(att["domain"], alias, f"attached, {why}")

    # The live XML samples, against what the operations said.
    report.max_soak_devices = dict.fromkeys(report.names, 0)
    for t0, t1, name, aliases, macs in samples:
        soak = [a for a in aliases if _is_soak(a)]
        report.max_soak_devices[name] = max(report.max_soak_devices[name], len(soak))
        for value, count in (Counter(aliases) + Counter(macs)).items():
            if count > 1:
                dup(name, value, f"{count}x in the live XML at +{t0 - samples[0][0]:.1f} s")
        present = set(aliases)
        for alias, ops in by_alias.items():
            att, det = ops.get("attach"), ops.get("detach")
            if not att or att["domain"] != name:
                continue
            if det and det["code"] == 0 and det["end"] < t0 and alias in present:
                report.wrong.append(f"detach {name} {alias}: said gone, still in the live XML read "
                                    f"{t0 - det['end']:.1f} s later")
            if (att["code"] == 0 and att["end"] < t0 and (det is None or t1 < det["start"])
                    and alias not in present):
                lost(name, alias, f"missing from the live XML at +{t0 - samples[0][0]:.1f} s while attached")
            if alias in present and t1 < att["start"]:
                report.wrong.append(f"{name} {alias} in the live XML before its attach began")

    # The end: live XML (the last sample) and the guest's own view.
    for name, dom in doms.items():
        aliases, macs = _devices(dom.XMLDesc(0))
        for alias in aliases:
            if _is_soak(alias):
                lost(name, alias, "still in the live XML at the end")
        for alias in set(before[name][0]) - set(aliases):
            lost(name, alias, "a device the domain had before the run is gone")
        with GuestSession(targets[name], connect_timeout=30) as session:
            view = guest_view(session)
        guest_macs = Counter(n.mac.lower() for n in view.net)
        for mac, count in guest_macs.items():
            if count > 1:
                dup(name, mac, f"{count}x in the guest at the end")
            if mac in mac_alias:
                lost(name, mac_alias[mac], f"its MAC {mac} still in the guest at the end")
        mgmt = [mac for mac in before[name][1] if mac not in guest_macs]
        if mgmt:
            lost(name, ",".join(mgmt), "a NIC the domain had before the run is not in the guest at the end")


def _end_mux_masters(targets: dict[str, Any]) -> list[str]:
    """The SSH-sharing masters our vhotplug processes started for these guests end when a guest goes away;
    any still running after a few seconds is ended here (by PID) and named."""
    from vhotplug.guest import mux

    paths = {str(p) for t in targets.values() if t is not None and (p := mux.socket_path(t)) is not None}
    if not paths:
        return []
    left: list[str] = []
    deadline = time.monotonic() + 10
    while True:
        mine = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            words = [a.decode(errors="replace") for a in argv]
            if "vhotplug.guest.mux" in words and paths & set(words):
                mine.append((int(proc.name), " ".join(words)))
        if not mine or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    for pid, cmd in mine:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
            left.append(f"SSH master PID {pid} still running 10 s after its guest was removed, ended: {cmd[:160]}")
    return left


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--domains", type=int, default=4)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--cycles", type=int, default=25)
    parser.add_argument("--timeout", type=float, default=60.0, help="each vhotplug's --timeout (default 60)")
    parser.add_argument("--uri", default=os.environ.get("VHOTPLUG_TEST_URI", "qemu:///system"))
    parser.add_argument("--json", action="store_true", help="the report as JSON on stdout (progress on stderr)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _terminated)  # `kill PID`: the domains and workers are still removed
    try:
        report = run(args.domains, args.workers, args.cycles, uri=args.uri, op_timeout=args.timeout)
    except KeyboardInterrupt:
        print("soak: interrupted; workers ended, lab domains removed", file=sys.stderr)
        return 130
    if args.json:
        json.dump(report.to_dict(), sys.stdout, indent=2)
        print()
    else:
        print("\n".join(report.lines()))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
