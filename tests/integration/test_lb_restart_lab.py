"""A real HAProxy killed -9 and started again (octet 88, ``LIFTOFF_LB_RESTART_LAB_OCTET``):
it comes back with its config file's states and weights while its peer keeps what liftoff
set. Issue 14 (a), found by the chaos soak (bench/soak.py ``--faults haproxy_kill``).

* A door entry (a rollout through the guard) puts liftoff's recorded state back on the
  restarted LB: the host with a drain record is drained again, the canary weight liftoff set is
  set again, both LBs agree, and the lock history says what was put back.
* A rollout whose LB is killed and restarted between a batch's drain and its install drains the
  batch again on that LB before installing: the host is never in service anywhere while it is
  upgraded.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator

import pytest

from lab import processes
from liftoff import canary, deploy, fleet
from liftoff.haproxy import HAProxy, disagreements
from liftoff.inventory import load_inventory
from liftoff.remote import Remote
from liftoff.runs import Run
from tests.labkit import Lab, running_lab

pytestmark = pytest.mark.lab

OCTET = int(os.environ.get("LIFTOFF_LB_RESTART_LAB_OCTET", "88"))
BASE = "17.5.0-ee.0"  # what the lab's hosts run at first
NEXT = "17.9.1-ee.0"
VICTIM = "fe-02-lb-gprd"
OPTIONS = fleet.RolloutOptions(drain_timeout=1, up_timeout=60, health_timeout=30)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with running_lab(tmp_path_factory.mktemp("lbr"), OCTET, "--install-seconds", "0.2") as lab:
        mp = pytest.MonkeyPatch()
        for name, value in lab.env.items():
            mp.setenv(name, value)
        lab.build_add(NEXT)
        try:
            yield lab
        finally:
            mp.undo()


@pytest.fixture
def run(lab: Lab) -> Iterator[Run]:
    r = Run(run_id=f"lbr-{time.monotonic_ns()}", who="lbr", pipeline="lbr")
    yield r
    r.store.close()


def gprd_lbs() -> HAProxy:
    return HAProxy.for_env(load_inventory().env("gprd"))


def every_lb_answers_and_checked() -> bool:
    """Every gprd LB answers and has health-checked every server (none still starting)."""
    try:
        snap = gprd_lbs().snapshot()
    except Exception:  # noqa: BLE001 - not answering yet
        return False
    return all(s.status in ("UP", "DRAIN") for states in snap.values() for s in states)


def kill_and_restart(lab: Lab, name: str = VICTIM) -> None:
    """kill -9 one LB's HAProxy and start it again, as the soak's haproxy_kill fault and its heal
    do (the restarted HAProxy reads only its config file)."""
    pid = processes.running_pid(lab.config, f"haproxy-{name}")
    assert pid, f"{name} is not running"
    os.kill(pid, signal.SIGKILL)
    assert processes.stop_pids([pid], timeout=5) == []
    assert processes.up(lab.config, log=lambda _m: None) == [f"haproxy-{name}"]
    lab.wait_for(f"{name} to answer again", every_lb_answers_and_checked, 60)


def view(name: str, server: str) -> set[tuple[str, int]]:
    snap = gprd_lbs().snapshot()[name]
    return {(s.admin, s.weight) for s in snap if s.server == server and s.backend in ("web", "api", "git")}


def test_a_rollout_entering_the_door_puts_the_lost_state_back_on_a_restarted_lb(lab: Lab, run: Run):
    inventory = load_inventory()
    drained = inventory.env("gprd").role("web").hosts[-1].name
    cny = inventory.env("gprd-cny").role("web").hosts[0].name
    # an earlier run left a host drained with its record; the canary weight was set to 0
    run.store.record_drained_many("gprd", [drained], "earlier-run", "failed in an earlier deploy")
    gprd_lbs().drain([drained])
    canary.apply_weight(run, 0)
    assert view(VICTIM, drained) == {("drain", 100)} and view(VICTIM, cny) == {("ready", 0)}

    kill_and_restart(lab)
    assert view(VICTIM, drained) == {("ready", 100)}, "the restart should have lost the drain"
    assert view(VICTIM, cny) != {("ready", 0)}, "the restart should have lost the canary weight"
    assert disagreements(gprd_lbs().snapshot())

    # a retried rollout of another role (every host already at its version: nothing installs)
    retry = Run(run_id=f"{run.run_id}-retry", who="lbr", pipeline="lbr")
    out = deploy.deploy_roles(retry, "gprd", BASE, roles=["api"], options=OPTIONS)
    retry.store.close()
    assert out["counts"] == {"skipped": len(inventory.env("gprd").role("api").hosts)}, out

    snap = gprd_lbs().snapshot()
    assert disagreements(snap) == []
    for lb in snap:
        assert view(lb, drained) == {("drain", 100)}
        assert view(lb, cny) == {("ready", 0)}
    events = [e for e in run.store.lock_events("gprd") if e.action == "lb_reconciled"]
    assert len(events) == 1 and VICTIM in events[0].reason and events[0].run_id == retry.run_id
    # leave the host in service again for the next test
    gprd_lbs().ready([drained])
    run.store.clear_drained("gprd", drained)


class RestartBeforeInstall(HAProxy):
    """Kills -9 and restarts ``VICTIM`` once, after the first batch's drain and session wait
    (before its install)."""

    lab: Lab

    restarted = False

    async def await_sessions_zero(self, hosts, timeout):
        left = await super().await_sessions_zero(hosts, timeout)
        if not self.restarted:
            self.restarted = True
            await asyncio.to_thread(kill_and_restart, self.lab)
        return left


class WatchingRemote(Remote):
    """The real SSH remote; keeps each host's admin states on every LB as its install starts."""

    at_install: dict[str, set[str]]

    async def run(self, host, command, timeout=None, started=None):
        if "apt-get install" in command:
            snap = await gprd_lbs().aservers(host.name)
            self.at_install[host.name] = {f"{lb}:{s.admin}" for lb, states in snap.items() for s in states}
        return await super().run(host, command, timeout, started)


