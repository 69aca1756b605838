"""deploy_production's optional approval is Airflow's human-in-the-loop ApprovalOperator:
through a real scheduler and api-server the run parks in ``awaiting_input`` until a release
manager answers; Approve goes on to stage 7, Reject fails the run before anything changes."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

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
    stack.request("PATCH", f"/dags/deploy_production/dagRuns/{run_id}/taskInstances/approval/-1/"
                           "hitlDetails", {"chosen_options": [option], "params_input": {}})


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
