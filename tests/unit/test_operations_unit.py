"""Operations (rollback safety, fast mode, patches, locks by hand, canary weight) and the traffic
runner, without a lab: an in-memory store, a small inventory, a local HTTP server and a fake
Pushgateway on 127.0.0.1."""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from liftoff import canary, deploy, inventory, locks, metrics, migrations, patches, runs, traffic
from liftoff import rollback as rb
from liftoff.errors import InvalidInput, InventoryError, LiftoffError, LockHeld, RollbackRefused
from liftoff.haproxy import ServerState
from liftoff.inventory import parse_inventory
from liftoff.runs import Run
from liftoff.store import Store
from tests.unit.http_fakes import FakeGateway

V1, V2, V3 = "17.5.0-ee.0", "17.6.0-ee.0", "17.7.0-ee.0"


def role(name, stage, n, batch="10%", floor="50%", hup=("puma",)):
    return {"name": name, "stage": stage, "batch": batch, "capacity_floor": floor, "restart": [],
            "hup": list(hup), "hosts": [{"name": f"{name}-{i:02d}-sv-gprd", "address": f"127.9.0.{i}"}
                                        for i in range(1, n + 1)]}


def canary_role(name, n):
    r = role(name, "fleet", n)
    for i, h in enumerate(r["hosts"], 1):
        h["name"], h["address"] = f"{name}-cny-{i:02d}-sv-gprd", f"127.9.1.{i}"
    return r


INVENTORY = {
    "environments": {
        "gprd": {
            "url": "http://127.9.2.1:8080", "alert_matchers": {"env": "gprd"},
            "load_balancers": [{"name": "fe-01-lb-gprd", "admin": "127.9.2.1:9999"},
                               {"name": "fe-02-lb-gprd", "admin": "127.9.2.2:9999"}],
            "deploy_node": {"name": "deploy-01-sv-gprd", "address": "127.9.0.100"},
            "roles": [role("gitaly", "gitaly", 2, floor="0%", hup=()), role("web", "fleet", 10),
                      role("sidekiq", "fleet", 3, batch="100%", floor="0%", hup=("sidekiq",))],
        },
        "gprd-cny": {
            "url": "http://127.9.2.1:8081", "qa_cookie": "gitlab_canary=true", "database": "gprd",
            "canary_of": "gprd", "alert_matchers": {"env": "gprd-cny"},
            "load_balancers": [{"name": "fe-01-lb-gprd", "admin": "127.9.2.1:9999"}],
            "deploy_node": {"name": "deploy-cny-01-sv-gprd", "address": "127.9.1.100"},
            "roles": [canary_role("web", 2)],
        },
    },
}


@pytest.fixture()
def store():
    s = Store("sqlite://")
    yield s
    s.close()


@pytest.fixture()
def run(store):
    return Run(run_id="unit-run-1", who="alice", pipeline="unit", inventory=parse_inventory(INVENTORY),
               _store=store)


# -- rollback safety ---------------------------------------------------------------------------------

def test_migration_version():
    assert migrations.migration_version("000003_post_17_6_0_ee_0") == 3
    assert migrations.migration_version("20231129120000_drop_old_column") == 20231129120000
    assert migrations.migration_version("post_without_number") is None


def test_newer_post_migrations_from_the_schema_version():
    applied = ["000001_post_a", "000002_regular_b", "000002_post_b", "000003_post_c"]
    newer, how = migrations.newer_post_migrations(applied, {"version": V2, "seq": 2})
    assert newer == ["000003_post_c"] and "schema version 2" in how
    assert migrations.newer_post_migrations(applied, {"seq": 3})[0] == []
    # an explicit schema version wins over the lab's seq; the regular migration never counts
    assert migrations.newer_post_migrations(applied, {"seq": 9, "schema_version": 1})[0] == ["000002_post_b",
                                                                                      "000003_post_c"]
    # a post migration without a number cannot be ordered: counted as not contained
    assert migrations.newer_post_migrations(["x_post_y"], {"seq": 5})[0] == ["x_post_y"]


def test_newer_post_migrations_from_a_list_or_unknown():
    applied = ["000001_post_a", "000002_post_b"]
    newer = migrations.newer_post_migrations(applied, {"post_migrations": ["000001_post_a"]})[0]
    assert newer == ["000002_post_b"]
    assert migrations.newer_post_migrations(applied, {"version": V1}) == (None, "")
    assert migrations.newer_post_migrations(applied, {"seq": True}) == (None, "")


