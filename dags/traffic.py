"""traffic: bounded synthetic traffic against staging, canary and production's main fleet, so a
bad build shows as alerts on staging before it reaches canary, and the canary judge
(liftoff.analysis) has the same kind of traffic on canary and on its baseline, the main fleet.

Per environment, ``rps`` requests a second for ``duration_s`` over the endpoints, from a pool
of ``concurrency`` workers; counts, errors and latency go to the Pushgateway (job
``liftoff_traffic``, one group per environment) as it runs. No schedule unless
``LIFTOFF_TRAFFIC_CRON`` sets one (e.g. ``*/10 * * * *`` with ``duration_s`` 590 for
continuous traffic); one run at a time.
"""

from __future__ import annotations

from airflow.sdk import Param, dag, task

from liftoff.traffic import (
    DEFAULT_CONCURRENCY,
    DEFAULT_DURATION_S,
    DEFAULT_ENDPOINTS,
    DEFAULT_RPS,
    MAX_CONCURRENCY,
    MAX_DURATION_S,
    MAX_ENDPOINTS,
    MAX_RPS,
)
from liftoff_airflow import dagkit
from liftoff_airflow.params import ENDPOINT_PATTERN

PIPELINE = "traffic"


def default_environments() -> list[str]:
    """Staging, the canary, and the main fleet the canary is judged against (those of them the
    inventory has)."""
    known = dagkit.environment_names()
    return [e for e in ("gstg", "gprd-cny", "gprd") if e in known] or known[:1]


@task
def send_traffic() -> dict:
    from liftoff.inventory import load_inventory
    from liftoff.traffic import run_from_inventory

    dagkit.refuse_unknown_conf()
    p = dagkit.params()
    return run_from_inventory(load_inventory(), p["environments"], rps=float(p["rps"]),
                              duration_s=float(p["duration_s"]), endpoints=p["endpoints"],
                              concurrency=int(p["concurrency"]))


@dag(
    dag_id=PIPELINE,
    description="Synthetic traffic against staging, canary and main, metrics to the Pushgateway",
    schedule=dagkit.schedule_from_env("LIFTOFF_TRAFFIC_CRON", None),
    catchup=False,
    max_active_runs=1,
    default_args=dagkit.DEFAULT_ARGS,
    tags=["liftoff", "traffic"],
    params={
        "environments": Param(default_environments(), type="array", minItems=1, uniqueItems=True,
                              items={"type": "string", "enum": dagkit.environment_names()},
                              title="Environments",
                              description="Where to send traffic (canary with its QA cookie; the main "
                                          "fleet is the canary judge's baseline)."),
        "rps": Param(DEFAULT_RPS, type="number", exclusiveMinimum=0, maximum=MAX_RPS,
                     title="Requests a second",
                     description="Per environment."),
        "duration_s": Param(DEFAULT_DURATION_S, type="integer", minimum=1, maximum=int(MAX_DURATION_S),
                            title="Duration (seconds)", description="How long this run sends traffic."),
        "endpoints": Param(list(DEFAULT_ENDPOINTS), type="array", minItems=1, maxItems=MAX_ENDPOINTS,
                           items={"type": "string", "pattern": ENDPOINT_PATTERN}, title="Endpoints",
                           description="Paths requested in turn on each environment's URL."),
        "concurrency": Param(DEFAULT_CONCURRENCY, type="integer", minimum=1, maximum=MAX_CONCURRENCY,
                             title="Workers",
                             description="Requests in flight at most, per environment."),
    },
    doc_md=__doc__,
)
def traffic():
    send_traffic()


traffic()
