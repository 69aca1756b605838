"""Thin deferrable operators over the engine: the alert quiet period and the QA gate.

They read the run's params natively from ``context["params"]`` (named by the ``*_param``
arguments: an integer stays an integer, a boolean a boolean, an empty optional None), never
from Jinja-rendered strings."""

from __future__ import annotations

import time
from typing import Any

from airflow.sdk import BaseOperator, BaseSensorOperator
from airflow.sdk.exceptions import AirflowException, AirflowFailException

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


STEPS_STATE_KEY = "canary_steps"


class CanaryAnalysisOperator(BaseOperator):
    """Promotion on evidence: hold the canary for the judge's interval, deferred on Airflow's
    ``TimeDeltaTrigger`` (no worker slot while held), then judge it against the main fleet
    (:func:`liftoff.canary.judge_step`). With ``weight_steps`` (stage 7) the canary's production
    weight climbs the inventory's steps (5 -> 10 -> 25), each held and judged; without (stage 6)
    it stays at 0 and the synthetic traffic is judged once.

    pass: the next step, or done. fail: canary weight 0 on every LB, then the task fails with the
    judgement's sentence (the run's on_failure). marginal or inconclusive: the task ends with
    ``decision: ask`` and the table, for a person (the HITL task that follows); ``resume_from``
    names the steps task whose step a person accepted: the steps go on from the next one, and a
    later marginal or inconclusive judgement is accepted (a fail still aborts). With the judge
    off (``extra.analysis.enabled: false``) stage 7 sets the run's ``weight_param`` as before."""

    template_fields = ("env",)

    def __init__(self, *, pipeline: str, stage: str, env: str = "gprd-cny", weight_steps: bool = False,
                 resume_from: str | None = None, weight_param: str | None = "canary_weight",
                 dry_run_param: str | None = "dry_run", **kwargs: Any):
        super().__init__(**kwargs)
        self.pipeline = pipeline
        self.stage = stage
        self.env = env
        self.weight_steps = weight_steps
        self.resume_from = resume_from
        self.weight_param = weight_param
        self.dry_run_param = dry_run_param

    def _run(self):
        from liftoff_airflow.dagkit import run_handle

        return run_handle(self.pipeline)

    def execute(self, context: Any) -> Any:
        if _param(context, self.dry_run_param) is True:
            self.log.info("dry run: the canary %s is not judged and its weight not changed", self.env)
            return {"dry_run": True, "env": self.env}
        from liftoff.canary import analysis_config

        run = self._run()
        config = analysis_config(run, self.env)
        if not config.enabled:
            return self._without_judge(context, run)
        steps: list[int | None] = list(config.steps) if self.weight_steps else [None]
        start, results = 0, []
        if self.resume_from:
            before = context["ti"].xcom_pull(task_ids=self.resume_from) or {}
            start, results = int(before.get("index", -1)) + 1, list(before.get("results") or [])
            if start >= len(steps):
                return {"decision": "done", "index": start - 1, "results": results, "accepted": True}
        return self._hold(context, run, steps, start, results, config.hold_s)

    def _without_judge(self, context: Any, run: Any) -> dict:
        self.log.warning("the canary judge is off for %s (extra.analysis.enabled: false)", self.env)
        if not self.weight_steps:
            return {"decision": "done", "enabled": False, "results": []}
        from liftoff.canary import apply_weight

        weight = int(_param(context, self.weight_param) or 0)
        context["ti"].xcom_push(key="weight_raised", value=weight)
        return {"decision": "done", "enabled": False, "results": [],
                **apply_weight(run, weight, canary_env=self.env)}

    def _hold(self, context: Any, run: Any, steps: list, index: int, results: list, hold_s: float) -> None:
        from datetime import timedelta

        from airflow.providers.standard.triggers.temporal import TimeDeltaTrigger

        weight = steps[index]
        if weight is not None:
            from liftoff.canary import apply_weight

            apply_weight(run, weight, canary_env=self.env)
            context["ti"].xcom_push(key="weight_raised", value=weight)
        self.log.info("canary %s held %s for %.0fs, then judged", self.env,
                      f"at weight {weight} (step {index + 1} of {len(steps)})" if weight is not None
                      else "at weight 0 (synthetic traffic)", hold_s)
        # Where the steps stand rides in an XCom, not the deferral's kwargs (dag.test() replaces
        # those with the trigger's event); a cleared task starts from the first step again.
        context["ti"].xcom_push(key=STEPS_STATE_KEY, value={
            "steps": steps, "index": index, "results": results, "held_from": time.time(), "hold_s": hold_s})
        self.defer(trigger=TimeDeltaTrigger(timedelta(seconds=hold_s)), method_name="judged")

    def judged(self, context: Any, event: Any = None) -> dict:
        from liftoff.canary import ABORT, ASK, apply_weight, judge_step, judgement_sentence

        ti = context["ti"]
        state = ti.xcom_pull(task_ids=ti.task_id, key=STEPS_STATE_KEY) or {}
        steps, index, results = state["steps"], int(state["index"]), list(state["results"])
        held_from, hold_s = float(state["held_from"]), float(state["hold_s"])
        run = self._run()
        result = judge_step(run, self.env, self.stage, steps[index], held_from,
                            accepted=bool(self.resume_from))
        table = result.pop("table")
        self.log.info("canary analysis:\n%s", table)
        results = [*results, result]
        if result["decision"] == ABORT:
            if steps[index] is not None:
                apply_weight(run, 0, canary_env=self.env, force=True)
            raise AirflowFailException(judgement_sentence(result) + "; canary weight set back to 0")
        if result["decision"] == ASK:
            return {"decision": ASK, "index": index, "results": results, "table": table,
                    "sentence": judgement_sentence(result)}
        if index + 1 < len(steps):
            return self._hold(context, run, steps, index + 1, results, hold_s)
        return {"decision": "done", "index": index, "results": results, "accepted": bool(self.resume_from),
                "passed": all(r["verdict"] == "pass" for r in results)}
