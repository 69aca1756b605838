"""The fleet view (liftoff.fleetview) over an in-memory store and fake LB reads: the weekly
change lock, a running deploy's progress and its time left, counts (not rows) at 1,000 hosts,
internal versions hidden, a host's audit trail; the readers of Airflow's metadata (runs with
their stages, pending approvals, internal builds) on a scratch DB; and the plugin's routes
(``/liftoff/api/fleet``, ``/liftoff/api/hosts/{host}/audit``, ``/liftoff/fleet``,
``/liftoff/fleet/hosts/{host}``) behind Airflow's token check."""

from __future__ import annotations

import json
import re
import secrets
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from urllib.parse import parse_qs, urlsplit

import pytest

from liftoff import fleetview, status
from liftoff.inventory import parse_inventory
from liftoff.status import internal_label
from liftoff.store import Deployment, HostProgress, Store
from tests.unit.test_operations_unit import INVENTORY
from tests.unit.test_status import LBS, FakeLBs

V1, V2 = "17.5.0-ee.0", "17.6.0-ee.0"
SECRET_BUILD = "17.6.1-ee.0"  # an internal build
RUN = "deploy_production__2026-12-01T10:00:00+00:00"
T0 = 1_800_000_000.0  # a Friday, 08:00 UTC


@pytest.fixture()
def inventory():
    return parse_inventory(INVENTORY)


@pytest.fixture()
def store() -> Iterator[Store]:
    s = Store("sqlite://")
    yield s
    s.close()


@pytest.fixture()
def lbs(inventory) -> FakeLBs:
    return FakeLBs(inventory)


def row(host: str, status_: str, at: float, detail: str = "") -> HostProgress:
    return HostProgress(f"gprd:{V2}", "gprd", host, status_, V2, detail, datetime.fromtimestamp(at, tz=UTC))


def record(started: float, version: str = V2) -> Deployment:
    at = datetime.fromtimestamp(started, tz=UTC)
    return Deployment(1, "gprd", version, RUN, "deploy", "running", at, at)


# -- progress and the time left ---------------------------------------------------------------------------

def test_progress_batches_and_time_left_from_the_batch_ends(inventory):
    """gitaly (2 hosts, batches of 1) done in 100 s + 60 s; web (10 hosts, batches of 1) has
    finished 3 batches 40 s apart, its 4th has run 10 s; sidekiq (3 hosts, one batch) waits."""
    env = inventory.env("gprd")
    rows = {"gitaly-01-sv-gprd": row("gitaly-01-sv-gprd", "done", T0 + 100),
            "gitaly-02-sv-gprd": row("gitaly-02-sv-gprd", "done", T0 + 160)}
    for i, at in enumerate((T0 + 200, T0 + 240, T0 + 280), 1):
        rows[f"web-0{i}-sv-gprd"] = row(f"web-0{i}-sv-gprd", "done", at)
    rows["web-04-sv-gprd"] = row("web-04-sv-gprd", "installing", T0 + 281, "batch 4")
    p = fleetview.rollout_progress(env, record(T0), rows, now=T0 + 290)
    roles = {r["role"]: r for r in p["roles"]}
    gitaly, web, sidekiq = roles["gitaly"], roles["web"], roles["sidekiq"]
    assert (gitaly["state"], gitaly["batch"], gitaly["batches"], gitaly["eta_s"]) == ("done", 2, 2, 0)
    assert (web["state"], web["batch"], web["batches"], web["completed_batches"]) == ("running", 4, 10, 3)
    assert (web["done"], web["failed"], web["left"], web["in_progress"], web["batch_s"]) == (3, 0, 7, 1, 40.0)
    # web: 7 batches of 40 s, less the 10 s the 4th has run
    assert web["eta_s"] == 7 * 40 - 10
    # sidekiq waits: one batch at the rollout's median (gitaly 60, web 40, 40 -> 40)
    assert (sidekiq["state"], sidekiq["batch"], sidekiq["eta_s"]) == ("waiting", 0, 40)
    assert p["batch_s"] == 40.0
    # stages in order, the roles of one stage together: gitaly 0 + max(web 270, sidekiq 40)
    assert p["eta_s"] == 270 and p["eta_at"] == fleetview._iso(T0 + 290 + 270)
    assert p["hosts"] == {"hosts": 15, "done": 5, "failed": 0, "left": 10, "in_progress": 1}
    assert p["stopped"] is False
    assert not any(k.startswith("_") for r in p["roles"] for k in r)


