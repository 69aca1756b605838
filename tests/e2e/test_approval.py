"""deploy_production's optional approval is Airflow's human-in-the-loop ApprovalOperator:
through a real scheduler and api-server the run parks in ``awaiting_input`` until a release
manager answers; Approve goes on to stage 7, Reject fails the run before anything changes.
``liftoff approve``/``reject`` answer it through the same API, and a second answer says who
answered first (Airflow's 409).

GitLab's production checks with a person in the loop, on the same stack and lab (its clock a
Saturday, ``LIFTOFF_CLOCK``; octet ``LIFTOFF_APPROVAL_E2E_LAB_OCTET``): an S2 incident on the
lab GitLab and the weekly change lock (on a Saturday) block the promotion and ask the on-call
group (the inventory's ``on_call``); an answer from a user outside it is refused (403); a
rejection ends the run before any stage, no host changed; the on-call's emergency approval with
a reason lets the promotion go on, recorded in the state store and the lock history (the
non-interactive override, ``allow_precheck_failure``, is what the approval tests above use).
``liftoff freeze``/``unfreeze`` go through the lock DAG into the state store and the status."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import gitlab
import pytest
import requests
import yaml

from lab.gitlab_api import PRODUCTION_PROJECT_PATH
from liftoff.chatops import cli
from liftoff.chatops.api import AirflowClient, ApiError, Credentials
from liftoff.checks import WEEKLY_LOCK_SENTENCE
from liftoff.store import Store
from tests.airflow_stack import Stack, airflow_stack
from tests.labkit import Lab, running_lab

pytestmark = [pytest.mark.airflow, pytest.mark.lab]
OCTET = int(os.environ.get("LIFTOFF_APPROVAL_E2E_LAB_OCTET", "55"))
VERSION = "17.7.0+rnightly.3001.abcdef3-0"
ON_CALL = "oncall-ada"


def next_saturday_noon(now: datetime | None = None) -> str:
    """The stack's clock: noon UTC of the next Saturday, always ahead of the real clock (a fixed
    date would fall behind it, and the freezes made on the stack's clock would have ended)."""
    now = now or datetime.now(UTC)
    day = now.date() + timedelta(days=(5 - now.weekday()) % 7 or 7)
    return datetime(day.year, day.month, day.day, 12, tzinfo=UTC).isoformat()


SATURDAY = next_saturday_noon()


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with running_lab(tmp_path_factory.mktemp("approval-lab"), OCTET, "--install-seconds", "0.2") as lab:
        lab.build_add(VERSION, nightly=True)
        yield lab


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, lab: Lab) -> Iterator[Stack]:
    # a second user, the on-call engineer; the checks' clock on a Saturday (the change lock is
    # off in the inventory until a test turns it on)
    env = {**lab.env, "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"admin:admin,{ON_CALL}:user",
           "LIFTOFF_CLOCK": SATURDAY}
    with airflow_stack(tmp_path_factory.mktemp("approval-airflow"), env) as stack:
        stack.wait_until_dag_parsed("deploy_production")
        yield stack


def promote(stack: Stack) -> str:
    conf = {"version": VERSION, "dry_run": True, "approval": True, "quiet_period_seconds": 1,
            "override_reason": "approval test, canary not deployed",
            "allow_precheck_failure": "approval test, canary not deployed"}
    return stack.trigger("deploy_production", conf)["dag_run_id"]


