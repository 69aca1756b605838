"""Every DAG imports cleanly, carries owners, tags and a no-blind-retry policy, and its trigger
form refuses bad input (per-file parse times: bench/parse_time.py)."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
from airflow.dag_processing.dagbag import DagBag
from airflow.sdk.definitions.param import ParamsDict
from airflow.sdk.exceptions import ParamValidationError

DAGS = Path(__file__).resolve().parents[2] / "dags"


@pytest.fixture(scope="module")
def bag() -> DagBag:
    return DagBag(dag_folder=str(DAGS))


def test_no_import_errors(bag: DagBag):
    assert bag.import_errors == {}
    assert {"deploy_canary", "deploy_production"} <= set(bag.dag_ids)


def test_owners_tags_and_retries(bag: DagBag):
    for dag_id, dag in bag.dags.items():
        assert "liftoff" in dag.tags, dag_id
        for task in dag.tasks:
            assert task.owner == "release-managers", (dag_id, task.task_id)
            assert task.retries == 0, (dag_id, task.task_id)


def test_canary_pipeline_shape(bag: DagBag):
    dag = bag.dags["deploy_canary"]
    assert dag.max_active_runs == 1
    groups = sorted({t.task_id.split(".")[0] for t in dag.tasks if "." in t.task_id})
    assert groups == ["stage_1_staging_migrations", "stage_2_staging_gitaly", "stage_3_staging_fleet",
                      "stage_4_staging_post_migrations", "stage_5_production_migrations",
                      "stage_6_canary_fleet"]
    for group in groups:
        ids = {t.task_id for t in dag.tasks if t.task_id.startswith(group + ".")}
        assert f"{group}.precheck" in ids and f"{group}.quiet_period" in ids
    sensor = dag.get_task("stage_6_canary_fleet.quiet_period")
    assert type(sensor).__name__ == "QuietPeriodSensor"


@pytest.mark.parametrize("dag_id", ["deploy_canary", "deploy_production"])
def test_an_environment_is_finished_only_after_its_stage_passed(bag: DagBag, dag_id: str):
    """finish_env (chef started, the deployment recorded a success) comes after the stage's
    deploy and quiet period, and after the canary judge where there is one: wired by XCom alone
    it ran beside the canary deploy and left chef stopped on every canary host."""
    dag = bag.dags[dag_id]
    finishes = [t for t in dag.tasks if t.task_id.endswith(".finish_env")]
    assert finishes
    for task in finishes:
        group = task.task_id.rsplit(".", 1)[0]
        before = task.get_flat_relative_ids(upstream=True)
        assert f"{group}.quiet_period" in before, task.task_id
        for step in ("deploy", "canary_judged"):
            if f"{group}.{step}" in dag.task_dict:
                assert f"{group}.{step}" in before, (task.task_id, step)


def test_production_pipeline_shape(bag: DagBag):
    dag = bag.dags["deploy_production"]
    groups = sorted({t.task_id.split(".")[0] for t in dag.tasks if "." in t.task_id})
    assert groups == ["stage_7_production_gitaly", "stage_8_production_fleet",
                      "stage_9_post_deployment_migrations"]
    assert type(dag.get_task("approval")).__name__ == "ApprovalOperator"


def _validate(dag, conf: dict) -> None:
    params = ParamsDict(copy.deepcopy(dag.params))
    for key, value in conf.items():
        params[key] = value
    params.validate()


def _refused(name: str, value: str) -> str:
    """The start of Airflow's message for a refused value of Param ``name``."""
    return re.escape(f"Invalid input for param {name}: {value} ")


