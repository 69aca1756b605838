"""Promotion on evidence on a real lab (octet 78, ``LIFTOFF_JUDGE_E2E_LAB_OCTET``): the canary
judge inside deploy_canary's stage 6 and deploy_production's stage 7, through ``dag.test()``
(the hold between steps is Airflow's TimeDeltaTrigger, run inline).

The lab's user traffic (20 requests a second per front end; the canary's with its cookie)
reaches canary and main; Prometheus scrapes every second. The judge is turned on in the lab's
inventory (``extra.analysis.enabled``; steps 5 -> 25, each held 20 s). A healthy canary passes
stage 6 at weight 0 and both stage 7 steps; a build answering 2% of requests with HTTP 500 on
canary only (below every alert rule) fails stage 7's first step and the canary weight is back to
0 on every LB; with too little traffic for a judgement the run stops at the first step for a
person (the HITL branch).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.labkit import Lab, canary_weights, dags_on, running_lab, wait_for

pytestmark = [pytest.mark.lab, pytest.mark.airflow]

OCTET = int(os.environ.get("LIFTOFF_JUDGE_E2E_LAB_OCTET", "78"))
BASE = "17.5.0-ee.0"
BAD = "17.5.1-ee.0"  # 2% of its requests fail: no alert rule fires on it
SETTLED_S = 32  # a judgement window (20 s) and its rate window (10 s) of samples, scraped each second
STEPS = "stage_7_production_gitaly"
DECIDING = [f"{STEPS}.{t}"
            for t in ("canary_analysis", "needs_decision", "canary_decision", "no_decision_needed")]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with running_lab(tmp_path_factory.mktemp("judge-lab"), OCTET, "--install-seconds", "0.2",
                     "--traffic-rps", "20", "--chef-interval", "1") as lab:
        set_analysis(lab, enabled=True)
        yield lab


@pytest.fixture(scope="module")
def dags(airflow_db, lab: Lab) -> Iterator[dict]:
    with dags_on(lab) as dags:
        mp = pytest.MonkeyPatch()
        for name, value in lab.env.items():  # the tasks run in this process: the lab's settings
            mp.setenv(name, value)
        mp.delenv("LIFTOFF_STATE_URL", raising=False)
        try:
            yield dags
        finally:
            mp.undo()


def set_analysis(lab: Lab, **changes) -> None:
    path = Path(lab.env["LIFTOFF_INVENTORY"])
    data = yaml.safe_load(path.read_text())
    data["environments"]["gprd-cny"]["extra"]["analysis"].update(changes)
    path.write_text(yaml.safe_dump(data))


def run(dags: dict, dag_id: str, only: list[str], conf: dict):
    dag = dags[dag_id].partial_subset(task_ids=only, include_upstream=False, include_downstream=False)
    dag_run = dag.test(run_conf={"requested_by": "tester", **conf})
    return dag_run, {ti.task_id: ti for ti in dag_run.get_task_instances()}


def scraped_for(lab: Lab, selector: str, seconds: int) -> bool:
    result = lab.prometheus_query(f"count_over_time({selector}[{seconds}s])")
    return bool(result) and min(float(r["value"][1]) for r in result) >= seconds - 2


def analyses(run_id: str):
    from liftoff.store import Store

    store = Store.from_settings()
    try:
        return store.analyses(run_id)
    finally:
        store.close()


def promote_conf() -> dict:
    return {"version": BASE, "override_reason": "judge e2e", "approval": False, "dry_run": False,
            "on_failure": "halt"}


def test_a_healthy_canary_passes_stage_6_at_weight_0_and_every_stage_7_step(lab: Lab, dags: dict):
    lab.wait_for("a window of canary traffic in Prometheus",
                 lambda: scraped_for(lab, 'up{job="app",env=~"gprd|gprd-cny",role="web"}', SETTLED_S),
                 timeout=90, interval=1)
    stage6, tis = run(dags, "deploy_canary", ["stage_6_canary_fleet.canary_weight_zero",
                                              "stage_6_canary_fleet.canary_analysis"],
                      {"version": BASE, "dry_run": False})
    judge6 = "stage_6_canary_fleet.canary_analysis"
    judged = tis[judge6].xcom_pull(task_ids=judge6)
    assert str(stage6.state) == "success", judged
    assert judged["passed"] is True and [r["weight"] for r in judged["results"]] == [None]
    assert canary_weights(lab) == {0}

    dag_run, tis = run(dags, "deploy_production", DECIDING, promote_conf())
    steps = tis[f"{STEPS}.canary_analysis"].xcom_pull(task_ids=f"{STEPS}.canary_analysis")
    assert str(dag_run.state) == "success", steps
    assert str(tis[f"{STEPS}.canary_decision"].state) == "skipped"
    assert [(r["weight"], r["verdict"]) for r in steps["results"]] == [(5, "pass"), (25, "pass")], steps
    assert str(tis[f"{STEPS}.no_decision_needed"].state) == "success"
    assert canary_weights(lab) == {25}
    records = analyses(dag_run.run_id)
    assert [(r.stage, r.weight, r.verdict, r.decision) for r in records] == [
        ("stage_7", 5, "pass", "next"), ("stage_7", 25, "pass", "next")]
    assert all(r.verdict_data()["requests"]["canary"] >= 40 for r in records)
    back, _ = run(dags, "canary_weight", ["set_weight"], {"weight": 0, "force": False})  # as a person would
    assert str(back.state) == "success" and canary_weights(lab) == {0}


def test_a_canary_worse_than_main_below_every_alert_fails_the_first_step_and_returns_to_weight_0(
        lab: Lab, dags: dict):
    lab.build_add(BAD, error_rate=0.02)
    out = lab.ssh(lab.topology.deploy_node("gprd-cny").name, f"gitlab-chef-role set-version {BAD}")
    assert out.returncode == 0, out.stderr
    lab.wait_for(f"a window of {BAD} samples in Prometheus",
                 lambda: scraped_for(lab, f'gitlab_build_info{{env="gprd-cny",role="web",version="{BAD}"}}',
                                     SETTLED_S), timeout=120, interval=1)
    assert not lab.alerts(env="gprd-cny")  # too small for any alert rule
    dag_run, tis = run(dags, "deploy_production", [f"{STEPS}.canary_analysis", "canary_weight_back"],
                       promote_conf())
    assert str(tis[f"{STEPS}.canary_analysis"].state) == "failed"
    assert str(tis["canary_weight_back"].state) == "success"
    assert canary_weights(lab) == {0}
    [record] = analyses(dag_run.run_id)
    assert (record.stage, record.weight, record.verdict, record.decision) == ("stage_7", 5, "fail", "abort")
    highs = {n for n, m in record.verdict_data()["metrics"].items() if m["classification"] == "high"}
    assert highs and highs <= {"error_ratio_web", "error_ratio_api"}, record.verdict_json
    from liftoff.store import Store

    store = Store.from_settings()
    try:
        reason = store.step_failures(dag_run.run_id)[f"{STEPS}.canary_analysis"]
    finally:
        store.close()
    assert reason.startswith("canary analysis of gprd-cny (stage_7 at canary weight 5): fail (score ")
    assert reason.endswith("canary weight set back to 0")


def answer_when_asked(dag_id: str, task_id: str, option: str, who: str = "oncall-rm") -> threading.Thread:
    """A person, from outside the run: once the HITL task waits for input, record the answer and
    resume the task as Airflow's API does (PATCH .../hitlDetails) on the shared metadata DB."""
    from airflow._shared.timezones import timezone
    from airflow.models.hitl import HITLDetail, HITLUser
    from airflow.models.taskinstance import TaskInstance
    from airflow.models.trigger import handle_event_submit
    from airflow.triggers.base import TriggerEvent
    from airflow.utils.session import create_session
    from airflow.utils.state import TaskInstanceState
    from sqlalchemy import select

    def answer() -> bool:
        with create_session() as session:
            ti = session.scalars(select(TaskInstance).where(
                TaskInstance.dag_id == dag_id, TaskInstance.task_id == task_id,
                TaskInstance.state == TaskInstanceState.AWAITING_INPUT)).first()
            detail = None if ti is None else session.scalars(
                select(HITLDetail).where(HITLDetail.ti_id == ti.id)).first()
            if detail is None:
                return False
            detail.responded_by = HITLUser(id=who, name=who)
            detail.responded_at = timezone.utcnow()
            detail.chosen_options = [option]
            detail.params_input = {}
            session.add(detail)
            handle_event_submit(TriggerEvent(detail.as_resume_event_payload()), task_instance=ti,
                                session=session)
            asked.append(detail.subject)
            return True

    def attempt() -> bool:
        try:
            return answer()
        except Exception as exc:  # a DB busy with the run: tried again; the last error is kept
            errors[:] = [f"{type(exc).__name__}: {exc}"]
            return False

    def person() -> None:
        try:
            wait_for(f"{task_id} waiting for input", attempt, 240, 0.5)
        except BaseException as exc:  # never answered: fail the task so that dag.test() ends
            errors.append(str(exc))
            with create_session() as session:
                for ti in session.scalars(select(TaskInstance).where(
                        TaskInstance.dag_id == dag_id, TaskInstance.task_id == task_id,
                        TaskInstance.state == TaskInstanceState.AWAITING_INPUT)):
                    ti.state = TaskInstanceState.FAILED

    asked: list[str] = []
    errors: list[str] = []
    thread = threading.Thread(target=person, daemon=True)
    thread.asked = asked  # type: ignore[attr-defined]
    thread.errors = errors  # type: ignore[attr-defined]
    thread.start()
    return thread


