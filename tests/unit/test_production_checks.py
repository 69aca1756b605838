"""GitLab's production checks with a person in the loop, without a lab: an in-memory store, the
unit inventory, an injected clock (a Saturday for the weekly change lock), a fake Prometheus
for the deployment-health query, and the fleet's own reads replaced by fakes.

Rules: the weekly change lock and freeze windows (inventory and ``liftoff freeze``) block;
the deployment health blocks when a service is unhealthy, the answer is empty or Prometheus
does not answer; incidents and change requests block promotion and post-deployment migrations
but not a canary deploy's precheck; a failed check asks the on-call group (``needs_approval``)
unless overridden; an approval with a reason is recorded (who, when, why) and lets exactly the
approved failures pass for that run; a rejection or an approval without a reason ends the run;
three consecutive automatic rollbacks halt canary deploys until a person lifts the halt."""

from __future__ import annotations

import copy
import io
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from liftoff import checks, patches
from liftoff.alerts import AlertClient
from liftoff.chatops import cli
from liftoff.errors import ConfigError, HaltActive, InvalidInput, PrecheckFailed
from liftoff.inventory import parse_inventory
from liftoff.runs import Run
from liftoff.store import Store
from tests.unit.http_fakes import LocalServer, QuietHandler
from tests.unit.test_operations_unit import INVENTORY

V1, V2 = "17.5.0-ee.0", "17.6.0-ee.0"
SATURDAY = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)
WEDNESDAY = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
ON_CALL = [{"id": "ada", "name": "Ada Lovelace"}, {"id": "grace", "name": "Grace Hopper"}]


def inventory(**gprd_extra):
    data = copy.deepcopy(INVENTORY)
    data["environments"]["gprd"].setdefault("extra", {}).update(gprd_extra)
    return parse_inventory(data)


@pytest.fixture()
def store() -> Iterator[Store]:
    s = Store("sqlite://")
    yield s
    s.close()


def make_run(store: Store, run_id: str = "promote-1", **gprd_extra) -> Run:
    return Run(run_id=run_id, who="alice", pipeline="deploy_production", inventory=inventory(**gprd_extra),
               _store=store)


class _Gate:
    ok, reason = True, ""


@pytest.fixture()
def fleet(monkeypatch):
    """The fleet's reads: no alert, LBs fine, every host on V1, canary fine, no incident,
    healthy. Tests change ``state``."""
    state = {"canary": [], "gitlab": [], "health": []}
    monkeypatch.setattr(AlertClient, "from_settings", classmethod(
        lambda cls, inv=None: type("A", (), {"check": lambda self, m, s: _Gate()})()))
    monkeypatch.setattr(checks, "_lb_failures", lambda run, env: [])
    monkeypatch.setattr(checks, "read_installed", lambda run, env: {h.name: V1 for h in env.hosts()})
    monkeypatch.setattr(checks, "_canary_failures", lambda run, cny, env, version: list(state["canary"]))
    monkeypatch.setattr(checks, "gitlab_production_blockers", lambda run, source=None: list(state["gitlab"]))
    monkeypatch.setattr(checks, "health_failures", lambda run, env, source=None: list(state["health"]))
    return state


# -- the clock --------------------------------------------------------------------------------

def test_the_clock_is_injectable_and_refuses_a_time_without_zone(monkeypatch):
    monkeypatch.setenv(checks.CLOCK_ENV, "2026-12-05T12:00:00Z")
    assert checks.clock_now() == SATURDAY
    monkeypatch.setenv(checks.CLOCK_ENV, "2026-12-05T12:00:00")
    with pytest.raises(ConfigError, match="no time zone"):
        checks.clock_now()
    monkeypatch.setenv(checks.CLOCK_ENV, "saturday")
    with pytest.raises(ConfigError, match="not an ISO 8601 time"):
        checks.clock_now()
    monkeypatch.delenv(checks.CLOCK_ENV)
    assert abs((checks.clock_now() - datetime.now(UTC)).total_seconds()) < 5


