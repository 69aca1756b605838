"""``liftoff status``: the snapshot (liftoff.status) over an in-memory store and fake LB reads,
its printing by the CLI with a fake client, and the plugin's FastAPI app behind Airflow's own
token check (a JWT signed as the api-server signs, a wrongly signed one, none)."""

from __future__ import annotations

import argparse
import io
import json
import re
import secrets
import time
from collections.abc import Iterator

import pytest

from liftoff import status
from liftoff.chatops import cli
from liftoff.chatops.api import AirflowClient, ApiError, Credentials, NotFound
from liftoff.errors import HAProxyError
from liftoff.haproxy import ServerState
from liftoff.inventory import parse_inventory
from liftoff.patches import patch_detail
from liftoff.store import Store
from tests.airflow_stack import free_port
from tests.unit.http_fakes import LocalServer, QuietHandler
from tests.unit.test_operations_unit import INVENTORY

V1, V2 = "17.5.0-ee.0", "17.6.0-ee.0"
RUN = "manual__2026-11-29T11:00:00+00:00"  # ':' and '+': printed as it is
LBS = ("fe-01-lb-gprd", "fe-02-lb-gprd")
CANARY = ("web-cny-01-sv-gprd", "web-cny-02-sv-gprd")


@pytest.fixture()
def inventory():
    return parse_inventory(INVENTORY)


@pytest.fixture()
def store() -> Iterator[Store]:
    s = Store("sqlite://")
    yield s
    s.close()


class FakeLBs:
    """Every LB of the unit inventory: each gprd host UP/ready at weight 100 in its role's
    backend, the canary hosts at ``weight`` in ``web`` and 100 in ``canary_web``. ``admin``
    overrides a server's state per LB; ``down`` LBs raise; every read is recorded."""

    def __init__(self, inventory):
        self.inventory = inventory
        self.admin: dict[tuple[str, str], str] = {}
        self.weight = {lb: 5 for lb in LBS}
        self.canary_admin = {lb: "ready" for lb in LBS}
        self.down: set[str] = set()
        self.reads: list[list[str]] = []

    def __call__(self, lbs):
        self.reads.append([lb.name for lb in lbs])
        out: dict[str, list[ServerState] | BaseException] = {}
        for lb in lbs:
            if lb.name in self.down:
                out[lb.name] = HAProxyError(f"load balancer {lb.name} ({lb.admin}) is unreachable: "
                                            "ConnectionRefusedError: refused")
                continue
            states = []
            for role in self.inventory.env("gprd").roles:
                for h in role.hosts:
                    admin = self.admin.get((lb.name, h.name), "ready")
                    up = "DRAIN" if admin == "drain" else "UP"
                    states.append(ServerState(lb.name, role.name, h.name, up, admin, 100, 0))
            for h in CANARY:
                admin = self.canary_admin[lb.name]
                states.append(ServerState(lb.name, "web", h, "UP", admin, self.weight[lb.name], 0))
                states.append(ServerState(lb.name, "canary_web", h, "UP", admin, 100, 0))
            out[lb.name] = states
        return out


@pytest.fixture()
def lbs(inventory) -> FakeLBs:
    return FakeLBs(inventory)


def by_host(entries: list[dict]) -> dict[str, dict]:
    return {e["host"]: e for e in entries}


# -- the snapshot ----------------------------------------------------------------------------------

def test_versions_per_role_from_the_records(inventory, store, lbs):
    store.record_deployment("gprd", V1, "baseline", status="success")
    # written before the record started: an older attempt of the same rollout, not counted
    store.set_host_status(f"gprd:{V2}", "gprd", "web-04-sv-gprd", "done", V2)
    time.sleep(0.01)
    store.record_deployment("gprd", V2, RUN, status="running")
    store.set_host_statuses(f"gprd:{V2}", "gprd", [("web-01-sv-gprd", "done", ""),
                                                   ("web-02-sv-gprd", "failed", "install failed (exit 100)"),
                                                   ("web-03-sv-gprd", "installing", "")], V2)
    snap = status.snapshot(inventory, store, read=lbs)
    gprd = snap["environments"]["gprd"]
    roles = {r["name"]: r for r in gprd["roles"]}
    assert roles["web"]["versions"] == {V1: 9, V2: 1}
    assert (roles["web"]["failed"], roles["web"]["in_progress"], roles["web"]["hosts"]) == (1, 1, 10)
    assert roles["gitaly"]["versions"] == {V1: 2} and roles["sidekiq"]["versions"] == {V1: 3}
    assert gprd["current_version"] == V1
    [failed] = gprd["failed_hosts"]
    assert failed == {"host": "web-02-sv-gprd", "role": "web", "version": V2,
                      "reason": "install failed (exit 100)", "run_id": RUN, "at": failed["at"]}
    # chef: stopped everywhere while the deploy runs, and on the host it failed on
    chef = gprd["chef_stopped"]
    assert chef["env_wide"]["run_id"] == RUN and chef["env_wide"]["kind"] == "deploy"
    assert chef["hosts"] == [{"host": "web-02-sv-gprd", "role": "web", "why": "failed in the last rollout",
                              "run_id": RUN}]
    assert "not the hosts" in chef["source"]
    assert [(d["version"], d["run_id"], d["kind"], d["status"]) for d in gprd["deployments"]] == [
        (V2, RUN, "deploy", "running"), (V1, "baseline", "deploy", "success")]
    # no record yet: unknown
    assert snap["environments"]["gprd-cny"]["roles"][0]["versions"] == {"unknown": 2}
    json.dumps(snap)  # JSON-able as it is