def test_too_little_traffic_is_inconclusive_waits_for_a_person_and_a_rejection_returns_to_weight_0(
        lab: Lab, dags: dict):
    set_analysis(lab, min_requests=10_000_000)  # a night without traffic
    person = answer_when_asked("deploy_production", f"{STEPS}.canary_decision", "Reject")
    try:
        dag_run, tis = run(dags, "deploy_production", [*DECIDING, "canary_weight_back"], promote_conf())
    finally:
        set_analysis(lab, min_requests=40)
    person.join(timeout=10)
    assert not person.errors, person.errors
    steps = tis[f"{STEPS}.canary_analysis"].xcom_pull(task_ids=f"{STEPS}.canary_analysis")
    assert steps["decision"] == "ask" and steps["index"] == 0
    assert "inconclusive" in steps["sentence"] and "requests" in steps["sentence"]
    assert str(tis[f"{STEPS}.no_decision_needed"].state) == "skipped"
    assert person.asked == ["Canary analysis: inconclusive: continue?"]
    assert str(tis[f"{STEPS}.canary_decision"].state) == "failed"  # rejected: the run stops
    assert str(tis["canary_weight_back"].state) == "success" and canary_weights(lab) == {0}
    [record] = analyses(dag_run.run_id)
    assert (record.weight, record.verdict, record.decision) == (5, "inconclusive", "ask")
