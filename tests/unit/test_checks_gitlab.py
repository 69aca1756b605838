"""GitLab's production checks (liftoff.checks.gitlab_production_blockers) against a fake ops
GitLab serving the production project's issues as python-gitlab reads them: open severity 1/2
incidents and change requests in progress block a promotion with one sentence each, anything
else does not, an unreachable or refusing GitLab blocks too (fail closed), and an override
reason lets production_checks pass with the blockers recorded."""

from __future__ import annotations

import json
from collections.abc import Iterator
from types import SimpleNamespace
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

from liftoff import checks
from liftoff.checks import ProductionIssues, gitlab_production_blockers
from liftoff.errors import PrecheckFailed
from tests.unit.http_fakes import LocalServer, QuietHandler

TOKEN = "glpat-checks-token"
PROJECT = "gitlab-com/gl-infra/production"
RUN = SimpleNamespace(inventory=None, who="ada")


class FakeOpsGitLab:
    """``GET /api/v4/projects/:path/issues?labels=&state=`` over ``issues`` (every label must
    match, like GitLab); 401 without the token. Records each query."""

    def __init__(self) -> None:
        self.issues: list[dict] = []
        self.queries: list[dict] = []
        fake = self

        class Handler(QuietHandler):
            def do_GET(self):  # noqa: N802
                parts = urlsplit(self.path)
                query = {k: v[0] for k, v in parse_qs(parts.query).items()}
                fake.queries.append(query)
                if self.headers.get("PRIVATE-TOKEN") != TOKEN:
                    return self.reply(401, {"message": "401 Unauthorized"})
                if unquote(parts.path) != f"/api/v4/projects/{PROJECT}/issues":
                    return self.reply(404, {"message": "404 Project Not Found"})
                wanted = set(filter(None, query.get("labels", "").split(",")))
                found = [i for i in fake.issues if wanted <= set(i["labels"])
                         and query.get("state", "all") in ("all", i["state"])]
                return self.reply(200, found)

        self.http = LocalServer(Handler)
        self.url = self.http.url

    def add(self, iid: int, title: str, *labels: str, state: str = "opened") -> None:
        self.issues.append({"iid": iid, "id": 100 + iid, "title": title, "labels": list(labels),
                            "state": state, "web_url": f"{self.url}/{PROJECT}/-/issues/{iid}"})


@pytest.fixture
def gitlab(monkeypatch) -> Iterator[FakeOpsGitLab]:
    fake = FakeOpsGitLab()
    for name in ("LIFTOFF_INVENTORY", "LIFTOFF_CONNECTIONS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AIRFLOW_CONN_LIFTOFF_OPS_GITLAB", json.dumps(
        {"conn_type": "http", "host": fake.url, "password": TOKEN}))
    yield fake
    fake.http.close()


def test_a_clear_production_has_no_blockers_and_asks_the_right_questions(gitlab):
    gitlab.add(1, "old outage", "incident", "severity::1", state="closed")
    gitlab.add(2, "slow CI", "incident", "severity::3")
    gitlab.add(3, "planned change", "change::scheduled")
    assert gitlab_production_blockers(RUN) == []
    asked = sorted((q["labels"], q["state"]) for q in gitlab.queries)
    assert asked == [("change::in-progress", "opened"), ("incident,severity::1", "opened"),
                     ("incident,severity::2", "opened")]


def test_incidents_and_changes_in_progress_each_give_a_sentence(gitlab):
    gitlab.add(7, "Database primary down", "incident", "severity::1")
    gitlab.add(8, "API latency\x1b[31m high", "incident", "severity::2", "Service::API")
    gitlab.add(9, "Patroni failover", "change::in-progress", "C2")
    assert gitlab_production_blockers(RUN) == [
        f'active severity::1 incident: #7 "Database primary down" ({gitlab.url}/{PROJECT}/-/issues/7)',
        f'active severity::2 incident: #8 "API latency?[31m high" ({gitlab.url}/{PROJECT}/-/issues/8)',
        f'change request in progress: #9 "Patroni failover" ({gitlab.url}/{PROJECT}/-/issues/9)']