def test_a_successful_record_puts_every_host_on_its_version(inventory, store, lbs):
    store.record_deployment("gprd", V1, "baseline", status="success")
    store.record_deployment("gprd", V2, RUN, status="running")
    store.set_host_status(f"gprd:{V2}", "gprd", "web-01-sv-gprd", "done", V2)
    store.record_deployment("gprd", V2, RUN, status="success")
    gprd = status.snapshot(inventory, store, read=lbs)["environments"]["gprd"]
    assert {r["name"]: r["versions"] for r in gprd["roles"]} == {"gitaly": {V2: 2}, "web": {V2: 10},
                                                                 "sidekiq": {V2: 3}}
    assert gprd["failed_hosts"] == [] and gprd["chef_stopped"]["env_wide"] is None


@pytest.mark.parametrize("ended", ["halted", "failed"])
def test_a_deployment_ended_without_its_cleanup_lists_chef_stopped_everywhere(inventory, store, lbs, ended):
    """Its begin stopped chef on every host and its cleanup never ran (a halted run, a failed one
    not rolled back): liftoff says so until a retry or the next deployment starts chef."""
    store.record_deployment("gprd", V1, "baseline", status="success")
    store.record_deployment("gprd", V2, RUN, status="running")
    store.record_deployment("gprd", V2, RUN, status=ended)
    chef = status.snapshot(inventory, store, read=lbs)["environments"]["gprd"]["chef_stopped"]
    assert chef["env_wide"] == {"run_id": RUN, "version": V2, "kind": "deploy", "status": ended,
                                "since": chef["env_wide"]["since"]}
    store.record_deployment("gprd", V1, "rollback-1", kind="rollback", status="running")
    store.record_deployment("gprd", V1, "rollback-1", kind="rollback", status="success")
    after = status.snapshot(inventory, store, read=lbs)["environments"]["gprd"]["chef_stopped"]
    assert after["env_wide"] is None


def test_lock_drain_records_and_what_the_lbs_show(inventory, store, lbs):
    store.acquire("gprd", RUN, "alice", "deploy_canary 17.6.0-ee.0")
    store.acquire("gstg-old", "manual-bob", "bob", "locked by hand: renamed env")
    store.record_drained("gprd", "web-01-sv-gprd", RUN, "deploy 17.6.0-ee.0")
    store.record_drained("gprd", "web-07-sv-gprd", RUN, "deploy 17.6.0-ee.0")  # back in service already
    for lb in LBS:
        lbs.admin[(lb, "web-01-sv-gprd")] = "drain"
    lbs.admin[("fe-02-lb-gprd", "web-05-sv-gprd")] = "maint"  # by hand, on one LB: no record
    snap = status.snapshot(inventory, store, read=lbs, now=time.time() + 90)
    gprd = snap["environments"]["gprd"]
    lock = gprd["lock"]
    assert (lock["who"], lock["run_id"], lock["reason"], lock["by_hand"]) == (
        "alice", RUN, "deploy_canary 17.6.0-ee.0", False)
    assert 89 <= lock["age_s"] <= 91 and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", lock["since"])
    assert [(x["env"], x["run_id"], x["by_hand"]) for x in snap["other_locks"]] == [("gstg-old", "manual-bob",
                                                                                    True)]
    oos = by_host(gprd["out_of_service"])
    assert set(oos) == {"web-01-sv-gprd", "web-05-sv-gprd", "web-07-sv-gprd"}
    assert oos["web-01-sv-gprd"]["record"]["run_id"] == RUN
    assert oos["web-01-sv-gprd"]["record"]["reason"] == "deploy 17.6.0-ee.0"
    assert oos["web-01-sv-gprd"]["lbs"] == {lb: "web DRAIN/drain" for lb in LBS}
    assert oos["web-05-sv-gprd"]["record"] is None and oos["web-05-sv-gprd"]["note"] == "no record"
    assert oos["web-05-sv-gprd"]["lbs"] == {"fe-02-lb-gprd": "web UP/maint"}
    assert oos["web-07-sv-gprd"]["note"] == "drain record, but in service on every LB"
    assert [r["out_of_service"] for r in gprd["roles"]] == [0, 3, 0]
    assert [(d["server"], d["states"]) for d in gprd["lb_disagreements"]] == [
        ("web-05-sv-gprd", {"fe-01-lb-gprd": "UP/ready/100", "fe-02-lb-gprd": "UP/maint/100"})]
    # chef stays stopped on the drained hosts (restart_chef skips them)
    assert [h["host"] for h in gprd["chef_stopped"]["hosts"]] == ["web-01-sv-gprd", "web-07-sv-gprd"]


