"""Chef on the lab hosts: converge each host to its environment's version role.

Every ``chef_interval`` seconds, each reachable host whose chef is running (and not
disabled) is converged: if its package or services differ from the role's version, the
package is installed and the services restarted. An orchestrator that forgets to stop
chef sees hosts drift back to the role's version, as on GitLab.com.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from lab.hostsim import Result, apt_install
from lab.model import HostState, World

log = logging.getLogger("lab.chef")


def target_version(world: World, state: HostState) -> str:
    return world.roles[state.env]["version"]


def needs_converge(world: World, state: HostState) -> bool:
    """Whether a chef run would change this host (cheap, no I/O)."""
    target = target_version(world, state)
    if world.roles[state.env].get("package_enabled", True) and state.installed != target:
        return True
    return any(svc.version != state.installed for svc in state.services.values())


async def converge(world: World, state: HostState) -> Result:
    """One chef run on a host; the caller holds ``world.lock(state.name)``."""
    role = world.roles[state.env]
    target = role["version"]
    state.chef_last_run = time.time()
    out = ["Starting Chef Infra Client, version 18.3.0", f"* role[{state.env}-omnibus-version] {target}"]
    changed = False
    if role.get("package_enabled", True) and state.installed != target:
        code, apt_out, apt_err = await apt_install(world, state, target)
        if code != 0:
            return 1, "\n".join(out) + "\n" + apt_out, (
                apt_err + f"Chef Infra Client failed: apt_package[gitlab-ee] ({target}) returned {code}\n")
        out.append(f"* apt_package[gitlab-ee] action install (installed {target})")
        changed = True
    stale = [name for name, svc in state.services.items() if svc.version != state.installed]
    if stale:
        world.restart_services(state, stale)
        out.append(f"* service[{', '.join(stale)}] action restart")
        changed = True
    if changed:
        world.save_host(state.name)
    out.append(f"Chef Infra Client finished, {'updated' if changed else '0'} resources")
    return 0, "\n".join(out) + "\n", ""


async def _converge_one(world: World, state: HostState) -> bool:
    lock = world.lock(state.name)
    if lock.locked():
        return False  # a command holds the host: chef runs next interval
    async with lock:
        if not (state.reachable and state.chef_running and not state.chef_disabled_reason):
            return False
        start = time.monotonic()
        code, _, err = await converge(world, state)
        world.audit(state.name, "chef-client (interval run)", code, time.monotonic() - start)
        if code:
            log.warning("chef run failed on %s: %s", state.name, err.strip())
        return code == 0


async def run_once(world: World) -> list[str]:
    """One chef interval: converge every host that has drifted; returns their names."""
    due = []
    now = time.time()
    for state in world.hosts.values():
        if state.reachable and state.chef_running and not state.chef_disabled_reason:
            state.chef_last_run = now  # in memory only: a no-op run writes nothing
            if needs_converge(world, state):
                due.append(state)
    if not due:
        return []
    results = await asyncio.gather(*(_converge_one(world, s) for s in due))
    return [s.name for s, ok in zip(due, results, strict=True) if ok]


class ChefLoop:
    """The background chef runs; ``await close()`` stops them."""

    def __init__(self, world: World):
        self.world = world
        self.task = asyncio.create_task(self._run(), name="chef-loop")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.world.config.chef_interval)
            try:
                converged = await run_once(self.world)
                if converged:
                    log.info("chef converged %d host(s): %s", len(converged), ", ".join(converged[:20]))
            except Exception:
                log.exception("chef interval failed")

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


async def start(world: World) -> ChefLoop:
    return ChefLoop(world)
