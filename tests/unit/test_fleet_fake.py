"""fleet.rollout with a FakeRemote and fake HAProxy LBs over TCP: batching, capacity floor,
stop after a failed batch, resume and repair, quoting, chef, and the JSON report."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
from types import SimpleNamespace

import pytest

from liftoff import chef, deploy
from liftoff.errors import CapacityError, HAProxyError, InvalidVersion
from liftoff.fleet import RolloutOptions, RolloutReport, pending_patches, plan, rollout
from liftoff.haproxy import HAProxy
from liftoff.patches import patch_detail
from liftoff.store import Store
from tests.unit.fleet_fakes import FakeFleet, FakeRemote, LBThread, make_env, wire

OLD, NEW, BAD = "17.5.0-ee.0", "17.6.0-ee.0", "17.6.1-ee.0"
FAST = RolloutOptions(drain_timeout=1, up_timeout=1, health_timeout=1)


@pytest.fixture
def lbs():
    with LBThread("fe-01-lb-gprd", "fe-02-lb-gprd") as t:
        yield t


@pytest.fixture
def store(tmp_path):
    s = Store(f"sqlite:///{tmp_path / 'state.db'}")
    yield s
    s.close()


def setup(lbs, roles, **kw):
    env = make_env(lbs.lbs, roles, **kw)
    fleet = FakeFleet()
    wire(env, fleet, lbs.lbs, OLD)
    fleet.builds |= {NEW, BAD}
    return env, fleet, FakeRemote(fleet)


def roll(env, remote, store, version=NEW, roles=None, options=FAST, run_id="run-1") -> RolloutReport:
    return asyncio.run(rollout(env, version, run_id=run_id, store=store, roles=roles, remote=remote,
                               haproxy=HAProxy.for_env(env, poll=0.05), options=options))


def lb_admin(lbs, host: str) -> set[str]:
    return {s.admin for lb in lbs.lbs for s in lb.server_state(host)}


def set_lines(lbs) -> list[str]:
    return [line for lb in lbs.lbs for line in lb.lines if line.startswith("set ")]


def test_rolls_every_host_in_batches(lbs, store):
    env, fleet, remote = setup(lbs, {"web": {"hosts": 20, "floor": "80%"}})
    report = roll(env, remote, store)
    assert report.status == "success", report.error
    assert report.counts() == {"done": 20}
    assert [len(b) for b in report.roles["web"].batches] == [2] * 10
    for h in env.role("web").hosts:
        assert fleet.hosts[h.name].installed == NEW and fleet.hosts[h.name].running == NEW
        assert lb_admin(lbs, h.name) == {"ready"}
    assert store.drained("gprd") == []
    assert {p.status for p in store.host_statuses("gprd:" + NEW).values()} == {"done"}
    # one drain and one ready line per LB per batch: LB changes are batched
    for lb in lbs.lbs:
        changes = [line for line in lb.lines if line.startswith("set ")]
        assert len(changes) == 20
        assert changes[0].count("state drain") == 2
    # per host, the documented order
    cmds = remote.steps("web-01-sv-gprd")
    # inspect; chef stop, install, reconfigure .. status; verify: three sessions
    assert len(remote.commands("web-01-sv-gprd")) == 3
    order = ["dpkg-query", "gitlab-ctl status", "chef-client-disable 'liftoff deploy run-1'",
             f"apt-get install -y gitlab-ee={NEW}", "gitlab-ctl reconfigure", "gitlab-ctl hup puma",
             "gitlab-ctl restart workhorse", "gitlab-ctl restart nginx", "gitlab-ctl status", "dpkg-query"]
    assert [next(i for i, c in enumerate(cmds) if c.startswith(o) and i >= n)
            for n, o in enumerate(order)] == sorted(range(len(order)))
    assert len(cmds) == len(order)
    # chef role still at the old version: chef left stopped, reported
    assert report.chef_stopped == sorted(h.name for h in env.role("web").hosts)
    assert all(not fleet.hosts[h.name].chef_running for h in env.role("web").hosts)


def test_batch_hosts_run_concurrently(lbs, store):
    env, fleet, remote = setup(lbs, {"web": {"hosts": 10, "batch": "5", "floor": "50%"}})
    remote.delay = 0.01
    assert roll(env, remote, store).status == "success"
    assert remote.max_running >= 5


def test_skips_hosts_already_done(lbs, store):
    env, fleet, remote = setup(lbs, {"web": {"hosts": 4, "floor": "50%"}})
    for name in ("web-01-sv-gprd", "web-03-sv-gprd"):
        fleet.hosts[name].installed = NEW
    report = roll(env, remote, store)
    assert report.status == "success"
    assert {h: r.status for h, r in report.hosts.items()} == {
        "web-01-sv-gprd": "skipped", "web-02-sv-gprd": "done", "web-03-sv-gprd": "skipped",
        "web-04-sv-gprd": "done"}
    assert len(remote.commands("web-01-sv-gprd")) == 1, "inspected in one session, nothing else"
    assert remote.steps("web-01-sv-gprd") == ["dpkg-query -W '-f=${Version}\\n' gitlab-ee",
                                              "gitlab-ctl status"]
    assert not any("web-01-sv-gprd" in line for line in set_lines(lbs))


def test_failed_install_stops_after_its_batch_and_stays_drained(lbs, store):
    env, fleet, remote = setup(lbs, {"web": {"hosts": 10, "floor": "50%"}})  # batches of 1
    fleet.install_fails_on[BAD] = {"web-03-sv-gprd"}
    report = roll(env, remote, store, version=BAD)
    assert report.status == "failed"
    assert list(report.failed_hosts) == ["web-03-sv-gprd"]
    assert "install failed" in report.failed_hosts["web-03-sv-gprd"]
    assert report.hosts["web-03-sv-gprd"].step == "install"
    assert len(report.roles["web"].batches) == 3
    # the failed host: drained on every LB, drain record kept, status failed, chef stopped
    assert lb_admin(lbs, "web-03-sv-gprd") == {"drain"}
    assert [r.host for r in store.drained("gprd")] == ["web-03-sv-gprd"]
    assert store.host_statuses("gprd:" + BAD)["web-03-sv-gprd"].status == "failed"
    assert report.chef_stopped == ["web-01-sv-gprd", "web-02-sv-gprd", "web-03-sv-gprd"]
    # the others of earlier batches are back; later batches untouched (at most read)
    for name in ("web-01-sv-gprd", "web-02-sv-gprd"):
        assert lb_admin(lbs, name) == {"ready"} and report.hosts[name].status == "done"
    for i in range(4, 11):
        name = f"web-{i:02d}-sv-gprd"
        assert report.hosts[name].status == "pending"
        assert lb_admin(lbs, name) == {"ready"}
        assert all(c.startswith(("dpkg-query", "gitlab-ctl status")) for c in remote.commands(name))
        assert fleet.hosts[name].installed == OLD


def test_resume_repairs_the_drained_host_first_and_finishes(lbs, store):
    env, fleet, remote = setup(lbs, {"web": {"hosts": 6, "floor": "50%"}})
    fleet.install_fails_on[BAD] = {"web-02-sv-gprd"}
    first = roll(env, remote, store, version=BAD)
    assert first.status == "failed" and list(first.failed_hosts) == ["web-02-sv-gprd"]
    fleet.install_fails_on[BAD] = set()  # the build is fixed
    second = roll(env, FakeRemote(fleet), store, version=BAD, run_id="run-2")
    assert second.status == "success", second.error
    assert second.roles["web"].batches[0] == ["web-02-sv-gprd"]
    assert second.hosts["web-02-sv-gprd"].repaired and second.hosts["web-02-sv-gprd"].status == "done"
    assert second.hosts["web-01-sv-gprd"].status == "skipped"
    assert store.drained("gprd") == []
    assert all(lb_admin(lbs, h.name) == {"ready"} for h in env.role("web").hosts)
    assert all(fleet.hosts[h.name].installed == BAD for h in env.role("web").hosts)
    # "done" from the first run is not overwritten by "skipped"
    assert store.host_statuses("gprd:" + BAD)["web-01-sv-gprd"].status == "done"


def test_host_left_drained_on_an_lb_is_repaired_not_skipped(lbs, store):
    env, fleet, remote = setup(lbs, {"web": {"hosts": 3, "floor": "0%"}})
    fleet.hosts["web-02-sv-gprd"].installed = NEW
    lbs.lbs[1].backends["web"]["web-02-sv-gprd"].admin = "maint"  # no store record: an LB says it
    report = roll(env, remote, store)
    assert report.status == "success"
    assert report.hosts["web-02-sv-gprd"].repaired and report.hosts["web-02-sv-gprd"].status == "done"
    assert lb_admin(lbs, "web-02-sv-gprd") == {"ready"}
    assert not any(c.startswith("apt-get") for c in remote.steps("web-02-sv-gprd"))


def test_capacity_floor_refuses_before_touching_anything(lbs, store):
    env, fleet, remote = setup(lbs, {"web": {"hosts": 10, "batch": "50%", "floor": "60%"}})
    with pytest.raises(CapacityError, match="role web: batch 1 of 5 host.*below the capacity floor"):
        roll(env, remote, store)
    assert remote.log == [] and set_lines(lbs) == [] and store.drained() == []


def test_capacity_counts_hosts_already_out_of_service(lbs, store):
    env, fleet, remote = setup(lbs, {"web": {"hosts": 10, "batch": "2", "floor": "70%"}})
    for name in ("web-04-sv-gprd", "web-06-sv-gprd", "web-08-sv-gprd"):
        lbs.lbs[0].backends["web"][name].health = False  # DOWN on one LB
    store.record_drained("gprd", "web-09-sv-gprd", "old-run", "left over")
    with pytest.raises(CapacityError, match="already out of service"):
        roll(env, remote, store)
    assert remote.log == [] and set_lines(lbs) == []


def test_version_with_metacharacters_touches_nothing(lbs, store):
    env, fleet, remote = setup(lbs, {"web": {"hosts": 2, "floor": "0%"}})
    for bad in ("17.6.0-ee.0;reboot", "17.6.0-ee.0 && curl x|sh", "$(reboot)", "17.6.0-ee.0'"):
        with pytest.raises(InvalidVersion):
            roll(env, remote, store, version=bad)
    assert remote.log == [] and all(lb.lines == [] for lb in lbs.lbs)


def test_unreachable_lb_refuses_before_anything(lbs, store):
    env, fleet, remote = setup(lbs, {"web": {"hosts": 2, "floor": "0%"}})
    lbs.stop_lb(lbs.lbs[1])
    with pytest.raises(HAProxyError, match="fe-02-lb-gprd"):
        roll(env, remote, store)
    assert remote.log == [] and set_lines(lbs) == []


def test_pids_that_do_not_change_fail_the_host(lbs, store):
    env, fleet, remote = setup(lbs, {"web": {"hosts": 2, "floor": "0%", "batch": "2"}})
    fleet.hup_keeps_pid.add("web-02-sv-gprd")
    report = roll(env, remote, store)
    assert report.failed_hosts == {"web-02-sv-gprd": "PIDs did not change for puma"}
    assert lb_admin(lbs, "web-02-sv-gprd") == {"drain"} and lb_admin(lbs, "web-01-sv-gprd") == {"ready"}


def test_unreachable_host_fails_without_being_drained(lbs, store):
    env, fleet, remote = setup(lbs, {"web": {"hosts": 4, "floor": "0%", "batch": "2"}})
    fleet.hosts["web-01-sv-gprd"].reachable = False
    report = roll(env, remote, store)
    assert report.status == "failed" and "unreachable" in report.failed_hosts["web-01-sv-gprd"]
    assert lb_admin(lbs, "web-01-sv-gprd") == {"ready"} and report.hosts["web-02-sv-gprd"].status == "done"
    assert report.hosts["web-03-sv-gprd"].status == "pending"


def test_roles_of_a_stage_run_in_parallel_and_a_failure_stops_both(lbs, store):
    gitaly = {"hosts": 1, "stage": "gitaly", "restart": ["gitaly"], "hup": [], "floor": "0%"}
    env, fleet, remote = setup(lbs, {"gitaly": gitaly, "web": {"hosts": 5, "floor": "0%"},
                                     "api": {"hosts": 10, "floor": "0%"}})
    remote.delay = 0.005
    fleet.install_fails_on[BAD] = {"web-02-sv-gprd"}
    report = roll(env, remote, store, version=BAD)
    assert report.roles["gitaly"].status == "success"
    assert report.roles["web"].status == "failed" and len(report.roles["web"].batches) == 2
    assert report.roles["api"].status == "stopped"
    assert 1 <= len(report.roles["api"].batches) < 10
    # gitaly (its own stage) finished before the fleet stage started
    first_fleet = min(i for i, (h, c, _) in enumerate(remote.log) if h.startswith(("web", "api")))
    assert all(not h.startswith("gitaly") for h, _, _ in remote.log[first_fleet:])


def test_pending_patches_are_applied_again(lbs, store):
    env, fleet, remote = setup(lbs, {"web": {"hosts": 1, "floor": "0%"}})
    store.record_patch("fix-1", "gprd", "run-0", "ops")
    store.record_patch("fix-2", "gprd", "run-0", "ops")
    store.record_patch("fix-2", "gprd", "run-0", "ops", status="reverted")
    assert roll(env, remote, store).status == "success"
    assert fleet.hosts["web-01-sv-gprd"].patches == ["fix-1"]
    cmds = remote.steps("web-01-sv-gprd")
    assert cmds.index("gitlab-patch apply fix-1") < cmds.index("gitlab-ctl reconfigure")


def test_chef_started_when_the_role_holds_the_target(lbs, store):
    env, fleet, remote = setup(lbs, {"web": {"hosts": 2, "floor": "0%"}})
    fleet.chef_role = NEW
    report = roll(env, remote, store)
    assert report.chef_stopped == [] and {h.chef for h in report.hosts.values()} == {"started"}
    assert all(fleet.hosts[h.name].chef_running for h in env.role("web").hosts)
    # cleanup mode leaves it to chef.finish, which skips failed hosts and unconverted ones
    env2, fleet2, remote2 = setup(lbs, {"api": {"hosts": 3, "floor": "0%"}})
    fleet2.install_fails_on[BAD] = {"api-02-sv-gprd"}
    rep2 = roll(env2, remote2, store, version=BAD, options=RolloutOptions(chef_start="cleanup", up_timeout=1))
    assert rep2.chef_stopped == ["api-01-sv-gprd", "api-02-sv-gprd"]
    fin = asyncio.run(chef.finish(remote2, env2, BAD, failed_hosts=rep2.failed_hosts))
    assert fleet2.chef_role == BAD
    assert sorted(fin.started) == ["api-01-sv-gprd"]
    assert fin.left_stopped == ["api-02-sv-gprd", "api-03-sv-gprd", "deploy-01-sv-gprd"]
    assert "differs from the role" in fin.failed["api-03-sv-gprd"]
    assert "chef-client-enable" not in remote2.commands("api-03-sv-gprd")
    assert "chef-client-enable" not in remote2.commands("api-02-sv-gprd")


def test_report_is_json_for_xcom(lbs, store):
    env, fleet, remote = setup(lbs, {"web": {"hosts": 3, "floor": "0%"}})
    fleet.install_fails_on[BAD] = {"web-01-sv-gprd"}
    report = roll(env, remote, store, version=BAD)
    data = json.loads(report.to_json())
    assert data["status"] == "failed" and list(data["failed_hosts"]) == ["web-01-sv-gprd"]
    assert data["counts"] == {"failed": 1, "pending": 2}
    again = RolloutReport.from_dict(data)
    assert again.failed_hosts == report.failed_hosts and again.roles["web"].batches == [["web-01-sv-gprd"]]
    with pytest.raises(Exception, match="web-01-sv-gprd"):
        again.raise_for_failure()


def test_a_failing_step_in_the_after_install_session_is_named_and_stops_the_rest(lbs, store):
    env, fleet, remote = setup(lbs, {"web": {"hosts": 2, "floor": "0%", "batch": "2",
                                             "hup": ["puma"], "restart": ["sidekiq", "nginx"]}})
    before = dict(fleet.hosts["web-01-sv-gprd"].services)
    report = roll(env, remote, store)
    assert report.status == "failed"
    assert set(report.failed_hosts) == {"web-01-sv-gprd", "web-02-sv-gprd"}
    reason = report.failed_hosts["web-01-sv-gprd"]
    assert reason.startswith("restart sidekiq failed: ") and "runsv not running" in reason
    assert report.hosts["web-01-sv-gprd"].step == "restart"
    after = fleet.hosts["web-01-sv-gprd"].services
    assert after["puma"] != before["puma"], "the steps before the failure ran"
    assert after["nginx"] == before["nginx"], "the steps after the failure did not"
    assert lb_admin(lbs, "web-01-sv-gprd") == {"drain"}
    assert {d.host for d in store.drained("gprd")} == {"web-01-sv-gprd", "web-02-sv-gprd"}


def test_a_host_whose_chef_cannot_stop_is_not_installed(lbs, store):
    env, fleet, remote = setup(lbs, {"web": {"hosts": 2, "floor": "0%", "batch": "2"}})
    fleet.chef_stop_fails.add("web-02-sv-gprd")
    report = roll(env, remote, store)
    assert list(report.failed_hosts) == ["web-02-sv-gprd"]
    assert report.failed_hosts["web-02-sv-gprd"].startswith("could not stop chef: ")
    assert report.hosts["web-02-sv-gprd"].step == "chef_stop"
    assert fleet.hosts["web-02-sv-gprd"].installed != NEW, "the install after a failed chef stop never ran"
    assert fleet.hosts["web-01-sv-gprd"].installed == NEW
    assert report.chef_stopped == ["web-01-sv-gprd"], "only where chef really stopped"
    assert lb_admin(lbs, "web-02-sv-gprd") == {"drain"}


def test_a_session_cut_mid_host_says_so_and_counts_chef_as_maybe_stopped(lbs, store):
    env, fleet, remote = setup(lbs, {"web": {"hosts": 2, "floor": "0%", "batch": "2"}})
    fleet.cut_install_session.add("web-02-sv-gprd")
    report = roll(env, remote, store)
    assert list(report.failed_hosts) == ["web-02-sv-gprd"]
    reason = report.failed_hosts["web-02-sv-gprd"]
    assert reason.startswith("chef stop (or a later step) did not finish: ") and "connection lost" in reason
    assert report.hosts["web-02-sv-gprd"].chef == "unknown"
    assert "web-02-sv-gprd" in report.chef_stopped, "a host whose chef may be stopped is listed"
    assert lb_admin(lbs, "web-02-sv-gprd") == {"drain"}
    assert [d.host for d in store.drained("gprd")] == ["web-02-sv-gprd"]
    fleet.cut_install_session.clear()
    again = roll(env, remote, store, run_id="run-2")
    assert again.status == "success" and again.hosts["web-02-sv-gprd"].repaired
    assert store.drained("gprd") == [] and lb_admin(lbs, "web-02-sv-gprd") == {"ready"}


FIVE_ROLES = {"gitaly": {"hosts": 1, "stage": "gitaly", "restart": ["gitaly"], "hup": [], "floor": "0%"},
              "web": {"hosts": 2, "floor": "0%"}, "api": {"hosts": 2, "floor": "0%"},
              "git": {"hosts": 1, "floor": "0%"},
              "sidekiq": {"hosts": 2, "restart": [], "hup": ["sidekiq"], "floor": "0%"}}


def record_patch(store, env, patch_id: str, roles: list[str], run_id: str = "run-p") -> None:
    """As patches.apply_patch records it: pending (write-ahead), then applied, roles in the detail."""
    hosts = [h.name for r in roles for h in env.role(r).hosts]
    detail = patch_detail("--- a/app.rb\n+++ b/app.rb\n", "INC-1 hotfix", roles)
    for status in ("pending", "applied"):
        store.record_patch(patch_id, env.name, run_id, "ops", status=status, hosts=hosts, detail=detail)


def patched(fleet, remote, env) -> dict[str, tuple[list[str], list[str]]]:
    """Per host: the patches it holds, and the patch commands it was sent."""
    return {h.name: (fleet.hosts[h.name].patches,
                     [c for c in remote.steps(h.name) if c.startswith("gitlab-patch")]) for h in env.hosts()}


def test_a_patch_is_applied_again_only_on_the_hosts_of_its_roles(lbs, store):
    env, fleet, remote = setup(lbs, FIVE_ROLES)
    record_patch(store, env, "fix-1", ["web", "api"])
    # no roles in the detail: the roles of the record's hosts (sidekiq), every host of them
    store.record_patch("fix-2", "gprd", "run-q", "ops", hosts=["sidekiq-02-sv-gprd"])
    report = roll(env, remote, store)
    assert report.status == "success", report.error
    assert report.counts() == {"done": 8}
    got = patched(fleet, remote, env)
    for role in ("web", "api"):
        for h in env.role(role).hosts:
            assert got[h.name] == (["fix-1"], ["gitlab-patch apply fix-1"]), h.name
    for h in env.role("sidekiq").hosts:
        assert got[h.name] == (["fix-2"], ["gitlab-patch apply fix-2"]), h.name
    for role in ("gitaly", "git"):
        for h in env.role(role).hosts:
            assert got[h.name] == ([], []), h.name
    # the plan says the same
    plans = plan(env, None, NEW, run_id="run-1", options=FAST, patches=pending_patches(store, env))
    planned = {p.host: [c for c in p.commands if c.startswith("gitlab-patch")] for p in plans}
    assert planned == {h: cmds for h, (_, cmds) in got.items() if h in planned}


def test_a_build_that_includes_the_patch_does_not_get_it_again(lbs, store):
    env, fleet, remote = setup(lbs, FIVE_ROLES)
    record_patch(store, env, "fix-1", ["web", "api"])
    record_patch(store, env, "fix-3", ["web"], run_id="run-p3")
    options = dataclasses.replace(FAST, included_patches=("fix-1",))
    assert roll(env, remote, store, options=options).status == "success"
    got = patched(fleet, remote, env)
    assert all("gitlab-patch apply fix-1" not in cmds for _, cmds in got.values())
    assert {h: cmds for h, (_, cmds) in got.items() if cmds} == {
        h.name: ["gitlab-patch apply fix-3"] for h in env.role("web").hosts}
    planned = plan(env, None, NEW, options=options, patches=pending_patches(store, env))
    assert not any("gitlab-patch apply fix-1" in p.commands for p in planned)


def executed(remote, host: str) -> list[str]:
    return [c for c in remote.steps(host) if not c.startswith("gitlab-chef-role")]


@pytest.mark.parametrize("chef_start", ["host", "role", "cleanup"])
def test_the_rollout_runs_exactly_the_commands_the_plan_lists(lbs, store, chef_start):
    env, fleet, remote = setup(lbs, FIVE_ROLES)
    fleet.chef_role = NEW  # chef starts again where the mode says so
    record_patch(store, env, "fix-1", ["api"])
    options = dataclasses.replace(FAST, chef_start=chef_start)
    plans = plan(env, None, NEW, run_id="run-1", options=options, patches=pending_patches(store, env))
    report = roll(env, remote, store, options=options)
    assert report.status == "success", report.error
    assert {p.host: p.commands for p in plans} == {p.host: executed(remote, p.host) for p in plans}
    assert ("chef-client-enable" in plans[0].commands) is (chef_start != "cleanup")
    # the comparison would see a step the plan left out: a plan unaware of the patch differs
    unaware = plan(env, None, NEW, run_id="run-1", options=options)
    assert {p.host for p in unaware if p.commands != executed(remote, p.host)} == {
        h.name for h in env.role("api").hosts}


# -- what the task log and the XCom show (issue 11, "In the Airflow UI") ------------------------------

def test_the_log_has_one_line_per_host_and_lb_lines_name_the_batch(lbs, store, caplog):
    env, fleet, remote = setup(lbs, {"web": {"hosts": 6, "floor": "50%", "batch": "3"}})
    fleet.hosts["web-01-sv-gprd"].installed = fleet.hosts["web-01-sv-gprd"].running = NEW  # skipped
    caplog.set_level(logging.INFO, logger="liftoff")
    report = roll(env, remote, store)
    assert report.status == "success", report.error
    lines = [r.getMessage() for r in caplog.records]
    for n in range(2, 7):
        host = f"web-{n:02d}-sv-gprd"
        mine = [line for line in lines if line.startswith(f"{host}: ")]
        assert len(mine) == 1, mine
        batch = 1 if n <= 3 else 2
        assert re.fullmatch(rf"{host}: {OLD} -> {NEW} in \d+\.\d s \(batch {batch} of 2\)", mine[0]), mine[0]
    assert f"web-01-sv-gprd: already at {NEW} and in service, skipped (batch 1 of 2)" in lines
    lb_lines = [line for line in lines if line.startswith("haproxy ")]
    assert lb_lines == ["haproxy drain: batch 1 of web, 2 host(s) on 2 LB(s)",
                        "haproxy ready: batch 1 of web, 2 host(s) on 2 LB(s)",
                        "haproxy drain: batch 2 of web, 3 host(s) on 2 LB(s)",
                        "haproxy ready: batch 2 of web, 3 host(s) on 2 LB(s)"]


def test_other_callers_keep_the_host_names_in_the_lb_line(lbs, store, caplog):
    env, _, _ = setup(lbs, {"web": {"hosts": 2, "floor": "0%"}})
    caplog.set_level(logging.INFO, logger="liftoff")
    HAProxy.for_env(env, poll=0.05).drain(["web-01-sv-gprd", "web-02-sv-gprd"])
    lines = [r.getMessage() for r in caplog.records]
    assert "haproxy drain: web-01-sv-gprd, web-02-sv-gprd on 2 LB(s)" in lines


def test_summary_is_small_and_names_batches_of_small_roles_only(lbs, store):
    env, fleet, remote = setup(lbs, {"api": {"hosts": 4, "floor": "50%", "stage": "first"},
                                     "web": {"hosts": 100, "floor": "80%"}})
    fleet.install_fails_on[BAD] = {f"web-{n:02d}-sv-gprd" for n in range(1, 31)}
    report = roll(env, remote, store, version=BAD)
    full = report.to_json()
    summary = report.summary({"store": "liftoff_rollout_reports", "run_id": "run-1", "rollout": "x"})
    small = json.dumps(summary)
    assert len(full) > 20_000 and len(small) < 6_000, (len(full), len(small))
    assert summary["status"] == "failed" and summary["counts"] == report.counts()
    web = summary["roles"]["web"]
    assert web["status"] == "failed" and web["batches"] == [10]
    assert web["counts"] == {"failed": 10, "pending": 90}
    assert len(summary["failed_hosts"]) == 10 and all(len(r) <= 300 for r in summary["failed_hosts"].values())
    api = summary["roles"]["api"]
    assert api["status"] == "success" and api["counts"] == {"done": 4}
    assert api["batches"] == [["api-01-sv-gprd"], ["api-02-sv-gprd"], ["api-03-sv-gprd"], ["api-04-sv-gprd"]]
    assert summary["report"]["store"] == "liftoff_rollout_reports"


def test_keep_report_saves_the_full_report_and_returns_where_it_is(lbs, store):
    env, _, remote = setup(lbs, {"web": {"hosts": 3, "floor": "0%"}})
    report = roll(env, remote, store)
    run = SimpleNamespace(run_id="run-1", store=store)
    summary = deploy.keep_report(run, report, "fleet")
    assert summary["report"] == {"store": "liftoff_rollout_reports", "run_id": "run-1",
                                 "rollout": f"gprd:{NEW}/fleet"}
    assert json.loads(store.report("run-1", f"gprd:{NEW}/fleet")) == json.loads(report.to_json())
    assert store.report("run-1", f"gprd:{NEW}/gitaly") is None
    assert store.report("run-2", f"gprd:{NEW}/fleet") is None
    again = dataclasses.replace(report, status="failed")  # a cleared task's second attempt: the first stays
    deploy.keep_report(run, again, "fleet")
    assert json.loads(store.report("run-1", f"gprd:{NEW}/fleet"))["status"] == "failed"
    with store._tx() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM liftoff_rollout_reports").scalar() == 2


def test_keep_report_puts_the_report_in_the_xcom_when_the_store_refuses(lbs, store):
    from liftoff.errors import StoreError

    env, _, remote = setup(lbs, {"web": {"hosts": 2, "floor": "0%"}})
    report = roll(env, remote, store)

    class Broken:
        def save_report(self, *a):
            raise StoreError("state store down")

    summary = deploy.keep_report(SimpleNamespace(run_id="run-1", store=Broken()), report, "fleet")
    assert summary["full_report"] == report.to_dict()
    assert "state store down" in summary["report"]["store_error"]


class _Watched(FakeRemote):
    """A FakeRemote keeping the order of connections prepared, commands and closes, and the
    garbage collector's settings while commands run."""

    def __init__(self, fleet):
        super().__init__(fleet)
        self.events: list[tuple[str, str]] = []
        self.gc_seen: set[tuple[int, bool]] = set()

    async def prepare(self, hosts) -> None:
        self.events += [("prepare", h.name) for h in hosts]

    async def run(self, host, command, timeout=None, started=None):
        import gc

        self.gc_seen.add((gc.get_threshold()[0], gc.get_freeze_count() > 0))
        self.events.append(("run " + command, host.name))
        return await super().run(host, command, timeout, started)

    async def close_host(self, host) -> None:
        await super().close_host(host)
        self.events.append(("close", host if isinstance(host, str) else host.name))


