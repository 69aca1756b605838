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

from liftoff.inventory import ROLLOUT_MODES
from liftoff_airflow.operators import QAGateOperator, QuietPeriodSensor
from liftoff_airflow.params import REASON_PATTERN, VERSION_PATTERN

# deploy_canary's outlet once canary verified a build; deploy_production's schedule with auto-promotion.
CANARY_VERIFIED = Asset("liftoff://canary-verified")


def notify_failure(context: Any) -> None:
    """Every task's ``on_failure_callback``: the failed step's reason kept for finalize, watch
    and the UI, and told to chat (never raises)."""
    from liftoff import notify

    record_failure(context)
    note_failure(context)
    notify.step_failed(context)


def note_failure(context: Any) -> bool:
    """In a DAG without a finalize task (canary_weight, deploy_lock, traffic) the failed step's
    sentence is the run's note at once (finalize writes it in the others). Never raises."""
    from liftoff.notes import set_run_note

    try:
        dag, ti, dag_run = context.get("dag"), context.get("ti"), context.get("dag_run")
        if dag is None or ti is None or dag_run is None or "finalize" in dag.task_dict:
            return False
        reason = failure_reason(context.get("exception"))
        text = f"{dag_run.dag_id} failed at {ti.task_id}: {reason}"
        return set_run_note(dag_run.dag_id, dag_run.run_id, text)
    except Exception:  # the failure stands; only its note is lost
        return False


def failure_reason(exc: Any) -> str:
    """A task's exception as one sentence (its type when it says nothing)."""
    text = " ".join(str(exc or "").split())
    if not text and exc is not None:
        text = f"{type(exc).__name__} (no message; see the task log)"
    return (text or "no reason given (see the task log)")[:1000]


def record_failure(context: Any) -> bool:
    """Keep why the task failed in liftoff's state store (never raises: a callback)."""
    import logging

    from liftoff.store import Store

    try:
        ti = context.get("ti") or context.get("task_instance")
        dag_run = context.get("dag_run")
        run_id = str(getattr(dag_run, "run_id", "") or getattr(ti, "run_id", ""))
        task_id = str(getattr(ti, "task_id", ""))
        if not run_id or not task_id or task_id == "finalize":
            return False
        Store.from_settings().record_step_failure(run_id, task_id, failure_reason(context.get("exception")))
        return True
    except Exception as exc:  # the failure stands; only its reason is lost
        logging.getLogger(__name__).warning("could not record why the task failed: %s", exc)
        return False


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


# The trigger form's choice of rollout mode; "role": each role's own (the inventory's ``rollout``).
ROLLOUT_CHOICES = ("role", *ROLLOUT_MODES)


def rollout_param() -> Param:
    return Param("role", enum=list(ROLLOUT_CHOICES), title="Rollout mode",
                 values_display={"role": "each role's own (the inventory's rollout)",
                                 "lockstep": "lockstep: batch after batch",
                                 "window": "window: at most a batch out, the next host as one is back"},
                 description="How each role's hosts go out of service: lockstep batches (GitLab's deployer) "
                             "or a sliding window of at most a batch (a slow host holds only itself). "
                             "The capacity floor and the drain records hold either way.")


def rollout_mode() -> str | None:
    """The run's rollout mode for the engine: None for "role" (or unset)."""
    choice = params().get("rollout_mode", "role")
    return None if choice in (None, "role") else choice


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
    "rollout_mode": rollout_param(),
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
    return Run(run_id=dag_run.run_id, who=safe_name(str(who)), pipeline=pipeline,
               override_reason=override_reason)


def safe_name(name: str) -> str:
    """A user name as the engine's names allow it ([A-Za-z0-9._@+-]); run ids stay as Airflow
    made them (the engine takes Airflow's run-id alphabet), so they can be pasted anywhere."""
    return "".join(c if c.isalnum() or c in "._@+-" else "_" for c in name)[:120]


def hide_internal(version: str, internal: bool) -> None:
    """In a run of an internal build, Airflow's secrets masker hides the version (every form
    of it) in this task's log lines, as it hides a password."""
    if not internal:
        return
    from airflow.sdk.log import mask_secret

    from liftoff.status import internal_traces

    for trace in internal_traces(version):
        mask_secret(trace)


def scrub_internal(value: Any, version: str, internal: bool) -> Any:
    """A task's return value (its XCom, shown in the UI) with an internal build's version as
    ``internal-<short hash>``."""
    if not internal:
        return value
    from liftoff.status import scrub_internal as scrub

    return scrub(value, version)


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


