"""fleet.rollout's sliding window (``rollout: window`` per role, or ``RolloutOptions.rollout_mode``)
against the fakes: at most a batch's worth of hosts out of service at any moment (a timeline
kept by the fake LBs), a slow host holds only itself, after a failed host nothing new is drained
and the hosts in flight finish, lockstep still runs batch after batch, the capacity floor is
refused the same way. Orderings come from one event list (LB commands and host commands, in the
order they happened), never from timing."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re

import pytest

from liftoff import fleet as fleet_mod
from liftoff.errors import CapacityError, InvalidInput, InventoryError
from liftoff.fleet import RolloutFailed, RolloutOptions, rollout
from liftoff.haproxy import HAProxy
from liftoff.inventory import parse_inventory
from tests.unit import test_fleet_fake
from tests.unit.fleet_fakes import FakeRemote, make_env
from tests.unit.test_fleet_fake import NEW, OLD, lb_admin
from tests.unit.test_fleet_fake import setup as fake_setup

lbs = test_fleet_fake.lbs  # the fixtures: two fake LBs, a state store
store = test_fleet_fake.store
FAST = RolloutOptions(drain_timeout=1, up_timeout=1, health_timeout=1)
WINDOW = dataclasses.replace(FAST, rollout_mode="window")
LOCKSTEP = dataclasses.replace(FAST, rollout_mode="lockstep")
GATE_POLLS = 1000  # x 10 ms: a gate never opened fails the test on its ordering, it does not hang


class Timeline:
    """Every LB change as it happened: (what, hosts) events, and after each ``set server`` the
    hosts out of service (not ``ready``, or not UP, on some LB). ``slow_up``: hosts that stay
    DOWN after their ready for that many ``show stat`` polls of each LB."""

    def __init__(self, lbs):
        self.lbs = lbs.lbs
        self.events: list[tuple[str, str]] = []  # ("drain"|"ready"|"install-failed"|..., host)
        self.out: list[frozenset[str]] = []
        self.slow_up: dict[str, int] = {}
        for lb in self.lbs:
            lb.execute = self._wrap(lb, lb.execute)

    def _wrap(self, lb, execute):
        down: dict[str, int] = {}  # server -> polls left DOWN

        def run(cmd: str) -> str:
            if cmd.startswith("show stat"):
                for name, left in list(down.items()):
                    down[name] = left - 1
                    if left <= 0:
                        del down[name]
                        for srv in lb.server_state(name):
                            srv.health = True
            answer = execute(cmd)
            m = re.fullmatch(r"set server \S+/(\S+) state (\S+)", cmd)
            if m:
                if m.group(2) == "ready" and m.group(1) in self.slow_up:
                    down[m.group(1)] = self.slow_up[m.group(1)]
                    for srv in lb.server_state(m.group(1)):
                        srv.health = False
                self.events.append((m.group(2), m.group(1)))
                self.out.append(frozenset(name for lb_ in self.lbs for servers in lb_.backends.values()
                                          for name, s in servers.items()
                                          if s.admin != "ready" or not s.health))
            return answer
        return run

    def most_out(self) -> int:
        return max(len(o) for o in self.out)

    def index(self, what: str, host: str, last: bool = False) -> int:
        hits = [i for i, e in enumerate(self.events) if e == (what, host)]
        assert hits, f"no {what} of {host} in {self.events}"
        return hits[-1] if last else hits[0]


class GatedRemote(FakeRemote):
    """A FakeRemote whose hosts' install waits until a condition holds (``gates[host]``) and
    which notes failed installs in the timeline."""

    def __init__(self, fleet, timeline: Timeline):
        super().__init__(fleet)
        self.timeline = timeline
        self.gates: dict[str, object] = {}

    async def run(self, host, command, timeout=None, started=None):
        if "apt-get install" in command and host.name in self.gates:
            for _ in range(GATE_POLLS):
                if self.gates[host.name]():
                    break
                await asyncio.sleep(0.01)
        r = await super().run(host, command, timeout, started)
        if "apt-get install" in command:
            self.timeline.events.append(("install-ok" if r.ok else "install-failed", host.name))
        return r


def setup(lbs, roles, mode: str | None = None):
    """The fake fleet; ``mode``: the roles' ``rollout`` in the inventory."""
    env, fleet, _ = fake_setup(lbs, roles)
    if mode is not None:
        env = dataclasses.replace(env, roles=tuple(dataclasses.replace(r, rollout=mode) for r in env.roles))
    timeline = Timeline(lbs)
    return env, fleet, GatedRemote(fleet, timeline), timeline


