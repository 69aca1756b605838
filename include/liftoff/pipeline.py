"""The steps the pipelines are made of, one function per task, each safe to re-run.

DAG tasks call these with the run id; everything they need (inventory, state store, SSH,
HAProxy, Alertmanager) comes from the inventory and its connections. Each returns a
JSON-able dict (the task's XCom) and raises on a failed gate.
"""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.request
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from liftoff import chef, fleet, migrations
from liftoff.alerts import AlertClient
from liftoff.errors import LiftoffError
from liftoff.haproxy import HAProxy, out_of_service
from liftoff.inventory import Environment, Inventory, load_inventory
from liftoff.metrics import PipelineMetrics
from liftoff.remote import Remote
from liftoff.settings import connection_for
from liftoff.store import DEPLOYMENT_KINDS, Store
from liftoff.versions import installed_version_command, parse_version, validate_name, validate_reason

log = logging.getLogger(__name__)


class PrecheckFailed(LiftoffError):
    """A stage's precheck found the environment unfit to change."""


class HaltActive(LiftoffError):
    """Canary deploys are halted by a post-deployment patch."""


@dataclass
class Run:
    """One pipeline run: who, which run, and the engine's handles."""

    run_id: str
    who: str = "liftoff"
    pipeline: str = "deploy_canary"
    inventory: Inventory | None = None
    _store: Store | None = None

    def __post_init__(self) -> None:
        validate_name("run_id", self.run_id)
        self.inventory = self.inventory or load_inventory()

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = Store.from_settings(self.inventory)
        return self._store

    def env(self, name: str) -> Environment:
        return self.inventory.env(name)

    def remote(self, env: str = "") -> Remote:
        return Remote(self.inventory.conn_id("ssh"), store=self.store, run_id=self.run_id, env=env)

    def metrics(self, **kwargs: Any) -> PipelineMetrics:
        return PipelineMetrics.from_settings(self.pipeline, self.inventory, **kwargs)


def _run(coro):
    return asyncio.run(coro)


# -- versions and builds ------------------------------------------------------------------------

def newest_nightly(inventory: Inventory) -> str:
    """The newest nightly build the build source lists (``builds`` connection: a JSON list of
    ``{"version": ..., "nightly": bool}``)."""
    url = connection_for("builds", inventory).base_url()
    with urllib.request.urlopen(url, timeout=15) as resp:  # noqa: S310 - URL from the connection
        builds = json.load(resp)
    nightlies = []
    for b in builds:
        try:
            v = parse_version(b.get("version"))
        except ValueError:
            continue
        if b.get("nightly") or v.kind == "nightly":
            nightlies.append(v)
    if not nightlies:
        raise LiftoffError(f"the build source {url} lists no nightly build")
    return str(max(nightlies))


def build_info(inventory: Inventory, version: str) -> dict:
    """What the build source says of one build ({} when it does not list it)."""
    try:
        url = connection_for("builds", inventory).base_url()
        with urllib.request.urlopen(url, timeout=15) as resp:  # noqa: S310
            builds = json.load(resp)
    except (OSError, ValueError, LiftoffError) as exc:
        log.warning("build source unavailable: %s", exc)
        return {}
    return next((b for b in builds if b.get("version") == version), {})


def resolve_version(run: Run, requested: str | None, scheduled: bool) -> str:
    """The version to deploy: the requested one, or for a scheduled run the newest nightly."""
    if requested:
        return str(parse_version(requested))
    if not scheduled:
        raise LiftoffError("a manual run needs a version (only scheduled runs pick the newest nightly)")
    return newest_nightly(run.inventory)


def check_halt(run: Run, version: str) -> dict:
    """Refuse while a post-deployment patch halts canary deploys, unless this build includes
    the patch (the halt is lifted once the build is verified on canary)."""
    halt = run.store.active_halt()
    if halt is None:
        return {"halted": False}
    included = build_info(run.inventory, version).get("includes_patches") or []
    if halt.patch_id and halt.patch_id in included:
        return {"halted": True, "lifts_with_this_build": halt.patch_id}
    raise HaltActive(f"canary deploys are halted by post-deployment patch {halt.patch_id or '?'} "
                     f"({halt.reason}, by {halt.who} since {halt.since:%Y-%m-%d %H:%M}Z): deploy a build "
                     f"that includes it or lift the halt with a reason")


def lift_halts_included(run: Run, version: str) -> list[str]:
    """After the build is verified on canary: lift the halts of the patches it includes."""
    included = set(build_info(run.inventory, version).get("includes_patches") or [])
    lifted = []
    for halt in run.store.active_halts():
        if halt.patch_id and halt.patch_id in included:
            run.store.lift_halt(run.who, f"build {version} includes patch {halt.patch_id}", halt.patch_id)
            lifted.append(halt.patch_id)
    return lifted


