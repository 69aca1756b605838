"""Rollback: one flow, called by both the ``rollback`` DAG (a task per step) and a failed
gate's ``on_failure=rollback`` (:func:`automatic`, every step in one task):

target choice -> mandatory safety check -> canary shield -> begin (lock, record, chef
stopped, role and deploy node on the target) -> reverse rollout (fleet roles first, gitaly
last) -> chef back on -> record.

The safety check refuses when post-deployment migrations the target does not contain ran on
the environment's database (read with ``db:migrate:status`` on its deploy node, against what
the build source says of the target), unless the run carries an override reason; every
step that changes something passes the door (:mod:`liftoff.guard`), which checks it again.
An automatic rollback refused for that reason halts the run with one sentence and a record.
"""

from __future__ import annotations

import logging
from collections import Counter

from liftoff import canary, deploy, guard, locks, patches
from liftoff.errors import LockHeld, RollbackRefused
from liftoff.inventory import Inventory
from liftoff.runs import Run, read_installed
from liftoff.versions import parse_version, validate_reason

log = logging.getLogger(__name__)

rollback_target = guard.rollback_target


def sharing_database(inventory: Inventory, env_name: str) -> list[str]:
    """Environments on the same database as ``env_name`` (itself included; canary and main)."""
    db = inventory.env(env_name).database
    return [e.name for e in inventory.environments.values() if e.database == db]


def rollback_command(env: str, target: str | None) -> str:
    return f"liftoff rollback {env} --to {target or 'VERSION'}"


def _target_problems(env: str, current: str | None, target: str | None) -> list[str]:
    if target is None:
        return [f"no earlier successful deployment of {env} is recorded: name the target version"]
    if target == current:
        return [f"{target} is the current version of {env}: nothing to roll back"]
    return []


def _lock_problems(run: Run, env: str) -> list[str]:
    problems = []
    for name in sharing_database(run.inventory, env):
        lock = locks.held_by_other(run, name)
        if lock is not None:
            what = "locked by hand" if locks.by_hand(lock) else "a deploy is running"
            problems.append(f"{what}: {locks.describe(lock)}")
    return problems


def safety_check(run: Run, env_name: str, target: str | None = None) -> dict:
    """``rollback check``: may ``env_name`` go back to ``target`` (default: the previous version)?

    Unsafe, and only overridable with a reason: post-deployment migrations the target does not
    contain have run, or that cannot be told. Unsafe and not overridable: no target, the target
    is the current version, or a run other than this one holds the lock of an environment on
    the same database (a deploy is running)."""
    env = run.env(env_name)
    current, default = rollback_target(run.store.deployments(env.name))
    installed = read_installed(run, env)
    counts = Counter(v for v in installed.values() if v)
    if current is None and counts:
        current = counts.most_common(1)[0][0]
    target = str(parse_version(target)) if target else default
    blocking = _target_problems(env.name, current, target) + _lock_problems(run, env.name)
    overridable: list[str] = []
    unreadable = sorted(h for h, v in installed.items() if v is None)
    if unreadable:
        overridable.append(f"cannot read the installed package on {', '.join(unreadable)}")
    newer, applied = [], None
    if target is not None:
        newer, risks, applied = guard.downgrade_risks(run, env, target)
        overridable += risks
    reasons = blocking + overridable
    return {
        "safe": not reasons, "reasons": reasons, "current": current, "target": target,
        "newer_post_migrations": newer, "command": rollback_command(env.name, target),
        "env": env.name, "overridable": not blocking, "installed": dict(counts),
        "applied_post_migrations": applied,
    }


def require_safe(check: dict, override_reason: str | None = None) -> dict:
    """Pass a safe check; pass an unsafe but overridable one with a reason (marked overridden);
    raise RollbackRefused otherwise."""
    if check["safe"]:
        return {**check, "overridden": False}
    reasons = "; ".join(check["reasons"])
    if not check["overridable"]:
        raise RollbackRefused(f"rollback of {check['env']} refused: {reasons}")
    if not override_reason:
        raise RollbackRefused(f"rollback of {check['env']} to {check['target']} is unsafe: {reasons}. "
                              f"Override only with a reason (override_reason), it is recorded.")
    reason = validate_reason(override_reason, field_name="override_reason")
    log.warning("unsafe rollback of %s to %s overridden: %s (%s)", check["env"], check["target"], reason,
                reasons)
    return {**check, "overridden": True, "override_reason": reason}