def test_progress_before_two_batches_ended_uses_a_first_batch(inventory):
    env = inventory.env("gprd")
    rows = {"gitaly-01-sv-gprd": row("gitaly-01-sv-gprd", "done", T0 + 30),
            "gitaly-02-sv-gprd": row("gitaly-02-sv-gprd", "draining", T0 + 31, "batch 2")}
    p = fleetview.rollout_progress(env, record(T0), rows, now=T0 + 35)
    gitaly = {r["role"]: r for r in p["roles"]}["gitaly"]
    assert (gitaly["batch"], gitaly["eta_s"]) == (2, 30 - 5)
    assert p["batch_s"] == 30.0 and p["eta_s"] == 25 + 10 * 30  # then web's 10 batches (sidekiq: 1)
    # nothing ended yet: no estimate
    nothing = fleetview.rollout_progress(env, record(T0), {}, now=T0 + 5)
    assert nothing["eta_s"] is None and nothing["hosts"]["left"] == 15


def test_a_failed_batch_stops_the_role(inventory):
    env = inventory.env("gprd")
    rows = {"web-01-sv-gprd": row("web-01-sv-gprd", "done", T0 + 50),
            "web-02-sv-gprd": row("web-02-sv-gprd", "failed", T0 + 90, "install failed (exit 100)")}
    p = fleetview.rollout_progress(env, record(T0), rows, T0 + 95)
    web = {r["role"]: r for r in p["roles"]}["web"]
    assert (web["state"], web["failed"], web["left"], web["eta_s"]) == ("failed", 1, 8, 0)
    assert p["stopped"] is True and p["eta_s"] is None and p["eta_at"] is None


def test_view_of_a_running_deploy_from_the_store(inventory, store, lbs):
    store.record_deployment("gprd", V1, "baseline", status="success")
    store.set_host_statuses(f"gprd:{V2}", "gprd", [("web-09-sv-gprd", "done", "")], V2)  # an older attempt
    time.sleep(0.01)
    store.record_deployment("gprd", V2, RUN)
    store.set_host_statuses(f"gprd:{V2}", "gprd", [("gitaly-01-sv-gprd", "done", ""),
                                                   ("gitaly-02-sv-gprd", "done", "")], V2)
    store.set_host_statuses(f"gprd:{V2}", "gprd", [("web-01-sv-gprd", "draining", "batch 1")], V2)
    v = fleetview.view(inventory, store, read=lbs, pressure=False)
    [p] = v["progress"]
    assert (p["env"], p["version"], p["run_id"], p["kind"]) == ("gprd", V2, RUN, "deploy")
    web = {r["role"]: r for r in p["roles"]}["web"]
    assert (web["batch"], web["batches"], web["done"], web["in_progress"]) == (1, 10, 0, 1)  # not web-09
    assert v["deploying"] is True
    store.record_deployment("gprd", V2, RUN, status="success")
    v = fleetview.view(inventory, store, read=lbs, pressure=False)
    assert v["progress"] == [] and v["deploying"] is False


# -- the rest of the view ------------------------------------------------------------------------------

