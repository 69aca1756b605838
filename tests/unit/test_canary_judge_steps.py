"""Promotion on evidence, wired: the canary judge's settings for the pipelines, the judgement
recorded, pushed and announced (liftoff.canary.judge_step), and the operator that holds each
canary weight step on a deferrable trigger and acts on the verdict (CanaryAnalysisOperator)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest
from airflow.providers.standard.triggers.temporal import TimeDeltaTrigger
from airflow.sdk.exceptions import AirflowFailException, TaskDeferred

from liftoff import canary
from liftoff.analysis import AnalysisConfig, FleetSamples, judge, parse_config
from liftoff.errors import InventoryError
from liftoff.store import Store
from liftoff_airflow import operators

# -- settings -------------------------------------------------------------------------------------


def test_the_judge_is_on_by_default_with_three_weight_steps_held_for_the_window():
    config = parse_config(None)
    assert (config.enabled, config.steps, config.hold_s) == (True, (5, 10, 25), 900.0)
    config = parse_config({"enabled": False, "steps": [1, 50, 100], "interval_s": 120, "window_s": 300})
    assert (config.enabled, config.steps, config.hold_s) == (False, (1, 50, 100), 120.0)
    assert config.window_s == 300.0


@pytest.mark.parametrize(("data", "why"), [
    ({"enabled": "yes"}, "analysis.enabled: expected true or false"),
    ({"steps": [10, 5]}, "analysis.steps: expected rising canary weights"),
    ({"steps": [0, 5]}, "analysis.steps: expected rising canary weights"),
    ({"steps": [5, 101]}, "analysis.steps: expected rising canary weights"),
    ({"steps": []}, "analysis.steps: expected rising canary weights"),
    ({"steps": [True]}, "analysis.steps: expected rising canary weights"),
    ({"interval_s": 0}, "analysis.interval_s: expected a number in (0, 86400]"),
])
def test_bad_pipeline_settings_are_one_line_naming_the_field(data, why):
    with pytest.raises(InventoryError) as err:
        parse_config(data)
    assert str(err.value).startswith(why) and "\n" not in str(err.value)


@pytest.mark.parametrize(("verdict", "accepted", "decision"), [
    ("pass", False, "next"), ("pass", True, "next"), ("fail", False, "abort"), ("fail", True, "abort"),
    ("marginal", False, "ask"), ("inconclusive", False, "ask"),
    ("marginal", True, "accepted"), ("inconclusive", True, "accepted"),
])
def test_what_the_pipeline_does_with_each_verdict(verdict, accepted, decision):
    assert canary.decision_for(verdict, accepted) == decision


# -- judge_step: judged, recorded, pushed, announced ---------------------------------------------

class FakeMetrics:
    def __init__(self):
        self.pushed: list[tuple] = []

    def canary_analysis(self, env, stage, verdict, score):
        self.pushed.append((env, stage, verdict, score))
        return True


def _verdict(canary_errors: float):
    base = FleetSamples(1000, {"error_ratio_web": [0.002, 0.001, 0.002, 0.003, 0.002, 0.002]})
    cny = FleetSamples(900, {"error_ratio_web": [canary_errors * f for f in (1, 1.1, 0.9, 1.05, 0.95, 1)]})
    return judge(base, cny, AnalysisConfig())


@pytest.fixture()
def judged_run(tmp_path, monkeypatch):
    store = Store(f"sqlite:///{tmp_path}/state.db")
    metrics = FakeMetrics()
    announced: list[tuple] = []
    run = SimpleNamespace(run_id="manual__2026-12-03T10:00:00+00:00", who="rm", store=store,
                          inventory=object(), metrics=lambda: metrics)
    monkeypatch.setattr("liftoff.notify.canary_judged", lambda *a: announced.append(a) or True)
    yield SimpleNamespace(run=run, store=store, metrics=metrics, announced=announced, monkeypatch=monkeypatch)
    store.close()


def test_a_failing_canary_is_recorded_pushed_and_announced_with_the_abort(judged_run):
    seen: dict[str, Any] = {}

    def analyze(inventory, env, *, end, prometheus, window_s):
        seen.update(env=env, end=end, window_s=window_s)
        return _verdict(0.02)

    judged_run.monkeypatch.setattr("liftoff.analysis.analyze", analyze)
    result = canary.judge_step(judged_run.run, "gprd-cny", "stage_7", 5, held_from=1000.0, now=1600.0)
    assert seen == {"env": "gprd-cny", "end": 1600.0, "window_s": 600.0}  # the interval it was held
    assert (result["verdict"], result["decision"], result["weight"]) == ("fail", "abort", 5)
    assert "error_ratio_web" in result["table"] and result["window_s"] == 600.0
    [record] = judged_run.store.analyses(judged_run.run.run_id)
    assert (record.env, record.stage, record.weight, record.verdict, record.decision) == (
        "gprd-cny", "stage_7", 5, "fail", "abort")
    assert record.verdict_data()["metrics"]["error_ratio_web"]["classification"] == "high"
    assert judged_run.metrics.pushed == [("gprd-cny", "stage_7", "fail", record.score)]
    [(run, env, where, verdict, score, reason, decision)] = judged_run.announced
    assert (env, where, verdict, decision) == ("gprd-cny", "stage_7 at weight 5", "fail", "abort")
    sentence = canary.judgement_sentence(result)
    assert sentence.startswith("canary analysis of gprd-cny (stage_7 at canary weight 5): fail (score ")
    assert "error_ratio_web" in sentence


def test_a_healthy_canary_goes_on_and_each_judgement_is_kept_in_order(judged_run):
    judged_run.monkeypatch.setattr("liftoff.analysis.analyze", lambda *a, **k: _verdict(0.002))
    for weight in (5, 10):
        judged = canary.judge_step(judged_run.run, "gprd-cny", "stage_7", weight, 0.0, now=60.0)
        assert judged["decision"] == "next"
    canary.judge_step(judged_run.run, "gprd-cny", "stage_6", None, 0.0, now=60.0)
    assert [(r.stage, r.weight, r.verdict) for r in judged_run.store.analyses(judged_run.run.run_id)] == [
        ("stage_7", 5, "pass"), ("stage_7", 10, "pass"), ("stage_6", None, "pass")]
    assert [r.weight for r in judged_run.store.analyses(env="gprd-cny", limit=2)] == [10, None]
    assert judged_run.store.analyses("another run") == []


# -- the operator ---------------------------------------------------------------------------------

class FakeTI:
    task_id = "stage_7_production_gitaly.canary_analysis"

    def __init__(self, upstream: dict | None = None):
        self.pushed: dict[str, Any] = {}
        self.upstream = upstream or {}

    def xcom_push(self, key, value):
        self.pushed[key] = json.loads(json.dumps(value))  # stored as JSON

    def xcom_pull(self, task_ids=None, key="return_value"):
        if task_ids == self.task_id and key != "return_value":
            return self.pushed.get(key)
        return self.upstream.get(task_ids)


class Pipeline:
    """The engine calls the operator makes, scripted: the judge's verdicts in order."""

    def __init__(self, monkeypatch, verdicts: list[str], config: AnalysisConfig | None = None):
        self.weights: list[tuple] = []
        self.judged: list[tuple] = []
        self.verdicts = list(verdicts)
        run = SimpleNamespace(run_id="r1", who="rm")
        monkeypatch.setattr("liftoff_airflow.dagkit.run_handle", lambda pipeline: run)
        monkeypatch.setattr("liftoff.canary.analysis_config",
                            lambda run, env: config or AnalysisConfig(window_s=30, step_s=2, interval_s=20))
        monkeypatch.setattr("liftoff.canary.apply_weight", self.apply_weight)
        monkeypatch.setattr("liftoff.canary.judge_step", self.judge_step)

    def apply_weight(self, run, weight, *, canary_env="gprd-cny", force=False):
        self.weights.append((weight, force))
        return {"weight": weight}

    def judge_step(self, run, env, stage, weight, held_from, *, accepted=False):
        verdict = self.verdicts.pop(0)
        self.judged.append((stage, weight, accepted))
        return {"env": env, "stage": stage, "weight": weight, "verdict": verdict, "score": 50.0,
                "reason": f"judged {verdict}", "decision": canary.decision_for(verdict, accepted),
                "table": f"table of {verdict}"}


