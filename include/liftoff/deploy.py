"""The steps a deploy is made of, one function per DAG task, each safe to re-run (a cleared
task resumes: finished hosts are skipped, hosts left drained are repaired).

Every step that changes something passes the door first (:func:`liftoff.guard.admit`): a
cleared task takes the lock again when it is free and refuses, naming the holder, when
someone else holds it; a step that would return the environment to an older package is
refused past post-deployment migrations. Each returns a JSON-able dict (the task's XCom) and
raises on a failed step. A rollout returns a short summary; its full report is kept in the
state store (``Store.report(run_id, summary["report"]["rollout"])``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable

from liftoff import builds, chef, fleet, guard, locks, migrations
from liftoff.errors import InvalidInput, LiftoffError
from liftoff.inventory import Environment
from liftoff.metrics import REDACTED
from liftoff.runs import Run, for_build, run_sync
from liftoff.store import DEPLOYMENT_KINDS
from liftoff.versions import parse_version, validate_reason

log = logging.getLogger(__name__)

MODES = ("normal", "fast")
GITALY_STAGE = "gitaly"
FAST_BATCH = "50%"
FAST_CAPACITY_FLOOR = "0%"
FAST_DRAIN_TIMEOUT = 2.0
NORMAL_DRAIN_TIMEOUT = 60.0


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise InvalidInput(f"rollback mode must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


def stage_roles(env: Environment, stage: str | None) -> list[str]:
    """``gitaly``: the gitaly stage's roles; ``fleet``: every other role; None: every role."""
    gitaly = [r.name for r in env.roles_in_stage(GITALY_STAGE)]
    if stage is None:
        return [r.name for r in env.roles]
    if stage == GITALY_STAGE:
        return gitaly
    if stage == "fleet":
        return [r.name for r in env.roles if r.name not in gitaly]
    raise InvalidInput(f"stage must be 'gitaly' or 'fleet', got {stage!r}")


def fast_environment(env: Environment) -> Environment:
    """The environment with every role in batches of at least ``FAST_BATCH`` of its hosts and no
    capacity floor (fast mode: as fast as the fleet allows, some requests may fail)."""
    roles = []
    for role in env.roles:
        fast = dataclasses.replace(role, batch=FAST_BATCH, capacity_floor=FAST_CAPACITY_FLOOR)
        batch = role.batch if role.batch_size() > fast.batch_size() else FAST_BATCH
        roles.append(dataclasses.replace(role, batch=batch, capacity_floor=FAST_CAPACITY_FLOOR))
    return dataclasses.replace(env, roles=tuple(roles))


def rollout_options(mode: str, included_patches: tuple[str, ...] = (),
                    rollout_mode: str | None = None) -> fleet.RolloutOptions:
    """Cleanup starts chef; fast mode waits briefly for sessions; the patches the build
    includes are not re-applied; ``rollout_mode`` (lockstep or window) for every role, None:
    each role's own (the inventory's ``rollout``)."""
    drain = FAST_DRAIN_TIMEOUT if check_mode(mode) == "fast" else NORMAL_DRAIN_TIMEOUT
    return fleet.RolloutOptions(chef_start="cleanup", drain_timeout=drain, included_patches=included_patches,
                                rollout_mode=rollout_mode)


def prepare_env(run: Run, env: Environment, version: str) -> dict:
    """Stop chef, write the version role and install ``version`` on the deploy node (the caller
    passed the door); chef's report."""

    async def go():
        async with run.remote(env.name) as remote:
            report = await chef.prepare(remote, env, version, run.run_id)
            await migrations.ensure_package(remote, env, version, run.run_id)
            return report

    return run_sync(go()).to_dict()