def test_rollback_target_follows_the_records(store):
    assert rb.rollback_target(store.deployments("gprd")) == (None, None)
    store.record_deployment("gprd", V1, "baseline", status="success")
    store.record_deployment("gprd", V2, "run-2", status="running")
    # a deploy that did not finish (hosts half on it) is current; the last good one is the target
    assert rb.rollback_target(store.deployments("gprd")) == (V2, V1)
    store.record_deployment("gprd", V2, "run-2", status="success")
    assert rb.rollback_target(store.deployments("gprd")) == (V2, V1)
    store.record_deployment("gprd", V1, "rb-1", kind="rollback", status="success")
    # after the rollback, never "back" to what was rolled back from
    assert rb.rollback_target(store.deployments("gprd")) == (V1, None)
    store.record_deployment("gprd", V3, "run-3", status="success")
    assert rb.rollback_target(store.deployments("gprd")) == (V3, V1)
    # a rollback that failed half way: running it again aims at the same target
    store.record_deployment("gprd", V1, "rb-2", kind="rollback", status="failed")
    assert rb.rollback_target(store.deployments("gprd")) == (V3, V1)
    # deploy_canary's own rollback marks its deploy rolled_back and records the rollback
    store.record_deployment("gprd", "17.8.0-ee.0", "run-4", status="running")
    store.record_deployment("gprd", V3, "run-4", kind="rollback", status="success")
    store.record_deployment("gprd", "17.8.0-ee.0", "run-4", status="rolled_back")
    assert rb.rollback_target(store.deployments("gprd")) == (V3, V1)


def check(safe=False, overridable=True, reasons=("1 post-deployment migration(s) newer",)):
    return {"safe": safe, "reasons": [] if safe else list(reasons), "env": "gprd", "target": V1,
            "current": V2, "overridable": overridable, "newer_post_migrations": [], "command": "x"}


def test_require_safe():
    assert rb.require_safe(check(safe=True))["overridden"] is False
    with pytest.raises(RollbackRefused, match="unsafe.*override_reason"):
        rb.require_safe(check())
    out = rb.require_safe(check(), "incident 1234, data fixed by hand")
    assert out["overridden"] and out["override_reason"] == "incident 1234, data fixed by hand"
    with pytest.raises(RollbackRefused, match="refused: a deploy is running"):
        rb.require_safe(check(overridable=False, reasons=["a deploy is running: ..."]), "a good reason")
    with pytest.raises(InvalidInput):
        rb.require_safe(check(), "rm -rf /; echo")


def test_rollback_command():
    assert rb.rollback_command("gprd", V1) == f"liftoff rollback gprd --to {V1}"
    assert rb.rollback_command("gprd", None) == "liftoff rollback gprd --to VERSION"


# -- fast mode ---------------------------------------------------------------------------------------

def test_fast_environment_takes_big_batches_without_floor(run):
    env = run.env("gprd")
    fast = deploy.fast_environment(env)
    sizes = {r.name: (r.batch_size(), r.min_in_service()) for r in fast.roles}
    assert sizes == {"gitaly": (1, 0), "web": (5, 0), "sidekiq": (3, 0)}  # sidekiq keeps its 100%
    assert {r.name: r.batch_size() for r in env.roles} == {"gitaly": 1, "web": 1, "sidekiq": 3}  # untouched
    assert [h.name for h in fast.hosts()] == [h.name for h in env.hosts()]


def test_rollout_options_and_stages(run):
    assert deploy.rollout_options("fast").drain_timeout == deploy.FAST_DRAIN_TIMEOUT
    assert deploy.rollout_options("normal").drain_timeout == deploy.NORMAL_DRAIN_TIMEOUT
    assert deploy.rollout_options("normal").chef_start == "cleanup"
    with pytest.raises(InvalidInput):
        deploy.rollout_options("reckless")
    env = run.env("gprd")
    assert deploy.stage_roles(env, "fleet") == ["web", "sidekiq"]
    assert deploy.stage_roles(env, "gitaly") == ["gitaly"]
    with pytest.raises(InvalidInput):
        deploy.stage_roles(env, "web")


def test_canary_and_database_relations(run):
    inv = run.inventory
    assert canary.canary_env_of(inv, "gprd") == "gprd-cny"
    assert canary.canary_env_of(inv, "gprd-cny") is None
    assert canary.canary_env_name(inv) == "gprd-cny"
    assert rb.sharing_database(inv, "gprd-cny") == ["gprd", "gprd-cny"]
    assert inventory.environment_names(inv) == ["gprd", "gprd-cny"]


