"""Chef around a deploy: stop it on hosts, point the environment's version role at the new
package (on the deploy node), start it again.

GitLab.com's order: stop chef, update the version role, deploy, start chef. Chef must not
run on a host whose package differs from the role's version, or it converges the host
behind HAProxy's back; so a failed deploy leaves chef stopped on the failed hosts only
and :class:`ChefReport` names them.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

from liftoff.commands import (
    chef_disable_command,
    chef_enable_command,
    chef_role_set_version_command,
    chef_role_show_command,
    installed_version_command,
)
from liftoff.errors import RemoteError
from liftoff.inventory import Environment, HostRef
from liftoff.remote import CommandFailed, Remote
from liftoff.versions import parse_version, validate_name

ROLE_TIMEOUT = 120.0
CHEF_TIMEOUT = 120.0


@dataclass
class ChefReport:
    """Hosts whose chef was stopped or started, those that failed (with why), those left stopped."""

    stopped: list[str] = field(default_factory=list)
    started: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    left_stopped: list[str] = field(default_factory=list)
    role_version: str | None = None

    @property
    def ok(self) -> bool:
        return not self.failed

    def to_dict(self) -> dict:
        return asdict(self)


def deploy_reason(run_id: str) -> str:
    """The chef-client-disable reason liftoff uses: ``liftoff deploy <run>``."""
    return f"liftoff deploy {validate_name('run_id', run_id)}"


async def _each(remote: Remote, hosts: Iterable[HostRef], command: str) -> dict[str, str | None]:
    """Run one command on many hosts; {host: None on success, else the reason}."""
    hosts = list(hosts)
    results = await asyncio.gather(*(remote.run(h, command, CHEF_TIMEOUT) for h in hosts))
    return {h.name: (None if r.ok else r.describe()) for h, r in zip(hosts, results, strict=True)}


async def stop(remote: Remote, hosts: Iterable[HostRef], reason: str) -> ChefReport:
    """``chef-client-disable 'REASON'`` on every host."""
    command = chef_disable_command(reason)
    report = ChefReport()
    for name, err in (await _each(remote, hosts, command)).items():
        if err is None:
            report.stopped.append(name)
        else:
            report.failed[name] = err
    return report


async def start(remote: Remote, hosts: Iterable[HostRef], exclude: Iterable[str] = ()) -> ChefReport:
    """``chef-client-enable`` on every host except ``exclude`` (reported as left stopped)."""
    skip = set(exclude)
    hosts = list(hosts)
    report = ChefReport(left_stopped=sorted(h.name for h in hosts if h.name in skip))
    todo = [h for h in hosts if h.name not in skip]
    for name, err in (await _each(remote, todo, chef_enable_command())).items():
        if err is None:
            report.started.append(name)
        else:
            report.failed[name] = err
            report.left_stopped.append(name)
    report.left_stopped.sort()
    return report


async def role(remote: Remote, env: Environment) -> dict:
    """The environment's version role as the deploy node shows it (``gitlab-chef-role show``)."""
    result = await remote.check(env.deploy_node, chef_role_show_command(), ROLE_TIMEOUT)
    try:
        data = json.loads(result.stdout)
    except ValueError:
        raise RemoteError(f"{env.deploy_node.name}: gitlab-chef-role show printed no JSON: "
                          f"{result.stdout[:200]!r}") from None
    if not isinstance(data, dict):
        raise RemoteError(f"{env.deploy_node.name}: gitlab-chef-role show printed {data!r}")
    return data


async def role_version(remote: Remote, env: Environment) -> str | None:
    version = (await role(remote, env)).get("version")
    return str(version) if version else None


async def set_role_version(remote: Remote, env: Environment, version: str) -> dict:
    """Write the version into the environment's role, then read it back to confirm."""
    version = str(parse_version(version))
    await remote.check(env.deploy_node, chef_role_set_version_command(version), ROLE_TIMEOUT)
    data = await role(remote, env)
    if str(data.get("version")) != version:
        raise RemoteError(f"{env.name}: chef role still says {data.get('version')!r} "
                          f"after set-version {version}")
    return data


async def prepare(remote: Remote, env: Environment, version: str, run_id: str,
                  hosts: Iterable[HostRef] | None = None) -> ChefReport:
    """Before a deploy: stop chef on the environment's hosts (deploy node included), then set
    the role's version. Raises when chef could not be stopped everywhere (nothing deployed yet)."""
    version = str(parse_version(version))
    targets = list(hosts) if hosts is not None else [env.deploy_node, *env.hosts()]
    report = await stop(remote, targets, deploy_reason(run_id))
    if report.failed:
        bad = "; ".join(f"{h}: {e}" for h, e in sorted(report.failed.items()))
        raise RemoteError(f"{env.name}: could not stop chef on {len(report.failed)} host(s): {bad}")
    report.role_version = (await set_role_version(remote, env, version)).get("version")
    return report


async def finish(remote: Remote, env: Environment, version: str, failed_hosts: Iterable[str] = (),
                 hosts: Iterable[HostRef] | None = None, *, verify: bool = True) -> ChefReport:
    """After a deploy (cleanup): make sure the role holds ``version`` and start chef again.

    Failed hosts keep chef stopped. With ``verify`` (the default) chef is started only on
    hosts whose installed package is ``version`` (one dpkg-query each): a host the deploy
    never reached would otherwise be upgraded by chef without being drained. Every host
    left stopped is in ``left_stopped``, with the reason in ``failed`` when it is not one of
    ``failed_hosts``."""
    version = str(parse_version(version))
    current = await role_version(remote, env)
    if current != version:
        await set_role_version(remote, env, version)
    targets = list(hosts) if hosts is not None else [env.deploy_node, *env.hosts()]
    skip = set(failed_hosts)
    mismatched: dict[str, str] = {}
    if verify:
        todo = [h for h in targets if h.name not in skip]
        command = installed_version_command()
        results = await asyncio.gather(*(remote.run(h, command, CHEF_TIMEOUT) for h in todo))
        for h, r in zip(todo, results, strict=True):
            installed = r.stdout.strip() if r.ok else None
            if installed != version:
                mismatched[h.name] = (
                    f"installed {installed} differs from the role's {version}; chef left stopped"
                    if r.ok else f"cannot read the installed version: {r.describe()}")
    report = await start(remote, targets, exclude=skip | set(mismatched))
    report.failed.update(mismatched)
    report.role_version = version
    return report


__all__ = ["ChefReport", "CommandFailed", "deploy_reason", "finish", "prepare", "role", "role_version",
           "set_role_version", "start", "stop"]