def test_connections_open_ahead_and_a_batch_closes_while_the_next_installs(lbs, store):
    """The first batch's connections are opened before its first command; a batch's connections
    close once the next batch's installs run, not between the two batches; all close by the end."""
    env, fleet, _ = setup(lbs, {"web": {"hosts": 6, "batch": "2", "floor": "50%"}})
    remote = _Watched(fleet)
    assert roll(env, remote, store).status == "success"
    ev = remote.events
    first_batch = ["web-01-sv-gprd", "web-02-sv-gprd"]
    assert [h for kind, h in ev if kind == "prepare"] == first_batch
    first_run = next(i for i, (kind, _) in enumerate(ev) if kind.startswith("run"))
    assert max(i for i, (kind, h) in enumerate(ev) if kind == "prepare") < first_run

    def installs(host: str) -> int:
        return next(i for i, (kind, h) in enumerate(ev) if h == host and "apt-get install" in kind)

    def closed(host: str) -> int:
        return next(i for i, (kind, h) in enumerate(ev) if kind == "close" and h == host)

    for done, next_host in (("web-01-sv-gprd", "web-03-sv-gprd"), ("web-03-sv-gprd", "web-05-sv-gprd")):
        assert closed(done) > installs(next_host), ev
    assert {h for kind, h in ev if kind == "close"} == {h.name for h in env.role("web").hosts}


def test_the_collector_skips_the_startup_objects_only_while_a_rollout_runs(lbs, store):
    import gc

    from liftoff.fleet import GC_YOUNG_THRESHOLD

    env, fleet, _ = setup(lbs, {"web": {"hosts": 4, "floor": "50%"}})
    remote = _Watched(fleet)
    before = gc.get_threshold()
    assert gc.get_freeze_count() == 0
    assert roll(env, remote, store).status == "success"
    assert remote.gc_seen == {(max(before[0], GC_YOUNG_THRESHOLD), True)}
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0


def test_overlapping_rollouts_leave_the_collector_as_they_found_it():
    """Two rollouts in one process that end in either order: the collector is quiet while either
    runs and back to its settings once both ended."""
    import gc

    from liftoff.fleet import GC_YOUNG_THRESHOLD, _startup_objects_frozen

    before = gc.get_threshold()
    first, second = _startup_objects_frozen(), _startup_objects_frozen()
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)  # the first to start ends first
    assert gc.get_threshold()[0] == max(before[0], GC_YOUNG_THRESHOLD) and gc.get_freeze_count() > 0
    second.__exit__(None, None, None)
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0
