"""``liftoff status`` against the lab's real HAProxy LBs: a lock taken by hand and a drained host
with its drain record show up; a host drained on one LB by hand shows "no record" (and the LBs
disagree on it); the canary weight is read on every production LB, with whether they agree; an
LB that does not answer is an entry with its error. The test puts the LBs back as they were.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from liftoff import locks, status
from liftoff.chatops.cli import fleet_lines
from liftoff.haproxy import HAProxy
from liftoff.inventory import load_inventory, parse_inventory
from liftoff.runs import Run
from liftoff.store import Store
from tests.airflow_stack import free_port

pytestmark = pytest.mark.lab

RUN = "deploy_canary__status_lab_2026-12-02T16:40:00+00:00"  # ':' and '+' kept as they are
DRAINED = "web-01-sv-gprd"  # drained by a "deploy", with a record
BY_HAND = "web-02-sv-gprd"  # drained by hand on one LB, no record
CANARY = ("web-cny-01-sv-gprd", "web-cny-02-sv-gprd", "web-cny-03-sv-gprd")  # the default lab's three
LB1, LB2 = "fe-01-lb-gprd", "fe-02-lb-gprd"


@pytest.fixture
def store(tmp_path):
    s = Store(f"sqlite:///{tmp_path / 'state.db'}")
    yield s
    s.close()


def canary_servers(inventory, lb: str) -> dict[tuple[str, str], int]:
    """``{(backend, server): weight}`` of the canary servers in gprd's backends on one LB."""
    canary = {h.name for h in inventory.env("gprd-cny").hosts()}
    main = {r.name for r in inventory.env("gprd").roles}
    snap = HAProxy.for_env(inventory.env("gprd")).snapshot()
    return {(s.backend, s.server): s.weight for s in snap[lb] if s.server in canary and s.backend in main}


def set_canary_weight(inventory, lb: str, weight: int) -> None:
    """What ``canary weight N`` does, on one LB only: every canary server in gprd's backends."""
    ref = next(x for x in inventory.env("gprd").load_balancers if x.name == lb)
    HAProxy([ref]).set_weight([h.name for h in inventory.env("gprd-cny").hosts()], weight,
                              backends={r.name for r in inventory.env("gprd").roles})


