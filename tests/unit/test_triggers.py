"""The deferrable triggers survive Airflow's round trip (``serialize()`` kwargs back into the
class), and the operators really defer to them instead of waiting in a worker."""

from __future__ import annotations

import asyncio
import base64
import importlib
import json
import time
from types import SimpleNamespace
from typing import Any

import pytest
from airflow.sdk.exceptions import TaskDeferred

from liftoff.alerts import QuietPeriod
from liftoff_airflow import operators
from liftoff_airflow.triggers import QAPipelineTrigger, QuietPeriodTrigger
from tests.unit.http_fakes import LocalServer, QuietHandler

TRIGGERS = {
    "quiet_period": lambda: QuietPeriodTrigger(
        "http://127.0.0.1:9093", {"env": "gstg", "stage": "main"},
        QuietPeriod(window_s=60, interval_s=5, fail_on_alert=True).to_dict(), ["critical"], env="gstg"),
    "quiet_period_by_connection": lambda: QuietPeriodTrigger(
        "http://127.0.0.1:9093", {"env": "gstg"}, QuietPeriod(window_s=0, interval_s=1).to_dict(),
        ["critical"], env="gstg", conn_id="liftoff_alertmanager"),
    "quiet_period_defaults": lambda: QuietPeriodTrigger(
        "http://127.0.0.1:9093", {"env": "gprd-cny"}, QuietPeriod(window_s=0, interval_s=1).to_dict()),
    "qa_pipeline": lambda: QAPipelineTrigger(
        42, "https://ops.example/gitlab-org/quality/-/pipelines/42", 1_900_000_000.5, 2.5, env="gstg",
        inventory_path="/etc/liftoff/inventory.yml"),
    "qa_pipeline_defaults": lambda: QAPipelineTrigger(7, "", 1_900_000_000.0),
}


def _import(classpath: str) -> type:
    module, _, name = classpath.rpartition(".")
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("name", sorted(TRIGGERS))
def test_serialize_round_trips(name: str):
    trigger = TRIGGERS[name]()
    classpath, kwargs = trigger.serialize()
    cls = _import(classpath)
    assert cls is type(trigger)
    assert classpath == f"liftoff_airflow.triggers.{type(trigger).__name__}"
    # what Airflow stores in the trigger table and hands a (restarted) triggerer back
    stored = json.loads(json.dumps(kwargs))
    assert stored == kwargs
    assert cls(**stored).serialize() == (classpath, kwargs)


def test_quiet_period_kwargs_are_the_period_at_deferral():
    """A restarted triggerer gets the period as it was deferred: a window not started."""
    trigger = TRIGGERS["quiet_period"]()
    period = QuietPeriod.from_dict(trigger.serialize()[1]["period"])
    assert period.started_at is None and period.quiet_since is None and period.polls == 0
    assert (period.window_s, period.interval_s, period.fail_on_alert) == (60, 5, True)


def _first_event(trigger: QuietPeriodTrigger) -> dict[str, Any]:
    async def first() -> dict[str, Any]:
        async for event in trigger.run():
            return event.payload
        raise AssertionError("no event")

    return asyncio.run(first())


def test_quiet_period_trigger_polls_through_the_connection(monkeypatch: pytest.MonkeyPatch):
    """The triggerer resolves ``conn_id`` (credentials never in the kwargs) and polls with
    HttpAsyncHook; a connection it cannot resolve fails the gate closed."""
    seen: list[tuple[str, str | None]] = []

    class Handler(QuietHandler):
        def do_GET(self):  # noqa: N802
            seen.append((self.path.split("?")[0], self.headers.get("Authorization")))
            self.reply(200, [])

    server = LocalServer(Handler)
    monkeypatch.setenv("LIFTOFF_NO_AIRFLOW", "1")
    monkeypatch.setenv("AIRFLOW_CONN_T_AM_TRIGGER", json.dumps(
        {"conn_type": "http", "host": server.url, "login": "am", "password": "am-trigger-pw"}))
    period = QuietPeriod(window_s=0, interval_s=1).to_dict()
    try:
        trigger = QuietPeriodTrigger("http://127.0.0.1:1", {"env": "gstg"}, period, env="gstg",
                                     conn_id="t_am_trigger")
        assert "am-trigger-pw" not in json.dumps(trigger.serialize())
        event = _first_event(trigger)
    finally:
        server.close()
    assert event["ok"] is True and event["polls"] == 1 and event["env"] == "gstg"
    assert seen == [("/api/v2/alerts", "Basic " + base64.b64encode(b"am:am-trigger-pw").decode())]
    missing = _first_event(QuietPeriodTrigger("", {"env": "gstg"}, period, env="gstg", conn_id="t_am_none"))
    assert missing["ok"] is False and missing["polls"] == 0
    assert "alerts for env=gstg unknown (fail closed): ConnectionNotFound" in missing["reason"]