def test_internal_builds_are_redacted(run):
    assert deploy.public_version(V2, internal=True) == "internal"
    assert deploy.public_version(V2, internal=False) == V2
    assert deploy.redact(f"fix in {V2} for CVE-1", V2, True) == "fix in internal for CVE-1"
    internal = runs.for_build(run, True)
    assert internal.metrics().redact_version is True
    assert internal.run_id == run.run_id and internal.store is run.store
    assert runs.for_build(run, False) is run
    assert run.metrics().redact_version is False


# -- patches, halts, locks -----------------------------------------------------------------------------

def test_patch_detail_keeps_the_text_and_its_hash():
    small = json.loads(patches.patch_detail("--- a\n+++ b\n", "security fix", ["web"]))
    assert small["patch"] == "--- a\n+++ b\n" and small["truncated"] is False and small["roles"] == ["web"]
    big_text = "+ line with \"quotes\" and \\ backslash\n" * 500
    detail = patches.patch_detail(big_text, "security fix", ["web", "api"])
    data = json.loads(detail)
    assert len(detail) <= patches.PATCH_DETAIL_CHARS
    assert data["truncated"] is True and big_text.startswith(data["patch"]) and len(data["patch"]) > 1000
    assert data["bytes"] == len(big_text.encode())
    assert data["sha256"] == hashlib.sha256(big_text.encode()).hexdigest()


def test_apply_patch_refuses_bad_input_before_touching_anything(run):
    with pytest.raises(InvalidInput):
        patches.apply_patch(run, "gprd", "sec-1", "diff", [], "security fix")
    with pytest.raises(InventoryError):
        patches.apply_patch(run, "gprd", "sec-1", "diff", ["frontend"], "security fix")
    with pytest.raises(InvalidInput):
        patches.apply_patch(run, "gprd", "../etc", "diff", ["web"], "security fix")
    with pytest.raises(InvalidInput):
        patches.apply_patch(run, "gprd", "sec-1", "  ", ["web"], "security fix")
    assert run.store.get_lock("gprd") is None and run.store.patches() == []
    assert run.store.active_halt() is None


def test_lift_halt_on_purpose(run):
    run.store.set_halt("post-deploy patch a", "patch-a", "bob")
    run.store.set_halt("post-deploy patch b", "patch-b", "bob")
    out = patches.lift_halt(run, "patch a shipped by hand", "patch-a")
    assert out["lifted"] == ["patch-a"] and out["still_active"] == ["patch-b"]
    with pytest.raises(LiftoffError, match="no active halt for patch patch-a"):
        patches.lift_halt(run, "again", "patch-a")
    assert patches.lift_halt(run, "all clear now")["lifted"] == ["patch-b"]
    lifted = run.store.halts()
    assert {h.lifted_by for h in lifted} == {"alice"}
    assert {h.lifted_reason for h in lifted} == {"patch a shipped by hand", "all clear now"}


def test_lock_and_unlock_by_hand(run):
    out = locks.lock_env(run, "gprd", "change freeze for the incident")
    assert out["run_id"] == "manual-alice" and "change freeze" in out["reason"]
    assert locks.lock_env(run, "gprd", "again")["run_id"] == "manual-alice"  # the same person: no-op
    other = Run(run_id="unit-run-2", who="bob", inventory=run.inventory, _store=run.store)
    with pytest.raises(LockHeld, match="alice"):
        locks.lock_env(other, "gprd", "mine now")
    out = locks.unlock_env(other, "gprd", "incident over")
    assert out["removed"]["who"] == "alice" and out["removed"]["by_hand"] is True
    assert run.store.get_lock("gprd") is None
    events = run.store.lock_events("gprd")
    assert (events[0].action, events[0].who, events[0].reason) == ("force_release", "bob", "incident over")
    assert locks.unlock_env(other, "gprd", "nothing held")["removed"] is None
    with pytest.raises(InvalidInput):
        locks.lock_env(run, "gprd", "")


def test_mark_unfinished(run):
    run.store.record_deployment("gprd", V1, run.run_id, kind="rollback", status="running")
    run.store.record_deployment("gprd", V2, "someone-else", status="running")
    assert deploy.mark_unfinished(run, ["gprd"]) == ["gprd:rollback"]
    statuses = {(d.run_id, d.kind): d.status for d in run.store.deployments("gprd")}
    assert statuses == {(run.run_id, "rollback"): "failed", ("someone-else", "deploy"): "running"}


# -- canary weight -------------------------------------------------------------------------------------

