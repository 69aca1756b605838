"""An LB that lost liftoff's runtime state (killed and started again: it comes back with its
config file's states and weights) gets it back from liftoff's records (liftoff.lbstate): at
the door (a rollout, a canary weight) and in a rollout right before a batch installs. Fake
HAProxy LBs over TCP (tests/unit/fleet_fakes.py); a "restart" puts an LB's servers back to
their config (ready, config weight).

Issue 14 (a), found by the chaos soak: without the reconcile a restarted LB keeps drained hosts
in service and the canary at its config weight, and the LBs of an environment disagree.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from liftoff import canary, fleet, guard, lbstate
from liftoff.errors import HAProxyError
from liftoff.haproxy import HAProxy, PartialApplication, ServerState, disagreements
from liftoff.inventory import parse_inventory
from liftoff.runs import Run
from liftoff.store import DrainRecord, LBSetting
from tests.unit import test_fleet_fake
from tests.unit.fleet_fakes import FakeFleet, FakeRemote, LBThread, make_env, wire

OLD, NEW = "17.5.0-ee.0", "17.6.0-ee.0"
FAST = fleet.RolloutOptions(drain_timeout=1, up_timeout=5, health_timeout=1)
MAIN_WEIGHT, CANARY_WEIGHT = 100, 5
GPRD = {"web": [f"web-0{i}-sv-gprd" for i in (1, 2, 3)], "api": ["api-01-sv-gprd", "api-02-sv-gprd"]}
CNY = {"web": ["web-cny-01-sv-gprd"], "api": ["api-cny-01-sv-gprd"]}


# -- the fakes: production and its canary behind two LBs, like the lab ------------------------------

@pytest.fixture
def lbs():
    with LBThread("fe-01-lb-gprd", "fe-02-lb-gprd") as t:
        for lb in t.lbs:
            for role in ("web", "api"):
                for h in GPRD[role]:
                    lb.add(role, h, "127.0.0.1:8080", MAIN_WEIGHT)
                for h in CNY[role]:
                    lb.add(role, h, "127.0.0.1:8080", CANARY_WEIGHT)
                    lb.add(f"canary_{role}", h, "127.0.0.1:8080", MAIN_WEIGHT)
        yield t


store = test_fleet_fake.store  # the fixture: a state store of its own


def inventory(lbs) -> dict:
    refs = [{"name": lb.name, "admin": f"{lb.host}:{lb.port}"} for lb in lbs.lbs]

    def env(hosts: dict, seq: int, **extra) -> dict:
        roles = [{"name": role, "stage": "fleet", "batch": 1, "capacity_floor": "0%", "restart": ["nginx"],
                  "hup": ["puma"],
                  "hosts": [{"name": h, "address": f"127.0.{seq}.{i + 1}"} for i, h in enumerate(names)]}
                 for role, names in hosts.items()]
        return {"url": "http://127.0.0.1:1", "alert_matchers": {"env": "x"}, "load_balancers": refs,
                "deploy_node": {"name": f"deploy-{seq}", "address": f"127.0.{seq}.99"}, "roles": roles,
                **extra}

    return {"environments": {"gprd": env(GPRD, 1), "gprd-cny": env(CNY, 2, canary_of="gprd")}}


def make_run(lbs, store, run_id="unit-run-1") -> Run:
    return Run(run_id=run_id, who="alice", pipeline="unit", inventory=parse_inventory(inventory(lbs)),
               _store=store)


def restart(lb) -> None:
    """kill -9 and start again without a server-state file: every server back to its config,
    another process."""
    lb.restarted()
    for backend, servers in lb.backends.items():
        for name, s in servers.items():
            s.admin = "ready"
            s.weight = CANARY_WEIGHT if name in CNY["web"] + CNY["api"] and not backend.startswith("canary") \
                else MAIN_WEIGHT


def view(lb, server: str) -> set[tuple[str, int]]:
    return {(s.admin, s.weight) for s in lb.server_state(server)}


def main_weights(lbs) -> dict[str, set[int]]:
    """{LB: weights} of the canary servers in the production backends."""
    return {lb.name: {s.weight for b in ("web", "api") for n, s in lb.backends[b].items() if "cny" in n}
            for lb in lbs.lbs}


def set_lines(lb) -> list[str]:
    return [line for line in lb.lines if line.startswith("set ")]


# -- the intent and the plan (pure) ------------------------------------------------------------------

def line(lb, server, admin="ready", weight=100, backend="web") -> ServerState:
    return ServerState(lb, backend, server, "UP", admin, weight, 0)


def test_the_plan_puts_the_records_back_on_the_lb_that_lost_them():
    intent = lbstate.intent_from_records(
        [DrainRecord("gprd", "a", "r1", "", None)],
        [LBSetting("gprd-cny", "weight", "0", ("c",), ("web",), "r2", "bob", None)])
    kept = {"lb1": True, "lb2": False}  # lb2 was restarted
    snap = {lb: [line(lb, "a", "drain" if ok else "ready"), line(lb, "c", weight=0 if ok else 5),
                 line(lb, "c", backend="canary_web")] for lb, ok in kept.items()}
    fixes = lbstate.plan(snap, intent)
    assert fixes == {"lb2": [lbstate.Fix("web", "a", "drain", "drain"), lbstate.Fix("web", "c", "weight", 0)]}
    assert [f.command() for f in fixes["lb2"]] == ["set server web/a state drain", "set weight web/c 0"]


def test_without_a_record_agreeing_lbs_are_left_alone_and_disagreeing_ones_take_the_safe_side():
    intent = lbstate.intent_from_records([], [])
    agree = {lb: [line(lb, "x", "drain")] for lb in ("lb1", "lb2")}  # drained by a person on every LB
    assert lbstate.plan(agree, intent) == {}
    snap = {"lb1": [line("lb1", "x", "drain", 5)], "lb2": [line("lb2", "x", "ready", 100)],
            "lb3": [line("lb3", "x", "maint", 100)]}
    assert lbstate.plan(snap, intent) == {
        "lb1": [lbstate.Fix("web", "x", "maint", "maint")],
        "lb2": [lbstate.Fix("web", "x", "maint", "maint"), lbstate.Fix("web", "x", "weight", 5)],
        "lb3": [lbstate.Fix("web", "x", "weight", 5)]}


def test_a_drain_record_wins_over_a_canary_ready_and_skipped_hosts_are_left_alone():
    intent = lbstate.intent_from_records(
        [DrainRecord("gprd-cny", "c", "r1", "", None)],
        [LBSetting("gprd-cny", "state", "ready", ("c", "d"), (), "r2", "bob", None)])
    snap = {lb: [line(lb, "c"), line(lb, "d", "drain"), line(lb, "e", "drain" if lb == "lb1" else "ready")]
            for lb in ("lb1", "lb2")}
    fixes = lbstate.plan(snap, intent, skip={"e"})
    expected = [lbstate.Fix("web", "c", "drain", "drain"), lbstate.Fix("web", "d", "ready", "ready")]
    assert fixes == {"lb1": expected, "lb2": expected}


def test_lb_settings_are_kept_one_per_environment_and_kind(store):
    store.record_lb_setting("gprd-cny", "weight", 5, ["b", "a"], ["web", "api"], "r1", "alice")
    store.record_lb_setting("gprd-cny", "weight", 0, ["a"], ["web"], "r2", "bob")
    store.record_lb_setting("gprd-cny", "state", "drain", ["a"], [], "r2", "bob")
    got = [(s.kind, s.value, s.hosts, s.backends, s.run_id) for s in store.lb_settings("gprd-cny")]
    assert got == [("state", "drain", ("a",), (), "r2"), ("weight", "0", ("a",), ("web",), "r2")]


# -- the door -------------------------------------------------------------------------------------------

def test_the_canary_weight_is_recorded_when_it_is_set(lbs, store):
    run = make_run(lbs, store)
    canary.apply_weight(run, 0)
    (setting,) = store.lb_settings()
    assert (setting.env, setting.kind, setting.value, setting.backends) == ("gprd-cny", "weight", "0",
                                                                             ("api", "web"))
    assert set(setting.hosts) == set(CNY["web"] + CNY["api"])
    assert main_weights(lbs) == {"fe-01-lb-gprd": {0}, "fe-02-lb-gprd": {0}}


def test_a_canary_weight_that_reached_only_some_lbs_is_finished_by_the_next_door(lbs, store):
    fe02 = lbs.lbs[1]
    answer = fe02.execute
    fe02.execute = lambda cmd: "Permission denied.\n" if cmd.startswith("set weight") else answer(cmd)
    with pytest.raises(PartialApplication, match="NOT done on fe-02-lb-gprd"):
        canary.apply_weight(make_run(lbs, store), 0)
    assert [(s.kind, s.value) for s in store.lb_settings()] == [("weight", "0")]
    assert main_weights(lbs) == {"fe-01-lb-gprd": {0}, "fe-02-lb-gprd": {CANARY_WEIGHT}}
    fe02.execute = answer
    guard.admit(make_run(lbs, store, "next-run"), "gprd", "rollout")
    assert main_weights(lbs) == {"fe-01-lb-gprd": {0}, "fe-02-lb-gprd": {0}}


def test_a_canary_weight_no_lb_took_is_not_recorded(lbs, store):
    for lb in lbs.lbs:
        lb.execute = lambda cmd, answer=lb.execute: ("Permission denied.\n" if cmd.startswith("set weight")
                                                     else answer(cmd))
    with pytest.raises(PartialApplication, match="done on none"):
        canary.apply_weight(make_run(lbs, store), 0)
    assert store.lb_settings() == []


def test_a_rollout_entering_the_door_puts_drains_and_the_canary_weight_back_on_a_restarted_lb(
        lbs, store, caplog):
    run = make_run(lbs, store)
    store.record_drained_many("gprd", ["web-01-sv-gprd"], "earlier-run", "failed in an earlier deploy")
    HAProxy.for_env(run.env("gprd")).drain(["web-01-sv-gprd"])
    canary.apply_weight(run, 0)
    fe01, fe02 = lbs.lbs
    restart(fe02)
    env = run.env("gprd")
    assert disagreements(HAProxy.for_env(env).snapshot()), "the restart should make the LBs disagree"
    sent_to_fe01 = len(set_lines(fe01))

    with caplog.at_level(logging.WARNING, logger="liftoff.lbstate"):
        guard.admit(make_run(lbs, store, "retry-run"), "gprd", "rollout")

    assert disagreements(HAProxy.for_env(env).snapshot()) == []
    assert view(fe02, "web-01-sv-gprd") == {("drain", 100)}
    assert main_weights(lbs) == {"fe-01-lb-gprd": {0}, "fe-02-lb-gprd": {0}}
    assert len(set_lines(fe01)) == sent_to_fe01, "the LB that kept its state was changed"
    (event,) = [e for e in store.lock_events("gprd") if e.action == "lb_reconciled"]
    assert "fe-02-lb-gprd" in event.reason and "fe-01-lb-gprd" not in event.reason
    assert event.run_id == "retry-run"
    logged = [r.getMessage() for r in caplog.records if "fe-02-lb-gprd" in r.getMessage()]
    assert len(logged) == 1 and "drain on 1" in logged[0] and "weight on 2" in logged[0]


def test_a_canary_weight_change_puts_the_canary_drain_back_before_changing_anything(lbs, store):
    run = make_run(lbs, store)
    canary.apply_weight(run, "drain", canary_env="gprd-cny")  # the shield a rollback leaves
    restart(lbs.lbs[1])
    assert view(lbs.lbs[1], CNY["web"][0]) == {("ready", 5), ("ready", 100)}
    guard.admit(make_run(lbs, store, "weight-run"), "gprd-cny", "canary_weight")
    for lb in lbs.lbs:
        assert {s.admin for h in CNY["web"] + CNY["api"] for s in lb.server_state(h)} == {"drain"}
    assert disagreements(HAProxy.for_env(run.env("gprd")).snapshot()) == []


def test_an_lb_that_cannot_be_read_refuses_the_change_naming_it_and_keeps_no_lock(lbs, store):
    run = make_run(lbs, store)
    store.record_drained_many("gprd", ["web-01-sv-gprd"], "earlier-run")
    lbs.stop_lb(lbs.lbs[1])
    with pytest.raises(HAProxyError, match="load balancer fe-02-lb-gprd .* is unreachable"):
        guard.admit(run, "gprd", "rollout")
    assert store.get_lock("gprd") is None
    assert set_lines(lbs.lbs[0]) == [], "nothing may change while an LB cannot be read"


def test_changes_that_do_not_need_the_lbs_put_them_right_too_but_go_on_when_one_is_down(lbs, store, caplog):
    store.record_drained_many("gprd", ["web-01-sv-gprd"], "earlier-run")
    HAProxy.for_env(make_run(lbs, store).env("gprd")).drain(["web-01-sv-gprd"])
    restart(lbs.lbs[1])
    guard.admit(make_run(lbs, store, "cleanup-run"), "gprd", "chef")  # a run's last step
    assert view(lbs.lbs[1], "web-01-sv-gprd") == {("drain", 100)}
    lbs.stop_lb(lbs.lbs[1])
    with caplog.at_level(logging.WARNING, logger="liftoff.guard"):
        guard.admit(make_run(lbs, store, "migrations-run"), "gprd-cny", "migrations")  # goes on
    assert store.get_lock("gprd-cny").run_id == "migrations-run"
    assert any("fe-02-lb-gprd" in r.getMessage() and "without checking" in r.getMessage()
               for r in caplog.records)


def web_fleet(own, hosts: int):
    """A web role of ``hosts`` hosts in batches of one behind ``own``'s LBs, at OLD; NEW exists."""
    env = make_env(own.lbs, {"web": {"hosts": hosts, "batch": 1, "floor": "0%"}})
    fleet_ = FakeFleet()
    wire(env, fleet_, own.lbs, OLD)
    fleet_.builds.add(NEW)
    return env, fleet_


