"""fleet.plan (dry run): steps per host in order, batches, capacity floor, quoting; touches nothing."""

from __future__ import annotations

import pytest

from liftoff.errors import CapacityError, InvalidInput, InvalidVersion, InventoryError
from liftoff.fleet import (
    ALL_ROLES,
    RolloutOptions,
    batch_phases,
    check_capacity,
    host_flow,
    make_batches,
    order_hosts,
    parse_pids,
    pending_patches,
    plan,
)
from liftoff.inventory import parse_inventory
from liftoff.patches import patch_detail
from liftoff.store import Store

V = "17.6.202411291200-13bd0cc7c2a.3f6b8fe0f4d"


def env_with(web_hosts: int = 20, batch: str = "10%", floor: str = "60%", extra: dict | None = None):
    roles = [
        {"name": "gitaly", "stage": "gitaly", "batch": "1", "capacity_floor": "0%", "restart": ["gitaly"],
         "hup": [], "hosts": [{"name": "gitaly-01-stor-gprd", "address": "10.0.0.2"}]},
        {"name": "web", "stage": "fleet", "batch": batch, "capacity_floor": floor,
         "restart": ["workhorse", "nginx"], "hup": ["puma"],
         "hosts": [{"name": f"web-{i:02d}-sv-gprd", "address": f"10.0.1.{i}"}
                   for i in range(1, web_hosts + 1)]},
        {"name": "sidekiq", "stage": "fleet", "restart": [], "hup": ["sidekiq"],
         "hosts": [{"name": "sidekiq-01-sv-gprd", "address": "10.0.2.1"}]},
    ]
    data = {"environments": {"gprd": {
        "url": "https://gitlab.example.com", "alert_matchers": {"env": "gprd"},
        # nothing listens here: plan must not try
        "load_balancers": [{"name": "fe-01-lb-gprd", "admin": "127.0.0.1:9"},
                           {"name": "fe-02-lb-gprd", "admin": "127.0.0.1:9"}],
        "deploy_node": {"name": "deploy-01-sv-gprd", "address": "10.0.9.1"}, "roles": roles,
        **({"extra": extra} if extra else {}),
    }}}
    return parse_inventory(data).env("gprd")


def test_steps_per_host_in_order_with_exact_commands():
    plans = plan(env_with(), ["web"], V, run_id="manual__2024-01-01T00:00:00+00:00", patches=["fix-1"])
    first = plans[0]
    assert (first.role, first.batch, first.host) == ("web", 1, "web-01-sv-gprd")
    steps = first.steps
    want_in_order = [
        "dpkg-query -W '-f=${Version}\\n' gitlab-ee && gitlab-ctl status (one session",
        "record web-01-sv-gprd drained (write-ahead)",
        "drain web-01-sv-gprd in every backend on every LB (fe-01-lb-gprd, fe-02-lb-gprd)",
        "wait until its sessions end",
        "chef-client-disable 'liftoff deploy manual__2024-01-01T00:00:00+00:00'",
        f"apt-get install -y gitlab-ee={V}",
        "gitlab-patch apply fix-1",
        "gitlab-ctl reconfigure",
        "gitlab-ctl hup puma",
        "gitlab-ctl restart workhorse",
        "gitlab-ctl restart nginx",
        "gitlab-ctl status (PIDs of puma, workhorse, nginx changed",
        f"dpkg-query -W '-f=${{Version}}\\n' gitlab-ee == {V}",
        "ready web-01-sv-gprd on every LB",
        "wait until every LB reports it UP",
        "clear the drain record",
        "chef-client-enable",
    ]
    pos = -1
    for fragment in want_in_order:
        idx = next((i for i, s in enumerate(steps) if fragment in s and i > pos), None)
        assert idx is not None, f"{fragment!r} missing or out of order in {steps}"
        pos = idx


def test_batches_ten_percent_roles_in_deploy_order():
    plans = plan(env_with(web_hosts=20), None, V)
    assert [p.role for p in plans][:1] == ["gitaly"] and plans[-1].role == "sidekiq"
    web = [p for p in plans if p.role == "web"]
    assert [p.batch for p in web] == [b for b in range(1, 11) for _ in range(2)]
    assert len({p.host for p in web}) == 20


