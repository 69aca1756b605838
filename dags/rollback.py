"""rollback: return an environment to an earlier package (ChatOps ``rollback [check] ENV``).

1. ``safety_check``: refuses when post-deployment migrations the target does not contain have
   run on the environment's database (override only with a reason, recorded in the lock
   history), when another run holds a lock on that database, or when there is no target.
   With ``check_only`` this is all that runs; its XCom is {safe, reasons, current, target,
   newer_post_migrations, command}.
2. Traffic: production drains its canary first; a canary gets weight 0.
3. The deploy in reverse: fleet roles first, gitaly last, in drained batches (``fast``:
   batches of half a role, no capacity floor, a short drain wait; may drop connections).
4. Chef back on; ``normal`` mode ends with QA and the alert quiet period, ``fast`` skips them.
"""

from __future__ import annotations

from airflow.sdk import Param, TriggerRule, dag, get_current_context, task

from liftoff_airflow import dagkit
from liftoff_airflow.operators import QAGateOperator, QuietPeriodSensor

PIPELINE = "rollback"
ENV = "{{ params.environment }}"
TARGET = "{{ ti.xcom_pull(task_ids='safety_check')['target'] }}"


def _conf() -> tuple:
    p = dagkit.params()
    return p["environment"], p["mode"], p.get("reason"), p.get("override_reason")


def _run():
    """The run handle, carrying the safety override reason the guard checks on every step."""
    return dagkit.run_handle(PIPELINE, override_reason=dagkit.params().get("override_reason"))


def _target() -> str:
    return get_current_context()["ti"].xcom_pull(task_ids="safety_check")["target"]


@task
def safety_check() -> dict:
    """``rollback check``; unless ``check_only``, an unsafe answer fails the run here."""
    from liftoff import notify
    from liftoff.rollback import require_safe
    from liftoff.rollback import safety_check as check

    dagkit.refuse_unknown_conf()
    p = dagkit.params()
    run = _run()
    result = check(run, p["environment"], p.get("target_version"))
    if p["check_only"]:
        return result
    with notify.refusals(run, p["environment"]):
        return require_safe(result, p.get("override_reason"))


@task.short_circuit
def proceed() -> bool:
    """Stop here (the whole rest skipped) for ``check_only``."""
    return not dagkit.params()["check_only"]


@task
def shield_traffic() -> dict:
    from liftoff.canary import shield_for_rollback

    return shield_for_rollback(_run(), dagkit.params()["environment"])


@task
def begin_rollback() -> dict:
    from liftoff import notify
    from liftoff.rollback import begin_rollback as begin

    env, mode, reason, override = _conf()
    run = _run()
    result = begin(run, env, _target(), mode, reason, override)
    notify.rollback_started(run, env, result["version"], mode=mode, reason=reason)
    return result


@task
def roll(stage: str) -> dict:
    from liftoff.rollback import roll as roll_stage

    env, mode, _, _ = _conf()
    return roll_stage(_run(), env, _target(), stage, mode, dagkit.rollout_mode())


@task
def restart_chef() -> dict:
    from liftoff.deploy import restart_chef as restart

    return restart(_run(), dagkit.params()["environment"], _target())


@task.short_circuit(ignore_downstream_trigger_rules=False)
def normal_mode() -> bool:
    """``fast`` skips QA and the quiet period."""
    return dagkit.params()["mode"] == "normal"


@task(trigger_rule=TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS)
def rollback_done() -> dict:
    from liftoff import notify
    from liftoff.rollback import rollback_done as done

    run = _run()
    result = done(run, dagkit.params()["environment"], _target())
    notify.rollback_finished(run, result["env"], result["version"])
    return result


@dag(
    dag_id=PIPELINE,
    description="Roll an environment back (fleet first, gitaly last), after a migration safety check",
    schedule=None,
    catchup=False,
    max_active_runs=1,
    default_args=dagkit.DEFAULT_ARGS,
    tags=["liftoff", "rollback"],
    params={
        "environment": Param(enum=dagkit.environment_names(), title="Environment",
                             description="The environment to roll back."),
        "target_version": Param(None, type=["null", "string"], pattern=dagkit.VERSION_PATTERN, maxLength=100,
                                title="Target version",
                                description="The package to return to, e.g. 17.6.0-ee.0. Empty: the "
                                            "previous successfully deployed (older) version."),
        "mode": Param("normal", enum=["normal", "fast"], title="Mode",
                      description="normal: drained batches, QA and quiet period at the end. fast: batches "
                                  "of half a role, no quiet period, may drop connections."),
        "reason": dagkit.reason_param("Reason", "Why roll back (recorded with the lock)."),
        "check_only": Param(False, type="boolean", title="Check only",
                            description="Only run the safety check (rollback check) and report."),
        "rollout_mode": dagkit.rollout_param(),
        "override_reason": dagkit.reason_param(
            "Override the safety check (reason)",
            "Roll back even though post-deployment migrations newer than the target ran (or cannot "
            "be checked); the reason is recorded. Leave empty to refuse an unsafe rollback."),
        "quiet_period_seconds": Param(None, type=["null", "integer"], minimum=0, maximum=86400,
                                      title="Quiet period (seconds)",
                                      description="Alert-free window at the end (normal mode); empty: the "
                                                  "inventory's."),
    },
    doc_md=__doc__,
)
def rollback():
    check = safety_check()
    go = proceed()
    shield = shield_traffic()
    begin = begin_rollback()
    fleet = roll.override(task_id="rollback_fleet")("fleet")
    gitaly = roll.override(task_id="rollback_gitaly")("gitaly")
    chef = restart_chef()
    gates = normal_mode()
    qa = QAGateOperator(task_id="qa", env=ENV, version=TARGET, expect_version=True)
    # a window below the inventory's minimum passes only with the run's override_reason
    quiet = QuietPeriodSensor(task_id="quiet_period", env=ENV, override_param="override_reason")
    done = rollback_done()
    end = dagkit.finalize_env(PIPELINE)
    check >> go >> shield >> begin >> fleet >> gitaly >> chef >> gates >> qa >> quiet >> done
    chef >> done
    done >> end


rollback()
