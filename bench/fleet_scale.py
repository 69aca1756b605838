"""Benchmark: the rollout engine alone at fleet scale, against an in-process simulated transport.

    python bench/fleet_scale.py                     # 1,000 and 10,000 hosts
    python bench/fleet_scale.py --full              # and 50,000
    python bench/fleet_scale.py --sizes 2000,20000 --batch 10% --json
    python bench/fleet_scale.py --mode window --install-seconds 0.5 --install-jitter 0.5

No sshd, no HAProxy: ``liftoff.remote.Remote`` runs as it is (connection cache, concurrency
limits, audit rows written in batches) over a fake SSH connection answering like the lab's
hosts, and ``liftoff.haproxy.HAProxy`` parses real ``show stat`` / ``show servers state``
text answered in-process by ``tests/unit/fleet_fakes.FakeLB`` (two LBs). One role (``web``,
every host behind both LBs), batches of ``--batch`` (10% like bench/fleet_rollout.py), no
install delay (``--install-seconds``, each host's spread by ``--install-jitter``: +-that share,
the same per host from run to run). ``--mode``: ``lockstep`` (the default) or ``window``
(``RolloutOptions.rollout_mode``; a window's groups count as its batches below). The state
store is SQLite in a temp dir. Each size runs in its own process.

Per size it prints: wall; orchestrator CPU per host (process CPU time, every thread, minus
the CPU the simulated hosts and LBs spent answering, measured around each answer); peak
memory per host (``ru_maxrss`` of the size's process at the end minus ``ru_maxrss`` just
before the rollout started, i.e. after imports and the simulated fleet were built); state-DB
rows per host (rows of each table after the run); state-store transactions (every
``Store._tx``, wrapped here, classified by the public Store method that opened it and by what
it ran: a write transaction ran an INSERT, UPDATE or DELETE).

Checks (PASS/FAIL lines, exit 1 on a FAIL): CPU per host and memory per host of the largest
size at most 1.5x those of the smallest; each batch write is one transaction per batch:
``record_drained_many`` (write-ahead drain records) = 1 x batches, ``clear_drained_many``
(drain clears) = 1 x batches, ``set_host_statuses`` = 3 x batches (draining, installing,
final: one per phase, whatever the batch size); audit rows (``audit_begin_many`` written
ahead, one transaction per fan-out of a batch; ``audit_finish_many`` results, flushed on a
timer) are reported apart; no INFO log line names more than one host.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "include")]

from sqlalchemy import event, func, select  # noqa: E402

from liftoff import store as store_mod  # noqa: E402
from liftoff.fleet import RolloutOptions, rollout  # noqa: E402
from liftoff.haproxy import HAProxy  # noqa: E402
from liftoff.remote import Remote  # noqa: E402
from liftoff.store import Store  # noqa: E402
from tests.unit.fleet_fakes import FakeLB, make_env  # noqa: E402

ENV, ROLE, LBS = "gprd", "web", ("fe-01-lb-gprd", "fe-02-lb-gprd")
OLD, NEW = "17.5.0-ee.0", "17.6.0-ee.0"
DEFAULT_SIZES, FULL_SIZE = (1000, 10000), 50000
RATIO_LIMIT = 1.5
PER_BATCH = {"record_drained_many": 1, "clear_drained_many": 1, "set_host_statuses": 3}
# Audit writes, reported apart: write-ahead rows (one transaction per fan-out of a batch, before
# its commands run) and their results (flushed on a timer).
AUDIT_WRITES = ("audit_begin_many", "audit_finish_many")
SERVICES = ("puma", "workhorse", "nginx")
STORE_FILE = store_mod.__file__
HOST_NAME = re.compile(r"\b[a-z]+-\d+-sv-[a-z]+\b")


# -- the simulated transport ---------------------------------------------------------------------------

class SimClock:
    """CPU seconds (of the event loop's thread) the simulated hosts and LBs spent answering."""

    def __init__(self) -> None:
        self.cpu = 0.0

    @contextlib.contextmanager
    def charge(self):
        t = time.thread_time()
        try:
            yield
        finally:
            self.cpu += time.thread_time() - t


@dataclass
class SimHost:
    installed: str
    pids: dict[str, int]
    chef: bool = True


@dataclass
class SimFleet:
    """Omnibus hosts, answering the commands liftoff sends (``A && echo MARK && B ...``)."""

    clock: SimClock
    hosts: dict[str, SimHost] = field(default_factory=dict)
    chef_role: str = NEW
    install_s: float = 0.0
    install_jitter: float = 0.0  # each host's install takes install_s x (1 +- this), fixed per host
    next_pid: int = 1000

    def install_time(self, name: str) -> float:
        if not self.install_jitter:
            return self.install_s
        return self.install_s * (1 + self.install_jitter * random.Random(name).uniform(-1, 1))

    def pid(self) -> int:
        self.next_pid += 1
        return self.next_pid

    def add(self, name: str, version: str) -> None:
        self.hosts[name] = SimHost(version, {s: self.pid() for s in SERVICES})

    def execute(self, name: str, line: str) -> tuple[int, str]:
        out: list[str] = []
        for part in line.split(" && "):
            code, text = self.one(self.hosts[name], part.split())
            out.append(text)
            if code:
                return code, "".join(out)
        return 0, "".join(out)

    def one(self, h: SimHost, argv: list[str]) -> tuple[int, str]:
        cmd = argv[0]
        if cmd == "echo":
            return 0, " ".join(argv[1:]) + "\n"
        if cmd == "dpkg-query":
            return 0, h.installed + "\n"
        if cmd in ("chef-client-disable", "chef-client-enable"):
            h.chef = cmd == "chef-client-enable"
            return 0, ""
        if cmd == "apt-get":
            h.installed = argv[3].split("=", 1)[1]
            return 0, f"Setting up gitlab-ee ({h.installed}) ...\n"
        if cmd == "gitlab-chef-role":
            return 0, json.dumps({"version": self.chef_role, "package_enabled": True}) + "\n"
        return self.ctl(h, argv)

    def ctl(self, h: SimHost, argv: list[str]) -> tuple[int, str]:
        action = argv[1] if len(argv) > 1 else ""
        if action == "reconfigure":
            return 0, "gitlab Reconfigured!\n"
        if action == "status":
            return 0, "".join(f"run: {s}: (pid {p}) 5s; run: log: (pid 99) 5s\n" for s, p in h.pids.items())
        if action in ("hup", "restart") and argv[2] in h.pids:
            h.pids[argv[2]] = self.pid()
            return 0, f"ok: run: {argv[2]}: (pid {h.pids[argv[2]]}) 0s\n"
        return 127, f"sim: unknown command: {' '.join(argv)}\n"


class _Done:
    def __init__(self, code: int, stdout: str):
        self.exit_status, self.stdout, self.stderr, self.exit_signal = code, stdout, "", None


class _Process:
    def __init__(self, fleet: SimFleet, name: str, command: str):
        self.fleet, self.name, self.command = fleet, name, command

    async def wait(self, check: bool = False, timeout: float | None = None) -> _Done:
        if self.fleet.install_s and "apt-get install" in self.command:
            await asyncio.sleep(self.fleet.install_time(self.name))
        with self.fleet.clock.charge():
            code, out = self.fleet.execute(self.name, self.command)
        return _Done(code, out)


class SimConnection:
    """What ``Remote`` uses of an asyncssh connection."""

    def __init__(self, fleet: SimFleet, name: str):
        self.fleet, self.name, self.closed = fleet, name, False

    async def create_process(self, command: str) -> _Process:
        return _Process(self.fleet, self.name, command)

    def is_closed(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    async def wait_closed(self) -> None:
        pass


class SimRemote(Remote):
    """The real Remote; only opening a connection is simulated."""

    def __init__(self, fleet: SimFleet, **kwargs):
        super().__init__("liftoff_ssh", **kwargs)
        self.fleet = fleet

    async def _connect(self, host):
        self.connections_opened += 1
        return SimConnection(self.fleet, host.name)


class SimHAProxy(HAProxy):
    """The real HAProxy client; each ``;``-joined line is answered in-process by a FakeLB."""

    def __init__(self, lbs, fakes: dict[str, FakeLB], clock: SimClock, **kwargs):
        super().__init__(lbs, **kwargs)
        self.fakes, self.clock = fakes, clock

    async def _send_line(self, lb, chunk: list[str]) -> list[str]:
        with self.clock.charge():
            fake = self.fakes[lb.name]
            fake.lines.append(";".join(chunk))
            return [fake.execute(c) for c in chunk]


# -- counting ------------------------------------------------------------------------------------------

class TxCounter:
    """Wraps ``Store._tx``: every transaction, by the Store method that opened it, read or write."""

    def __init__(self) -> None:
        self.tx: Counter[tuple[str, str]] = Counter()
        self.local = threading.local()
        self.lock = threading.Lock()

    def install(self, store: Store) -> None:
        original = store._tx
        counter = self

        @contextlib.contextmanager
        def counted():
            method = counter.caller()
            counter.local.verbs = verbs = set()
            try:
                with original() as conn:
                    yield conn
            finally:
                counter.local.verbs = None
                kind = "write" if verbs & {"INSERT", "UPDATE", "DELETE"} else "read"
                with counter.lock:
                    counter.tx[(method, kind)] += 1

        store._tx = counted
        event.listen(store.engine, "before_cursor_execute", self.on_statement)

    def on_statement(self, conn, cursor, statement, *args) -> None:
        verbs = getattr(self.local, "verbs", None)
        if verbs is not None:
            verbs.add(statement.lstrip().split(None, 1)[0].upper())

    @staticmethod
    def caller() -> str:
        """The outermost Store method on the stack (``record_drained_many``, not ``_upsert_many``)."""
        frame, name = sys._getframe(1), "?"
        while frame is not None and frame.f_code.co_filename != STORE_FILE:  # contextlib's frames
            frame = frame.f_back
        while frame is not None and frame.f_code.co_filename == STORE_FILE:
            name, frame = frame.f_code.co_name, frame.f_back
        return name

    def writes(self) -> dict[str, int]:
        return {m: n for (m, k), n in sorted(self.tx.items()) if k == "write"}

    def reads(self) -> dict[str, int]:
        return {m: n for (m, k), n in sorted(self.tx.items()) if k == "read"}


class LogCounter(logging.Handler):
    """Counts liftoff's log lines and the most host names any one INFO line names."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: Counter[str] = Counter()
        self.most_names = 0
        self.widest = ""

    def emit(self, record: logging.LogRecord) -> None:
        self.lines[f"{record.name} {record.levelname}"] += 1
        msg = record.getMessage()
        names = len(set(HOST_NAME.findall(msg)))
        if names > self.most_names:
            self.most_names, self.widest = names, msg[:160]


def table_rows(store: Store) -> dict[str, int]:
    with store.engine.connect() as conn:
        return {t.name: conn.execute(select(func.count()).select_from(t)).scalar_one()
                for t in store_mod.metadata.sorted_tables}


# -- one size ------------------------------------------------------------------------------------------

def build(hosts: int, batch: str, clock: SimClock, install_s: float = 0.0, install_jitter: float = 0.0):
    """The environment, its simulated hosts and its two LBs (every host at OLD, in both LBs)."""
    fakes = {}
    for name in LBS:
        fakes[name] = FakeLB(name)
        fakes[name].port = 1  # never connected to: SimHAProxy answers in-process
    env = make_env(list(fakes.values()), {ROLE: {"hosts": hosts, "batch": batch, "floor": "50%"}}, name=ENV)
    fleet = SimFleet(clock, install_s=install_s, install_jitter=install_jitter)
    for h in env.role(ROLE).hosts:
        fleet.add(h.name, OLD)
        for fake in fakes.values():
            fake.add(ROLE, h.name, f"{h.address}:8080")
    fleet.add(env.deploy_node.name, OLD)
    return env, fleet, fakes


async def _roll(env, fleet, fakes, store, clock, mode: str | None = None):
    remote = SimRemote(fleet, store=store, run_id="scale-1", env=ENV, timeout=600)
    haproxy = SimHAProxy(env.load_balancers, fakes, clock, poll=0.01)
    options = RolloutOptions(drain_timeout=5, up_timeout=5, health_timeout=5, rollout_mode=mode)
    try:
        return await rollout(env, NEW, run_id="scale-1", store=store, remote=remote, haproxy=haproxy,
                             options=options)
    finally:
        await remote.close()


def simulate(hosts: int, batch: str = "10%", db_dir: str | None = None, install_s: float = 0.0,
             mode: str | None = None, install_jitter: float = 0.0) -> dict:
    """Roll ``hosts`` hosts through the simulated transport; the figures of :func:`measure`."""
    with tempfile.TemporaryDirectory(dir=db_dir) as tmp:
        store = Store(f"sqlite:///{tmp}/state.db")
        try:
            return measure(hosts, batch, store, install_s, mode, install_jitter)
        finally:
            store.close()


def measure(hosts: int, batch: str, store: Store, install_s: float, mode: str | None = None,
            install_jitter: float = 0.0) -> dict:
    clock = SimClock()
    env, fleet, fakes = build(hosts, batch, clock, install_s, install_jitter)
    counter, logs = TxCounter(), LogCounter()
    counter.install(store)
    lg = logging.getLogger("liftoff")
    old_level = lg.level
    lg.setLevel(logging.INFO)
    lg.addHandler(logs)
    rss0, cpu0, wall0 = _maxrss(), time.process_time(), time.monotonic()
    try:
        report = asyncio.run(_roll(env, fleet, fakes, store, clock, mode))
    finally:
        lg.removeHandler(logs)
        lg.setLevel(old_level)
    wall, cpu, rss = time.monotonic() - wall0, time.process_time() - cpu0, _maxrss() - rss0
    batches = sum(len(r.batches) for r in report.roles.values())
    rows = table_rows(store)
    return {
        "hosts": hosts, "batch": batch, "mode": mode or "lockstep", "status": report.status,
        "counts": report.counts(), "batch_size": env.role(ROLE).batch_size(),
        "batches": batches, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
        "sim_cpu_s": round(clock.cpu, 2), "orch_cpu_ms_per_host": round(1000 * (cpu - clock.cpu) / hosts, 3),
        "peak_rss_delta_mb": round(rss / 1024, 1), "peak_rss_kb_per_host": round(rss / hosts, 3),
        "rows": rows, "rows_per_host": {t: round(n / hosts, 3) for t, n in rows.items() if n},
        "write_tx": counter.writes(), "read_tx": counter.reads(),
        "write_tx_per_batch": {m: round(n / batches, 3) for m, n in counter.writes().items()},
        "log_lines": dict(logs.lines), "most_host_names_in_a_line": logs.most_names,
        "widest_line": logs.widest,
    }


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


# -- checks and output ---------------------------------------------------------------------------------

def checks(results: list[dict]) -> list[tuple[bool, str]]:
    small, large = results[0], results[-1]
    out = []
    for key, what in (("orch_cpu_ms_per_host", "orchestrator CPU per host"),
                      ("peak_rss_kb_per_host", "peak memory per host")):
        ratio = _ratio(small[key], large[key])
        out.append((ratio <= RATIO_LIMIT, f"{what}: {small[key]} at {small['hosts']:,} -> {large[key]} at "
                    f"{large['hosts']:,} hosts = {ratio:.2f}x (limit {RATIO_LIMIT}x)"))
    for r in results:
        out.append(_tx_check(r))
        out.append((r["status"] == "success" and r["counts"] == {"done": r["hosts"]},
                    f"{r['hosts']:,} hosts: rollout {r['status']}, {r['counts']}"))
        out.append((r["most_host_names_in_a_line"] <= 1,
                    f"{r['hosts']:,} hosts: an INFO line names at most one host "
                    f"(most: {r['most_host_names_in_a_line']})"))
    return out


def _ratio(small: float, large: float) -> float:
    """large / small; 1 when both are 0 (a peak RSS that did not grow: the process had already
    been that large, as when the sizes share a process), inf when only the small one is 0."""
    if small > 0:
        return large / small
    return 1.0 if large <= 0 else float("inf")


def _tx_check(r: dict) -> tuple[bool, str]:
    """Per batch: PER_BATCH. A window's group writes its drain records and its draining and
    installing statuses once, then each part of it going back in service (the hosts whose steps
    ended together) clears its records and writes its final statuses once."""
    got = {m: r["write_tx"].get(m, 0) for m in PER_BATCH}
    want = {m: k * r["batches"] for m, k in PER_BATCH.items()}
    if r.get("mode") == "window":
        parts = got["clear_drained_many"]
        want.update(clear_drained_many=parts if r["batches"] <= parts <= r["hosts"] else r["batches"],
                    set_host_statuses=2 * r["batches"] + parts)
    extra = sorted(set(r["write_tx"]) - set(PER_BATCH) - set(AUDIT_WRITES))
    ok = got == want and not extra
    detail = ", ".join(f"{m} {got[m]} (want {want[m]})" for m in PER_BATCH)
    return ok, (f"{r['hosts']:,} hosts, {r['batches']} batches: write transactions {detail}"
                + (f"; unexpected writes by {', '.join(extra)}" if extra else ""))


def print_result(r: dict) -> None:
    audit_tx = sum(r["write_tx"].get(m, 0) for m in AUDIT_WRITES)
    groups = "window groups" if r.get("mode") == "window" else "batches"
    print(f"{r['hosts']:>7,} hosts, {r['batches']} {groups} of {r['batch']}: wall {r['wall_s']:.1f} s, "
          f"CPU {r['cpu_s']:.1f} s (simulated hosts+LBs {r['sim_cpu_s']:.1f} s), "
          f"orchestrator {r['orch_cpu_ms_per_host']:.2f} ms/host, peak RSS +{r['peak_rss_delta_mb']:.0f} MB "
          f"(ru_maxrss delta) = {r['peak_rss_kb_per_host']:.1f} KiB/host")
    print(f"        rows/host {r['rows_per_host']}; write tx/batch "
          f"{ {m: v for m, v in r['write_tx_per_batch'].items() if m not in AUDIT_WRITES} }, "
          f"audit {audit_tx} tx ({r['rows'].get('liftoff_audit', 0) / max(1, audit_tx):.0f} rows/tx); "
          f"read tx {r['read_tx']}")
    print(f"        log lines {r['log_lines']}")


def run_one_process(hosts: int, args: argparse.Namespace) -> dict:
    """One size in a fresh process (so ru_maxrss is this size's own)."""
    cmd = [sys.executable, __file__, "--one", str(hosts), "--batch", args.batch, "--mode", args.mode,
           "--install-seconds", str(args.install_seconds), "--install-jitter", str(args.install_jitter)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"size {hosts} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", help="comma-separated host counts (default 1000,10000; --full adds 50000)")
    p.add_argument("--full", action="store_true", help=f"add {FULL_SIZE:,} hosts (several minutes)")
    p.add_argument("--batch", default="10%", help="the role's batch (default 10%%)")
    p.add_argument("--install-seconds", type=float, default=0.0, help="simulated install time (default 0)")
    p.add_argument("--install-jitter", type=float, default=0.0,
                   help="spread of each host's install time: +- this share (default 0; fixed per host)")
    p.add_argument("--mode", choices=("lockstep", "window"), default="lockstep",
                   help="rollout_mode: lockstep (default) or window")
    p.add_argument("--json", action="store_true", help="print a JSON summary at the end")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: one size, JSON out
    return p.parse_args(argv)


def sizes_of(args: argparse.Namespace) -> list[int]:
    sizes = [int(s.replace("_", "")) for s in args.sizes.split(",")] if args.sizes else list(DEFAULT_SIZES)
    if args.full and FULL_SIZE not in sizes:
        sizes.append(FULL_SIZE)
    return sorted(sizes)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.one:
        print(json.dumps(simulate(args.one, args.batch, install_s=args.install_seconds, mode=args.mode,
                                  install_jitter=args.install_jitter)))
        return 0
    print(f"fleet rollout, simulated transport, python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    results = []
    for n in sizes_of(args):
        results.append(run_one_process(n, args))
        print_result(results[-1])
    outcome = checks(results)
    for ok, line in outcome:
        print(f"{'PASS' if ok else 'FAIL'} {line}")
    if args.json:
        print(json.dumps({"results": results, "checks": [{"ok": ok, "check": line} for ok, line in outcome]},
                         sort_keys=True))
    return 0 if all(ok for ok, _ in outcome) else 1


if __name__ == "__main__":
    sys.exit(main())