def begin_env(run: Run, env_name: str, version: str, previous: str | None = None) -> dict:
    """Take the environment's lock (the door), record the deploy, stop chef, write the version
    role and install the package on the deploy node."""
    version = str(parse_version(version))
    with guard.entered(run, env_name, "begin", version=version, keep=True):
        env = run.env(env_name)
        if previous and previous != version and run.store.current_version(env.name) is None:
            # First deploy liftoff sees here: remember what ran before, for rollbacks.
            run.store.record_deployment(env.name, previous, "baseline", status="success")
        run.store.record_deployment(env.name, version, run.run_id, status="running")
        return {"env": env.name, "version": version, "chef": prepare_env(run, env, version)}


def migrate(run: Run, env_name: str, version: str, *, post: bool) -> dict:
    """Regular (or post-deployment) migrations from the environment's deploy node."""
    env = run.env(env_name)

    async def go():
        async with run.remote(env.name) as remote:
            fn = migrations.post_deployment if post else migrations.regular
            return await fn(remote, env, version=version, run_id=run.run_id)

    with guard.entered(run, env_name, "migrations", version=version, keep=True):
        return run_sync(go()).to_dict()


def deploy_roles(run: Run, env_name: str, version: str, stage: str | None = None,
                 roles: list[str] | None = None, dry_run: bool = False,
                 options: fleet.RolloutOptions | None = None, mode: str = "normal",
                 rollout_mode: str | None = None) -> dict:
    """Roll ``version`` onto ``roles`` (default: the stage's, see :func:`stage_roles`) in drained
    batches (fast mode: big batches, short drain wait; ``rollout_mode``: see
    :func:`rollout_options`); a dry run plans; raises when a host failed."""
    env = run.env(env_name)
    version = str(parse_version(version))
    selected = list(roles) if roles else stage_roles(env, stage)
    options = options or rollout_options(mode, builds.included_patches(run.inventory, version), rollout_mode)
    target_env = fast_environment(env) if mode == "fast" else env
    if dry_run:
        patches = fleet.pending_patches(run.store, env.name)
        modes = {r.name: fleet.role_mode(r, options) for r in fleet.select_roles(env, selected)}
        return {"env": env.name, "dry_run": True, "modes": modes, "plan": [
            p.to_dict() for p in fleet.plan(target_env, selected, version, run_id=run.run_id, options=options,
                                            patches=patches)]}
    if not selected:
        return {"env": env.name, "stage": stage, "roles": [], "skipped": "no roles in this stage"}
    fleet.select_roles(env, selected)  # every input checked before the door reads anything
    with guard.entered(run, env.name, "rollout", version=version, keep=True):
        report = fleet.run_rollout(target_env, version, run_id=run.run_id, store=run.store, roles=selected,
                                   ssh_conn_id=run.inventory.conn_id("ssh"), options=options)
        summary = keep_report(run, report, stage or "+".join(selected))
        report.raise_for_failure()
    return summary


def keep_report(run: Run, report: fleet.RolloutReport, part: str) -> dict:
    """Save the full report in the state store (every attempt kept) and return its summary (the
    task's XCom), which says where the report is. Should the store refuse, the summary carries
    the whole report instead: never lost."""
    key = f"{report.rollout}/{part}"[:250]
    where = {"store": "liftoff_rollout_reports", "run_id": run.run_id, "rollout": key}
    try:
        run.store.save_report(run.run_id, report.env, key, report.to_json())
    except LiftoffError as exc:
        log.warning("could not keep the rollout report of %s in the state store (%s): it is in the XCom",
                    key, exc)
        where = {"xcom": "full_report", "store_error": str(exc)}
        return {**report.summary(where), "full_report": report.to_dict()}
    return report.summary(where)


def roll_stage(run: Run, env_name: str, version: str, stage: str | None, mode: str = "normal", *,
               dry_run: bool = False, rollout_mode: str | None = None) -> dict:
    """Roll one stage's roles (``gitaly``, ``fleet``, or every role for None); see :func:`deploy_roles`."""
    out = deploy_roles(run, env_name, version, stage, dry_run=dry_run, mode=mode, rollout_mode=rollout_mode)
    return out if dry_run or "skipped" in out else {**out, "stage": stage, "mode": mode}