# A failure in these task groups, in a step that is neither the named task nor after it, halts
# whatever on_failure says: GitLab's production checks before the post-deployment migrations
# failed (a person said no, or nobody answered) after the deploy itself passed every gate, so a
# rollback would undo a deploy nothing questioned; production stays on the new version, the
# migrations wait. A failure from the stage's precheck on still takes the rollback path
# (liftoff.guard refuses it past post-deployment migrations).
NO_ROLLBACK_BEFORE = {
    "stage_9_post_deployment_migrations.precheck": "production checks before the post-deployment migrations",
}


def no_rollback_reason(failed: list[str], dag: Any = None) -> str | None:
    """Why a run that asked for a rollback halts instead (None: it may roll back)."""
    dag = get_current_context()["dag"] if dag is None else dag
    for target, what in NO_ROLLBACK_BEFORE.items():
        if target not in dag.task_dict:
            continue
        group = target.rsplit(".", 1)[0] + "."
        after = {target, *dag.task_dict[target].get_flat_relative_ids(upstream=False)}
        for task_id in failed:
            if task_id.startswith(group) and task_id not in after:
                return (f"not rolled back: {task_id} failed in the {what}; the deploy passed its gates, "
                        "so production stays on the new version and the migrations wait")
    return None


@task.branch(trigger_rule=TriggerRule.ONE_FAILED)
def on_failure() -> str:
    """A gate failed: roll the failed environment back, or halt, as the run asked (a failure in
    the checks before the post-deployment migrations halts: :data:`NO_ROLLBACK_BEFORE`)."""
    if params().get("on_failure") != "rollback":
        return "halt"
    return "halt" if no_rollback_reason(failed_tasks()) else "rollback"


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


def lock_story(run: Any, envs: list[str]) -> dict[str, list[str]]:
    """What this run did with each environment's lock, oldest first, from the lock history
    (a rollback task releases its lock before finalize does)."""
    story: dict[str, list[str]] = {"taken": [], "released": [], "forced": [], "still_held": []}
    for env in envs:
        for event in reversed(run.store.lock_events(env)):
            if event.run_id != run.run_id:
                continue
            if event.action == "acquire" and env not in story["taken"]:
                story["taken"].append(env)
            elif event.action == "release" and env not in story["released"]:
                story["released"].append(env)
            elif event.action == "force_release":
                why = f" ({event.reason})" if event.reason else ""
                story["forced"].append(f"{env} force-released by {event.who}{why}")
    story["still_held"] = [e for e in envs
                           if (lock := run.store.get_lock(e)) is not None and lock.run_id == run.run_id]
    return story


def lock_sentence(story: dict[str, list[str]]) -> str:
    if story["taken"] or story["released"] or story["forced"]:
        text = (f"locks taken: {', '.join(story['taken']) or 'none'}; "
                f"locks released: {', '.join(story['released']) or 'none'}")
    else:
        text = "no lock taken"
    text += "".join(f"; {f}" for f in story["forced"])
    return text + (f"; still held: {', '.join(story['still_held'])}" if story["still_held"] else "")


def next_step(run_id: str, dag_id: str, failed: list[str]) -> str:
    """What a release manager does next after the first failing step."""
    stage = next((t.split(".", 1)[0] for t in failed if t.startswith("stage_") and "." in t), None)
    if stage:
        return (f"next: fix the cause, then retry the stage (liftoff retry {run_id} {stage} --dag {dag_id}) "
                f"or roll back (liftoff rollback ENV)")
    return f"next: fix the cause, then trigger {dag_id} again (see the failed task's log)"


def run_sentence(pipeline: str, failed: list[str], not_run: list[str], reasons: dict[str, str]) -> str:
    """The run's result: the first failing step (run order) with its reason, then the others."""
    if failed:
        first = failed[0]
        text = f"{pipeline} failed at {first} (first)"
        if reasons.get(first):
            text += f": {reasons[first].rstrip('.')}"
        later = failed[1:5] + ([f"{len(failed) - 5} more"] if len(failed) > 5 else [])
        return text + (f"; then {', '.join(later)}" if later else "")
    if not_run:
        return (f"{pipeline} failed: {len(not_run)} task(s) did not run "
                f"(upstream_failed: {', '.join(not_run[:5])})")
    return f"{pipeline} succeeded"