# -- a rollout whose LB restarts between the drain and the install ----------------------------------

class RestartAfterSessions(HAProxy):
    """Restarts ``victim`` once, after the first batch's session wait (after its drain, before
    its install)."""

    def __init__(self, refs, victim, **kw):
        super().__init__(refs, **kw)
        self.victim = victim
        self.restarted = False

    async def await_sessions_zero(self, hosts, timeout):
        left = await super().await_sessions_zero(hosts, timeout)
        if not self.restarted:
            self.restarted = True
            restart(self.victim)
        return left


class WatchingRemote(FakeRemote):
    """Keeps each host's admin state on every LB when its package install starts."""

    def __init__(self, fleet_, lbs):
        super().__init__(fleet_)
        self.lbs = lbs
        self.at_install: dict[str, dict[str, set[str]]] = {}

    async def run(self, host, command, timeout=None, started=None):
        if "apt-get install" in command:
            self.at_install[host.name] = {lb.name: {s.admin for s in lb.server_state(host.name)}
                                          for lb in self.lbs}
        return await super().run(host, command, timeout, started)


def test_a_rollout_drains_again_on_an_lb_restarted_between_drain_and_install(store, caplog):
    with LBThread("fe-01-lb-gprd", "fe-02-lb-gprd") as own:
        env, fleet_ = web_fleet(own, 3)
        remote = WatchingRemote(fleet_, own.lbs)
        haproxy = RestartAfterSessions(env.load_balancers, own.lbs[1], poll=0.05)
        with caplog.at_level(logging.WARNING, logger="liftoff.lbstate"):
            report = asyncio.run(fleet.rollout(env, NEW, run_id="run-1", store=store, remote=remote,
                                               haproxy=haproxy, options=FAST))
        assert haproxy.restarted
        first = report.roles["web"].batches[0][0]
        assert remote.at_install[first] == {"fe-01-lb-gprd": {"drain"}, "fe-02-lb-gprd": {"drain"}}, \
            "the host was in service on the restarted LB while it was upgraded"
        assert all(v == {"fe-01-lb-gprd": {"drain"}, "fe-02-lb-gprd": {"drain"}}
                   for v in remote.at_install.values())
        assert report.status == "success", report.to_json()
        assert any("fe-02-lb-gprd had lost liftoff's state" in n for n in report.hosts[first].notes)
        events = [e for e in store.lock_events("gprd") if e.action == "lb_reconciled"]
        assert len(events) == 1 and "before its install" in events[0].reason
        assert any("fe-02-lb-gprd" in r.getMessage() for r in caplog.records)
        assert disagreements(HAProxy.for_env(env).snapshot()) == []
        assert {s.admin for lb in own.lbs for h in env.hosts() for s in lb.server_state(h.name)} == {"ready"}