def test_a_rollout_whose_lb_restarts_between_drain_and_install_drains_again_first(lab: Lab, run: Run):
    env = load_inventory().env("gprd")
    haproxy = RestartBeforeInstall(env.load_balancers, poll=0.2)
    haproxy.lab = lab
    remote = WatchingRemote(store=run.store, run_id=run.run_id, env=env.name)
    remote.at_install = {}
    report = asyncio.run(fleet.rollout(env, NEXT, run_id=run.run_id, store=run.store, roles=["api"],
                                       remote=remote, haproxy=haproxy, options=OPTIONS))
    asyncio.run(remote.close())
    assert haproxy.restarted
    assert report.status == "success", report.to_json()
    first = report.roles["api"].batches[0][0]
    assert remote.at_install[first] == {"fe-01-lb-gprd:drain", f"{VICTIM}:drain"}, \
        f"{first} was in service on the restarted LB while it was upgraded: {remote.at_install[first]}"
    assert all(states == {"fe-01-lb-gprd:drain", f"{VICTIM}:drain"} for states in remote.at_install.values())
    assert any(f"{VICTIM} had lost liftoff's state" in n for n in report.hosts[first].notes)
    events = [e for e in run.store.lock_events("gprd") if e.action == "lb_reconciled"]
    assert any("before its install" in e.reason for e in events)
    assert disagreements(gprd_lbs().snapshot()) == []
    assert run.store.drained("gprd") == []


class RestartAtInstall(Remote):
    """The real SSH remote; kills -9 and restarts ``VICTIM`` once, as the first install starts
    (after every check before it): the host is in service on that LB while it is upgraded."""

    lab: Lab
    victim = ""

    async def run(self, host, command, timeout=None, started=None):
        if "apt-get install" in command and not self.victim:
            self.victim = host.name
            await asyncio.to_thread(kill_and_restart, self.lab)
        return await super().run(host, command, timeout, started)


def test_an_lb_restarted_during_an_install_is_noticed_and_its_state_put_back(lab: Lab, run: Run):
    env = load_inventory().env("gprd")
    cny = load_inventory().env("gprd-cny").role("web").hosts[0].name
    remote = RestartAtInstall(store=run.store, run_id=run.run_id, env=env.name)
    remote.lab = lab
    report = asyncio.run(fleet.rollout(env, NEXT, run_id=run.run_id, store=run.store, roles=["git"],
                                       remote=remote, options=OPTIONS))
    asyncio.run(remote.close())
    assert report.status == "success", report.to_json()
    notes = report.hosts[remote.victim].notes
    assert any(n.startswith(f"{VICTIM} restarted during its install") for n in notes), notes
    others = [h for h in report.hosts if h != remote.victim]
    assert not any("restarted" in n for h in others for n in report.hosts[h].notes)
    restarted = [e for e in run.store.lock_events("gprd") if e.action == "lb_restarted"
                 and e.run_id == run.run_id]
    assert len(restarted) == 1 and VICTIM in restarted[0].reason
    # what the restart lost besides the batch (the canary weight liftoff set) is back
    assert {lb: view(lb, cny) for lb in gprd_lbs().snapshot()} == {"fe-01-lb-gprd": {("ready", 0)},
                                                                   VICTIM: {("ready", 0)}}
    assert disagreements(gprd_lbs().snapshot()) == []
