"""The operation DAGs end to end on a real lab (octet 47): rollback and its safety check,
post-deployment patches and the canary halt, canary weight, fast deploy (an internal build
too), locks by hand, synthetic traffic.

DAGs run with ``dag.test()`` (tasks in this process, deferred triggers inline) on the test
session's own metadata DB (``airflow_db``, tests/e2e/conftest.py). A few
set-up deploys call the pipeline steps directly (the DAG would add nothing there). The tests
share the lab and run in file order: each starts from the state the previous one left.
"""

from __future__ import annotations

import json
import re
import urllib.request
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from tests.labkit import Lab, canary_lb_view, canary_weights, running_lab

pytestmark = [pytest.mark.lab, pytest.mark.airflow]

OCTET = 47
BASE = "17.5.0-ee.0"  # what every lab host runs at first
BAD_CANARY = "17.6.0-ee.0"  # QA fails on it
POST_MIGRATED = "17.7.0-ee.0"  # its post-deployment migration runs
NO_PATCH = "17.7.1-ee.0"
WITH_PATCH = "17.7.2-ee.0"
BAD_PRODUCTION = "17.7.3-ee.0"
FAST = "17.8.0-ee.0"
INTERNAL = "17.8.1-ee.0"
ERRORS = "17.8.2-ee.0"  # half its requests fail
PATCH = "sec-2026-42"
DAGS = Path(__file__).resolve().parents[2] / "dags"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory):
    with running_lab(tmp_path_factory.mktemp("ops-lab"), OCTET, "--install-seconds", "0.2") as lab:
        mp = pytest.MonkeyPatch()
        for name, value in lab.env.items():
            mp.setenv(name, value)
        mp.delenv("LIFTOFF_STATE_URL", raising=False)
        try:
            yield lab
        finally:
            mp.undo()


@pytest.fixture(scope="module")
def dagbag(airflow_db, lab):
    """The DAGs parsed with this lab's inventory, on the session's metadata DB (tests/e2e/conftest.py)."""
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAGS))
    mine = ("rollback", "fast_deploy", "post_deploy_patch", "canary_weight", "deploy_lock", "traffic")
    assert not {f: e for f, e in bag.import_errors.items() if Path(f).stem in (*mine, "deploy_canary")}
    bag.pristine = {dag_id: dag.params.dump() for dag_id, dag in bag.dags.items()}
    return bag


class Result:
    def __init__(self, dag_run):
        self.state = str(dag_run.state)
        self.tis = {ti.task_id: ti for ti in dag_run.get_task_instances()}

    def task(self, task_id: str) -> str:
        return str(self.tis[task_id].state)

    def xcom(self, task_id: str):
        return self.tis[task_id].xcom_pull(task_ids=task_id)


def run_dag(dagbag, dag_id: str, conf: dict, only: list[str] | None = None) -> Result:
    """``dag.test`` with every param given: an in-process run leaves its conf in the parsed DAG's
    params, so a param left out would take the previous run's value."""
    dag = dagbag.dags[dag_id]
    conf = {**dagbag.pristine[dag_id], **conf}
    if only:
        dag = dag.partial_subset(task_ids=only, include_upstream=False, include_downstream=False)
    return Result(dag.test(run_conf={"requested_by": "tester", **conf}))


def store():
    from liftoff.store import Store

    return Store.from_settings()


def deploy(version: str, env: str, *, post: bool = False) -> None:
    """Set-up: the canary pipeline's steps for one environment (no gates)."""
    from liftoff.deploy import begin_env, deploy_roles, finish_env, migrate
    from liftoff.runs import Run

    run = Run(run_id=f"setup-{env}-{version}", pipeline="deploy_canary")
    begin_env(run, env, version, run.store.current_version(env) or BASE)
    migrate(run, env, version, post=False)
    deploy_roles(run, env, version, stage="gitaly")
    deploy_roles(run, env, version, stage="fleet")
    if post:
        migrate(run, env, version, post=True)
    finish_env(run, env, version)


def hosts(lab: Lab, env: str) -> dict[str, dict]:
    return {h["name"]: h for h in lab.status()["environments"][env]["hosts"]}


def on_version(lab: Lab, env: str, version: str) -> bool:
    return all(h["installed"] == version and h["running"] == version for h in hosts(lab, env).values())


def audit(lab: Lab) -> list[tuple[datetime, str, str]]:
    out = []
    for line in lab.config.path("state", "audit.log").read_text().splitlines():
        when, host, _code, _secs, command = line.split("\t", 4)
        out.append((datetime.fromisoformat(when.replace("Z", "+00:00")), host, command))
    return out