def test_the_rollout_leaves_hosts_it_is_putting_back_in_service_alone(lbs, store):
    """Roles of a stage run at once: one role's check must not drain again another role's hosts
    that are ready but whose drain records are not cleared yet."""
    env = make_env(lbs.lbs, {"web": {"hosts": 2, "batch": 1, "floor": "0%"}})
    fleet_ = FakeFleet()
    wire(env, fleet_, lbs.lbs, OLD)
    store.record_drained_many("gprd", ["web-01-sv-gprd", "web-02-sv-gprd"], "run-1")
    HAProxy.for_env(env).drain(["web-02-sv-gprd"])  # web-01 was made ready again, web-02 is installing
    r = fleet._Rollout(env, NEW, "run-1", store, FakeRemote(fleet_), HAProxy.for_env(env), FAST)
    for name in ("web-01-sv-gprd", "web-02-sv-gprd"):
        r.report.hosts[name] = fleet.HostReport(name, "web")
    r.report.hosts["web-01-sv-gprd"].step = "ready"
    restart(lbs.lbs[1])
    asyncio.run(r._reconcile("test"))
    assert view(lbs.lbs[1], "web-01-sv-gprd") == {("ready", 100)}
    assert view(lbs.lbs[1], "web-02-sv-gprd") == {("drain", 100)}


