"""Reasons reach people: a failed task's reason is kept (its failure callback), finalize's
sentence carries it, and the sentence becomes the run's note through Airflow's REST API."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from liftoff import notes
from liftoff.store import Store
from tests.unit.http_fakes import LocalServer, QuietHandler


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Store:
    url = f"sqlite:///{tmp_path / 'state.db'}"
    monkeypatch.setenv("LIFTOFF_NO_AIRFLOW", "1")
    monkeypatch.setenv("AIRFLOW_CONN_LIFTOFF_STATE",
                       json.dumps({"conn_type": "generic", "extra": {"url": url}}))
    monkeypatch.setenv("LIFTOFF_STATE_URL", url)
    return Store(url)


def _context(task_id: str, exc: BaseException | None) -> dict:
    return {"ti": SimpleNamespace(task_id=task_id, run_id="manual__2026-12-03T08:00:00+00:00"),
            "dag_run": SimpleNamespace(run_id="manual__2026-12-03T08:00:00+00:00", dag_id="deploy_canary"),
            "exception": exc}


def test_a_failure_callback_keeps_the_reason_for_finalize(state):
    from liftoff_airflow import dagkit

    exc = RuntimeError("QA on gstg failed:\n  2 jobs failed (smoke, api)")
    assert dagkit.record_failure(_context("stage_2_staging_gitaly.qa", exc)) is True
    assert dagkit.record_failure(_context("finalize", RuntimeError("the summary itself"))) is False
    assert state.step_failures("manual__2026-12-03T08:00:00+00:00") == {
        "stage_2_staging_gitaly.qa": "QA on gstg failed: 2 jobs failed (smoke, api)"}


def test_a_reason_without_words_names_the_exception(state):
    from liftoff_airflow import dagkit

    assert dagkit.failure_reason(TimeoutError()) == "TimeoutError (no message; see the task log)"
    assert dagkit.failure_reason(None) == "no reason given (see the task log)"
    assert len(dagkit.failure_reason(ValueError("x" * 5000))) == 1000


def test_a_callback_that_cannot_record_never_raises(monkeypatch):
    from liftoff_airflow import dagkit

    monkeypatch.setenv("LIFTOFF_NO_AIRFLOW", "1")
    monkeypatch.setenv("LIFTOFF_STATE_URL", "postgresql://127.0.0.1:1/nothing")
    monkeypatch.setenv("AIRFLOW_CONN_LIFTOFF_STATE", json.dumps(
        {"conn_type": "generic", "extra": {"url": "postgresql://127.0.0.1:1/nothing"}}))
    assert dagkit.record_failure(_context("stage_1_staging_migrations.migrate", RuntimeError("x"))) is False


def test_run_sentence_names_the_first_failure_with_its_reason_and_what_next():
    from liftoff_airflow import dagkit

    failed = ["stage_5_production_migrations.precheck", "rollback"]
    text = dagkit.run_sentence("deploy_canary", failed, [], {
        "stage_5_production_migrations.precheck": "critical alert firing on gprd: HighErrorRate.",
        "rollback": "not reached"})
    assert text == ("deploy_canary failed at stage_5_production_migrations.precheck (first): critical alert "
                    "firing on gprd: HighErrorRate; then rollback")
    nxt = dagkit.next_step("scheduled__2026-12-03T02:00:00+00:00", "deploy_canary", failed)
    assert "liftoff retry scheduled__2026-12-03T02:00:00+00:00 stage_5_production_migrations" in nxt
    assert "trigger fast_deploy again" in dagkit.next_step("r1", "fast_deploy", ["deploy"])


class _Api(QuietHandler):
    seen: list = []
    answer = 200

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        ok = body == {"username": "liftoff", "password": "s3cret-pw"}
        self.reply(201 if ok else 401, {"access_token": "tok-123"} if ok else {"detail": "no"})

    def do_PATCH(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append((self.path, self.headers["Authorization"], body))
        self.reply(type(self).answer, {"note": body.get("note")})


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch):
    _Api.seen, _Api.answer = [], 200
    server = LocalServer(_Api)
    monkeypatch.setenv("LIFTOFF_NO_AIRFLOW", "1")
    monkeypatch.setenv("AIRFLOW_CONN_LIFTOFF_AIRFLOW_API", json.dumps(
        {"conn_type": "http", "host": server.url, "login": "liftoff", "password": "s3cret-pw",
         "extra": {"timeout": 3}}))
    yield server
    server.close()


def test_the_summary_becomes_the_run_note(api):
    run_id = "manual__2026-12-03T08:00:00+00:00"
    assert notes.set_run_note("deploy_canary", run_id, "deploy_canary failed at x (first):\n  why") is True
    [(path, auth, body)] = _Api.seen
    assert path == ("/api/v2/dags/deploy_canary/dagRuns/manual__2026-12-03T08%3A00%3A00%2B00%3A00"
                    "?update_mask=note")
    assert auth == "Bearer tok-123"
    assert body == {"note": "deploy_canary failed at x (first): why"}


def test_a_refused_note_is_logged_without_the_password(api, caplog):
    _Api.answer = 403
    assert notes.set_run_note("deploy_canary", "r1", "text") is False
    assert "run note not set" in caplog.text and "s3cret-pw" not in caplog.text


def test_no_connection_no_note(monkeypatch, caplog):
    monkeypatch.setenv("LIFTOFF_NO_AIRFLOW", "1")
    monkeypatch.delenv("AIRFLOW_CONN_LIFTOFF_AIRFLOW_API", raising=False)
    monkeypatch.delenv("LIFTOFF_CONNECTIONS", raising=False)
    caplog.set_level("INFO")
    assert notes.set_run_note("deploy_canary", "r1", "text") is False
    assert "run note not set (liftoff_airflow_api)" in caplog.text


def test_a_long_summary_fits_airflow_s_note():
    text = notes.note_text("word " * 400)
    assert len(text) == notes.NOTE_CHARS and text.endswith("…")


def test_a_deploy_says_what_it_deploys_in_the_note_and_keeps_its_changes(monkeypatch):
    from liftoff.changes import ChangeRange
    from liftoff_airflow import dagkit

    pushed: dict = {}
    noted: list = []
    ti = SimpleNamespace(xcom_push=lambda key, value: pushed.__setitem__(key, value))
    dag_run = SimpleNamespace(dag_id="deploy_canary", run_id="deploy_17.6.0-ee.0__20261203T080012Z_1a2b")
    monkeypatch.setattr(dagkit, "get_current_context", lambda: {"ti": ti, "dag_run": dag_run})
    monkeypatch.setattr(notes, "set_run_note", lambda *a: noted.append(a) or True)
    rng = ChangeRange("17.5.0-ee.0", "17.6.0-ee.0", from_sha="a" * 40, to_sha="b" * 40, count=2,
                      titles=("Fix the thing", "Add the other"), web_url="https://ops/compare", known=True)
    dagkit.keep_changes([rng], "17.6.0-ee.0", ["gstg", "gprd-cny"])
    assert pushed["changes"].startswith("what changed: 2 commits (aaaaaaaa..bbbbbbbb): Fix the thing;")
    [(dag_id, run_id, text)] = noted
    assert (dag_id, run_id) == ("deploy_canary", dag_run.run_id)
    assert text.startswith("deploy_canary: deploying 17.6.0-ee.0 to gstg, gprd-cny (running); what changed")
    pushed.clear()
    dagkit.keep_changes([], "17.6.0-ee.0", ["gstg"])
    assert pushed == {} and noted[-1][2] == "deploy_canary: deploying 17.6.0-ee.0 to gstg (running)"


def test_a_dag_without_finalize_gets_the_failure_as_its_note(monkeypatch):
    from liftoff_airflow import dagkit

    noted: list = []
    monkeypatch.setattr(notes, "set_run_note", lambda *a: noted.append(a) or True)
    ctx = _context("set_weight", RuntimeError("fe-02-lb-gprd: unreachable"))
    ctx["dag"] = SimpleNamespace(task_dict={"set_weight": object()})
    assert dagkit.note_failure(ctx) is True
    assert noted == [("deploy_canary", "manual__2026-12-03T08:00:00+00:00",
                      "deploy_canary failed at set_weight: fe-02-lb-gprd: unreachable")]
    ctx["dag"] = SimpleNamespace(task_dict={"set_weight": object(), "finalize": object()})
    assert dagkit.note_failure(ctx) is False and len(noted) == 1  # finalize writes that one