def pushgateway(lab: Lab) -> str:
    with urllib.request.urlopen(f"http://{lab.config.pushgateway_addr}/metrics", timeout=10) as resp:
        return resp.read().decode()


# -- rollback ----------------------------------------------------------------------------------------

def test_rollback_after_a_bad_canary_restores_every_host_fleet_before_gitaly(lab, dagbag):
    lab.build_add(BAD_CANARY, qa_fails=True)
    deploy(BAD_CANARY, "gprd-cny")
    assert on_version(lab, "gprd-cny", BAD_CANARY)

    check = run_dag(dagbag, "rollback", {"environment": "gprd-cny", "check_only": True})
    assert check.state == "success" and check.task("begin_rollback") == "skipped"
    answer = check.xcom("safety_check")
    assert answer["safe"] is True and answer["reasons"] == [] and answer["newer_post_migrations"] == []
    assert (answer["current"], answer["target"]) == (BAD_CANARY, BASE)
    assert answer["command"] == f"liftoff rollback gprd-cny --to {BASE}"

    started = datetime.now().astimezone()
    result = run_dag(dagbag, "rollback", {"environment": "gprd-cny", "reason": "QA fails on the canary",
                                          "quiet_period_seconds": 5, "rollout_mode": "window"})
    assert result.state == "success", result.tis
    for task in ("rollback_fleet", "rollback_gitaly", "qa", "quiet_period", "rollback_done"):
        assert result.task(task) == "success"
    for task in ("rollback_fleet", "rollback_gitaly"):  # the form's rollout mode, for every role
        roles = result.xcom(task)["roles"]
        assert roles and {r["mode"] for r in roles.values()} == {"window"}, (task, roles)
    assert on_version(lab, "gprd-cny", BASE)

    installs = {host: when for when, host, command in audit(lab)
                if when >= started and command == f"apt-get install -y gitlab-ee={BASE}"}
    canary = hosts(lab, "gprd-cny")
    assert set(installs) == set(canary)  # every canary host (and its deploy node) was rolled back
    gitaly = [h for h in installs if h.startswith("gitaly-")]
    fleet = [h for h in installs if not h.startswith(("gitaly-", "deploy-"))]
    assert gitaly and len(fleet) == 8  # web 3, api 2, git 2, sidekiq 1
    assert max(installs[h] for h in fleet) < min(installs[h] for h in gitaly)

    s = store()
    latest = s.deployments("gprd-cny")[0]
    assert (latest.kind, latest.version, latest.status) == ("rollback", BASE, "success")
    assert s.get_lock("gprd-cny") is None
    assert any(e.reason == f"rollback to {BASE}, normal mode: QA fails on the canary"
               for e in s.lock_events("gprd-cny"))
    # no production traffic on the canary while it was rolled back
    assert canary_weights(lab) == {0}


def test_rollback_check_is_safe_before_post_migrations_and_unsafe_after(lab, dagbag):
    from liftoff.deploy import migrate
    from liftoff.locks import release_locks
    from liftoff.runs import Run

    lab.build_add(POST_MIGRATED)
    deploy(POST_MIGRATED, "gprd-cny")
    before = run_dag(dagbag, "rollback", {"environment": "gprd-cny", "check_only": True}).xcom("safety_check")
    assert before["safe"] is True and (before["current"], before["target"]) == (POST_MIGRATED, BASE)

    setup = Run(run_id="setup-post-migrations")
    migrate(setup, "gprd-cny", POST_MIGRATED, post=True)
    release_locks(setup, ["gprd-cny"])  # a pipeline step keeps the lock it took: the run's end releases it
    after = run_dag(dagbag, "rollback", {"environment": "gprd-cny", "check_only": True}).xcom("safety_check")
    # 17.7.0's db:migrate also ran 17.6.0's post migration (never run before): both are newer than BASE
    applied = lab.status()["environments"]["gprd"]["migrations"]
    newer = sorted(m for m in applied if "_post_" in m and not m.endswith("_post_17_5_0_ee_0"))
    assert [m.split("_post_")[1] for m in newer] == ["17_6_0_ee_0", "17_7_0_ee_0"]
    assert after["safe"] is False and after["newer_post_migrations"] == newer
    assert any(newer[-1] in r for r in after["reasons"]) and after["target"] == BASE
    assert after["command"] == f"liftoff rollback gprd-cny --to {BASE}"

    refused = run_dag(dagbag, "rollback", {"environment": "gprd-cny", "mode": "fast"})
    assert refused.state == "failed" and refused.task("safety_check") == "failed"
    assert refused.task("begin_rollback") == "upstream_failed"
    assert on_version(lab, "gprd-cny", POST_MIGRATED) and store().get_lock("gprd-cny") is None

    forced = run_dag(dagbag, "rollback", {"environment": "gprd-cny", "mode": "fast", "reason": "incident 77",
                                          "override_reason": "column drop is additive, checked by DBRE"})
    assert forced.state == "success"
    assert forced.xcom("safety_check")["overridden"] is True
    assert forced.task("qa") == "skipped" and forced.task("quiet_period") == "skipped"
    assert on_version(lab, "gprd-cny", BASE)
    fleet = forced.xcom("rollback_fleet")
    assert fleet["mode"] == "fast" and all(len(b) == 1 for r in fleet["roles"].values() for b in r["batches"])
    reasons = [e.reason for e in store().lock_events("gprd-cny")]
    assert (f"rollback to {BASE}, fast mode: incident 77, safety check overridden: column drop is additive, "
            "checked by DBRE") in reasons