# -- whose hosts these are --------------------------------------------------------------------------

def test_a_live_run_s_hosts_are_left_to_it_at_another_run_s_door(lbs, store):
    """Production and its canary share LBs but not locks: a canary rollout's hosts (drain record
    of a run holding a lock) are its own; the door of a production change leaves their state to
    it, and still puts back what nobody is changing."""
    store.acquire("gprd-cny", "canary-run", "carol", "deploy_canary")
    store.record_drained_many("gprd-cny", [CNY["web"][0]], "canary-run")  # being put back in service
    store.record_drained_many("gprd", ["web-01-sv-gprd"], "earlier-run")
    HAProxy.for_env(make_run(lbs, store).env("gprd")).drain(["web-01-sv-gprd"])
    restart(lbs.lbs[1])
    guard.admit(make_run(lbs, store, "prod-run"), "gprd", "rollout")
    assert {s.admin for lb in lbs.lbs for s in lb.server_state(CNY["web"][0])} == {"ready"}
    assert view(lbs.lbs[1], "web-01-sv-gprd") == {("drain", 100)}


def test_forget_lb_state_takes_hosts_out_of_a_recorded_state(store):
    store.record_lb_setting("gprd-cny", "state", "drain", ["a", "b"], [], "r1", "alice")
    store.record_lb_setting("gprd-cny", "weight", 0, ["a", "b"], ["web"], "r1", "alice")
    assert store.forget_lb_state(["a"]) == 1
    assert [(s.kind, s.hosts) for s in store.lb_settings()] == [("state", ("b",)), ("weight", ("a", "b"))]
    assert store.forget_lb_state(["b", "x"]) == 1
    assert [(s.kind, s.hosts) for s in store.lb_settings()] == [("weight", ("a", "b"))]
    assert store.forget_lb_state(["a"]) == 0


