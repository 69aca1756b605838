"""Thin deferrable operators over the engine: the alert quiet period and the QA gate.

They read the run's params natively from ``context["params"]`` (named by the ``*_param``
arguments: an integer stays an integer, a boolean a boolean, an empty optional None), never
from Jinja-rendered strings."""

from __future__ import annotations

import time
from typing import Any

from airflow.sdk import BaseOperator, BaseSensorOperator
from airflow.sdk.exceptions import AirflowException

from liftoff_airflow.triggers import QAPipelineTrigger, QuietPeriodTrigger

DEFAULT_WINDOW_S = 60.0
DEFAULT_INTERVAL_S = 5.0


def _param(context: Any, name: str | None) -> Any:
    """A param of the run as its type says (None when the DAG has no such param)."""
    return (context.get("params") or {}).get(name) if name else None


def _quiet_settings(env_extra: dict[str, Any], window_s: float | None) -> tuple[float, float]:
    quiet = dict(env_extra.get("quiet_period") or {})
    window = float(window_s if window_s is not None else quiet.get("window_s", DEFAULT_WINDOW_S))
    interval = float(quiet.get("interval_s", DEFAULT_INTERVAL_S))
    return window, min(interval, max(window / 2, 0.5))


def check_window(env: str, window: float, env_extra: dict[str, Any],
                 override_reason: str | None) -> str | None:
    """Refuse (AirflowException, one sentence) a negative window, or one shorter than the
    inventory's minimum (``quiet_period.min_window_s``; 0: none) unless ``override_reason`` is
    given; then the line to log saying it was overridden, else None."""
    if window < 0:
        raise AirflowException(f"quiet period on {env}: the window must be 0 seconds or more, got {window:g}")
    minimum = float(dict(env_extra.get("quiet_period") or {}).get("min_window_s", 0) or 0)
    if window >= minimum:
        return None
    if not override_reason:
        raise AirflowException(
            f"quiet period on {env}: a window of {window:g}s is shorter than the inventory's minimum of "
            f"{minimum:g}s; give allow_precheck_failure a reason to override it")
    return (f"quiet period on {env}: a window of {window:g}s, shorter than the inventory's minimum of "
            f"{minimum:g}s, overridden: {override_reason}")


class QuietPeriodSensor(BaseSensorOperator):
    """Passes once the environment had no matching alert for a whole window; fails at the first
    alert (or when Alertmanager cannot be read). Always deferred: no worker slot while waiting."""

    template_fields = ("env",)

    def __init__(self, *, env: str, window_param: str | None = "quiet_period_seconds",
                 severities: tuple[str, ...] = ("critical", "warning"), dry_run_param: str | None = "dry_run",
                 override_param: str | None = "allow_precheck_failure", **kwargs: Any):
        super().__init__(**kwargs)
        self.env = env
        self.window_param = window_param  # the run's window in seconds; None: the inventory's
        self.severities = list(severities)
        self.dry_run_param = dry_run_param
        self.override_param = override_param  # its reason lets a window below the minimum pass

    def execute(self, context: Any) -> Any:
        if _param(context, self.dry_run_param) is True:
            self.log.info("dry run: the quiet period on %s is not evaluated", self.env)
            return {"dry_run": True, "env": self.env}
        from liftoff.alerts import QuietPeriod
        from liftoff.inventory import load_inventory
        from liftoff.settings import alertmanager_url, conn_id_for

        inventory = load_inventory()
        environment = inventory.env(self.env)
        given = _param(context, self.window_param)
        window, interval = _quiet_settings(dict(environment.extra), None if given is None else float(given))
        overridden = check_window(self.env, window, dict(environment.extra),
                                  _param(context, self.override_param) or None)
        if overridden:
            self.log.warning("%s", overridden)
        period = QuietPeriod(window_s=window, interval_s=interval, fail_on_alert=True)
        self.log.info("waiting for %ss without alerts on %s (%s)", window, self.env,
                      dict(environment.alert_matchers))
        self.defer(
            trigger=QuietPeriodTrigger(alertmanager_url(inventory), dict(environment.alert_matchers),
                                       period.to_dict(), self.severities, env=self.env,
                                       conn_id=conn_id_for("alertmanager", inventory)),
            method_name="execute_complete",
        )

    def execute_complete(self, context: Any, event: dict[str, Any]) -> dict[str, Any]:
        if not event.get("ok"):
            raise AirflowException(f"alert gate on {event.get('env')}: {event.get('reason')}")
        self.log.info("quiet period passed on %s: %s", event.get("env"), event.get("reason"))
        return event


class QAGateOperator(BaseOperator):
    """Triggers GitLab-QA against an environment on the ops instance and defers until it ends."""

    template_fields = ("env", "version")

    def __init__(self, *, env: str, version: str, expect_version: bool = True, timeout_s: float | None = None,
                 dry_run_param: str | None = "dry_run", **kwargs: Any):
        super().__init__(**kwargs)
        self.expect_version = expect_version
        self.env = env
        self.version = version
        self.timeout_s = timeout_s
        self.dry_run_param = dry_run_param

    def execute(self, context: Any) -> Any:
        if _param(context, self.dry_run_param) is True:
            self.log.info("dry run: no QA pipeline triggered for %s", self.env)
            return {"dry_run": True, "env": self.env}
        from liftoff.inventory import load_inventory
        from liftoff.qa import QAClient

        inventory = load_inventory()
        environment = inventory.env(self.env)
        client = QAClient.from_settings(inventory)
        pipeline = client.trigger(self.env, environment.url, self.version, environment.qa_cookie,
                                  expect_version=self.expect_version)
        self.log.info("QA pipeline for %s %s: %s", self.env, self.version, pipeline.web_url)
        timeout = self.timeout_s or inventory.qa.timeout_s
        self.defer(
            trigger=QAPipelineTrigger(pipeline.id, pipeline.web_url, time.time() + timeout,
                                      min(inventory.qa.poll_s, 5.0), env=self.env,
                                      inventory_path=inventory.source or None),
            method_name="execute_complete",
        )

    def execute_complete(self, context: Any, event: dict[str, Any]) -> dict[str, Any]:
        if not event.get("passed"):
            jobs = ", ".join(f"{name} ({url})" for name, url in event.get("failed_jobs", [])) or "none listed"
            raise AirflowException(f"QA failed on {event.get('env')}: {event.get('reason')}; "
                                   f"failed jobs: {jobs}")
        self.log.info("QA passed on %s: %s", event.get("env"), event.get("web_url"))
        return event
