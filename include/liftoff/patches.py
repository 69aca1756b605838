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
from collections.abc import Sequence

from liftoff import builds, guard
from liftoff.commands import gitlab_ctl_command, patch_apply_command
from liftoff.errors import HaltActive, InvalidInput, LiftoffError, RemoteError
from liftoff.inventory import Environment, HostRef
from liftoff.runs import Run, run_sync
from liftoff.versions import validate_name, validate_reason

PATCH_DETAIL_CHARS = 2000  # what the store keeps of a patch record's detail


def check_halt(run: Run, version: str) -> dict:
    """Refuse while a post-deployment patch halts canary deploys, unless this build includes
    the patch (the halt is lifted once the build is verified on canary)."""
    halt = run.store.active_halt()
    if halt is None:
        return {"halted": False}
    if halt.patch_id and halt.patch_id in builds.included_patches(run.inventory, version):
        return {"halted": True, "lifts_with_this_build": halt.patch_id}
    raise HaltActive(f"canary deploys are halted by post-deployment patch {halt.patch_id or '?'} "
                     f"({halt.reason}, by {halt.who} since {halt.since:%Y-%m-%d %H:%M}Z): deploy a build "
                     f"that includes it or lift the halt with a reason")


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