# -- post-deployment patches ---------------------------------------------------------------------------

def test_patch_halts_deploy_canary_until_a_build_includes_it(lab, dagbag, capfd):
    patch_text = "--- a/app/models/user.rb\n+++ b/app/models/user.rb\n@@ -1 +1 @@\n-old\n+new\n"
    applied = run_dag(dagbag, "post_deploy_patch", {
        "environment": "gprd-cny", "patch_id": PATCH, "patch": patch_text, "roles": ["web", "api"],
        "reason": "security fix for issue 42"})
    assert applied.state == "success" and applied.task("lift_halt_on_purpose") == "skipped"
    patched = {n for n, h in hosts(lab, "gprd-cny").items() if PATCH in h["patches"]}
    assert patched == {"web-cny-01-sv-gprd", "web-cny-02-sv-gprd", "web-cny-03-sv-gprd",
                       "api-cny-01-sv-gprd", "api-cny-02-sv-gprd"}
    s = store()
    record = s.patches("gprd-cny")[0]
    assert (record.patch_id, record.status, set(record.hosts)) == (PATCH, "applied", patched)
    assert json.loads(record.detail)["patch"] == patch_text
    assert s.active_halt().patch_id == PATCH

    lab.build_add(NO_PATCH)
    capfd.readouterr()
    halted = run_dag(dagbag, "deploy_canary", {"version": NO_PATCH, "quiet_period_seconds": 1})
    out = capfd.readouterr()
    assert halted.state == "failed" and halted.task("resolve_version") == "failed"
    assert re.search(rf"halted by post-deployment patch {PATCH}", out.out + out.err)
    assert not [t for t, ti in halted.tis.items() if "stage_" in t and str(ti.state) == "success"]
    assert on_version(lab, "gstg", BASE) and store().active_halt().patch_id == PATCH

    lab.build_add(WITH_PATCH, includes_patches=[PATCH])
    started = run_dag(dagbag, "deploy_canary", {"version": WITH_PATCH}, only=["resolve_version"])
    assert started.state == "success" and started.xcom("resolve_version") == WITH_PATCH
    assert store().active_halt().patch_id == PATCH, "lifted only once canary runs the build"
    lifted = run_dag(dagbag, "deploy_canary", {"version": WITH_PATCH, "quiet_period_seconds": 1})
    assert lifted.state == "success"
    s = store()
    assert s.active_halt() is None
    assert s.halts()[0].lifted_reason == f"build {WITH_PATCH} includes patch {PATCH}"

    # a second patch, lifted on purpose with a reason
    again = run_dag(dagbag, "post_deploy_patch", {
        "environment": "gprd-cny", "patch_id": "sec-2026-43", "patch": "diff", "roles": ["sidekiq"],
        "reason": "mitigate a slow query"})
    assert again.state == "success" and store().active_halt().patch_id == "sec-2026-43"
    lift = run_dag(dagbag, "post_deploy_patch", {
        "environment": "gprd-cny", "action": "lift_halt", "patch_id": "sec-2026-43",
        "reason": "reverted the slow query"})
    assert lift.state == "success" and lift.task("apply_patch") == "skipped"
    halt = store().halts()[0]
    assert (halt.patch_id, halt.lifted_by, halt.lifted_reason) == ("sec-2026-43", "tester",
                                                                   "reverted the slow query")


# -- canary weight ---------------------------------------------------------------------------------

