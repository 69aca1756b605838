"""A reproducible chaos soak (issue 14): liftoff's pipelines, again and again, on a lab of its own
through a real Airflow (api-server, scheduler, dag-processor, triggerer; LocalExecutor on the
local PostgreSQL), with one or two faults injected at a random moment of each run, then
liftoff's invariants checked against the lab and liftoff's state store (bench/soak_invariants.py).

    python bench/soak.py --seed 7 --runs 120            # make soak
    python bench/soak.py --seed 14 --runs 4 --short --faults host_down,ssh_cut   # as the slice does
    python bench/soak.py --seed 7 --minutes 30 --json soak.json

Every random choice of run N comes from ``random.Random(f"{seed}/{N}")``: the pipeline, its
build (good, a failing migration, an install failing on one host, internal), the faults and
their moments. A moment is a count of commands the lab's hosts ran since the run started (its
audit log), or, for a run that sends no command (canary_weight), a delay. The same seed replays
the same faults at the same steps (the timing of Airflow's own processes still varies).

Faults: host down and back; SSH sessions cut mid-chain (every sshd session killed); one HAProxy
killed -9 and restarted (its runtime state lost); Alertmanager, Prometheus, the Pushgateway or
the chat receiver stopped and restarted; the scheduler, the triggerer or the api-server killed
-9 and restarted; a failing migration and an install failing on one host (bad builds); a second
deploy triggered on the same environment.

Recovery, as the README tells a release manager: restart what died, bring the host back, then
``liftoff retry RUN STAGE`` the failed stage of a good build (at most twice), or fix forward
with ``fast_deploy`` of a good build when the build was bad; each bounded in time.

Prints every violation with the seed and the step to replay it, and a JSON summary (runs,
faults by kind, recoveries, violations, wall). Exit 0 with no violation, 1 with any, 2 when the
soak itself could not run.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "include"), str(REPO / "plugins")]

from bench.soak_invariants import Checker, canary_weight_now, traces  # noqa: E402
from lab import processes  # noqa: E402
from tests.airflow_stack import Stack, StackError, airflow_stack  # noqa: E402
from tests.labkit import Lab, running_lab  # noqa: E402

DEFAULT_OCTET = 75
# A lost task is failed within seconds, not a minute (as tests/e2e/test_distributed.py).
TUNING = {
    "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "20",
    "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "2",
    "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_THRESHOLD": "10",
    "AIRFLOW__SCHEDULER__ORPHANED_TASKS_CHECK_INTERVAL": "5",
}
SHORT_DAGS = ("fast_deploy", "rollback", "canary_weight")
LONG_DAGS = ("deploy_canary",)
LAB_SERVICES = ("alertmanager", "prometheus", "pushgateway", "chat")
AIRFLOW_KILLS = ("scheduler", "triggerer", "api-server")
# (kind, weight): the most likely to find bugs weigh most.
FAULTS = [("host_down", 5), ("haproxy_kill", 4), ("scheduler_kill", 4), ("ssh_cut", 3),
          ("alertmanager_stop", 3), ("second_deploy", 3), ("triggerer_kill", 2), ("api_server_kill", 1),
          ("prometheus_stop", 1), ("pushgateway_stop", 1), ("chat_stop", 1)]
NOT_YET = ["the GitLab API stopped alone (it lives in labd with the hosts)", "a slow install (the lab's "
           "install time is lab-wide)", "the Celery worker killed (--celery)", "deploy_production and "
           "post_deploy_patch runs"]
RUN_TIMEOUT = {"fast_deploy": 240, "rollback": 300, "canary_weight": 120, "deploy_canary": 900}
QUIET = 5
CANARY_ROLLOUTS = ("stage_6_canary_fleet.deploy", "rollback_fleet", "rollback_gitaly")


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S ") + msg, flush=True)


@dataclass
class Fault:
    kind: str
    at_commands: int | None  # inject after this many lab commands since the run started ...
    at_seconds: float  # ... or after this delay (runs that send no command; a fallback)
    heal_after: float  # seconds after the injection
    target: str = ""
    injected: float | None = None
    healed: bool = False

    def describe(self) -> str:
        when = (f"after {self.at_commands} host commands" if self.at_commands is not None
                else f"after {self.at_seconds:.1f} s")
        return f"{self.kind}{'(' + self.target + ')' if self.target else ''} {when}"


@dataclass
class Plan:
    index: int
    dag: str
    conf: dict
    env: str
    build: str  # good | migration_fails | install_fails | internal | -
    version: str | None
    faults: list[Fault] = field(default_factory=list)

    def describe(self) -> str:
        faults = ", ".join(f.describe() for f in self.faults) or "none"
        conf = json.dumps(self.conf, sort_keys=True)
        return f"run {self.index}: {self.dag} {conf} build={self.build}; faults: {faults}"


class Soak:
    def __init__(self, lab: Lab, stack: Stack, seed: int, short: bool, faults: list[str] | None = None):
        from liftoff.inventory import load_inventory
        from liftoff.store import Store

        self.lab = lab
        self.stack = stack
        self.seed = seed
        self.short = short
        self.fault_kinds = [(k, w) for k, w in FAULTS if faults is None or k in faults]
        self.inventory = load_inventory()
        self.store = Store(json.loads(lab.env["AIRFLOW_CONN_LIFTOFF_STATE"])["extra"]["url"])
        self.checker = Checker(lab, self.store, self.inventory)
        self.runs: dict[str, str] = {}  # run id -> state, every run the soak started
        self.run_dags: dict[str, str] = {}
        self.seq = 7500
        self.good: dict[str, str] = {}  # env -> newest good build deployed there
        self.faults = Counter()
        self.recoveries = Counter()
        self.violations: list[dict] = []
        self.outcomes = Counter()
        self.audit = lab.config.path("state", "audit.log")
        self.cli_env = stack.cli_env()

    # -- builds ---------------------------------------------------------------------------------
    def new_build(self, rng: random.Random, env: str, kind: str) -> str:
        self.seq += 1
        sha = f"{rng.getrandbits(28):07x}"
        version = f"17.9.0+rnightly.{self.seq}.{sha}-0"
        attrs: dict = {"nightly": True}
        if kind == "migration_fails":
            attrs["migration_fails"] = True
        elif kind == "install_fails":
            hosts = [h.name for h in self.lab.topology.env_hosts(env) if h.role in ("web", "api", "git")]
            attrs["install_fails_on"] = [rng.choice(hosts)]
        elif kind == "internal":
            attrs["internal"] = True
            self.checker.internal_versions.add(version)
        self.lab.build_add(version, **attrs)
        return version

    # -- plans ------------------------------------------------------------------------------------
    def plan(self, index: int) -> Plan:
        rng = random.Random(f"{self.seed}/{index}")
        dags = SHORT_DAGS if self.short else SHORT_DAGS + LONG_DAGS
        weights = [5, 2, 1] if self.short else [5, 2, 1, 2]
        dag = rng.choices(dags, weights)[0]
        env = rng.choice(["gstg", "gprd-cny", "gprd"])
        build_kind = rng.choices(["good", "migration_fails", "install_fails", "internal"], [6, 2, 2, 1])[0]
        if dag == "rollback" and not self.store.previous_version(env):
            dag = "fast_deploy"  # nothing to roll back to yet
        if dag == "fast_deploy":
            version = self.new_build(rng, env, build_kind)
            conf = {"environment": env, "version": version, "reason": f"soak seed {self.seed} run {index}",
                    "internal": build_kind == "internal"}
        elif dag == "deploy_canary":
            env = "gstg"
            if build_kind == "internal":
                build_kind = "good"  # deploy_canary takes public builds
            version = self.new_build(rng, env, build_kind)
            conf = {"version": version, "on_failure": rng.choice(["halt", "rollback"]),
                    "quiet_period_seconds": QUIET}
        elif dag == "rollback":
            build_kind, version = "-", None
            conf = {"environment": env, "target_version": None, "mode": rng.choice(["fast", "normal"])
                    if not self.short else "fast", "reason": f"soak seed {self.seed} run {index}",
                    "quiet_period_seconds": QUIET}
        else:
            build_kind, version, env = "-", None, "gprd-cny"
            conf = {"weight": rng.choice([0, 5, 10, 25, 50]), "force": False}
        plan = Plan(index, dag, conf, env, build_kind, version)
        kinds, w = zip(*self.fault_kinds, strict=True)
        for _ in range(rng.choice([1, 1, 2])):
            kind = rng.choices(kinds, w)[0]
            commands = None if dag == "canary_weight" else rng.randint(1, 40)
            fault = Fault(kind, commands, rng.uniform(1, 12), rng.uniform(3, 20))
            if kind == "host_down":
                fault.target = rng.choice([h.name for h in self.lab.topology.env_hosts(env)])
            elif kind == "haproxy_kill":
                fault.target = rng.choice([lb.name for lb in self.lab.topology.lbs_for(env)])
            plan.faults.append(fault)
        if build_kind in ("migration_fails", "install_fails"):
            self.faults[build_kind] += 1
        return plan

    # -- driving Airflow ----------------------------------------------------------------------------
    def liftoff(self, *argv: str) -> tuple[int, str]:
        from liftoff.chatops.cli import main

        out, err = io.StringIO(), io.StringIO()
        code = main(list(argv), env=self.cli_env, stdout=out, stderr=err)
        return code, out.getvalue() + err.getvalue()

    def trigger(self, dag: str, conf: dict) -> str:
        for attempt in range(30):
            try:
                run_id = self.stack.trigger(dag, conf)["dag_run_id"]
                break
            except (StackError, OSError) as exc:
                if getattr(exc, "status", None) == 400 or attempt == 29:
                    raise
                time.sleep(2)
        self.runs[run_id] = "queued"
        self.run_dags[run_id] = dag
        return run_id

    def state(self, run_id: str) -> str | None:
        try:
            state = self.stack.dag_run(self.run_dags[run_id], run_id).get("state")
        except Exception:  # the api-server may be down (a fault): ask again next poll
            return None
        self.runs[run_id] = state
        return state

    def commands_since(self, offset: int) -> int:
        if not self.audit.exists():
            return 0
        with open(self.audit, "rb") as f:
            f.seek(offset)
            return sum(1 for line in f if b"chef-client (interval run)" not in line)

    def audit_offset(self) -> int:
        return self.audit.stat().st_size if self.audit.exists() else 0

    # -- faults ---------------------------------------------------------------------------------------
    def inject(self, plan: Plan, fault: Fault, extra_runs: list[str]) -> None:
        kind = fault.kind
        log(f"  inject {fault.describe()}")
        if kind == "host_down":
            out = self.lab.cli("fault", "host-down", fault.target)
            if out.returncode != 0:
                raise RuntimeError(out.stderr)
        elif kind == "haproxy_kill":
            self._kill_lab(f"haproxy-{fault.target}")
        elif kind == "ssh_cut":
            self._cut_ssh()
        elif kind.endswith("_stop"):
            self._kill_lab(kind.removesuffix("_stop"))
        elif kind.endswith("_kill"):
            name = kind.removesuffix("_kill").replace("_", "-")
            with contextlib.suppress(StackError):
                self.stack.kill(name)
        elif kind == "second_deploy":
            # another DAG on the same environment (a DAG's own runs queue: max_active_runs=1): it
            # must wait for or be refused by the lock, never change hosts under it
            version = plan.version or self.good.get(plan.env)
            if plan.dag == "fast_deploy" and self.store.previous_version(plan.env):
                dag, second = "rollback", {"environment": plan.env, "target_version": None, "mode": "fast",
                                           "reason": "soak: a second deploy", "quiet_period_seconds": QUIET}
            elif plan.dag != "fast_deploy" and version:
                dag, second = "fast_deploy", {"environment": plan.env, "version": version,
                                              "reason": "soak: a second deploy",
                                              "internal": version in self.checker.internal_versions}
            else:
                dag = None
            if not dag:
                log("  (no second deploy possible yet: nothing to deploy or roll back to)")
                fault.injected = time.monotonic()
                return
            with contextlib.suppress(StackError):
                extra_runs.append(self.trigger(dag, second))
                fault.target = f"{dag} on {plan.env}"
        fault.injected = time.monotonic()
        self.faults[kind] += 1

    def heal(self, fault: Fault) -> None:
        if fault.healed or fault.injected is None:
            return
        fault.healed = True
        if fault.kind == "host_down":
            out = self.lab.cli("fault", "host-up", fault.target)
            if out.returncode != 0:
                raise RuntimeError(out.stderr)
        elif fault.kind in ("haproxy_kill", "ssh_cut") or fault.kind.endswith("_stop"):
            processes.up(self.lab.config, log=lambda _m: None)
        elif fault.kind.endswith("_kill"):
            name = fault.kind.removesuffix("_kill").replace("_", "-")
            if name not in self.stack.procs:
                self.stack.start(name)
                if name == "api-server":
                    self.stack._token = None
                    self._wait_api()
        log(f"  healed {fault.kind}")

    def _wait_api(self) -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                self.stack.request("GET", "/monitor/health")
                return
            time.sleep(1)
        raise RuntimeError("the api-server did not come back within 120 s")

    def _kill_lab(self, name: str) -> None:
        pid = processes.running_pid(self.lab.config, name)
        if pid:
            os.kill(pid, signal.SIGKILL)
            processes.stop_pids([pid], timeout=5)

    def _cut_ssh(self) -> None:
        """kill -9 every session sshd forked (the chains in flight are cut), sshd itself too;
        heal starts it again."""
        pid = processes.running_pid(self.lab.config, "sshd")
        if not pid:
            return
        children: dict[int, list[int]] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError, IndexError, ValueError):
                    ppid = int(Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()[1])
                    children.setdefault(ppid, []).append(int(entry.name))
        todo, victims = [pid], []
        while todo:
            p = todo.pop()
            victims.append(p)
            todo += children.get(p, [])
        for p in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        processes.stop_pids([pid], timeout=5)

    def heal_all(self, plan: Plan) -> None:
        for fault in plan.faults:
            self.heal(fault)
        # whatever else is down (a fault's side effect): the release manager restarts it
        if not all(processes.liveness(self.lab.config).values()):
            processes.up(self.lab.config, log=lambda _m: None)
        for name in ("scheduler", "triggerer", "dag-processor", "api-server"):
            if name not in self.stack.procs or self.stack.procs[name].poll() is not None:
                self.stack.procs.pop(name, None)
                self.stack.start(name)
        self._wait_api()

    # -- one run ----------------------------------------------------------------------------------
    def run(self, plan: Plan) -> None:
        log(plan.describe())
        offset = self.audit_offset()
        run_id = self.trigger(plan.dag, plan.conf)
        extra: list[str] = []
        started = time.monotonic()
        timeout = RUN_TIMEOUT[plan.dag] + 120 * len(plan.faults)
        cny_hosts = [h.name for h in self.lab.topology.env_hosts("gprd-cny")]
        state = None
        while time.monotonic() - started < timeout:
            now = time.monotonic()
            commands = self.commands_since(offset)
            for fault in plan.faults:
                if fault.injected is None and state not in ("success", "failed") and (
                        (fault.at_commands is not None and commands >= fault.at_commands)
                        or now - started >= fault.at_seconds + (0 if fault.at_commands is None else 60)):
                    self.inject(plan, fault, extra)
                elif (fault.injected is not None and not fault.healed
                      and now - fault.injected >= fault.heal_after):
                    self.heal(fault)
            state = self.state(run_id)
            if state in ("success", "failed") and all(f.injected is None or f.healed for f in plan.faults):
                break
            if state in ("success", "failed"):
                for fault in plan.faults:
                    self.heal(fault)
            self.sample_canary_weight(plan, run_id, cny_hosts)
            time.sleep(0.5)
        self.heal_all(plan)
        if state not in ("success", "failed"):
            self.violation(plan, f"3: {plan.dag} run {run_id} did not end within {timeout} s (state {state})")
            return
        for other in extra:
            other_state = self.wait(other, RUN_TIMEOUT[self.run_dags[other]])
            self.outcomes[f"second {self.run_dags[other]} {other_state}"] += 1
        log(f"  {plan.dag} {run_id}: {state} in {time.monotonic() - started:.0f} s")
        self.outcomes[f"{plan.dag} {state}"] += 1
        if state == "failed":
            self.recover(plan, run_id)
        elif plan.version and plan.build in ("good", "internal"):
            self.good[plan.env] = plan.version

    def wait(self, run_id: str, timeout: float) -> str | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.state(run_id)
            if state in ("success", "failed"):
                return state
            time.sleep(1)
        return self.runs.get(run_id)

    def sample_canary_weight(self, plan: Plan, run_id: str, cny_hosts: list[str]) -> None:
        """Invariant 6b: while a canary rollout (deploy_canary stage 6, a rollback of gprd-cny)
        changes hosts, the canary's weight in production is 0 on every LB."""
        if plan.dag not in ("deploy_canary", "rollback") or (
                plan.dag == "rollback" and plan.env != "gprd-cny"):
            return
        try:
            running = [t["task_id"] for t in self.stack.running_task_instances(plan.dag, run_id)]
        except Exception:
            return
        rolling = [t for t in running if t in CANARY_ROLLOUTS]
        if rolling:
            weights = canary_weight_now(self.lab, cny_hosts)
            if any(w != {0} for w in weights.values()):
                self.violation(plan, f"6: canary weight {weights} while {rolling[0]} of {run_id} was running")

    # -- recovery -----------------------------------------------------------------------------------
    def recover(self, plan: Plan, run_id: str) -> None:
        """As the README says: a good build's failed stage is retried (at most twice); a bad
        build is fixed forward with a fast deploy of a good one."""
        good_build = plan.build in ("good", "internal", "-")
        for _ in range(2 if good_build else 0):
            tis = self.stack.task_instances(plan.dag, run_id)
            failed = sorted(t["task_id"] for t in tis if t.get("state") == "failed"
                            and t["task_id"] not in ("finalize", "halt", "finalize_env"))
            if not failed:
                break
            stage = failed[0].split(".", 1)[0]
            code, out = self.liftoff("retry", run_id, stage, "--dag", plan.dag)
            if code != 0:
                log(f"  retry refused: {out.strip().splitlines()[-1] if out.strip() else code}")
                break
            self.recoveries["liftoff retry"] += 1
            state = self.wait(run_id, RUN_TIMEOUT[plan.dag])
            log(f"  liftoff retry {run_id} {stage}: {state}")
            if state == "success":
                if plan.version:
                    self.good[plan.env] = plan.version
                return
        rng = random.Random(f"{self.seed}/{plan.index}/recovery")
        version = self.new_build(rng, plan.env, "good")
        fix = self.trigger("fast_deploy", {"environment": plan.env, "version": version,
                                           "reason": f"soak: fix forward after run {plan.index}",
                                           "internal": False})
        self.recoveries["fix forward (fast_deploy)"] += 1
        state = self.wait(fix, RUN_TIMEOUT["fast_deploy"])
        log(f"  fix forward {fix}: {state}")
        if state == "success":
            self.good[plan.env] = version
        else:
            self.recoveries["fix forward failed"] += 1

    # -- invariants -----------------------------------------------------------------------------------
    def violation(self, plan: Plan, text: str) -> None:
        entry = {"seed": self.seed, "run": plan.index, "step": plan.describe(), "violation": text,
                 "replay": f"python bench/soak.py --seed {self.seed} --runs {plan.index + 1}"
                           + (" --short" if self.short else "")}
        self.violations.append(entry)
        log(f"  VIOLATION seed {self.seed} run {plan.index}: {text}\n    step: {plan.describe()}\n"
            f"    replay: {entry['replay']}")

    def self_test(self) -> dict:
        """The checker must see a violation: one production web server drained by hand on one of
        its two LBs (no record) fails invariants 1 and 2; made ready again, both pass."""
        host = next(h for h in self.lab.topology.env_hosts("gprd") if h.role == "web")
        lb = self.lab.topology.lbs_for("gprd")[0]
        backends = [host.role]  # a main-fleet host sits in its role's backend only
        for backend in backends:
            self.lab.haproxy(lb.name, f"set server {backend}/{host.name} state drain")
        self.checker._snap = None
        try:
            status = self.lab.status()
            seen = self.checker.hosts_in_service_or_recorded(status) + self.checker.lbs_agree(status)
        finally:
            for backend in backends:
                self.lab.haproxy(lb.name, f"set server {backend}/{host.name} state ready")
        status = self.lab.status()
        after = self.checker.hosts_in_service_or_recorded(status) + self.checker.lbs_agree(status)
        ok = ({v[:2] for v in seen if host.name in v} == {"1:", "2:"}
              and not any(host.name in v for v in after))
        return {"planted": f"{host.name} drained on {lb.name} without a record", "seen": seen[:3],
                "ok": ok}

    def check(self, plan: Plan) -> None:
        for run_id in list(self.runs):
            if self.runs[run_id] not in ("success", "failed"):
                self.state(run_id)
        for text in self.checker.check(self.runs):
            self.violation(plan, text)