# -- change lock and freezes --------------------------------------------------------------------

def test_the_weekly_change_lock_blocks_on_saturday_only_where_it_is_on(store, fleet):
    run = make_run(store, change_lock="weekly")
    assert checks.change_window_failures(run, run.env("gprd"), SATURDAY) == [checks.WEEKLY_LOCK_SENTENCE]
    assert checks.change_window_failures(run, run.env("gprd"), WEDNESDAY) == []
    assert checks.change_window_failures(run, run.env("gprd-cny"), SATURDAY) == []
    with pytest.raises(PrecheckFailed, match="weekly production change lock"):
        checks.precheck(run, "gprd", V2, now=SATURDAY)
    assert checks.precheck(run, "gprd", V2, now=WEDNESDAY)["failures"] == []


def test_an_emergency_override_with_a_reason_passes_the_change_lock(store, fleet):
    run = make_run(store, change_lock="weekly")
    result = checks.production_checks(run, V2, now=SATURDAY, override_reason="S1 fix for INC-9", ask=True)
    assert result["overridden"] and result["override_reason"] == "S1 fix for INC-9"
    assert result["failures"] == [checks.WEEKLY_LOCK_SENTENCE] and not result["needs_approval"]


def test_inventory_freeze_windows_block_with_their_reason(store, fleet):
    window = {"from": "2026-12-24T00:00:00Z", "until": "2026-12-27T00:00:00Z", "reason": "holiday freeze"}
    run = make_run(store, freezes=[window])
    env = run.env("gprd")
    assert checks.change_window_failures(run, env, datetime(2026, 12, 23, tzinfo=UTC)) == []
    assert checks.change_window_failures(run, env, datetime(2026, 12, 25, tzinfo=UTC)) == [
        "freeze: gprd is frozen until 2026-12-27 00:00Z by the inventory: holiday freeze"]
    assert checks.change_window_failures(run, env, datetime(2026, 12, 27, tzinfo=UTC)) == []


@pytest.mark.parametrize("bad", [
    "not a list", [{"from": "2026-12-24", "until": "2026-12-27T00:00:00Z", "reason": "x y"}],
    [{"from": "2026-12-27T00:00:00Z", "until": "2026-12-24T00:00:00Z", "reason": "x y"}],
    [{"from": "2026-12-24T00:00:00Z", "until": "2026-12-27T00:00:00Z", "reason": "$(reboot)"}],
])
def test_an_unreadable_inventory_freeze_blocks_instead_of_being_ignored(store, fleet, bad):
    run = make_run(store, freezes=bad)
    [failure] = checks.change_window_failures(run, run.env("gprd"), WEDNESDAY)
    assert failure.startswith("freeze: environment gprd: extra.freezes")


def test_liftoff_freeze_blocks_until_it_ends_or_is_lifted(store, fleet):
    run = make_run(store)
    result = checks.freeze_env(run, "gprd", "CR-77 database failover", duration="2h", now=WEDNESDAY)
    assert result["until"] == (WEDNESDAY + timedelta(hours=2)).isoformat() and result["who"] == "alice"
    env = run.env("gprd")
    [failure] = checks.change_window_failures(run, env, WEDNESDAY + timedelta(minutes=30))
    assert failure == ("freeze: gprd is frozen until 2026-12-02 14:00Z by alice (since 2026-12-02 12:00Z): "
                       "CR-77 database failover")
    assert checks.change_window_failures(run, run.env("gprd-cny"), WEDNESDAY) == []
    assert checks.change_window_failures(run, env, WEDNESDAY + timedelta(hours=2)) == []
    lifted = checks.unfreeze_env(run, "gprd", "failover done", now=WEDNESDAY + timedelta(hours=1))
    assert [f["reason"] for f in lifted["lifted"]] == ["CR-77 database failover"]
    assert checks.change_window_failures(run, env, WEDNESDAY + timedelta(minutes=90)) == []
    [f] = store.freezes("gprd")
    assert (f.lifted_by, f.lifted_reason) == ("alice", "failover done")