def test_weekly_change_lock(inventory):
    data = json.loads(json.dumps(INVENTORY))
    data["environments"]["gprd"]["extra"] = {"change_lock": "weekly"}
    inv = parse_inventory(data)
    friday_morning = datetime(2026, 12, 4, 8, tzinfo=UTC).timestamp()
    saturday = datetime(2026, 12, 5, 12, tzinfo=UTC).timestamp()
    window = fleetview.WEEKLY_WINDOW
    assert fleetview.weekly_lock(inv, friday_morning) == {"active": False, "envs": ["gprd"],
                                                          "window": window, "in_force": False}
    assert fleetview.weekly_lock(inv, saturday)["in_force"] is True
    assert fleetview.weekly_lock(inventory, saturday) == {"active": True, "envs": [],
                                                          "window": window, "in_force": False}


def test_exceptions_are_lists_and_counts(inventory, store, lbs):
    store.record_drained("gprd", "web-01-sv-gprd", RUN, "deploy 17.6.0-ee.0 (batch 1 of web)")
    for lb in LBS:
        lbs.admin[(lb, "web-01-sv-gprd")] = "drain"
    lbs.admin[(LBS[1], "web-05-sv-gprd")] = "maint"
    gprd = fleetview.view(inventory, store, read=lbs, pressure=False)["environments"]["gprd"]
    assert gprd["exceptions"] == {"out_of_service": 2, "failed": 0, "chef_stopped": 1, "lb_disagreements": 1,
                                  "healthy": 13, "not_listed": {}}
    assert [o["host"] for o in gprd["out_of_service"]] == ["web-01-sv-gprd", "web-05-sv-gprd"]


def big_inventory(n: int) -> dict:
    data = json.loads(json.dumps(INVENTORY))
    web = next(r for r in data["environments"]["gprd"]["roles"] if r["name"] == "web")
    web["hosts"] = [{"name": f"web-{i:04d}-sv-gprd", "address": f"127.9.{i // 250}.{i % 250 + 1}"}
                    for i in range(n)]
    return data


def test_a_thousand_hosts_are_counts_not_rows(store):
    inv = parse_inventory(big_inventory(1000))
    store.record_deployment("gprd", V1, "baseline", status="success")
    store.record_drained("gprd", "web-0007-sv-gprd", RUN, "deploy")
    healthy = "web-0500-sv-gprd"
    v = fleetview.view(inv, store, lbs=False, pressure=False)
    gprd = v["environments"]["gprd"]
    assert gprd["hosts"] == 1005 and gprd["exceptions"]["healthy"] == 1004
    web = next(r for r in gprd["roles"] if r["name"] == "web")
    assert web["versions"] == {V1: 1000}
    text = json.dumps(v)
    assert "web-0007-sv-gprd" in text and healthy not in text
    assert len(text) < 20_000, len(text)


def test_a_long_exception_list_is_cut_and_counted(store):
    inv = parse_inventory(big_inventory(1000))
    store.record_drained_many("gprd", [f"web-{i:04d}-sv-gprd" for i in range(300)], RUN, "deploy")
    gprd = fleetview.view(inv, store, lbs=False, pressure=False)["environments"]["gprd"]
    assert len(gprd["out_of_service"]) == fleetview.LIST_MAX
    assert gprd["exceptions"]["out_of_service"] == 300
    assert gprd["exceptions"]["not_listed"]["out_of_service"] == 300 - fleetview.LIST_MAX