def begin_rollback(run: Run, env_name: str, target: str, mode: str, reason: str | None = None,
                   override_reason: str | None = None) -> dict:
    """Take the lock (the reason says target, mode, why and any safety override), pass the door,
    record the rollback, count it, stop chef and point the role at the target, install it on
    the deploy node."""
    env = run.env(env_name)
    target = str(parse_version(target))
    deploy.check_mode(mode)
    why = f"rollback to {target}, {mode} mode"
    if reason:
        why += f": {validate_reason(reason)}"
    if override_reason:
        why += f", safety check overridden: {validate_reason(override_reason, field_name='override_reason')}"
    locks.hold(run, env.name, why)
    for name in sharing_database(run.inventory, env.name):  # started since the safety check?
        lock = locks.held_by_other(run, name)
        if lock is not None:
            run.store.release(env.name, run.run_id)
            raise LockHeld(lock, f"rollback of {env.name} stopped: {name} (same database) is now locked by "
                                 f"{lock.who} (run {lock.run_id})")
    guard.admit(run, env.name, "rollback", version=target)
    run.store.record_deployment(env.name, target, run.run_id, kind="rollback", status="running")
    run.metrics().rollback(env.name)
    return {"env": env.name, "version": target, "mode": mode, "lock_reason": why,
            "chef": deploy.prepare_env(run, env, target)}


def roll(run: Run, env_name: str, target: str, stage: str, mode: str,
         rollout_mode: str | None = None) -> dict:
    """One stage of the reverse rollout (``fleet`` first, then ``gitaly``); ``rollout_mode``:
    see :func:`liftoff.deploy.rollout_options`."""
    return deploy.roll_stage(run, env_name, target, stage, mode, rollout_mode=rollout_mode)


def rollback_done(run: Run, env_name: str, target: str) -> dict:
    """The rollback passed its gates: record it, release the lock, push the deployed version."""
    env = run.env(env_name)
    run.store.record_deployment(env.name, target, run.run_id, kind="rollback", status="success")
    released = run.store.release(env.name, run.run_id)
    run.metrics().deployed_version(env.name, target)
    return {"env": env.name, "version": target, "released": released}


def _refused(run: Run, env: str, check: dict) -> RollbackRefused:
    """Halt the run's deploy of ``env`` with a record and one sentence saying what to do next."""
    deploy.mark_failed(run, [env], "halted")
    target = check.get("target")
    sentence = (f"automatic rollback of {env} to {target or 'an earlier version'} refused: "
                f"{'; '.join(check['reasons'])}. The run halted and left {env} as it is. Next: fix forward "
                f"with a new build, or roll back by hand with a recorded reason "
                f"({rollback_command(env, target)} --override-reason ...)")
    run.store.record_event(env, "rollback_refused", run.run_id, run.who, sentence)
    log.error("%s", sentence)
    return RollbackRefused(sentence)


def automatic(run: Run, envs: list[str]) -> dict:
    """``on_failure=rollback``: the environment the run was changing goes back to its last good
    version through the same flow as the rollback DAG (normal mode, no gates of its own)."""
    env = deploy.failed_environment(run, envs)
    if env is None:
        deploy.mark_failed(run, envs, "failed")
        return {"rolled_back": None, "reason": "no environment was changed"}
    check = safety_check(run, env)
    try:
        require_safe(check, run.override_reason)
        shield = canary.shield_for_rollback(run, env)
        begin = begin_rollback(run, env, check["target"], "normal", "automatic rollback after a failed gate",
                               run.override_reason)
    except RollbackRefused as exc:
        if check["safe"]:  # refused by the door for another reason (a lock taken meanwhile)
            check = {**check, "reasons": [str(exc)]}
        raise _refused(run, env, check) from None
    rollouts = [roll(run, env, check["target"], stage, "normal") for stage in ("fleet", "gitaly")]
    chef = deploy.restart_chef(run, env, check["target"])
    done = rollback_done(run, env, check["target"])
    deploy.mark_failed(run, [env], "rolled_back")
    streak = patches.count_automatic_rollback(run, env, check["target"])
    if streak["halt"]:
        log.error("canary deploys halted: %s", streak["halt"]["reason"])
    return {"env": env, "version": check["target"], "shield": shield, "lock_reason": begin["lock_reason"],
            "rollouts": rollouts, "chef": chef["chef"], "released": done["released"], "streak": streak}
