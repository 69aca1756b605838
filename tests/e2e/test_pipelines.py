"""deploy_canary and deploy_production end to end on the lab, through dag.test().

The tests run in file order on one lab: a good build goes to canary and is promoted, then
bad builds are stopped by QA or the alert gate and halted or rolled back, and a critical
alert keeps a deploy from starting.
"""

from __future__ import annotations

import json
import urllib.request
from datetime import UTC, datetime, timedelta

import pytest

from tests.labkit import Lab

pytestmark = [pytest.mark.airflow, pytest.mark.lab]

GOOD = "17.7.0+rnightly.1001.aaaaaaa-0"
QA_BAD_HALT = "17.7.0+rnightly.1002.bbbbbbb-0"
QA_BAD_ROLLBACK = "17.7.0+rnightly.1003.ccccccc-0"
ERRORS = "17.7.0+rnightly.1004.ddddddd-0"
SLOW = "17.7.0+rnightly.1005.eeeeeee-0"
BLOCKED = "17.7.0+rnightly.1006.fffffff-0"
BASE = "17.5.0-ee.0"


def full_conf(dag, **conf) -> dict:
    """Every param spelled out: dag.test() keeps the previous run's conf in dag.params."""
    defaults = {"dry_run": False, "on_failure": "rollback", "allow_precheck_failure": None,
                "quiet_period_seconds": 5, "rollout_mode": "role"}
    return {k: v for k, v in {**defaults, **conf}.items() if k in dag.params}


def run(dag, **conf) -> tuple[str, dict[str, str]]:
    dr = dag.test(run_conf=full_conf(dag, **conf))
    return dr.state, {ti.task_id: ti.state for ti in dr.get_task_instances()}


def versions(lab: Lab, env: str, role: str | None = None) -> dict[str, tuple[str, str]]:
    hosts = lab.status()["environments"][env]["hosts"]
    return {h["name"]: (h["installed"], h["running"]) for h in hosts if role is None or h["role"] == role}


def migrations(lab: Lab, env: str) -> list[str]:
    return lab.status()["environments"][env]["migrations"]


def canary_main_weights(lab: Lab) -> set[int]:
    weights = set()
    for lb in ("fe-01-lb-gprd", "fe-02-lb-gprd"):
        for line in lab.haproxy(lb, "show stat").splitlines():
            f = line.split(",")
            if len(f) > 18 and "-cny-" in f[1] and not f[0].startswith("canary"):
                weights.add(int(f[18]))
    return weights


def installs_of(lab: Lab, version: str) -> list[str]:
    log = lab.config.path("state", "audit.log")
    audit = log.read_text() if log.exists() else ""
    return [line for line in audit.splitlines() if f"gitlab-ee={version}" in line]


def wait_quiet(lab: Lab, env: str) -> None:
    """Let the previous test's alerts resolve: a precheck rightly refuses to start before."""
    lab.wait_for(f"no alerts on {env}", lambda: not lab.alerts(env=env), 180, interval=2)


def fleet_hosts(lab: Lab, env: str) -> dict[str, tuple[str, str]]:
    return {h: v for h, v in versions(lab, env).items() if not h.startswith("deploy")}


def test_invalid_version_is_refused_before_the_run(pipelines, e2e_lab: Lab):
    from airflow.sdk.exceptions import ParamValidationError

    with pytest.raises(ParamValidationError, match=r"^Invalid input for param version: '17\.7\.0; rm -rf /' "
                                                   r"does not match '"):
        pipelines["deploy_canary"].test(run_conf={"version": "17.7.0; rm -rf /"})
    assert not installs_of(e2e_lab, "17.7.0; rm -rf /")


