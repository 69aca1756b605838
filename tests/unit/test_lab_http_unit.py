"""Pure parts of the lab's HTTP side: metrics text, pipeline status, QA settings, JSON shapes."""

from __future__ import annotations

import stat

import pytest

from lab.app import BUCKETS, HostMetrics, page_body, revision
from lab.config import LabConfig
from lab.gitlab_api import ensure_tokens, iso, job_json, load_tokens, parse_variables, pipeline_json
from lab.model import World, write_json
from lab.qa_jobs import Job, Pipeline, QARunner, QASettings, pipeline_status
from lab.traffic import front_ends


@pytest.fixture
def world(tmp_path):
    return World.open(LabConfig(lab_dir=tmp_path / "lab", octet=53))


def value(text: str, series: str) -> float:
    lines = [line for line in text.splitlines() if line.startswith(series + " ")]
    assert len(lines) == 1, f"{series} appears {len(lines)} times"
    return float(lines[0].rsplit(" ", 1)[1])


def test_metrics_count_pages_and_accumulate_buckets(world):
    m = HostMetrics()
    m.observe("GET", "/", 200, 0.003)
    m.observe("GET", "/", 200, 0.2)
    m.observe("GET", "/", 500, 3.0)
    state = world.hosts["web-01-sv-gstg"]
    state.patches = ["fix-1"]
    text = m.render(state)
    assert value(text, 'http_requests_total{method="GET",handler="/",status="200"}') == 2
    assert value(text, 'http_requests_total{method="GET",handler="/",status="500"}') == 1
    bucket = 'http_request_duration_seconds_bucket{method="GET",handler="/",le="%s"}'
    assert value(text, bucket % "0.005") == 1
    assert value(text, bucket % "0.25") == 2
    assert value(text, bucket % "2.5") == 2
    assert value(text, bucket % "5.0") == 3
    assert value(text, bucket % "+Inf") == 3
    assert value(text, 'http_request_duration_seconds_count{method="GET",handler="/"}') == 3
    assert value(text, 'http_request_duration_seconds_sum{method="GET",handler="/"}') == pytest.approx(3.203)
    assert value(text, 'gitlab_build_info{version="17.5.0-ee.0"}') == 1
    assert value(text, "gitlab_host_patches") == 1
    assert text.count("_bucket{") == len(BUCKETS) + 1
    assert "# TYPE http_request_duration_seconds histogram" in text


def test_metrics_without_a_running_version_have_no_build_info(world):
    state = world.hosts["web-01-sv-gstg"]
    for service in state.services.values():
        service.version = None
    text = HostMetrics().render(state)
    assert "gitlab_build_info{" not in text
    assert "http_requests_total{" not in text


def test_pages_and_revision():
    body, ctype = page_body("/api/v4/projects", "web-01-sv-gstg", "17.5.0-ee.0")
    assert ctype == "application/json" and body.startswith("[")
    body, ctype = page_body("/explore", "web-01-sv-gstg", "17.5.0-ee.0")
    assert ctype == "text/html" and "17.5.0-ee.0" in body and "web-01-sv-gstg" in body
    assert revision("17.5.0-ee.0") == revision("17.5.0-ee.0") != revision("17.6.0-ee.0")


@pytest.mark.parametrize(
    ("statuses", "expected"),
    [
        ([], "created"),
        (["created", "created"], "created"),
        (["running", "created"], "running"),
        (["success", "created"], "running"),
        (["success", "success"], "success"),
        (["success", "failed"], "failed"),
        (["failed", "running"], "running"),
        (["canceled", "success"], "canceled"),
        (["canceled", "failed"], "failed"),
    ],
)
def test_pipeline_status_from_jobs(statuses, expected):
    assert pipeline_status(statuses) == expected


def test_retried_jobs_do_not_count():
    p = Pipeline(1, "master", {})
    p.jobs = [Job(1, 1, "a", status="failed", retried=True), Job(2, 1, "a", status="success")]
    assert p.status == "success"


def test_qa_settings_from_variables(world):
    s = QASettings.from_variables({"QA_ENVIRONMENT": "gprd-cny"}, world)
    assert s.url == world.topology.env_url("gprd-cny") and s.canary
    s = QASettings.from_variables({"QA_ENVIRONMENT": "gprd-cny", "QA_CANARY": "false"}, world)
    assert not s.canary
    s = QASettings.from_variables({"QA_URL": "http://x:1/", "QA_CANARY": "true"}, world)
    assert (s.url, s.canary, s.expected_version) == ("http://x:1", True, None)
    s = QASettings.from_variables({"QA_ENVIRONMENT": "gprd", "QA_EXPECTED_VERSION": "1.2.3"}, world)
    assert s.url == world.topology.env_url("gprd") and not s.canary and s.expected_version == "1.2.3"
    assert QASettings.from_variables({}, world).url is None
    s = QASettings.from_variables({"QA_URL": "http://x", "QA_CANARY": "true",
                                   "QA_COOKIES": "gitlab_canary=true"}, world)
    assert s.cookies == "gitlab_canary=true"
    s = QASettings.from_variables({"QA_URL": "http://x", "QA_COOKIES": "a=b\r\nX: y"}, world)
    assert s.cookies == "a=bX: y" and not s.canary
    assert QASettings.from_variables({"QA_URL": "http://x"}, world).cookies == ""


def test_trigger_variables_from_json_and_form():
    assert parse_variables({"variables": {"A": 1, "B": None}}) == {"A": "1", "B": ""}
    form = {"token": "t", "ref": "master", "variables[QA_URL]": "http://h", "variables[X]": "y"}
    assert parse_variables(form) == {"QA_URL": "http://h", "X": "y"}
    assert parse_variables({"ref": "master"}) == {}
    listed = {"variables": [{"key": "A", "value": "1"},
                            {"key": "B", "value": None, "variable_type": "env_var"}]}
    assert parse_variables(listed) == {"A": "1", "B": ""}
    with pytest.raises(ValueError):
        parse_variables({"variables": [{"value": "no key"}]})
    with pytest.raises(ValueError):
        parse_variables({"variables": [1, 2]})