def test_internal_versions_are_shown_as_internal_everywhere(inventory, store, lbs):
    store.record_deployment("gprd", V1, "baseline", status="success")
    store.record_deployment("gprd", SECRET_BUILD, RUN)
    store.set_host_status(f"gprd:{SECRET_BUILD}", "gprd", "web-01-sv-gprd", "failed",
                          SECRET_BUILD, f"install of gitlab-ee={SECRET_BUILD} failed")
    store.acquire("gprd", RUN, "alice", f"fast_deploy {SECRET_BUILD}: fix")
    store.audit(RUN, "gprd", "web-01-sv-gprd", f"apt-get install -y gitlab-ee={SECRET_BUILD}", 100, 2.0,
                f"E: {SECRET_BUILD} broke")
    runs = [{"dag_id": "fast_deploy", "run_id": RUN, "state": "running", "note": f"deploying {SECRET_BUILD}",
             "stages": []}]
    v = fleetview.view(inventory, store, read=lbs, pressure=False, runs=runs, internal={SECRET_BUILD})
    text = json.dumps(v)
    assert SECRET_BUILD not in text
    gprd = v["environments"]["gprd"]
    shown = internal_label(SECRET_BUILD)  # internal-<short hash>
    assert re.fullmatch(r"internal-[0-9a-f]{8}", shown) and shown != internal_label(V1)
    assert v["progress"][0]["version"] == shown and gprd["lock"]["reason"] == f"fast_deploy {shown}: fix"
    assert gprd["failed_hosts"][0]["reason"] == f"install of gitlab-ee={shown} failed"
    assert v["runs"][0]["note"] == f"deploying {shown}"
    audit = fleetview.host_audit(store, "web-01-sv-gprd", internal={SECRET_BUILD})
    assert SECRET_BUILD not in json.dumps(audit)
    assert audit["records"][0]["command"] == f"apt-get install -y gitlab-ee={shown}"
    # without the internal set it shows (what status does)
    assert SECRET_BUILD in json.dumps(fleetview.view(inventory, store, read=lbs, pressure=False))


def test_host_audit_newest_first_with_a_limit(inventory, store):
    store.audit_many([("r1", "gprd", "web-01-sv-gprd", "chef-client stop", 0, 0.5, "ok output"),
                      ("r1", "gprd", "web-02-sv-gprd", "chef-client stop", 0, 0.4, "")])
    store.audit_many([("r1", "gprd", "web-01-sv-gprd", "apt-get install -y gitlab-ee=17.6.0-ee.0", 100, 12.25,
                       "x" * 1000 + "E: broken")])
    store.audit("r2", "gprd", "web-01-sv-gprd", "gitlab-ctl status", None, 30.0, "")
    audit = fleetview.host_audit(store, "web-01-sv-gprd", inventory=inventory)
    assert (audit["host"], audit["known"], audit["env"], audit["role"]) == (
        "web-01-sv-gprd", True, "gprd", "web")
    assert audit["total"] == 3 and audit["truncated"] is False
    cmds = [(r["run_id"], r["command"], r["exit_code"], r["ok"], r["duration_s"]) for r in audit["records"]]
    assert cmds == [("r2", "gitlab-ctl status", None, False, 30.0),
                    ("r1", "apt-get install -y gitlab-ee=17.6.0-ee.0", 100, False, 12.25),
                    ("r1", "chef-client stop", 0, True, 0.5)]
    tail = audit["records"][1]["output_tail"]
    assert tail.endswith("E: broken") and len(tail) == fleetview.OUTPUT_TAIL_SHOWN
    assert audit["records"][2]["output_tail"] == ""  # a command that worked: no output shown
    two = fleetview.host_audit(store, "web-01-sv-gprd", limit=2)
    assert [r["run_id"] for r in two["records"]] == ["r2", "r1"] and two["truncated"] is True
    assert two["known"] is False and fleetview.host_audit(store, "nope")["records"] == []


def test_runs_and_approvals_link_into_the_airflow_ui():
    runs = fleetview.runs_section([{"dag_id": "deploy_production", "run_id": RUN, "state": "failed",
                                    "note": "x", "stages": [{"name": "stage_8_production_fleet",
                                                             "state": "failed",
                                                             "task_id": "stage_8_production_fleet.deploy"}]}])
    enc = "deploy_production__2026-12-01T10%3A00%3A00%2B00%3A00"
    assert runs[0]["url"] == f"/dags/deploy_production/runs/{enc}"
    assert runs[0]["stages"][0]["url"] == (f"/dags/deploy_production/runs/{enc}/tasks/"
                                           "stage_8_production_fleet.deploy")
    [a] = fleetview.approvals_section([{"dag_id": "deploy_production", "run_id": RUN, "map_index": -1,
                                        "task_id": "stage_6_approve.approve_production", "subject": "go?"}])
    assert a["url"] == (f"/dags/deploy_production/runs/{enc}/tasks/stage_6_approve.approve_production/"
                        "required_actions?map_index=-1")