def servers(lb, weight=5, admin="ready", drop=()):
    out = []
    for host in ("web-cny-01-sv-gprd", "web-cny-02-sv-gprd"):
        if host in drop:
            continue
        out.append(ServerState(lb, "web", host, "UP", admin, weight, 0))
        out.append(ServerState(lb, "canary_web", host, "UP", admin, 100, 0))
    out.append(ServerState(lb, "web", "web-01-sv-gprd", "UP", "ready", 100, 0))
    return out


def test_canary_divergence():
    hosts = ["web-cny-01-sv-gprd", "web-cny-02-sv-gprd", "gitaly-cny-01-stor-gprd"]  # gitaly: on no LB
    snap = {"fe-01": servers("fe-01", 20), "fe-02": servers("fe-02", 20)}
    assert canary.canary_divergence(snap, hosts, ["web"], 20) == {}
    snap["fe-02"] = servers("fe-02", 5)
    assert canary.canary_divergence(snap, hosts, ["web"], 20) == {
        "fe-02": ["web/web-cny-01-sv-gprd weight 5", "web/web-cny-02-sv-gprd weight 5"]}
    snap["fe-02"] = servers("fe-02", 20, drop=("web-cny-02-sv-gprd",))
    assert canary.canary_divergence(snap, hosts, ["web"], 20) == {"fe-02": ["web-cny-02-sv-gprd missing"]}
    snap = {"fe-01": servers("fe-01", admin="drain"), "fe-02": servers("fe-02", admin="drain")}
    assert canary.canary_divergence(snap, hosts, ["web"], "drain") == {}
    assert len(canary.canary_divergence(snap, hosts, ["web"], "ready")["fe-01"]) == 4  # both backends


def test_parse_weight():
    assert canary.parse_weight(0) == 0 and canary.parse_weight("25") == 25
    assert canary.parse_weight("drain") == "drain"
    assert canary.parse_weight(" 7\n") == 7
    for bad in (101, -1, True, "half", "10%", "\uff15\uff10", "1000", None, 2.5, "x" * 10_000):
        with pytest.raises(InvalidInput) as err:
            canary.parse_weight(bad)
        assert len(str(err.value)) < 200


# -- metrics -------------------------------------------------------------------------------------------

@pytest.fixture()
def gateway():
    g = FakeGateway()
    yield g
    g.close()


def samples(body: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(body) for s in fam.samples}


def test_fast_deploy_metric_counts_and_carries_the_reason(gateway):
    gateway.exposition = ('liftoff_fast_deploys_total{job="liftoff",pipeline="fast_deploy",env="gstg"} 2\n')
    m = metrics.PipelineMetrics(gateway.url, "fast_deploy")
    assert m.fast_deploy("gstg", "internal", "CVE-2026-1 fix") is True
    method, path, body, _ = gateway.pushes[-1]
    assert method == "PUT" and path == "/metrics/job/liftoff/env/gstg/pipeline/fast_deploy"
    got = samples(body)
    assert got[("liftoff_fast_deploys_total", ())] == 3
    assert got[("liftoff_fast_deploy_info", (("reason", "CVE-2026-1 fix"), ("version", "internal")))] == 1
    assert metrics.PipelineMetrics(None, "fast_deploy").fast_deploy("gstg", "x", "y") is False


# -- traffic ------------------------------------------------------------------------------------------

def test_traffic_validation():
    assert traffic.validate(5, 10, ["/", "/help?x=1"], 4) == ["/", "/help?x=1"]
    assert traffic.validate(5, 10, [], 4) == list(traffic.DEFAULT_ENDPOINTS)
    for args in ((0, 10, [], 4), (traffic.MAX_RPS + 1, 10, [], 4), (5, 0, [], 4),
                 (5, traffic.MAX_DURATION_S + 1, [], 4), (5, 10, [], 0), (5, 10, ["http://evil/"], 4),
                 (5, 10, ["//evil/x"], 4), (5, 10, ["/../x"], 4), (5, 10, ["/x y"], 4), (True, 10, [], 4)):
        with pytest.raises(InvalidInput):
            traffic.validate(*args)


def test_traffic_targets_from_the_inventory(run):
    targets = traffic.targets_for(run.inventory, ["gprd", "gprd-cny", "gprd"])
    assert targets == [traffic.Target("gprd", "http://127.9.2.1:8080", None),
                       traffic.Target("gprd-cny", "http://127.9.2.1:8081", "gitlab_canary=true")]
    with pytest.raises(InventoryError):
        traffic.targets_for(run.inventory, ["gstg"])