def keep_changes(seen: list, version: str, envs: list[str]) -> None:
    """The deploy has begun: keep its change range (``liftoff.changes.summary_line``) as the
    XCom ``changes`` for finalize's sentence, and say in the run's note what the run deploys
    (the runs list shows it while it runs; finalize replaces it with the result)."""
    from liftoff.changes import summary_line
    from liftoff.notes import set_run_note

    ctx = get_current_context()
    line = summary_line(seen[0]) if seen else None
    if line:
        ctx["ti"].xcom_push("changes", line)
    dag_run = ctx["dag_run"]
    set_run_note(dag_run.dag_id, dag_run.run_id,
                 f"{dag_run.dag_id}: deploying {version} to {', '.join(envs)} (running)"
                 + (f"; {line}" if line else ""))


def changes_line(ctx: Any) -> str | None:
    """The run's ``what changed`` line kept by ``resolve_version``, if it has one."""
    if not ctx or "resolve_version" not in ctx["dag"].task_dict:
        return None
    try:
        line = ctx["ti"].xcom_pull(task_ids="resolve_version", key="changes")
    except Exception:  # an older run without it
        return None
    return line if isinstance(line, str) and line else None


def finalize_run(pipeline: str, envs: list[str], *, run: Any = None,
                 states: dict[str, str | None] | None = None, dag: Any = None) -> dict:
    """Always runs last: release this run's locks, push the pipeline's result, fail the run
    when anything failed, with one sentence: the first failing step (run order) and why (the
    reason its failure callback recorded), the locks this run took and released, and what to
    do next. The sentence is the run's note in the Airflow UI, its ``summary`` XCom (``watch``
    and ``status`` print it) and its chat message. ``run``, ``states`` and ``dag`` come from the
    task's context unless given (tests)."""
    from liftoff import notify
    from liftoff.locks import release_locks
    from liftoff.notes import set_run_note

    ctx = get_current_context() if run is None or states is None or dag is None else None
    run = run_handle(pipeline) if run is None else run
    if states is None:
        dag_run = ctx["dag_run"]
        answer = ctx["ti"].get_task_states(dag_id=dag_run.dag_id, run_ids=[dag_run.run_id])
        states = answer.get(dag_run.run_id, answer)
    finalize_released = release_locks(run, envs)
    failed = failed_tasks(states, ctx["dag"] if dag is None else dag)
    not_run = sorted(t for t, s in states.items() if s == "upstream_failed")
    reasons = run.store.step_failures(run.run_id)
    story = lock_story(run, envs)
    status = "failed" if failed or not_run else "success"
    dag_id = ctx["dag_run"].dag_id if ctx else pipeline
    summary = f"{run_sentence(pipeline, failed, not_run, reasons)}; {lock_sentence(story)}"
    if status == "failed":
        summary += f". {next_step(run.run_id, dag_id, failed)}"
    if changed := changes_line(ctx):
        summary += f". {changed}"
    result = {"status": status, "summary": summary, "failed": failed,
              "reason": reasons.get(failed[0]) if failed else None,
              "locks_taken": story["taken"], "locks_released": story["released"],
              "locks_force_released": story["forced"], "locks_still_held": story["still_held"],
              "released": finalize_released}

    start = ctx["dag_run"].start_date if ctx else None
    run.metrics().pipeline_status(status, start.timestamp() if start else None, time.time())
    notify.run_finished(run, result)
    if ctx:
        set_run_note(dag_id, run.run_id, summary)
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

    return roll_stage(run_handle(pipeline), env, version, stage, dry_run=params()["dry_run"],
                      rollout_mode=rollout_mode())


@task
def finish_env(pipeline: str, env: str, version: str) -> dict:
    from liftoff.deploy import finish_env as finish

    if params()["dry_run"]:
        return {"dry_run": True, "env": env}
    return finish(run_handle(pipeline), env, version)


def gate(env: str, version: str, qa: bool, expect_version: bool = True):
    """QA (optional) then the quiet period (a window below the inventory's minimum passes only
    with the run's allow_precheck_failure reason); returns (first, last) of the chain."""
    quiet = QuietPeriodSensor(task_id="quiet_period", env=env)  # params: quiet_period_seconds, dry_run, ...
    if not qa:
        return quiet, quiet
    qa_task = QAGateOperator(task_id="qa", env=env, version=version, expect_version=expect_version)
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
    if params().get("on_failure") == "rollback":
        result["not_rolled_back"] = no_rollback_reason(failed_tasks())
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
