"""The fleet view (liftoff.fleetview) of a real lab of its own (octet 59, ``LIFTOFF_FLEETVIEW_LAB_OCTET``)
after the engine failed a host: a deploy of gprd's web role (3 hosts, batches of one, two real
HAProxy LBs) with a build whose install fails on web-02 stops after its batch, with web-02 drained
on both LBs under the run's drain record. The view shows the running deploy's progress (batch 2
of 3, 1 done, 1 failed, 1 left), the drained host with its record, the failure with its reason,
chef stopped, the versions per role as counts, and web-02's audit trail holds the install that
failed (exit code, duration, run id). With the build internal, its version shows nowhere.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator

import pytest

from liftoff import deploy, fleetview
from liftoff.errors import LiftoffError
from liftoff.inventory import load_inventory
from liftoff.runs import Run
from liftoff.status import internal_label
from liftoff.store import Store
from tests.labkit import Lab, running_lab

pytestmark = pytest.mark.lab

OCTET = int(os.environ.get("LIFTOFF_FLEETVIEW_LAB_OCTET", "59"))
FAILING = "17.8.671-ee.0"  # its install fails on web-02-sv-gprd
RUN = "deploy_production__fleetview_lab_2026-12-03T09:00:00+00:00"
WEB = ("web-01-sv-gprd", "web-02-sv-gprd", "web-03-sv-gprd")
LB1, LB2 = "fe-01-lb-gprd", "fe-02-lb-gprd"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with running_lab(tmp_path_factory.mktemp("fleetview-lab"), OCTET, "--install-seconds", "0.2") as lab:
        lab.build_add(FAILING, install_fails_on=[WEB[1]])
        yield lab


@pytest.fixture(scope="module")
def failed_deploy(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    """The engine's begin and a rollout of gprd's web role that fails on web-02; the deployment
    record stays running (as while the DAG's later tasks have not run)."""
    mp = pytest.MonkeyPatch()
    for name, value in lab.env.items():
        mp.setenv(name, value)
    store = Store(f"sqlite:///{tmp_path_factory.mktemp('fleetview-state') / 'state.db'}")
    try:
        inventory = load_inventory()
        previous = lab.host_status(WEB[0])["installed"]
        run = Run(run_id=RUN, who="tester", inventory=inventory, _store=store)
        started = time.time()
        deploy.begin_env(run, "gprd", FAILING, previous=previous)
        with pytest.raises(LiftoffError, match=WEB[1]):
            deploy.deploy_roles(run, "gprd", FAILING, roles=["web"])
        yield inventory, store, previous, started
    finally:
        store.close()
        mp.undo()


def test_the_view_after_a_failed_batch(failed_deploy):
    inventory, store, previous, started = failed_deploy
    v = fleetview.view(inventory, store, pressure=False)
    gprd = v["environments"]["gprd"]

    # the running deploy: web failed at batch 2 of 3
    [p] = v["progress"]
    assert (p["env"], p["version"], p["run_id"], p["kind"]) == ("gprd", FAILING, RUN, "deploy")
    web = {r["role"]: r for r in p["roles"]}["web"]
    assert (web["state"], web["batch"], web["batches"]) == ("failed", 2, 3), web
    assert (web["done"], web["failed"], web["left"], web["in_progress"]) == (1, 1, 1, 0), web
    assert web["completed_batches"] == 2 and web["eta_s"] == 0
    assert p["stopped"] is True and p["eta_s"] is None  # the failed batch stopped the rollout
    # the batch took what the lab took: one interval between the two batch ends, within the deploy
    assert 0 < web["batch_s"] < time.time() - started, web
    assert v["deploying"] is True

    # web-02: drained on both LBs under the run's record, failed with its reason, chef stopped
    [oos] = gprd["out_of_service"]
    assert oos["host"] == WEB[1] and oos["record"]["run_id"] == RUN
    assert oos["record"]["reason"] == f"liftoff deploy {FAILING} (batch 2 of web)"
    assert set(oos["lbs"]) == {LB1, LB2} and all("drain" in s for s in oos["lbs"].values()), oos["lbs"]
    [failed] = gprd["failed_hosts"]
    assert failed["host"] == WEB[1] and "install failed" in failed["reason"]
    assert "exit 100" in failed["reason"]
    assert [h["host"] for h in gprd["chef_stopped"]["hosts"]] == [WEB[1]]
    assert gprd["chef_stopped"]["env_wide"]["run_id"] == RUN
    assert gprd["exceptions"]["out_of_service"] == 1 and gprd["exceptions"]["failed"] == 1
    assert gprd["exceptions"]["healthy"] == gprd["hosts"] - 1
    assert gprd["lock"]["run_id"] == RUN and gprd["lb_disagreements"] == []
    roles = {r["name"]: r for r in gprd["roles"]}
    assert roles["web"]["versions"] == {previous: 2, FAILING: 1}, roles["web"]
    assert [(lb["name"], lb["ok"]) for lb in gprd["load_balancers"]] == [(LB1, True), (LB2, True)]
    # the healthy hosts are counts, never rows
    assert WEB[2] not in json.dumps(gprd)


def test_the_failed_hosts_audit_trail(failed_deploy):
    inventory, store, _, _ = failed_deploy
    audit = fleetview.host_audit(store, WEB[1], inventory=inventory)
    assert (audit["known"], audit["env"], audit["role"]) == (True, "gprd", "web")
    assert audit["total"] == len(audit["records"]) > 0 and {r["run_id"] for r in audit["records"]} == {RUN}
    installs = [r for r in audit["records"] if f"gitlab-ee={FAILING}" in r["command"]]
    assert installs and installs[0]["exit_code"] == 100 and installs[0]["ok"] is False, audit["records"]
    assert installs[0]["duration_s"] >= 0 and installs[0]["output_tail"]
    ats = [r["at"] for r in audit["records"]]
    assert ats == sorted(ats, reverse=True)  # newest first
    # web-03's batch never ran: the begin's commands only
    web3 = fleetview.host_audit(store, WEB[2])["records"]
    assert web3 and all(f"gitlab-ee={FAILING}" not in r["command"] for r in web3)


def test_an_internal_build_shows_nowhere(failed_deploy):
    inventory, store, _, _ = failed_deploy
    v = fleetview.view(inventory, store, lbs=False, internal={FAILING})
    assert FAILING not in json.dumps(v)
    shown = internal_label(FAILING)  # internal-<short hash>
    assert v["progress"][0]["version"] == shown
    assert v["environments"]["gprd"]["out_of_service"][0]["record"]["reason"] == \
        f"liftoff deploy {shown} (batch 2 of web)"
    assert FAILING not in json.dumps(fleetview.host_audit(store, WEB[1], internal={FAILING}))
