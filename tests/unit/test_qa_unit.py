"""QA client through real python-gitlab against a tiny fake GitLab REST v4 server."""

import json
import logging
import re
from urllib.parse import unquote, urlsplit

import pytest

from liftoff.errors import InvalidInput, InvalidVersion, QAError
from liftoff.qa import QAClient, qa_variables
from tests.unit.http_fakes import LocalServer, QuietHandler

PROJECT = "gitlab-org/quality/gitlab-qa-runner"
TOKEN = "glpat-private-secret"
TRIGGER = "glptt-trigger-secret"


class FakeGitLab:
    """Answers the python-gitlab calls QAClient makes; pipelines follow scripted statuses."""

    def __init__(self):
        self.requests: list[tuple[str, str, dict]] = []
        self.pipelines: dict[int, dict] = {}
        self.script: list[str] = ["pending", "running", "success"]
        self.jobs: list[dict] = []
        self.fail_with: int | None = None
        self.next_id = 100
        fake = self

        class Handler(QuietHandler):
            def _send(self, code, body):
                self.reply(code, body)

            def _route(self, method):
                path = urlsplit(self.path).path
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw and "json" in (self.headers.get("Content-Type") or "") else {}
                fake.requests.append((method, unquote(path), body))
                if fake.fail_with:
                    return self._send(fake.fail_with, {"message": "nope"})
                m = re.fullmatch(r"/api/v4/projects/([^/]+)/(.*)", path)
                if not m or unquote(m.group(1)) != PROJECT:
                    return self._send(404, {"message": "404 Project Not Found"})
                rest = m.group(2)
                if rest == "trigger/pipeline" and method == "POST":
                    if body.get("token") != TRIGGER:
                        return self._send(404, {"message": "404 Not Found"})
                    return self._send(201, fake.create(body["ref"], body["variables"]))
                if self.headers.get("PRIVATE-TOKEN") != TOKEN:
                    return self._send(401, {"message": "401 Unauthorized"})
                if rest == "pipeline" and method == "POST":
                    variables = {v["key"]: v["value"] for v in body["variables"]}
                    return self._send(201, fake.create(body["ref"], variables))
                m = re.fullmatch(r"pipelines/(\d+)(/jobs|/cancel)?", rest)
                if not m or int(m.group(1)) not in fake.pipelines:
                    return self._send(404, {"message": "404 Not Found"})
                p = fake.pipelines[int(m.group(1))]
                if m.group(2) == "/jobs":
                    return self._send(200, fake.jobs)
                if m.group(2) == "/cancel":
                    p["status"] = "canceled"
                    return self._send(200, p)
                if p["status"] not in ("canceled",) and p["_script"]:
                    p["status"] = p["_script"].pop(0)
                return self._send(200, {k: v for k, v in p.items() if not k.startswith("_")})

            def do_GET(self):  # noqa: N802
                self._route("GET")

            def do_POST(self):  # noqa: N802
                self._route("POST")

        self._http = LocalServer(Handler)
        self.url = self._http.url

    def create(self, ref, variables):
        self.next_id += 1
        pid = self.next_id
        self.pipelines[pid] = {"id": pid, "ref": ref, "status": "created", "variables": variables,
                               "web_url": f"{self.url}/{PROJECT}/-/pipelines/{pid}",
                               "_script": list(self.script)}
        return {k: v for k, v in self.pipelines[pid].items() if not k.startswith("_")}

    def close(self):
        self._http.close()


@pytest.fixture()
def gl():
    fake = FakeGitLab()
    yield fake
    fake.close()


def client(gl, trigger=TRIGGER, token=TOKEN):
    return QAClient(gl.url, token, trigger, PROJECT, "main", timeout=5)


def no_sleep(_s):
    pass


def test_trigger_sends_the_variables_with_the_trigger_token(gl):
    p = client(gl).trigger("gprd-cny", "http://127.42.1.2:24211", "16.3.0-ee.0", "gitlab_canary=true")
    assert p.id == 101 and p.web_url.endswith("/-/pipelines/101")
    method, path, body = gl.requests[-1]
    assert (method, path) == ("POST", f"/api/v4/projects/{PROJECT}/trigger/pipeline")
    assert body["ref"] == "main"
    assert body["variables"] == {"QA_ENVIRONMENT": "gprd-cny", "QA_URL": "http://127.42.1.2:24211",
                                 "QA_EXPECTED_VERSION": "16.3.0-ee.0", "QA_CANARY": "true",
                                 "QA_COOKIES": "gitlab_canary=true"}