def roll(env, remote, store, options, version=NEW):
    return asyncio.run(rollout(env, version, run_id="run-1", store=store, remote=remote,
                               haproxy=HAProxy.for_env(env, poll=0.05), options=options))


def host(n: int) -> str:
    return f"web-{n:02d}-sv-gprd"


def assert_no_false_reconcile(store, report) -> None:
    """Hosts another group (or role) of the run recorded and was about to drain were not taken
    for an LB that lost liftoff's state."""
    assert [e.reason for e in store.lock_events("gprd") if e.action == "lb_reconciled"] == []
    assert not [n for h in report.hosts.values() for n in h.notes if "lost liftoff's state" in n]


def test_never_more_than_a_batch_out_of_service(lbs, store, caplog):
    env, fleet, remote, timeline = setup(lbs, {"web": {"hosts": 12, "batch": "3", "floor": "50%"}})
    # the first host is slow: until five others are done, so the window slides past it
    remote.gates[host(1)] = lambda: sum(fleet.hosts[host(n)].running == NEW for n in range(2, 13)) >= 5
    timeline.slow_up = {host(2): 10, host(7): 10}  # back in service only a while after their ready
    caplog.set_level(logging.INFO, logger="liftoff")
    report = roll(env, remote, store, dataclasses.replace(WINDOW, up_timeout=30))
    assert report.status == "success", report.error
    assert report.counts() == {"done": 12}
    assert report.summary()["roles"]["web"]["mode"] == "window"  # the option over the inventory's lockstep
    assert timeline.most_out() == 3, timeline.out  # the window is used, never exceeded
    assert all(len(o) <= 3 for o in timeline.out)
    assert timeline.out[-1] == frozenset()
    assert store.drained("gprd") == []
    assert_no_false_reconcile(store, report)
    assert {p.status for p in store.host_statuses("gprd:" + NEW).values()} == {"done"}
    # every host drained, then made ready (on both LBs), never drained again once ready
    for n in range(1, 13):
        mine = [e[0] for e in timeline.events if e[1] == host(n) and e[0] in ("drain", "ready")]
        assert mine[:2] == ["drain", "drain"] and mine[-2:] == ["ready", "ready"], mine
        assert "drain" not in mine[mine.index("ready"):], mine
    # LB log lines name the group and a count, not the hosts
    lb_lines = [r.getMessage() for r in caplog.records if r.name == "liftoff.haproxy"]
    assert lb_lines and all(re.fullmatch(r"haproxy (drain|ready): window group \d+ of web, \d+ host\(s\) "
                                         r"on 2 LB\(s\)", line) for line in lb_lines), lb_lines
    assert not any("sv-gprd" in line for line in lb_lines)


def test_a_slow_host_does_not_hold_the_others(lbs, store):
    env, fleet, remote, timeline = setup(lbs, {"web": {"hosts": 6, "batch": "2", "floor": "50%"}},
                                         mode="window")
    others = range(2, 7)
    # web-01 installs only once every other host is back in service on every LB
    remote.gates[host(1)] = lambda: all(fleet.hosts[host(n)].running == NEW and
                                        lb_admin(lbs, host(n)) == {"ready"} for n in others)
    report = roll(env, remote, store, FAST)  # the inventory's window
    assert report.status == "success", report.error
    assert report.counts() == {"done": 6}
    slow_ready = timeline.index("ready", host(1))
    assert timeline.index("drain", host(1)) < timeline.index("drain", host(2))
    for n in others:  # all the others went out and came back while web-01 was out
        assert timeline.index("ready", host(n), last=True) < slow_ready
    assert timeline.most_out() == 2 and all(len(o) <= 2 for o in timeline.out)
    # web-01 and web-02 drained together (one group: one drain line per LB), web-02 went on alone
    assert report.roles["web"].batches[0] == [host(1), host(2)]
    assert timeline.index("ready", host(2), last=True) < slow_ready