# -- Airflow's metadata, on a scratch DB --------------------------------------------------------------------

@pytest.fixture()
def airflow_db():
    from airflow.models.dagrun import DagRun, DagRunNote
    from airflow.models.hitl import HITLDetail
    from airflow.models.taskinstance import TaskInstance
    from airflow.models.trigger import Trigger  # noqa: F401  (task_instance's foreign key)
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    engine = create_engine("sqlite://")
    tables = [DagRun.__table__, DagRunNote.__table__, TaskInstance.__table__, HITLDetail.__table__]
    DagRun.metadata.create_all(engine, tables=tables)
    with Session(engine) as session:
        yield session
    engine.dispose()


def add_run(session, dag_id: str, run_id: str, state: str, tis: dict[str, str | None], note: str = "",
            conf: dict | None = None) -> dict[str, uuid.UUID]:
    from airflow.models.dagrun import DagRun, DagRunNote
    from airflow.models.taskinstance import TaskInstance
    from sqlalchemy import insert

    rid = session.execute(insert(DagRun.__table__).values(dag_id=dag_id, run_id=run_id, state=state,
                                                          run_type="manual", conf=conf or {},
                                                          run_after=datetime.now(UTC), log_template_id=None)
                      ).inserted_primary_key[0]
    if note:
        session.execute(insert(DagRunNote.__table__).values(dag_run_id=rid, content=note))
    ids = {}
    for task_id, state_ in tis.items():
        ids[task_id] = uuid.uuid4()
        session.execute(insert(TaskInstance.__table__).values(id=ids[task_id], dag_id=dag_id, run_id=run_id,
                                                              task_id=task_id, map_index=-1, state=state_,
                                                              pool="default_pool"))
    session.commit()
    return ids


def test_runs_with_stages_and_notes_from_the_metadata(airflow_db):
    from liftoff_airflow import fleet_api

    add_run(airflow_db, "deploy_production", RUN, "failed", {
        "resolve_version": "success", "stage_1_staging.precheck": "success",
        "stage_1_staging.deploy": "success",
        "stage_2_qa.run": "skipped", "stage_8_production_fleet.precheck": "success",
        "stage_8_production_fleet.deploy": "failed", "stage_9_pdm.run": "upstream_failed",
        "stage_10_cleanup.a": None},
        note="deploy_production failed at stage_8_production_fleet.deploy (first)")
    add_run(airflow_db, "some_other_dag", "r-other", "success", {"stage_1_x.a": "success"})
    add_run(airflow_db, "rollback", "r-2", "running", {"stage_1_rollback.go": "running"})
    runs = fleet_api.read_runs(airflow_db)
    assert [(r["dag_id"], r["run_id"], r["state"]) for r in runs] == [("rollback", "r-2", "running"),
                                                                       ("deploy_production", RUN, "failed")]
    dp = runs[1]
    assert dp["note"] == "deploy_production failed at stage_8_production_fleet.deploy (first)"
    assert [(s["name"], s["state"], s["task_id"]) for s in dp["stages"]] == [
        ("stage_1_staging", "success", "stage_1_staging.deploy"), ("stage_2_qa", "skipped", "stage_2_qa.run"),
        ("stage_8_production_fleet", "failed", "stage_8_production_fleet.deploy"),
        ("stage_9_pdm", "failed", "stage_9_pdm.run"), ("stage_10_cleanup", "pending", "stage_10_cleanup.a")]
    assert runs[0]["stages"] == [{"name": "stage_1_rollback", "state": "running",
                                  "task_id": "stage_1_rollback.go", "tasks": 1}]


