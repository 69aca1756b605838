"""canary_weight: the share of production traffic the canary gets (ChatOps ``canary``).

Sets the canary servers' weight (0-100, against 100 for the main fleet) in the production
backends, or their state (drain, ready, maint) everywhere, on every production LB, then
reads every LB back until each shows it. Reducing canary traffic (a lower weight, drain,
maint) while a canary deploy holds the canary's lock is refused unless ``force``.
"""

from __future__ import annotations

from airflow.sdk import Param, dag, task

from liftoff_airflow import dagkit

PIPELINE = "canary_weight"


@task
def set_weight() -> dict:
    from liftoff.canary import set_canary_weight

    dagkit.refuse_unknown_conf()
    p = dagkit.params()
    return set_canary_weight(dagkit.run_handle(PIPELINE), p["weight"], force=bool(p["force"]))


@dag(
    dag_id=PIPELINE,
    description="Set the canary weight or state on every production LB and verify it",
    schedule=None,
    catchup=False,
    max_active_runs=1,
    default_args=dagkit.DEFAULT_ARGS,
    tags=["liftoff", "canary", "traffic"],
    params={
        "weight": Param(
            anyOf=[{"type": "integer", "minimum": 0, "maximum": 100},
                   {"type": "string", "enum": ["drain", "ready", "maint"]}],
            title="Weight or state",
            description="0-100 (HAProxy weight of each canary server in the production backends; "
                        "the main fleet weighs 100, canary normally 5), or drain, ready, maint."),
        "force": Param(False, type="boolean", title="Force",
                       description="Reduce canary traffic even while a canary deploy runs."),
    },
    doc_md=__doc__,
)
def canary_weight():
    set_weight()


canary_weight()