def restart_chef(run: Run, env_name: str, version: str) -> dict:
    """Cleanup: the role holds ``version``, chef starts again (not on hosts left drained)."""
    env = run.env(env_name)

    async def go():
        async with run.remote(env.name) as remote:
            return await chef.finish(remote, env, version, failed_hosts=failed)

    with guard.entered(run, env_name, "chef", version=version, keep=True):
        failed = [d.host for d in run.store.drained(env.name)]
        return {"env": env.name, "version": version, "chef": run_sync(go()).to_dict()}


def finish_env(run: Run, env_name: str, version: str, status: str = "success") -> dict:
    """Cleanup: the role holds the version, chef starts again (not on failed hosts), the
    deployment is recorded and the lock released."""
    result = restart_chef(run, env_name, version)
    run.store.record_deployment(env_name, version, run.run_id, status=status)
    run.store.release(env_name, run.run_id)
    run.metrics().deployed_version(env_name, version)
    return result


# -- fast deploy ----------------------------------------------------------------------------------

def public_version(version: str, internal: bool) -> str:
    """What notifications and metric labels may show of a version."""
    return REDACTED if internal else str(version)


def redact(text: str, version: str, internal: bool) -> str:
    return text.replace(str(version), REDACTED) if internal else text


def begin_fast_deploy(run: Run, env_name: str, version: str, reason: str, internal: bool,
                      previous: str | None = None) -> dict:
    """:func:`begin_env` with the reason in the lock history (``fast_deploy VERSION: reason``)."""
    version = str(parse_version(version))
    reason = redact(validate_reason(reason), version, internal)
    why = f"fast_deploy {public_version(version, internal)}: {reason}"
    locks.hold(run, run.env(env_name).name, why)  # LockHeld names another holder
    result = begin_env(for_build(run, internal), env_name, version, previous)
    result["lock_reason"] = why
    return result


def finish_fast_deploy(run: Run, env_name: str, version: str, reason: str, internal: bool) -> dict:
    """Cleanup (chef, record, lock), then push the deployed version (``internal`` when
    undisclosed) and the fast deploy with its reason."""
    run = for_build(run, internal)
    result = finish_env(run, env_name, version)
    pushed = run.metrics().fast_deploy(env_name, public_version(version, internal),
                                       redact(validate_reason(reason), version, internal))
    result.update(public_version=public_version(version, internal), metric_pushed=pushed)
    if internal:
        result["version"] = REDACTED
    return result


# -- the run's records --------------------------------------------------------------------------

def failed_environment(run: Run, envs: list[str]) -> str | None:
    """The environment this run was changing when it failed: the last one it started and did
    not finish."""
    for name in reversed(envs):
        mine = [d for d in run.store.deployments(name) if d.run_id == run.run_id and d.kind == "deploy"]
        if mine and mine[0].status == "running":
            return name
    return None


def close_records(run: Run, envs: Iterable[str], status: str,
                  kinds: Iterable[str] = DEPLOYMENT_KINDS) -> list[tuple[str, str]]:
    """Give this run's still-running deployment records of ``kinds`` a final status;
    ``(env, kind)`` of each one closed."""
    kinds = tuple(kinds)
    closed = []
    for name in envs:
        for d in run.store.deployments(name):
            if d.run_id == run.run_id and d.kind in kinds and d.status == "running":
                run.store.record_deployment(name, d.version, run.run_id, kind=d.kind, status=status)
                closed.append((name, d.kind))
    return closed


def mark_failed(run: Run, envs: list[str], status: str) -> list[str]:
    """Record this run's unfinished deployments as failed/halted/rolled back."""
    return [name for name, _ in close_records(run, envs, status, kinds=("deploy",))]


def mark_unfinished(run: Run, envs: Iterable[str], status: str = "failed") -> list[str]:
    """Give this run's still-running records (deploys and rollbacks) a final status."""
    return [f"{name}:{kind}" for name, kind in close_records(run, envs, status)]
