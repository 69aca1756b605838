"""The fleet engine against the real lab: OpenSSH + the host simulator, real HAProxy x2 for gprd.

Rolls gprd's web role (3 hosts, batches of one, two LBs): a failing install stops the
rollout after its batch with the host drained on every LB; a second run with a good build
repairs it first and finishes; a third run skips everything. Also: the capacity floor and a
version with shell metacharacters are refused with nothing touched, migrations and chef on
the deploy node, host-key checking, HAProxy on the real LBs. The module puts gprd's web and
api roles back on the version they had and starts chef again when it is done.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
import shlex
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from liftoff import chef, deploy, migrations
from liftoff.commands import chain_steps, chained_command
from liftoff.errors import CapacityError, ConfigError, InvalidVersion
from liftoff.fleet import INSPECT_STEPS, RolloutOptions, pending_patches, plan, rollout
from liftoff.haproxy import HAProxy
from liftoff.inventory import load_inventory, parse_inventory
from liftoff.patches import patch_detail
from liftoff.remote import Remote
from liftoff.store import Store

pytestmark = pytest.mark.lab

ENV = "gprd"
FAILING = "17.8.571-ee.0"  # install fails on web-02-sv-gprd
GOOD = "17.8.572-ee.0"
NEXT = "17.8.573-ee.0"  # includes the patch lab-fix-2
OPTIONS = RolloutOptions(drain_timeout=10, up_timeout=60, health_timeout=30)


def lab_audit_lines(lab) -> int:
    path = lab.config.path("state", "audit.log")
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.fixture(scope="module")
def fleet_env(lab):
    """Lab exports in os.environ for the module; restores gprd web/api and chef at the end."""
    mp = pytest.MonkeyPatch()
    for name, value in lab.env.items():
        mp.setenv(name, value)
    before = {h["name"]: h["installed"] for e in lab.status()["environments"].values() for h in e["hosts"]}
    yield lab
    env = load_inventory().env(ENV)
    store = Store("sqlite://")
    original = {before[h.name] for r in env.roles if r.name in ("web", "api") for h in r.hosts}
    try:
        if len(original) == 1:
            opts = dataclasses.replace(OPTIONS, chef_start="cleanup")
            back = original.pop()
            report = asyncio.run(rollout(env, back, run_id="restore", store=store, roles=["web", "api"],
                                         options=opts))
            assert report.status == "success", report.to_json()

        async def enable_chef() -> None:
            async with Remote(store=store, run_id="restore", env=ENV) as remote:
                await chef.start(remote, [env.deploy_node, *env.hosts()])

        asyncio.run(enable_chef())
    finally:
        mp.undo()


@pytest.fixture
def store(tmp_path):
    s = Store(f"sqlite:///{tmp_path / 'state.db'}")
    yield s
    s.close()


def lb_states(env, host: str) -> set[str]:
    return {f"{s.status}/{s.admin}" for states in HAProxy.for_env(env).servers(host).values() for s in states}


def with_app_port(lab) -> object:
    """The lab inventory plus ``extra.app_port`` (the field liftoff reads for HTTP checks)."""
    data = yaml.safe_load(Path(lab.env["LIFTOFF_INVENTORY"]).read_text())
    data["environments"][ENV]["extra"] = {"app_port": lab.config.app_port}
    return parse_inventory(data).env(ENV)


def roll(env, version, run_id, store, roles=("web",), options=OPTIONS):
    return asyncio.run(rollout(env, version, run_id=run_id, store=store, roles=list(roles), options=options))


def test_failed_install_stops_and_stays_drained_then_resume_finishes(fleet_env, store, caplog, capfd):
    lab = fleet_env
    lab.build_add(FAILING, install_fails_on=["web-02-sv-gprd"])
    lab.build_add(GOOD)
    env = load_inventory().env(ENV)
    web = [h.name for h in env.role("web").hosts]
    assert web == ["web-01-sv-gprd", "web-02-sv-gprd", "web-03-sv-gprd"]

    first = roll(env, FAILING, "fleet-lab-1", store)
    assert first.status == "failed"
    assert list(first.failed_hosts) == ["web-02-sv-gprd"]
    reason = first.failed_hosts["web-02-sv-gprd"]
    assert "install failed" in reason and "exit 100" in reason
    assert first.roles["web"].batches == [["web-01-sv-gprd"], ["web-02-sv-gprd"]]  # stopped after batch 2
    # the failed host: drained on both LBs, recorded, chef stopped; the others UP
    assert lb_states(env, "web-02-sv-gprd") == {"DRAIN/drain"}
    assert [r.host for r in store.drained(ENV)] == ["web-02-sv-gprd"]
    assert store.host_statuses(f"{ENV}:{FAILING}")["web-02-sv-gprd"].status == "failed"
    assert lb_states(env, "web-01-sv-gprd") == lb_states(env, "web-03-sv-gprd") == {"UP/ready"}
    hosts = {h: lab.host_status(h) for h in web}
    web1, web2 = hosts["web-01-sv-gprd"], hosts["web-02-sv-gprd"]
    assert (web1["installed"], web1["running"]) == (FAILING, FAILING)
    assert web2["installed"] != FAILING and web2["chef_running"] is False
    assert hosts["web-03-sv-gprd"]["installed"] != FAILING
    # every command audited with its exit code
    audit = store.audit_records(run_id="fleet-lab-1", host="web-02-sv-gprd")
    install = [a for a in audit if "apt-get install" in a.command]
    assert install and install[0].exit_code == 100 and "dpkg" in install[0].output_tail
    assert [a.command for a in audit][0] == chained_command(INSPECT_STEPS)
    assert audit[0].exit_code == 0 and "run: puma:" in audit[0].output_tail

    # second run, a good build, HTTP checks on: the drained host is repaired first
    env_http = with_app_port(lab)
    caplog.set_level(logging.INFO, logger="liftoff")
    caplog.clear()  # only the second rollout's records
    capfd.readouterr()
    second = roll(env_http, GOOD, "fleet-lab-2", store)
    assert second.status == "success", second.to_json()
    # the task log (stdout here, or log records): one line per host (old -> new, duration,
    # batch), LB lines name the batch and a count
    log = capfd.readouterr().out + "\n".join(r.getMessage() for r in caplog.records)
    for i, h in enumerate(["web-02-sv-gprd", "web-01-sv-gprd", "web-03-sv-gprd"], start=1):
        old = FAILING if h == "web-01-sv-gprd" else hosts[h]["installed"]
        tail = ", repaired" if h == "web-02-sv-gprd" else ""
        want = rf"{h}: {re.escape(old)} -> {re.escape(GOOD)} in \d+\.\d s \(batch {i} of 3{tail}\)"
        # the same line may reach both stdout and the log records: count distinct lines
        assert len(set(re.findall(rf"{h}: \S+ -> \S+ in [^\n]*\)", log))) == 1 and re.search(want, log), log
        assert f"haproxy drain: batch {i} of web, 1 host(s) on 2 LB(s)" in log
        assert f"haproxy ready: batch {i} of web, 1 host(s) on 2 LB(s)" in log
    # the XCom is the summary; the full report is in the state store
    summary = deploy.keep_report(SimpleNamespace(run_id="fleet-lab-2", store=store), second, "web")
    assert len(json.dumps(summary)) < 1500 and summary["roles"]["web"]["counts"] == {"done": 3}
    kept = store.report("fleet-lab-2", summary["report"]["rollout"])
    assert json.loads(kept) == json.loads(second.to_json())
    assert second.roles["web"].batches[0] == ["web-02-sv-gprd"]
    assert second.hosts["web-02-sv-gprd"].repaired
    assert store.drained(ENV) == []
    for h in web:
        assert lb_states(env, h) == {"UP/ready"}
        state = lab.host_status(h)
        assert state["installed"] == GOOD and state["running"] == GOOD
    assert any(f"apt-get install -y gitlab-ee={GOOD}" in a.command and a.exit_code == 0
               for a in store.audit_records(run_id="fleet-lab-2", host="web-02-sv-gprd"))

    # third run: nothing to do, nothing touched
    lines = lab_audit_lines(lab)
    third = roll(env, GOOD, "fleet-lab-3", store)
    assert third.status == "success" and third.counts() == {"skipped": 3}
    assert [a.command for a in store.audit_records(run_id="fleet-lab-3")] == [
        chained_command(INSPECT_STEPS)] * 3
    assert lab_audit_lines(lab) - lines == 6, "dpkg-query and gitlab-ctl status on each host"
    assert store.host_statuses(f"{ENV}:{GOOD}")["web-01-sv-gprd"].status == "done"
    json.loads(third.to_json())


def test_capacity_floor_refuses_an_oversized_batch(fleet_env, store):
    env = load_inventory().env(ENV)
    web = dataclasses.replace(env.role("web"), batch="100%")
    big = dataclasses.replace(env, roles=tuple(web if r.name == "web" else r for r in env.roles))
    lines = lab_audit_lines(fleet_env)
    refused = "role web: batch 1 of 3 host.*capacity floor.*Nothing was changed"
    with pytest.raises(CapacityError, match=refused):
        roll(big, GOOD, "fleet-lab-capacity", store)
    assert lab_audit_lines(fleet_env) == lines
    assert store.audit_records() == [] and store.drained() == []
    assert all(lb_states(env, h.name) == {"UP/ready"} for h in env.role("web").hosts)


@pytest.mark.parametrize("version", ["17.8.572-ee.0; touch /tmp/pwned", "17.8.572-ee.0$(id)",
                                     "17.8.572-ee.0'", "`reboot`"])
def test_version_with_shell_metacharacters_touches_nothing(fleet_env, store, version):
    env = load_inventory().env(ENV)
    lines = lab_audit_lines(fleet_env)
    with pytest.raises(InvalidVersion):
        roll(env, version, "fleet-lab-quoting", store)
    assert lab_audit_lines(fleet_env) == lines
    assert store.audit_records() == [] and store.drained() == []


def test_migrations_and_chef_on_the_deploy_node(fleet_env, store):
    env = load_inventory().env(ENV)

    async def go():
        async with Remote(store=store, run_id="fleet-lab-mig", env=ENV) as remote:
            regular = await migrations.regular(remote, env, version=GOOD, run_id="fleet-lab-mig")
            pending_post = await migrations.pending_post_migrations(remote, env)
            post = await migrations.post_deployment(remote, env)
            applied = await migrations.applied_post_migrations(remote, env)
            role_before = await chef.role_version(remote, env)
            await chef.set_role_version(remote, env, GOOD)
            role_after = await chef.role(remote, env)
            await chef.set_role_version(remote, env, role_before)
            return regular, pending_post, post, applied, role_after

    regular, pending_post, post, applied, role_after = asyncio.run(go())
    assert regular.ok and any("_regular_17_8_572" in m for m in regular.applied)
    assert not any("_post_" in m for m in regular.applied)
    assert any("_post_17_8_572" in m for m in pending_post)
    assert set(pending_post) <= set(post.applied) and post.command == "gitlab-rake db:migrate"
    assert any("_post_17_8_572" in m for m in applied)
    assert role_after["version"] == GOOD
    assert fleet_env.host_status(env.deploy_node.name)["installed"] == GOOD
    audited = [a.command for a in store.audit_records(run_id="fleet-lab-mig")]
    assert "SKIP_POST_DEPLOYMENT_MIGRATIONS=true gitlab-rake db:migrate" in audited
    assert "gitlab-rake db:migrate" in audited


def test_host_keys_are_always_verified(fleet_env, tmp_path, monkeypatch):
    env = load_inventory().env(ENV)
    host = env.role("web").hosts[0]
    conn = json.loads(fleet_env.env["AIRFLOW_CONN_LIFTOFF_SSH"])
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    conn["extra"]["known_hosts"] = str(empty)
    monkeypatch.setenv("AIRFLOW_CONN_LIFTOFF_SSH", json.dumps(conn))

    async def run_once(**kw):
        async with Remote(**kw) as remote:
            return await remote.run(host, "dpkg-query -W '-f=${Version}' gitlab-ee", 60)

    r = asyncio.run(run_once())
    assert r.exit_code is None and "HostKeyNotVerifiable" in r.error
    conn["extra"]["known_hosts"] = fleet_env.env_known_hosts
    conn["extra"]["no_host_key_check"] = True
    monkeypatch.setenv("AIRFLOW_CONN_LIFTOFF_SSH", json.dumps(conn))
    r = asyncio.run(run_once())
    assert r.exit_code is None and "no_host_key_check" in r.error
    # without Airflow, liftoff.settings builds the same options, still verifying host keys
    conn["extra"].pop("no_host_key_check")
    monkeypatch.setenv("AIRFLOW_CONN_LIFTOFF_SSH", json.dumps(conn))
    monkeypatch.setenv("LIFTOFF_NO_AIRFLOW", "1")
    r = asyncio.run(run_once())
    assert r.ok and r.stdout.strip()
    conn["extra"]["known_hosts"] = str(empty)
    monkeypatch.setenv("AIRFLOW_CONN_LIFTOFF_SSH", json.dumps(conn))
    r = asyncio.run(run_once())
    assert r.exit_code is None and "HostKeyNotVerifiable" in r.error
    with pytest.raises(ConfigError):
        Remote(timeout=10)


def test_haproxy_on_the_real_lbs(fleet_env):
    env = load_inventory().env(ENV)
    ha = HAProxy.for_env(env)
    host = "api-01-sv-gprd"
    assert ha.disagreements() == []
    result = ha.drain([host])
    assert sorted(result.applied) == ["fe-01-lb-gprd", "fe-02-lb-gprd"]
    assert lb_states(env, host) == {"DRAIN/drain"}
    assert ha.wait_sessions_zero([host], timeout=10) == {}
    ha.ready([host])
    assert ha.wait_up([host], timeout=30) == {}
    # one LB changed behind liftoff's back: reported as a disagreement
    fleet_env.haproxy("fe-02-lb-gprd", f"set server api/{host} state maint")
    try:
        found = [(d.backend, d.server) for d in ha.disagreements()]
        assert found == [("api", host)]
        assert ha.wait_up([host], timeout=1) == {host: {"fe-02-lb-gprd": "api:MAINT/maint"}}
    finally:
        ha.ready([host])
    assert ha.wait_up([host], timeout=30) == {}


def test_started_is_called_once_the_remote_command_runs(fleet_env):
    """``Remote.run(started=...)`` fires while the command still runs (the fleet starts the next
    batch's inspection then), and once for a host that cannot be reached."""
    env = load_inventory().env(ENV)
    host = env.host("web-01-sv-gprd")
    seen: list[str | None] = []

    def started() -> None:
        seen.append(fleet_env.host_status(host.name)["installed"])

    async def go():
        async with Remote() as remote:
            before = fleet_env.host_status(host.name)["installed"]
            r = await remote.run(host, f"apt-get install -y gitlab-ee={FAILING}", 60, started=started)
            unreachable = dataclasses.replace(host, name="nowhere-01", address="127.0.0.1")
            lost = await remote.run(unreachable, "gitlab-ctl status", 60, started=lambda: seen.append("lost"))
            return before, r, lost

    before, r, lost = asyncio.run(go())
    assert before != FAILING and r.ok, r.describe()
    assert seen == [before, "lost"], "called once each, before the install finished"
    assert lost.exit_code is None and fleet_env.host_status(host.name)["installed"] == FAILING


def audited_commands(store, run_id: str) -> dict[str, list[str]]:
    """liftoff's audit trail: per host, the commands sent, a session's chain split into its steps."""
    out: dict[str, list[str]] = {}
    for a in store.audit_records(run_id=run_id):
        out.setdefault(a.host, []).extend(c for _, c in chain_steps(a.command) or [("", a.command)])
    return out


def lab_logged_commands(lab, since: int) -> dict[str, list[str]]:
    """The lab's own audit log after line ``since``: per host, each command that ran (a chain's
    one by one), chef's interval runs left out."""
    out: dict[str, list[str]] = {}
    for line in lab.config.path("state", "audit.log").read_text().splitlines()[since:]:
        fields = line.split("\t")
        if fields[4] != "chef-client (interval run)":
            out.setdefault(fields[1], []).append(fields[4])
    return out


def test_the_rollout_runs_exactly_the_commands_its_plan_lists(fleet_env, store):
    """plan() and the rollout come from one flow: for every host, the commands the dry run
    lists are those the host ran, in the same order (liftoff's audit trail and the lab's log),
    post-deployment patches included (on their roles only, not when the build includes them)."""
    lab = fleet_env
    lab.build_add(NEXT, includes_patches=["lab-fix-2"])
    env = load_inventory().env(ENV)
    for patch_id, roles in (("lab-fix-1", ["api"]), ("lab-fix-2", ["web", "api"])):
        hosts = [h.name for r in roles for h in env.role(r).hosts]
        store.record_patch(patch_id, ENV, "fleet-lab-patch", "ops", hosts=hosts,
                           detail=patch_detail("--- a/x\n+++ b/x\n", "lab hotfix", roles))
    options = dataclasses.replace(OPTIONS, chef_start="cleanup", included_patches=("lab-fix-2",))
    run_id = "fleet-lab-plan"
    patches = pending_patches(store, env)
    planned = {p.host: p.commands
               for p in plan(env, ["web", "api"], NEXT, run_id=run_id, options=options, patches=patches)}
    assert len(planned) == 6 and all(len(c) > 8 for c in planned.values())
    assert "gitlab-patch apply lab-fix-1" in planned["api-01-sv-gprd"]
    assert not any(c.startswith("gitlab-patch") for c in planned["web-01-sv-gprd"])

    since = lab_audit_lines(lab)
    report = roll(env, NEXT, run_id, store, roles=("web", "api"), options=options)
    assert report.status == "success", report.to_json()
    assert report.counts() == {"done": 6}

    assert audited_commands(store, run_id) == planned
    logged = lab_logged_commands(lab, since)

    def same(commands: list[str]) -> list[str]:  # the lab logs a chain's commands re-quoted
        return [shlex.join(shlex.split(c)) for c in commands]

    assert {h: same(logged.get(h, [])) for h in planned} == {h: same(c) for h, c in planned.items()}
    states = {h: lab.host_status(h) for h in planned}
    assert all(state["installed"] == NEXT for state in states.values())
    api = {h.name for h in env.role("api").hosts}
    assert {h for h, state in states.items() if "lab-fix-1" in state["patches"]} == api
    # the comparison sees a step the plan leaves out: a plan unaware of the patches differs on api
    unaware = plan(env, ["web", "api"], NEXT, run_id=run_id, options=options)
    assert {p.host for p in unaware if p.commands != planned[p.host]} == api


def window_env(lab):
    """gprd with HTTP checks and its web role rolled as a sliding window of 2 hosts (floor 1)."""
    env = with_app_port(lab)
    web = dataclasses.replace(env.role("web"), batch="2", capacity_floor="1", rollout="window")
    return dataclasses.replace(env, roles=tuple(web if r.name == "web" else r for r in env.roles))


def test_a_sliding_window_rolls_the_real_lab_and_stops_drained_after_a_failure(fleet_env, store, caplog):
    """The window mode end to end on real sshd, HAProxy and hosts: a good build reaches every
    web host, each back UP and ready on both LBs, no record left; then a build failing on
    web-02 fails it, leaves it drained and recorded, and drains nothing after the failure."""
    lab = fleet_env
    good, bad, fix = "17.8.590-ee.0", "17.8.591-ee.0", "17.8.592-ee.0"
    lab.build_add(good)
    lab.build_add(bad, install_fails_on=["web-02-sv-gprd"])
    lab.build_add(fix)
    env = window_env(lab)
    web = [h.name for h in env.role("web").hosts]

    caplog.set_level(logging.INFO, logger="liftoff")
    report = roll(env, good, "fleet-window-1", store)
    assert report.status == "success", report.to_json()
    drains = [r.getMessage() for r in caplog.records if r.getMessage().startswith("haproxy drain:")]
    group_line = r"haproxy drain: window group \d+ of web, [12] host\(s\) on 2 LB\(s\)"
    assert drains and all(re.fullmatch(group_line, m) for m in drains), drains
    assert report.counts() == {"done": 3}
    assert all(len(group) <= 2 for group in report.roles["web"].batches), report.roles["web"].batches
    assert store.drained(ENV) == []
    for h in web:
        assert lb_states(env, h) == {"UP/ready"}
        assert (lab.host_status(h)["installed"], lab.host_status(h)["running"]) == (good, good)

    failed = roll(env, bad, "fleet-window-2", store)
    assert failed.status == "failed" and list(failed.failed_hosts) == ["web-02-sv-gprd"]
    assert "install failed" in failed.failed_hosts["web-02-sv-gprd"]
    assert lb_states(env, "web-02-sv-gprd") == {"DRAIN/drain"}
    assert [r.host for r in store.drained(ENV)] == ["web-02-sv-gprd"]
    assert store.host_statuses(f"{ENV}:{bad}")["web-02-sv-gprd"].status == "failed"
    # the other hosts: done (in flight with web-02) or never drained, and in service either way
    for h in ("web-01-sv-gprd", "web-03-sv-gprd"):
        assert failed.hosts[h].status in ("done", "pending"), failed.hosts[h]
        assert lb_states(env, h) == {"UP/ready"}
        want = bad if failed.hosts[h].status == "done" else good
        assert lab.host_status(h)["installed"] == want

    repaired = roll(env, fix, "fleet-window-3", store)  # a fixed build: web-02 repaired
    assert repaired.status == "success", repaired.to_json()
    assert repaired.hosts["web-02-sv-gprd"].repaired and store.drained(ENV) == []
    assert all(lb_states(env, h) == {"UP/ready"} for h in web)