@pytest.mark.parametrize("kwargs, message", [
    ({"duration": "2h", "until": "2026-12-03T00:00:00Z"}, "either --until"),
    ({}, "either --until"),
    ({"until": "2026-12-01T00:00:00Z"}, "not in the future"),
    ({"until": "2026-12-03T00:00:00"}, "no time zone"),
    ({"duration": "2 fortnights"}, "not like 90m"),
    ({"duration": "0h"}, "is zero"),
    ({"duration": "40d"}, "at most 30 days"),
    ({"duration": "9999999999999999999w"}, "longer than ten years"),
])
def test_bad_freeze_input_is_one_sentence_and_stores_nothing(store, kwargs, message):
    run = make_run(store)
    with pytest.raises(InvalidInput, match=message):
        checks.freeze_env(run, "gprd", "CR-1 failover", now=WEDNESDAY, **kwargs)
    with pytest.raises(InvalidInput):
        checks.freeze_env(run, "gprd", "bad; reason", now=WEDNESDAY, duration="1h")
    assert store.freezes() == []


# -- deployment health on Prometheus ---------------------------------------------------------------

class FakePrometheus:
    def __init__(self) -> None:
        self.answer: object = {"status": "success", "data": {"resultType": "vector", "result": []}}
        self.status = 200
        self.queries: list[str] = []
        fake = self

        class Handler(QuietHandler):
            def do_GET(self):  # noqa: N802
                from urllib.parse import parse_qs, urlsplit

                parts = urlsplit(self.path)
                fake.queries.append(parse_qs(parts.query).get("query", [""])[0])
                if parts.path != "/api/v1/query":
                    return self.reply(404, {"status": "error"})
                return self.reply(fake.status, fake.answer)

        self.http = LocalServer(Handler)
        self.url = self.http.url

    def services(self, **values: float) -> None:
        self.answer = {"status": "success", "data": {"resultType": "vector", "result": [
            {"metric": {"env": "gprd", "type": name}, "value": [1, str(v)]} for name, v in values.items()]}}


@pytest.fixture()
def prometheus(monkeypatch) -> Iterator[FakePrometheus]:
    fake = FakePrometheus()
    monkeypatch.delenv("LIFTOFF_INVENTORY", raising=False)
    monkeypatch.setenv("AIRFLOW_CONN_LIFTOFF_PROMETHEUS", json.dumps({"conn_type": "http", "host": fake.url}))
    yield fake
    fake.http.close()


def test_every_service_healthy_passes_with_the_default_query(store, prometheus):
    run = make_run(store)
    prometheus.services(web=1, api=1, gitaly=1)
    assert checks.health_failures(run, "gprd") == []
    assert prometheus.queries == ['gitlab_deployment_health:service{env="gprd"}']


def test_an_unhealthy_service_blocks_naming_it(store, prometheus):
    run = make_run(store, deployment_health_query='min by (type) (up{env="$env",job="app"})')
    prometheus.services(web=1, api=0, sidekiq=float("nan"))
    assert checks.health_failures(run, "gprd") == [
        "deployment health: unhealthy on gprd: api (0), sidekiq (nan)"]
    assert prometheus.queries == ['min by (type) (up{env="gprd",job="app"})']


def test_an_empty_answer_is_no_proof_of_health(store, prometheus):
    run = make_run(store)
    assert checks.health_failures(run, "gprd") == [
        'deployment health: the query gitlab_deployment_health:service{env="gprd"} returned nothing: '
        "no proof that gprd is healthy"]


@pytest.mark.parametrize("status, answer, why", [
    (500, {"status": "error"}, "HTTP 500"),
    (200, {"status": "error", "error": "parse error"}, "not a success"),
    (200, {"status": "success", "data": {"resultType": "matrix", "result": []}}, "not a vector"),
    (200, "not json at all", "Error"),
])
def test_a_refusing_prometheus_fails_closed(store, prometheus, status, answer, why):
    run = make_run(store)
    prometheus.status, prometheus.answer = status, answer
    [sentence] = checks.health_failures(run, "gprd")
    assert sentence.startswith(f"deployment health: cannot query Prometheus at {prometheus.url} (")
    assert why in sentence and sentence.endswith("production changes stay blocked until it answers")