def test_after_a_failure_nothing_new_is_drained_and_in_flight_hosts_finish(lbs, store, monkeypatch):
    env, fleet, remote, timeline = setup(lbs, {"web": {"hosts": 8, "batch": "3", "floor": "50%"}})
    fleet.install_fails_on[NEW] = {host(2)}
    fail = fleet_mod._Rollout._fail

    def noted_fail(self, h, step, reason):  # when the rollout learns of the failure
        timeline.events.append(("failed", h.name))
        fail(self, h, step, reason)

    monkeypatch.setattr(fleet_mod._Rollout, "_fail", noted_fail)
    # the window is full (web-01..03 out) when web-02 fails; web-01 and web-03 install only after
    # the rollout knows: their slots come back after the failure, and must not be used
    remote.gates[host(2)] = lambda: lb_admin(lbs, host(3)) == {"drain"}
    remote.gates[host(1)] = remote.gates[host(3)] = lambda: ("failed", host(2)) in timeline.events
    report = roll(env, remote, store, WINDOW)
    assert report.status == "failed"
    assert list(report.failed_hosts) == [host(2)]
    assert report.roles["web"].status == "failed"
    assert report.roles["web"].error == f"window group 1 failed on {host(2)}"
    with pytest.raises(RolloutFailed, match=rf"1 host\(s\) failed: {host(2)} \(install failed"):
        report.raise_for_failure()
    failed_at = timeline.events.index(("failed", host(2)))
    for n in (1, 3):
        assert timeline.index("drain", host(n)) < failed_at < timeline.index("ready", host(n))
    # nothing drained after the failure
    assert not [e for e in timeline.events[failed_at:] if e[0] == "drain"], timeline.events[failed_at:]
    # the hosts in flight finished: back in service, records cleared, done
    for n in (1, 3):
        assert report.hosts[host(n)].status == "done" and lb_admin(lbs, host(n)) == {"ready"}
    # the failed host stays drained and recorded
    assert lb_admin(lbs, host(2)) == {"drain"}
    assert [r.host for r in store.drained("gprd")] == [host(2)]
    assert store.host_statuses("gprd:" + NEW)[host(2)].status == "failed"
    assert all(len(o) <= 3 for o in timeline.out)
    # hosts never started: untouched (at most inspected), still pending
    started = {h for _, h in timeline.events}
    for n in range(1, 9):
        if host(n) not in started:
            assert report.hosts[host(n)].status == "pending"
            assert lb_admin(lbs, host(n)) == {"ready"} and fleet.hosts[host(n)].installed == OLD
            assert all(c.startswith(("dpkg-query", "gitlab-ctl status")) for c in remote.commands(host(n)))
    assert [report.hosts[host(n)].status for n in range(4, 9)] == ["pending"] * 5


def test_lockstep_option_runs_batch_after_batch(lbs, store, caplog):
    env, fleet, remote, timeline = setup(lbs, {"web": {"hosts": 6, "batch": "2", "floor": "50%"}},
                                         mode="window")
    caplog.set_level(logging.INFO, logger="liftoff")
    report = roll(env, remote, store, LOCKSTEP)  # the options override the inventory's window
    assert report.status == "success", report.error
    assert report.roles["web"].mode == "lockstep" and report.summary()["roles"]["web"]["mode"] == "lockstep"
    batches = report.roles["web"].batches
    assert batches == [[host(1), host(2)], [host(3), host(4)], [host(5), host(6)]]
    for before, after in zip(batches, batches[1:], strict=False):  # drained once the batch before is back
        last_ready = max(timeline.index("ready", h, last=True) for h in before)
        assert last_ready < min(timeline.index("drain", h) for h in after)
    assert any("haproxy drain: batch 2 of web, 2 host(s)" in r.getMessage() for r in caplog.records)
    # the default (no option, no inventory key) is lockstep too
    env2, _, remote2, _ = setup(lbs, {"web": {"hosts": 4, "batch": "2", "floor": "50%"}})
    assert env2.role("web").rollout == "lockstep" and RolloutOptions().rollout_mode is None
    report2 = roll(env2, remote2, store, FAST, version="17.6.1-ee.0")
    assert report2.roles["web"].batches == [[host(1), host(2)], [host(3), host(4)]]


