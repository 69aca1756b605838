"""fast_deploy: push a version to one environment quickly, for a critical security or
availability fix.

No QA and no quiet periods; the precheck runs but only records what it finds (a fast deploy
is usually the fix for it). A required reason goes into the lock history and a Pushgateway
metric. Regular migrations run first; roles go in the deploy order (gitaly, then the fleet)
in batches of half a role with a short drain wait; post-deployment migrations are left to
their own pipeline. ``internal``: an undisclosed security build, whose version never appears
in metric labels or notifications (``internal`` instead).
"""

from __future__ import annotations

from airflow.sdk import Param, dag, task

from liftoff_airflow import dagkit

PIPELINE = "fast_deploy"


def _conf() -> tuple[str, str, str, bool]:
    """The run's conf; an internal build's version is masked in this task's logs from here on."""
    p = dagkit.params()
    dagkit.hide_internal(p["version"], p["internal"] is True)
    return p["environment"], p["version"], p["reason"], p["internal"] is True


@task
def precheck() -> dict:
    from liftoff.checks import fast_precheck

    dagkit.refuse_unknown_conf()
    env, version, reason, internal = _conf()
    result = fast_precheck(dagkit.run_handle(PIPELINE), env, version, reason)
    return dagkit.scrub_internal(result, version, internal)


@task
def begin_env(check: dict) -> dict:
    from liftoff import notify
    from liftoff.deploy import begin_fast_deploy

    env, version, reason, internal = _conf()
    run = dagkit.run_handle(PIPELINE)
    previous = check.get("previous_version")
    if internal and previous and "internal-" in previous:  # scrubbed in the precheck's XCom
        previous = None
    result = begin_fast_deploy(run, env, version, reason, internal, previous)
    notify.fast_deploy(run, env, version, reason, internal)
    return dagkit.scrub_internal(result, version, internal)


@task
def regular_migrations() -> dict:
    from liftoff.deploy import migrate

    env, version, _, internal = _conf()
    result = migrate(dagkit.run_handle(PIPELINE), env, version, post=False)
    return dagkit.scrub_internal(result, version, internal)


@task
def deploy(stage: str) -> dict:
    from liftoff.deploy import roll_stage

    env, version, _, internal = _conf()
    result = roll_stage(dagkit.run_handle(PIPELINE), env, version, stage, "fast",
                        rollout_mode=dagkit.rollout_mode())
    return dagkit.scrub_internal(result, version, internal)


@task
def finish_env() -> dict:
    from liftoff.deploy import finish_fast_deploy

    env, version, reason, internal = _conf()
    result = finish_fast_deploy(dagkit.run_handle(PIPELINE), env, version, reason, internal)
    return dagkit.scrub_internal(result, version, internal)


@dag(
    dag_id=PIPELINE,
    description="Deploy a critical fix to one environment fast: no QA, no quiet period, reason recorded",
    schedule=None,
    catchup=False,
    max_active_runs=1,
    default_args=dagkit.DEFAULT_ARGS,
    tags=["liftoff", "deploy", "fast"],
    params={
        "environment": Param(enum=dagkit.environment_names(), title="Environment",
                             description="Where to deploy."),
        "version": dagkit.version_param(required=True),
        "reason": dagkit.reason_param("Reason", "Why this cannot wait for the pipeline (recorded and pushed "
                                      "as a metric), e.g. a security issue or incident URL.", required=True),
        "internal": Param(False, type="boolean", title="Internal build",
                          description="An undisclosed security build: its version is left out of metric "
                                      "labels, notifications, task logs and XComs."),
        "rollout_mode": dagkit.rollout_param(),
    },
    doc_md=__doc__,
)
def fast_deploy():
    check = precheck()
    begin = begin_env(check)
    work = regular_migrations()
    gitaly = deploy.override(task_id="deploy_gitaly")("gitaly")
    rest = deploy.override(task_id="deploy_fleet")("fleet")
    done = finish_env()
    begin >> work >> gitaly >> rest >> done >> dagkit.finalize_env(PIPELINE)


fast_deploy()