def test_dry_run_plans_every_stage_and_touches_nothing(pipelines, e2e_lab: Lab):
    dry = "17.7.0+rnightly.1000.9999999-0"
    e2e_lab.build_add(dry, nightly=True)
    audit = e2e_lab.config.path("state", "audit.log")
    before = audit.read_text() if audit.exists() else ""
    dag = pipelines["deploy_canary"]
    dag_run = dag.test(run_conf=full_conf(dag, version=dry, dry_run=True, rollout_mode="window"))
    assert dag_run.state == "success"
    tis = {ti.task_id: ti for ti in dag_run.get_task_instances()}
    assert tis["stage_6_canary_fleet.canary_verified"].state == "skipped"
    plan = tis["stage_3_staging_fleet.deploy"].xcom_pull(task_ids="stage_3_staging_fleet.deploy")
    assert plan["dry_run"] and {p["host"] for p in plan["plan"]} >= {"web-01-sv-gstg", "sidekiq-01-sv-gstg"}
    assert plan["modes"] and set(plan["modes"].values()) == {"window"}, plan["modes"]  # the form's choice
    after = audit.read_text() if audit.exists() else ""
    changed = [line for line in after[len(before):].splitlines()
               if not any(q in line for q in ("dpkg-query", "gitlab-ctl status", "db:migrate:status",
                                                 "gitlab-chef-role show"))]
    assert not installs_of(e2e_lab, dry)
    assert changed == [], "a dry run only reads"


def test_canary_deploys_a_good_build_through_six_stages(pipelines, e2e_lab: Lab):
    e2e_lab.build_add(GOOD, nightly=True)
    state, tasks = run(pipelines["deploy_canary"], version=GOOD)
    assert state == "success", tasks
    assert set(versions(e2e_lab, "gstg").values()) == {(GOOD, GOOD)}
    assert set(versions(e2e_lab, "gprd-cny").values()) == {(GOOD, GOOD)}
    assert set(versions(e2e_lab, "gprd").values()) == {(BASE, BASE)}
    staging_db, production_db = migrations(e2e_lab, "gstg"), migrations(e2e_lab, "gprd")
    assert any("regular" in m and "1001" in m for m in staging_db)
    assert any("post" in m and "1001" in m for m in staging_db)
    assert any("regular" in m and "1001" in m for m in production_db)
    assert not any("post" in m and "1001" in m for m in production_db), "post migrations wait for stage 9"
    assert canary_main_weights(e2e_lab) == {0}
    with urllib.request.urlopen(f"http://{e2e_lab.config.pushgateway_addr}/metrics", timeout=10) as resp:
        pushed = resp.read().decode()
    assert 'liftoff_stage_duration_seconds{' in pushed and 'pipeline="deploy_canary"' in pushed
    assert 'stage="stage_6"' in pushed
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session

    with create_session() as session:
        latest = (session.query(AssetEvent).join(AssetModel, AssetEvent.asset_id == AssetModel.id)
                  .filter(AssetModel.uri.like("liftoff://canary-verified%"))
                  .order_by(AssetEvent.timestamp.desc()).first())
        assert latest.source_dag_id == "deploy_canary" and latest.extra.get("version") == GOOD


def test_production_promotes_the_verified_build(pipelines, e2e_lab: Lab):
    state, tasks = run(pipelines["deploy_production"], version=GOOD)
    assert state == "success", tasks
    assert tasks["approval"] == "skipped"
    assert set(versions(e2e_lab, "gprd").values()) == {(GOOD, GOOD)}
    assert any("post" in m and "1001" in m for m in migrations(e2e_lab, "gprd"))
    assert canary_main_weights(e2e_lab) == {5}


def test_production_refuses_a_version_canary_did_not_verify(pipelines, e2e_lab: Lab):
    e2e_lab.build_add(QA_BAD_HALT, nightly=True, qa_fails=True)
    state, tasks = run(pipelines["deploy_production"], version=QA_BAD_HALT)
    assert state == "failed"
    assert tasks["resolve_version"] == "failed"
    assert not installs_of(e2e_lab, QA_BAD_HALT)


def test_qa_failure_halts_when_asked(pipelines, e2e_lab: Lab):
    state, tasks = run(pipelines["deploy_canary"], version=QA_BAD_HALT, on_failure="halt")
    assert state == "failed"
    assert tasks["stage_3_staging_fleet.qa"] == "failed"
    assert tasks["halt"] == "success" and tasks["rollback"] == "skipped"
    # halted: staging keeps the build QA rejected, canary is untouched; nothing left locked
    assert set(fleet_hosts(e2e_lab, "gstg").values()) == {(QA_BAD_HALT, QA_BAD_HALT)}
    assert set(versions(e2e_lab, "gprd-cny").values()) == {(GOOD, GOOD)}
    from liftoff.inventory import load_inventory
    from liftoff.store import Store

    store = Store.from_settings(load_inventory())
    assert store.get_lock("gstg") is None
    assert store.deployments("gstg")[0].status == "halted"


