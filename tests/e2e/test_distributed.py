"""deploy_canary on the distributed topology without Docker: a real api-server, scheduler,
dag-processor, triggerer and Celery worker as separate processes (tests/airflow_stack.py,
``executor="celery"``), the metadata DB, the Celery result backend and liftoff's state store on
the local PostgreSQL, the local Redis (127.0.0.1:6379) as the broker; a lab of its own (octet
52, ``LIFTOFF_DISTRIBUTED_LAB_OCTET``) with six staging web hosts and one second per install,
so the staging fleet stage lasts long enough to kill things in it.

1. A good nightly build end to end over REST: success; every quiet period waits deferred in the
   triggerer, while the Celery worker runs nothing and no task instance is running.
2. The scheduler and the worker are killed (-9) in the middle of the staging fleet stage and
   started again. Airflow adopts the orphaned task and fails it once its heartbeat times out;
   the run halts, and ``liftoff retry`` (a clear through the REST API) resumes the stage. The
   run ends success with every host on the build, every server UP and READY on every LB, and
   no drain record left.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from liftoff.store import Store
from tests.airflow_stack import Stack, airflow_stack
from tests.labkit import Lab, running_lab

pytestmark = [pytest.mark.airflow, pytest.mark.lab]
# The canary judge's branch: no person is asked when it passes (or is off), so this is skipped.
DECIDED = {"stage_6_canary_fleet.canary_decision"}

OCTET = int(os.environ.get("LIFTOFF_DISTRIBUTED_LAB_OCTET", "52"))
DAG = "deploy_canary"
GOOD = "17.9.0+rnightly.5201.abc5201-0"
KILLED = "17.9.0+rnightly.5202.abc5202-0"
STAGE = "stage_3_staging_fleet"
DEPLOY = f"{STAGE}.deploy"
ENVS = ("gstg", "gprd-cny")
FLEET_ROLES = ("web", "api", "git", "sidekiq")
# The console script pyproject.toml declares (installed by `make setup`).
LIFTOFF = [str(Path(sys.executable).parent / "liftoff")]
# Short enough that a dead worker's task and a dead scheduler are noticed within seconds.
TUNING = {
    "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "20",
    "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "2",
    "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_THRESHOLD": "10",
    "AIRFLOW__SCHEDULER__ORPHANED_TASKS_CHECK_INTERVAL": "5",
}
# What the scheduler logs when it recovers on its own (Airflow 3.3 and the Celery provider).
RECOVERY_LOGS = {
    "scheduler jobs marked failed": "SchedulerJob instances as failed",
    "tasks adopted from a dead executor": "Adopted the following",
    "orphaned tasks reset": "orphaned TaskInstances",
    "heartbeat timeouts": "Detected a task instance without a heartbeat",
}
FIGURES: dict[str, object] = {}


@pytest.fixture(scope="module")
def lab_stack(tmp_path_factory: pytest.TempPathFactory,
              request: pytest.FixtureRequest) -> Iterator[tuple[Lab, Stack]]:
    with running_lab(tmp_path_factory.mktemp("distributed-lab"), OCTET, "--install-seconds", "1",
                     "--hosts", "gstg:web=6") as lab:
        with airflow_stack(tmp_path_factory.mktemp("distributed-airflow"), {**lab.env, **TUNING},
                           executor="celery", concurrency=4) as stack:
            stack.wait_until_dag_parsed(DAG)
            lab.wait_for("the Celery worker", lambda: stack.celery("ping", limit=1), 120)
            yield lab, stack
        assert stack.leftovers() == [], "the airflow stack left something behind"
        capture = request.config.pluginmanager.getplugin("capturemanager")
        with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
            print("\ndistributed: " + "; ".join(f"{k}: {v}" for k, v in FIGURES.items()))


def hosts(lab: Lab, env: str) -> dict[str, dict]:
    return {h["name"]: h for h in lab.status()["environments"][env]["hosts"]}


def servers_not_ready(lab: Lab) -> list[str]:
    """Every server of every LB that is not UP (``show stat``) and READY (``show servers
    state``: operational state 2, administrative state 0), one line each."""
    bad = []
    for lb in lab.topology.lbs:
        text = lab.haproxy(lb.name, "show stat").strip().splitlines()
        for row in csv.DictReader(io.StringIO("\n".join([text[0][2:], *text[1:]]))):
            if row["svname"] not in ("FRONTEND", "BACKEND") and not row["status"].startswith("UP"):
                bad.append(f"{lb.name} {row['pxname']}/{row['svname']}: {row['status']}")
        lines = lab.haproxy(lb.name, "show servers state").strip().splitlines()
        header = lines[1].lstrip("# ").split()
        for line in lines[2:]:
            s = dict(zip(header, line.split(), strict=False))
            if (s["srv_op_state"], s["srv_admin_state"]) != ("2", "0"):
                bad.append(f"{lb.name} {s['be_name']}/{s['srv_name']}: op {s['srv_op_state']} "
                           f"admin {s['srv_admin_state']}")
    assert sum(1 for _ in lab.topology.lbs) == 3
    return bad


def installs(lab: Lab, version: str) -> dict[str, list[int]]:
    """Exit codes of every ``apt-get install`` of ``version``, per host, from labd's audit log."""
    out: dict[str, list[int]] = {}
    for line in Path(lab.config.path("state", "audit.log")).read_text().splitlines():
        fields = line.split("\t")
        if len(fields) >= 5 and "apt-get install" in fields[4] and f"gitlab-ee={version}" in fields[4]:
            out.setdefault(fields[1], []).append(int(fields[2]))
    return out


