"""Issue 11, "In the Airflow UI": the quiet period refuses a negative window at trigger time and
a window below the inventory's minimum without a reason; the approval request shows its evidence."""

from __future__ import annotations

import copy
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from airflow.dag_processing.dagbag import DagBag
from airflow.sdk.definitions.param import ParamsDict
from airflow.sdk.exceptions import AirflowException, ParamValidationError, TaskDeferred

from liftoff.alerts import QuietPeriod
from liftoff.chatops.cli import deploy_conf
from liftoff.errors import InvalidInput
from liftoff_airflow import dagkit, operators

DAGS = Path(__file__).resolve().parents[2] / "dags"
V = "17.9.0-ee.0"
PREVIOUS = "17.8.0-ee.0"


@pytest.fixture(scope="module")
def production():
    bag = DagBag(dag_folder=str(DAGS / "deploy_production.py"))
    assert bag.import_errors == {}
    return bag.dags["deploy_production"]


# -- quiet period: negative windows refused at trigger time -----------------------------------------

def test_a_negative_quiet_period_is_refused_by_the_param_and_the_cli(production):
    with pytest.raises(ParamValidationError, match="-5 is less than the minimum of 0"):
        dagkit.COMMON_PARAMS["quiet_period_seconds"].resolve(-5)
    params = ParamsDict(copy.deepcopy(production.params))  # what a trigger (UI, REST) validates
    params["version"] = V
    with pytest.raises(ParamValidationError, match="quiet_period_seconds: -5 is less than the minimum of 0"):
        params["quiet_period_seconds"] = -5
    params["quiet_period_seconds"] = 0
    assert params.validate()["quiet_period_seconds"] == 0
    with pytest.raises(InvalidInput, match="quiet-period"):
        deploy_conf(V, quiet_period_seconds=-5)


# -- quiet period: the inventory's minimum -----------------------------------------------------------

def _inventory(monkeypatch: pytest.MonkeyPatch, quiet: dict[str, Any]) -> None:
    inv = SimpleNamespace(env=lambda name: SimpleNamespace(alert_matchers={"env": name},
                                                           extra={"quiet_period": quiet}))
    monkeypatch.setattr("liftoff.inventory.load_inventory", lambda path=None: inv)
    monkeypatch.setattr("liftoff.settings.alertmanager_url", lambda inventory=None: "http://am.example:9093")


def _sensor() -> operators.QuietPeriodSensor:
    return operators.QuietPeriodSensor(task_id="quiet_period", env="gprd")


def _params(window: Any, reason: Any = None, dry_run: Any = False) -> dict[str, Any]:
    """The run's params as Airflow gives them to a task: native types."""
    return {"params": {"quiet_period_seconds": window, "allow_precheck_failure": reason, "dry_run": dry_run}}


def _window(sensor: operators.QuietPeriodSensor, context: dict[str, Any]) -> float:
    with pytest.raises(TaskDeferred) as deferred:
        sensor.execute(context)
    return QuietPeriod.from_dict(deferred.value.trigger.period).window_s


def test_a_window_below_the_minimum_is_refused_in_one_sentence(monkeypatch):
    _inventory(monkeypatch, {"window_s": 300, "interval_s": 10, "min_window_s": 120})
    with pytest.raises(AirflowException) as refused:
        _sensor().execute(_params(30, None))
    assert str(refused.value) == ("quiet period on gprd: a window of 30s is shorter than the inventory's "
                                  "minimum of 120s; give allow_precheck_failure a reason to override it")


def test_a_window_below_the_minimum_passes_with_a_reason_and_is_logged(monkeypatch, capsys):
    _inventory(monkeypatch, {"window_s": 300, "interval_s": 10, "min_window_s": 120})
    assert _window(_sensor(), _params(30, "incident 42: alerts are known noise")) == 30.0
    out = capsys.readouterr().out  # the task logger (structlog) writes to stdout here
    assert ("quiet period on gprd: a window of 30s, shorter than the inventory's minimum of 120s, "
            "overridden: incident 42: alerts are known noise") in out


@pytest.mark.parametrize(("quiet", "window", "expected"), [
    ({"window_s": 300, "min_window_s": 120}, 120, 120.0),  # at the minimum
    ({"window_s": 300, "min_window_s": 120}, None, 300.0),  # the inventory's window
    ({"window_s": 300}, 0, 0.0),  # no minimum: 0 is allowed (not taken for "not given")
])
def test_windows_at_or_above_the_minimum_pass(monkeypatch, quiet, window, expected):
    _inventory(monkeypatch, quiet)
    assert _window(_sensor(), _params(window)) == expected


