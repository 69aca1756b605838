"""Database migrations on the environment's deploy node.

Regular migrations (``SKIP_POST_DEPLOYMENT_MIGRATIONS=true gitlab-rake db:migrate``) run
before the fleet is deployed; post-deployment ones (``gitlab-rake db:migrate``) after it, and
they are the point of no return for rollbacks. Both run on the deploy node with a long
timeout (SSH keepalive on), their full output is returned and audited, and a failure raises
:class:`MigrationError` carrying that output. The deploy node needs the target package: pass
``version`` and it is installed first (chef stopped there, so it does not convert it back).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass

from liftoff import chef as chef_mod
from liftoff.commands import (
    apt_install_command,
    chef_disable_command,
    installed_version_command,
    migrate_command,
    migrate_status_command,
)
from liftoff.errors import MigrationError
from liftoff.inventory import Environment
from liftoff.remote import CommandResult, Remote
from liftoff.versions import parse_version

MIGRATION_TIMEOUT = 4 * 3600.0  # a long migration must not die with the SSH session
STATUS_TIMEOUT = 600.0
INSTALL_TIMEOUT = 1800.0
_STATUS_LINE = re.compile(r"^\s*(up|down)\s+(\S+)")
_MIGRATION_VERSION = re.compile(r"^(\d+)_")


class MigrationFailed(MigrationError):
    """Migrations exited non-zero or never finished; ``result`` keeps the whole output."""

    def __init__(self, message: str, result: MigrationResult):
        super().__init__(message)
        self.result = result


@dataclass
class MigrationResult:
    env: str
    kind: str  # regular or post
    host: str
    command: str
    exit_code: int | None
    duration: float
    output: str
    applied: list[str]  # migrations that went from down to up

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def to_dict(self) -> dict:
        return asdict(self)


def parse_status(text: str) -> list[tuple[str, str]]:
    """``gitlab-rake db:migrate:status`` -> [(up|down, migration id)] in printed order."""
    out = []
    for line in text.splitlines():
        m = _STATUS_LINE.match(line)
        if m:
            out.append((m.group(1), m.group(2)))
    return out


def is_post_migration(migration_id: str) -> bool:
    """Whether an id names a post-deployment migration (``..._post_...``, or GitLab's
    ``db/post_migrate`` path when the status shows file names)."""
    return "_post_" in migration_id or "post_migrate" in migration_id


async def ensure_package(remote: Remote, env: Environment, version: str, run_id: str) -> CommandResult | None:
    """Install ``version`` on the deploy node unless it is there already (chef stopped first)."""
    version = str(parse_version(version))
    node = env.deploy_node
    current = await remote.run(node, installed_version_command(), STATUS_TIMEOUT)
    if current.ok and current.stdout.strip() == version:
        return None
    await remote.check(node, chef_disable_command(chef_mod.deploy_reason(run_id)), STATUS_TIMEOUT)
    result = await remote.run(node, apt_install_command(version), INSTALL_TIMEOUT)
    if not result.ok:
        raise MigrationError(f"{env.name}: cannot install {version} on the deploy node {node.name}: "
                             f"{result.describe()}")
    return result


async def status(remote: Remote, env: Environment) -> list[tuple[str, str]]:
    """Every migration the deploy node knows, with its state: [(up|down, id)]."""
    r = await remote.run(env.deploy_node, migrate_status_command(), STATUS_TIMEOUT)
    if not r.ok:
        raise MigrationError(f"{env.name}: db:migrate:status failed: {r.describe()}")
    return parse_status(r.stdout)


async def pending(remote: Remote, env: Environment) -> list[str]:
    return [m for s, m in await status(remote, env) if s == "down"]


async def pending_post_migrations(remote: Remote, env: Environment) -> list[str]:
    """Post-deployment migrations not yet run (what ``post_deployment`` would apply)."""
    return [m for s, m in await status(remote, env) if s == "down" and is_post_migration(m)]


async def applied_post_migrations(remote: Remote, env: Environment) -> list[str]:
    """Post-deployment migrations already run on the environment's database."""
    return [m for s, m in await status(remote, env) if s == "up" and is_post_migration(m)]


def post_migrations_not_in(applied: Iterable[str], contained: Iterable[str]) -> list[str]:
    """Applied post-deployment migrations that a target package does not contain: a rollback
    to that package is unsafe while this list is non-empty."""
    have = set(contained)
    return sorted(m for m in applied if is_post_migration(m) and m not in have)


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
    applied = [m for m in applied if is_post_migration(m)]
    if isinstance(build.get("post_migrations"), list):
        return post_migrations_not_in(applied, build["post_migrations"]), "the build's migration list"
    schema = build.get("schema_version", build.get("seq"))
    if isinstance(schema, int) and not isinstance(schema, bool):
        newer = sorted(m for m in applied if (v := migration_version(m)) is None or v > schema)
        return newer, f"schema version {schema}"
    return None, ""


async def _migrate(remote: Remote, env: Environment, *, post: bool, version: str | None, run_id: str,
                   timeout: float) -> MigrationResult:
    kind = "post" if post else "regular"
    if version is not None:
        await ensure_package(remote, env, version, run_id or "migrations")
    before = {m for s, m in await status(remote, env) if s == "up"}
    command = migrate_command(post_deployment=post)
    r = await remote.run(env.deploy_node, command, timeout)
    after = {m for s, m in await status(remote, env) if s == "up"}
    output = "\n".join(part.rstrip("\n") for part in (r.stdout, r.stderr, r.error) if part)
    result = MigrationResult(env.name, kind, env.deploy_node.name, command, r.exit_code, round(r.duration, 3),
                             output, sorted(after - before))
    if not r.ok:
        raise MigrationFailed(f"{env.name}: {kind} migrations failed on {env.deploy_node.name}: "
                              f"{r.describe()}", result)
    return result


async def regular(remote: Remote, env: Environment, *, version: str | None = None, run_id: str = "",
                  timeout: float = MIGRATION_TIMEOUT) -> MigrationResult:
    """``SKIP_POST_DEPLOYMENT_MIGRATIONS=true gitlab-rake db:migrate`` on the deploy node."""
    return await _migrate(remote, env, post=False, version=version, run_id=run_id, timeout=timeout)


async def post_deployment(remote: Remote, env: Environment, *, version: str | None = None, run_id: str = "",
                          timeout: float = MIGRATION_TIMEOUT) -> MigrationResult:
    """``gitlab-rake db:migrate`` (post-deployment included) on the deploy node."""
    return await _migrate(remote, env, post=True, version=version, run_id=run_id, timeout=timeout)