def test_one_read_per_lb_and_none_without_lbs(inventory, store, lbs):
    status.snapshot(inventory, store, read=lbs)
    assert lbs.reads == [list(LBS)]  # fe-01 is gprd's and gprd-cny's: read once
    snap = status.snapshot(inventory, store, lbs=False, read=lbs)
    assert len(lbs.reads) == 1
    gprd = snap["environments"]["gprd"]
    assert snap["lbs_read"] is False
    assert [(lb["name"], lb["ok"], lb["error"]) for lb in gprd["load_balancers"]] == [
        (lb, None, "not read") for lb in LBS]
    assert snap["environments"]["gprd-cny"]["canary"]["error"] == "production LBs not read"


def test_an_unreachable_lb_is_an_entry_not_an_exception(inventory, store, lbs):
    lbs.down.add("fe-02-lb-gprd")
    store.record_drained("gprd", "web-01-sv-gprd", RUN, "deploy")
    snap = status.snapshot(inventory, store, read=lbs)
    gprd = snap["environments"]["gprd"]
    entries = {lb["name"]: lb for lb in gprd["load_balancers"]}
    assert entries["fe-01-lb-gprd"]["ok"] is True
    assert entries["fe-02-lb-gprd"]["ok"] is False and "unreachable" in entries["fe-02-lb-gprd"]["error"]
    canary = snap["environments"]["gprd-cny"]["canary"]
    assert canary["complete"] is False and canary["agree"] is True and canary["weight"] == 5
    assert "unreachable" in {lb["name"]: lb for lb in canary["lbs"]}["fe-02-lb-gprd"]["error"]
    assert by_host(gprd["out_of_service"])["web-01-sv-gprd"]["note"] == (
        "drain record; not seen out of service on the LBs that answered")
    lbs.down.add("fe-01-lb-gprd")  # none answers: still a snapshot
    snap = status.snapshot(inventory, store, read=lbs)
    gprd = snap["environments"]["gprd"]
    assert by_host(gprd["out_of_service"])["web-01-sv-gprd"]["note"] == "drain record; no LB answered"
    assert snap["environments"]["gprd-cny"]["canary"]["agree"] is None
    text = "\n".join(cli.fleet_lines(snap))
    assert "fe-01-lb-gprd UNREADABLE, fe-02-lb-gprd UNREADABLE  (no production LB answered)" in text
    assert "  LB fe-02-lb-gprd UNREADABLE: load balancer fe-02-lb-gprd (127.9.2.2:9999) is unreachable" \
        in text


def test_the_real_reader_names_an_unreachable_lb():
    data = {"environments": {"gstg": {
        "url": "http://127.0.0.1:1", "alert_matchers": {"env": "gstg"},
        "load_balancers": [{"name": "fe-01-lb-gstg", "admin": f"127.0.0.1:{free_port()}"}],
        "deploy_node": {"name": "deploy-01-sv-gstg", "address": "127.0.0.1"},
        "roles": [{"name": "web", "stage": "fleet", "batch": "1", "capacity_floor": "0%", "restart": [],
                   "hup": [], "hosts": [{"name": "web-01-sv-gstg", "address": "127.0.0.2"}]}]}}}
    inv = parse_inventory(data)
    s = Store("sqlite://")
    try:
        started = time.monotonic()
        [lb] = status.snapshot(inv, s)["environments"]["gstg"]["load_balancers"]
    finally:
        s.close()
    assert lb["ok"] is False and "fe-01-lb-gstg" in lb["error"] and "unreachable" in lb["error"]
    assert time.monotonic() - started < status.LB_TIMEOUT + 2


def test_canary_weight_on_every_lb_and_whether_they_agree(inventory, store, lbs):
    canary = status.snapshot(inventory, store, read=lbs)["environments"]["gprd-cny"]["canary"]
    assert [(lb["name"], lb["weight"], lb["state"]) for lb in canary["lbs"]] == [
        (lb, 5, "ready") for lb in LBS]
    assert (canary["of"], canary["weight"], canary["agree"], canary["complete"]) == ("gprd", 5, True, True)
    assert status.snapshot(inventory, store, read=lbs)["environments"]["gprd"]["canary"] is None

    lbs.weight["fe-02-lb-gprd"] = 20
    canary = status.snapshot(inventory, store, read=lbs)["environments"]["gprd-cny"]["canary"]
    assert [lb["weight"] for lb in canary["lbs"]] == [5, 20]
    assert canary["agree"] is False and canary["weight"] is None

    lbs.weight["fe-02-lb-gprd"] = 5
    lbs.canary_admin = {lb: "drain" for lb in LBS}
    snap = status.snapshot(inventory, store, read=lbs)
    canary = snap["environments"]["gprd-cny"]["canary"]
    assert (canary["state"], canary["agree"]) == ("drain", True)
    # the canary drained by its weight, not by a deploy: said so next to "no record"
    oos = by_host(snap["environments"]["gprd-cny"]["out_of_service"])
    assert set(oos) == set(CANARY) and oos[CANARY[0]]["note"] == "no record (canary set to drain)"

    lbs.canary_admin["fe-01-lb-gprd"] = "ready"
    canary = status.snapshot(inventory, store, read=lbs)["environments"]["gprd-cny"]["canary"]
    assert canary["agree"] is False and canary["state"] is None