async def _serve(handler):
    from aiohttp import web

    app = web.Application()
    app.router.add_route("GET", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    return runner, f"http://127.0.0.1:{port}"


def test_traffic_counts_errors_and_cookies():
    from aiohttp import web

    seen: list[tuple[str, str | None]] = []

    async def handler(request):
        seen.append((request.path, request.headers.get("Cookie")))
        if request.path == "/boom":
            return web.Response(status=500)
        return web.Response(text="ok")

    async def go():
        runner, url = await _serve(handler)
        try:
            targets = [traffic.Target("gstg", url), traffic.Target("gprd-cny", url, "gitlab_canary=true")]
            pushed: list[str] = []
            stats = await traffic.run_traffic(targets, rps=20, duration_s=1.0, endpoints=["/", "/boom"],
                                              concurrency=4, push=lambda s, rps: pushed.append(s.env) or True,
                                              push_interval_s=0.05)
            return stats, pushed
        finally:
            await runner.cleanup()

    stats, pushed = asyncio.run(go())
    for env in ("gstg", "gprd-cny"):
        s = stats[env].summary()
        assert s["requests"] + s["skipped"] in (20, 21), s  # 20 ticks a second for one second
        assert s["requests"] >= 10, s
        assert s["errors"] == s["codes"]["500"] and set(s["codes"]) == {"200", "500"}
        assert abs(s["codes"]["200"] - s["codes"]["500"]) <= 1  # endpoints in turn
        assert stats[env].errors == {"/boom": s["errors"]} and s["p95_s"] is not None
    assert {c for _, c in seen} == {None, "gitlab_canary=true"}
    assert pushed.count("gstg") >= 2  # while it runs, and once at the end
    assert sorted(pushed[-2:]) == ["gprd-cny", "gstg"]


def test_traffic_is_bounded_when_the_environment_is_slow():
    from aiohttp import web

    async def slow(request):
        await asyncio.sleep(0.5)
        return web.Response(text="slow")

    async def go():
        runner, url = await _serve(slow)
        try:
            return await traffic.run_traffic([traffic.Target("gstg", url)], rps=50, duration_s=1.0,
                                             endpoints=["/"], concurrency=2, timeout=0.2)
        finally:
            await runner.cleanup()

    s = asyncio.run(go())["gstg"].summary()
    # two workers whose requests take 0.2 s each (timeout) and a queue of two: at most about 14 of
    # the 50 ticks become requests, the others are skipped instead of piling up
    assert s["requests"] + s["skipped"] in (50, 51)
    assert s["requests"] <= 16 and s["codes"] == {"error": s["requests"]}
    assert s["errors"] == s["requests"] and "TimeoutError" in s["last_error"]


def test_traffic_connection_errors_are_counted():
    stats = asyncio.run(traffic.run_traffic([traffic.Target("gstg", "http://127.0.0.1:9")], rps=10,
                                            duration_s=0.5, endpoints=["/"], concurrency=2, timeout=1))
    s = stats["gstg"].summary()
    assert s["requests"] >= 3 and s["errors"] == s["requests"] and s["codes"] == {"error": s["requests"]}


def test_traffic_push_format(gateway):
    st = traffic.EnvStats("gprd-cny")
    st.observe("/", "200", 0.02, False)
    st.observe("/", "502", 0.3, True, "HTTP 502 /")
    st.skipped = 4
    assert traffic.Pusher(gateway.url).push(st, 7.5) is True
    method, path, body, _ = gateway.pushes[-1]
    assert method == "PUT" and path == "/metrics/job/liftoff_traffic/env/gprd-cny"
    got = samples(body)
    assert got[("liftoff_traffic_requests_total", (("code", "502"), ("endpoint", "/")))] == 1
    assert got[("liftoff_traffic_errors_total", (("endpoint", "/"),))] == 1
    assert got[("liftoff_traffic_skipped_total", ())] == 4
    assert got[("liftoff_traffic_request_duration_seconds_bucket", (("le", "0.025"),))] == 1
    assert got[("liftoff_traffic_request_duration_seconds_count", ())] == 2
    assert got[("liftoff_traffic_target_rps", ())] == 7.5
    assert "version" not in body
    assert traffic.Pusher("http://127.0.0.1:9").push(st, 1) is False  # down: logged, not raised


# -- DAG params (refused at trigger time) -----------------------------------------------------------------

DAGS = Path(__file__).resolve().parents[2] / "dags"


@pytest.fixture(scope="module")
def dagbag():
    pytest.importorskip("airflow")
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAGS))
    assert not {k: v for k, v in bag.import_errors.items() if Path(k).stem in OPERATION_DAGS}
    return bag