# -- change lock ---------------------------------------------------------------------------------

def in_weekly_change_lock(now: datetime) -> bool:
    """GitLab's weekly production change lock: Friday 23:00 UTC to Monday 06:00 UTC."""
    now = now.astimezone(UTC)
    day, hour = now.weekday(), now.hour  # Monday is 0
    return (day == 4 and hour >= 23) or day in (5, 6) or (day == 0 and hour < 6)


# -- prechecks ---------------------------------------------------------------------------------

async def _installed_versions(run: Run, env: Environment) -> dict[str, str | None]:
    hosts = [env.deploy_node, *env.hosts()]
    async with run.remote(env.name) as remote:
        results = await asyncio.gather(*(remote.run(h, installed_version_command(), 60) for h in hosts))
    return {h.name: (r.stdout.strip() if r.ok else None) for h, r in zip(hosts, results, strict=True)}


def precheck(run: Run, env_name: str, version: str, *, override_reason: str | None = None,
             severities: tuple[str, ...] = ("critical",), now: datetime | None = None) -> dict:
    """Fail closed before changing an environment: critical alerts (or Alertmanager down), a
    lock held by another run, a server out of service in HAProxy that no liftoff record
    explains, an unreachable LB, hosts on versions other than one previous and the target.
    With ``override_reason`` the failures are recorded and the stage goes on."""
    env = run.env(env_name)
    version = str(parse_version(version))
    failures: list[str] = []

    if env.extra.get("change_lock") == "weekly" and in_weekly_change_lock(now or datetime.now(UTC)):
        failures.append("change lock: the weekly production change lock is on (Friday 23:00 to "
                        "Monday 06:00 UTC); an emergency needs an override reason")

    gate = AlertClient.from_settings(run.inventory).check(dict(env.alert_matchers), severities)
    if not gate.ok:
        failures.append(f"alerts: {gate.reason}")

    lock = run.store.get_lock(env.name)
    if lock is not None and lock.run_id != run.run_id:
        failures.append(f"lock: {env.name} is locked by {lock.who} (run {lock.run_id}, since "
                        f"{lock.since:%Y-%m-%d %H:%M}Z): {lock.reason}")

    recorded = {d.host for d in run.store.drained(env.name)}
    lb_hosts = {h.name for h in env.hosts()}
    try:
        snap = HAProxy.for_env(env).snapshot()
        down = {h: s for h, s in out_of_service(snap).items() if h in lb_hosts and h not in recorded}
        if down:
            failures.append("haproxy: out of service without a liftoff record: "
                            + ", ".join(f"{h} ({s})" for h, s in sorted(down.items())))
    except LiftoffError as exc:
        failures.append(f"haproxy: {exc}")

    versions = _run(_installed_versions(run, env))
    unreadable = sorted(h for h, v in versions.items() if v is None)
    if unreadable:
        failures.append(f"versions: cannot read the installed package on {', '.join(unreadable)}")
    others = Counter(v for v in versions.values() if v and v != version)
    if len(others) > 1:
        failures.append("versions: hosts run more than one version besides the target: "
                        + ", ".join(f"{v} x{n}" for v, n in others.most_common()))
    previous = others.most_common(1)[0][0] if others else (run.store.previous_version(env.name) or version)

    result = {"env": env.name, "version": version, "previous_version": previous, "failures": failures,
              "versions": versions, "overridden": False}
    if failures:
        if not override_reason:
            raise PrecheckFailed(f"precheck of {env.name} failed: " + "; ".join(failures))
        reason = validate_reason(override_reason, field_name="allow_precheck_failure")
        log.warning("precheck of %s failed, overridden by %s (%s): %s", env.name, run.who, reason, failures)
        result["overridden"] = True
        result["override_reason"] = reason
    return result


def canary_env_of(run: Run, env_name: str) -> str | None:
    """The canary environment whose ``canary_of`` is ``env_name`` (gprd -> gprd-cny)."""
    return next((n for n, e in run.inventory.environments.items() if e.canary_of == env_name), None)


def verified_on_canary(run: Run, version: str, override_reason: str | None = None,
                       env_name: str = "gprd") -> str:
    """Promote only the version canary verified, unless overridden with a recorded reason."""
    version = str(parse_version(version))
    canary = canary_env_of(run, env_name)
    verified = run.store.current_version(canary) if canary else None
    if verified != version:
        if not override_reason:
            raise PrecheckFailed(f"{version} is not the version verified on {canary} "
                                 f"({verified or 'none recorded'}); give an override reason to promote it")
        reason = validate_reason(override_reason, field_name="override_reason")
        log.warning("promoting %s, not the canary-verified %s: overridden by %s: %s",
                    version, verified, run.who, reason)
    return version