def test_qa_failure_rolls_back_when_asked(pipelines, e2e_lab: Lab):
    e2e_lab.build_add(QA_BAD_ROLLBACK, nightly=True, qa_fails=True)
    state, tasks = run(pipelines["deploy_canary"], version=QA_BAD_ROLLBACK, on_failure="rollback")
    assert state == "failed"
    assert tasks["rollback"] == "success"
    assert set(fleet_hosts(e2e_lab, "gstg").values()) == {(GOOD, GOOD)}


def test_error_rate_build_is_stopped_and_rolled_back(pipelines, e2e_lab: Lab):
    e2e_lab.build_add(ERRORS, nightly=True, error_rate=0.5)
    state, tasks = run(pipelines["deploy_canary"], version=ERRORS, quiet_period_seconds=30)
    assert state == "failed"
    failed = {t for t, s in tasks.items() if s == "failed"}
    assert failed & {"stage_3_staging_fleet.qa", "stage_3_staging_fleet.quiet_period"}, tasks
    assert tasks["rollback"] == "success"
    assert set(fleet_hosts(e2e_lab, "gstg").values()) == {(GOOD, GOOD)}
    assert set(fleet_hosts(e2e_lab, "gprd-cny").values()) == {(GOOD, GOOD)}


def test_slow_build_is_stopped_by_the_alert_gate(pipelines, e2e_lab: Lab):
    e2e_lab.build_add(SLOW, nightly=True, latency_ms=1500)
    wait_quiet(e2e_lab, "gstg")
    state, tasks = run(pipelines["deploy_canary"], version=SLOW, quiet_period_seconds=40)
    assert state == "failed"
    assert tasks["stage_3_staging_fleet.qa"] == "success"
    assert tasks["stage_3_staging_fleet.quiet_period"] == "failed"
    assert tasks["rollback"] == "success"
    assert set(fleet_hosts(e2e_lab, "gstg").values()) == {(GOOD, GOOD)}


def _post_alert(lab: Lab, ends_in: timedelta) -> None:
    now = datetime.now(UTC)
    body = json.dumps([{
        "labels": {"alertname": "ManualCritical", "env": "gstg", "severity": "critical"},
        "annotations": {"summary": "test: an incident is open"},
        "startsAt": (now - timedelta(minutes=10)).isoformat(), "endsAt": (now + ends_in).isoformat(),
    }]).encode()
    req = urllib.request.Request(f"http://{lab.config.alertmanager_addr}/api/v2/alerts", data=body,
                                 method="POST", headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=10).close()


def test_critical_alert_before_start_keeps_every_host_untouched(pipelines, e2e_lab: Lab):
    e2e_lab.build_add(BLOCKED, nightly=True)
    wait_quiet(e2e_lab, "gstg")
    _post_alert(e2e_lab, timedelta(minutes=5))
    e2e_lab.wait_for("the critical alert", lambda: e2e_lab.alerts(alertname="ManualCritical"), 30)
    before = versions(e2e_lab, "gstg")
    try:
        state, tasks = run(pipelines["deploy_canary"], version=BLOCKED)
    finally:
        _post_alert(e2e_lab, timedelta(seconds=-1))
    assert state == "failed"
    assert tasks["stage_1_staging_migrations.precheck"] == "failed"
    assert tasks["stage_1_staging_migrations.begin_env"] == "upstream_failed"
    assert not installs_of(e2e_lab, BLOCKED)
    assert versions(e2e_lab, "gstg") == before


def test_scheduled_runs_take_the_newest_nightly(pipelines, e2e_lab: Lab):
    from liftoff.builds import newest_nightly
    from liftoff.inventory import load_inventory

    e2e_lab.build_add("17.7.1-ee.0")  # an official build is not a nightly
    assert newest_nightly(load_inventory()) == BLOCKED