OPERATION_DAGS = ("rollback", "fast_deploy", "post_deploy_patch", "canary_weight", "deploy_lock", "traffic")


def params_ok(dag, conf: dict) -> bool:
    from airflow.sdk.exceptions import ParamValidationError

    p = copy.deepcopy(dag.params)
    try:
        p.update(conf)
        p.validate()
    except ParamValidationError:
        return False
    return True


@pytest.mark.airflow
def test_operation_dags_are_thin_and_manual(dagbag):
    for dag_id in OPERATION_DAGS:
        dag = dagbag.dags.get(dag_id)
        assert dag is not None, dag_id
        assert "liftoff" in dag.tags and dag.default_args["owner"] == "release-managers"
        assert dag.default_args["retries"] == 0
        assert dag_id == "traffic" or type(dag.timetable).__name__ == "NullTimetable"
        for name, param in dag.params.items():
            assert param.schema.get("title") and param.description, (dag_id, name)


@pytest.mark.airflow
def test_bad_conf_is_refused_at_trigger_time(dagbag):
    cases = {
        "rollback": ([{"environment": "gprd"},
                      {"environment": "gprd-cny", "target_version": V1, "mode": "fast",
                       "reason": "bad canary", "check_only": False, "override_reason": None}],
                     [{}, {"environment": "prod"}, {"environment": "gprd", "mode": "slow"},
                      {"environment": "gprd", "target_version": "latest"},
                      {"environment": "gprd", "override_reason": "x;rm"}]),
        "fast_deploy": ([{"environment": "gstg", "version": V2, "reason": "CVE fix now", "internal": True}],
                        [{"environment": "gstg", "version": V2}, {"environment": "gstg", "version": "17.6",
                                                                  "reason": "CVE fix now"}]),
        "post_deploy_patch": ([{"environment": "gprd", "patch_id": "sec-42", "patch": "diff",
                                "roles": ["web"], "reason": "security fix"}],
                              [{"environment": "gprd", "patch_id": "a/b", "reason": "security fix"},
                               {"environment": "gprd", "roles": ["Web;x"], "reason": "security fix"},
                               {"environment": "gprd", "patch_id": "sec-42"}]),
        "canary_weight": ([{"weight": 0}, {"weight": "maint", "force": True}],
                          [{}, {"weight": 101}, {"weight": "half"}]),
        "deploy_lock": ([{"environment": "gprd", "action": "lock", "reason": "change freeze"},
                         {"environment": "gprd", "action": "freeze", "reason": "CR-1 failover",
                          "duration": "2h"},
                         {"environment": "gprd", "action": "unfreeze", "reason": "CR-1 done"}],
                        [{"environment": "gprd", "action": "thaw", "reason": "change freeze"},
                         {"environment": "gprd", "action": "lock"},
                         {"environment": "gprd", "action": "freeze", "reason": "CR-1 failover",
                          "duration": "2h;id"}]),
        "traffic": ([{"environments": ["gstg"], "rps": 2.5, "duration_s": 60, "endpoints": ["/help"]}],
                    [{"environments": []}, {"rps": 0}, {"rps": 1000}, {"duration_s": 86400},
                     {"endpoints": ["http://elsewhere/"]}, {"environments": ["gstg", "gstg"]}]),
    }
    for dag_id, (good, bad) in cases.items():
        dag = dagbag.dags.get(dag_id)
        for conf in good:
            assert params_ok(dag, conf), (dag_id, conf)
        for conf in bad:
            assert not params_ok(dag, conf), (dag_id, conf)


def test_traffic_alert_rules_are_valid_prometheus_rules(tmp_path):
    rules = traffic.alert_rules(window="2m", error_ratio=0.1)
    exprs = [r["expr"] for r in rules["groups"][0]["rules"]]
    assert 'liftoff_traffic_errors_total{job="liftoff_traffic"}[2m]' in exprs[0]
    assert exprs[0].endswith("> 0.1")
    assert all("by (env" in e for e in exprs)
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed")
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rules))
    out = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_traffic_reaches_the_canary_and_its_baseline_by_default(dagbag):
    """The canary judge compares canary with the main fleet: the traffic DAG sends to both."""
    default = dagbag.dags["traffic"].params.dump()["environments"]
    assert default == ["gstg", "gprd-cny", "gprd"]