def test_trigger_without_trigger_token_creates_a_pipeline(gl):
    p = client(gl, trigger=None).trigger("gstg", "http://127.42.1.1:24210", "16.3.0-rc42.ee.0")
    method, path, _ = gl.requests[-1]
    assert (method, path) == ("POST", f"/api/v4/projects/{PROJECT}/pipeline")
    assert gl.pipelines[p.id]["variables"]["QA_CANARY"] == "false"
    assert "QA_COOKIES" not in gl.pipelines[p.id]["variables"]


def test_run_passes(gl):
    result = client(gl).run("gstg", "http://127.42.1.1:24210", "16.3.0-ee.0", None, timeout=60, poll=1,
                            sleep=no_sleep)
    assert result.passed and result.state == "passed" and result.failed_jobs == ()
    assert "passed" in result.reason and result.web_url.endswith(f"/pipelines/{result.pipeline_id}")
    assert result.variables["QA_EXPECTED_VERSION"] == "16.3.0-ee.0"


def test_run_fails_with_failed_job_names_and_urls(gl):
    gl.script = ["running", "failed"]
    gl.jobs = [
        {"id": 1, "name": "qa-smoke", "status": "failed", "allow_failure": False, "web_url": "http://x/jobs/1"},
        {"id": 2, "name": "qa-flaky", "status": "failed", "allow_failure": True, "web_url": "http://x/jobs/2"},
        {"id": 3, "name": "qa-login", "status": "success", "allow_failure": False, "web_url": "http://x/jobs/3"},
    ]
    result = client(gl).run("gstg", "http://127.42.1.1:24210", "16.3.0-ee.0", timeout=60, poll=1,
                            sleep=no_sleep)
    assert not result.passed and result.state == "failed"
    assert result.failed_jobs == (("qa-smoke", "http://x/jobs/1"),)
    assert "qa-smoke http://x/jobs/1" in result.reason


def test_status_maps_gitlab_states(gl):
    c = client(gl)
    for raw, state in [("success", "passed"), ("failed", "failed"), ("canceled", "canceled"),
                       ("skipped", "failed"), ("manual", "running"), ("pending", "running")]:
        gl.script = [raw]
        p = c.trigger("gstg", "http://127.42.1.1:24210", "16.3.0-ee.0")
        st = c.status(p.id)
        assert (st.state, st.gitlab_status) == (state, raw)


def test_timeout_cancels_and_fails(gl):
    gl.script = ["running"] * 1000
    ticks = iter(range(0, 10_000, 5))
    result = client(gl).run("gstg", "http://127.42.1.1:24210", "16.3.0-ee.0", timeout=30, poll=5,
                            clock=lambda: next(ticks), sleep=no_sleep)
    assert not result.passed and result.state == "timeout" and "within 30s" in result.reason
    assert gl.pipelines[result.pipeline_id]["status"] == "canceled"


def test_unauthorized_is_a_clear_error_without_the_token(gl, monkeypatch):
    monkeypatch.delenv("LIFTOFF_LAB_DIR", raising=False)
    with pytest.raises(QAError) as err:
        QAClient(gl.url, "wrong-token-secret", None, PROJECT,
                 connection="liftoff_ops_gitlab").trigger("gstg", "http://a", "16.3.0-ee.0")
    assert str(err.value) == (f"the ops GitLab at {gl.url} refused liftoff's token (HTTP 401) when "
                              "triggering the pipeline: check the liftoff_ops_gitlab connection's password")
    assert "wrong-token-secret" not in str(err.value)


def test_unauthorized_next_to_a_lab_says_a_purge_made_a_new_token(gl, monkeypatch):
    """After ``python -m lab down --purge`` and up again, the old token gets 401 (polling too)."""
    monkeypatch.setenv("LIFTOFF_LAB_DIR", "/srv/liftoff/.lab")
    c = client(gl)
    p = c.trigger("gstg", "http://a", "16.3.0-ee.0")
    stale = QAClient(gl.url, "glpat-old-secret", None, PROJECT, connection="liftoff_ops_gitlab")
    with pytest.raises(QAError) as err:
        stale.wait(p, timeout=60, poll=1, max_poll_errors=1, sleep=no_sleep)
    assert str(err.value) == (
        f"the ops GitLab at {gl.url} refused liftoff's token (HTTP 401) when reading pipeline {p.id}: "
        "check the liftoff_ops_gitlab connection's password "
        "(a lab purge makes a new token: source /srv/liftoff/.lab/liftoff.env again)")
    assert "\n" not in str(err.value) and "glpat-old-secret" not in str(err.value)