def _deferred(call) -> TaskDeferred:
    with pytest.raises(TaskDeferred) as deferred:
        call()
    d = deferred.value
    assert isinstance(d.trigger, TimeDeltaTrigger) and d.method_name == "judged" and not d.kwargs
    return d


def _resume(op, ctx, d: TaskDeferred):
    return op.judged(ctx, {"moment": "whatever the trigger said"})


def _steps(**kwargs) -> operators.CanaryAnalysisOperator:
    return operators.CanaryAnalysisOperator(task_id="canary_analysis", pipeline="deploy_production",
                                            stage="stage_7", weight_steps=True, **kwargs)


def test_each_weight_step_is_held_on_a_deferrable_trigger_then_judged(monkeypatch):
    p = Pipeline(monkeypatch, ["pass", "pass", "pass"])
    op, ti = _steps(), FakeTI()
    ctx = {"params": {"dry_run": False}, "ti": ti}
    before = datetime.now(UTC)
    d = _deferred(lambda: op.execute(ctx))
    assert before + timedelta(seconds=20) <= d.trigger.moment <= datetime.now(UTC) + timedelta(seconds=20)
    state = ti.pushed["canary_steps"]
    assert (state["index"], state["steps"], state["hold_s"]) == (0, [5, 10, 25], 20.0)
    assert p.weights == [(5, False)] and ti.pushed["weight_raised"] == 5 and p.judged == []
    d = _deferred(lambda: _resume(op, ctx, d))
    assert p.weights == [(5, False), (10, False)] and p.judged == [("stage_7", 5, False)]
    d = _deferred(lambda: _resume(op, ctx, d))
    done = _resume(op, ctx, d)
    assert p.weights == [(5, False), (10, False), (25, False)] and len(p.judged) == 3
    assert done["decision"] == "done" and done["passed"] is True
    assert [r["weight"] for r in done["results"]] == [5, 10, 25]