def test_canary_weight_on_every_lb_and_refused_during_a_canary_deploy(lab, dagbag):
    up = run_dag(dagbag, "canary_weight", {"weight": 20})
    assert up.state == "success" and up.xcom("set_weight")["converged"] == ["fe-01-lb-gprd", "fe-02-lb-gprd"]
    views = canary_lb_view(lab)
    assert set(views) == {"fe-01-lb-gprd", "fe-02-lb-gprd"}
    for view in views.values():
        assert {w for (b, _), (_, w) in view.items() if not b.startswith("canary")} == {20}
        assert {w for (b, _), (_, w) in view.items() if b.startswith("canary")} == {100}

    s = store()
    s.acquire("gprd-cny", "deploy_canary-other-run", "deployer", "deploy_canary 17.9.0-ee.0")
    try:
        lower = run_dag(dagbag, "canary_weight", {"weight": 10})
        assert lower.state == "failed" and canary_weights(lab) == {20}
        drain = run_dag(dagbag, "canary_weight", {"weight": "drain"})
        assert drain.state == "failed"
        assert {st for view in canary_lb_view(lab).values() for st, _ in view.values()} == {"UP"}
        assert run_dag(dagbag, "canary_weight", {"weight": 30}).state == "success"  # more traffic: fine
        assert canary_weights(lab) == {30}
        forced = run_dag(dagbag, "canary_weight", {"weight": "drain", "force": True})
        assert forced.state == "success"
        assert {st for view in canary_lb_view(lab).values() for st, _ in view.values()} == {"DRAIN"}
    finally:
        s.release("gprd-cny", "deploy_canary-other-run")
    assert run_dag(dagbag, "canary_weight", {"weight": "ready"}).state == "success"
    assert run_dag(dagbag, "canary_weight", {"weight": 5}).state == "success"
    assert {st for view in canary_lb_view(lab).values() for st, _ in view.values()} == {"UP"}
    assert canary_weights(lab) == {5}


def test_production_rollback_drains_canary_first(lab, dagbag):
    deploy(WITH_PATCH, "gprd")  # contains every post-deployment migration run so far
    lab.build_add(BAD_PRODUCTION)
    deploy(BAD_PRODUCTION, "gprd")
    result = run_dag(dagbag, "rollback", {"environment": "gprd", "reason": "errors after the promotion",
                                          "quiet_period_seconds": 3})
    assert result.state == "success", result.tis
    check = result.xcom("safety_check")
    assert check["safe"] is True and (check["current"], check["target"]) == (BAD_PRODUCTION, WITH_PATCH)
    assert result.tis["shield_traffic"].end_date <= result.tis["begin_rollback"].start_date
    assert result.xcom("shield_traffic")["action"] == "drained canary gprd-cny"
    assert result.task("qa") == "success"  # canary (another version) answered no QA request
    assert on_version(lab, "gprd", WITH_PATCH)
    assert {st for view in canary_lb_view(lab).values() for st, _ in view.values()} == {"DRAIN"}
    assert run_dag(dagbag, "canary_weight", {"weight": "ready"}).state == "success"
    assert {st for view in canary_lb_view(lab).values() for st, _ in view.values()} == {"UP"}


# -- fast deploy -------------------------------------------------------------------------------------

def test_fast_deploy_records_its_reason_and_hides_an_internal_version(lab, dagbag):
    lab.build_add(FAST)
    result = run_dag(dagbag, "fast_deploy", {"environment": "gstg", "version": FAST,
                                             "reason": "CVE-2026-1111 critical fix"})
    assert result.state == "success" and on_version(lab, "gstg", FAST)
    assert "qa" not in result.tis and "quiet_period" not in result.tis
    fleet_modes = {r["mode"] for r in result.xcom("deploy_fleet")["roles"].values()}
    assert fleet_modes == {"lockstep"}  # the trigger form's default: each role's own (the lab's: lockstep)
    assert result.xcom("finish_env")["metric_pushed"] is True
    metrics = pushgateway(lab)
    assert re.search(r'liftoff_fast_deploy_info\{[^}]*env="gstg"[^}]*reason="CVE-2026-1111 critical fix"'
                     rf'[^}}]*version="{re.escape(FAST)}"\}} 1', metrics)
    assert re.search(r'liftoff_fast_deploys_total\{[^}]*env="gstg"[^}]*\} 1', metrics)
    reasons = [e.reason for e in store().lock_events("gstg")]
    assert f"fast_deploy {FAST}: CVE-2026-1111 critical fix" in reasons

    lab.build_add(INTERNAL)
    internal = run_dag(dagbag, "fast_deploy", {"environment": "gstg", "version": INTERNAL, "internal": True,
                                               "reason": f"embargoed security fix in {INTERNAL}",
                                               "rollout_mode": "window"})
    assert internal.state == "success" and on_version(lab, "gstg", INTERNAL)
    for stage in ("deploy_gitaly", "deploy_fleet"):  # the form's choice, for every role of the run
        roles = internal.xcom(stage)["roles"]
        assert roles and {r["mode"] for r in roles.values()} == {"window"}, (stage, roles)
    metrics = pushgateway(lab)
    assert INTERNAL not in metrics
    assert re.search(r'liftoff_deployed_version_info\{[^}]*env="gstg"[^}]*version="internal"\} 1', metrics)
    assert re.search(r'liftoff_fast_deploy_info\{[^}]*reason="embargoed security fix in internal"'
                     r'[^}]*version="internal"\} 1', metrics)
    assert re.search(r'liftoff_fast_deploys_total\{[^}]*env="gstg"[^}]*\} 2', metrics)
    assert store().deployments("gstg")[0].version == INTERNAL  # liftoff's own records keep it