def run_soak(args: argparse.Namespace, tmp: Path) -> dict:
    started = time.monotonic()
    deadline = started + args.minutes * 60 if args.minutes else None
    with running_lab(tmp / "lab", args.octet, "--install-seconds", str(args.install_seconds)) as lab:
        os.environ.update(lab.env)
        os.environ["LIFTOFF_NO_AIRFLOW"] = "1"
        with airflow_stack(tmp / "airflow", {**lab.env, **TUNING}) as stack:
            dags = SHORT_DAGS if args.short else SHORT_DAGS + LONG_DAGS + ("fast_deploy",)
            for dag in dict.fromkeys(dags):
                stack.wait_until_dag_parsed(dag)
            soak = Soak(lab, stack, args.seed, args.short, args.faults)
            log(f"soak seed {args.seed}: lab {lab.config.lab_dir} (octet {args.octet}), Airflow "
                f"{stack.base_url}; ready in {time.monotonic() - started:.0f} s")
            self_test = soak.self_test()
            log(f"checker self-test: {self_test}")
            done = 0
            for index in range(args.runs):
                if deadline and time.monotonic() > deadline:
                    break
                plan = soak.plan(index)
                soak.run(plan)
                soak.check(plan)
                done += 1
            summary = {
                "seed": args.seed, "fault_kinds": [k for k, _ in soak.fault_kinds], "runs": done,
                "short": args.short, "checker_self_test": self_test,
                "outcomes": dict(sorted(soak.outcomes.items())),
                "faults": dict(sorted(soak.faults.items())), "faults_total": sum(soak.faults.values()),
                "recoveries": dict(sorted(soak.recoveries.items())),
                "violations": soak.violations, "violations_total": len(soak.violations),
                "runs_started": len(soak.runs),
                "internal_builds": len(soak.checker.internal_versions),
                "internal_traces_checked": sum(len(traces(v)) for v in soak.checker.internal_versions),
                "faults_not_implemented": NOT_YET,
            }
            soak.store.close()
    summary["wall_s"] = round(time.monotonic() - started, 1)
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/soak.py", description="A reproducible chaos soak of liftoff.")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--runs", type=int, default=100)
    p.add_argument("--minutes", type=float, default=None, help="stop starting runs after this long")
    p.add_argument("--short", action="store_true",
                   help="short pipelines only (fast_deploy, fast rollback, canary_weight): the test slice")
    p.add_argument("--faults", type=lambda v: [k for k in v.split(",") if k], default=None,
                   metavar="KIND,KIND", help="only these fault kinds (default: all: "
                   + ", ".join(k for k, _ in FAULTS) + ")")
    p.add_argument("--celery", action="store_true", help="the distributed path (not supported yet)")
    p.add_argument("--octet", type=int, default=int(os.environ.get("LIFTOFF_SOAK_LAB_OCTET", DEFAULT_OCTET)))
    p.add_argument("--install-seconds", type=float, default=0.3)
    p.add_argument("--json", metavar="FILE", help="also write the summary there")
    p.add_argument("--tmp", metavar="DIR", help="working directory (default: a new temporary one)")
    args = p.parse_args(argv)
    if args.celery:
        print("bench/soak.py: --celery is not supported yet: the soak runs on LocalExecutor only "
              "(tests/airflow_stack.py has executor='celery'; the worker-kill fault and its recovery are "
              "not written)", file=sys.stderr)
        return 2
    unknown = set(args.faults or []) - {k for k, _ in FAULTS}
    if unknown or args.faults == []:
        p.error(f"--faults: unknown kinds {sorted(unknown)}; known: {', '.join(k for k, _ in FAULTS)}")
    if args.runs < 1:
        p.error("--runs must be at least 1")
    tmp = Path(args.tmp) if args.tmp else Path(tempfile.mkdtemp(prefix=f"liftoff-soak-{args.seed}-"))
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        summary = run_soak(args, tmp)
    except Exception as exc:  # noqa: BLE001 - the soak could not run: say why, exit 2
        import traceback

        traceback.print_exc()
        print(f"bench/soak.py: the soak could not run: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    text = json.dumps(summary, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 1 if summary["violations_total"] else 0


if __name__ == "__main__":
    sys.exit(main())