def test_an_unreachable_prometheus_fails_closed(store):
    run = make_run(store)
    down = checks.DeploymentHealth("http://127.0.0.1:9", 'up{env="gprd"}', timeout=2)
    [sentence] = checks.health_failures(run, "gprd", down)
    assert sentence.startswith("deployment health: cannot query Prometheus at http://127.0.0.1:9 (")


# -- who blocks what --------------------------------------------------------------------------------

def test_incidents_block_promotion_but_not_a_canary_deploy(store, fleet):
    fleet["gitlab"] = ['active severity::2 incident: #5 "API errors" (http://x/5)']
    run = make_run(store, on_call=ON_CALL)
    assert checks.precheck(run, "gprd-cny", V2, now=WEDNESDAY)["failures"] == []  # canary deploy
    assert checks.precheck(run, "gprd", V2, now=WEDNESDAY)["failures"] == []  # a stage's precheck
    for step in checks.STEPS:
        result = checks.production_checks(run, V2, now=WEDNESDAY, step=step, ask=True)
        assert result["needs_approval"] and result["failures"] == fleet["gitlab"]
        assert result["on_call"] == ON_CALL and result["step"] == step
    with pytest.raises(PrecheckFailed, match="severity::2 incident"):
        checks.production_checks(run, V2, now=WEDNESDAY)  # without ask: fails outright, as before


def test_every_check_passing_asks_nobody(store, fleet):
    result = checks.production_checks(make_run(store, on_call=ON_CALL), V2, now=WEDNESDAY, ask=True)
    assert result["failures"] == [] and result["needs_approval"] is False and "on_call" not in result


def test_every_failing_check_is_listed(store, fleet):
    fleet.update(canary=["canary not in service: web-cny-01-sv-gprd (MAINT)"],
                 gitlab=["change request in progress: #9 \"Patroni\" (http://x/9)"],
                 health=["deployment health: unhealthy on gprd: api (0)"])
    store.add_freeze("gprd", "bob", "CR-9 failover", WEDNESDAY - timedelta(hours=1),
                     WEDNESDAY + timedelta(hours=1))
    run = make_run(store, change_lock="weekly")
    result = checks.production_checks(run, V2, now=SATURDAY - timedelta(days=3), ask=True)
    assert [f.split(":")[0] for f in result["failures"]] == [
        "freeze", "canary not in service", "change request in progress", "deployment health"]
    result = checks.production_checks(run, V2, now=SATURDAY, ask=True)
    assert result["failures"][0] == checks.WEEKLY_LOCK_SENTENCE


def test_on_call_shapes(store):
    assert checks.on_call(inventory(on_call="ada"), "gprd") == [{"id": "ada", "name": "ada"}]
    assert checks.on_call(inventory(on_call=[{"id": "ada"}, "grace"]), "gprd") == [
        {"id": "ada", "name": "ada"}, {"id": "grace", "name": "grace"}]
    assert checks.on_call(inventory(), "gprd") == []
    with pytest.raises(InvalidInput, match="extra.on_call entries"):
        checks.on_call(inventory(on_call=[{"name": "no id"}]), "gprd")


# -- the person's answer --------------------------------------------------------------------------

def answer(option: str, reason: str | None = "S2 is the bug this build fixes", who: str = "ada") -> dict:
    return {"chosen_options": [option], "params_input": {"reason": reason} if reason is not None else {},
            "responded_by_user": {"id": who, "name": who}, "responded_at": "2026-12-05T12:05:00+00:00"}