def production_checks(run: Run, version: str, *, override_reason: str | None = None,
                      env_name: str = "gprd") -> dict:
    """Before promotion: the environment's precheck, no canary deploy running, every canary
    server in service on every LB, and canary running the version."""
    failures: list[str] = []
    try:
        result = precheck(run, env_name, version)
    except PrecheckFailed as exc:
        failures.append(str(exc))
        result = {"env": env_name, "version": version}
    canary = canary_env_of(run, env_name)
    if canary:
        lock = run.store.get_lock(canary)
        if lock is not None and lock.run_id != run.run_id:
            failures.append(f"a canary deploy holds {canary}: {lock.who} (run {lock.run_id})")
        names = set(canary_hosts(run, canary))
        try:
            down = {h: s for h, s in out_of_service(HAProxy.for_env(run.env(env_name)).snapshot()).items()
                    if h in names}
            if down:
                failures.append("canary not in service: "
                                + ", ".join(f"{h} ({s})" for h, s in sorted(down.items())))
        except LiftoffError as exc:
            failures.append(f"haproxy: {exc}")
        versions = _run(_installed_versions(run, run.env(canary)))
        off = sorted(h for h, v in versions.items() if v != version)
        if off:
            failures.append(f"canary hosts not on {version}: {', '.join(off)}")
    result.update(failures=failures, overridden=False)
    if failures:
        if not override_reason:
            raise PrecheckFailed("production checks failed: " + "; ".join(failures))
        result.update(overridden=True, override_reason=validate_reason(override_reason))
        log.warning("production checks failed, overridden by %s: %s", run.who, failures)
    return result


# -- environment lifecycle ----------------------------------------------------------------------

def begin_env(run: Run, env_name: str, version: str, previous: str | None = None) -> dict:
    """Take the environment's lock (again, for a re-run of the same run), stop chef, write the
    version role and install the package on the deploy node."""
    env = run.env(env_name)
    version = str(parse_version(version))
    run.store.acquire(env.name, run.run_id, run.who, f"{run.pipeline} {version}")  # re-entrant for this run
    if previous and previous != version and run.store.current_version(env.name) is None:
        # First deploy liftoff sees here: remember what ran before, for rollbacks.
        run.store.record_deployment(env.name, previous, "baseline", status="success")
    run.store.record_deployment(env.name, version, run.run_id, status="running")
    return {"env": env.name, "version": version, "chef": prepare_env(run, env, version)}


def prepare_env(run: Run, env: Environment, version: str) -> dict:
    """Stop chef, write the version role and install ``version`` on the deploy node; chef's report."""

    async def go():
        async with run.remote(env.name) as remote:
            report = await chef.prepare(remote, env, version, run.run_id)
            await migrations.ensure_package(remote, env, version, run.run_id)
            return report

    return _run(go()).to_dict()


def migrate(run: Run, env_name: str, version: str, *, post: bool) -> dict:
    """Regular (or post-deployment) migrations from the environment's deploy node."""
    env = run.env(env_name)

    async def go():
        async with run.remote(env.name) as remote:
            fn = migrations.post_deployment if post else migrations.regular
            return await fn(remote, env, version=version, run_id=run.run_id)

    result = _run(go())
    return result.to_dict()


def deploy_roles(run: Run, env_name: str, version: str, stage: str | None = None,
                 roles: list[str] | None = None, dry_run: bool = False,
                 options: fleet.RolloutOptions | None = None) -> dict:
    """Roll the version onto a stage's roles (``gitaly`` or ``fleet``) in drained batches."""
    env = run.env(env_name)
    selected = roles or [r.name for r in (env.roles_in_stage(stage) if stage else env.roles)]
    if dry_run:
        return {"env": env.name, "dry_run": True,
                "plan": [p.to_dict() for p in fleet.plan(env, selected, version, run_id=run.run_id)]}
    options = options or fleet.RolloutOptions(chef_start="cleanup")
    report = fleet.run_rollout(env, version, run_id=run.run_id, store=run.store, roles=selected,
                               ssh_conn_id=run.inventory.conn_id("ssh"), options=options)
    report.raise_for_failure()
    return report.to_dict()


def finish_env(run: Run, env_name: str, version: str, status: str = "success") -> dict:
    """Cleanup: the role holds the version, chef starts again (not on failed hosts), the
    deployment is recorded and the lock released."""
    env = run.env(env_name)
    failed = [d.host for d in run.store.drained(env.name)]

    async def go():
        async with run.remote(env.name) as remote:
            return await chef.finish(remote, env, version, failed_hosts=failed)

    report = _run(go())
    run.store.record_deployment(env.name, version, run.run_id, status=status)
    run.store.release(env.name, run.run_id)
    run.metrics().deployed_version(env.name, version)
    return {"env": env.name, "version": version, "chef": report.to_dict()}