def test_hosts_a_rollout_put_back_in_service_are_not_drained_again_by_an_older_state(store):
    """The rollback shield drains the canary ("stays drained"); a later canary rollout repairs
    and readies its hosts: that is the last thing liftoff did to them, so no later check drains
    them again."""
    with LBThread("fe-01-lb-gprd", "fe-02-lb-gprd") as own:
        env, fleet_ = web_fleet(own, 2)
        names = [h.name for h in env.hosts()]
        store.record_lb_setting("gprd", "state", "drain", names, [], "shield-run", "liftoff")
        HAProxy.for_env(env).drain(names)
        report = asyncio.run(fleet.rollout(env, NEW, run_id="run-1", store=store, remote=FakeRemote(fleet_),
                                           haproxy=HAProxy.for_env(env, poll=0.05), options=FAST))
        assert report.status == "success" and all(report.hosts[n].repaired for n in names)
        assert store.lb_settings() == []
        restart(own.lbs[1])
        assert not asyncio.run(lbstate.areconcile(HAProxy.for_env(env), store, "gprd", "run-2", "bob"))
        assert {s.admin for lb in own.lbs for n in names for s in lb.server_state(n)} == {"ready"}


def full_reads(lb) -> int:
    """How often the reconcile read every server of ``lb`` (``show servers state`` alone)."""
    return sum(1 for line in lb.lines if line == "show servers state")


class OnInstall(FakeRemote):
    """Runs ``act(host)`` when a host's package install starts."""

    def __init__(self, fleet_, act):
        super().__init__(fleet_)
        self.act = act

    async def run(self, host, command, timeout=None, started=None):
        if "apt-get install" in command:
            self.act(host.name)
        return await super().run(host, command, timeout, started)