def test_pending_approvals_and_internal_builds_from_the_metadata(airflow_db):
    from airflow.models.hitl import HITLDetail
    from sqlalchemy import insert

    from liftoff_airflow import fleet_api

    waiting = add_run(airflow_db, "deploy_production", RUN, "running",
                      {"stage_6_approve.approve": "deferred", "stage_6_approve.answered": "success"})
    answers = (("stage_6_approve.approve", None), ("stage_6_approve.answered", datetime.now(UTC)))
    for key, responded in answers:
        airflow_db.execute(insert(HITLDetail.__table__).values(
            ti_id=waiting[key], options=["Approve", "Reject"], subject="Promote 17.6.0-ee.0 to gprd?",
            params={}, params_input={}, responded_at=responded, created_at=datetime.now(UTC)))
    add_run(airflow_db, "fast_deploy", "fd-1", "success", {},
            conf={"version": SECRET_BUILD, "internal": True})
    add_run(airflow_db, "fast_deploy", "fd-2", "success", {},
            conf={"version": "17.6.2-ee.0", "internal": False})
    airflow_db.commit()
    [a] = fleet_api.read_approvals(airflow_db)
    assert (a["dag_id"], a["run_id"], a["task_id"], a["map_index"]) == ("deploy_production", RUN,
                                                                        "stage_6_approve.approve", -1)
    assert a["subject"] == "Promote 17.6.0-ee.0 to gprd?" and a["options"] == ["Approve", "Reject"]
    assert fleet_api.read_internal(airflow_db) == {SECRET_BUILD}


# -- the plugin's routes ------------------------------------------------------------------------------------

ROUTES = ("/liftoff/api/fleet", "/liftoff/api/hosts/web-01-sv-gprd/audit", "/liftoff/fleet",
          "/liftoff/fleet/hosts/web-01-sv-gprd", f"/liftoff/api/runs/{RUN}/analyses")
XSS = "<script>alert(1)</script>"
JWT_SECRET = secrets.token_urlsafe(64)


def token(secret: str = JWT_SECRET, role: str | None = "viewer", valid_for: float = 300) -> str:
    """A JWT as the api-server signs it (``[api_auth] jwt_secret``, Airflow's audience)."""
    from airflow.api_fastapi.auth.tokens import JWTGenerator

    return JWTGenerator(secret_key=secret, valid_for=valid_for, audience="apache-airflow").generate(
        {"sub": "rm", "role": role})


def forget_the_signing_key() -> None:
    """Airflow keeps its token validator (with the secret it read) for the process."""
    from airflow.api_fastapi.auth.managers.base_auth_manager import BaseAuthManager

    BaseAuthManager._get_token_validator.cache_clear()


@pytest.fixture()
def api(monkeypatch, inventory, store, lbs):
    """The fleet app as the api-server mounts it (Airflow's init_plugins), with Airflow's auth
    manager (SimpleAuthManager) and a known JWT secret; Airflow's runs replaced."""
    from airflow import settings
    from airflow.api_fastapi import app as api_app
    from airflow.models.revoked_token import RevokedToken
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from liftoff_airflow import fleet_api
    from liftoff_plugin import LiftoffPlugin

    monkeypatch.setenv("AIRFLOW__API_AUTH__JWT_SECRET", JWT_SECRET)
    forget_the_signing_key()
    monkeypatch.setattr(api_app._AuthManagerState, "instance", None)
    api_app.create_auth_manager()
    RevokedToken.__table__.create(settings.engine, checkfirst=True)
    monkeypatch.setattr(status, "read_lbs", lbs)
    fleet_api.read_lbs_cached.clear()
    runs = [{"dag_id": "deploy_production", "run_id": RUN, "state": "failed", "note": XSS, "stages": []}]
    fleet_api.app.dependency_overrides.update({
        fleet_api.sources: lambda: (inventory, store),
        fleet_api.airflow_records: lambda: {"runs": runs, "approvals": [], "internal": {SECRET_BUILD}},
        fleet_api.internal_versions: lambda: {SECRET_BUILD}})
    monkeypatch.setattr("airflow.plugins_manager.get_fastapi_plugins",
                        lambda: (LiftoffPlugin.fastapi_apps, []))
    root = FastAPI()
    api_app.init_plugins(root)
    try:
        with TestClient(root, follow_redirects=False) as client:
            yield client
    finally:
        fleet_api.app.dependency_overrides.clear()
        fleet_api.read_lbs_cached.clear()
        forget_the_signing_key()


