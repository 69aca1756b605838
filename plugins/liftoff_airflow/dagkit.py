"""Building blocks the DAG files wire together: params, stage tasks, failure handling.

Every task is a one-line call into the engine's domain modules (``liftoff.deploy``,
``liftoff.rollback``, ``liftoff.canary``, ``liftoff.checks`` ...); what a task returns is its
XCom. Every change those make passes the engine's door (``liftoff.guard``), whichever way the
task runs: first run, cleared retry or automatic rollback.
"""

from __future__ import annotations

import os
import time
from datetime import timedelta
from typing import Any

from airflow.sdk import Asset, Param, TriggerRule, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException

from liftoff_airflow.operators import QAGateOperator, QuietPeriodSensor
from liftoff_airflow.params import REASON_PATTERN, VERSION_PATTERN

# deploy_canary's outlet once canary verified a build; deploy_production's schedule with auto-promotion.
CANARY_VERIFIED = Asset("liftoff://canary-verified")


def notify_failure(context: Any) -> None:
    """Every task's ``on_failure_callback``: the failed step and its reason to chat (never raises)."""
    from liftoff import notify

    notify.step_failed(context)


DEFAULT_ARGS = {
    "owner": "release-managers",
    # A stage is retried by a person clearing it, never blindly by the scheduler.
    "retries": 0,
    "execution_timeout": timedelta(hours=4),
    "on_failure_callback": notify_failure,
}


def version_param(required: bool, when_empty: str | None = None) -> Param:
    """The ``version`` Param. ``when_empty``: what an empty version means to the calling DAG (the
    last sentence of its help text); an optional version without one gets deploy_canary's: its
    scheduled run takes the newest nightly build."""
    if when_empty is None and not required:
        when_empty = "Empty on a scheduled run: the newest nightly build."
    return Param(
        None if not required else "",
        type=["null", "string"] if not required else "string",
        pattern=VERSION_PATTERN,
        maxLength=100,
        title="Package version",
        description="Omnibus package to deploy, e.g. 17.6.0-ee.0, 17.6.0-rc3.ee.0, "
                    "17.6.0+rnightly.308853.0ab19c4f-0 or 17.6.202611291200-13bd0cc7c2a.3f6b8fe0f4d."
                    + (f" {when_empty.strip()}" if when_empty else ""),
    )


def reason_param(title: str, description: str, required: bool = False) -> Param:
    return Param(
        "" if required else None,
        type="string" if required else ["null", "string"],
        minLength=5, maxLength=500, pattern=REASON_PATTERN,
        title=title, description=description,
    )


COMMON_PARAMS: dict[str, Param] = {
    "dry_run": Param(False, type="boolean", title="Dry run",
                     description="Plan only: list every host and step in order, touch nothing."),
    "on_failure": Param("rollback", enum=["rollback", "halt"], title="On a failed gate",
                        description="rollback: return the failed environment to its previous version; "
                                    "halt: stop and leave everything as it is, with a record."),
    "allow_precheck_failure": reason_param(
        "Allow precheck failure (reason)",
        "Let failed prechecks pass; the reason is recorded. Leave empty to fail closed."),
    "quiet_period_seconds": Param(None, type=["null", "integer"], minimum=0, maximum=86400,
                                  title="Quiet period (seconds)",
                                  description="Alert-free window after each stage; empty: the inventory's. "
                                              "Negative values are refused; a window below the inventory's "
                                              "minimum needs the allow_precheck_failure reason."),
}


def refuse_unknown_conf() -> None:
    """A misspelt conf key must not fall back to a default: refused before anything changes."""
    from liftoff_airflow.conf_guard import refuse_unknown_conf as refuse

    ctx = get_current_context()
    refuse(ctx["dag_run"].conf, ctx["dag"].params)


def environment_names() -> list[str]:
    """The inventory's environments, for a Param's enum (GitLab.com's three without one)."""
    from liftoff.inventory import environment_names as names

    return names()


def run_handle(pipeline: str, override_reason: str | None = None):
    """The engine's Run for the current task (run id and who from the DAG run, and the safety
    override reason the run carries, if any); refuses unknown conf keys first."""
    from liftoff.runs import Run

    refuse_unknown_conf()
    ctx = get_current_context()
    dag_run = ctx["dag_run"]
    who = (dag_run.conf or {}).get("requested_by") or ("scheduler" if dag_run.run_type == "scheduled"
                                                         else "airflow-user")
    return Run(run_id=safe_run_id(dag_run.run_id), who=safe_run_id(str(who)), pipeline=pipeline,
               override_reason=override_reason)


def safe_run_id(run_id: str) -> str:
    """Airflow run ids carry ':' and '+'; the engine's names allow [A-Za-z0-9._-]."""
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in run_id)[:120]


def params() -> dict[str, Any]:
    return get_current_context()["params"]


