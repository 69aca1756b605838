"""Post-deployment patches and the halt they put on canary deploys.

A patch goes on the hosts of the roles it names, fast (no drain), recorded write-ahead, and
halts ``deploy_canary`` until a build that includes it is verified on canary (or the halt is
lifted on purpose, with a reason). Until then a rollout re-applies it after each install, on
the hosts of its roles only (see :func:`liftoff.fleet.pending_patches`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from collections.abc import Sequence

from liftoff import builds, guard
from liftoff.commands import gitlab_ctl_command, patch_apply_command
from liftoff.errors import HaltActive, InvalidInput, LiftoffError, RemoteError
from liftoff.inventory import Environment, HostRef
from liftoff.runs import Run, run_sync
from liftoff.versions import validate_name, validate_reason

PATCH_DETAIL_CHARS = 2000  # what the store keeps of a patch record's detail


ROLLBACKS_BEFORE_HALT = 3  # consecutive automatic rollbacks on an environment that halt canary deploys
ROLLBACKS_BEFORE_HALT_EXTRA = "halt_after_rollbacks"
ROLLBACK_HALT_PREFIX = "automatic rollbacks on "


def rollbacks_before_halt(inventory, env_name: str) -> int:
    """The environment's ``extra.halt_after_rollbacks`` (default 3; 0 turns the halt off)."""
    value = inventory.env(env_name).extra.get(ROLLBACKS_BEFORE_HALT_EXTRA, ROLLBACKS_BEFORE_HALT)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInput(f"environment {env_name}: extra.{ROLLBACKS_BEFORE_HALT_EXTRA} must be a whole "
                           f"number >= 0, got {value!r}")
    return value


def consecutive_automatic_rollbacks(store, env_name: str) -> int:
    """Automatic rollbacks of ``env_name`` since its last successful deploy and since a person
    last lifted the halt they caused."""
    since = 0.0
    for d in store.deployments(env_name):
        if d.kind == "deploy" and d.status == "success":
            since = d.updated.timestamp()
            break
    for h in store.halts():
        if h.lifted_at is not None and h.reason.startswith(f"{ROLLBACK_HALT_PREFIX}{env_name}:"):
            since = max(since, h.lifted_at.timestamp())
    return sum(1 for e in store.lock_events(env_name)
               if e.action == "automatic_rollback" and e.at.timestamp() > since)


def count_automatic_rollback(run: Run, env_name: str, target: str) -> dict:
    """Record an automatic rollback of ``env_name``; after N in a row (the inventory's
    ``halt_after_rollbacks``) halt canary deploys until a person lifts the halt with a reason."""
    run.store.record_event(env_name, "automatic_rollback", run.run_id, run.who, f"rolled back to {target}")
    count = consecutive_automatic_rollbacks(run.store, env_name)
    limit = rollbacks_before_halt(run.inventory, env_name)
    out: dict = {"consecutive": count, "limit": limit, "halt": None}
    if not limit or count < limit:
        return out
    prefix = f"{ROLLBACK_HALT_PREFIX}{env_name}:"
    active = [h for h in run.store.active_halts() if h.reason.startswith(prefix)]
    why = re.sub(r"[^A-Za-z0-9 .,:_/@+=%-]", "_", f"{prefix} {count} in a row, the last by run {run.run_id} "
                                                 f"to {target}: a person looks before the next deploy")
    halt = active[0] if active else run.store.set_halt(why[:500], None, run.who)
    out["halt"] = {"id": halt.id, "reason": halt.reason}
    return out


def _halt_sentence(halt) -> str:
    since = f"by {halt.who} since {halt.since:%Y-%m-%d %H:%M}Z"
    if halt.patch_id:
        return (f"canary deploys are halted by post-deployment patch {halt.patch_id} ({halt.reason}, "
                f"{since}): deploy a build that includes it or lift the halt with a reason")
    return (f"canary deploys are halted: {halt.reason} ({since}). Lift the halt with a reason once the "
            f"cause is understood (post_deploy_patch, action lift_halt)")


def check_halt(run: Run, version: str) -> dict:
    """Refuse while canary deploys are halted: by a post-deployment patch this build does not
    include (the halt is lifted once the build is verified on canary), or by consecutive
    automatic rollbacks (until a person lifts it with a reason)."""
    halts = run.store.active_halts()
    if not halts:
        return {"halted": False}
    included: set[str] = set()
    if any(h.patch_id for h in halts):
        included = set(builds.included_patches(run.inventory, version))
    for halt in halts:
        if not (halt.patch_id and halt.patch_id in included):
            raise HaltActive(_halt_sentence(halt))
    return {"halted": True, "lifts_with_this_build": halts[0].patch_id}


def lift_halts_included(run: Run, version: str) -> list[str]:
    """After the build is verified on canary: lift the halts of the patches it includes."""
    included = set(builds.included_patches(run.inventory, version))
    lifted = []
    for halt in run.store.active_halts():
        if halt.patch_id and halt.patch_id in included:
            run.store.lift_halt(run.who, f"build {version} includes patch {halt.patch_id}", halt.patch_id)
            lifted.append(halt.patch_id)
    return lifted


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


async def _patch_host(env: Environment, role_name: str, host: HostRef, patch_id: str,
                      remote) -> tuple[str, str | None, list[str]]:
    """Apply the patch on one host and HUP its role's reloadable services: (host, error, reloaded)."""
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


def _patch_all(run: Run, env: Environment, patch_id: str, targets: list[tuple[str, HostRef]]) -> list:
    async def go():
        async with run.remote(env.name) as remote:
            return await asyncio.gather(*(_patch_host(env, r, h, patch_id, remote) for r, h in targets))

    return run_sync(go())


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
    with guard.entered(run, env.name, "patch"):
        hosts = [h.name for _, h in targets]
        run.store.record_patch(patch_id, env.name, run.run_id, run.who, status="pending", hosts=hosts,
                               detail=detail)
        halt = run.store.set_halt(f"post-deploy patch {patch_id} on {env.name}: {reason}"[:500], patch_id,
                                  run.who)
        results = _patch_all(run, env, patch_id, targets)
        applied = [name for name, err, _ in results if err is None or err.startswith("patch applied")]
        failed = {name: err for name, err, _ in results if err is not None}
        status = "applied" if not failed else ("pending" if applied else "failed")
        run.store.record_patch(patch_id, env.name, run.run_id, run.who, status=status, hosts=applied,
                               detail=detail)
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
