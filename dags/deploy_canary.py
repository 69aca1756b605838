"""deploy_canary: nightly builds through staging and the production canary (stages 1-6).

Each stage: a precheck that fails closed, the work, QA where the design says, then an
alert quiet period (deferred: no worker slot while waiting). A failed gate branches to
rollback or halt (param ``on_failure``); the run then ends failed with its locks released.
A verified canary emits the ``liftoff://canary-verified`` Asset event with the version.
"""

from __future__ import annotations

from airflow.sdk import Asset, Metadata, TaskGroup, TriggerRule, dag, get_current_context, task

from liftoff_airflow import dagkit
from liftoff_airflow.dagkit import on_failure, precheck, stage_done
from liftoff_airflow.operators import QAGateOperator, QuietPeriodSensor

PIPELINE = "deploy_canary"
CANARY_VERIFIED = Asset("liftoff://canary-verified")
VERSION = "{{ ti.xcom_pull(task_ids='resolve_version') }}"
ENVS = ["gstg", "gprd-cny"]


@task
def resolve_version() -> str:
    """The version to deploy (newest nightly on a scheduled run); refused while a
    post-deployment patch halts canary deploys."""
    from liftoff.pipeline import check_halt
    from liftoff.pipeline import resolve_version as resolve

    ctx = get_current_context()
    run = dagkit.run_handle(PIPELINE)
    version = resolve(run, ctx["params"].get("version"), ctx["dag_run"].run_type == "scheduled")
    check_halt(run, version)
    return version


@task
def begin_env(env: str, version: str, check: dict) -> dict:
    from liftoff.pipeline import begin_env as begin

    if dagkit.params()["dry_run"]:
        return {"dry_run": True, "env": env}
    return begin(dagkit.run_handle(PIPELINE), env, version, check.get("previous_version"))


@task
def migrate(env: str, version: str, post: bool) -> dict:
    from liftoff.pipeline import migrate as run_migrations

    if dagkit.params()["dry_run"]:
        return {"dry_run": True, "env": env, "post": post}
    return run_migrations(dagkit.run_handle(PIPELINE), env, version, post=post)


@task
def deploy(env: str, version: str, stage: str | None) -> dict:
    from liftoff.pipeline import deploy_roles

    return deploy_roles(dagkit.run_handle(PIPELINE), env, version, stage=stage,
                        dry_run=dagkit.params()["dry_run"])


@task
def finish_env(env: str, version: str) -> dict:
    from liftoff.pipeline import finish_env as finish

    if dagkit.params()["dry_run"]:
        return {"dry_run": True, "env": env}
    return finish(dagkit.run_handle(PIPELINE), env, version)


@task
def canary_weight_zero() -> dict:
    """No production traffic on canary while it is deployed."""
    from liftoff.pipeline import canary_weight

    if dagkit.params()["dry_run"]:
        return {"dry_run": True, "weight": 0}
    return canary_weight(dagkit.run_handle(PIPELINE), 0)


@task(outlets=[CANARY_VERIFIED])
def canary_verified(version: str):
    if dagkit.params()["dry_run"]:
        return {"dry_run": True}
    yield Metadata(CANARY_VERIFIED, extra={"version": version})


@task
def rollback() -> dict:
    """Return the environment that failed to its previous version; canary traffic to zero
    first when canary failed."""
    from liftoff.pipeline import canary_weight, failed_environment, mark_failed, rollback_env

    run = dagkit.run_handle(PIPELINE)
    env = failed_environment(run, ENVS)
    if env is None:
        mark_failed(run, ENVS, "failed")
        return {"rolled_back": None, "reason": "no environment was changed"}
    if env == "gprd-cny":
        canary_weight(run, 0, force=True)
    target = run.store.current_version(env)
    if target is None:
        raise RuntimeError(f"no previous version recorded for {env}: roll back by hand")
    result = rollback_env(run, env, target)
    mark_failed(run, [env], "rolled_back")
    return result


@task
def halt() -> dict:
    """Stop here, leaving hosts as they are; failed hosts stay drained and recorded."""
    from liftoff.pipeline import mark_failed

    run = dagkit.run_handle(PIPELINE)
    return {"halted": mark_failed(run, ENVS, "halted"),
            "drained": [d.host for d in run.store.drained()]}


@task(trigger_rule=TriggerRule.ALL_DONE)
def finalize() -> dict:
    return dagkit.finalize_run(PIPELINE, ENVS)


def gate(stage: str, env: str, qa: bool, expect_version: bool = True):
    """QA (optional) then the quiet period, as a chain of two tasks."""
    quiet = QuietPeriodSensor(task_id="quiet_period", env=env, window_s=dagkit.quiet_window(),
                              dry_run=dagkit.dry_run_flag())
    if not qa:
        return quiet, quiet
    qa_task = QAGateOperator(task_id="qa", env=env, version=VERSION, expect_version=expect_version,
                             dry_run=dagkit.dry_run_flag())
    qa_task >> quiet
    return qa_task, quiet


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
    last = version
    stages = []

    with TaskGroup("stage_1_staging_migrations") as s1:
        check = precheck(PIPELINE, "gstg", version)
        begin = begin_env("gstg", version, check)
        work = migrate.override(task_id="regular_migrations")("gstg", version, False)
        _, quiet = gate("stage_1", "gstg", qa=False)
        check >> begin >> work >> quiet >> stage_done(PIPELINE, "gstg", "stage_1", check)
    stages.append(s1)

    # QA after gitaly only checks staging works: the web fleet still runs the old version.
    for group_id, stage, roles, expect in (("stage_2_staging_gitaly", "stage_2", "gitaly", False),
                                           ("stage_3_staging_fleet", "stage_3", "fleet", True)):
        with TaskGroup(group_id) as group:
            check = precheck(PIPELINE, "gstg", version)
            work = deploy("gstg", version, roles)
            first, quiet = gate(stage, "gstg", qa=True, expect_version=expect)
            check >> work >> first
            quiet >> stage_done(PIPELINE, "gstg", stage, check)
        stages.append(group)

    with TaskGroup("stage_4_staging_post_migrations") as s4:
        check = precheck(PIPELINE, "gstg", version)
        work = migrate.override(task_id="post_migrations")("gstg", version, True)
        _, quiet = gate("stage_4", "gstg", qa=False)
        done = finish_env("gstg", version)
        check >> work >> quiet >> done >> stage_done(PIPELINE, "gstg", "stage_4", check)
    stages.append(s4)

    with TaskGroup("stage_5_production_migrations") as s5:
        check = precheck(PIPELINE, "gprd", version)
        begin = begin_env("gprd-cny", version, check)
        work = migrate.override(task_id="regular_migrations")("gprd-cny", version, False)
        first, quiet = gate("stage_5", "gprd", qa=True, expect_version=False)
        check >> begin >> work >> first
        quiet >> stage_done(PIPELINE, "gprd", "stage_5", check)
    stages.append(s5)

    with TaskGroup("stage_6_canary_fleet") as s6:
        check = precheck(PIPELINE, "gprd-cny", version)
        zero = canary_weight_zero()
        work = deploy("gprd-cny", version, None)
        first, quiet = gate("stage_6", "gprd-cny", qa=True)
        done = finish_env("gprd-cny", version)
        check >> zero >> work >> first
        quiet >> done >> canary_verified(version) >> stage_done(PIPELINE, "gprd-cny", "stage_6", check)
    stages.append(s6)

    for stage in stages:
        last >> stage
        last = stage

    decide = on_failure()
    stages >> decide
    version >> decide
    end = finalize()
    decide >> [rollback(), halt()] >> end
    last >> end


deploy_canary()