# -- canary traffic -------------------------------------------------------------------------------

CANARY_STATES = ("drain", "ready", "maint")


def canary_hosts(run: Run, canary_env: str = "gprd-cny") -> list[str]:
    env = run.env(canary_env)
    return [h.name for h in env.hosts()]


def canary_weight(run: Run, weight: int | str, *, canary_env: str = "gprd-cny", force: bool = False) -> dict:
    """Set the canary servers' weight (0-100) in the production backends, or their state, on
    every production LB; refuse to reduce canary traffic during a canary deploy unless forced."""
    env = run.env(canary_env)
    main = run.env(env.canary_of) if env.canary_of else env
    hosts = canary_hosts(run, canary_env)
    haproxy = HAProxy.for_env(main)
    if isinstance(weight, str) and weight not in CANARY_STATES:
        weight = int(weight)
    reducing = weight in ("drain", "maint") or (
        isinstance(weight, int) and weight < current_canary_weight(run, canary_env))
    lock = run.store.get_lock(env.name)
    if reducing and lock is not None and lock.run_id != run.run_id and not force:
        raise LiftoffError(f"refusing to reduce canary traffic while {lock.run_id} deploys canary "
                           f"({lock.who}); use force")
    if isinstance(weight, int):
        if not 0 <= weight <= 100:
            raise LiftoffError(f"canary weight must be within 0..100, got {weight}")
        main_backends = {r.name for r in main.roles}
        result = haproxy.set_weight(hosts, weight, backends=main_backends)
    else:
        result = getattr(haproxy, weight)(hosts)
    return {"weight": weight, "hosts": hosts, "result": result.to_dict(),
            "lbs": [lb.name for lb in main.load_balancers]}


def current_canary_weight(run: Run, canary_env: str = "gprd-cny") -> int:
    """The highest weight a canary server has in a production (non-canary) backend."""
    env = run.env(canary_env)
    main = run.env(env.canary_of) if env.canary_of else env
    hosts = set(canary_hosts(run, canary_env))
    snap = HAProxy.for_env(main).snapshot()
    weights = [s.weight for states in snap.values() for s in states
               if s.server in hosts and not s.backend.startswith("canary")]
    return max(weights, default=0)


# -- failure handling ---------------------------------------------------------------------------

def failed_environment(run: Run, envs: list[str]) -> str | None:
    """The environment this run was changing when it failed: the last one it started and did
    not finish."""
    for name in reversed(envs):
        mine = [d for d in run.store.deployments(name) if d.run_id == run.run_id and d.kind == "deploy"]
        if mine and mine[0].status == "running":
            return name
    return None


def rollback_env(run: Run, env_name: str, to_version: str, *, fast: bool = False) -> dict:
    """Return an environment to ``to_version``: fleet roles first, gitaly last, drained batches
    (fast: big batches, short waits), then chef and the role follow the old version."""
    env = run.env(env_name)
    to_version = str(parse_version(to_version))
    run.store.acquire(env.name, run.run_id, run.who, f"rollback to {to_version}")  # re-entrant for this run
    run.store.record_deployment(env.name, to_version, run.run_id, kind="rollback", status="running")
    run.metrics().rollback(env.name)
    gitaly = [r.name for r in env.roles_in_stage("gitaly")]
    fleet_roles = [r.name for r in env.roles if r.name not in gitaly]
    options = fleet.RolloutOptions(chef_start="cleanup", drain_timeout=5.0 if fast else 60.0)

    async def go():
        async with run.remote(env.name) as remote:
            await chef.prepare(remote, env, to_version, run.run_id)
            await migrations.ensure_package(remote, env, to_version, run.run_id)

    _run(go())
    reports = []
    for group in (fleet_roles, gitaly):  # reverse of the deploy order
        if not group:
            continue
        report = fleet.run_rollout(env, to_version, run_id=run.run_id, store=run.store, roles=group,
                                   ssh_conn_id=run.inventory.conn_id("ssh"), options=options)
        reports.append(report.to_dict())
        report.raise_for_failure()
    finish = finish_env(run, env.name, to_version)
    run.store.record_deployment(env.name, to_version, run.run_id, kind="rollback", status="success")
    return {"env": env.name, "version": to_version, "rollouts": reports, "chef": finish["chef"]}


def release_locks(run: Run, envs: list[str]) -> list[str]:
    """Release every lock this run still holds (the run is over, whatever its result)."""
    released = [e for e in envs if run.store.release(e, run.run_id)]
    return released


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
