"""GitLab's production checks against a lab of its own (octet 66, ``LIFTOFF_CHECKS_LAB_OCTET``):
the lab GitLab serves the production project's issues; an incident labelled severity::2 opened
there (with python-gitlab, as a person would) blocks a promotion, a severity::3 one and a
scheduled change do not, a change request in progress does, and once both are closed
production is clear again. A lab GitLab that is down blocks (fail closed).

The deployment-health query on the lab's Prometheus (its ``gitlab_deployment_health:service``
recording rule): healthy lab -> pass; a gprd web host down -> ``web (0)``; an empty answer and
a Prometheus that does not answer block. A freeze (``liftoff freeze``'s engine) in the lab's
state store blocks gprd's precheck with who and why, not canary's, shows in the status, and
unfreeze lifts it."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from types import SimpleNamespace

import gitlab
import pytest

from lab.gitlab_api import PRODUCTION_PROJECT_PATH
from liftoff import checks
from liftoff.checks import ProductionIssues, gitlab_production_blockers
from liftoff.errors import PrecheckFailed
from liftoff.inventory import load_inventory
from liftoff.runs import Run
from tests.labkit import Lab, running_lab

pytestmark = pytest.mark.lab

OCTET = int(os.environ.get("LIFTOFF_CHECKS_LAB_OCTET", "66"))


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with running_lab(tmp_path_factory.mktemp("production-checks-lab"), OCTET) as lab:
        yield lab


@pytest.fixture
def run(lab: Lab, monkeypatch: pytest.MonkeyPatch):
    for name, value in lab.env.items():
        monkeypatch.setenv(name, value)
    return SimpleNamespace(inventory=load_inventory(), who="ada")


def production(lab: Lab):
    """The lab GitLab's production project, through python-gitlab with the lab's token."""
    conn = json.loads(lab.env["AIRFLOW_CONN_LIFTOFF_OPS_GITLAB"])
    gl = gitlab.Gitlab(conn["host"].rstrip("/"), private_token=conn["password"], timeout=10)
    return gl.projects.get(PRODUCTION_PROJECT_PATH, lazy=True)


def close(issue) -> None:
    issue.state_event = "close"
    issue.save()


def test_an_s2_incident_blocks_until_it_is_closed(lab: Lab, run):
    project = production(lab)
    assert gitlab_production_blockers(run) == []
    minor = project.issues.create({"title": "Slow CI runners", "labels": "incident,severity::3"})
    planned = project.issues.create({"title": "Patroni upgrade", "labels": "change::scheduled"})
    assert gitlab_production_blockers(run) == []
    s2 = project.issues.create({"title": "Elevated 5xx on API", "labels": "incident,severity::2"})
    [sentence] = gitlab_production_blockers(run)
    assert sentence == (f'active severity::2 incident: #{s2.iid} "Elevated 5xx on API" '
                        f"({s2.web_url})")
    planned.labels = ["change::in-progress"]
    planned.save()
    assert gitlab_production_blockers(run)[1].startswith(f'change request in progress: #{planned.iid} ')
    close(s2)
    close(planned)
    assert gitlab_production_blockers(run) == []
    assert [i.iid for i in project.issues.list(state="opened", get_all=True)] == [minor.iid]


def test_a_gitlab_that_is_down_blocks(lab: Lab, run):
    conn = json.loads(lab.env["AIRFLOW_CONN_LIFTOFF_OPS_GITLAB"])
    source = ProductionIssues.from_settings(run.inventory)
    assert source.gitlab_url == conn["host"].rstrip("/")
    down = ProductionIssues("http://127.0.0.1:9", source.private_token, source.project, timeout=2)
    [sentence] = gitlab_production_blockers(run, down)
    assert sentence.startswith(f"ops GitLab: cannot read the incidents and change requests of "
                               f"{PRODUCTION_PROJECT_PATH}")


def test_the_deployment_health_query_on_the_lab_prometheus(lab: Lab, run):
    run = SimpleNamespace(**vars(run), env=run.inventory.env)
    lab.wait_for("gprd healthy on Prometheus", lambda: checks.health_failures(run, "gprd") == [], 60)
    down = "web-01-sv-gprd"
    lab.fault("host-down", down)
    try:
        lab.wait_for("web unhealthy", lambda: checks.health_failures(run, "gprd") == [
            "deployment health: unhealthy on gprd: web (0)"], 60)
    finally:
        lab.fault("host-up", down)
    lab.wait_for("gprd healthy again", lambda: checks.health_failures(run, "gprd") == [], 60)
    source = checks.DeploymentHealth.from_settings(run.inventory, run.inventory.env("gprd"))
    assert source.query == 'gitlab_deployment_health:service{env="gprd"}'
    nothing = checks.DeploymentHealth(source.url, 'gitlab_deployment_health:service{env="nowhere"}')
    assert checks.health_failures(run, "gprd", nothing) == [
        'deployment health: the query gitlab_deployment_health:service{env="nowhere"} returned nothing: no '
        "proof that gprd is healthy"]
    [sentence] = checks.health_failures(run, "gprd", checks.DeploymentHealth("http://127.0.0.1:9", "up",
                                                                             timeout=2))
    assert sentence.startswith("deployment health: cannot query Prometheus at http://127.0.0.1:9 (")


def test_a_freeze_blocks_gprd_until_unfrozen(lab: Lab, run):
    from liftoff.status import snapshot

    engine = Run(run_id="freeze-lab-1", who="ada", pipeline="deploy_lock", inventory=run.inventory)
    version = "17.9.0-ee.0"

    def clear() -> bool:  # an alert of an earlier test may take a few seconds to resolve
        try:
            return checks.precheck(engine, "gprd", version)["failures"] == []
        except PrecheckFailed:
            return False

    lab.wait_for("gprd's precheck clear", clear, 90)
    frozen = checks.freeze_env(engine, "gprd", "CR-4242 database failover", duration="1h")
    with pytest.raises(PrecheckFailed) as refused:
        checks.precheck(engine, "gprd", version)
    until = frozen["until"][:16].replace("T", " ")
    assert f"freeze: gprd is frozen until {until}Z by ada" in str(refused.value)
    assert "CR-4242 database failover" in str(refused.value)
    assert checks.precheck(engine, "gprd-cny", version)["failures"] == []  # canary is not frozen
    [shown] = snapshot(engine.inventory, engine.store, lbs=False)["freezes"]
    assert (shown["env"], shown["who"], shown["active"]) == ("gprd", "ada", True)
    result = checks.unfreeze_env(engine, "gprd", "failover done")
    assert [f["reason"] for f in result["lifted"]] == ["CR-4242 database failover"]
    assert checks.precheck(engine, "gprd", version)["failures"] == []
    assert snapshot(engine.inventory, engine.store, lbs=False)["freezes"] == []