def bearer(tok: str | None = None) -> dict[str, str]:
    return {"Authorization": f"Bearer {tok or token()}"}


def test_every_route_needs_a_valid_token(api):
    wrong = token(secret=secrets.token_urlsafe(64))
    for path in ROUTES:
        page = not path.startswith("/liftoff/api/")
        resp = api.get(path, headers={"Accept": "text/html"})
        if page:  # a browser without a session goes to Airflow's login, and back here after it
            assert resp.status_code == 303, (path, resp.status_code)
            where = urlsplit(resp.headers["location"])
            assert where.path == "/auth/login" and parse_qs(where.query)["next"] == [path]
        else:
            assert resp.status_code == 401, path
        assert api.get(path, headers=bearer(wrong)).status_code == 403, path
        api.cookies.set("_token", wrong)
        assert api.get(path).status_code == 403, path
        api.cookies.clear()
        assert api.get(path, headers=bearer(token(role=None))).status_code == 403, path
        expired = api.get(path, headers=bearer(token(valid_for=-120)))
        assert expired.status_code == (303 if page else 401), path
        assert api.get(path, headers=bearer()).status_code == 200, path
        api.cookies.set("_token", token())  # the UI's session cookie
        assert api.get(path).status_code == 200, path
        api.cookies.clear()


def test_read_only(api):
    for path in ROUTES:
        for method in ("POST", "PUT", "PATCH", "DELETE"):
            assert api.request(method, path, headers=bearer()).status_code == 405, (method, path)


def test_fleet_json_through_the_app(api, store, lbs):
    store.acquire("gprd", RUN, "alice", f"fast_deploy {SECRET_BUILD}: x")
    store.record_drained("gprd", "web-01-sv-gprd", RUN, XSS)
    resp = api.get("/liftoff/api/fleet", headers=bearer())
    assert resp.status_code == 200 and resp.headers["cache-control"] == "no-store"
    data = resp.json()
    assert SECRET_BUILD not in resp.text
    assert data["environments"]["gprd"]["lock"]["reason"] == f"fast_deploy {internal_label(SECRET_BUILD)}: x"
    assert data["environments"]["gprd"]["out_of_service"][0]["record"]["reason"] == XSS  # as it is: text
    assert data["runs"][0]["url"].startswith("/dags/deploy_production/runs/")
    assert data["weekly_change_lock"]["window"] == fleetview.WEEKLY_WINDOW
    # a second read within LB_CACHE_S shares the LB read
    assert api.get("/liftoff/api/fleet", headers=bearer()).status_code == 200 and len(lbs.reads) == 1
    assert api.get("/liftoff/api/fleet?lbs=false", headers=bearer()).json()["lbs_read"] is False


def test_audit_json_through_the_app(api, store):
    store.audit(RUN, "gprd", "web-01-sv-gprd", f"apt-get install -y gitlab-ee={SECRET_BUILD}", 0, 3.0, "")
    resp = api.get("/liftoff/api/hosts/web-01-sv-gprd/audit?limit=5", headers=bearer())
    assert resp.status_code == 200 and SECRET_BUILD not in resp.text
    command = resp.json()["records"][0]["command"]
    assert command == f"apt-get install -y gitlab-ee={internal_label(SECRET_BUILD)}"
    assert api.get("/liftoff/api/hosts/web-01-sv-gprd/audit?limit=0", headers=bearer()).status_code == 422
    assert api.get("/liftoff/api/hosts/a;b/audit", headers=bearer()).status_code == 400