def test_an_approval_with_a_reason_is_recorded_and_passes_exactly_what_was_approved(store, fleet):
    run = make_run(store, change_lock="weekly", on_call=ON_CALL)
    result = checks.production_checks(run, V2, now=SATURDAY, ask=True)
    decided = checks.approve_checks(run, result, answer("Approve"))
    assert decided["approved"] and decided["who"] == "ada"
    assert decided["reason"] == "S2 is the bug this build fixes"
    [record] = store.check_approvals(run_id=run.run_id)
    assert (record.who, record.env, record.step, record.failures) == (
        "ada", "gprd", "promotion", (checks.WEEKLY_LOCK_SENTENCE,))
    [event] = [e for e in store.lock_events("gprd") if e.action == "checks_approved"]
    assert event.who == "ada" and "S2 is the bug this build fixes" in event.reason
    # the stages' prechecks of this run pass the approved failure, and post-migration checks do too
    assert checks.precheck(run, "gprd", V2, now=SATURDAY)["approved"][0]["who"] == "ada"
    again = checks.production_checks(run, V2, now=SATURDAY, step="post_migrations", ask=True)
    assert not again["needs_approval"] and again["approved_earlier"][0]["reason"] == decided["reason"]
    # ... but not a new failure, and not another run
    fleet["gitlab"] = ['active severity::1 incident: #6 "DB down" (http://x/6)']
    assert checks.production_checks(run, V2, now=SATURDAY, step="post_migrations", ask=True)["failures"] == \
        fleet["gitlab"]
    with pytest.raises(PrecheckFailed, match="weekly production change lock"):
        checks.precheck(make_run(store, "another-run", change_lock="weekly"), "gprd", V2, now=SATURDAY)


@pytest.mark.parametrize("reply, message", [
    (answer("Reject"), "failed and were not approved"),
    (None, "failed and were not approved"),  # timed out with no answer kept
    (answer("Approve", reason=None), "without a usable reason"),
    (answer("Approve", reason="   "), "without a usable reason"),
    (answer("Approve", reason="ok; rm -rf /"), "without a usable reason"),
])
def test_a_rejection_or_an_approval_without_reason_ends_the_run(store, fleet, reply, message):
    run = make_run(store, change_lock="weekly")
    result = checks.production_checks(run, V2, now=SATURDAY, ask=True)
    with pytest.raises(PrecheckFailed, match=message):
        checks.approve_checks(run, result, reply)
    assert store.check_approvals() == []


def test_no_request_made_records_nothing(store, fleet):
    run = make_run(store)
    result = checks.production_checks(run, V2, now=WEDNESDAY, ask=True)
    assert checks.approve_checks(run, result, None) == {"approved": False, "needed": False}
    assert store.check_approvals() == []


# -- consecutive automatic rollbacks halt canary deploys --------------------------------------------

def test_three_automatic_rollbacks_in_a_row_halt_canary_deploys_until_lifted(store):
    run = make_run(store, "rb")
    store.record_deployment("gprd", V1, "good", status="success")
    assert patches.count_automatic_rollback(run, "gprd", V1)["halt"] is None
    assert patches.count_automatic_rollback(run, "gprd", V1)["consecutive"] == 2
    assert patches.check_halt(run, V2) == {"halted": False}
    third = patches.count_automatic_rollback(run, "gprd", V1)
    assert third["consecutive"] == 3
    assert third["halt"]["reason"].startswith("automatic rollbacks on gprd: 3 in a row")
    with pytest.raises(HaltActive) as refused:
        patches.check_halt(run, V2)
    assert str(refused.value).startswith("canary deploys are halted: automatic rollbacks on gprd: 3 in a row")
    assert "Lift the halt with a reason" in str(refused.value)
    assert patches.count_automatic_rollback(run, "gprd", V1)["halt"]["id"] == third["halt"]["id"]  # one halt
    with pytest.raises(InvalidInput):
        patches.lift_halt(run, "")
    lifted = patches.lift_halt(run, "bad builds understood: INC-12")
    assert lifted["still_active"] == [] and patches.check_halt(run, V2) == {"halted": False}
    [halt] = store.halts()
    assert (halt.lifted_by, halt.lifted_reason) == ("alice", "bad builds understood: INC-12")
    # the count starts again after the lift
    assert patches.count_automatic_rollback(run, "gprd", V1)["consecutive"] == 1