def test_tokens_file(tmp_path):
    config = LabConfig(lab_dir=tmp_path / "lab", octet=53)
    tokens = ensure_tokens(config)
    file = config.path("secrets", "gitlab.json")
    assert stat.S_IMODE(file.stat().st_mode) == 0o600
    assert stat.S_IMODE(file.parent.stat().st_mode) == 0o700
    assert tokens["private_token"].startswith("glpat-") and tokens["trigger_token"].startswith("glptt-")
    assert ensure_tokens(config) == tokens == load_tokens(config)


def test_json_shapes():
    p = Pipeline(7, "master", {"QA_URL": "u"})
    p.jobs = [Job(10, 7, "qa-smoke-health", status="failed", started_at=p.created_at + 1,
                  finished_at=p.created_at + 3, failure_reason="script_failure"),
              Job(11, 7, "qa-smoke-pages", status="success", started_at=p.created_at + 1,
                  finished_at=p.created_at + 2)]
    data = pipeline_json(p, "http://gl")
    assert data["id"] == 7 and data["status"] == "failed" and data["ref"] == "master"
    assert data["web_url"] == "http://gl/gitlab-org/quality/gitlab-qa-runner/-/pipelines/7"
    assert data["created_at"].endswith("Z") and data["duration"] == 2
    failed, ok = (job_json(j, p, "http://gl") for j in p.jobs)
    assert failed["failure_reason"] == "script_failure" and "failure_reason" not in ok
    assert ok["stage"] == "qa" and ok["pipeline"]["id"] == 7 and ok["duration"] == pytest.approx(1)
    assert ok["web_url"] == "http://gl/gitlab-org/quality/gitlab-qa-runner/-/jobs/11"
    assert iso(None) is None and iso(0) == "1970-01-01T00:00:00.000Z"


def test_pipelines_round_trip_and_interrupted_jobs_fail(world):
    p = Pipeline(3, "master", {"A": "b"})
    p.jobs = [Job(5, 3, "qa-smoke-health", status="running", started_at=1.0, trace=["GET x -> 200"]),
              Job(6, 3, "qa-smoke-pages", status="success", started_at=1.0, finished_at=2.0)]
    assert Pipeline.from_json(p.to_json()) == p
    write_json(world.state_dir / "qa" / "pipeline-3.json", p.to_json())
    runner = QARunner(world)
    loaded = runner.pipelines[3]
    assert loaded.status == "failed"
    assert loaded.jobs[0].failure_reason == "runner_system_failure"
    assert "labd stopped" in loaded.jobs[0].trace[-1]
    assert runner._next_pipeline == 4 and runner._next_job == 7
    assert QARunner(world).pipelines[3].status == "failed"  # the fix was saved


def test_front_ends(world):
    ends = {fe.name: fe for fe in front_ends(world)}
    cfg = world.config
    assert ends["gstg"].url == world.topology.env_url("gstg") and not ends["gstg"].canary
    assert ends["gprd:fe-01-lb-gprd"].url == f"http://{cfg.net}.1.2:{cfg.lb_http_port}"
    assert ends["gprd:fe-02-lb-gprd"].url == f"http://{cfg.net}.1.3:{cfg.lb_http_port}"
    assert ends["gprd-cny"].url == world.topology.env_url("gprd-cny") and ends["gprd-cny"].canary


def test_a_process_loading_hosts_another_created_never_hands_out_their_pids(tmp_path, monkeypatch):
    """``lab up`` creates the hosts and labd, started in the same second, loads them: both
    count PIDs from the same time-based start. A restart in labd must still give new PIDs."""
    import itertools

    from lab import model

    start = 40_000
    monkeypatch.setattr(model, "_pids", itertools.count(start))
    created = World.open(LabConfig(lab_dir=tmp_path / "lab", octet=53))
    for name in created.hosts:
        created.save_host(name)
    monkeypatch.setattr(model, "_pids", itertools.count(start))  # labd: the same start
    loaded = World.open(LabConfig(lab_dir=tmp_path / "lab", octet=53))
    before = {(h.name, s): svc.pid for h in loaded.hosts.values() for s, svc in h.services.items()}
    for state in loaded.hosts.values():
        loaded.restart_services(state)
    after = {(h.name, s): svc.pid for h in loaded.hosts.values() for s, svc in h.services.items()}
    assert len(before) > 10 and len(set(after.values())) == len(after)
    assert not set(after.values()) & set(before.values())


def test_error_series_exist_at_zero_from_a_handlers_first_request(world):
    """A series born at its first error hides that error from rate(): the canary judge read a
    sparse 2% error rate as 0. The error series start at 0 with the handler's first request."""
    m = HostMetrics()
    m.observe("GET", "/explore", 200, 0.01)
    text = m.render(world.hosts["web-01-sv-gstg"])
    assert value(text, 'http_requests_total{method="GET",handler="/explore",status="500"}') == 0
    assert value(text, 'http_requests_total{method="GET",handler="/explore",status="502"}') == 0
    m.observe("GET", "/explore", 500, 0.01)
    text = m.render(world.hosts["web-01-sv-gstg"])
    assert value(text, 'http_requests_total{method="GET",handler="/explore",status="500"}') == 1
    assert value(text, 'http_requests_total{method="GET",handler="/explore",status="200"}') == 1
    assert 'handler="/",' not in text  # only the handlers that served something
