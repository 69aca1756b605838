"""The host simulator's command interpreter and chef, against an in-memory world on disk."""

from __future__ import annotations

import asyncio
import json

import pytest

from lab import chef
from lab.config import LabConfig
from lab.hostsim import parse, relay_script, run_command
from lab.model import BASE_VERSION, IN_PLACE_MAX_BYTES, World, overwrite_json

NEW = "17.6.0-ee.0"
WEB = "web-01-sv-gstg"
WEB2 = "web-02-sv-gstg"
DEPLOY = "deploy-01-sv-gstg"


@pytest.fixture
def world(tmp_path) -> World:
    config = LabConfig(lab_dir=tmp_path, octet=50, install_seconds=0.01, migration_seconds=0.0)
    config.save()
    world = World.open(config)
    world.add_build(NEW)
    yield world
    world.close()


def run(world: World, host: str, command: str) -> tuple[int, str, str]:
    return asyncio.run(run_command(world, world.hosts[host], command))


def on_disk(world: World, host: str) -> dict:
    return json.loads((world.state_dir / "hosts" / f"{host}.json").read_text())


def test_a_host_file_is_rewritten_in_place_and_whole_when_shorter(world):
    file = world.state_dir / "hosts" / f"{WEB}.json"
    inode = file.stat().st_ino
    world.hosts[WEB].chef_disabled_reason = "x" * 300
    world.save_host(WEB)
    longer = file.stat().st_size
    world.hosts[WEB].chef_disabled_reason = ""
    world.save_host(WEB)
    assert file.stat().st_ino == inode  # no new file renamed over the old one
    assert file.stat().st_size == longer  # padded, not truncated
    assert file.read_bytes().endswith(b" ") and on_disk(world, WEB) == world.hosts[WEB].to_json()
    assert World.open(world.config).hosts[WEB].chef_disabled_reason == ""