def test_the_capacity_floor_is_refused_the_same_way(lbs, store):
    roles = {"web": {"hosts": 4, "batch": "3", "floor": "50%"}}
    errors = {}
    for mode in ("lockstep", "window"):
        env, fleet, remote, timeline = setup(lbs, roles, mode=mode)
        with pytest.raises(CapacityError) as exc:
            roll(env, remote, store, FAST)
        errors[mode] = str(exc.value)
        assert timeline.events == [] and remote.log == []
    assert errors["window"] == errors["lockstep"]
    assert "batch 1 of 3 host(s) would leave 1 of 4 in service" in errors["window"]
    assert store.drained("gprd") == []


def test_window_repairs_a_drained_host_within_the_window(lbs, store):
    env, fleet, remote, timeline = setup(lbs, {"web": {"hosts": 6, "batch": "2", "floor": "50%"}},
                                         mode="window")
    for lb in lbs.lbs:
        lb.backends["web"][host(4)].admin = "drain"  # left drained by an earlier run
    report = roll(env, remote, store, FAST)
    assert report.status == "success", report.error
    assert report.hosts[host(4)].repaired
    assert report.roles["web"].batches[0] == [host(4), host(1)]  # out of service first
    assert all(len(o) <= 2 for o in timeline.out)


def test_a_window_step_drains_several_hosts_at_once(lbs, store):
    env, fleet, remote, timeline = setup(lbs, {"web": {"hosts": 12, "batch": "4", "floor": "50%"}})
    # web-01 slow: the others go around it, drained two at a time at least (the step)
    remote.gates[host(1)] = lambda: sum(fleet.hosts[host(n)].running == NEW and
                                        lb_admin(lbs, host(n)) == {"ready"} for n in range(2, 13)) >= 7
    report = roll(env, remote, store, dataclasses.replace(WINDOW, window_step=2))
    assert report.status == "success", report.error
    assert all(len(o) <= 4 for o in timeline.out) and timeline.most_out() == 4
    groups = report.roles["web"].batches
    assert all(len(g) >= 2 for g in groups[:-1]) and len(groups) > 3, groups
    slow_ready = timeline.index("ready", host(1))
    assert sum(timeline.index("ready", host(n), last=True) < slow_ready for n in range(2, 13)) >= 7


def test_rollout_mode_is_checked():
    with pytest.raises(InvalidInput, match="rollout_mode must be one of lockstep, window"):
        RolloutOptions(rollout_mode="sliding")
    with pytest.raises(InvalidInput, match="window_step must be a number of hosts"):
        RolloutOptions(window_step=-1)
    lbs = []
    env = make_env(lbs, {"web": {"hosts": 2}})
    assert env.role("web").rollout == "lockstep"
    data = {"environments": {"gprd": {
        "url": "http://127.0.0.1:1", "alert_matchers": {"env": "gprd"},
        "deploy_node": {"name": "deploy-01-sv-gprd", "address": "127.0.9.1"},
        "roles": [{"name": "web", "stage": "fleet", "rollout": "window",
                   "hosts": [{"name": "web-01-sv-gprd", "address": "127.0.0.2"}]}]}}}
    assert parse_inventory(data).env("gprd").role("web").rollout == "window"
    data["environments"]["gprd"]["roles"][0]["rollout"] = "sliding"
    with pytest.raises(InventoryError, match=r"roles\[0\]\.rollout: must be one of lockstep, window"):
        parse_inventory(data)



def test_parallel_roles_do_not_reconcile_each_others_drains(lbs, store):
    """Two roles of one stage roll at once: one's batch writes its drain records while the other
    checks every LB before its install; the records of hosts about to be drained are not an LB
    that lost liftoff's state."""
    env, fleet, remote, timeline = setup(lbs, {"web": {"hosts": 6, "batch": "2", "floor": "50%"},
                                              "api": {"hosts": 6, "batch": "2", "floor": "50%"}})
    assert len(fleet_mod.stage_groups(env.roles)) == 1  # one stage: the roles run together
    report = roll(env, remote, store, LOCKSTEP)
    assert report.status == "success", report.error
    assert report.counts() == {"done": 12}
    assert_no_false_reconcile(store, report)
