"""deploy_lock: lock or unlock an environment by hand (ChatOps ``deploy lock|unlock ENV``).

A lock by hand is held by run ``manual-<who>`` with the reason; every deploy's precheck
fails while it is held. Unlock removes whoever holds the lock (a lock by hand or a stuck
run's), recorded with who and why in the lock history.
"""

from __future__ import annotations

from airflow.sdk import Param, dag, get_current_context, task

from liftoff_airflow import dagkit

PIPELINE = "deploy_lock"


def _environments() -> list[str]:
    from liftoff.operations import environment_names

    return environment_names()


def _refuse_unknown_conf() -> None:
    """A misspelt conf key must not fall back to a default: refused before anything changes."""
    from liftoff_airflow.conf_guard import refuse_unknown_conf

    ctx = get_current_context()
    refuse_unknown_conf(ctx["dag_run"].conf, ctx["dag"].params)


@task
def change_lock() -> dict:
    from liftoff.operations import lock_env, unlock_env

    _refuse_unknown_conf()
    p = dagkit.params()
    fn = lock_env if p["action"] == "lock" else unlock_env
    return fn(dagkit.run_handle(PIPELINE), p["environment"], p["reason"])


@dag(
    dag_id=PIPELINE,
    description="Lock or unlock an environment's deploys by hand, with a reason",
    schedule=None,
    catchup=False,
    max_active_runs=1,
    default_args=dagkit.DEFAULT_ARGS,
    tags=["liftoff", "lock"],
    params={
        "environment": Param(enum=_environments(), title="Environment", description="The environment."),
        "action": Param(enum=["lock", "unlock"], title="Action",
                        description="lock: hold the lock by hand; unlock: remove whoever holds it."),
        "reason": dagkit.reason_param("Reason", "Why (recorded in the lock history).", required=True),
    },
    doc_md=__doc__,
)
def deploy_lock():
    change_lock()


deploy_lock()
