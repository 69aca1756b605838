"""liftoff.migrations on a fake deploy node: commands, long timeouts, output kept, status parsing."""

from __future__ import annotations

import asyncio
import shlex

import pytest

from liftoff import migrations
from liftoff.errors import MigrationError
from liftoff.inventory import HostRef
from liftoff.remote import CommandResult
from tests.unit.fleet_fakes import make_env

STATUS = """database: gitlabhq_production (gprd)

 Status   Migration ID
--------------------------------------------------
 up     000001_regular_17_5_0_ee_0
 up     000001_post_17_5_0_ee_0
 up     000002_regular_17_6_0_ee_0
 down   000002_post_17_6_0_ee_0
"""


class DeployNode:
    """A fake deploy node: package, chef, and a database of applied migrations."""

    def __init__(self, installed: str = "17.5.0-ee.0", fail: bool = False):
        self.installed = installed
        self.fail = fail
        self.chef = True
        self.applied = ["000001_regular_17_5_0_ee_0", "000001_post_17_5_0_ee_0"]
        self.calls: list[tuple[str, float | None]] = []

    def contains(self) -> tuple[list[str], list[str]]:
        versions = ["17_5_0_ee_0"] + (["17_6_0_ee_0"] if self.installed == "17.6.0-ee.0" else [])
        return ([f"{i + 1:06d}_regular_{v}" for i, v in enumerate(versions)],
                [f"{i + 1:06d}_post_{v}" for i, v in enumerate(versions)])

    async def run(self, host: HostRef, command: str, timeout: float | None = None) -> CommandResult:
        self.calls.append((command, timeout))
        argv = shlex.split(command)
        env = {}
        while argv and "=" in argv[0]:
            k, _, v = argv.pop(0).partition("=")
            env[k] = v
        code, out, err = 0, "", ""
        if argv[0] == "dpkg-query":
            out = self.installed
        elif argv[0] == "chef-client-disable":
            self.chef = False
        elif argv[:2] == ["apt-get", "install"]:
            self.installed = argv[-1].split("=", 1)[1]
        elif argv == ["gitlab-rake", "db:migrate:status"]:
            regular, post = self.contains()
            out = "\n".join(f" {'up' if m in self.applied else 'down':<6} {m}"
                            for m in sorted(set(regular + post + self.applied)))
        elif argv == ["gitlab-rake", "db:migrate"]:
            regular, post = self.contains()
            wanted = regular if env.get("SKIP_POST_DEPLOYMENT_MIGRATIONS") == "true" else regular + post
            for m in wanted:
                if m not in self.applied:
                    out += f"== {m}: migrating\n"
                    if self.fail:
                        err = "rake aborted!\nPG::QueryCanceled\n"
                        return CommandResult(1, out, err, 1.0, host.name, command)
                    self.applied.append(m)
                    out += f"== {m}: migrated\n"
        else:
            code, err = 127, "unknown"
        return CommandResult(code, out, err, 0.1, host.name, command)

    async def check(self, host, command, timeout=None):
        r = await self.run(host, command, timeout)
        assert r.ok
        return r


@pytest.fixture
def env():
    return make_env([], {"web": {"hosts": 1}})


def test_parse_status_and_post_detection():
    assert migrations.parse_status(STATUS) == [
        ("up", "000001_regular_17_5_0_ee_0"), ("up", "000001_post_17_5_0_ee_0"),
        ("up", "000002_regular_17_6_0_ee_0"), ("down", "000002_post_17_6_0_ee_0")]
    assert migrations.is_post_migration("000002_post_17_6_0_ee_0")
    assert migrations.is_post_migration("db/post_migrate/20230101_add_index.rb")
    assert not migrations.is_post_migration("000002_regular_17_6_0_ee_0")


def test_regular_then_post_on_the_deploy_node(env):
    node = DeployNode()
    regular = asyncio.run(migrations.regular(node, env, version="17.6.0-ee.0", run_id="run-1"))
    assert regular.ok and regular.kind == "regular" and regular.host == "deploy-01-sv-gprd"
    assert regular.applied == ["000002_regular_17_6_0_ee_0"]
    assert "000002_regular_17_6_0_ee_0: migrated" in regular.output
    commands = [c for c, _ in node.calls]
    # the package first (chef stopped so it does not convert the node back), then the migrations
    assert commands.index("chef-client-disable 'liftoff deploy run-1'") < commands.index(
        "apt-get install -y gitlab-ee=17.6.0-ee.0") < commands.index(
        "SKIP_POST_DEPLOYMENT_MIGRATIONS=true gitlab-rake db:migrate")
    timeout = dict(node.calls)["SKIP_POST_DEPLOYMENT_MIGRATIONS=true gitlab-rake db:migrate"]
    assert timeout >= 3600
    assert asyncio.run(migrations.pending_post_migrations(node, env)) == ["000002_post_17_6_0_ee_0"]
    post = asyncio.run(migrations.post_deployment(node, env))
    assert post.command == "gitlab-rake db:migrate" and post.applied == ["000002_post_17_6_0_ee_0"]
    assert asyncio.run(migrations.pending_post_migrations(node, env)) == []
    applied = asyncio.run(migrations.applied_post_migrations(node, env))
    assert applied == ["000001_post_17_5_0_ee_0", "000002_post_17_6_0_ee_0"]
    contained_in_17_5 = ["000001_post_17_5_0_ee_0", "000001_regular_17_5_0_ee_0"]
    assert migrations.post_migrations_not_in(applied, contained_in_17_5) == ["000002_post_17_6_0_ee_0"]


def test_package_not_reinstalled_when_present(env):
    node = DeployNode(installed="17.6.0-ee.0")
    asyncio.run(migrations.regular(node, env, version="17.6.0-ee.0"))
    assert not any(c.startswith(("apt-get", "chef-client-disable")) for c, _ in node.calls)


def test_failure_raises_with_the_whole_output(env):
    node = DeployNode(installed="17.6.0-ee.0", fail=True)
    with pytest.raises(migrations.MigrationFailed) as info:
        asyncio.run(migrations.regular(node, env))
    assert isinstance(info.value, MigrationError)
    result = info.value.result
    assert result.exit_code == 1 and "rake aborted!" in result.output and "migrating" in result.output
    assert "regular migrations failed on deploy-01-sv-gprd" in str(info.value)
