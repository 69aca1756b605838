"""The canary judge wired into a stage: judge (held by a deferrable trigger), a person when the
judge cannot say (HITL), the canary weight back to 0 when the run stops on it.

``judgement(pipeline, stage, weight_steps)`` builds, inside the current TaskGroup::

    canary_analysis -> needs_decision -+-> canary_decision (HITL) [-> canary_steps_after_decision] -+
                                       +-> no_decision_needed ----------------------------------+
    -> canary_judged

A person answers ``canary_decision`` in the Airflow UI or with ``liftoff approve RUN --reason R`` /
``liftoff reject RUN``; no answer within :data:`DECISION_TIMEOUT` rejects (abort).
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.providers.standard.operators.hitl import ApprovalOperator
from airflow.sdk import TriggerRule, get_current_context, task
from airflow.sdk.exceptions import AirflowSkipException

from liftoff_airflow.notifiers import ApprovalWaitingNotifier
from liftoff_airflow.operators import CanaryAnalysisOperator

DECISION_TIMEOUT = timedelta(seconds=float(os.environ.get("LIFTOFF_CANARY_DECISION_TIMEOUT_S", "3600")))


def _decision_texts(judge_id: str) -> tuple[str, str]:
    judged = f"(ti.xcom_pull(task_ids='{judge_id}') or {{}})"
    subject = f"Canary analysis: {{{{ {judged}.get('results', [{{}}])[-1].get('verdict', '?') }}}}: continue?"
    minutes = DECISION_TIMEOUT.total_seconds() / 60
    body = (
        f"{{% set judged = {judged} %}}"
        "{{ judged.get('sentence', 'the canary judge could not decide') }}\n\n"
        "```\n{{ judged.get('table', '') }}\n```\n\n"
        "**Approve** to go on with the promotion (a later marginal or inconclusive step is accepted, a "
        "fail still aborts). **Reject** aborts: canary weight back to 0 and the run's on_failure. "
        f"No answer within {minutes:g} min rejects."
    )
    return subject, body


@task.branch
def needs_decision(judge_id: str) -> str:
    """A person decides when the judge said marginal or inconclusive."""
    ti = get_current_context()["ti"]
    group = ti.task_id.rsplit(".", 1)[0] + "." if "." in ti.task_id else ""
    judged = ti.xcom_pull(task_ids=judge_id) or {}
    return f"{group}canary_decision" if judged.get("decision") == "ask" else f"{group}no_decision_needed"


@task(trigger_rule=TriggerRule.ONE_FAILED)
def canary_weight_back(pipeline: str, watched: list[str], env: str = "gprd-cny") -> dict:
    """The run stopped on the canary (a failed judgement, a rejected or unanswered decision):
    canary weight 0 on every production LB, when this run had raised it."""
    from liftoff.canary import apply_weight
    from liftoff_airflow.dagkit import run_handle

    raised = [w for w in get_current_context()["ti"].xcom_pull(task_ids=watched, key="weight_raised") or []
              if w]
    if not raised:
        raise AirflowSkipException("this run did not raise the canary weight")
    return apply_weight(run_handle(pipeline), 0, canary_env=env, force=True)


def judgement(pipeline: str, stage: str, weight_steps: bool) -> tuple[Any, Any, list[Any]]:
    """The stage's judge tasks (inside the current TaskGroup): (first, last, the tasks whose
    failure must set the canary weight back to 0: :func:`canary_weight_back`)."""
    judge = CanaryAnalysisOperator(task_id="canary_analysis", pipeline=pipeline, stage=stage,
                                   weight_steps=weight_steps)
    subject, body = _decision_texts(judge.task_id)
    decision = ApprovalOperator(
        task_id="canary_decision", subject=subject, body=body, defaults="Reject", fail_on_reject=True,
        execution_timeout=None, response_timeout=DECISION_TIMEOUT, notifiers=[ApprovalWaitingNotifier()])
    none = EmptyOperator(task_id="no_decision_needed")
    judged = EmptyOperator(task_id="canary_judged", trigger_rule=TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS)
    judge >> needs_decision(judge.task_id) >> [decision, none]
    watched = [judge, decision]
    if weight_steps:
        resume = CanaryAnalysisOperator(task_id="canary_steps_after_decision", pipeline=pipeline, stage=stage,
                                        weight_steps=True, resume_from=judge.task_id)
        decision >> resume >> judged
        watched.append(resume)
    else:
        decision >> judged
    none >> judged
    return judge, judged, watched


def require_judge_passed(judge_id: str) -> None:
    """Inside a task with the canary Asset outlet: skip it (no Asset event, no auto-promotion)
    unless the stage's judge passed on its own, or was off."""
    judged = get_current_context()["ti"].xcom_pull(task_ids=judge_id) or {}
    if judged.get("dry_run"):
        raise AirflowSkipException("dry run: nothing was judged")
    if judged.get("enabled") is False or judged.get("passed"):
        return
    raise AirflowSkipException("the canary judge did not pass on its own (a person decided): "
                               "no auto-promotion")