@pytest.mark.parametrize("event", ["nothing", "restart", "refused"])
def test_a_batch_boundary_reads_every_server_again_only_after_a_restart_or_a_failed_lb_command(store, event):
    """HAProxy loses runtime state only by restarting: after a rollout's first full reconcile a
    batch boundary asks each LB which process it runs ("show info") and reads every server and
    the records again only when an LB runs another process, or an LB command failed or was
    refused since (an LB may hold part of a change). Four batches of one host."""
    with LBThread("fe-01-lb-gprd", "fe-02-lb-gprd") as own:
        env, fleet_ = web_fleet(own, 4)
        hosts = [h.name for h in env.hosts()]
        fe02 = own.lbs[1]
        answer = fe02.execute

        def refuse_third_ready(cmd: str) -> str:
            return "No such server.\n" if cmd.endswith(f"/{hosts[2]} state ready") else answer(cmd)

        def act(host: str) -> None:
            if host == hosts[2] and event == "restart":
                restart(fe02)
            if host == hosts[2] and event == "refused":
                fe02.execute = refuse_third_ready

        remote = OnInstall(fleet_, act)
        report = asyncio.run(fleet.rollout(env, NEW, run_id="run-1", store=store, remote=remote,
                                           haproxy=HAProxy.for_env(env, poll=0.05), options=FAST))
        assert all(any(line == "show info" for line in lb.lines) for lb in own.lbs)
        reads = [full_reads(lb) for lb in own.lbs]
        if event == "nothing":  # one full reconcile (batch 1, before its install); 7 by process
            assert report.status == "success", report.to_json()
            assert reads == [1, 1]
        elif event == "restart":  # and the one after the third batch's install
            assert report.status == "success", report.to_json()
            assert reads == [2, 2]
            assert {s.admin for lb in own.lbs for h in hosts for s in lb.server_state(h)} == {"ready"}
        else:  # the third host failed (not ready on fe-02): its batch's end reads in full
            assert report.hosts[hosts[2]].status == "failed", report.to_json()
            assert reads == [2, 2]
            assert {lb.name: {s.admin for s in lb.server_state(hosts[2])} for lb in own.lbs} == \
                {"fe-01-lb-gprd": {"drain"}, "fe-02-lb-gprd": {"drain"}}


def test_an_lb_restarted_during_the_install_is_noticed_in_the_report_log_and_history(store, caplog):
    """A restart while the batch installs cannot be undone; liftoff says so (the LB runs another
    HAProxy process than before the install) and puts back whatever else the LB lost."""
    with LBThread("fe-01-lb-gprd", "fe-02-lb-gprd") as own:
        env, fleet_ = web_fleet(own, 2)
        pids = {lb.name: 100 + i for i, lb in enumerate(own.lbs)}  # each fake HAProxy's process
        for lb in own.lbs:
            answer = lb.execute
            lb.execute = lambda cmd, lb=lb, answer=answer: (
                f"Name: HAProxy\nPid: {pids[lb.name]}\nStart_time_sec: 1796321166\n"
                if cmd == "show info" else answer(cmd))

        class RestartDuringInstall(FakeRemote):
            victim = ""

            async def run(self, host, command, timeout=None, started=None):
                if "apt-get install" in command and not self.victim:
                    self.victim = host.name
                    restart(own.lbs[1])
                    pids["fe-02-lb-gprd"] += 10
                return await super().run(host, command, timeout, started)

        remote = RestartDuringInstall(fleet_)
        with caplog.at_level(logging.WARNING, logger="liftoff.fleet"):
            report = asyncio.run(fleet.rollout(env, NEW, run_id="run-1", store=store, remote=remote,
                                               haproxy=HAProxy.for_env(env, poll=0.05), options=FAST))
        assert report.status == "success", report.to_json()
        notes = report.hosts[remote.victim].notes
        assert any(n.startswith("fe-02-lb-gprd restarted during its install") for n in notes), notes
        (event,) = [e for e in store.lock_events("gprd") if e.action == "lb_restarted"]
        assert "fe-02-lb-gprd" in event.reason and "fe-01-lb-gprd" not in event.reason
        assert any("restarted during the install of batch 1 of web" in r.getMessage() for r in caplog.records)
        other = next(n for n in report.hosts if n != remote.victim)
        assert not any("restarted" in n for n in report.hosts[other].notes)


def test_the_process_an_lb_runs_comes_from_show_info():
    from liftoff.haproxy import process_of

    assert process_of("Name: HAProxy\nPid: 25032\nUptime_sec: 0\nStart_time_sec: 1796321166\n") == \
        "25032@1796321166"
    assert process_of("Unknown command.\n") is None