def test_status_shows_locks_drains_and_canary_weights(lab, lab_env, store):
    inventory = load_inventory()
    gprd = HAProxy.for_env(inventory.env("gprd"))
    before = {lb: canary_servers(inventory, lb) for lb in (LB1, LB2)}
    assert {(b, s) for b, s in before[LB1]} >= {("web", h) for h in CANARY}, before

    run = Run(run_id="status-lab", who="alice", inventory=inventory, _store=store)
    taken = locks.lock_env(run, "gstg", "incident 4242")
    store.record_drained("gprd", DRAINED, RUN, "deploy 17.8.1-ee.0")
    try:
        gprd.drain([DRAINED])
        assert lab.haproxy(LB2, f"set server web/{BY_HAND} state drain").strip() == ""
        set_canary_weight(inventory, LB1, 7)
        set_canary_weight(inventory, LB2, 9)

        snap = status.snapshot(inventory, store)

        # the lock taken by hand, its run id as it is
        lock = snap["environments"]["gstg"]["lock"]
        assert (lock["who"], lock["run_id"], lock["by_hand"]) == ("alice", taken["run_id"], True)
        assert lock["run_id"] == "manual-alice" and lock["reason"] == "locked by hand: incident 4242"
        env = snap["environments"]["gprd"]
        assert env["lock"] is None
        assert [(lb["name"], lb["ok"]) for lb in env["load_balancers"]] == [(LB1, True), (LB2, True)]

        # the drained host with its record, on both LBs; the one drained by hand: no record
        oos = {h["host"]: h for h in env["out_of_service"]}
        assert set(oos) == {DRAINED, BY_HAND}, oos
        assert oos[DRAINED]["record"]["run_id"] == RUN
        assert oos[DRAINED]["record"]["reason"] == "deploy 17.8.1-ee.0"
        assert set(oos[DRAINED]["lbs"]) == {LB1, LB2} and "drain" in oos[DRAINED]["lbs"][LB1]
        assert oos[BY_HAND]["record"] is None and oos[BY_HAND]["note"] == "no record"
        assert set(oos[BY_HAND]["lbs"]) == {LB2}
        assert any(d["server"] == BY_HAND and d["backend"] == "web" for d in env["lb_disagreements"])
        web = next(r for r in env["roles"] if r["name"] == "web")
        assert web["out_of_service"] == 2
        assert [h["host"] for h in env["chef_stopped"]["hosts"]] == [DRAINED]

        # canary weight on every production LB: they disagree
        canary = snap["environments"]["gprd-cny"]["canary"]
        assert [(lb["name"], lb["weight"], lb["state"]) for lb in canary["lbs"]] == [(LB1, 7, "ready"),
                                                                                   (LB2, 9, "ready")]
        assert canary["agree"] is False and canary["complete"] is True and canary["weight"] is None
        assert snap["environments"]["gprd-cny"]["out_of_service"] == []

        text = "\n".join(fleet_lines(snap))
        assert f"run {RUN}  since" in text and f"    {BY_HAND}  NO RECORD  [{LB2}: web " in text
        assert "lock: locked by alice (by hand)" in text and "run manual-alice  reason:" in text
        assert f"canary weight on gprd's LBs: {LB1} 7, {LB2} 9  (LBs DISAGREE)" in text

        assert {(d["server"], d["states"][LB1], d["states"][LB2]) for d in canary["disagreements"]
                if d["backend"] == "web"} == {(h, "UP/ready/7", "UP/ready/9") for h in CANARY}

        # the same weight everywhere: they agree
        set_canary_weight(inventory, LB2, 7)
        snap = status.snapshot(inventory, store)
        canary = snap["environments"]["gprd-cny"]["canary"]
        assert (canary["weight"], canary["state"], canary["agree"]) == (7, "ready", True)
        assert canary["disagreements"] == []
        assert f"{LB1} 7, {LB2} 7  (LBs agree)" in "\n".join(fleet_lines(snap))

        # one backend changed by hand on one LB: mixed there, and the LBs disagree on it
        assert lab.haproxy(LB1, f"set weight web/{CANARY[0]} 3").strip() == ""
        canary = status.snapshot(inventory, store)["environments"]["gprd-cny"]["canary"]
        lb1 = canary["lbs"][0]
        assert (lb1["weight"], lb1["weights"]) == (7, [3, 7]) and canary["weight"] is None
        assert canary["agree"] is False
        assert [(d["backend"], d["server"]) for d in canary["disagreements"]] == [("web", CANARY[0])]

        # the records alone, without reading an LB
        quick = status.snapshot(inventory, store, lbs=False)["environments"]["gprd"]
        assert [h["host"] for h in quick["out_of_service"]] == [DRAINED]
    finally:
        gprd.ready([DRAINED, BY_HAND])
        for lb, servers in before.items():
            for (backend, server), weight in servers.items():
                lab.haproxy(lb, f"set weight {backend}/{server} {weight}")
        store.clear_drained("gprd", DRAINED)
    assert {lb: canary_servers(inventory, lb) for lb in (LB1, LB2)} == before


def test_an_lb_that_does_not_answer_is_an_entry(lab, lab_env, store):
    data = yaml.safe_load(Path(lab_env["LIFTOFF_INVENTORY"]).read_text())
    gone = {"name": "fe-09-lb-gstg", "admin": f"127.0.0.1:{free_port()}"}
    data["environments"]["gstg"]["load_balancers"].append(gone)
    inventory = parse_inventory(data)
    snap = status.snapshot(inventory, store)
    entries = {lb["name"]: lb for lb in snap["environments"]["gstg"]["load_balancers"]}
    assert entries["fe-01-lb-gstg"]["ok"] is True and entries["fe-01-lb-gstg"]["servers"] > 0
    assert entries["fe-09-lb-gstg"]["ok"] is False
    error = entries["fe-09-lb-gstg"]["error"]
    assert "fe-09-lb-gstg" in error and "unreachable" in error
    # the other environments' LBs were read all the same
    assert all(lb["ok"] for lb in snap["environments"]["gprd"]["load_balancers"])
    assert "fe-09-lb-gstg UNREADABLE" in "\n".join(fleet_lines(snap))