def test_a_runs_canary_judgements_through_the_app(api, store):
    data = {"verdict": "fail", "score": 40.0, "reason": XSS, "requests": {"baseline": 900, "canary": 300},
            "thresholds": {"pass": 90.0, "marginal": 75.0},
            "metrics": {"error_ratio_web": {"classification": "high", "p_value": 0.001}}}
    store.record_analysis(RUN, "gprd-cny", "stage_7", 5, "fail", 40.0, "abort", json.dumps(data))
    store.record_analysis("other-run", "gprd-cny", "stage_6", None, "pass", 100.0, "next", "{}")
    resp = api.get(f"/liftoff/api/runs/{RUN}/analyses", headers=bearer())
    assert resp.status_code == 200 and resp.headers["cache-control"] == "no-store"
    [judged] = resp.json()["analyses"]
    assert (judged["stage"], judged["weight"], judged["verdict"], judged["decision"]) == (
        "stage_7", 5, "fail", "abort")
    assert judged["reason"] == XSS and judged["metrics"]["error_ratio_web"]["classification"] == "high"
    assert api.get("/liftoff/api/runs/nothing-here/analyses", headers=bearer()).json()["analyses"] == []
    fleet = api.get("/liftoff/api/fleet", headers=bearer()).json()
    assert [a["run_id"] for a in fleet["canary_analyses"]["gprd-cny"]] == [RUN, "other-run"]


def test_the_page_is_a_shell_without_data(api, store):
    store.acquire("gprd", RUN, "alice", "deploy")
    store.record_drained("gprd", "web-01-sv-gprd", RUN, XSS)
    resp = api.get("/liftoff/fleet", headers=bearer())
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html")
    html = resp.text
    assert "alert(1)" not in html and RUN not in html  # the data only comes through the script's fetch
    for testid in ("fleet-root", "fleet-error", "updated-at", "weekly-lock", "progress", "halts", "freezes",
                   "patches", "approvals", "runs"):
        assert f'data-testid="{testid}"' in html, testid
    assert 'data-state="loading"' in html and 'data-api="/liftoff"' in html
    # only its own script runs: a nonce per response, the same in the CSP and on the script
    csp = resp.headers["content-security-policy"]
    nonce = re.search(r"'nonce-([^']+)'", csp)[1]
    assert f'<script nonce="{nonce}">' in html and "default-src 'none'" in csp
    assert nonce not in api.get("/liftoff/fleet", headers=bearer()).headers["content-security-policy"]
    script = html.split(f'<script nonce="{nonce}">', 1)[1]
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in script, sink
    host = api.get("/liftoff/fleet/hosts/web-01-sv-gprd", headers=bearer())
    assert 'data-host="web-01-sv-gprd"' in host.text and 'data-testid="audit"' in host.text


def test_the_shell_escapes_what_it_holds():
    from liftoff_airflow import fleet_page

    html = fleet_page.shell('/x"><script>alert(1)</script>', "", host="<b>h</b>", nonce="n")
    assert "<script>alert(1)" not in html and "<b>h</b>" not in html
    assert "&lt;b&gt;h&lt;/b&gt;" in html and 'data-api="/x&quot;&gt;&lt;script&gt;' in html


def test_the_plugin_links_the_page():
    from liftoff_plugin import LiftoffPlugin

    nav, run_view = LiftoffPlugin.external_views
    assert nav == {"name": "liftoff fleet", "href": "/liftoff/fleet", "destination": "nav"}
    assert run_view["destination"] == "dag_run" and run_view["url_route"] == "liftoff-fleet-run"
    assert run_view["href"].startswith("/liftoff/fleet?")
    # as Airflow's plugins endpoint serializes them
    from airflow.api_fastapi.core_api.datamodels.plugins import ExternalViewResponse

    assert ExternalViewResponse(**nav).href == "/liftoff/fleet"
    assert ExternalViewResponse(**run_view).destination == "dag_run"