def test_a_successful_deploy_breaks_the_streak_and_the_limit_is_configurable(store):
    run = make_run(store, "rb", halt_after_rollbacks=2)
    patches.count_automatic_rollback(run, "gprd", V1)
    store.record_deployment("gprd", V2, "good-deploy", status="success")
    assert patches.count_automatic_rollback(run, "gprd", V1)["consecutive"] == 1
    assert patches.count_automatic_rollback(run, "gprd", V1)["halt"] is not None
    assert patches.count_automatic_rollback(make_run(Store("sqlite://"), "x", halt_after_rollbacks=0),
                                            "gprd", V1)["halt"] is None
    with pytest.raises(InvalidInput, match="halt_after_rollbacks"):
        patches.rollbacks_before_halt(inventory(halt_after_rollbacks="three"), "gprd")


def test_rollbacks_on_another_environment_do_not_count(store):
    run = make_run(store, "rb")
    for _ in range(2):
        patches.count_automatic_rollback(run, "gprd", V1)
    assert patches.count_automatic_rollback(run, "gprd-cny", V1)["consecutive"] == 1


# -- the CLI and the status ------------------------------------------------------------------------

def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(list(argv), env={"LIFTOFF_API_URL": "http://127.0.0.1:9", "LIFTOFF_API_USER": "u",
                                     "LIFTOFF_API_PASSWORD": "p"}, stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def test_freeze_conf():
    now = WEDNESDAY
    assert cli.freeze_conf("gprd", "CR-5 failover", duration="2H", now=now) == {
        "environment": "gprd", "action": "freeze", "reason": "CR-5 failover", "duration": "2h"}
    assert cli.freeze_conf("gprd", "CR-5", until="2026-12-03T08:00:00+01:00", now=now)["until"] == \
        "2026-12-03T07:00:00+00:00"
    assert cli.unfreeze_conf("gprd", "done") == {"environment": "gprd", "action": "unfreeze",
                                                 "reason": "done"}


@pytest.mark.parametrize("argv", [
    ["freeze", "gprd", "--reason", "CR-1"],
    ["freeze", "gprd", "--for", "soon", "--reason", "CR-1"],
    ["freeze", "gprd", "--until", "2020-01-01T00:00:00Z", "--reason", "CR-1"],
    ["freeze", "gprd", "--until", "tomorrow", "--reason", "CR-1"],
    ["freeze", "gprd", "--for", "2h", "--reason", "$(id)"],
    ["freeze", "gp rd", "--for", "2h", "--reason", "CR-1"],
    ["unfreeze", "gprd", "--reason", " "],
])
def test_bad_freeze_input_is_one_line_and_triggers_nothing(argv):
    code, out, err = run_cli(*argv)  # the API URL answers nothing: a trigger would be exit 3
    assert code == 2, (out, err)
    assert out == "" and err.count("\n") <= 1 and err.strip(), err


@pytest.mark.parametrize("argv", [
    ["freeze", "gprd", "--for", "2h", "--until", "2099-01-01T00:00:00Z", "--reason", "CR-1"],
    ["unfreeze", "gprd"], ["freeze", "gprd", "--for", "2h"],
])
def test_freeze_usage_errors_exit_2(argv):
    assert run_cli(*argv)[:2] == (2, "")  # argparse's usage on stderr; nothing triggered (no exit 3)


def test_status_shows_freezes(store):
    from liftoff.status import snapshot

    run = make_run(store, freezes=[{"from": "2026-12-24T00:00:00Z", "until": "2026-12-27T00:00:00Z",
                                    "reason": "holiday freeze"}])
    checks.freeze_env(run, "gprd", "CR-77 failover", duration="2h", now=WEDNESDAY)
    snap = snapshot(run.inventory, store, lbs=False, now=WEDNESDAY + timedelta(hours=1))
    assert [(f["env"], f["source"], f["who"], f["active"]) for f in snap["freezes"]] == [
        ("gprd", "liftoff freeze", "alice", True), ("gprd", "inventory", "inventory", False)]
    lines = cli.fleet_lines(snap)
    assert "FREEZE gprd until 2026-12-02 14:00:00Z by alice: CR-77 failover" in lines, lines
    assert any(line.startswith("FREEZE gprd from 2026-12-24") and "holiday freeze" in line for line in lines)
    assert snapshot(run.inventory, store, lbs=False, now=WEDNESDAY + timedelta(hours=3))["freezes"][0][
        "source"] == "inventory"  # ended


# -- the DAG: a failed check asks the on-call group, before promotion and post-deployment migrations --

@pytest.fixture(scope="module")
def production_dag():
    from pathlib import Path

    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(Path(__file__).resolve().parents[2] / "dags" / "deploy_production.py"))
    assert not bag.import_errors, bag.import_errors
    return bag.dags["deploy_production"]


