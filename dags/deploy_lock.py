"""deploy_lock: lock or unlock an environment by hand (ChatOps ``deploy lock|unlock ENV``),
or freeze and unfreeze its changes (``liftoff freeze|unfreeze ENV``).

A lock by hand is held by run ``manual-<who>`` with the reason; every deploy's precheck
fails while it is held. Unlock removes whoever holds the lock (a lock by hand or a stuck
run's), recorded with who and why in the lock history.

A freeze is a change-freeze window: from now until ``until`` (ISO 8601 with a zone) or for
``duration`` (``90m``, ``2h``, ``1d``), recorded in the state store with who and why; every
precheck and production check of the environment fails while it is in force (a person may
approve a run through the production checks' request, with a reason). Unfreeze lifts the
environment's freezes in force or to come, with a reason.
"""

from __future__ import annotations

from airflow.sdk import Param, dag, task

from liftoff_airflow import dagkit
from liftoff_airflow.params import anchored

PIPELINE = "deploy_lock"


@task
def change_lock() -> dict:
    from liftoff import notify
    from liftoff.locks import lock_env, unlock_env

    dagkit.refuse_unknown_conf()
    p = dagkit.params()
    run = dagkit.run_handle(PIPELINE)
    if p["action"] in ("freeze", "unfreeze"):
        from liftoff.checks import freeze_env, unfreeze_env

        if p["action"] == "freeze":
            result = freeze_env(run, p["environment"], p["reason"], until=p.get("until"),
                                duration=p.get("duration"))
        else:
            result = unfreeze_env(run, p["environment"], p["reason"])
        notify.freeze_changed(run, result)
        return result
    fn = lock_env if p["action"] == "lock" else unlock_env
    result = fn(run, p["environment"], p["reason"])
    notify.lock_changed(run, result)
    return result


@dag(
    dag_id=PIPELINE,
    description="Lock or unlock an environment's deploys by hand, or freeze its changes, with a reason",
    schedule=None,
    catchup=False,
    max_active_runs=1,
    default_args=dagkit.DEFAULT_ARGS,
    tags=["liftoff", "lock"],
    params={
        "environment": Param(enum=dagkit.environment_names(), title="Environment",
                             description="The environment."),
        "action": Param(enum=["lock", "unlock", "freeze", "unfreeze"], title="Action",
                        description="lock: hold the lock by hand; unlock: remove whoever holds it; freeze: "
                                    "no changes until `until` or for `duration`; unfreeze: lift the "
                                    "freezes."),
        "until": Param(None, type=["null", "string"], maxLength=40, title="Freeze until",
                       description="freeze: end of the freeze, ISO 8601 with a zone (or give duration)."),
        "duration": Param(None, type=["null", "string"], maxLength=20, pattern=anchored(r"[0-9smhdw ]+"),
                          title="Freeze for", description="freeze: how long, like 90m, 2h, 1d12h, 1w."),
        "reason": dagkit.reason_param("Reason", "Why (recorded in the lock history).", required=True),
    },
    doc_md=__doc__,
)
def deploy_lock():
    change_lock()


deploy_lock()