def test_halts_patches_and_no_patch_text(inventory, store, lbs):
    store.set_halt("post-deployment patch fix-7 applied", "fix-7", "alice")
    detail = patch_detail("--- a/app.rb\n+++ b/app.rb\n+SECRET_PATCH_BODY\n", "security fix 7", ["web"])
    store.record_patch("fix-7", "gprd", "patch-run-1", "alice", status="applied",
                       hosts=["web-01-sv-gprd", "web-02-sv-gprd"], detail=detail)
    store.record_patch("fix-6", "gprd", "patch-run-0", "bob", status="reverted")
    snap = status.snapshot(inventory, store, read=lbs)
    [halt] = snap["halts"]
    assert (halt["patch_id"], halt["who"], halt["reason"]) == (
        "fix-7", "alice", "post-deployment patch fix-7 applied")
    [patch] = snap["environments"]["gprd"]["patches"]
    assert {k: patch[k] for k in ("patch_id", "status", "roles", "hosts", "reason", "run_id")} == {
        "patch_id": "fix-7", "status": "applied", "roles": ["web"], "hosts": 2, "reason": "security fix 7",
        "run_id": "patch-run-1"}
    assert "SECRET_PATCH_BODY" not in json.dumps(snap)
    assert snap["environments"]["gprd-cny"]["patches"] == []


def test_redact_hides_a_version_everywhere(inventory, store, lbs):
    store.record_deployment("gprd", V1, "baseline", status="success")
    store.record_deployment("gprd", V2, RUN, status="running")
    failed = ("web-02-sv-gprd", "failed", f"installed {V1}, not {V2}")
    store.set_host_statuses(f"gprd:{V2}", "gprd", [("web-01-sv-gprd", "done", ""), failed], V2)
    store.acquire("gprd", RUN, "alice", f"fast_deploy {V2}: incident")
    store.record_drained("gprd", "web-02-sv-gprd", RUN, f"deploy {V2}")
    snap = status.snapshot(inventory, store, read=lbs, redact=lambda v: "internal" if v == V2 else v)
    text = json.dumps(snap)
    assert V2 not in text and V1 in text
    gprd = snap["environments"]["gprd"]
    web = next(r for r in gprd["roles"] if r["name"] == "web")
    assert web["versions"] == {V1: 9, "internal": 1}
    assert gprd["failed_hosts"][0]["reason"] == f"installed {V1}, not internal"
    assert gprd["lock"]["reason"] == "fast_deploy internal: incident"


# -- pressure: commits not yet deployed ------------------------------------------------------------

class FakePressure:
    """The pressure reader: records what it was asked, answers ``answers`` (or raises / waits)."""

    def __init__(self, answers=None, error: Exception | None = None, wait: float = 0.0):
        self.asked: list[dict] = []
        self.answers = answers or {}
        self.error, self.wait = error, wait

    def __call__(self, inventory, running):
        self.asked.append(dict(running))
        if self.wait:
            time.sleep(self.wait)  # a slow GitLab, not a synchronisation
        if self.error:
            raise self.error
        return self.answers


def test_pressure_per_environment_from_the_running_build(inventory, store, lbs):
    from liftoff.changes import ChangeRange

    store.record_deployment("gprd", V1, "baseline", status="success")
    newest = "17.7.0+rnightly.9.abcdef12-0"
    reader = FakePressure({
        "gprd": ChangeRange(V1, newest, "1234567", "abcdef12", count=42, known=True, web_url="https://ops/c"),
        "gprd-cny": ChangeRange(None, None, reason="no successful deploy of gprd-cny recorded")})
    snap = status.snapshot(inventory, store, read=lbs, read_pressure=reader)
    assert reader.asked == [{"gprd-cny": None, "gprd": V1}]
    envs = snap["environments"]
    assert envs["gprd"]["pressure"] == {"commits": 42, "newest_build": newest, "web_url": "https://ops/c",
                                        "note": None}
    assert envs["gprd-cny"]["pressure"]["commits"] is None
    assert envs["gprd-cny"]["pressure"]["note"] == "no successful deploy of gprd-cny recorded"
    reader.answers = {}
    assert status.snapshot(inventory, store, read=lbs, read_pressure=reader)["environments"]["gprd"][
        "pressure"]["note"] == "not read"
    # records only: not read unless asked
    assert "pressure" not in status.snapshot(inventory, store, lbs=False)["environments"]["gprd"]
    status.snapshot(inventory, store, lbs=False, pressure=True, read_pressure=reader)
    assert len(reader.asked) == 3