@pytest.mark.parametrize("group", ["", "stage_9_post_deployment_migrations."])
def test_the_checks_and_the_request_are_wired_before_promotion_and_post_migrations(production_dag, group):
    tasks = production_dag.task_dict
    down = {t: set(tasks[t].downstream_task_ids) for t in tasks}
    assert f"{group}ask_on_call" in down[f"{group}production_checks"]
    assert down[f"{group}ask_on_call"] == {f"{group}checks_approval", f"{group}checks_passed"}
    assert down[f"{group}checks_approval"] == {f"{group}checks_decided", f"{group}checks_rejected"}
    assert tasks[f"{group}checks_approval"].options_mapping == {
        "Approve": f"{group}checks_decided", "Reject": f"{group}checks_rejected"}
    assert tasks[f"{group}checks_approval"].defaults == ["Reject"]  # a timeout rejects
    assert set(tasks[f"{group}checks_approval"].serialized_params) == {"reason"}
    nxt = "needs_approval" if not group else f"{group}precheck"
    assert nxt in down[f"{group}checks_decided"]
    # nothing changes before the decision: the stage's first step waits for it
    s9 = "stage_9_post_deployment_migrations."
    assert f"{s9}checks_decided" in tasks[f"{s9}precheck"].upstream_task_ids
    assert f"{s9}precheck" in tasks[f"{s9}post_migrations"].upstream_task_ids


class _TI:
    def __init__(self, checks: dict) -> None:
        self.checks, self.pushed = checks, {}

    def xcom_pull(self, task_ids=None, key="return_value"):
        return self.checks

    def xcom_push(self, key, value):
        self.pushed[key] = value


def test_the_request_is_assigned_to_the_on_call_group_when_it_is_made(production_dag, monkeypatch):
    from airflow.providers.standard.operators.hitl import HITLBranchOperator

    op = production_dag.task_dict["checks_approval"]
    seen = {}
    monkeypatch.setattr(HITLBranchOperator, "execute", lambda self, context: seen.setdefault("users",
                                                                                            self.assigned_users))
    op.execute({"ti": _TI({"on_call": ON_CALL, "failures": ["x"]})})
    assert seen["users"] == ON_CALL
    seen.clear()
    op.execute({"ti": _TI({"failures": ["x"]})})
    assert seen["users"] is None  # no group configured: whoever may answer the run's requests


@pytest.mark.parametrize("event, branch", [
    ({"chosen_options": ["Approve"], "params_input": {"reason": "INC-5 is the fix"},
      "responded_at": datetime(2026, 12, 5, 12, 5, tzinfo=UTC),
      "responded_by_user": {"id": "ada", "name": "ada"}},
     "checks_decided"),
    ({"chosen_options": ["Reject"], "params_input": {"reason": ""}, "responded_at": SATURDAY,
      "responded_by_user": {"id": "ada", "name": "ada"}}, "checks_rejected"),
    ({"error": "no answer", "error_type": "timeout"}, "checks_rejected"),
])
def test_the_answer_is_kept_and_branches(production_dag, monkeypatch, event, branch):
    op = production_dag.task_dict["checks_approval"]
    monkeypatch.setattr(type(op), "do_branch", lambda self, context, branches_to_execute: branches_to_execute)
    ti = _TI({})
    assert op.execute_complete({"ti": ti}, event) == [branch]
    kept = ti.pushed["answer"]
    assert (kept["chosen_options"] == ["Approve"]) is (branch == "checks_decided")
    if branch == "checks_decided":
        assert kept["params_input"] == {"reason": "INC-5 is the fix"}
        assert kept["responded_by_user"]["id"] == "ada"
        assert kept["responded_at"].startswith("2026-12-05 12:05")


