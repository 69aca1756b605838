"""deploy_lock: lock or unlock an environment by hand (ChatOps ``deploy lock|unlock ENV``).

A lock by hand is held by run ``manual-<who>`` with the reason; every deploy's precheck
fails while it is held. Unlock removes whoever holds the lock (a lock by hand or a stuck
run's), recorded with who and why in the lock history.
"""

from __future__ import annotations

from airflow.sdk import Param, dag, task

from liftoff_airflow import dagkit

PIPELINE = "deploy_lock"


@task
def change_lock() -> dict:
    from liftoff import notify
    from liftoff.locks import lock_env, unlock_env

    dagkit.refuse_unknown_conf()
    p = dagkit.params()
    fn = lock_env if p["action"] == "lock" else unlock_env
    run = dagkit.run_handle(PIPELINE)
    result = fn(run, p["environment"], p["reason"])
    notify.lock_changed(run, result)
    return result


@dag(
    dag_id=PIPELINE,
    description="Lock or unlock an environment's deploys by hand, with a reason",
    schedule=None,
    catchup=False,
    max_active_runs=1,
    default_args=dagkit.DEFAULT_ARGS,
    tags=["liftoff", "lock"],
    params={
        "environment": Param(enum=dagkit.environment_names(), title="Environment",
                             description="The environment."),
        "action": Param(enum=["lock", "unlock"], title="Action",
                        description="lock: hold the lock by hand; unlock: remove whoever holds it."),
        "reason": dagkit.reason_param("Reason", "Why (recorded in the lock history).", required=True),
    },
    doc_md=__doc__,
)
def deploy_lock():
    change_lock()


deploy_lock()