def test_pressure_errors_and_slowness_become_a_note(inventory, store, lbs, monkeypatch):
    snap = status.snapshot(inventory, store, read=lbs, read_pressure=FakePressure(error=OSError("refused")))
    assert snap["environments"]["gprd"]["pressure"]["note"] == "not read: OSError: refused"
    monkeypatch.setattr(status, "PRESSURE_TIMEOUT", 0.2)
    started = time.monotonic()
    snap = status.snapshot(inventory, store, read=lbs, read_pressure=FakePressure(wait=3.0))
    assert time.monotonic() - started < 2.0
    assert snap["environments"]["gprd"]["pressure"]["note"] == "no answer within 0.2 s"


def test_pressure_hides_an_internal_newest_build(inventory, store, lbs):
    from liftoff.changes import ChangeRange

    store.record_deployment("gprd", V1, "baseline", status="success")
    unknown = ChangeRange(V1, V2, count=0, known=False, reason=f"no known commit for {V2}")
    reader = FakePressure({"gprd": unknown})
    snap = status.snapshot(inventory, store, read=lbs, redact=lambda v: "internal" if v == V2 else v,
                           read_pressure=reader)
    assert V2 not in json.dumps(snap)
    assert snap["environments"]["gprd"]["pressure"]["newest_build"] == "internal"
    assert snap["environments"]["gprd"]["pressure"]["note"] == "no known commit for internal"


# -- the CLI ----------------------------------------------------------------------------------------

class FakeClient:
    """The calls ``status`` makes: the fleet snapshot (or an error) and one DAG with one run."""

    def __init__(self, fleet: dict | Exception):
        self.fleet = fleet
        self.calls: list[tuple] = []

    def fleet_status(self, lbs: bool = True) -> dict:
        self.calls.append(("fleet_status", lbs))
        if isinstance(self.fleet, Exception):
            raise self.fleet
        return self.fleet

    def dag(self, dag_id):
        return {"dag_id": dag_id, "is_paused": False}

    def dag_runs(self, dag_id, limit=5):
        return [{"dag_run_id": RUN, "state": "success", "conf": {"version": V2}, "run_type": "manual",
                 "start_date": "2026-11-29T11:00:01Z", "end_date": "2026-11-29T11:05:01Z"}]

    def task_instances(self, dag_id, run_id):
        return [{"task_id": "stage_1_staging_migrations.precheck", "state": "success", "map_index": -1}]

    def xcom(self, dag_id, run_id, task_id, key="return_value"):
        raise NotFound("no xcom", 404)

    def ui_url(self, dag_id, run_id):
        return f"http://airflow/dags/{dag_id}/runs/{run_id}"

    def pending_approvals(self):
        return []


def run_status(client, *argv: str) -> tuple[int, str]:
    args = cli.build_parser().parse_args(["status", *argv])
    out = io.StringIO()
    code = cli.cmd_status(client, cli.Output(bool(getattr(args, "json", False)), out, io.StringIO()), args)
    return code, out.getvalue()


@pytest.fixture()
def busy_snapshot(inventory, store, lbs) -> dict:
    store.record_deployment("gprd", V1, "baseline", status="success")
    store.record_deployment("gprd", V2, RUN, status="halted")
    store.set_host_status(f"gprd:{V2}", "gprd", "web-02-sv-gprd", "failed", V2, "health check failed")
    store.acquire("gprd", "manual-alice", "alice", "locked by hand: incident 42")
    store.record_drained("gprd", "web-02-sv-gprd", RUN, "deploy 17.6.0-ee.0")
    for lb in LBS:
        lbs.admin[(lb, "web-02-sv-gprd")] = "drain"
    lbs.admin[("fe-02-lb-gprd", "web-05-sv-gprd")] = "drain"
    lbs.weight["fe-02-lb-gprd"] = 20
    store.set_halt("post-deployment patch fix-7 applied", "fix-7", "alice")
    store.record_patch("fix-7", "gprd", "patch-run-1", "alice", status="applied", hosts=["web-01-sv-gprd"],
                       detail=patch_detail("+x\n", "security fix 7", ["web"]))
    return json.loads(json.dumps(status.snapshot(inventory, store, read=lbs)))


