"""deploy_canary: nightly builds through staging and the production canary (stages 1-6).

Each stage: a precheck that fails closed, the work, QA where the design says, then an
alert quiet period (deferred: no worker slot while waiting). A failed gate branches to
rollback or halt (param ``on_failure``); the run then ends failed with its locks released.
Stage 6 ends with the canary judge (liftoff.analysis) on the synthetic traffic; a marginal or
inconclusive judgement asks a person. A verified canary emits the ``liftoff://canary-verified``
Asset event with the version only when the judge passed on its own (auto-promotion).
"""

from __future__ import annotations

from airflow.sdk import Metadata, TaskGroup, dag, get_current_context, task
from airflow.sdk.exceptions import AirflowSkipException

from liftoff_airflow import dagkit
from liftoff_airflow.canary_tasks import judgement
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

PIPELINE = "deploy_canary"
VERSION = "{{ ti.xcom_pull(task_ids='resolve_version') }}"
ENVS = ["gstg", "gprd-cny"]
JUDGE = "stage_6_canary_fleet.canary_analysis"


@task
def resolve_version() -> str:
    """The version to deploy (newest nightly on a scheduled run); refused while a
    post-deployment patch halts canary deploys."""
    from liftoff import notify
    from liftoff.builds import resolve_version as resolve
    from liftoff.patches import check_halt

    ctx = get_current_context()
    run = dagkit.run_handle(PIPELINE)
    version = resolve(run, ctx["params"].get("version"), ctx["dag_run"].run_type == "scheduled")
    check_halt(run, version)
    seen: list = []
    notify.deploy_started(run, version, ENVS, seen=seen)
    dagkit.keep_changes(seen, version, ENVS)
    return version


@task
def canary_weight_zero() -> dict:
    """No production traffic on canary while it is deployed."""
    from liftoff.canary import apply_weight

    if dagkit.params()["dry_run"]:
        return {"dry_run": True, "weight": 0}
    return apply_weight(dagkit.run_handle(PIPELINE), 0)


@task
def canary_verified(version: str) -> dict:
    """Lift the halts of patches this build includes (never for a dry run)."""
    from liftoff import notify
    from liftoff.patches import lift_halts_included

    if dagkit.params()["dry_run"]:
        raise AirflowSkipException("dry run: nothing was verified")
    run = dagkit.run_handle(PIPELINE)
    lifted = lift_halts_included(run, version)
    notify.canary_verified(run, version, lifted)
    return {"version": version, "halts_lifted": lifted}


@task(outlets=[CANARY_VERIFIED])
def canary_promotable(version: str):
    """Emit the Asset event that may start deploy_production (auto-promotion) only when the
    canary judge passed on its own (or is off); skipped when a person had to decide."""
    from liftoff_airflow.canary_tasks import require_judge_passed

    require_judge_passed(JUDGE)
    yield Metadata(CANARY_VERIFIED, extra={"version": version})


@dag(
    dag_id=PIPELINE,
    description="Nightly builds to staging and the production canary (stages 1-6)",
    schedule=dagkit.schedule_from_env("LIFTOFF_CANARY_CRON", "0 2 * * *"),
    catchup=False,
    max_active_runs=1,
    default_args=dagkit.DEFAULT_ARGS,
    tags=["liftoff", "deploy", "canary"],
    params={"version": dagkit.version_param(required=False), **dagkit.COMMON_PARAMS},
    doc_md=__doc__,
)
def deploy_canary():
    version = resolve_version()
    stages = []

    with TaskGroup("stage_1_staging_migrations") as s1:
        check = precheck(PIPELINE, "gstg", version)
        work = migrate.override(task_id="regular_migrations")(PIPELINE, "gstg", version, False)
        _, quiet = gate("gstg", VERSION, qa=False)
        check >> begin_env(PIPELINE, "gstg", version, check) >> work >> quiet
        quiet >> stage_done(PIPELINE, "gstg", "stage_1", check)
    stages.append(s1)

    # QA after gitaly checks staging still works: its web fleet runs the old version yet.
    for group_id, stage, roles, expect in (("stage_2_staging_gitaly", "stage_2", "gitaly", False),
                                           ("stage_3_staging_fleet", "stage_3", "fleet", True)):
        with TaskGroup(group_id) as group:
            check = precheck(PIPELINE, "gstg", version)
            first, quiet = gate("gstg", VERSION, qa=True, expect_version=expect)
            check >> deploy(PIPELINE, "gstg", version, roles) >> first
            quiet >> stage_done(PIPELINE, "gstg", stage, check)
        stages.append(group)

    with TaskGroup("stage_4_staging_post_migrations") as s4:
        check = precheck(PIPELINE, "gstg", version)
        work = migrate.override(task_id="post_migrations")(PIPELINE, "gstg", version, True)
        _, quiet = gate("gstg", VERSION, qa=False)
        check >> work >> quiet >> finish_env(PIPELINE, "gstg", version)
        quiet >> stage_done(PIPELINE, "gstg", "stage_4", check)
    stages.append(s4)

    # Canary shares production's database: production's regular migrations run first.
    with TaskGroup("stage_5_production_migrations") as s5:
        check = precheck(PIPELINE, "gprd", version)
        work = migrate.override(task_id="regular_migrations")(PIPELINE, "gprd-cny", version, False)
        first, quiet = gate("gprd", VERSION, qa=True, expect_version=False)
        check >> begin_env(PIPELINE, "gprd-cny", version, check) >> work >> first
        quiet >> stage_done(PIPELINE, "gprd", "stage_5", check)
    stages.append(s5)

    with TaskGroup("stage_6_canary_fleet") as s6:
        check = precheck(PIPELINE, "gprd-cny", version)
        first, quiet = gate("gprd-cny", VERSION, qa=True)
        # After QA, at weight 0: the judge compares canary with main on the synthetic traffic.
        judge, judged, _ = judgement(PIPELINE, "stage_6", weight_steps=False)
        check >> canary_weight_zero() >> deploy(PIPELINE, "gprd-cny", version, None) >> first
        quiet >> judge
        finished = finish_env(PIPELINE, "gprd-cny", version)  # chef started once the judge passed
        judged >> finished >> canary_verified(version) >> canary_promotable(version)
        judged >> stage_done(PIPELINE, "gprd-cny", "stage_6", check)
    stages.append(s6)

    previous = version
    for stage in stages:
        previous >> stage
        previous = stage
    end = dagkit.failure_handling(PIPELINE, ENVS, [version, *stages])
    stages[-1] >> end


deploy_canary()