def assert_on_version(lab: Lab, version: str) -> None:
    for env in ENVS:
        for name, h in hosts(lab, env).items():
            assert h["installed"] == version and h["running"] == version, (env, name, h)


def test_deploy_canary_through_celery_with_deferred_gates(lab_stack):
    lab, stack = lab_stack
    listening = stack.listening()
    assert listening and all(a.startswith("127.") for a in listening), listening
    assert stack.state_url and stack.state_url.startswith("postgresql")
    lab.build_add(GOOD, nightly=True)

    started = time.monotonic()
    run_id = stack.trigger(DAG, {"version": GOOD, "quiet_period_seconds": 10})["dag_run_id"]
    # Per quiet-period task instance: one sample per poll while it is deferred.
    samples: dict[str, list[dict]] = {}
    # Control: task instances seen running in Airflow and, at that moment, in the worker's
    # active Celery tasks (so the "not in the worker" check below can see a task there).
    on_worker: set[str] = set()
    state = None
    deadline = time.monotonic() + 1200  # ceilings: 254-605 s seen on 2 shared cores
    while time.monotonic() < deadline:
        stack.check_alive()
        state = stack.dag_run(DAG, run_id)["state"]
        if state in ("success", "failed"):
            break
        tis = stack.task_instances(DAG, run_id)
        running_ids = {t["id"]: t["task_id"] for t in tis if t["state"] == "running"}
        if running_ids and len(on_worker) < 3:
            active = str(stack.celery("active", limit=1))
            on_worker.update(task_id for ti_id, task_id in running_ids.items() if ti_id in active)
        for ti in tis:
            if ti["task_id"].endswith(".quiet_period") and ti["state"] == "deferred":
                active = stack.celery("active", limit=1)
                running = stack.running_task_instances(DAG, run_id)
                if stack.task_states(DAG, run_id)[ti["task_id"]] != "deferred":
                    continue  # its trigger fired meanwhile: the worker may be resuming it
                samples.setdefault(ti["task_id"], []).append({
                    "workers": sorted(active), "trigger": ti.get("trigger") or {},
                    "own": ti["id"] in str(active), "active": sum(len(t) for t in active.values()),
                    "running": [t["task_id"] for t in running]})
        time.sleep(0.5)
    FIGURES["good run (s)"] = round(time.monotonic() - started)
    assert state == "success", stack.task_states(DAG, run_id)
    final = stack.task_states(DAG, run_id)
    assert all(final[t] == "success" for t in final if t.startswith("stage_") and t not in DECIDED), final
    assert on_worker, "no running task instance was ever seen among the Celery worker's active tasks"

    # Every stage's quiet period was seen deferred, held by the triggerer (its trigger assigned
    # to a triggerer). The worker may still be wrapping up the task that deferred at the start
    # of the wait, never later; by the last poll of each wait the worker answered with nothing
    # active and no task instance of the run was running: no slot held while waiting.
    quiet = {t for t in final if t.endswith(".quiet_period")}
    assert len(quiet) == 6 and set(samples) == quiet, (sorted(quiet), sorted(samples))
    for task_id, polls in samples.items():
        assert len(polls) >= 3, (task_id, polls)
        assert all(p["trigger"].get("classpath", "").endswith("QuietPeriodTrigger") for p in polls), polls
        assert any(p["trigger"].get("triggerer_id") for p in polls), polls
        own = [p["own"] for p in polls]
        assert own == sorted(own, reverse=True), (task_id, polls)  # once gone, never back
        last = polls[-1]
        assert last["workers"], f"no Celery worker answered while {task_id} was deferred"
        assert last["active"] == 0 and last["running"] == [], (task_id, last)
    FIGURES["deferred polls"] = sum(len(p) for p in samples.values())
    FIGURES["deferred polls with an idle worker"] = sum(
        1 for polls in samples.values() for p in polls if not p["active"] and not p["running"])
    FIGURES["deferred polls with the deferring task still in the worker"] = sum(
        1 for polls in samples.values() for p in polls if p["own"])

    assert_on_version(lab, GOOD)
    assert servers_not_ready(lab) == []
    store = Store(stack.state_url)  # PostgreSQL, written by the tasks on the worker
    try:
        assert store.current_version("gstg") == store.current_version("gprd-cny") == GOOD
        assert store.audit_records(), "no remote command was audited in the state store"
        assert store.drained() == [] and store.list_locks() == []
    finally:
        store.close()