def test_cli_prints_the_state_per_environment_and_the_runs(busy_snapshot):
    client = FakeClient(busy_snapshot)
    code, out = run_status(client)
    assert code == 0 and client.calls == [("fleet_status", True)]
    lines = out.splitlines()
    assert re.search(r"^gprd: 17\.5\.0-ee\.0  \(15 hosts\)$", out, re.M)
    assert re.search(r"^  web +10x 17\.5\.0-ee\.0  \(2 out of service, 1 failed\)$", out, re.M)
    assert re.search(r"^  lock: locked by alice \(by hand\)  since \S+ \S+ \(\d+s ago\)  run manual-alice  "
                     r"reason: locked by hand: incident 42$", out, re.M)
    drained = next(ln for ln in lines if ln.startswith("    web-02-sv-gprd"))
    assert f"drain record  run {RUN}  since" in drained and "reason: deploy 17.6.0-ee.0" in drained
    assert "fe-01-lb-gprd: web DRAIN/drain" in drained
    assert re.search(r"^    web-05-sv-gprd  NO RECORD  \[fe-02-lb-gprd: web DRAIN/drain\]$", out, re.M)
    assert re.search(rf"^  failed: web-02-sv-gprd  health check failed  run {re.escape(RUN)}$", out, re.M)
    assert "  chef stopped: web-02-sv-gprd (drain record)" in out
    assert "canary weight on gprd's LBs: fe-01-lb-gprd 5, fe-02-lb-gprd 20  (LBs DISAGREE)" in out
    assert re.search(r"^  LBs disagree on web/web-05-sv-gprd: fe-01-lb-gprd UP/ready/100, "
                     r"fe-02-lb-gprd DRAIN/drain/100$", out, re.M)
    assert re.search(r"^  patch fix-7: applied on web \(1 hosts\) by alice  run patch-run-1  "
                     r"reason: security fix 7$", out, re.M)
    assert re.search(r"^HALT \(patch fix-7\) by alice  since .*: post-deployment patch fix-7 applied$",
                     out, re.M)
    assert re.search(rf"deploy +halted +{re.escape(V2)}  run {re.escape(RUN)}$", out, re.M)
    # every run id stands alone, pasteable: whitespace (or the line's end) on both sides
    for m in re.finditer(re.escape(RUN), out):
        assert out[m.start() - 1] == " " and out[m.end():m.end() + 1] in ("", " ", "\n")
    # the runs part is still there, after the state
    assert out.index("deploy_canary: last 1 run(s)") > out.index("HALT (patch fix-7)")
    assert f"{RUN}  success  {V2}" in out


def test_cli_json_holds_the_snapshot_and_the_runs(busy_snapshot):
    code, out = run_status(FakeClient(busy_snapshot), "--json", "--no-lbs")
    data = json.loads(out)
    assert code == 0 and data["fleet"] == busy_snapshot
    assert data["dags"]["deploy_canary"]["runs"][0]["dag_run_id"] == RUN


def test_cli_no_lbs_asks_for_records_only(busy_snapshot):
    client = FakeClient(busy_snapshot)
    run_status(client, "--no-lbs")
    assert client.calls == [("fleet_status", False)]


def test_cli_without_the_plugin_says_so_in_one_line_and_prints_the_runs():
    client = FakeClient(NotFound("http://airflow does not serve /liftoff/api/status (HTTP 404): is liftoff's "
                                 "Airflow plugin installed in the api-server?", 404))
    code, out = run_status(client)
    assert code == 0
    first, *rest = out.splitlines()
    assert first.startswith("liftoff state: not available: ") and "plugin installed" in first
    assert not any("not available" in ln for ln in rest)
    assert f"{RUN}  success  {V2}" in out
    code, out = run_status(FakeClient(ApiError("GET /liftoff/api/status: HTTP 503: no store", 503)), "--json")
    assert json.loads(out)["fleet"] == {"error": "GET /liftoff/api/status: HTTP 503: no store", "status": 503}


def test_cli_prints_no_control_characters():
    snap = {"generated_at": "2026-12-02T16:40:00Z", "lbs_read": True, "halts": [], "other_locks": [],
            "environments": {"gprd": {"hosts": 1, "roles": [], "out_of_service": [], "lock": {
                "who": "eve", "run_id": "r1", "since": "2026-12-02T16:40:00Z", "age_s": 5,
                "reason": "ok\x1b[2Jcleared\nnext line"}}}}
    text = "\n".join(cli.fleet_lines(snap))
    assert "\x1b" not in text and "ok?[2Jcleared?next line" in text


class _Html(QuietHandler):
    """An api-server without liftoff's plugin: its UI answers every unknown path with HTML."""

    def do_GET(self):  # noqa: N802
        if self.path.startswith("/liftoff/api/status"):
            return self.reply(200, b"<!doctype html><html></html>", "text/html")
        return self.reply(404, {"detail": "Not Found"})


class _Missing(QuietHandler):
    def do_GET(self):  # noqa: N802
        return self.reply(404, {"detail": "Not Found"})


@pytest.mark.parametrize("handler", [_Html, _Missing])
def test_client_calls_the_plugin_with_the_token_and_knows_when_it_is_missing(handler):
    server = LocalServer(handler)
    try:
        client = AirflowClient(Credentials(server.url, token="tok"))
        with pytest.raises(NotFound, match="liftoff's Airflow plugin installed"):
            client.fleet_status()
    finally:
        server.close()