def test_the_automatic_rollback_flow_counts_and_halts_on_the_third(store, monkeypatch):
    from liftoff import deploy
    from liftoff import rollback as rb

    run = make_run(store, "auto")
    check = {"safe": True, "reasons": [], "target": V1, "overridable": True}
    monkeypatch.setattr(deploy, "failed_environment", lambda run, envs: "gprd")
    monkeypatch.setattr(rb, "safety_check", lambda run, env: dict(check))
    monkeypatch.setattr(rb.canary, "shield_for_rollback", lambda run, env: {})
    monkeypatch.setattr(rb, "begin_rollback", lambda *a, **k: {"lock_reason": "automatic rollback"})
    monkeypatch.setattr(rb, "roll", lambda *a: {})
    monkeypatch.setattr(deploy, "restart_chef", lambda *a: {"chef": {}})
    monkeypatch.setattr(rb, "rollback_done", lambda *a: {"released": True})
    monkeypatch.setattr(deploy, "mark_failed", lambda *a: [])
    assert [rb.automatic(run, ["gprd"])["streak"]["consecutive"] for _ in range(2)] == [1, 2]
    assert patches.check_halt(run, V2) == {"halted": False}
    assert rb.automatic(run, ["gprd"])["streak"]["halt"] is not None
    with pytest.raises(HaltActive, match="automatic rollbacks on gprd: 3 in a row"):
        patches.check_halt(run, V2)


S9 = "stage_9_post_deployment_migrations."


@pytest.mark.parametrize("failed", [[f"{S9}checks_rejected"], [f"{S9}production_checks"],
                                    ["canary_weight_back", f"{S9}checks_rejected"]])
def test_a_refusal_before_the_post_migrations_halts_instead_of_rolling_back(production_dag, failed):
    """Stage 9's production checks said no after the deploy passed every gate: production stays
    on the new version (the halt says why), it is not rolled back."""
    from liftoff_airflow.dagkit import no_rollback_reason

    reason = no_rollback_reason(failed, production_dag)
    task_id = next(t for t in failed if t.startswith(S9))
    assert reason == (f"not rolled back: {task_id} failed in the production checks before the "
                      "post-deployment migrations; the deploy passed its gates, so production stays on the "
                      "new version and the migrations wait")


@pytest.mark.parametrize("failed", [[f"{S9}precheck"], [f"{S9}post_migrations"], [f"{S9}quiet_period"],
                                    ["stage_8_production_fleet.deploy"], ["checks_rejected"], []])
def test_other_failures_take_the_rollback_the_run_asked_for(production_dag, failed):
    from liftoff_airflow.dagkit import no_rollback_reason

    assert no_rollback_reason(failed, production_dag) is None


def test_the_halt_message_says_why_it_did_not_roll_back(monkeypatch):
    from liftoff import notify

    sent = []
    monkeypatch.setattr(notify, "emit",
                        lambda kind, text, **kw: sent.append((kind, text, kw["lines"])) or True)
    monkeypatch.setattr(notify, "origin", lambda run: type("O", (), {"dag_id": "deploy_production"})())
    notify.halted(object(), ["gprd"], {"halted": ["gprd"], "drained": [],
                                       "not_rolled_back": "not rolled back: X"})
    assert sent == [("halted", ":octagonal_sign: deploy_production halted: gprd left as it is",
                     ["no host out of service", "not rolled back: X"])]