class FakeInventory:
    def __init__(self, source: str = "/srv/inventory.yml"):
        self.source = source
        self.qa = SimpleNamespace(timeout_s=1800.0, poll_s=30.0)
        self.environments = {"gstg": SimpleNamespace(
            url="https://staging.example", qa_cookie=None, alert_matchers={"env": "gstg"},
            extra={"quiet_period": {"window_s": 120, "interval_s": 10}})}

    def env(self, name: str):
        return self.environments[name]


@pytest.fixture
def inventory(monkeypatch: pytest.MonkeyPatch) -> FakeInventory:
    inv = FakeInventory()
    monkeypatch.setattr("liftoff.inventory.load_inventory", lambda path=None: inv)
    monkeypatch.setattr("liftoff.settings.alertmanager_url", lambda inventory=None: "http://am.example:9093")
    return inv


def _deferral(task: Any, params: dict | None = None) -> TaskDeferred:
    with pytest.raises(TaskDeferred) as deferred:
        task.execute({"params": params or {}})
    assert deferred.value.method_name == "execute_complete"
    _, kwargs = deferred.value.trigger.serialize()
    json.dumps(kwargs)  # storable as it is
    return deferred.value


def test_quiet_period_sensor_defers_to_the_quiet_period_trigger(inventory: FakeInventory):
    sensor = operators.QuietPeriodSensor(task_id="quiet_period", env="gstg")
    trigger = _deferral(sensor, {"quiet_period_seconds": 30, "dry_run": False}).trigger
    assert isinstance(trigger, QuietPeriodTrigger)
    assert trigger.alertmanager_url == "http://am.example:9093"
    assert trigger.conn_id == "liftoff_alertmanager"  # the inventory's default: resolved by the triggerer
    assert trigger.matchers == {"env": "gstg"} and trigger.env == "gstg"
    assert trigger.severities == ["critical", "warning"]
    period = QuietPeriod.from_dict(trigger.period)
    assert period.window_s == 30.0 and period.interval_s == 10.0 and period.fail_on_alert
    assert period.started_at is None


def test_quiet_period_sensor_takes_the_inventory_window_when_none_is_given(inventory: FakeInventory):
    sensor = operators.QuietPeriodSensor(task_id="quiet_period", env="gstg")
    period = QuietPeriod.from_dict(_deferral(sensor, {"quiet_period_seconds": None}).trigger.period)
    assert (period.window_s, period.interval_s) == (120.0, 10.0)


def test_qa_gate_triggers_qa_then_defers_to_the_pipeline_trigger(inventory: FakeInventory,
                                                                    monkeypatch: pytest.MonkeyPatch):
    calls: list[tuple] = []

    class FakeQA:
        def trigger(self, env, url, version, cookie, expect_version=True):
            calls.append((env, url, version, cookie, expect_version))
            return SimpleNamespace(id=4242, web_url="https://ops.example/qa/-/pipelines/4242")

    monkeypatch.setattr("liftoff.qa.QAClient.from_settings", classmethod(lambda cls, inv=None: FakeQA()))
    gate = operators.QAGateOperator(task_id="qa", env="gstg", version="17.6.0-ee.0", expect_version=False)
    before = time.time()
    trigger = _deferral(gate).trigger
    assert calls == [("gstg", "https://staging.example", "17.6.0-ee.0", None, False)]
    assert isinstance(trigger, QAPipelineTrigger)
    assert trigger.pipeline_id == 4242 and trigger.web_url.endswith("/4242") and trigger.env == "gstg"
    # an absolute deadline: a restarted triggerer keeps it
    assert before + 1800 <= trigger.deadline <= time.time() + 1800
    assert trigger.poll_interval == 5.0 and trigger.inventory_path == "/srv/inventory.yml"


@pytest.mark.parametrize("task", [
    lambda: operators.QuietPeriodSensor(task_id="quiet_period", env="gstg"),
    lambda: operators.QAGateOperator(task_id="qa", env="gstg", version="17.6.0-ee.0"),
])
def test_a_dry_run_does_not_defer(task, monkeypatch: pytest.MonkeyPatch):
    def refuse(*_a, **_k):
        raise AssertionError("a dry run read the inventory")

    monkeypatch.setattr("liftoff.inventory.load_inventory", refuse)
    assert task().execute({"params": {"dry_run": True}}) == {"dry_run": True, "env": "gstg"}