def test_app_port_gives_http_checks():
    plans = plan(env_with(extra={"app_port": 8080}), ["web"], V)
    assert f"http: GET http://10.0.1.1:8080/api/v4/version == {V}" in plans[0].steps
    assert "http: GET http://10.0.1.1:8080/-/readiness == 200" in plans[0].steps
    assert plan(env_with(), ["web"], V, options=RolloutOptions(app_port=9000))[0].steps[-6].startswith(
        "http: GET http://10.0.1.1:9000/")


@pytest.mark.parametrize("version", ["17.6.0-ee.0; rm -rf /", "17.6.0-ee.0$(id)", "`id`", "17.6.0-ee.0 other",
                                     "17.6.0-ee.0\n", "latest", ""])
def test_metacharacters_are_refused(version):
    with pytest.raises(InvalidVersion):
        plan(env_with(), ["web"], version)


def test_unknown_role_is_named():
    with pytest.raises(InventoryError, match="no role 'webb'"):
        plan(env_with(), ["webb"], V)


def test_oversized_batch_is_refused():
    with pytest.raises(CapacityError, match="batch 1 of 10 host.* would leave 10 of 20 in service.*60%"):
        plan(env_with(batch="50%"), ["web"], V)


def test_hosts_already_out_count_and_go_first():
    env = env_with(web_hosts=10, batch="2", floor="70%")  # at most 3 out of 10
    out = {"web-07-sv-gprd"}
    plans = plan(env, ["web"], V, out_of_service=out)
    assert plans[0].host == "web-07-sv-gprd"
    four_out = {"web-03-sv-gprd", "web-05-sv-gprd", "web-08-sv-gprd", "web-09-sv-gprd"}
    with pytest.raises(CapacityError, match="already out of service: web-08-sv-gprd, web-09-sv-gprd"):
        plan(env, ["web"], V, out_of_service=four_out)
    # the out-of-service host is repaired in batch 1, so later batches have room again
    web = env.role("web")
    batches = make_batches(order_hosts(web, out), 3)
    check_capacity(env, web, batches, out)


def test_parse_pids():
    out = ("run: puma: (pid 1234) 10s; run: log: (pid 99) 10s\n"
           "down: sidekiq: 0s, normally up; run: log: (pid 98) 10s\n"
           "ok: run: nginx: (pid 77) 0s\n")
    assert parse_pids(out) == {"puma": 1234, "sidekiq": None, "nginx": 77}


def patch_lines(p) -> list[str]:
    return [s for s in p.steps if "gitlab-patch" in s]


def test_each_patch_is_planned_on_its_roles_only():
    env = env_with(web_hosts=2)
    plans = plan(env, None, V, patches={"fix-1": ("web",), "fix-2": ["sidekiq", "web"]})
    by_role = {p.role: p for p in plans}
    assert [c for c in by_role["web"].commands if c.startswith("gitlab-patch")] == [
        "gitlab-patch apply fix-1", "gitlab-patch apply fix-2"]
    assert [c for c in by_role["sidekiq"].commands if c.startswith("gitlab-patch")] == [
        "gitlab-patch apply fix-2"]
    assert patch_lines(by_role["gitaly"]) == []
    # the build being installed includes fix-1: only fix-2 is applied again
    included = plan(env, None, V, patches={"fix-1": ("web",), "fix-2": ["sidekiq", "web"]},
                    options=RolloutOptions(included_patches=("fix-1",)))
    assert {p.role: patch_lines(p) for p in included} == {
        "gitaly": [], "web": ["run: gitlab-patch apply fix-2"], "sidekiq": ["run: gitlab-patch apply fix-2"]}
    # the older shape, a list of patch ids: every role
    every_role = plan(env, None, V, patches=["fix-1"])
    assert all(patch_lines(p) == ["run: gitlab-patch apply fix-1"] for p in every_role)
    with pytest.raises(InvalidInput):
        RolloutOptions(included_patches="fix-1")
    with pytest.raises(InvalidInput):
        RolloutOptions(included_patches=("fix-1; reboot",))