def test_401_on_any_gitlab_error_is_the_token_sentence(gl):
    gl.fail_with = 401
    with pytest.raises(QAError, match=r"^the ops GitLab at .* refused liftoff's token \(HTTP 401\) when "
                                      r"triggering the pipeline: check the gitlab connection's password"):
        client(gl).trigger("gstg", "http://a", "16.3.0-ee.0")


def test_bad_trigger_token_and_unknown_project(gl):
    with pytest.raises(QAError, match=r"HTTP 404.*; the QA project or the trigger token "
                                      r"\(extra.trigger_token of the gitlab connection\) is wrong$"):
        client(gl, trigger="bad-trigger").trigger("gstg", "http://a", "16.3.0-ee.0")
    with pytest.raises(QAError, match="not found"):
        QAClient(gl.url, TOKEN, None, "no/such").trigger("gstg", "http://a", "16.3.0-ee.0")


def test_server_errors_fail_closed(gl):
    gl.fail_with = 500
    with pytest.raises(QAError, match="HTTP 500"):
        client(gl).trigger("gstg", "http://a", "16.3.0-ee.0")


def test_unreachable_gitlab(caplog):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with caplog.at_level(logging.DEBUG), pytest.raises(QAError, match="unreachable"):
        QAClient(f"http://127.0.0.1:{port}", TOKEN, TRIGGER, PROJECT, timeout=2).trigger(
            "gstg", "http://a", "16.3.0-ee.0")
    assert TOKEN not in caplog.text and TRIGGER not in caplog.text


def test_polling_tolerates_a_few_errors_then_fails(gl):
    c = client(gl)
    p = c.trigger("gstg", "http://a", "16.3.0-ee.0")
    gl.fail_with = 502
    with pytest.raises(QAError, match="HTTP 502"):
        c.wait(p, timeout=60, poll=1, max_poll_errors=3, sleep=no_sleep)
    assert sum(1 for r in gl.requests if r[1].endswith(f"pipelines/{p.id}")) == 3


def test_inputs_are_validated_before_anything_is_sent(gl):
    c = client(gl)
    with pytest.raises(InvalidVersion):
        c.trigger("gstg", "http://a", "16.3.0-ee.0; reboot")
    with pytest.raises(InvalidInput):
        c.trigger("gs tg", "http://a", "16.3.0-ee.0")
    with pytest.raises(InvalidInput):
        c.trigger("gstg", "file:///etc/passwd", "16.3.0-ee.0")
    with pytest.raises(InvalidInput):
        c.trigger("gstg", "http://a", "16.3.0-ee.0", canary_cookie="a=b; c=d")
    assert gl.requests == []
    with pytest.raises(QAError, match="no token"):
        QAClient(gl.url, None, None)
    with pytest.raises(InvalidInput):
        QAClient("127.0.0.1", TOKEN)


def test_qa_variables():
    assert qa_variables("gstg", "https://staging.gitlab.com", "16.3.0-ee.0", None) == {
        "QA_ENVIRONMENT": "gstg", "QA_URL": "https://staging.gitlab.com",
        "QA_EXPECTED_VERSION": "16.3.0-ee.0", "QA_CANARY": "false"}


def test_from_settings_names_the_connection_liftoff_read(gl, monkeypatch):
    monkeypatch.delenv("LIFTOFF_LAB_DIR", raising=False)
    monkeypatch.setenv("AIRFLOW_CONN_LIFTOFF_OPS_GITLAB", json.dumps(
        {"conn_type": "http", "host": gl.url, "password": "glpat-stale-secret",
         "extra": {"qa_project": PROJECT}}))
    with pytest.raises(QAError) as err:
        QAClient.from_settings().trigger("gstg", "http://a", "16.3.0-ee.0")
    assert str(err.value).endswith("check the liftoff_ops_gitlab connection's password")