@task
def precheck(pipeline: str, env: str, version: str) -> dict:
    from liftoff.checks import precheck as check

    started = time.time()
    p = params()
    result = check(run_handle(pipeline), env, version, override_reason=p.get("allow_precheck_failure"))
    result["stage_started"] = started
    return result


@task
def stage_done(pipeline: str, env: str, stage: str, check: dict) -> dict:
    """Push the stage's metrics (start from its precheck)."""
    from liftoff import notify

    run = run_handle(pipeline)
    start = float(check.get("stage_started") or time.time())
    run.metrics().stage(env, stage, "success", start, time.time())
    notify.stage_passed(run, env, stage, time.time() - start)
    return {"stage": stage, "env": env, "duration_s": round(time.time() - start, 1)}


def quiet_window() -> str:
    return "{{ params.quiet_period_seconds }}"


def dry_run_flag() -> str:
    return "{{ params.dry_run }}"


@task.branch(trigger_rule=TriggerRule.ONE_FAILED)
def on_failure() -> str:
    """A gate failed: roll the failed environment back, or halt, as the run asked."""
    return "rollback" if params().get("on_failure") == "rollback" else "halt"


def failed_tasks(states: dict[str, str | None] | None = None, dag: Any = None) -> list[str]:
    """The tasks of this run that failed themselves (state ``failed``: not ``upstream_failed``,
    not the ones that never ran, not finalize), in run order: the DAG's topological order (task
    groups in place, ties in declaration order), so the first one is the first failing step.

    Inside a task both come from the context (the task SDK's ``get_task_states`` and the parsed
    DAG: a task has no metadata-DB access and the SDK gives no start dates); tests pass them."""
    if states is None or dag is None:
        ctx = get_current_context()
        dag_run = ctx["dag_run"]
        if states is None:
            answer = ctx["ti"].get_task_states(dag_id=dag_run.dag_id, run_ids=[dag_run.run_id])
            states = answer.get(dag_run.run_id, answer)
        dag = ctx["dag"] if dag is None else dag

    from airflow.sdk import TaskGroup

    def nodes(group: Any):
        for node in group.topological_sort():
            if isinstance(node, TaskGroup):  # its tasks in place
                yield from nodes(node)
            else:
                yield node.task_id

    order = {task_id: i for i, task_id in enumerate(nodes(dag.task_group))}

    def position(task_id: str) -> tuple[int, str]:
        base = task_id if task_id in order else task_id.rsplit("_", 1)[0]  # mapped: task_<index>
        return order.get(base, len(order)), task_id

    return sorted((t for t, s in states.items() if s == "failed" and t != "finalize"), key=position)


def finalize_run(pipeline: str, envs: list[str], *, run: Any = None,
                 states: dict[str, str | None] | None = None, dag: Any = None) -> dict:
    """Always runs last: release this run's locks, push the pipeline's result, fail the run
    when anything failed, with one sentence: the first failing step (run order) and the locks
    this run took and released, read from the lock history (a rollback task releases its lock
    before finalize does). ``run``, ``states`` and ``dag`` come from the task's context unless
    given (tests)."""
    from liftoff import notify
    from liftoff.locks import release_locks

    ctx = get_current_context() if run is None or states is None or dag is None else None
    run = run_handle(pipeline) if run is None else run
    if states is None:
        dag_run = ctx["dag_run"]
        answer = ctx["ti"].get_task_states(dag_id=dag_run.dag_id, run_ids=[dag_run.run_id])
        states = answer.get(dag_run.run_id, answer)
    finalize_released = release_locks(run, envs)
    failed = failed_tasks(states, ctx["dag"] if dag is None else dag)
    not_run = sorted(t for t, s in states.items() if s == "upstream_failed")

    # What this run did with each environment's lock, oldest first.
    taken: list[str] = []
    released: list[str] = []
    forced: list[str] = []
    for env in envs:
        for event in reversed(run.store.lock_events(env)):
            if event.run_id != run.run_id:
                continue
            if event.action == "acquire" and env not in taken:
                taken.append(env)
            elif event.action == "release" and env not in released:
                released.append(env)
            elif event.action == "force_release":
                why = f" ({event.reason})" if event.reason else ""
                forced.append(f"{env} force-released by {event.who}{why}")
    still_held = [e for e in envs
                  if (lock := run.store.get_lock(e)) is not None and lock.run_id == run.run_id]
    if taken or released or forced:
        locks = f"locks taken: {', '.join(taken) or 'none'}; locks released: {', '.join(released) or 'none'}"
    else:
        locks = "no lock taken"
    locks += "".join(f"; {f}" for f in forced)
    locks += f"; still held: {', '.join(still_held)}" if still_held else ""

    status = "failed" if failed or not_run else "success"
    if failed:
        later = failed[1:5] + ([f"{len(failed) - 5} more"] if len(failed) > 5 else [])
        summary = f"{pipeline} failed at {failed[0]} (first)"
        if later:
            summary += f", then {', '.join(later)}"
    elif not_run:
        summary = (f"{pipeline} failed: {len(not_run)} task(s) did not run "
                   f"(upstream_failed: {', '.join(not_run[:5])})")
    else:
        summary = f"{pipeline} succeeded"
    summary += f"; {locks}"
    result = {"status": status, "summary": summary, "failed": failed, "locks_taken": taken,
              "locks_released": released, "locks_force_released": forced, "locks_still_held": still_held,
              "released": finalize_released}

    start = ctx["dag_run"].start_date if ctx else None
    run.metrics().pipeline_status(status, start.timestamp() if start else None, time.time())
    notify.run_finished(run, result)
    if status == "failed":
        if ctx:
            ctx["ti"].xcom_push("summary", result)  # a failed task's return value is never pushed
        raise AirflowFailException(summary)
    return result


