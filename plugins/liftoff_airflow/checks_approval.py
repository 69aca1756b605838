"""GitLab's production checks with a person in the loop: when a check fails, the run asks the
environment's on-call group (Airflow's human-in-the-loop ``ApprovalOperator``) instead of
failing outright. Approve with a reason -> the run goes on, who, when and why recorded;
reject or no answer before the timeout -> the run ends before anything changed.

Used twice by ``deploy_production``: before the promotion and before post-deployment
migrations (stage 9). :func:`checks_with_approval` builds the steps::

    production_checks -> ask_on_call -> checks_passed ----------------------> checks_decided
                                     -> checks_approval -> Approve ---------> checks_decided
                                                        -> Reject/timeout -> checks_rejected

The request never fails itself: a rejection (or its timeout) goes to ``checks_rejected``,
which first records the run's unfinished deploy of the environment as ``halted`` (so the
failure handling that follows has nothing to roll back: the hosts stay as they are) and
then fails the run with the failing checks in one sentence.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.providers.standard.operators.hitl import HITLBranchOperator, HITLOperator
from airflow.sdk import Param, TriggerRule, get_current_context, task

from liftoff_airflow import dagkit
from liftoff_airflow.notifiers import ApprovalWaitingNotifier

CHECKS_TIMEOUT = timedelta(hours=4)
REASON_PARAM = "reason"


def checks_body(checks_task_id: str, step: str) -> str:
    """The request's Markdown body: the failing checks, one per line (rendered when asked)."""
    what = ("promote this build to production (gitaly, the fleet, then post-deployment migrations)"
            if step == "promotion" else "run the post-deployment migrations (no way back without a reason)")
    return (
        f"{{% set checks = ti.xcom_pull(task_ids='{checks_task_id}') or {{}} %}}"
        "**Production checks failed** on {{ checks.get('env') }} for "
        "{{ checks.get('version') }} at {{ checks.get('checked_at') }}:\n\n"
        "{% for f in checks.get('failures') or [] %}- {{ f }}\n{% endfor %}\n"
        f"Approve (with a reason: who, when and why are recorded and announced) to {what} although "
        "these checks fail; Reject, or no answer within "
        f"{CHECKS_TIMEOUT.total_seconds() / 3600:g} h, ends the run before anything changes."
    )


APPROVE, REJECT = "Approve", "Reject"


