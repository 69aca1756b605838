"""The one door: every change to hosts, load balancers, the version role, the database or chef
passes :func:`admit` first, on every call (a first run, a cleared retry, the automatic
rollback, fast paths, the CLI and the REST API alike).

On each call it checks, in this order, and refuses with one sentence before anything changes:

1. the inputs: a known environment, a known kind of change, a valid package version;
2. the lock: this run holds the environment's lock; it is taken when free (again, for a task
   cleared after its run released it) and refused naming the holder when another run or a
   person holds it (``force`` lets a rollback's canary shield pass a canary deploy, recorded);
3. migration safety, for a change that returns the environment to an older package: no
   post-deployment migration the target does not contain has run on its database; refused
   (:class:`RollbackRefused`) unless the run carries an override reason, which is recorded in
   the environment's lock history;
4. the load balancers: every LB of the environment (and of its production, for a canary) is
   read, and one that lost what liftoff's records say it must hold (drained hosts, the canary
   weight and state: an LB restarted without its runtime state) gets it back, logged and
   recorded (:mod:`liftoff.lbstate`). For a change that touches the LBs (a rollout, a canary
   weight) an LB that cannot be read (or be put right) refuses the change naming it
   (HAProxyError), as the change itself would; other changes (begin, migrations, chef, a
   patch, a rollback's start) do not need the LBs: there it is a warning and the change goes on.

The engine's steps pass it with :func:`entered` (a lock the step took is given back if the step
fails; a pipeline step keeps it on success, a one-shot change does not) or :func:`admit`; a
unit test walks the engine's source and fails when a function that changes something does not.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from liftoff import builds, lbstate, locks, migrations
from liftoff.commands import installed_version_command
from liftoff.errors import InvalidInput, LiftoffError, RollbackRefused
from liftoff.haproxy import HAProxy
from liftoff.inventory import Environment
from liftoff.runs import Run, run_sync
from liftoff.store import Deployment
from liftoff.versions import parse_version

log = logging.getLogger(__name__)

# What a step may change; each names the thing release managers would say.
CHANGES = ("begin", "migrations", "rollout", "chef", "canary_weight", "patch", "rollback")
LB_CHANGES = ("rollout", "canary_weight")  # changes that touch the LBs: their state is put back first
SHOWN_MIGRATIONS = 10


@dataclass(frozen=True)
class Admission:
    """Proof that a step passed the door: for which run, environment, change and version."""

    env: str
    run_id: str
    change: str
    version: str | None = None
    took_lock: bool = False
    downgrade_from: str | None = None
    newer_post_migrations: tuple[str, ...] = ()
    overridden: str | None = None
    notes: list[str] = field(default_factory=list)


def rollback_target(deployments: Sequence[Deployment]) -> tuple[str | None, str | None]:
    """(current, default rollback target) from an environment's records, newest first.

    Current: the version of the newest record, whatever its status (a failed or halted deploy
    counts: its hosts may be half on it), except a rollback that did not finish (running it
    again aims at the same target). Target: the newest successful deploy or rollback of an
    older version, so a second rollback goes further back, never forward to what was rolled
    back from."""
    records = [d for d in deployments if d.kind != "rollback" or d.status == "success"]
    if not records:
        return None, None
    current = records[0].version
    now = parse_version(current)
    for d in records:
        if d.status == "success" and parse_version(d.version) < now:
            return current, d.version
    return current, None


def current_version(run: Run, env: Environment) -> str | None:
    """What the environment runs: its newest record, else what its deploy node has installed."""
    current, _ = rollback_target(run.store.deployments(env.name))
    if current is not None:
        return current

    async def read() -> str | None:
        async with run.remote(env.name) as remote:
            r = await remote.run(env.deploy_node, installed_version_command(), 60)
        return (r.stdout.strip() or None) if r.ok else None

    return run_sync(read())


def applied_post_migrations(run: Run, env: Environment) -> list[str]:
    async def read() -> list[str]:
        async with run.remote(env.name) as remote:
            return await migrations.applied_post_migrations(remote, env)

    return run_sync(read())


def downgrade_risks(run: Run, env: Environment, target: str) -> tuple[list[str], list[str], int | None]:
    """Why returning ``env`` to ``target`` may be unsafe: (post-deployment migrations newer than
    the target that ran, reasons in words, how many post-deployment migrations ran)."""
    try:
        applied = applied_post_migrations(run, env)
    except LiftoffError as exc:
        return [], [f"cannot read the post-deployment migrations of database {env.database}: {exc}"], None
    info = builds.build_info(run.inventory, target)
    found, how = migrations.newer_post_migrations(applied, info) if info else (None, "")
    if found is None:
        why = "does not list it" if not info else "gives no schema version"
        return [], [f"cannot tell which post-deployment migrations {target} contains: the build source "
                    f"{why}"], len(applied)
    if not found:
        return [], [], len(applied)
    shown = ", ".join(found[:SHOWN_MIGRATIONS]) + (
        f" and {len(found) - SHOWN_MIGRATIONS} more" if len(found) > SHOWN_MIGRATIONS else "")
    return found, [f"{len(found)} post-deployment migration(s) newer than {target} ran on {env.database} "
                   f"({how}): {shown}"], len(applied)


def _check_inputs(run: Run, env_name: str, change: str,
                  version: str | None) -> tuple[Environment, str | None]:
    env = run.env(env_name)  # InventoryError naming the known environments
    if change not in CHANGES:
        raise InvalidInput(f"unknown kind of change {change!r} (one of {', '.join(CHANGES)})")
    return env, (str(parse_version(version)) if version is not None else None)


def _hold(run: Run, env: Environment, change: str, version: str | None, force: bool) -> bool:
    """Take or keep the lock; True when this call took it (it was free)."""
    holder = run.store.get_lock(env.name)
    if holder is not None and holder.run_id == run.run_id:
        return False
    if holder is not None and force:
        run.store.record_event(env.name, "override", run.run_id, run.who,
                               f"{change} forced while {locks.describe(holder)}")
        log.warning("%s on %s forced past the lock: %s", change, env.name, locks.describe(holder))
        return False
    shown = "internal" if run.redact_version else version  # an internal build's version stays inside
    locks.hold(run, env.name, f"{run.pipeline} {change}" + (f" {shown}" if shown else ""))
    return True


def _migration_safety(run: Run, env: Environment, change: str,
                      version: str) -> tuple[str | None, list[str], str | None]:
    """(the newer version left, newer post-deployment migrations, the override) for a change to
    ``version``; RollbackRefused when it goes back past post-deployment migrations."""
    current = current_version(run, env)
    if current is None or parse_version(version) >= parse_version(current):
        return None, [], None
    newer, reasons, _ = downgrade_risks(run, env, version)
    if not reasons:
        return current, [], None
    what = "; ".join(reasons)
    if not run.override_reason:
        raise RollbackRefused(
            f"{change} of {env.name} back to {version} refused: {what}. Nothing was changed: roll forward "
            f"with a fixed build, or roll back with an override reason (liftoff rollback {env.name} --to "
            f"{version} --override-reason ...), which is recorded")
    note = f"back to {version} past the migration safety check ({what}), overridden: {run.override_reason}"
    last = next(iter(run.store.lock_events(env.name)), None)
    if last is None or (last.action, last.run_id, last.reason) != ("override", run.run_id, note[:4000]):
        run.store.record_event(env.name, "override", run.run_id, run.who, note)
    log.warning("%s of %s %s", change, env.name, note)
    return current, newer, run.override_reason


def admit(run: Run, env_name: str, change: str, *, version: str | None = None,
          force: bool = False) -> Admission:
    """Pass the door for one change of ``env_name`` (see the module docstring); raises with one
    sentence (InvalidInput, InventoryError, LockHeld, RollbackRefused) when refused."""
    env, version = _check_inputs(run, env_name, change, version)
    took = _hold(run, env, change, version, force)
    try:
        older, newer, override = _migration_safety(run, env, change, version) if version else (None, [], None)
        if change in LB_CHANGES:
            reconcile_lbs(run, env, change)
        else:
            _reconcile_if_reachable(run, env, change)
    except LiftoffError:
        if took:
            run.store.release(env.name, run.run_id)
        raise
    return Admission(env.name, run.run_id, change, version, took, older, tuple(newer), override)


def reconcile_lbs(run: Run, env: Environment, change: str) -> lbstate.Reconciled:
    """Put liftoff's recorded state back on every LB of ``env`` (and of its production, for a
    canary) that lost it; HAProxyError naming an LB that cannot be read."""
    others = [run.env(env.canary_of)] if env.canary_of else []
    lbs = lbstate.lbs_of(env, *others)
    if not lbs:
        return lbstate.Reconciled()
    return run_sync(lbstate.areconcile(HAProxy(lbs), run.store, env.name, run.run_id, run.who,
                                       why=f"{change} of {env.name} entering the door"))


def _reconcile_if_reachable(run: Run, env: Environment, change: str) -> None:
    """:func:`reconcile_lbs` for a change that does not need the LBs: trouble is a warning."""
    try:
        reconcile_lbs(run, env, change)
    except LiftoffError as exc:
        log.warning("%s of %s goes on without checking its LBs' state: %s", change, env.name, exc)


@contextmanager
def entered(run: Run, env_name: str, change: str, *, version: str | None = None, force: bool = False,
            keep: bool = False) -> Iterator[Admission]:
    """:func:`admit` around a change. A lock this call took (it was free) is given back when the
    change fails, and when it succeeds too unless ``keep`` (a pipeline step whose run goes on
    holds it until its end; a one-shot change such as a canary weight does not)."""
    admission = admit(run, env_name, change, version=version, force=force)
    try:
        yield admission
    except BaseException:
        if admission.took_lock:
            run.store.release(admission.env, run.run_id)
        raise
    if admission.took_lock and not keep:
        run.store.release(admission.env, run.run_id)