def test_client_sends_its_token_to_the_plugin():
    seen: list[tuple[str, str | None]] = []

    class Handler(QuietHandler):
        def do_GET(self):  # noqa: N802
            seen.append((self.path, self.headers.get("Authorization")))
            self.reply(200, {"environments": {}, "halts": []})

    server = LocalServer(Handler)
    try:
        client = AirflowClient(Credentials(server.url, token="tok"))
        assert client.fleet_status(lbs=False) == {"environments": {}, "halts": []}
    finally:
        server.close()
    assert seen == [("/liftoff/api/status?lbs=false", "Bearer tok")]


# -- the plugin's FastAPI app -------------------------------------------------------------------------

JWT_SECRET = secrets.token_urlsafe(64)


@pytest.fixture()
def api(monkeypatch, inventory, store, lbs):
    """The fleet app as the api-server mounts it, with Airflow's auth manager (the configured
    one: SimpleAuthManager) and a known JWT secret."""
    from airflow import settings
    from airflow.api_fastapi import app as api_app
    from airflow.models.revoked_token import RevokedToken
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from liftoff_airflow import fleet_api
    from liftoff_plugin import LiftoffPlugin

    monkeypatch.setenv("AIRFLOW__API_AUTH__JWT_SECRET", JWT_SECRET)
    monkeypatch.setattr(api_app._AuthManagerState, "instance", None)
    api_app.create_auth_manager()
    RevokedToken.__table__.create(settings.engine, checkfirst=True)  # the test DB is not migrated
    monkeypatch.setattr(status, "read_lbs", lbs)
    fleet_api.app.dependency_overrides[fleet_api.sources] = lambda: (inventory, store)
    fleet_api.app.dependency_overrides[fleet_api.internal_versions] = lambda: set()
    # mounted by Airflow's own init_plugins from the plugin's fastapi_apps
    monkeypatch.setattr("airflow.plugins_manager.get_fastapi_plugins",
                        lambda: (LiftoffPlugin.fastapi_apps, []))
    root = FastAPI()
    api_app.init_plugins(root)
    try:
        with TestClient(root) as client:
            yield client
    finally:
        fleet_api.app.dependency_overrides.clear()


def token(secret: str = JWT_SECRET, role: str | None = "viewer", valid_for: float = 300) -> str:
    """A JWT as the api-server signs it (``[api_auth] jwt_secret``, Airflow's audience)."""
    from airflow.api_fastapi.auth.tokens import JWTGenerator

    return JWTGenerator(secret_key=secret, valid_for=valid_for, audience="apache-airflow").generate(
        {"sub": "rm", "role": role})


def test_plugin_declares_the_app_under_liftoff():
    from liftoff_plugin import LiftoffPlugin

    [entry] = LiftoffPlugin.fastapi_apps
    assert set(entry) == {"app", "url_prefix", "name"}
    assert entry["url_prefix"] == "/liftoff" and entry["name"] == "liftoff"
    assert LiftoffPlugin.fastapi_root_middlewares[0]["name"] == "liftoff: refused Params in one line"


def test_api_refuses_no_token_and_a_wrongly_signed_one(api):
    assert api.get("/liftoff/api/status").status_code == 401
    wrong = token(secret=secrets.token_urlsafe(64))
    resp = api.get("/liftoff/api/status", headers={"Authorization": f"Bearer {wrong}"})
    assert resp.status_code == 403 and "environments" not in resp.text
    assert api.get("/liftoff/api/status", headers={"Authorization": "Bearer not.a.jwt"}).status_code == 403
    api.cookies.set("_token", wrong)
    assert api.get("/liftoff/api/status").status_code == 403
    api.cookies.clear()
    expired = token(valid_for=-120)
    assert api.get("/liftoff/api/status", headers={"Authorization": f"Bearer {expired}"}).status_code == 401


def test_api_refuses_a_user_without_a_role(api):
    resp = api.get("/liftoff/api/status", headers={"Authorization": f"Bearer {token(role=None)}"})
    assert resp.status_code == 403


def test_api_serves_the_snapshot_to_a_viewer(api, store, lbs):
    store.acquire("gprd", RUN, "alice", "deploy 17.6.0-ee.0")
    store.record_drained("gprd", "web-01-sv-gprd", RUN, "<script>alert(1)</script>")  # drain reasons are free
    resp = api.get("/liftoff/api/status", headers={"Authorization": f"Bearer {token()}"})
    assert resp.status_code == 200 and resp.headers["content-type"] == "application/json"
    assert resp.headers["cache-control"] == "no-store"
    data = resp.json()
    assert data["lbs_read"] is True and lbs.reads == [list(LBS)]
    assert data["environments"]["gprd"]["lock"]["run_id"] == RUN
    [drained] = data["environments"]["gprd"]["out_of_service"]
    assert drained["record"]["reason"] == "<script>alert(1)</script>"  # as it is: the page escapes
    api.cookies.set("_token", token())  # the UI's session cookie
    resp = api.get("/liftoff/api/status?lbs=false")
    assert resp.status_code == 200 and resp.json()["lbs_read"] is False and len(lbs.reads) == 1


