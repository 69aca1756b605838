"""deploy_production: promote the build verified on canary to the main fleet (stages 7-9).

Started by a person or ChatOps with the canary's version, or by the canary's Asset event
when auto-promotion is on (``LIFTOFF_AUTO_PROMOTE=true``; off by default; the event comes only
when canary's judge passed on its own). Stage 7 diverts production traffic to canary in weight
steps, each held by a deferrable trigger and judged against the main fleet (pass: next step;
fail: canary weight 0 and on_failure; marginal or inconclusive: a person decides). Production checks
come first (GitLab's: change lock and freeze windows, alerts, locks, LBs, canary up on every
LB, open S1/S2 incidents and change requests in progress, deployment health on Prometheus): a
failed check asks the on-call group (human in the loop, the inventory's ``extra.on_call``) to
approve with a reason or reject, ``allow_precheck_failure`` being the non-interactive override.
Then an optional approval by the release manager. Stage 9's post-deployment migrations are the
point of no return: the production checks run again before them, and after them a rollback
needs a reason.
"""

from __future__ import annotations

import os
from datetime import timedelta

from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.providers.standard.operators.hitl import ApprovalOperator
from airflow.sdk import Param, TaskGroup, TriggerRule, dag, get_current_context, task

from liftoff_airflow import dagkit
from liftoff_airflow.canary_tasks import canary_weight_back, judgement
from liftoff_airflow.checks_approval import checks_with_approval
from liftoff_airflow.dagkit import (
    CANARY_VERIFIED,
    begin_env,
    deploy,
    finish_env,
    gate,
    migrate,
    precheck,
    stage_done,
)
from liftoff_airflow.notifiers import ApprovalWaitingNotifier

PIPELINE = "deploy_production"
VERSION = "{{ ti.xcom_pull(task_ids='resolve_version') }}"
ENVS = ["gprd"]
AUTO_PROMOTE = os.environ.get("LIFTOFF_AUTO_PROMOTE", "").lower() in ("1", "true", "yes")
APPROVAL_TIMEOUT = timedelta(hours=8)
_CHECKS = "(ti.xcom_pull(task_ids='production_checks') or {})"
# The approval's evidence, rendered when the request is made (HITL body: Markdown). QA: canary
# is recorded as verified only after its QA passed (resolve_version refuses another version
# unless override_reason says why).
APPROVAL_SUBJECT = (f"Promote {VERSION} to production (now on "
                    f"{{{{ {_CHECKS}.get('previous_version') or 'unknown' }}}})?")
APPROVAL_BODY = (
    f"{{% set checks = {_CHECKS} %}}"
    "**Version:** {{ ti.xcom_pull(task_ids='resolve_version') }}\n\n"
    "**QA:** {% if params.get('override_reason') %}not verified on canary: promoted with the override "
    "\"{{ params.get('override_reason') }}\"{% else %}passed on canary (canary verified this version)"
    "{% endif %}\n\n"
    "**Canary health and production checks:** {% if checks.get('failures') %}"
    "{{ checks.get('failures') | join('; ') }}"
    "{% if checks.get('overridden') %} (overridden: {{ checks.get('override_reason') }}){% endif %}"
    "{% if checks.get('needs_approval') %} (approved by the on-call group: see checks_decided){% endif %}"
    "{% else %}all production checks passed{% endif %}\n\n"
    "**Production runs now:** {{ checks.get('previous_version') or 'unknown' }}"
    "{% set versions = (checks.get('versions') or {}).values() | list %}"
    "{% if versions %} (hosts: {% for v in versions | map('default', 'unreadable', true) | unique %}"
    "{{ v }} x{{ versions | map('default', 'unreadable', true) | select('equalto', v) | list | length }}"
    "{% if not loop.last %}, {% endif %}{% endfor %}){% endif %}\n\n"
    f"**Times out:** {{{{ macros.time.strftime('%Y-%m-%d %H:%M UTC', macros.time.gmtime(macros.time.time() + "
    f"{int(APPROVAL_TIMEOUT.total_seconds())})) }}}} ({APPROVAL_TIMEOUT.total_seconds() / 3600:g} h after "
    "this request; no answer rejects it)\n\n"
    "Approve to deploy production gitaly, the fleet and post-deployment migrations."
)


