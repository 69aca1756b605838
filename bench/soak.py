"""A reproducible chaos soak (issue 14): liftoff's pipelines, again and again, on a lab of its own
through a real Airflow (api-server, scheduler, dag-processor, triggerer; LocalExecutor on the
local PostgreSQL, or with ``--celery`` CeleryExecutor, a Celery worker and the local Redis as its
broker, liftoff's state store in PostgreSQL), with one or two faults injected at a random moment
of each run, then liftoff's invariants checked against the lab and liftoff's state store
(bench/soak_invariants.py).

    python bench/soak.py --seed 7 --runs 120            # make soak
    python bench/soak.py --seed 14 --runs 4 --short --faults host_down,ssh_cut   # as the slice does
    python bench/soak.py --seed 7 --minutes 30 --json soak.json
    python bench/soak.py --seed 24 --runs 3 --dags deploy_canary,deploy_production --faults slow_install
    python bench/soak.py --seed 3 --runs 3 --short --celery --faults celery_worker_kill,host_down

Every random choice of run N comes from ``random.Random(f"{seed}/{N}")``: the pipeline, its
build (good, a failing migration, an install failing on one host, internal), the faults and
their moments. A moment is a count of commands the lab's hosts ran since the run started (its
audit log), or, for a run that sends no command (canary_weight), a delay. The same seed replays
the same faults at the same steps (the timing of Airflow's own processes still varies).

Pipelines (``--dags`` narrows them): fast_deploy, rollback (fast and normal), canary_weight
(``--short``: only these three), deploy_canary, post_deploy_patch (every later build includes
the patch, as a merged fix would, so deploy_canary's halt is lifted by the next canary deploy),
and deploy_production, drawn rarely, and only once a deploy_canary verified a build the canary
still runs (else a deploy_canary runs instead); a production-checks request (human in the loop)
is rejected by the soak, as its failing checks are the soak's own faults.

Faults: host down and back; SSH sessions cut mid-chain (every sshd session killed); one HAProxy
killed -9 and restarted (its runtime state lost); Alertmanager, Prometheus, the Pushgateway or
the chat receiver stopped and restarted; the GitLab API stopped and restarted (its port closed
and its connections dropped, labd's hosts go on; QA pipelines and issues are kept); one host's
install slow (20-60 s instead of the lab's ``--install-seconds``: past a batch, well within
liftoff's install timeout) from the run's start to its end; the scheduler, the triggerer or the
api-server killed -9 and restarted, and with ``--celery`` the Celery worker (and its tasks);
a failing migration and an install failing on one host (bad builds); a second deploy
triggered on the same environment.

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
# (dag, weight) of the run mix: --short takes the first three; deploy_production (stages 7-9,
# long) only once a deploy_canary verified a build the canary still runs, else a deploy_canary.
DAG_MIX = [("fast_deploy", 5), ("rollback", 2), ("canary_weight", 1), ("deploy_canary", 2),
           ("post_deploy_patch", 1), ("deploy_production", 1)]
SHORT_DAGS = ("fast_deploy", "rollback", "canary_weight")
LONG_DAGS = ("deploy_canary", "post_deploy_patch", "deploy_production")
LAB_SERVICES = ("alertmanager", "prometheus", "pushgateway", "chat")
AIRFLOW_KILLS = ("scheduler", "triggerer", "api-server")
# (kind, weight): the most likely to find bugs weigh most.
FAULTS = [("host_down", 5), ("haproxy_kill", 4), ("scheduler_kill", 4), ("ssh_cut", 3),
          ("alertmanager_stop", 3), ("second_deploy", 3), ("triggerer_kill", 2), ("api_server_kill", 1),
          ("prometheus_stop", 1), ("pushgateway_stop", 1), ("chat_stop", 1), ("gitlab_api_stop", 2),
          ("slow_install", 3), ("celery_worker_kill", 4)]
CELERY_ONLY = {"celery_worker_kill"}  # left out of a soak without --celery (even when --faults names it)
# slow_install: one host's `apt-get install` takes this long (the lab's usual: --install-seconds),
# well past a batch, well under liftoff's install timeout (30 min); set at the run's start.
SLOW_INSTALL_S = (20.0, 60.0)
NOT_YET: list[str] = []
RUN_TIMEOUT = {"fast_deploy": 240, "rollback": 300, "canary_weight": 120, "deploy_canary": 900,
               "deploy_production": 900, "post_deploy_patch": 180}
PATCH_ROLES = ("web", "api", "git", "sidekiq")
QUIET = 5
CANARY_ROLLOUTS = ("stage_6_canary_fleet.deploy", "rollback_fleet", "rollback_gitaly")


def stack_process(kind: str) -> str:
    """The Airflow process a ``*_kill`` fault kills: scheduler_kill -> scheduler, api_server_kill ->
    api-server, celery_worker_kill -> worker (tests/airflow_stack.py's names)."""
    name = kind.removesuffix("_kill").replace("_", "-")
    return "worker" if name == "celery-worker" else name


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S ") + msg, flush=True)


@dataclass
class Fault:
    kind: str
    at_commands: int | None  # inject after this many lab commands since the run started ...
    at_seconds: float  # ... or after this delay (runs that send no command; a fallback)
    heal_after: float  # seconds after the injection (slow_install: when the run ends)
    target: str = ""
    seconds: float | None = None  # slow_install: the target's install time
    injected: float | None = None
    healed: bool = False

    def describe(self) -> str:
        when = (f"after {self.at_commands} host commands" if self.at_commands is not None
                else f"after {self.at_seconds:.1f} s")
        what = ", ".join(x for x in (self.target, f"{self.seconds:.0f} s" if self.seconds else "") if x)
        if self.at_commands == 0:
            when = "from the start"
        return f"{self.kind}{'(' + what + ')' if what else ''} {when}"


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


def fault_kinds(faults: list[str] | None, celery: bool) -> list[tuple[str, int]]:
    """(kind, weight) of the faults a soak draws from: ``--faults`` (all by default), the Celery
    worker's kill only with ``--celery``."""
    return [(k, w) for k, w in FAULTS if (faults is None or k in faults) and (celery or k not in CELERY_ONLY)]


def dag_mix(short: bool, dags: list[str] | None = None) -> list[tuple[str, int]]:
    """(dag, weight) of the runs a soak draws from: ``--dags`` (default: every pipeline, or the
    short ones with ``--short``)."""
    default = SHORT_DAGS if short else SHORT_DAGS + LONG_DAGS
    return [(d, w) for d, w in DAG_MIX if d in (dags or default)]


class _Faults:
    """Injecting the planned faults into the lab and Airflow, and healing them (a part of
    :class:`Soak`)."""

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
        elif kind == "gitlab_api_stop":
            processes.control(self.lab.config, "POST", "/faults/gitlab-api-down", {})
        elif kind == "slow_install":
            processes.control(self.lab.config, "POST", "/faults/slow-install",
                              {"host": fault.target, "seconds": fault.seconds})
        elif kind.endswith("_stop"):
            self._kill_lab(kind.removesuffix("_stop"))
        elif kind.endswith("_kill"):
            with contextlib.suppress(StackError):
                self.stack.kill(stack_process(kind))
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
        elif fault.kind == "gitlab_api_stop":
            processes.control(self.lab.config, "POST", "/faults/gitlab-api-up", {})
        elif fault.kind == "slow_install":
            processes.control(self.lab.config, "POST", "/faults/slow-install",
                              {"host": fault.target, "seconds": 0})
        elif fault.kind in ("haproxy_kill", "ssh_cut") or fault.kind.endswith("_stop"):
            processes.up(self.lab.config, log=lambda _m: None)
        elif fault.kind.endswith("_kill"):
            name = stack_process(fault.kind)
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
        names = ["scheduler", "triggerer", "dag-processor", "api-server"] + ["worker"] * self.celery
        for name in names:
            if name not in self.stack.procs or self.stack.procs[name].poll() is not None:
                self.stack.procs.pop(name, None)
                self.stack.start(name)
        self._wait_api()


class _Recovery:
    """What a release manager does after a run, and the invariants checked after it (a part
    of :class:`Soak`)."""

    # -- recovery -----------------------------------------------------------------------------------
    def recover(self, plan: Plan, run_id: str) -> None:
        """As the README says: a good build's failed stage is retried (at most twice); a bad
        build is fixed forward with a fast deploy of a good one."""
        if run_id in self.rejected:
            return  # nothing changed: the run ended at its production checks
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
                self.succeeded(plan)
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
        found = self.checker.check(self.runs)
        for text in found:
            self.violation(plan, text)
        if found:  # what liftoff's records said then, for the replay
            store = self.checker.store
            drained = "; ".join(f"{d.env}/{d.host} by {d.run_id}" for d in store.drained())
            settings = "; ".join(f"{s.env} {s.kind} {s.value} {','.join(s.hosts)} by {s.run_id}"
                                 for s in store.lb_settings())
            log(f"    records: drained {drained} | LB settings {settings}"
                + " | last events " + "; ".join(f"{e.env} {e.action} {e.run_id}: {e.reason[:160]}"
                                               for e in store.lock_events()[:6]))


class Soak(_Faults, _Recovery):
    def __init__(self, lab: Lab, stack: Stack | None, seed: int, short: bool, faults: list[str] | None = None,
                 *, dags: list[str] | None = None, celery: bool = False, store=None, inventory=None):
        from liftoff.inventory import load_inventory
        from liftoff.store import Store

        self.lab = lab
        self.stack = stack
        self.seed = seed
        self.short = short
        self.celery = celery
        self.fault_kinds = fault_kinds(faults, celery)
        self.dag_mix = dag_mix(short, dags)
        self.inventory = inventory if inventory is not None else load_inventory()
        if store is None:
            url = (stack.state_url if stack is not None and getattr(stack, "state_database", None)
                   else json.loads(lab.env["AIRFLOW_CONN_LIFTOFF_STATE"])["extra"]["url"])
            store = Store(url)
        self.store = store
        self.checker = Checker(lab, self.store, self.inventory)
        self.runs: dict[str, str] = {}  # run id -> state, every run the soak started
        self.run_dags: dict[str, str] = {}
        self.seq = 7500
        self.good: dict[str, str] = {}  # env -> newest good build deployed there
        self.verified: str | None = None  # the build the last successful deploy_canary verified
        self.patches: list[str] = []  # post-deployment patches applied: every later build includes them
        self.rejected: set[str] = set()  # runs whose production checks the soak rejected
        self.faults = Counter()
        self.recoveries = Counter()
        self.violations: list[dict] = []
        self.outcomes = Counter()
        self.fast_canary_weights: Counter = Counter()  # canary weights seen in fast deploys to gprd-cny
        self.audit = lab.config.path("state", "audit.log")
        self.cli_env = stack.cli_env() if stack is not None else {}

    # -- builds ---------------------------------------------------------------------------------
    def new_build(self, rng: random.Random, env: str, kind: str) -> str:
        self.seq += 1
        sha = f"{rng.getrandbits(28):07x}"
        version = f"17.9.0+rnightly.{self.seq}.{sha}-0"
        attrs: dict = {"nightly": True}
        if self.patches:
            attrs["includes_patches"] = list(self.patches)  # the patches are merged: a build has them
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
    def promotable(self) -> str | None:
        """The build deploy_production may promote: the one the last deploy_canary verified, while
        the canary still runs it (liftoff's record)."""
        if self.verified and self.store.current_version("gprd-cny") == self.verified:
            return self.verified
        return None

    def plan(self, index: int) -> Plan:
        """Run ``index``'s pipeline, conf and faults, from the seed alone (the random draws in a
        fixed order: the same seed replays the same plan)."""
        rng = random.Random(f"{self.seed}/{index}")
        dags, weights = zip(*self.dag_mix, strict=True)
        dag = rng.choices(dags, weights)[0]
        env = rng.choice(["gstg", "gprd-cny", "gprd"])
        build_kind = rng.choices(["good", "migration_fails", "install_fails", "internal"], [6, 2, 2, 1])[0]
        if dag == "rollback" and not self.store.previous_version(env):
            dag = "fast_deploy"  # nothing to roll back to yet
        if dag == "deploy_production" and not self.promotable():
            dag = "deploy_canary"  # nothing verified on the canary yet: verify one first
        env, build_kind, version, conf = self._conf(rng, index, dag, env, build_kind)
        plan = Plan(index, dag, conf, env, build_kind, version)
        plan.faults.extend(self._faults(rng, dag, env))
        if build_kind in ("migration_fails", "install_fails"):
            self.faults[build_kind] += 1
        return plan

    def _conf(self, rng: random.Random, index: int, dag: str, env: str,
              build_kind: str) -> tuple[str, str, str | None, dict]:
        """The run's environment, kind of build, version and DAG conf."""
        why = f"soak seed {self.seed} run {index}"
        if dag == "fast_deploy":
            version = self.new_build(rng, env, build_kind)
            return env, build_kind, version, {"environment": env, "version": version, "reason": why,
                                              "internal": build_kind == "internal"}
        if dag == "deploy_canary":
            build_kind = "good" if build_kind == "internal" else build_kind  # public builds only
            version = self.new_build(rng, "gstg", build_kind)
            on_failure = rng.choice(["halt", "rollback"])
            return "gstg", build_kind, version, {"version": version, "on_failure": on_failure,
                                                 "quiet_period_seconds": QUIET}
        if dag == "deploy_production":
            version, on_failure = self.promotable(), rng.choice(["halt", "rollback"])
            return "gprd", "good", version, {"version": version, "on_failure": on_failure,
                                             "quiet_period_seconds": QUIET}
        if dag == "rollback":
            mode = rng.choice(["fast", "normal"]) if not self.short else "fast"
            return env, "-", None, {"environment": env, "target_version": None, "mode": mode, "reason": why,
                                    "quiet_period_seconds": QUIET}
        if dag == "post_deploy_patch":
            present = sorted({h.role for h in self.lab.topology.env_hosts(env)} & set(PATCH_ROLES))
            patch_id = f"soak-{self.seed}-{index}"
            roles = sorted(rng.sample(present, rng.randint(1, 2)))
            self.patches.append(patch_id)  # recorded with its halt before any host: later builds carry it
            return env, "-", None, {"environment": env, "patch_id": patch_id, "roles": roles, "reason": why,
                                    "patch": f"--- a/soak\n+++ b/soak\n@@ -1 +1 @@\n-{index}\n+{index + 1}\n",
                                    "action": "apply"}
        return "gprd-cny", "-", None, {"weight": rng.choice([0, 5, 10, 25, 50]), "force": False}

    def _faults(self, rng: random.Random, dag: str, env: str) -> list[Fault]:
        """One or two faults, each at a random count of audited commands (or a delay)."""
        kinds, w = zip(*self.fault_kinds, strict=True)
        installs_on = [h.name for e in (("gstg", "gprd-cny") if dag == "deploy_canary" else (env,))
                       for h in self.lab.topology.env_hosts(e)]
        faults = []
        for _ in range(rng.choice([1, 1, 2])):
            kind = rng.choices(kinds, w)[0]
            commands = None if dag == "canary_weight" else rng.randint(1, 40)
            fault = Fault(kind, commands, rng.uniform(1, 12), rng.uniform(3, 20))
            if kind == "host_down":
                fault.target = rng.choice([h.name for h in self.lab.topology.env_hosts(env)])
            elif kind == "haproxy_kill":
                fault.target = rng.choice([lb.name for lb in self.lab.topology.lbs_for(env)])
            elif kind == "gitlab_api_stop":
                fault.heal_after *= 3  # 9-60 s: long enough to meet a QA trigger or its polling
            elif kind == "slow_install":
                # from the run's start (before its installs), lifted when the run ends
                fault.at_commands, fault.heal_after = 0, float("inf")
                fault.target = rng.choice(installs_on)
                fault.seconds = round(rng.uniform(*SLOW_INSTALL_S), 1)
            faults.append(fault)
        return faults

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
        asked = 0.0
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
            if plan.dag == "deploy_production" and state not in ("success", "failed") and now - asked >= 5:
                asked = now
                self.answer_checks_request(plan, run_id)
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
        if plan.env == "gprd-cny" or plan.dag == "deploy_canary":
            self.verified = None  # the canary changed (or may have): verified again by the next deploy_canary
        if state == "failed":
            self.recover(plan, run_id)
        elif plan.build in ("good", "internal"):
            self.succeeded(plan)

    def succeeded(self, plan: Plan) -> None:
        """A good build's run ended success (retried or not): where it is now the good build."""
        if plan.version:
            self.good[plan.env] = plan.version
            if plan.dag == "deploy_canary":
                self.good["gprd-cny"] = self.verified = plan.version

    def answer_checks_request(self, plan: Plan, run_id: str) -> None:
        """deploy_production asks the on-call group when a production check fails (human in the
        loop): the soak's release manager rejects (the run ends before anything changed), as the
        failing checks are the soak's own faults."""
        try:
            tis = self.stack.task_instances(plan.dag, run_id)
        except Exception:  # the api-server may be down (a fault): ask again next time
            return
        for ti in tis:
            if ti["task_id"].endswith("checks_approval") and ti.get("state") == "deferred":
                code, out = self.liftoff("reject", run_id, "--dag", plan.dag, "--task", ti["task_id"],
                                         "--reason", f"soak seed {self.seed}: production checks failed")
                answer = "ok" if code == 0 else out.strip()[-200:]
                log(f"  production checks failed: rejected {ti['task_id']} ({answer})")
                if code == 0:
                    self.rejected.add(run_id)
                    self.recoveries["production checks rejected"] += 1

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
        changes hosts, the canary's weight in production is 0 on every LB.

        A fast_deploy to gprd-cny is not held to it: the design sets the canary weights to zero
        in the canary pipeline's stage 6 only (``Ensures that there is no production traffic
        diverted to the canary fleet``), a fast update trades availability for speed, and
        liftoff's fast_deploy leaves the weight as it is (each host drained while it changes).
        The weights seen then are counted (``canary_weight_during_fast_deploy``), not reported."""
        fast = plan.dag == "fast_deploy" and plan.env == "gprd-cny"
        if not fast and (plan.dag not in ("deploy_canary", "rollback") or (
                plan.dag == "rollback" and plan.env != "gprd-cny")):
            return
        try:
            running = [t["task_id"] for t in self.stack.running_task_instances(plan.dag, run_id)]
        except Exception:
            return
        if fast:
            if any(t.startswith("deploy") for t in running):
                weights = canary_weight_now(self.lab, cny_hosts)
                seen = sorted(set().union(*weights.values()))
                self.fast_canary_weights["weight " + ",".join(map(str, seen))] += 1
            return
        rolling = [t for t in running if t in CANARY_ROLLOUTS]
        if rolling:
            weights = canary_weight_now(self.lab, cny_hosts)
            if any(w != {0} for w in weights.values()):
                self.violation(plan, f"6: canary weight {weights} while {rolling[0]} of {run_id} was running")


def run_soak(args: argparse.Namespace, tmp: Path) -> dict:
    started = time.monotonic()
    deadline = started + args.minutes * 60 if args.minutes else None
    with running_lab(tmp / "lab", args.octet, "--install-seconds", str(args.install_seconds)) as lab:
        os.environ.update(lab.env)
        os.environ["LIFTOFF_NO_AIRFLOW"] = "1"
        executor = "celery" if args.celery else "local"
        with airflow_stack(tmp / "airflow", {**lab.env, **TUNING}, executor=executor,
                           concurrency=args.concurrency) as stack:
            if stack.state_url:  # --celery: liftoff's state store in PostgreSQL, for the soak too
                os.environ.update(LIFTOFF_STATE_URL=stack.state_url,
                                  AIRFLOW_CONN_LIFTOFF_STATE=stack.env["AIRFLOW_CONN_LIFTOFF_STATE"])
            mix = [d for d, _ in dag_mix(args.short, args.dags)]
            for dag in dict.fromkeys(mix + ["fast_deploy", "rollback"]):  # fix forward, second deploys
                stack.wait_until_dag_parsed(dag)
            if args.celery:
                ping_until = time.monotonic() + 120
                while not stack.celery("ping", limit=1):
                    if time.monotonic() > ping_until:
                        raise RuntimeError("the Celery worker did not answer a ping within 120 s")
                    time.sleep(1)
            soak = Soak(lab, stack, args.seed, args.short, args.faults, dags=args.dags, celery=args.celery)
            log(f"soak seed {args.seed}: lab {lab.config.lab_dir} (octet {args.octet}), Airflow "
                f"{stack.base_url} ({executor}); ready in {time.monotonic() - started:.0f} s")
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
                "dags": [d for d, _ in soak.dag_mix], "executor": executor,
                "short": args.short, "checker_self_test": self_test,
                "outcomes": dict(sorted(soak.outcomes.items())),
                "faults": dict(sorted(soak.faults.items())), "faults_total": sum(soak.faults.values()),
                "recoveries": dict(sorted(soak.recoveries.items())),
                "violations": soak.violations, "violations_total": len(soak.violations),
                "runs_started": len(soak.runs),
                "internal_builds": len(soak.checker.internal_versions),
                "internal_traces_checked": sum(len(traces(v)) for v in soak.checker.internal_versions),
                "faults_not_implemented": NOT_YET,
                "canary_weight_during_fast_deploy": dict(sorted(soak.fast_canary_weights.items())),
            }
            soak.store.close()
    summary["wall_s"] = round(time.monotonic() - started, 1)
    return summary


def parse_args(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    args = p.parse_args(argv)
    unknown = set(args.faults or []) - {k for k, _ in FAULTS}
    if unknown or args.faults == []:
        p.error(f"--faults: unknown kinds {sorted(unknown)}; known: {', '.join(k for k, _ in FAULTS)}")
    if args.faults is not None and not fault_kinds(args.faults, args.celery):
        p.error(f"--faults: {', '.join(args.faults)} need --celery")
    unknown = set(args.dags or []) - {d for d, _ in DAG_MIX}
    if unknown or args.dags == []:
        p.error(f"--dags: unknown pipelines {sorted(unknown)}; known: {', '.join(d for d, _ in DAG_MIX)}")
    if args.runs < 1:
        p.error("--runs must be at least 1")
    if args.concurrency < 1:
        p.error("--concurrency must be at least 1")
    return args


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
    p.add_argument("--dags", type=lambda v: [d for d in v.split(",") if d], default=None, metavar="DAG,DAG",
                   help="only these pipelines (default: all: " + ", ".join(d for d, _ in DAG_MIX)
                   + "; with --short: " + ", ".join(SHORT_DAGS) + ")")
    p.add_argument("--celery", action="store_true",
                   help="the distributed path: CeleryExecutor with the local Redis broker (127.0.0.1:6379), "
                        "liftoff's state store in PostgreSQL, and the worker's kill -9 as a fault")
    p.add_argument("--concurrency", type=int, default=4, help="the Celery worker's slots (with --celery)")
    p.add_argument("--octet", type=int, default=int(os.environ.get("LIFTOFF_SOAK_LAB_OCTET", DEFAULT_OCTET)))
    p.add_argument("--install-seconds", type=float, default=0.3)
    p.add_argument("--json", metavar="FILE", help="also write the summary there")
    p.add_argument("--tmp", metavar="DIR", help="working directory (default: a new temporary one)")
    args = parse_args(p, argv)
    tmp = Path(args.tmp) if args.tmp else Path(tempfile.mkdtemp(prefix=f"liftoff-soak-{args.seed}-"))
    tmp.mkdir(parents=True, exist_ok=True)
    # a SIGTERM (a caller's timeout, Ctrl-C's sibling) takes the lab and Airflow down on the way out
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
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