def test_api_shows_an_internal_build_as_internal_and_a_short_hash(api, store):
    from liftoff.status import internal_label
    from liftoff_airflow import fleet_api

    secret = "17.9.3+rnightly.77.abcdef7-0"
    store.record_deployment("gprd", secret, RUN, status="success")
    store.acquire("gprd", RUN, "alice", f"fast_deploy begin {secret}")
    fleet_api.app.dependency_overrides[fleet_api.internal_versions] = lambda: {secret}
    resp = api.get("/liftoff/api/status?lbs=false", headers={"Authorization": f"Bearer {token()}"})
    assert resp.status_code == 200 and secret not in resp.text and "abcdef7" not in resp.text
    gprd = resp.json()["environments"]["gprd"]
    shown = internal_label(secret)
    assert gprd["current_version"] == shown and shown in gprd["lock"]["reason"]


def test_api_says_why_when_liftoff_state_is_not_readable(monkeypatch, api):
    from liftoff_airflow import fleet_api

    fleet_api.app.dependency_overrides.clear()
    monkeypatch.setenv("LIFTOFF_INVENTORY", "/nonexistent/inventory.yml")
    resp = api.get("/liftoff/api/status", headers={"Authorization": f"Bearer {token()}"})
    assert resp.status_code == 503 and "cannot read inventory" in resp.json()["detail"]
    # and the token is checked before anything is read
    assert api.get("/liftoff/api/status").status_code == 401


def test_status_args_are_the_documented_ones():
    args = cli.build_parser().parse_args(["status", "--no-lbs", "--limit", "2"])
    assert isinstance(args, argparse.Namespace) and args.no_lbs and args.limit == 2


# -- the canary judge's last judgements ----------------------------------------------------------

def _judged(store, run_id: str, stage: str, weight, verdict: str, score, decision: str) -> None:
    data = {"verdict": verdict, "score": score, "reason": f"{verdict}: error_ratio_web high",
            "requests": {"baseline": 900, "canary": 300}, "thresholds": {"pass": 90.0, "marginal": 75.0},
            "metrics": {"error_ratio_web": {"classification": "high", "p_value": 0.001, "baseline": 0.0,
                                            "canary": 0.02}}}
    store.record_analysis(run_id, "gprd-cny", stage, weight, verdict, score, decision, json.dumps(data))


def test_status_and_the_cli_show_the_canary_judges_last_judgements(inventory, store, lbs):
    _judged(store, "run-a", "stage_6", None, "pass", 100.0, "next")
    for weight in (5, 10, 25):
        _judged(store, "run-b", "stage_7", weight, "pass" if weight < 25 else "fail", 40.0, "abort")
    snap = json.loads(json.dumps(status.snapshot(inventory, store, read=lbs)))
    judged = snap["canary_analyses"]["gprd-cny"]
    assert [(a["stage"], a["weight"], a["verdict"]) for a in judged] == [
        ("stage_7", 5, "pass"), ("stage_7", 10, "pass"), ("stage_7", 25, "fail")]
    assert set(snap["canary_analyses"]) == {"gprd-cny"} and "metrics" not in judged[0]
    code, out = run_status(FakeClient(snap))
    assert code == 0
    assert re.search(r"^canary judge gprd-cny: fail \(score 40\) in stage_7 at weight 25 -> abort, "
                     r"run run-b at \S+ \S+ \(\d+s ago\): fail: error_ratio_web high$", out, re.M)


def test_liftoff_analysis_prints_each_judgement_of_a_run_with_its_table(store):
    _judged(store, "run-b", "stage_7", 5, "fail", 40.0, "abort")

    class Client:
        def run_analyses(self, run_id):
            return [status.analysis_record(r) for r in store.analyses(run_id)]

    args = cli.build_parser().parse_args(["analysis", "run-b"])
    out = io.StringIO()
    assert cli.cmd_analysis(Client(), cli.Output(False, out, io.StringIO()), args) == 0
    lines = out.getvalue().splitlines()
    assert re.fullmatch(r"\S+ +gprd-cny stage_7 at canary weight 5: fail -> abort", lines[0])
    assert re.fullmatch(r"  error_ratio_web +high +0\.0010 +0 +0\.02", lines[2])
    assert lines[-1] == ("  verdict: fail (score 40; pass >= 90, marginal >= 75): fail: error_ratio_web high")
    out = io.StringIO()
    args = cli.build_parser().parse_args(["analysis", "run-none", "--json"])
    assert cli.cmd_analysis(Client(), cli.Output(True, out, io.StringIO()), args) == 0
    assert json.loads(out.getvalue()) == {"run_id": "run-none", "analyses": []}