def test_overwrite_json_creates_the_folder_and_writes_large_data_whole(tmp_path):
    small = tmp_path / "new" / "small.json"
    overwrite_json(small, {"a": 1})
    assert json.loads(small.read_text()) == {"a": 1}
    big = {"log": ["y" * 100] * (IN_PLACE_MAX_BYTES // 100 + 1)}
    overwrite_json(small, big)  # over a page: written aside and renamed over it
    assert json.loads(small.read_text()) == big
    overwrite_json(small, {"a": 2})  # a file over a page shrinks once, then is rewritten in place
    assert small.read_text().rstrip() == json.dumps({"a": 2}, indent=1)
    inode = small.stat().st_ino
    overwrite_json(small, {"a": 3})
    assert small.stat().st_ino == inode and json.loads(small.read_text()) == {"a": 3}


def test_parse_strips_sudo_and_env_prefixes():
    assert parse("sudo -n SKIP_POST_DEPLOYMENT_MIGRATIONS=true gitlab-rake db:migrate") == (
        {"SKIP_POST_DEPLOYMENT_MIGRATIONS": "true"}, ["gitlab-rake", "db:migrate"])
    assert parse("chef-client-disable 'deploy 17.6'") == ({}, ["chef-client-disable", "deploy 17.6"])
    assert parse("sudo -u git /opt/gitlab/bin/gitlab-rake db:migrate:status") == (
        {}, ["gitlab-rake", "db:migrate:status"])


def test_apt_install_changes_only_that_host_and_persists(world):
    other_file = world.state_dir / "hosts" / f"{WEB2}.json"
    other_mtime = other_file.stat().st_mtime_ns
    code, out, err = run(world, WEB, f"sudo apt-get install -y gitlab-ee={NEW}")
    assert (code, err) == (0, "")
    assert world.hosts[WEB].installed == NEW
    assert world.hosts[WEB].running == BASE_VERSION  # services still run the old code
    assert world.hosts[WEB2].installed == BASE_VERSION
    assert on_disk(world, WEB)["installed"] == NEW
    assert other_file.stat().st_mtime_ns == other_mtime
    assert run(world, WEB, "dpkg-query -W -f='${Version}' gitlab-ee")[1] == NEW
    assert World.open(world.config).hosts[WEB].installed == NEW


def test_apt_install_failures(world):
    code, _, err = run(world, WEB, "apt-get install -y gitlab-ee=99.0.0-ee.0")
    assert code == 100
    assert "E: Version '99.0.0-ee.0' for 'gitlab-ee' was not found" in err
    world.add_build("17.7.0-ee.0", install_fails_on=[WEB])
    code, _, err = run(world, WEB, "apt-get install -y gitlab-ee=17.7.0-ee.0")
    assert code == 100 and "dpkg" in err
    assert world.hosts[WEB].installed == BASE_VERSION
    assert run(world, WEB2, "apt-get install -y gitlab-ee=17.7.0-ee.0")[0] == 0


def test_install_drops_patches(world):
    assert run(world, WEB, "gitlab-patch apply hotfix-1")[0] == 0
    assert run(world, WEB, "gitlab-patch list")[1] == "hotfix-1\n"
    run(world, WEB, f"apt-get install -y gitlab-ee={NEW}")
    assert world.hosts[WEB].patches == []
    assert run(world, WEB, "gitlab-patch list")[1] == ""


def test_unknown_command_exits_127_and_is_audited(world):
    code, out, err = run(world, WEB, "rm -rf /")
    assert (code, out) == (127, "")
    assert err == "lab: unknown command: rm -rf /\n"
    assert run(world, WEB, "gitlab-ctl status && rm -rf /")[0] == 127
    world.close()
    audit = world.audit_path.read_text().splitlines()
    assert audit[0].split("\t")[1:] == [WEB, "127", audit[0].split("\t")[3], "rm -rf /"]
    # a chain is audited command by command, up to the one that failed
    assert [line.split("\t")[4] for line in audit[1:]] == ["gitlab-ctl status", "rm -rf /"]
    assert len(audit) == 3


def test_restart_and_hup_give_new_pids_and_the_installed_version(world):
    before = {name: svc.pid for name, svc in world.hosts[WEB].services.items()}
    run(world, WEB, f"apt-get install -y gitlab-ee={NEW}")
    code, out, _ = run(world, WEB, "gitlab-ctl hup puma")
    assert code == 0
    after = world.hosts[WEB].services
    assert after["puma"].pid != before["puma"] and str(after["puma"].pid) in out
    assert after["workhorse"].pid == before["workhorse"]
    assert world.hosts[WEB].running == NEW
    run(world, WEB, "gitlab-ctl restart")
    assert all(world.hosts[WEB].services[n].pid != before[n] for n in before)
    status = run(world, WEB, "gitlab-ctl status")[1]
    assert f"run: puma: (pid {world.hosts[WEB].services['puma'].pid})" in status
    assert run(world, WEB, "gitlab-ctl hup nosuch")[0] == 1


def test_migrations_regular_then_post(world):
    run(world, DEPLOY, f"apt-get install -y gitlab-ee={NEW}")
    build = world.builds[NEW]
    code, out, _ = run(world, DEPLOY, "SKIP_POST_DEPLOYMENT_MIGRATIONS=true gitlab-rake db:migrate")
    assert code == 0 and build.regular_migration in out
    applied = world.database_of("gstg")["applied"]
    assert build.regular_migration in applied and build.post_migration not in applied
    assert world.database_of("gprd")["applied"] == world.databases["gprd"]["applied"]
    assert build.regular_migration not in world.database_of("gprd")["applied"]
    status = run(world, DEPLOY, "gitlab-rake db:migrate:status")[1]
    assert f" up     {build.regular_migration}" in status
    assert f" down   {build.post_migration}" in status
    run(world, DEPLOY, "gitlab-rake db:migrate")
    assert build.post_migration in world.database_of("gstg")["applied"]
    on_file = json.loads((world.state_dir / "db" / "gstg.json").read_text())
    assert build.post_migration in on_file["applied"]


def test_canary_shares_the_production_database(world):
    run(world, "deploy-cny-01-sv-gprd", f"apt-get install -y gitlab-ee={NEW}")
    run(world, "deploy-cny-01-sv-gprd", "SKIP_POST_DEPLOYMENT_MIGRATIONS=true gitlab-rake db:migrate")
    assert world.builds[NEW].regular_migration in world.database_of("gprd")["applied"]


def test_migration_fails(world):
    bad = world.add_build("17.7.0-ee.0", migration_fails=True)
    run(world, DEPLOY, "apt-get install -y gitlab-ee=17.7.0-ee.0")
    code, _, err = run(world, DEPLOY, "SKIP_POST_DEPLOYMENT_MIGRATIONS=true gitlab-rake db:migrate")
    assert code == 1
    assert bad.regular_migration in err
    applied = world.database_of("gstg")["applied"]
    assert world.builds[NEW].regular_migration in applied  # earlier pending ones ran
    assert bad.regular_migration not in applied


def test_chef_reverts_an_install_when_running_not_when_stopped(world):
    run(world, WEB, f"apt-get install -y gitlab-ee={NEW}")
    run(world, WEB, "gitlab-ctl restart")
    run(world, WEB2, "sudo systemctl stop chef-client")
    run(world, WEB2, f"apt-get install -y gitlab-ee={NEW}")
    run(world, WEB2, "gitlab-ctl restart")
    pid = world.hosts[WEB].services["puma"].pid
    converged = asyncio.run(chef.run_once(world))
    assert WEB in converged and WEB2 not in converged
    assert world.hosts[WEB].installed == BASE_VERSION and world.hosts[WEB].running == BASE_VERSION
    assert world.hosts[WEB].services["puma"].pid != pid
    assert on_disk(world, WEB)["installed"] == BASE_VERSION
    assert world.hosts[WEB2].installed == NEW and world.hosts[WEB2].running == NEW


def test_chef_client_command_and_disable(world):
    assert run(world, WEB, "chef-client-disable 'deploy 17.6'")[0] == 0
    assert on_disk(world, WEB)["chef_running"] is False
    run(world, WEB, f"apt-get install -y gitlab-ee={NEW}")
    code, _, err = run(world, WEB, "chef-client")
    assert code == 1 and "deploy 17.6" in err
    assert asyncio.run(chef.run_once(world)) == []
    assert world.hosts[WEB].installed == NEW
    assert run(world, WEB, "chef-client-disable")[0] == 1  # a reason is required
    run(world, WEB, "chef-client-enable")
    assert run(world, WEB, "chef-client")[0] == 0
    assert world.hosts[WEB].installed == BASE_VERSION


def test_chef_role_only_on_the_deploy_node(world):
    code, _, err = run(world, WEB, f"gitlab-chef-role set-version {NEW}")
    assert code == 1 and "deploy node" in err
    assert world.roles["gstg"]["version"] == BASE_VERSION
    assert run(world, DEPLOY, "gitlab-chef-role set-version 99.0.0-ee.0")[0] == 1
    code, out, _ = run(world, DEPLOY, f"gitlab-chef-role set-version {NEW}")
    assert code == 0 and json.loads(out)["version"] == NEW
    assert json.loads((world.state_dir / "roles.json").read_text())["gstg"]["version"] == NEW
    assert json.loads(run(world, DEPLOY, "gitlab-chef-role show")[1])["version"] == NEW
    assert world.roles["gprd"]["version"] == BASE_VERSION
    # Chef now moves gstg hosts forward, and only them.
    asyncio.run(chef.run_once(world))
    assert world.hosts[WEB].running == NEW
    assert world.hosts["web-01-sv-gprd"].running == BASE_VERSION


def test_unreachable_host_answers_255(world):
    world.set_reachable(WEB, False)
    code, _, err = run(world, WEB, "gitlab-ctl status")
    assert code == 255 and "Connection refused" in err


def test_hosts_run_concurrently_but_one_host_serializes(world):
    world.config.install_seconds = 0.2
    web, web2 = world.hosts[WEB], world.hosts[WEB2]

    async def scenario():
        install = asyncio.create_task(run_command(world, web, f"apt-get install -y gitlab-ee={NEW}"))
        await asyncio.sleep(0)  # the install now sleeps holding WEB's lock
        assert world.lock(WEB).locked()
        assert (await run_command(world, web2, "gitlab-ctl restart"))[0] == 0
        assert not install.done()  # another host was not held up by the install
        restart = asyncio.create_task(run_command(world, web, "gitlab-ctl restart"))
        await asyncio.sleep(0)
        assert not restart.done()  # the same host waits for the install
        await install
        await restart

    asyncio.run(scenario())
    assert web.running == NEW  # the restart ran after the install


def test_relay_script_is_bash_aimed_at_labd(world):
    script = relay_script(world.config)
    assert script.startswith("#!/bin/bash\n")
    assert f"/dev/tcp/{world.config.control_addr}/{world.config.hostsim_port}" in script


def test_a_chain_runs_in_order_and_stops_at_the_first_failure(world):
    before = world.hosts[WEB].services["puma"].pid
    code, out, err = run(world, WEB, "gitlab-ctl hup puma && echo mark:hup && gitlab-ctl restart nosuch "
                                     "&& echo mark:restart && gitlab-ctl hup puma")
    assert code == 1
    assert out.splitlines()[-1] == "mark:hup" and "mark:restart" not in out
    assert "nosuch" in err
    after = world.hosts[WEB].services["puma"].pid
    assert after != before, "the first command ran"
    code, out, _ = run(world, WEB, "dpkg-query -W '-f=${Version}\\n' gitlab-ee && echo done")
    assert (code, out) == (0, f"{world.hosts[WEB].installed}\ndone\n")
    for broken in ("&& gitlab-ctl status", "gitlab-ctl status &&", "gitlab-ctl status && && echo x"):
        assert run(world, WEB, broken)[0] == 2
    assert world.hosts[WEB].services["puma"].pid == after, "a malformed chain runs nothing"