# -- locks by hand ------------------------------------------------------------------------------------

def test_deploy_lock_by_hand_stops_deploys_until_unlocked(lab, dagbag):
    from liftoff.checks import precheck
    from liftoff.errors import PrecheckFailed
    from liftoff.runs import Run

    locked = run_dag(dagbag, "deploy_lock", {"environment": "gstg", "action": "lock",
                                             "reason": "change freeze for the incident"})
    assert locked.state == "success"
    lock = store().get_lock("gstg")
    assert (lock.run_id, lock.who) == ("manual-tester", "tester") and "change freeze" in lock.reason
    with pytest.raises(PrecheckFailed, match="locked by tester"):
        precheck(Run(run_id="some-deploy"), "gstg", INTERNAL)
    unlocked = run_dag(dagbag, "deploy_lock", {"environment": "gstg", "action": "unlock",
                                               "reason": "incident over"})
    assert unlocked.state == "success" and unlocked.xcom("change_lock")["removed"]["by_hand"] is True
    assert store().get_lock("gstg") is None
    event = store().lock_events("gstg")[0]
    assert (event.action, event.who, event.reason) == ("force_release", "tester", "incident over")
    typo = run_dag(dagbag, "deploy_lock", {"environment": "gstg", "action": "lock", "reason": "freeze",
                                           "resaon": "a misspelt key"})
    assert typo.state == "failed" and store().get_lock("gstg") is None


# -- traffic -------------------------------------------------------------------------------------------

def test_traffic_shows_a_bad_staging_build(lab, dagbag, tmp_path):
    from liftoff import traffic

    # liftoff's alert rules on its traffic metrics, loaded into the lab's Prometheus
    rules = tmp_path / "liftoff-traffic.yml"
    rules.write_text(yaml.safe_dump(traffic.alert_rules(window="10s", for_="1s")))
    loaded = lab.cli("rules", str(rules), "--name", "liftoff-traffic")
    assert loaded.returncode == 0, loaded.stderr
    lab.build_add(ERRORS, error_rate=0.5)
    deploy(ERRORS, "gstg")
    result = run_dag(dagbag, "traffic", {"environments": ["gstg", "gprd-cny"], "rps": 10, "duration_s": 8})
    assert result.state == "success"
    summary = result.xcom("send_traffic")["environments"]
    for env in ("gstg", "gprd-cny"):  # 10 ticks a second for 8 seconds, pushed at 5 s and at the end
        assert summary[env]["requests"] + summary[env]["skipped"] in (80, 81)
        assert summary[env]["requests"] >= 40
    assert summary["gstg"]["errors"] >= 5 and summary["gstg"]["codes"].get("500", 0) >= 5
    assert summary["gprd-cny"]["errors"] == 0
    metrics = pushgateway(lab)
    errors: dict[str, float] = {}
    for m in re.finditer(r'liftoff_traffic_errors_total\{[^}]*env="([a-z-]+)"[^}]*\} (\S+)', metrics):
        errors[m.group(1)] = errors.get(m.group(1), 0) + float(m.group(2))
    assert errors.get("gstg", 0) == summary["gstg"]["errors"] and "gprd-cny" not in errors
    assert re.search(r'liftoff_traffic_requests_total\{[^}]*env="gprd-cny"[^}]*job="liftoff_traffic"',
                     metrics)
    # the bad build shows as an alert on staging, with the env label the quiet period reads
    lab.wait_for("SyntheticTrafficErrors on gstg",
                 lambda: lab.alerts(alertname="SyntheticTrafficErrors", env="gstg"), timeout=30)
    assert lab.alerts(alertname="SyntheticTrafficErrors", env="gprd-cny") == []
    # counters that stop moving clear it (later tests gate on gstg's quiet period)
    lab.wait_for("SyntheticTrafficErrors to clear",
                 lambda: not lab.alerts(alertname="SyntheticTrafficErrors"), timeout=60)