def test_the_sensor_refuses_a_negative_window_even_with_a_reason(monkeypatch):
    _inventory(monkeypatch, {"window_s": 300})
    with pytest.raises(AirflowException, match="must be 0 seconds or more, got -5"):
        _sensor().execute(_params(-5, "a reason given"))


def test_a_dry_run_is_a_boolean_param_not_a_string(monkeypatch):
    _inventory(monkeypatch, {"window_s": 300})
    assert _sensor().execute(_params(None, dry_run=True)) == {"dry_run": True, "env": "gprd"}
    assert _window(_sensor(), _params(None, dry_run="True")) == 300.0  # only a real True skips the gate


def test_the_gates_read_the_runs_params_natively(production):
    sensor = production.get_task("stage_8_production_fleet.quiet_period")
    assert (sensor.window_param, sensor.override_param, sensor.dry_run_param) == (
        "quiet_period_seconds", "allow_precheck_failure", "dry_run")
    assert sensor.template_fields == ("env",)
    bag = DagBag(dag_folder=str(DAGS / "rollback.py"))
    rollback = bag.dags["rollback"]
    assert rollback.get_task("quiet_period").override_param == "override_reason"
    assert "override_reason" in rollback.params


# -- the approval request's evidence ---------------------------------------------------------------

class FakeTI:
    def __init__(self, xcoms: dict[str, Any]):
        self.xcoms = xcoms

    def xcom_pull(self, task_ids: str, **_: Any) -> Any:
        return self.xcoms.get(task_ids)


def _render(task, xcoms: dict[str, Any], params: dict[str, Any] | None = None) -> tuple[str, str]:
    from airflow.sdk.execution_time import macros

    context = {"ti": FakeTI(xcoms), "params": {"override_reason": None, **(params or {})}, "macros": macros}
    return task.render_template(task.subject, context), task.render_template(task.body, context)


def test_the_approval_body_is_templated_and_names_its_evidence(production):
    approval = production.get_task("approval")
    assert {"subject", "body"} <= set(approval.template_fields)
    for ref in ("task_ids='production_checks'", "task_ids='resolve_version'", "previous_version", "versions",
                "failures", "28800"):
        assert ref in approval.body, ref
    assert approval.response_timeout.total_seconds() == 8 * 3600


def test_the_approval_request_shows_version_checks_production_version_and_timeout(production):
    approval = production.get_task("approval")
    checks = {"env": "gprd", "version": V, "previous_version": PREVIOUS, "failures": [], "overridden": False,
              "versions": {"web-01": PREVIOUS, "web-02": PREVIOUS, "gitaly-01": V}}
    before = time.gmtime(time.time() + 8 * 3600 - 60)
    subject, body = _render(approval, {"resolve_version": V, "production_checks": checks})
    assert subject == f"Promote {V} to production (now on {PREVIOUS})?"
    assert f"**Version:** {V}" in body
    assert "**QA:** passed on canary" in body
    assert "**Canary health and production checks:** all production checks passed" in body
    assert f"**Production runs now:** {PREVIOUS} (hosts: {PREVIOUS} x2, {V} x1)" in body
    timeout = body.split("**Times out:** ", 1)[1].split(" (", 1)[0]
    assert time.strptime(timeout, "%Y-%m-%d %H:%M UTC") >= time.strptime(
        time.strftime("%Y-%m-%d %H:%M UTC", before), "%Y-%m-%d %H:%M UTC")
    assert "8 h after this request; no answer rejects it" in body


def test_the_approval_request_shows_overridden_failures(production):
    approval = production.get_task("approval")
    checks = {"env": "gprd", "version": V, "overridden": True, "override_reason": "incident 9 fix",
              "failures": ["canary not in service: web-cny-01 (DRAIN)",
                           "canary hosts not on 17.9.0-ee.0: api-cny-01"]}
    _, body = _render(approval, {"resolve_version": V, "production_checks": checks},
                      {"override_reason": "hotfix verified by hand"})
    assert ("**Canary health and production checks:** canary not in service: web-cny-01 (DRAIN); "
            "canary hosts not on 17.9.0-ee.0: api-cny-01 (overridden: incident 9 fix)") in body
    assert '**QA:** not verified on canary: promoted with the override "hotfix verified by hand"' in body
    assert "**Production runs now:** unknown" in body
