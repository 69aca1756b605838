"""post_deploy_patch: apply a post-deployment patch to chosen roles of an environment now,
record it, and halt ``deploy_canary`` until a build that includes the patch is deployed.

The patch goes on every host of the roles at once, without draining (fast), and the roles'
reloadable services (puma, sidekiq) are HUPed so it takes effect. The record (with the patch
text, its SHA-256 and the reason) and the halt are written before any host is touched. A
halted ``deploy_canary`` fails at its precheck naming the patch; deploying a build whose
build-source entry lists the patch in ``includes_patches`` lifts the halt, and so does this
DAG with ``action: lift_halt`` and a reason (on purpose, recorded). Hosts that install a new
package later get the patch re-applied by the rollout until it is in the build.
"""

from __future__ import annotations

from airflow.sdk import Param, TriggerRule, dag, task

from liftoff_airflow import dagkit
from liftoff_airflow.params import PATCH_ID_PATTERN, ROLE_PATTERN

PIPELINE = "post_deploy_patch"


@task.branch
def choose() -> str:
    dagkit.refuse_unknown_conf()
    return "lift_halt_on_purpose" if dagkit.params()["action"] == "lift_halt" else "apply_patch"


@task
def apply_patch() -> dict:
    """Record, halt canary deploys, patch the hosts, record the outcome."""
    from liftoff import notify
    from liftoff.patches import apply_patch as apply

    p = dagkit.params()
    run = dagkit.run_handle(PIPELINE)
    result = apply(run, p["environment"], p["patch_id"], p["patch"] or "", p["roles"], p["reason"])
    notify.patch_applied(run, result)
    return result


@task
def lift_halt_on_purpose() -> dict:
    from liftoff import notify
    from liftoff.patches import lift_halt

    p = dagkit.params()
    run = dagkit.run_handle(PIPELINE)
    result = lift_halt(run, p["reason"], p.get("patch_id"))
    notify.halt_lifted(run, result)
    return result


@task(trigger_rule=TriggerRule.ALL_DONE)
def finalize() -> dict:
    return dagkit.finalize_run(PIPELINE, [dagkit.params()["environment"]])


@dag(
    dag_id=PIPELINE,
    description="Apply a post-deployment patch fast and halt canary deploys until a build includes it",
    schedule=None,
    catchup=False,
    max_active_runs=1,
    default_args=dagkit.DEFAULT_ARGS,
    tags=["liftoff", "patch"],
    params={
        "environment": Param(enum=dagkit.environment_names(), title="Environment",
                             description="The environment whose hosts get the patch."),
        "patch_id": Param(None, type=["null", "string"], pattern=PATCH_ID_PATTERN, title="Patch id",
                          description="The patch's id, e.g. security-2026-0042 (gitlab-patch apply ID). "
                                      "With lift_halt: the patch whose halt to lift (empty: every halt)."),
        "patch": Param(None, type=["null", "string"], maxLength=262144, title="Patch",
                       description="The patch text: the run keeps it whole, the patch record its SHA-256, "
                                   "size and as much of the text as fits (about 1.5 kB)."),
        "roles": Param([], type="array", items={"type": "string", "pattern": ROLE_PATTERN},
                       maxItems=20, uniqueItems=True, title="Roles",
                       description="Roles whose hosts get the patch, e.g. [web, api, sidekiq]."),
        "reason": dagkit.reason_param("Reason", "Why (recorded with the patch and the halt, or the lift).",
                                      required=True),
        "action": Param("apply", enum=["apply", "lift_halt"], title="Action",
                        description="apply: patch the hosts and halt canary deploys; lift_halt: lift the "
                                    "halt on purpose (the reason is recorded)."),
    },
    doc_md=__doc__,
)
def post_deploy_patch():
    pick = choose()
    apply = apply_patch()
    lift = lift_halt_on_purpose()
    pick >> [apply, lift] >> finalize()


post_deploy_patch()