@pytest.mark.parametrize(("conf", "message"), [
    ({"version": "17.6.0; rm -rf /"}, _refused("version", "'17.6.0; rm -rf /'") + "does not match '"),
    ({"version": "../../etc/passwd"}, _refused("version", "'../../etc/passwd'") + "does not match '"),
    ({"version": "17.6.0-ee.0 && id"}, _refused("version", "'17.6.0-ee.0 && id'") + "does not match '"),
    ({"version": "17.6.0-ee.0\n"}, _refused("version", "'17.6.0-ee.0\\n'") + "does not match '"),
    ({"version": "x" * 200}, _refused("version", repr("x" * 200)) + "does not match '"),
    ({"on_failure": "ignore"}, _refused("on_failure", "'ignore'")
     + re.escape("is not one of ['rollback', 'halt']")),
    ({"dry_run": "yes please"}, _refused("dry_run", "'yes please'") + "is not of type 'boolean'"),
    ({"allow_precheck_failure": "`id`"}, _refused("allow_precheck_failure", "'`id`'") + "is too short"),
    ({"allow_precheck_failure": "`id` && id"}, _refused("allow_precheck_failure", "'`id` && id'")
     + "does not match '"),
    ({"allow_precheck_failure": "fine\n"}, _refused("allow_precheck_failure", "'fine\\n'")
     + "does not match '"),
    ({"allow_precheck_failure": ""}, _refused("allow_precheck_failure", "''") + "is too short"),
    ({"quiet_period_seconds": -5}, _refused("quiet_period_seconds", "-5") + "is less than the minimum of 0"),
])
def test_trigger_form_refuses_bad_conf(bag: DagBag, conf: dict, message: str):
    with pytest.raises(ParamValidationError, match="^" + message):
        _validate(bag.dags["deploy_canary"], conf)


@pytest.mark.parametrize("dag_id", ["deploy_canary", "deploy_production", "fast_deploy", "rollback"])
def test_every_pipeline_that_rolls_a_fleet_offers_the_rollout_mode(bag: DagBag, dag_id: str):
    """The trigger form's choice: each role's own (the default), lockstep or window; anything
    else is refused before the run."""
    param = bag.dags[dag_id].params.get_param("rollout_mode")
    assert param.value == "role" and param.schema["enum"] == ["role", "lockstep", "window"]
    choices = ("role", "lockstep", "window")
    assert [copy.deepcopy(param).resolve(choice) for choice in choices] == list(choices)
    with pytest.raises(ParamValidationError, match=re.escape("'sliding' is not one of ['role', 'lockstep'")):
        copy.deepcopy(param).resolve("sliding")


def _patterns(schema: dict) -> list[str]:
    found = [schema["pattern"]] if "pattern" in schema else []
    for key in ("items", "anyOf", "oneOf"):
        sub = schema.get(key)
        for s in (sub if isinstance(sub, list) else [sub] if sub else []):
            found += _patterns(s)
    return found


def test_every_param_pattern_refuses_a_trailing_newline(bag: DagBag):
    """Airflow checks a pattern with re.search, where a bare ``$`` takes a final newline: each
    ends in ``$(?!\\n)`` (liftoff_airflow.params.anchored)."""
    from liftoff_airflow.params import END

    loose = [(dag_id, name, pattern[-24:]) for dag_id, dag in sorted(bag.dags.items())
             for name in dag.params for pattern in _patterns(dag.params.get_param(name).schema)
             if not pattern.endswith(END)]
    assert loose == []


@pytest.mark.parametrize("version", ["16.3.0-ee.0", "16.3.0-rc42.ee.0", "16.3.0+rnightly.308853.0ab19c4f-0",
                                     "16.3.202311291200-13bd0cc7c2a.3f6b8fe0f4d"])
def test_trigger_form_takes_every_omnibus_format(bag: DagBag, version: str):
    _validate(bag.dags["deploy_canary"], {"version": version, "on_failure": "halt"})


def test_auto_promotion_is_off_by_default_and_follows_the_canary_asset_when_on(monkeypatch):
    assert DagBag(dag_folder=str(DAGS / "deploy_production.py")).dags["deploy_production"].schedule is None
    monkeypatch.setenv("LIFTOFF_AUTO_PROMOTE", "true")
    dag = DagBag(dag_folder=str(DAGS / "deploy_production.py")).dags["deploy_production"]
    assert "liftoff://canary-verified" in repr(dag.timetable.asset_condition)