@task
def resolve_version() -> str:
    """The version to promote: the param, or the canary's Asset event; it must be the version
    verified on canary unless overridden with a reason."""
    from liftoff import notify
    from liftoff.canary import verified_on_canary

    ctx = get_current_context()
    requested = ctx["params"].get("version")
    if not requested:
        events = ctx.get("triggering_asset_events") or {}
        for asset_events in events.values():
            for event in asset_events:
                requested = (event.extra or {}).get("version") or requested
    if not requested:
        raise ValueError("no version: give one, or trigger from a verified canary")
    run = dagkit.run_handle(PIPELINE)
    version = verified_on_canary(run, requested, ctx["params"].get("override_reason"))
    seen: list = []
    notify.deploy_started(run, version, ENVS, seen=seen)
    dagkit.keep_changes(seen, version, ENVS)
    return version


@task.branch
def needs_approval() -> str:
    return "approval" if dagkit.params().get("approval") else "no_approval_needed"


@dag(
    dag_id=PIPELINE,
    description="Promote the canary-verified build to the production main fleet (stages 7-9)",
    schedule=[CANARY_VERIFIED] if AUTO_PROMOTE else None,
    catchup=False,
    max_active_runs=1,
    default_args=dagkit.DEFAULT_ARGS,
    tags=["liftoff", "deploy", "production"],
    params={
        "version": dagkit.version_param(required=False, when_empty=(
            "Empty when canary's Asset event started the run (auto-promotion): the version canary "
            "verified. A version given must be the one canary verified, unless override_reason says why.")),
        "override_reason": dagkit.reason_param(
            "Override: version not verified on canary (reason)",
            "Promote a version other than the one canary verified; the reason is recorded."),
        "approval": Param(False, type="boolean", title="Ask for approval",
                          description="Wait for a release manager to approve in the Airflow UI."),
        "canary_weight": Param(5, type="integer", minimum=0, maximum=100, title="Canary weight",
                               description="Weight of canary servers in production backends during "
                                           "the promotion (main servers have 100) when the canary "
                                           "judge is off; with it on, the inventory's weight steps "
                                           "(extra.analysis.steps, default 5, 10, 25) are used."),
        **dagkit.COMMON_PARAMS,
    },
    doc_md=__doc__,
)
def deploy_production():
    version = resolve_version()
    checks, checked, asked = checks_with_approval(PIPELINE, "gprd", version, "promotion")
    branch = needs_approval()
    approval = ApprovalOperator(
        task_id="approval",
        subject=APPROVAL_SUBJECT,
        body=APPROVAL_BODY,
        defaults="Reject",
        fail_on_reject=True,
        execution_timeout=None,
        response_timeout=APPROVAL_TIMEOUT,
        notifiers=[ApprovalWaitingNotifier()],
    )
    skip = EmptyOperator(task_id="no_approval_needed")
    approved = EmptyOperator(task_id="approved", trigger_rule=TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS)
    version >> checks
    checked >> branch >> [approval, skip] >> approved

    with TaskGroup("stage_7_production_gitaly") as s7:
        # Divert production traffic to canary in the inventory's weight steps, each held and
        # judged against the main fleet (a person decides a marginal or inconclusive step).
        _, judged, watched = judgement(PIPELINE, "stage_7", weight_steps=True)
        check = precheck(PIPELINE, "gprd", version)
        begin = begin_env(PIPELINE, "gprd", version, check)
        first, quiet = gate("gprd", VERSION, qa=True, expect_version=False)
        judged >> check
        begin >> deploy(PIPELINE, "gprd", version, "gitaly") >> first
        quiet >> stage_done(PIPELINE, "gprd", "stage_7", check)

    with TaskGroup("stage_8_production_fleet") as s8:
        check = precheck(PIPELINE, "gprd", version)
        first, quiet = gate("gprd", VERSION, qa=True)
        check >> deploy(PIPELINE, "gprd", version, "fleet") >> first
        quiet >> stage_done(PIPELINE, "gprd", "stage_8", check)

    with TaskGroup("stage_9_post_deployment_migrations") as s9:
        # GitLab's production checks again: post-deployment migrations are the point of no return
        first_check, post_checked, post_asked = checks_with_approval(
            PIPELINE, "gprd", version, "post_migrations", group="stage_9_post_deployment_migrations")
        check = precheck(PIPELINE, "gprd", version)
        work = migrate.override(task_id="post_migrations")(PIPELINE, "gprd", version, True)
        _, quiet = gate("gprd", VERSION, qa=False)
        post_checked >> check >> work >> quiet >> finish_env(PIPELINE, "gprd", version)
        quiet >> stage_done(PIPELINE, "gprd", "stage_9", check)

    approved >> s7 >> s8 >> s9
    end = dagkit.failure_handling(PIPELINE, ENVS, [version, checks, asked, checked, approval, s7, s8, s9])
    s9 >> end
    watched >> canary_weight_back(PIPELINE, [t.task_id for t in watched]) >> end


deploy_production()