def wait_for_state(stack: Stack, run_id: str, task_id: str, state: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = stack.task_states("deploy_production", run_id)
        if states.get(task_id) == state:
            return
        time.sleep(1)
    pytest.fail(f"{task_id} never reached {state}: {stack.task_states('deploy_production', run_id)}")


def answer(stack: Stack, run_id: str, option: str) -> None:
    path = f"/dags/deploy_production/dagRuns/{run_id}/taskInstances/approval/-1/hitlDetails"
    cli.settle(stack.request("GET", path).json())  # as the CLI: Airflow 3.3.2 races a too-quick answer
    stack.request("PATCH", path, {"chosen_options": [option], "params_input": {}})


def test_approve_goes_on_to_production(stack: Stack):
    run_id = promote(stack)
    wait_for_state(stack, run_id, "approval", "awaiting_input")
    assert stack.task_states("deploy_production", run_id).get("stage_7_production_gitaly.precheck") is None
    answer(stack, run_id, "Approve")
    assert stack.wait_run("deploy_production", run_id, timeout=300) == "success"
    assert stack.task_states("deploy_production", run_id)["stage_9_post_deployment_migrations.finish_env"] \
        == "success"


def test_reject_fails_the_run_before_any_stage(stack: Stack):
    run_id = promote(stack)
    wait_for_state(stack, run_id, "approval", "awaiting_input")
    answer(stack, run_id, "Reject")
    state = stack.wait_run("deploy_production", run_id, timeout=300)
    states = stack.task_states("deploy_production", run_id)
    assert state == "failed"
    assert states["approval"] == "failed"
    assert not [t for t, s in states.items()
                if t.startswith("stage_7") and s not in ("upstream_failed", "skipped", None)], states


def liftoff(stack: Stack, *argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(list(argv), env=stack.cli_env(), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def test_cli_approve_goes_on_and_a_second_answer_says_who_answered(stack: Stack):
    run_id = promote(stack)
    wait_for_state(stack, run_id, "approval", "awaiting_input")
    code, out, err = liftoff(stack, "approve", run_id, "--reason", "e2e CLI approval")
    assert (code, err) == (0, ""), out
    assert out.startswith("approved: Promote ") and f"task approval) as {stack.user}" in out
    assert "  reason: e2e CLI approval" in out.splitlines()
    code, _, err = liftoff(stack, "approve", run_id, "--reason", "again")
    assert code == 5
    assert f"deploy_production: already answered by {stack.user}: Approve at " in err
    client = AirflowClient(Credentials.from_env(stack.cli_env()))
    detail = client.hitl_detail("deploy_production", run_id, "approval")
    state = stack.wait_run("deploy_production", run_id, timeout=300)
    assert state == "success", (detail.get("params"), stack.task_states("deploy_production", run_id))
    with pytest.raises(ApiError) as raised:  # Airflow's own 409, as the CLI words it
        cli._send_answer(client, "deploy_production", run_id, detail, "Reject", None)
    assert raised.value.status == 409
    assert str(raised.value).startswith(f"already answered by {stack.user}: Approve at ")


def test_cli_reject_fails_the_run(stack: Stack):
    run_id = promote(stack)
    wait_for_state(stack, run_id, "approval", "awaiting_input")
    code, out, err = liftoff(stack, "reject", run_id, "--reason", "not during the incident")
    assert (code, err) == (0, ""), out
    assert out.startswith("rejected: ")
    assert stack.wait_run("deploy_production", run_id, timeout=300) == "failed"
    assert stack.task_states("deploy_production", run_id)["approval"] == "failed"


# -- GitLab's production checks: a failed check asks the on-call group ---------------------------------

def on_call_env(stack: Stack) -> dict[str, str]:
    """The CLI's environment as the on-call engineer (the api-server generated the password)."""
    password = json.loads((stack.home / "passwords.json").read_text())[ON_CALL]
    return stack.cli_env(LIFTOFF_API_USER=ON_CALL, LIFTOFF_API_PASSWORD=password)


def liftoff_as(env: dict[str, str], *argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(list(argv), env=env, stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


@contextlib.contextmanager
def gprd_extra(lab: Lab, **extra) -> Iterator[None]:
    """The lab inventory's gprd ``extra`` with ``extra`` for the block (tasks read it per run)."""
    path = Path(lab.env["LIFTOFF_INVENTORY"])
    original = path.read_text()
    data = yaml.safe_load(original)
    data["environments"]["gprd"].setdefault("extra", {}).update(extra)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    try:
        yield
    finally:
        path.write_text(original)


def production_issues(lab: Lab):
    conn = json.loads(lab.env["AIRFLOW_CONN_LIFTOFF_OPS_GITLAB"])
    gl = gitlab.Gitlab(conn["host"].rstrip("/"), private_token=conn["password"], timeout=10)
    return gl.projects.get(PRODUCTION_PROJECT_PATH, lazy=True)


def state_store(lab: Lab) -> Store:
    return Store(json.loads(lab.env["AIRFLOW_CONN_LIFTOFF_STATE"])["extra"]["url"])


def checks_request(stack: Stack, run_id: str, task_id: str = "checks_approval") -> dict:
    return stack.get(f"/dags/deploy_production/dagRuns/{run_id}/taskInstances/{task_id}/-1/hitlDetails")


def promote_checked(stack: Stack, **conf) -> str:
    """A promotion whose production checks are not overridden (a failure asks the on-call group)."""
    base = {"version": VERSION, "dry_run": True, "quiet_period_seconds": 1,
            "override_reason": "approval test, canary not deployed"}
    return stack.trigger("deploy_production", {**base, **conf})["dag_run_id"]


def audit_lines(lab: Lab) -> list[str]:
    log = lab.config.path("state", "audit.log")
    return log.read_text().splitlines() if log.exists() else []


CHANGES = ("apt-get", "chef-client", "gitlab-ctl", "gitlab-rake", "gitlab-chef-role", "gitlab-patch")


def changes_since(lab: Lab, mark: int) -> list[str]:
    """Commands the lab's hosts ran after ``mark`` audit lines that change something (the
    checks only read: ``dpkg-query``)."""
    return [line for line in audit_lines(lab)[mark:] if any(c in line for c in CHANGES)]


@pytest.fixture
def blocked_production(lab: Lab) -> Iterator[dict]:
    """An S2 incident open on the lab GitLab and gprd's weekly change lock on (the stack's clock
    is a Saturday), gprd's on-call group in the inventory; all undone after the test."""
    incident = production_issues(lab).issues.create({"title": "Elevated 5xx on API",
                                                     "labels": "incident,severity::2"})
    try:
        with gprd_extra(lab, change_lock="weekly", on_call=[{"id": ON_CALL, "name": "Ada (on call)"}]):
            yield {"incident": f'active severity::2 incident: #{incident.iid} "Elevated 5xx on API"'}
    finally:
        incident.state_event = "close"
        incident.save()


def test_a_failed_check_asks_the_on_call_group_only_and_a_rejection_changes_nothing(
        stack: Stack, lab: Lab, blocked_production: dict):
    mark = len(audit_lines(lab))
    run_id = promote_checked(stack)
    wait_for_state(stack, run_id, "checks_approval", "awaiting_input")
    request = checks_request(stack, run_id)
    assert request["assigned_users"] == [{"id": ON_CALL, "name": "Ada (on call)"}]
    assert blocked_production["incident"] in request["body"] and WEEKLY_LOCK_SENTENCE in request["body"]
    assert stack.task_states("deploy_production", run_id).get("needs_approval") is None
    # the release manager (admin) is not on call: Airflow refuses (403), the CLI says who may answer
    path = f"/dags/deploy_production/dagRuns/{run_id}/taskInstances/checks_approval/-1/hitlDetails"
    refused = stack.request("PATCH", path, {"chosen_options": ["Approve"], "params_input": {
        "reason": "looks fine to me"}}, ok=(403,))
    assert "is not a respondent for the task" in refused.text
    code, _, err = liftoff(stack, "approve", run_id, "--reason", "looks fine to me")
    assert code == 4 and "you are not among the assigned users: Ada (on call)" in err, err
    code, out, err = liftoff_as(on_call_env(stack), "reject", run_id, "--reason", "not on a Saturday")
    assert (code, err) == (0, ""), out
    assert stack.wait_run("deploy_production", run_id, timeout=300) == "failed"
    states = stack.task_states("deploy_production", run_id)
    assert states["checks_rejected"] == "failed" and states["checks_decided"] == "skipped", states
    assert not [t for t, s in states.items()
                if t.startswith("stage_") and s not in (None, "skipped", "upstream_failed")], states
    assert audit_lines(lab)[mark:], "the checks read nothing from the hosts?"
    assert changes_since(lab, mark) == [], "a rejected promotion changed hosts"


def test_the_on_call_approves_an_emergency_with_a_reason_and_the_promotion_proceeds(
        stack: Stack, lab: Lab, blocked_production: dict):
    run_id = promote_checked(stack)
    wait_for_state(stack, run_id, "checks_approval", "awaiting_input")
    reason = "emergency: this build fixes INC-7, change lock waived"
    code, out, err = liftoff_as(on_call_env(stack), "approve", run_id, "--reason", reason)
    assert (code, err) == (0, ""), out
    assert f"as {ON_CALL}" in out and f"  reason: {reason}" in out.splitlines()
    assert stack.wait_run("deploy_production", run_id, timeout=300) == "success"
    states = stack.task_states("deploy_production", run_id)
    assert states["checks_decided"] == "success" and states["checks_rejected"] == "skipped"
    # before post-deployment migrations the same failures were approved already: nobody is asked again
    assert states["stage_9_post_deployment_migrations.checks_passed"] == "success", states
    assert states["stage_9_post_deployment_migrations.checks_approval"] == "skipped"
    assert states["stage_9_post_deployment_migrations.finish_env"] == "success"
    store = state_store(lab)
    try:
        [approval] = store.check_approvals(run_id=run_id)
        events = [e for e in store.lock_events("gprd")
                  if e.action == "checks_approved" and e.run_id == run_id]
    finally:
        store.close()
    assert (approval.who, approval.reason, approval.step) == (ON_CALL, reason, "promotion")
    assert WEEKLY_LOCK_SENTENCE in approval.failures
    assert any(f.startswith(blocked_production["incident"]) for f in approval.failures), approval.failures
    assert events and events[0].who == ON_CALL and reason in events[0].reason


def test_liftoff_freeze_and_unfreeze_go_through_the_lock_dag(stack: Stack, lab: Lab):
    code, out, err = liftoff(stack, "freeze", "gprd", "--for", "2h", "--reason", "CR-4242 failover",
                             "--watch", "--interval", "1")
    assert (code, err) == (0, ""), out
    store = state_store(lab)
    try:
        [frozen] = [f for f in store.freezes("gprd") if f.reason == "CR-4242 failover"]
        assert frozen.lifted_at is None and frozen.until > frozen.since
        code, out, _ = liftoff(stack, "status", "--no-lbs", "--dag", "deploy_lock")
        assert code == 0 and any(line.startswith("FREEZE gprd ") and line.endswith(": CR-4242 failover")
                                 for line in out.splitlines()), out  # "from ...": the stack's clock is ahead
        code, out, err = liftoff(stack, "unfreeze", "gprd", "--reason", "failover done", "--watch",
                                 "--interval", "1")
        assert (code, err) == (0, ""), out
        [lifted] = [f for f in store.freezes("gprd") if f.id == frozen.id]
        assert lifted.lifted_reason == "failover done" and lifted.lifted_by
    finally:
        store.close()
    assert liftoff(stack, "freeze", "gprd", "--for", "2 fortnights", "--reason", "CR-1 x")[0] == 2


def test_liftoff_traffic_sends_traffic_through_the_traffic_dag(stack: Stack, lab: Lab):
    code, out, err = liftoff(stack, "--json", "traffic", "--env", "gstg", "--rps", "4", "--for", "3s",
                             "--endpoint", "/help", "--watch", "--interval", "1")
    assert (code, err) == (0, ""), out
    run_id = json.loads(out.splitlines()[0])["dag_run_id"]
    assert stack.dag_run("traffic", run_id)["conf"] == {"environments": ["gstg"], "rps": 4.0, "duration_s": 3,
                                                        "endpoints": ["/help"]}
    gateway = f"http://{lab.config.pushgateway_addr}/metrics"
    metrics = requests.get(gateway, timeout=30).text
    sent = [float(m.group(1)) for m in re.finditer(
        r'liftoff_traffic_requests_total\{[^}]*env="gstg"[^}]*job="liftoff_traffic"[^}]*\} (\S+)', metrics)]
    assert sent and sum(sent) >= 4, metrics[:2000]  # about 12 requests: 4 a second for 3 s
    assert liftoff(stack, "traffic", "--rps", "0")[0] == 2