def test_plan_steps_and_commands_come_from_the_host_flow():
    env = env_with(web_hosts=2, extra={"app_port": 8080})
    web = env.role("web")
    options = RolloutOptions(chef_start="role")
    flow = host_flow(env, web, web.hosts[1], V, reason="liftoff deploy x", options=options, patches=["fix-1"])
    planned = plan(env, ["web"], V, options=options, patches=["fix-1"], run_id="x")[1]
    assert planned.host == web.hosts[1].name and len(planned.steps) == len(flow)
    assert [s.kind for s in flow] == ["inspect", "record", "drain", "sessions", *["run"] * 8, "verify",
                                      "health", "ready", "up", "clear", "chef"]
    assert batch_phases(flow) == ["record", "drain", "sessions", "host", "ready", "up", "clear", "chef"]
    assert planned.steps == [s.text for s in flow]
    assert planned.commands == [c for s in flow for _, c in s.commands]
    assert planned.commands[2] == "chef-client-disable 'liftoff deploy x'"
    assert planned.commands[-1] == "chef-client-enable" and "http: GET" not in " ".join(planned.commands)
    assert planned.to_dict()["commands"] == planned.commands
    # cleanup mode: chef is left to chef.finish, no chef step
    assert "chef" not in batch_phases(host_flow(env, web, web.hosts[0], V, reason="r",
                                                options=RolloutOptions(chef_start="cleanup")))


def test_pending_patches_per_patch_roles(tmp_path):
    env = env_with(web_hosts=2)
    store = Store(f"sqlite:///{tmp_path / 'state.db'}")
    try:
        def record(patch_id, run_id, status, roles=None, hosts=()):
            detail = patch_detail("--- a/f\n+++ b/f\n", "hotfix", roles) if roles else ""
            store.record_patch(patch_id, "gprd", run_id, "ops", status=status, hosts=hosts, detail=detail)

        record("fix-1", "run-1", "pending", ["web", "api"], ["web-01-sv-gprd"])  # write-ahead, then final
        record("fix-1", "run-1", "applied", ["web", "api"], ["web-01-sv-gprd"])
        record("fix-2", "run-2", "applied", hosts=["sidekiq-01-sv-gprd"])  # no roles: those of its hosts
        record("fix-3", "run-3", "applied")  # neither roles nor hosts (older records): every role
        record("fix-4", "run-4", "applied", ["web"])
        store.record_patch("fix-4", "gprd", "run-5", "ops", status="reverted")
        record("fix-5", "run-6", "applied", ["web"])
        record("fix-5", "run-7", "pending", ["gitaly"])  # an attempt that applied nothing
        record("fix-5", "run-7", "failed", ["gitaly"])
        record("fix-5", "run-8", "pending", ["sidekiq"])  # some hosts failed: applied again
        record("fix-6", "run-9", "applied", ["web"])
        record("fix-6", "run-10", "failed", ["sidekiq"])  # the latest record failed: left alone (as before)
        got = pending_patches(store, env)
        assert got == {"fix-1": ("web", "api"), "fix-2": ("sidekiq",), "fix-3": (ALL_ROLES,),
                       "fix-5": ("web", "sidekiq")}
        assert list(got) == ["fix-1", "fix-2", "fix-3", "fix-5"], "oldest first"
        # with only the environment's name, the hosts stand for their roles
        by_name = pending_patches(store, "gprd")
        assert by_name["fix-2"] == ("sidekiq-01-sv-gprd",)
        for patches in (got, by_name):
            assert {p.role: patch_lines(p) for p in plan(env, None, V, patches=patches)} == {
                "gitaly": ["run: gitlab-patch apply fix-3"],
                "web": [f"run: gitlab-patch apply {p}" for p in ("fix-1", "fix-3", "fix-5")],
                "sidekiq": [f"run: gitlab-patch apply {p}" for p in ("fix-2", "fix-3", "fix-5")]}
        assert pending_patches(None, env) == {} and pending_patches(store, "gstg") == {}
    finally:
        store.close()
