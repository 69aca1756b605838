"""GitLab's production checks against a lab of its own (octet 66): the lab GitLab serves the
production project's issues; an incident labelled severity::2 opened there (with python-gitlab,
as a person would) blocks a promotion, a severity::3 one and a scheduled change do not, a change
request in progress does, and once both are closed production is clear again. A lab GitLab
that is down blocks (fail closed)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from types import SimpleNamespace

import gitlab
import pytest

from lab.gitlab_api import PRODUCTION_PROJECT_PATH
from liftoff.checks import ProductionIssues, gitlab_production_blockers
from liftoff.inventory import load_inventory
from tests.labkit import Lab, running_lab

pytestmark = pytest.mark.lab

OCTET = 66


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