class ChecksApprovalOperator(HITLBranchOperator):
    """The production checks' request (Approve or Reject), assigned when it is made to the
    on-call group the checks read from the inventory (environment ``extra.on_call``:
    ``[{id, name}]``); no group configured: anyone allowed to answer the run's requests may.
    A ``reason`` param carries the answer's reason (``liftoff approve RUN --reason R`` fills
    it). The answer is kept in XCom under ``answer``; the run branches to ``approved_task_id``
    or ``rejected_task_id`` (also on timeout, the default being Reject)."""

    def __init__(self, *, checks_task_id: str, step: str, approved_task_id: str, rejected_task_id: str,
                 **kwargs: Any) -> None:
        kwargs.setdefault("subject", f"Production checks failed before the {step.replace('_', '-')}: "
                                     "approve anyway?")
        kwargs.setdefault("body", checks_body(checks_task_id, step))
        kwargs["params"] = {REASON_PARAM: Param(
            "", type="string", maxLength=500, title="Reason",
            description="Why the run may go on although these checks fail (required to approve; recorded "
                        "and announced).")}
        super().__init__(
            options=[APPROVE, REJECT], options_mapping={APPROVE: approved_task_id, REJECT: rejected_task_id},
            defaults=REJECT, multiple=False, execution_timeout=None, response_timeout=CHECKS_TIMEOUT,
            notifiers=[ApprovalWaitingNotifier()], **kwargs)
        self.checks_task_id = checks_task_id
        self.step = step

    def execute(self, context: Any) -> Any:
        checks = context["ti"].xcom_pull(task_ids=self.checks_task_id) or {}
        self.assigned_users = list(checks.get("on_call") or []) or None
        return super().execute(context)

    def execute_complete(self, context: Any, event: dict[str, Any]) -> Any:
        try:
            answer = HITLOperator.execute_complete(self, context=context, event=event)
            chosen = list(answer["chosen_options"])
            kept = {"chosen_options": chosen, "params_input": dict(answer.get("params_input") or {}),
                    "responded_by_user": answer.get("responded_by_user"),
                    "responded_at": str(answer.get("responded_at") or "")}
        except Exception as exc:  # a timeout without an answer, a malformed one: no approval
            self.log.warning("no usable answer (%s: %s): the run does not go on", type(exc).__name__, exc)
            chosen = [REJECT]
            kept = {"chosen_options": chosen, "params_input": {}, "responded_by_user": None,
                    "responded_at": "", "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
        context["ti"].xcom_push(key="answer", value=kept)
        branch = self.options_mapping[APPROVE if chosen == [APPROVE] else REJECT]
        return self.do_branch(context=context, branches_to_execute=[branch])


def checks_with_approval(pipeline: str, env: str, version: Any, step: str, group: str = "") -> tuple:
    """The production checks of ``step`` (``promotion`` or ``post_migrations``) and the request
    to the on-call group when one fails; returns (first task, the task the run goes on after,
    the task that fails the run on a rejection). ``group``: the TaskGroup id the tasks are
    built in (their ids carry it)."""
    prefix = f"{group}." if group else ""
    checks_id, approval_id = f"{prefix}production_checks", f"{prefix}checks_approval"

    @task(task_id="production_checks")
    def production_checks(version: str) -> dict:
        """GitLab's production checks (liftoff.checks.production_checks): a failure asks a person."""
        from liftoff.checks import production_checks as checks

        return checks(dagkit.run_handle(pipeline), version, env_name=env, step=step, ask=True,
                      override_reason=dagkit.params().get("allow_precheck_failure"))

    @task.branch(task_id="ask_on_call")
    def ask_on_call() -> str:
        checks = get_current_context()["ti"].xcom_pull(task_ids=checks_id) or {}
        return approval_id if checks.get("needs_approval") else f"{prefix}checks_passed"

    @task(task_id="checks_decided", trigger_rule=TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS)
    def checks_decided() -> dict:
        """Record the person's approval: who, when, why (state store, lock history, chat)."""
        from liftoff import notify
        from liftoff.checks import approve_checks

        ti = get_current_context()["ti"]
        checks = ti.xcom_pull(task_ids=checks_id) or {}
        answer = ti.xcom_pull(task_ids=approval_id, key="answer") if checks.get("needs_approval") else None
        run = dagkit.run_handle(pipeline)
        result = approve_checks(run, checks, answer)
        if result.get("approved"):
            notify.checks_approved(run, result)
        return result

    @task(task_id="checks_rejected")
    def checks_rejected() -> dict:
        """Rejected or no answer in time: leave everything as it is and end the run."""
        from liftoff.checks import approve_checks
        from liftoff.deploy import mark_failed

        ti = get_current_context()["ti"]
        checks = ti.xcom_pull(task_ids=checks_id) or {}
        answer = ti.xcom_pull(task_ids=approval_id, key="answer") or {}
        run = dagkit.run_handle(pipeline)
        mark_failed(run, [env], "halted")  # nothing for the failure handling to roll back
        approve_checks(run, {**checks, "needs_approval": True}, {**answer, "chosen_options": [REJECT]})
        return {}  # not reached: approve_checks raises PrecheckFailed

    checks = production_checks(version)
    branch = ask_on_call()
    approval = ChecksApprovalOperator(task_id="checks_approval", checks_task_id=checks_id, step=step,
                                      approved_task_id=f"{prefix}checks_decided",
                                      rejected_task_id=f"{prefix}checks_rejected")
    passed = EmptyOperator(task_id="checks_passed")
    decided = checks_decided()
    rejected = checks_rejected()
    checks >> branch >> [approval, passed]
    [approval, passed] >> decided
    approval >> rejected
    return checks, decided, rejected