@task
def begin_env(pipeline: str, env: str, version: str, check: dict) -> dict:
    """Lock the environment, stop chef, write the version role, install on the deploy node."""
    from liftoff.deploy import begin_env as begin

    if params()["dry_run"]:
        return {"dry_run": True, "env": env}
    return begin(run_handle(pipeline), env, version, check.get("previous_version"))


@task
def migrate(pipeline: str, env: str, version: str, post: bool) -> dict:
    from liftoff.deploy import migrate as run_migrations

    if params()["dry_run"]:
        return {"dry_run": True, "env": env, "post": post}
    return run_migrations(run_handle(pipeline), env, version, post=post)


@task
def deploy(pipeline: str, env: str, version: str, stage: str | None) -> dict:
    """Roll a stage's roles (gitaly, fleet, or all) in drained batches; a dry run plans."""
    from liftoff.deploy import roll_stage

    return roll_stage(run_handle(pipeline), env, version, stage, dry_run=params()["dry_run"])


@task
def finish_env(pipeline: str, env: str, version: str) -> dict:
    from liftoff.deploy import finish_env as finish

    if params()["dry_run"]:
        return {"dry_run": True, "env": env}
    return finish(run_handle(pipeline), env, version)


def gate(env: str, version: str, qa: bool, expect_version: bool = True):
    """QA (optional) then the quiet period (a window below the inventory's minimum passes only
    with the run's allow_precheck_failure reason); returns (first, last) of the chain."""
    quiet = QuietPeriodSensor(task_id="quiet_period", env=env, window_s=quiet_window(),
                              dry_run=dry_run_flag(),
                              override_reason="{{ params.get('allow_precheck_failure') or '' }}")
    if not qa:
        return quiet, quiet
    qa_task = QAGateOperator(task_id="qa", env=env, version=version, expect_version=expect_version,
                             dry_run=dry_run_flag())
    qa_task >> quiet
    return qa_task, quiet


@task
def rollback(pipeline: str, envs: list[str]) -> dict:
    """Return the environment that failed to its last good version through the rollback flow
    (safety check first: refused past post-deployment migrations, the run then halts)."""
    from liftoff import notify
    from liftoff.errors import RollbackRefused
    from liftoff.rollback import automatic

    run = run_handle(pipeline)
    notify.rollback_started(run, envs=envs, automatic=True)
    try:
        with notify.refusals(run):
            result = automatic(run, envs)
    except RollbackRefused as exc:
        raise AirflowFailException(str(exc)) from None
    notify.rollback_finished(run, result.get("env"), result.get("version"), automatic=True)
    return result


@task
def halt(pipeline: str, envs: list[str]) -> dict:
    """Stop here, leaving hosts as they are; failed hosts stay drained and recorded."""
    from liftoff import notify
    from liftoff.deploy import mark_failed

    run = run_handle(pipeline)
    result = {"halted": mark_failed(run, envs, "halted"), "drained": [d.host for d in run.store.drained()]}
    notify.halted(run, envs, result)
    return result


@task(trigger_rule=TriggerRule.ALL_DONE)
def finalize(pipeline: str, envs: list[str]) -> dict:
    return finalize_run(pipeline, envs)


@task(task_id="finalize", trigger_rule=TriggerRule.ALL_DONE)
def finalize_env(pipeline: str) -> dict:
    """Always last in a one-environment DAG: this run's unfinished records are marked failed,
    then its lock is released and its result pushed (finalize_run)."""
    from liftoff.deploy import mark_unfinished

    env = params()["environment"]
    mark_unfinished(run_handle(pipeline), [env], "failed")
    return finalize_run(pipeline, [env])


def failure_handling(pipeline: str, envs: list[str], upstream: list) -> Any:
    """on_failure -> rollback | halt -> finalize; returns finalize."""
    decide = on_failure()
    upstream >> decide
    end = finalize(pipeline, envs)
    decide >> [rollback(pipeline, envs), halt(pipeline, envs)] >> end
    return end


def schedule_from_env(name: str, default: str | None) -> str | None:
    value = os.environ.get(name, default or "")
    return value or None