def test_a_failed_step_sets_the_canary_weight_back_to_zero_and_fails_with_the_sentence(monkeypatch):
    p = Pipeline(monkeypatch, ["pass", "fail"])
    op, ctx = _steps(), {"params": {"dry_run": False}, "ti": FakeTI()}
    d = _deferred(lambda: _resume(op, ctx, _deferred(lambda: op.execute(ctx))))
    with pytest.raises(AirflowFailException) as err:
        _resume(op, ctx, d)
    assert p.weights == [(5, False), (10, False), (0, True)]
    assert str(err.value) == ("canary analysis of gprd-cny (stage_7 at canary weight 10): fail (score 50): "
                              "judged fail; canary weight set back to 0")


@pytest.mark.parametrize("verdict", ["marginal", "inconclusive"])
def test_a_marginal_or_inconclusive_step_stops_for_a_person_at_that_weight(monkeypatch, verdict):
    p = Pipeline(monkeypatch, [verdict])
    op, ctx = _steps(), {"params": {"dry_run": False}, "ti": FakeTI()}
    asked = _resume(op, ctx, _deferred(lambda: op.execute(ctx)))
    assert asked["decision"] == "ask" and asked["index"] == 0 and asked["table"] == f"table of {verdict}"
    assert asked["sentence"].endswith(f"{verdict} (score 50): judged {verdict}")
    assert p.weights == [(5, False)]  # held where it was: a person decides


def test_after_a_person_accepted_the_steps_go_on_from_the_next_weight(monkeypatch):
    p = Pipeline(monkeypatch, ["marginal", "pass"])
    before = {"decision": "ask", "index": 0, "results": [{"weight": 5, "verdict": "marginal"}]}
    op = _steps(resume_from="stage_7_production_gitaly.canary_analysis")
    ctx = {"params": {"dry_run": False}, "ti": FakeTI({"stage_7_production_gitaly.canary_analysis": before})}
    d = _deferred(lambda: op.execute(ctx))
    assert ctx["ti"].pushed["canary_steps"]["index"] == 1 and p.weights == [(10, False)]
    d = _deferred(lambda: _resume(op, ctx, d))  # marginal again: accepted, goes on
    assert p.judged == [("stage_7", 10, True)]
    done = _resume(op, ctx, d)
    assert done["accepted"] is True and done["passed"] is False
    assert [r["verdict"] for r in done["results"]] == ["marginal", "marginal", "pass"]
    assert p.weights == [(10, False), (25, False)]


def test_stage_6_judges_once_at_weight_zero(monkeypatch):
    p = Pipeline(monkeypatch, ["pass"])
    op = operators.CanaryAnalysisOperator(task_id="canary_analysis", pipeline="deploy_canary",
                                          stage="stage_6")
    ti = FakeTI()
    ctx = {"params": {"dry_run": False}, "ti": ti}
    d = _deferred(lambda: op.execute(ctx))
    assert ti.pushed["canary_steps"]["steps"] == [None] and p.weights == []
    assert "weight_raised" not in ti.pushed
    done = _resume(op, ctx, d)
    assert done["passed"] is True and p.judged == [("stage_6", None, False)]


def test_with_the_judge_off_stage_7_sets_the_runs_weight_as_before(monkeypatch):
    p = Pipeline(monkeypatch, [], AnalysisConfig(enabled=False))
    ti = FakeTI()
    out = _steps().execute({"params": {"dry_run": False, "canary_weight": 7}, "ti": ti})
    assert out["enabled"] is False and out["weight"] == 7 and p.weights == [(7, False)] and p.judged == []
    assert ti.pushed == {"weight_raised": 7}


def test_a_dry_run_neither_judges_nor_changes_a_weight(monkeypatch):
    p = Pipeline(monkeypatch, [])
    out = _steps().execute({"params": {"dry_run": True}, "ti": FakeTI()})
    assert out == {"dry_run": True, "env": "gprd-cny"}
    assert p.weights == [] and p.judged == []