def test_scheduler_and_worker_killed_mid_fleet_stage(lab_stack):
    lab, stack = lab_stack
    lab.build_add(KILLED, nightly=True)
    fleet = [h.name for h in lab.topology.env_hosts("gstg") if h.role in FLEET_ROLES]
    assert len(fleet) >= 10, fleet

    started = time.monotonic()
    conf = {"version": KILLED, "quiet_period_seconds": 2, "on_failure": "halt"}
    run_id = stack.trigger(DAG, conf)["dag_run_id"]

    def mid_stage() -> dict | None:
        """The deploy task while it runs with some, not all, of the staging fleet done."""
        stack.check_alive()
        ti = next(t for t in stack.task_instances(DAG, run_id) if t["task_id"] == DEPLOY)
        assert ti["state"] in (None, "scheduled", "queued", "running"), ti
        if ti["state"] != "running":
            return None
        done = [n for n, h in hosts(lab, "gstg").items() if n in fleet and h["installed"] == KILLED]
        return {"ti": ti, "done": done} if 0 < len(done) < len(fleet) else None

    before = lab.wait_for("the staging fleet deploy half way", mid_stage, 900, interval=0.3)
    killed = {name: len(stack.kill(name)) for name in ("scheduler", "worker")}
    killed_at = time.monotonic()
    store = Store(stack.state_url)
    try:
        drained_at_kill = [(r.env, r.host) for r in store.drained()]
        not_ready_at_kill = servers_not_ready(lab)
        stack.start("scheduler")
        stack.start("worker")
        lab.wait_for("the Celery worker back", lambda: stack.celery("ping", limit=1), 120)

        # What Airflow does by itself: the deploy task's worker is gone, so its heartbeat stops.
        deploy_states: list[str] = []

        def note(_run: dict, states: dict) -> None:
            if not deploy_states or deploy_states[-1] != states.get(DEPLOY):
                deploy_states.append(str(states.get(DEPLOY)))

        state = stack.wait_run(DAG, run_id, timeout=300, interval=1, on_poll=note)
        FIGURES["run ended by itself"] = f"{state}, {round(time.monotonic() - killed_at)}s after the kill"
        cleared: list[str] = []
        if state == "failed":
            states = stack.task_states(DAG, run_id)
            assert states[DEPLOY] == "failed", states
            assert states["halt"] == "success" and states["rollback"] == "skipped", states
            retry = subprocess.run([*LIFTOFF, "retry", run_id, "stage_3", "--dag", DAG], env=stack.cli_env(),
                                   capture_output=True, text=True, timeout=120)
            assert retry.returncode == 0, retry.stdout + retry.stderr
            cleared = [line.split()[0] for line in retry.stdout.splitlines() if line.startswith("  stage_")]
            assert DEPLOY in cleared, retry.stdout
            state = stack.wait_run(DAG, run_id, timeout=900, interval=1)
        assert state == "success", stack.task_states(DAG, run_id)

        scheduler_log = stack.log_text("scheduler")
        FIGURES.update({
            "kill after (s)": round(killed_at - started),
            "fleet hosts done at kill": f"{len(before['done'])}/{len(fleet)}",
            "processes killed": killed,
            "drained at kill": len(drained_at_kill),
            "LB servers not ready at kill": len(not_ready_at_kill),
            "deploy states after restart": " > ".join(deploy_states),
            "needed a clear": bool(cleared),
            "cleared": len(cleared),
            "killed run (s)": round(time.monotonic() - started),
            **{k: scheduler_log.count(v) for k, v in RECOVERY_LOGS.items()},
        })
        final = stack.task_states(DAG, run_id)
        assert all(final[t] == "success" for t in final if t.startswith("stage_") and t not in DECIDED), final
        assert_on_version(lab, KILLED)
        counts = installs(lab, KILLED)
        for name in before["done"]:  # the resumed stage skipped the hosts done before the kill
            assert counts[name] == [0], f"{name} was installed again: {counts[name]}"
        assert servers_not_ready(lab) == []
        assert store.drained() == [] and store.list_locks() == []
    finally:
        store.close()
