"""deploy_production's optional approval is Airflow's human-in-the-loop ApprovalOperator:
through a real scheduler and api-server the run parks in ``awaiting_input`` until a release
manager answers; Approve goes on to stage 7, Reject fails the run before anything changes.
``liftoff approve``/``reject`` answer it through the same API, and a second answer says who
answered first (Airflow's 409)."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator

import pytest

from liftoff.chatops import cli
from liftoff.chatops.api import AirflowClient, ApiError, Credentials
from tests.airflow_stack import Stack, airflow_stack
from tests.labkit import running_lab

pytestmark = [pytest.mark.airflow, pytest.mark.lab]
OCTET = 53
VERSION = "17.7.0+rnightly.3001.abcdef3-0"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_lab(tmp_path_factory.mktemp("approval-lab"), OCTET, "--install-seconds", "0.2") as lab:
        lab.build_add(VERSION, nightly=True)
        with airflow_stack(tmp_path_factory.mktemp("approval-airflow"), lab.env) as stack:
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
    assert states["stage_7_production_gitaly.canary_weight_up"] in ("upstream_failed", "skipped", None)


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