def test_an_incident_with_both_severities_is_said_once(gitlab):
    gitlab.add(4, "relabelled", "incident", "severity::1", "severity::2")
    [sentence] = gitlab_production_blockers(RUN)
    assert sentence.startswith('active severity::1 incident: #4 "relabelled"')


def test_an_unreachable_gitlab_blocks(gitlab):
    gone = ProductionIssues("http://127.0.0.1:9", TOKEN, PROJECT, timeout=2)
    [sentence] = gitlab_production_blockers(RUN, gone)
    assert sentence.startswith(f"ops GitLab: cannot read the incidents and change requests of {PROJECT} (")
    assert sentence.endswith("production changes stay blocked until it answers")


def test_a_refused_token_blocks_without_showing_it(gitlab, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_LIFTOFF_OPS_GITLAB", json.dumps(
        {"conn_type": "http", "host": gitlab.url, "password": "glpat-wrong-secret"}))
    [sentence] = gitlab_production_blockers(RUN)
    assert "(GitlabAuthenticationError: 401: 401 Unauthorized)" in sentence
    assert "glpat-wrong-secret" not in sentence


def test_no_connection_or_a_bad_project_blocks(gitlab, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_LIFTOFF_OPS_GITLAB", json.dumps(
        {"conn_type": "http", "host": gitlab.url, "password": TOKEN,
         "extra": {"production_project": "../x"}}))
    [sentence] = gitlab_production_blockers(RUN)
    assert "ValueError: extra.production_project is not a project path" in sentence
    monkeypatch.delenv("AIRFLOW_CONN_LIFTOFF_OPS_GITLAB")
    assert gitlab_production_blockers(RUN)[0].startswith("ops GitLab: cannot read")


def test_the_project_comes_from_the_connection(gitlab, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_LIFTOFF_OPS_GITLAB", json.dumps(
        {"conn_type": "http", "host": gitlab.url, "password": TOKEN,
         "extra": {"production_project": "ops/prod"}}))
    source = ProductionIssues.from_settings()
    assert (source.gitlab_url, source.project, source.private_token) == (gitlab.url, "ops/prod", TOKEN)
    assert TOKEN not in repr(source)


@pytest.fixture
def clear_fleet(monkeypatch):
    """production_checks with the fleet's own checks passing: only GitLab's remain."""
    monkeypatch.setattr(checks, "_precheck_failures",
                        lambda run, env, version, severities, now: ([], {"env": env.name,
                                                                          "version": version}))
    monkeypatch.setattr(checks, "health_failures", lambda run, env, source=None: [])
    monkeypatch.setattr(checks.canary, "canary_env_of", lambda inventory, env: None)


PRODUCTION_RUN = SimpleNamespace(inventory=None, who="ada", run_id="promote-1", store=None,
                                 env=lambda name: SimpleNamespace(name=name))


def test_production_checks_block_on_an_incident_unless_overridden(gitlab, clear_fleet):
    version = "17.6.0-ee.0"
    assert checks.production_checks(PRODUCTION_RUN, version)["gitlab_blockers"] == []
    gitlab.add(5, "Sidekiq backlog", "incident", "severity::2")
    with pytest.raises(PrecheckFailed) as refused:
        checks.production_checks(PRODUCTION_RUN, version)
    assert str(refused.value).startswith('production checks failed: active severity::2 incident: #5 "Sidekiq')
    result = checks.production_checks(PRODUCTION_RUN, version, override_reason="INC-5 is the fix we promote")
    assert result["overridden"] is True and result["override_reason"] == "INC-5 is the fix we promote"
    assert result["failures"] == result["gitlab_blockers"] and len(result["failures"]) == 1
