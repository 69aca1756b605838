"""Operations besides the canary pipeline: rollback (with its safety check), fast deploy,
post-deployment patches and their halt, locks by hand, canary weight with verification.

Each function is one DAG task (or one ChatOps step): it takes a :class:`liftoff.pipeline.Run`,
returns a JSON-able dict and raises :class:`LiftoffError` on a refused or failed step. They
reuse the pipeline's steps where those fit and add what the canary pipeline does not need:

* rollback safety: the post-deployment migrations applied on the environment's database
  (``db:migrate:status`` on its deploy node) against those the target package contains, which
  the build source tells (see :func:`newer_post_migrations`); nothing is installed to find out.
* rollback in steps: fleet roles first, gitaly last, chef back on, recorded as a rollback.
* fast mode: every role in batches of at least half its hosts, no capacity floor, a short
  drain wait (may drop connections).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import re
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from liftoff import chef, fleet, migrations, pipeline
from liftoff.errors import (
    HAProxyError,
    InvalidInput,
    LiftoffError,
    LockHeld,
    RemoteError,
    RollbackRefused,
)
from liftoff.haproxy import HAProxy, ServerState
from liftoff.inventory import Environment, HostRef, Inventory, load_inventory
from liftoff.metrics import REDACTED, PipelineMetrics
from liftoff.pipeline import Run
from liftoff.store import Deployment
from liftoff.versions import (
    gitlab_ctl_command,
    installed_version_command,
    parse_version,
    patch_apply_command,
    validate_name,
    validate_reason,
)

log = logging.getLogger(__name__)

MANUAL_PREFIX = "manual-"  # run id of a lock taken by hand: manual-<who>
FAST_BATCH = "50%"
FAST_CAPACITY_FLOOR = "0%"
FAST_DRAIN_TIMEOUT = 2.0
NORMAL_DRAIN_TIMEOUT = 60.0
MODES = ("normal", "fast")
GITALY_STAGE = "gitaly"
DEFAULT_ENVIRONMENTS = ("gstg", "gprd-cny", "gprd")
PATCH_DETAIL_CHARS = 2000  # what the store keeps of a patch record's detail
CONVERGE_TIMEOUT = 15.0
_MIGRATION_VERSION = re.compile(r"^(\d+)_")


def _run(coro):
    return asyncio.run(coro)


class RedactedRun(Run):
    """A run whose metrics never carry the package version (internal security builds)."""

    def metrics(self, **kwargs: Any) -> PipelineMetrics:
        return super().metrics(**{**kwargs, "redact_version": True})


def for_build(run: Run, internal: bool) -> Run:
    """``run`` itself, or the same run with version-redacting metrics for an internal build."""
    if not internal or isinstance(run, RedactedRun):
        return run
    return RedactedRun(run_id=run.run_id, who=run.who, pipeline=run.pipeline, inventory=run.inventory,
                       _store=run._store)


def environment_names(inventory: Inventory | None = None) -> list[str]:
    """The inventory's environments (GitLab.com's three when no inventory can be read)."""
    if inventory is None:
        try:
            inventory = load_inventory()
        except LiftoffError:
            return list(DEFAULT_ENVIRONMENTS)
    return list(inventory.environments)


def canary_env_of(inventory: Inventory, main: str) -> str | None:
    """The canary environment of ``main`` (the one whose ``canary_of`` names it), if any."""
    return next((e.name for e in inventory.environments.values() if e.canary_of == main), None)


def canary_env_name(inventory: Inventory) -> str:
    """The production canary environment (the first environment that is a canary)."""
    name = next((e.name for e in inventory.environments.values() if e.canary_of), None)
    if name is None:
        raise LiftoffError(f"inventory {inventory.source or '?'} has no canary environment (canary_of)")
    return name


def sharing_database(inventory: Inventory, env_name: str) -> list[str]:
    """Environments on the same database as ``env_name`` (itself included; canary and main)."""
    db = inventory.env(env_name).database
    return [e.name for e in inventory.environments.values() if e.database == db]


async def _installed(run: Run, env: Environment) -> dict[str, str | None]:
    """The installed package of the deploy node and every host (None: unreadable)."""
    hosts = [env.deploy_node, *env.hosts()]
    async with run.remote(env.name) as remote:
        results = await asyncio.gather(*(remote.run(h, installed_version_command(), 60) for h in hosts))
    return {h.name: ((r.stdout.strip() or None) if r.ok else None)
            for h, r in zip(hosts, results, strict=True)}


# -- rollback safety ------------------------------------------------------------------------------

def migration_version(migration_id: str) -> int | None:
    """The leading number of a migration id: GitLab's timestamp ``20231129120000_...``, the lab's
    build sequence ``000003_post_...``; None when it has none."""
    m = _MIGRATION_VERSION.match(migration_id)
    return int(m.group(1)) if m else None


def newer_post_migrations(applied: Iterable[str], build: dict) -> tuple[list[str] | None, str]:
    """Applied post-deployment migrations the target package does not contain, and how that was
    decided; None when the build source cannot tell.

    The build source describes the target either by the ``post_migrations`` it ships (exact), or
    by its schema version (``schema_version``, or the lab's build ``seq``): a package contains
    every migration whose leading number is at most its schema version. A migration id
    without a number is counted as not contained (fail closed)."""
    applied = [m for m in applied if migrations.is_post_migration(m)]
    if isinstance(build.get("post_migrations"), list):
        newer = migrations.post_migrations_not_in(applied, build["post_migrations"])
        return newer, "the build's migration list"
    schema = build.get("schema_version", build.get("seq"))
    if isinstance(schema, int) and not isinstance(schema, bool):
        newer = sorted(m for m in applied if (v := migration_version(m)) is None or v > schema)
        return newer, f"schema version {schema}"
    return None, ""


def rollback_target(deployments: Sequence[Deployment]) -> tuple[str | None, str | None]:
    """(current, default target) from the environment's records, newest first.

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


def rollback_command(env: str, target: str | None) -> str:
    return f"liftoff rollback {env} --to {target or 'VERSION'}"


def safety_check(run: Run, env_name: str, target: str | None = None) -> dict:
    """``rollback check``: may ``env_name`` go back to ``target`` (default: the previous version)?

    Unsafe, and only overridable with a reason: post-deployment migrations the target does not
    contain have run, or that cannot be told. Unsafe and not overridable: no target, the target
    is the current version, or a run other than this one holds the lock of an environment on
    the same database (a deploy is running)."""
    env = run.env(env_name)
    blocking: list[str] = []
    overridable: list[str] = []
    current, default = rollback_target(run.store.deployments(env.name))
    installed = _run(_installed(run, env))
    counts = Counter(v for v in installed.values() if v)
    if current is None and counts:
        current = counts.most_common(1)[0][0]
    if target:
        target = str(parse_version(target))
    else:
        target = default
        if target is None:
            blocking.append(f"no earlier successful deployment of {env.name} is recorded: "
                            "name the target version")
    if target is not None and target == current:
        blocking.append(f"{target} is the current version of {env.name}: nothing to roll back")
    unreadable = sorted(h for h, v in installed.items() if v is None)
    if unreadable:
        overridable.append(f"cannot read the installed package on {', '.join(unreadable)}")

    for name in sharing_database(run.inventory, env.name):
        lock = run.store.get_lock(name)
        if lock is not None and lock.run_id != run.run_id:
            what = "locked by hand" if lock.run_id.startswith(MANUAL_PREFIX) else "a deploy is running"
            blocking.append(f"{what}: {name} is locked by {lock.who} (run {lock.run_id}, since "
                            f"{lock.since:%Y-%m-%d %H:%M}Z){': ' + lock.reason if lock.reason else ''}")

    newer: list[str] = []
    applied: list[str] | None = None
    try:
        applied = _run(_applied_post_migrations(run, env))
    except LiftoffError as exc:
        overridable.append(f"cannot read the post-deployment migrations of database {env.database}: {exc}")
    if target is not None and applied is not None:
        info = pipeline.build_info(run.inventory, target)
        found, how = newer_post_migrations(applied, info) if info else (None, "")
        if found is None:
            overridable.append(f"cannot tell which post-deployment migrations {target} contains: the build "
                               f"source {'does not list it' if not info else 'gives no schema version'}")
        elif found:
            newer = found
            overridable.append(f"{len(found)} post-deployment migration(s) newer than {target} ran on "
                               f"{env.database} ({how}): {', '.join(found[:10])}"
                               + (f" and {len(found) - 10} more" if len(found) > 10 else ""))
    reasons = blocking + overridable
    return {
        "safe": not reasons, "reasons": reasons, "current": current, "target": target,
        "newer_post_migrations": newer, "command": rollback_command(env.name, target),
        "env": env.name, "overridable": not blocking, "installed": dict(counts),
        "applied_post_migrations": len(applied) if applied is not None else None,
    }


async def _applied_post_migrations(run: Run, env: Environment) -> list[str]:
    async with run.remote(env.name) as remote:
        return await migrations.applied_post_migrations(remote, env)


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


# -- rollback steps ---------------------------------------------------------------------------------

def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise InvalidInput(f"rollback mode must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


def shield_traffic(run: Run, env_name: str) -> dict:
    """Before a rollback: production drains its canary (force: the rollback wins over a canary
    deploy); the canary itself gets no production traffic (weight 0); others: nothing."""
    env = run.env(env_name)
    canary = canary_env_of(run.inventory, env.name)
    if canary is not None:
        result = pipeline.canary_weight(run, "drain", canary_env=canary, force=True)
        return {"action": f"drained canary {canary}", "result": result,
                "note": f"{canary} stays drained: canary_weight ready once it is wanted again"}
    if env.is_canary:
        result = pipeline.canary_weight(run, 0, canary_env=env.name, force=True)
        return {"action": f"canary {env.name} weight 0", "result": result,
                "note": "the canary stays at weight 0: set canary_weight once it is wanted again"}
    return {"action": "none"}


def begin_rollback(run: Run, env_name: str, target: str, mode: str, reason: str | None = None,
                   override_reason: str | None = None) -> dict:
    """Take the lock (the reason says target, mode, why and any safety override), record the
    rollback, count it, stop chef and point the role at the target, install it on the deploy node."""
    env = run.env(env_name)
    target = str(parse_version(target))
    check_mode(mode)
    why = f"rollback to {target}, {mode} mode"
    if reason:
        why += f": {validate_reason(reason)}"
    if override_reason:
        why += f", safety check overridden: {validate_reason(override_reason, field_name='override_reason')}"
    run.store.acquire(env.name, run.run_id, run.who, why[:500])  # re-entrant for this run
    for name in sharing_database(run.inventory, env.name):  # started since the safety check?
        lock = run.store.get_lock(name)
        if lock is not None and lock.run_id != run.run_id:
            run.store.release(env.name, run.run_id)
            raise LockHeld(lock, f"rollback of {env.name} stopped: {name} (same database) is now locked by "
                                 f"{lock.who} (run {lock.run_id})")
    run.store.record_deployment(env.name, target, run.run_id, kind="rollback", status="running")
    run.metrics().rollback(env.name)
    return {"env": env.name, "version": target, "mode": mode, "lock_reason": why,
            "chef": pipeline.prepare_env(run, env, target)}


def fast_environment(env: Environment) -> Environment:
    """The environment with every role in batches of at least ``FAST_BATCH`` of its hosts and no
    capacity floor (fast mode: as fast as the fleet allows, some requests may fail)."""
    roles = []
    for role in env.roles:
        fast = dataclasses.replace(role, batch=FAST_BATCH, capacity_floor=FAST_CAPACITY_FLOOR)
        batch = role.batch if role.batch_size() > fast.batch_size() else FAST_BATCH
        roles.append(dataclasses.replace(role, batch=batch, capacity_floor=FAST_CAPACITY_FLOOR))
    return dataclasses.replace(env, roles=tuple(roles))


def rollout_options(mode: str) -> fleet.RolloutOptions:
    check_mode(mode)
    drain = FAST_DRAIN_TIMEOUT if mode == "fast" else NORMAL_DRAIN_TIMEOUT
    return fleet.RolloutOptions(chef_start="cleanup", drain_timeout=drain)


def stage_roles(env: Environment, stage: str) -> list[str]:
    """``gitaly``: the gitaly stage's roles; ``fleet``: every other role."""
    gitaly = [r.name for r in env.roles_in_stage(GITALY_STAGE)]
    if stage == GITALY_STAGE:
        return gitaly
    if stage == "fleet":
        return [r.name for r in env.roles if r.name not in gitaly]
    raise InvalidInput(f"stage must be 'gitaly' or 'fleet', got {stage!r}")


def roll(run: Run, env_name: str, version: str, stage: str, mode: str) -> dict:
    """Roll ``version`` onto one stage's roles (``fleet`` or ``gitaly``), drained batches
    (fast: big batches, short drain wait); raises when a host failed."""
    env = run.env(env_name)
    roles = stage_roles(env, stage)
    if not roles:
        return {"env": env.name, "stage": stage, "roles": [], "skipped": "no roles in this stage"}
    target_env = fast_environment(env) if check_mode(mode) == "fast" else env
    report = fleet.run_rollout(target_env, str(parse_version(version)), run_id=run.run_id, store=run.store,
                               roles=roles, ssh_conn_id=run.inventory.conn_id("ssh"),
                               options=rollout_options(mode))
    report.raise_for_failure()
    out = report.to_dict()
    out.update(stage=stage, mode=mode)
    return out


def restart_chef(run: Run, env_name: str, version: str) -> dict:
    """Cleanup: the role holds ``version``, chef starts again (not on hosts left drained)."""
    env = run.env(env_name)
    failed = [d.host for d in run.store.drained(env.name)]

    async def go():
        async with run.remote(env.name) as remote:
            return await chef.finish(remote, env, version, failed_hosts=failed)

    return {"env": env.name, "version": version, "chef": _run(go()).to_dict()}


def rollback_done(run: Run, env_name: str, target: str) -> dict:
    """The rollback passed its gates: record it, release the lock, push the deployed version."""
    env = run.env(env_name)
    run.store.record_deployment(env.name, target, run.run_id, kind="rollback", status="success")
    released = run.store.release(env.name, run.run_id)
    run.metrics().deployed_version(env.name, target)
    return {"env": env.name, "version": target, "released": released}


def mark_unfinished(run: Run, envs: Iterable[str], status: str = "failed") -> list[str]:
    """Give this run's still-running records (deploys and rollbacks) a final status."""
    return [f"{name}:{kind}" for name, kind in pipeline.close_records(run, envs, status)]


# -- fast deploy ----------------------------------------------------------------------------------

def public_version(version: str, internal: bool) -> str:
    """What notifications and metric labels may show of a version."""
    return REDACTED if internal else str(version)


def redact(text: str, version: str, internal: bool) -> str:
    return text.replace(str(version), REDACTED) if internal else text


def fast_precheck(run: Run, env_name: str, version: str, reason: str) -> dict:
    """The precheck, recorded but never blocking: a fast deploy is the fix for what it finds
    (an active alert, a host out of service); only another run's lock stops it later."""
    reason = validate_reason(reason)
    return pipeline.precheck(run, env_name, version, override_reason=f"fast deploy: {reason}")


def begin_fast_deploy(run: Run, env_name: str, version: str, reason: str, internal: bool,
                      previous: str | None = None) -> dict:
    """Take the lock with the reason (recorded in the lock history), then the pipeline's
    ``begin_env``: record, chef stopped, role set, package on the deploy node."""
    env = run.env(env_name)
    version = str(parse_version(version))
    reason = redact(validate_reason(reason), version, internal)
    why = f"fast_deploy {public_version(version, internal)}: {reason}"
    run.store.acquire(env.name, run.run_id, run.who, why[:500])  # LockHeld names another holder
    result = pipeline.begin_env(for_build(run, internal), env.name, version, previous)
    result["lock_reason"] = why
    return result


def finish_fast_deploy(run: Run, env_name: str, version: str, reason: str, internal: bool) -> dict:
    """Cleanup (chef, record, lock), then push the deployed version (``internal`` when
    undisclosed) and the fast deploy with its reason."""
    run = for_build(run, internal)
    result = pipeline.finish_env(run, env_name, version)
    pushed = OperationMetrics.from_settings(run.pipeline, run.inventory).fast_deploy(
        env_name, public_version(version, internal), redact(validate_reason(reason), version, internal))
    result.update(public_version=public_version(version, internal), metric_pushed=pushed)
    if internal:
        result["version"] = REDACTED
    return result


class _Fixed:
    """A collector of ready-made metric families (a counter without a ``_created`` series)."""

    def __init__(self, *families: Any):
        self.families = families

    def collect(self) -> Iterable[Any]:
        return iter(self.families)


class OperationMetrics(PipelineMetrics):
    """Metrics of by-hand operations, beside the pipeline's (same Pushgateway, job ``liftoff``).

    Group ``{pipeline="fast_deploy", env}``: ``liftoff_fast_deploys_total``,
    ``liftoff_fast_deploy_info{version, reason}`` (the last one; version ``internal`` when
    undisclosed), ``liftoff_fast_deploy_timestamp_seconds``."""

    def fast_deploy(self, env: str, version: str, reason: str) -> bool:
        return self._guard("fast_deploy", self._fast_deploy, env, version, reason)

    def _fast_deploy(self, env: str, version: str, reason: str) -> None:
        from prometheus_client import CollectorRegistry, Gauge
        from prometheus_client.core import CounterMetricFamily

        grouping = {"pipeline": "fast_deploy", "env": env}
        current = self._read_counter("liftoff_fast_deploys_total", grouping)
        total = CounterMetricFamily("liftoff_fast_deploys", "Fast deploys.", value=current.get("", 0.0) + 1)
        reg = CollectorRegistry()
        reg.register(_Fixed(total))
        Gauge("liftoff_fast_deploy_info", "The last fast deploy: version and reason.", ["version", "reason"],
              registry=reg).labels(version, reason).set(1)
        Gauge("liftoff_fast_deploy_timestamp_seconds", "When the last fast deploy finished.",
              registry=reg).set(time.time())
        self._push(reg, grouping, replace=True)


# -- post-deployment patches ------------------------------------------------------------------------

def patch_detail(patch_text: str, reason: str, roles: Sequence[str], limit: int = PATCH_DETAIL_CHARS) -> str:
    """The patch record's detail: JSON with the reason, roles, size, SHA-256 and the patch text
    (cut to fit the store's column; ``truncated`` says so and the hash still names the whole)."""
    digest = hashlib.sha256(patch_text.encode()).hexdigest()
    base = {"reason": reason, "roles": list(roles), "bytes": len(patch_text.encode()), "sha256": digest,
            "truncated": False, "patch": ""}
    def fits(n: int) -> bool:
        return len(json.dumps({**base, "patch": patch_text[:n], "truncated": False})) <= limit

    low, high = 0, len(patch_text)  # the longest prefix that fits: fits(low) always holds
    if fits(high):
        low = high
    while low < high - 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    base.update(patch=patch_text[:low], truncated=low < len(patch_text))
    return json.dumps(base)


def patch_hosts(env: Environment, roles: Sequence[str]) -> list[tuple[str, HostRef]]:
    if not roles:
        raise InvalidInput("name at least one role to patch")
    return [(r, h) for r in dict.fromkeys(validate_name("role", x) for x in roles) for h in env.role(r).hosts]


def apply_patch(run: Run, env_name: str, patch_id: str, patch_text: str, roles: Sequence[str],
                reason: str) -> dict:
    """Apply a post-deployment patch to the hosts of ``roles`` now (no drain: fast), HUP the
    roles' reloadable services so it takes effect, record it and halt canary deploys until a
    build including it is deployed (or the halt is lifted by hand).

    Write-ahead: the record (``pending``) and the halt exist before any host is touched, so a
    crash leaves deploys halted and the next rollout re-applies the patch. The final record is
    ``applied`` (all hosts), ``pending`` (some failed: re-applied by the next rollout) or
    ``failed`` (none); a failure raises after recording, the halt stays."""
    env = run.env(env_name)
    patch_id = validate_name("patch", patch_id)
    reason = validate_reason(reason)
    if not isinstance(patch_text, str) or not patch_text.strip():
        raise InvalidInput("the patch text is empty")
    targets = patch_hosts(env, roles)
    role_names = list(dict.fromkeys(r for r, _ in targets))
    detail = patch_detail(patch_text, reason, role_names)
    run.store.acquire(env.name, run.run_id, run.who, f"post-deploy patch {patch_id}: {reason}"[:500])
    hosts = [h.name for _, h in targets]
    run.store.record_patch(patch_id, env.name, run.run_id, run.who, status="pending", hosts=hosts,
                           detail=detail)
    halt = run.store.set_halt(f"post-deploy patch {patch_id} on {env.name}: {reason}"[:500], patch_id,
                              run.who)

    async def one(role_name: str, host: HostRef, remote) -> tuple[str, str | None, list[str]]:
        r = await remote.run(host, patch_apply_command(patch_id), 300)
        if not r.ok:
            return host.name, f"apply failed: {r.describe()}", []
        reloaded = []
        for svc in env.role(role_name).hup:
            h = await remote.run(host, gitlab_ctl_command("hup", svc), 300)
            if not h.ok:
                return host.name, f"patch applied, but hup {svc} failed: {h.describe()}", reloaded
            reloaded.append(svc)
        return host.name, None, reloaded

    async def go():
        async with run.remote(env.name) as remote:
            return await asyncio.gather(*(one(r, h, remote) for r, h in targets))

    results = _run(go())
    applied = [name for name, err, _ in results if err is None or err.startswith("patch applied")]
    failed = {name: err for name, err, _ in results if err is not None}
    status = "applied" if not failed else ("pending" if applied else "failed")
    run.store.record_patch(patch_id, env.name, run.run_id, run.who, status=status, hosts=applied,
                           detail=detail)
    run.store.release(env.name, run.run_id)
    out = {"env": env.name, "patch_id": patch_id, "status": status, "roles": role_names, "applied": applied,
           "failed": failed, "reloaded": {n: s for n, _, s in results if s},
           "halt": {"id": halt.id, "reason": halt.reason, "patch_id": halt.patch_id},
           "sha256": json.loads(detail)["sha256"]}
    if failed:
        raise RemoteError(f"patch {patch_id} failed on {len(failed)} of {len(targets)} host(s) of "
                          f"{env.name}: " + "; ".join(f"{h}: {e}" for h, e in sorted(failed.items())[:5])
                          + f". Recorded as {status}; canary deploys stay halted (lift the halt with a "
                          "reason once it is sorted out)")
    return out


def lift_halt(run: Run, reason: str, patch_id: str | None = None) -> dict:
    """Lift the halt on canary deploys on purpose (only that patch's when ``patch_id`` is given)."""
    reason = validate_reason(reason)
    if patch_id is not None:
        validate_name("patch", patch_id)
    active = run.store.active_halts()
    halt = run.store.lift_halt(run.who, reason, patch_id)
    if halt is None:
        what = f"patch {patch_id}" if patch_id else "any patch"
        raise LiftoffError(f"no active halt for {what} (active: "
                           f"{', '.join(h.patch_id or '?' for h in active) or 'none'})")
    return {"lifted": [h.patch_id for h in active if patch_id is None or h.patch_id == patch_id],
            "reason": reason, "by": run.who, "still_active": [h.patch_id for h in run.store.active_halts()]}


# -- locks by hand -----------------------------------------------------------------------------------

def manual_run_id(who: str) -> str:
    return f"{MANUAL_PREFIX}{validate_name('who', who)}"[:250]


def lock_env(run: Run, env_name: str, reason: str) -> dict:
    """``deploy lock ENV``: hold the environment's lock by hand (run id ``manual-<who>``); every
    deploy's precheck fails until it is unlocked. Raises LockHeld naming another holder."""
    env = run.env(env_name)
    reason = validate_reason(reason)
    lock = run.store.acquire(env.name, manual_run_id(run.who), run.who, f"locked by hand: {reason}")
    return {"env": env.name, "locked": True, "run_id": lock.run_id, "who": lock.who, "reason": lock.reason,
            "since": lock.since.isoformat()}


def unlock_env(run: Run, env_name: str, reason: str) -> dict:
    """``deploy unlock ENV``: remove whoever holds the lock (by hand or a run), recorded with
    who and why. A run whose lock is removed keeps running: stop it first if it must stop."""
    env = run.env(env_name)
    reason = validate_reason(reason)
    removed = run.store.force_release(env.name, run.who, reason)
    if removed is None:
        return {"env": env.name, "locked": False, "removed": None}
    if not removed.run_id.startswith(MANUAL_PREFIX):  # a running deploy's lock
        log.warning("unlocked %s held by running deploy %s (%s)", env.name, removed.run_id, removed.who)
    by_hand = removed.run_id.startswith(MANUAL_PREFIX)
    return {"env": env.name, "locked": False,
            "removed": {"run_id": removed.run_id, "who": removed.who, "reason": removed.reason,
                        "since": removed.since.isoformat(), "by_hand": by_hand}}


# -- canary weight -------------------------------------------------------------------------------------

def parse_weight(weight: int | str) -> int | str:
    """0..100 or drain/ready/maint (ASCII digits in text, blanks around them, are a weight)."""
    expected = f"canary weight must be 0..100 or one of {', '.join(pipeline.CANARY_STATES)}"
    if isinstance(weight, bool):
        raise InvalidInput(f"{expected}, got {weight}")
    if isinstance(weight, str) and re.fullmatch(r"[0-9]{1,3}", weight.strip()):
        weight = int(weight.strip())
    if isinstance(weight, int):
        if not 0 <= weight <= 100:
            raise InvalidInput(f"canary weight must be within 0..100, got {str(weight)[:20]}")
        return weight
    if isinstance(weight, str) and weight in pipeline.CANARY_STATES:
        return weight
    raise InvalidInput(f"{expected}, got {str(weight)[:40]!r}" + ("..." if len(str(weight)) > 40 else ""))


def canary_divergence(snap: dict[str, list[ServerState]], hosts: Iterable[str], main_backends: Iterable[str],
                      weight: int | str) -> dict[str, list[str]]:
    """Where the LBs do not show the requested canary setting: ``{lb: [what differs]}``.

    A weight must be on every canary server of every main backend; a state (drain/ready/maint)
    in every backend holding it. A canary server one LB lists and another does not also
    differs (servers no LB lists, like gitaly, are not behind the LBs)."""
    hosts = set(hosts) & {s.server for states in snap.values() for s in states}
    main = set(main_backends)
    out: dict[str, list[str]] = {}
    for lb, states in snap.items():
        bad: list[str] = []
        seen = set()
        for s in states:
            if s.server not in hosts:
                continue
            seen.add(s.server)
            if isinstance(weight, int):
                if s.backend in main and s.weight != weight:
                    bad.append(f"{s.backend}/{s.server} weight {s.weight}")
            elif s.admin != weight:
                bad.append(f"{s.backend}/{s.server} {s.admin}")
        bad += [f"{h} missing" for h in sorted(hosts - seen)]
        if bad:
            out[lb] = bad
    return out


def set_canary_weight(run: Run, weight: int | str, *, force: bool = False,
                      timeout: float = CONVERGE_TIMEOUT) -> dict:
    """Set the canary weight (or state) on every production LB, then verify every LB converged.

    Reducing canary traffic while a canary deploy holds the canary's lock is refused unless
    ``force``; a lock taken by hand is not a deploy and does not refuse it."""
    weight = parse_weight(weight)
    canary = canary_env_name(run.inventory)
    env = run.env(canary)
    main = run.env(env.canary_of)
    lock = run.store.get_lock(canary)
    by_hand = lock is not None and lock.run_id.startswith(MANUAL_PREFIX)
    before = pipeline.current_canary_weight(run, canary)
    result = pipeline.canary_weight(run, weight, canary_env=canary, force=force or by_hand)
    hosts = pipeline.canary_hosts(run, canary)
    haproxy = HAProxy.for_env(main)
    deadline = time.monotonic() + timeout
    while True:
        try:
            diverging = canary_divergence(haproxy.snapshot(), hosts, [r.name for r in main.roles], weight)
        except HAProxyError as exc:
            diverging = {"*": [str(exc)]}
        if not diverging or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    if diverging:
        raise HAProxyError(f"canary weight {weight} did not converge on every LB within {timeout:.0f}s: "
                           + "; ".join(f"{lb}: {', '.join(b[:5])}" for lb, b in sorted(diverging.items())))
    result.update(converged=[lb.name for lb in main.load_balancers], previous_weight=before, forced=force,
                  canary_env=canary)
    return result
