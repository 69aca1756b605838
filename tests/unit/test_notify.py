"""liftoff.notify: Slack incoming-webhook JSON through the HTTP provider's HttpHook on the
``liftoff_chat`` connection, against a local webhook; the event filter; nothing without a
connection; a failing, slow or absent webhook never raises, returns within the timeout and is
counted; internal versions never shown; the webhook's token never logged."""

from __future__ import annotations

import json
import logging
import threading
import time
from datetime import timedelta
from types import SimpleNamespace

import pytest

from liftoff import notify
from liftoff.errors import RollbackRefused
from tests.unit.http_fakes import FakeGateway, LocalServer, QuietHandler

TOKEN_PATH = "/services/T0UNIT/B0UNIT/s3cr3tT0ken"
AIRFLOW = "http://airflow.example:8080"


class FakeChat:
    """A webhook that stores what it gets; ``mode``: ok, fail (HTTP 500) or slow (no answer
    until released)."""

    def __init__(self):
        self.messages: list[tuple[str, dict]] = []
        self.mode = "ok"
        self.release = threading.Event()
        fake = self

        class Handler(QuietHandler):
            def do_POST(self):  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"null")
                if fake.mode == "slow":
                    fake.release.wait(10)
                if fake.mode == "fail":
                    self.reply(500, b"boom", "text/plain")
                    return
                fake.messages.append((self.path, body))
                self.reply(200, b"ok", "text/plain")

        self._http = LocalServer(Handler)
        self.url = self._http.url

    def close(self):
        self.release.set()
        self._http.close()


def _conn(url: str, **extra) -> str:
    return json.dumps({"conn_type": "http", "host": url, "password": TOKEN_PATH, "extra": extra})


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("AIRFLOW_CONN_LIFTOFF_CHAT", "AIRFLOW_CONN_LIFTOFF_PUSHGATEWAY", "LIFTOFF_INVENTORY",
                 "LIFTOFF_CONNECTIONS", "LIFTOFF_NOTIFY_EVENTS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LIFTOFF_AIRFLOW_URL", AIRFLOW)
    return monkeypatch


@pytest.fixture
def chat(clean_env):
    fake = FakeChat()
    clean_env.setenv("AIRFLOW_CONN_LIFTOFF_CHAT", _conn(fake.url, timeout=1))
    yield fake
    fake.close()


@pytest.fixture
def gateway(clean_env):
    gw = FakeGateway()
    clean_env.setenv("AIRFLOW_CONN_LIFTOFF_PUSHGATEWAY", json.dumps({"conn_type": "http", "host": gw.url}))
    yield gw
    gw.close()


def _run(pipeline: str = "deploy_canary", who: str = "alice"):
    return SimpleNamespace(run_id="manual__2026-12-02T16_40_00_00_00", who=who, pipeline=pipeline,
                           inventory=None)


def _context(dag_id: str, task_id: str, params: dict | None = None, exception: BaseException | None = None,
             task=None) -> dict:
    run_id = "manual__2026-12-02T16:40:00+00:00"
    dag_run = SimpleNamespace(dag_id=dag_id, run_id=run_id, conf={"requested_by": "alice"}, run_type="manual")
    ti = SimpleNamespace(task_id=task_id, run_id=run_id, map_index=-1)
    return {"dag_run": dag_run, "ti": ti, "task_instance": ti, "params": params or {}, "exception": exception,
            "task": task}


def _wait(check, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.02)
    return check()


# -- delivery ---------------------------------------------------------------------------------

def test_deploy_started_posts_slack_json_to_the_webhook_through_the_connection(chat):
    assert notify.deploy_started(_run(), "17.6.0-ee.0", ["gstg", "gprd-cny"]) is True
    [(path, body)] = chat.messages
    assert path == TOKEN_PATH
    assert set(body) == {"text", "attachments"}
    text = body["text"]
    assert "17.6.0-ee.0" in text and "gstg, gprd-cny" in text and "alice" in text
    assert f"{AIRFLOW}/dags/deploy_canary/runs/manual__2026-12-02T16_40_00_00_00" in text
    [attachment] = body["attachments"]
    assert attachment["footer"].endswith("deploy_started") and attachment["color"].startswith("#")
    fields = {f["title"]: f["value"] for f in attachment["fields"]}
    assert fields["version"] == "17.6.0-ee.0" and fields["environments"] == "gstg, gprd-cny"
    assert fields["by"] == "alice"


def test_every_event_has_a_message(chat):
    run = _run()
    sent = [
        notify.stage_passed(run, "gstg", "stage_1", 12.3),
        notify.halted(run, ["gstg"], {"halted": ["gstg"], "drained": ["web-01-sv-gstg"]}),
        notify.rollback_started(run, "gstg", "17.5.0-ee.0", mode="fast", reason="INC-1 error rate"),
        notify.rollback_finished(run, "gstg", "17.5.0-ee.0"),
        notify.rollback_refused(run, "rollback of gprd to 17.5.0-ee.0 is unsafe: post migrations ran",
                                "gprd"),
        notify.canary_verified(run, "17.6.0-ee.0", ["security-1"]),
        notify.patch_applied(run, {"env": "gprd", "patch_id": "security-1", "roles": ["web"],
                                   "applied": ["w1"], "failed": {}, "status": "applied",
                                   "halt": {"reason": "post-deploy patch"}}),
        notify.halt_lifted(run, {"lifted": ["security-1"], "reason": "in the build now", "still_active": []}),
        notify.lock_changed(run, {"env": "gstg", "locked": True, "who": "alice",
                                  "reason": "locked by hand: INC"}),
        notify.lock_changed(run, {"env": "gstg", "locked": False, "removed": {
            "run_id": "scheduled__x", "who": "scheduler", "reason": "deploy_canary", "since": "2026-12-02",
            "by_hand": False}}),
        notify.fast_deploy(run, "gprd", "17.6.1-ee.0", "CVE-2026-1 fix"),
        notify.run_finished(run, {"status": "failed", "summary": "deploy_canary failed at qa (first)"}),
        notify.step_failed(_context("deploy_canary", "stage_3_staging_fleet.qa",
                                    exception=RuntimeError("QA failed on gstg: 2 jobs failed"))),
    ]
    assert all(sent), sent
    events = [body["attachments"][0]["footer"].rsplit(" ", 1)[-1] for _, body in chat.messages]
    assert events == ["stage_passed", "halted", "rollback_started", "rollback_finished", "rollback_refused",
                      "canary_verified", "patch_applied", "halt_lifted", "lock_taken", "lock_force_released",
                      "fast_deploy", "run_finished", "stage_failed"]
    texts = [body["text"] for _, body in chat.messages]
    assert "post migrations ran" in texts[4]  # the guard's sentence as it is
    assert "deploy_canary is halted" in texts[6]
    assert "a running deploy's lock" in texts[9]
    assert "CVE-2026-1 fix" in texts[10]
    failed = texts[12]
    assert "stage_3_staging_fleet failed at qa" in failed and "QA failed on gstg: 2 jobs failed" in failed
    assert (f"{AIRFLOW}/dags/deploy_canary/runs/manual__2026-12-02T16%3A40%3A00%2B00%3A00/tasks/"
            "stage_3_staging_fleet.qa") in failed
    # nothing to say: an unlock of a free environment, an automatic rollback with nothing changed
    assert notify.lock_changed(run, {"env": "gstg", "locked": False, "removed": None}) is False
    assert notify.rollback_finished(run, None, None) is False


def test_approval_waiting_carries_the_link_to_answer(chat):
    from liftoff_airflow.notifiers import ApprovalWaitingNotifier

    task = SimpleNamespace(subject="Promote 17.6.0-ee.0 to production?", body="Canary verified 17.6.0-ee.0.",
                           response_timeout=timedelta(hours=8), defaults=["Reject"])
    context = _context("deploy_production", "approval", task=task)
    ApprovalWaitingNotifier()(context)  # as HITLOperator.execute calls it
    [(_, body)] = chat.messages
    assert body["text"].startswith(":raising_hand: Promote 17.6.0-ee.0 to production?")
    assert "answer within 8 h, then: Reject" in body["text"]
    assert (f"{AIRFLOW}/dags/deploy_production/runs/manual__2026-12-02T16%3A40%3A00%2B00%3A00/tasks/approval/"
            "required_actions?map_index=-1") in body["text"]


def test_finalize_and_refused_rollbacks_are_not_told_twice(chat, monkeypatch):
    context = _context("deploy_canary", "rollback", exception=RuntimeError("automatic rollback refused"))
    assert notify.step_failed(_context("deploy_canary", "finalize", exception=RuntimeError("x"))) is False
    monkeypatch.setattr(notify, "_context", lambda: context)
    with pytest.raises(RollbackRefused), notify.refusals(_run(), "gprd"):
        raise RollbackRefused("automatic rollback of gprd refused: post-deployment migrations ran")
    assert notify.step_failed(context) is False  # its failure callback: already told
    events = [body["attachments"][0]["footer"].rsplit(" ", 1)[-1] for _, body in chat.messages]
    assert events == ["rollback_refused"]


def test_dry_runs_say_so(chat):
    context = _context("deploy_canary", "stage_1_staging_migrations.stage_done", params={"dry_run": True})
    assert notify.emit("stage_passed", "stage_1 on gstg passed", context=context)
    assert chat.messages[0][1]["text"].startswith("[dry run] ")


# -- which events -----------------------------------------------------------------------------

def test_parse_events():
    everything = frozenset(notify.EVENTS)
    assert notify.parse_events(None) is None
    assert notify.parse_events("all") == everything
    assert notify.parse_events("none") == frozenset() == notify.parse_events("")
    assert notify.parse_events("deploy_started, stage_failed") == {"deploy_started", "stage_failed"}
    assert notify.parse_events("all,-stage_passed") == everything - {"stage_passed"}
    assert notify.parse_events(["halted", "no_such_event"]) == {"halted"}


def test_the_event_filter_env_then_connection_extra(chat, clean_env):
    run = _run()
    clean_env.setenv("LIFTOFF_NOTIFY_EVENTS", "deploy_started,stage_failed")
    assert notify.stage_passed(run, "gstg", "stage_1") is False
    assert notify.deploy_started(run, "17.6.0-ee.0", ["gstg"]) is True
    clean_env.delenv("LIFTOFF_NOTIFY_EVENTS")
    clean_env.setenv("AIRFLOW_CONN_LIFTOFF_CHAT", _conn(chat.url, events="all,-deploy_started"))
    assert notify.deploy_started(run, "17.6.0-ee.0", ["gstg"]) is False
    assert notify.stage_passed(run, "gstg", "stage_1") is True
    clean_env.setenv("LIFTOFF_NOTIFY_EVENTS", "none")  # the environment wins over the extra
    assert notify.stage_passed(run, "gstg", "stage_1") is False
    events = [body["attachments"][0]["footer"].rsplit(" ", 1)[-1] for _, body in chat.messages]
    assert events == ["deploy_started", "stage_passed"]


def test_no_connection_sends_nothing_and_says_nothing(clean_env, caplog):
    caplog.set_level(logging.DEBUG, logger="liftoff")
    before = notify.failed_counts()
    assert notify.deploy_started(_run(), "17.6.0-ee.0", ["gstg"]) is False
    assert notify.step_failed(_context("deploy_canary", "precheck", exception=RuntimeError("x"))) is False
    assert notify.failed_counts() == before
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not notify.Chat.from_settings("deploy_canary").enabled


# -- a chat outage never gets in the way ----------------------------------------------------------

def _failures(gateway: FakeGateway, event: str) -> bool:
    return any(f'liftoff_notifications_failed_total{{event="{event}"}} 1.0' in body and path.endswith(
        "/job/liftoff/pipeline/deploy_canary") for _, path, body, _ in gateway.pushes)


def test_a_failing_webhook_returns_false_and_is_counted(chat, gateway):
    chat.mode = "fail"
    before = notify.failed_counts().get("stage_passed", 0)
    assert notify.stage_passed(_run(), "gstg", "stage_1") is False
    assert notify.failed_counts()["stage_passed"] == before + 1
    assert _wait(lambda: _failures(gateway, "stage_passed"))


def test_a_slow_webhook_returns_within_the_timeout_and_is_counted(chat, gateway, clean_env):
    clean_env.setenv("AIRFLOW_CONN_LIFTOFF_CHAT", _conn(chat.url, timeout=0.5))
    chat.mode = "slow"  # answers only when the test ends
    before = notify.failed_counts().get("deploy_started", 0)
    assert notify.deploy_started(_run(), "17.6.0-ee.0", ["gstg"]) is False  # returned: not blocked
    assert notify.failed_counts()["deploy_started"] == before + 1
    assert _wait(lambda: _failures(gateway, "deploy_started"))
    assert chat.messages == []


def test_an_unreachable_webhook_returns_false_and_is_counted(clean_env):
    clean_env.setenv("AIRFLOW_CONN_LIFTOFF_CHAT", _conn("http://127.0.0.1:9", timeout=1))
    before = notify.failed_counts().get("halted", 0)
    assert notify.halted(_run(), ["gstg"]) is False
    assert notify.failed_counts()["halted"] == before + 1


def test_bad_input_never_raises(chat):
    assert notify.emit("no_such_event", "x", run=_run()) is False
    assert notify.step_failed({}) is True  # nothing known: still one line, nothing raised
    assert notify.patch_applied(_run(), None) is False  # type: ignore[arg-type]


# -- secrets and internal builds ------------------------------------------------------------------

def test_the_webhook_token_is_never_logged(chat, clean_env, caplog):
    caplog.set_level(logging.DEBUG, logger="liftoff")
    caplog.set_level(logging.DEBUG, logger="airflow")
    chat.mode = "fail"
    notify.stage_passed(_run(), "gstg", "stage_1")
    clean_env.setenv("AIRFLOW_CONN_LIFTOFF_CHAT", _conn("http://127.0.0.1:9", timeout=1))
    notify.stage_passed(_run(), "gstg", "stage_1")
    warnings = [r.getMessage() for r in caplog.records if r.name == "liftoff.notify"]
    assert len(warnings) == 2, warnings
    assert "500" in warnings[0] and chat.url in warnings[0]
    assert "http://127.0.0.1:9" in warnings[1]
    assert "s3cr3tT0ken" not in caplog.text and "T0UNIT" not in caplog.text
    assert notify.Chat.from_settings().sanitize(f"url: {TOKEN_PATH} s3cr3tT0ken") == "url: *** ***"


def test_an_internal_build_never_shows_its_version(chat):
    secret = "17.6.1-ee.0"
    assert notify.fast_deploy(_run("fast_deploy"), "gprd", secret, f"CVE fix, {secret} for gprd",
                              internal=True)
    assert notify.deploy_started(_run("fast_deploy"), secret, ["gprd"], internal=True)
    # a run whose params say internal: every message of it, whatever the step says
    context = _context("fast_deploy", "deploy_gitaly", params={"internal": True, "version": secret},
                       exception=RuntimeError(f"apt-get install -y gitlab-ee={secret} failed on gitaly-01"))
    assert notify.step_failed(context)
    assert len(chat.messages) == 3
    for _, body in chat.messages:
        assert secret not in json.dumps(body)
        assert "internal" in json.dumps(body)


def test_links(clean_env):
    assert notify.run_link("deploy_canary", "manual__2026-12-02T16:40:00+00:00") == (
        f"{AIRFLOW}/dags/deploy_canary/runs/manual__2026-12-02T16%3A40%3A00%2B00%3A00")
    clean_env.delenv("LIFTOFF_AIRFLOW_URL")
    assert notify.run_link("rollback", "r", "safety_check") == \
        "http://127.0.0.1:8080/dags/rollback/runs/r/tasks/safety_check"
    assert notify.safe_url("https://hooks.slack.com/services/T/B/x") == "https://hooks.slack.com"


def test_the_dags_wire_the_failure_callback_and_the_approval_notifier():
    from airflow.dag_processing.dagbag import DagBag

    from liftoff_airflow import dagkit
    from liftoff_airflow.notifiers import ApprovalWaitingNotifier
    from tests.unit.test_dag_integrity import DAGS

    assert dagkit.DEFAULT_ARGS["on_failure_callback"] is dagkit.notify_failure
    bag = DagBag(dag_folder=str(DAGS))
    approval = bag.dags["deploy_production"].get_task("approval")
    assert [type(n) for n in approval.notifiers] == [ApprovalWaitingNotifier]
    for dag in bag.dags.values():
        for task in dag.tasks:
            assert dagkit.notify_failure in task.on_failure_callback, (dag.dag_id, task.task_id)


# -- what changed --------------------------------------------------------------------------------

class _Records:
    """A run's store whose gstg runs ``version``."""

    def __init__(self, version: str | None):
        self.version = version

    def deployments(self, env: str, limit: int | None = None):
        if env != "gstg" or not self.version:
            return []
        return [SimpleNamespace(version=self.version, status="success")]


def test_deploy_started_shows_what_changed(chat, monkeypatch):
    from liftoff import changes

    asked, pushed = [], []

    def change_range(run, from_version, to_version, *, internal):
        asked.append((from_version, to_version, internal))
        return changes.ChangeRange(from_version, to_version, "aaaaaaa", "bbbbbbb", count=7, known=True,
                                   titles=("newest", "older"), web_url="https://ops.example/compare")

    monkeypatch.setattr(changes, "change_range", change_range)
    monkeypatch.setattr(changes, "push_pressure", lambda run, envs, running: pushed.append(running))
    run = SimpleNamespace(**vars(_run()), store=_Records("17.5.0-ee.0"))
    assert notify.deploy_started(run, "17.6.0-ee.0", ["gstg", "gprd-cny"]) is True
    assert asked == [("17.5.0-ee.0", "17.6.0-ee.0", False)]
    [(_, body)] = chat.messages
    lines = body["text"].splitlines()
    assert lines[1] == ("what changed on gstg: 7 commits (17.5.0-ee.0 → 17.6.0-ee.0): "
                        "https://ops.example/compare")
    assert lines[2:4] == ["• newest", "• older"] and lines[4] == "… and 5 more"
    fields = {f["title"]: f["value"] for f in body["attachments"][0]["fields"]}
    assert fields["commits"] == "7"
    assert pushed == [{"gstg": "17.5.0-ee.0"}]  # gprd-cny runs nothing known: not pushed


def test_deploy_started_says_why_the_range_is_not_known(chat):
    run = SimpleNamespace(**vars(_run()), store=_Records(None))
    assert notify.deploy_started(run, "17.6.0-ee.0", ["gstg"]) is True
    [(_, body)] = chat.messages
    assert "what changed: not known (no successful deploy of gstg recorded)" in body["text"]
    fields = {f["title"]: f["value"] for f in body["attachments"][0]["fields"]}
    assert fields["commits"] == "not known"


def test_deploy_started_of_an_internal_build_hides_it_in_what_changed(chat, monkeypatch):
    secret = "17.6.1-ee.0"
    monkeypatch.setenv("AIRFLOW_CONN_LIFTOFF_BUILDS", json.dumps({"conn_type": "http", "host": "http://127.0.0.1:9"}))
    run = SimpleNamespace(**vars(_run("fast_deploy")), store=_Records("17.5.0-ee.0"))
    assert notify.deploy_started(run, secret, ["gstg"], internal=True) is True
    [(_, body)] = chat.messages
    assert secret not in json.dumps(body)
    assert "what changed: not known (no known commit for 17.5.0-ee.0 and internal" in body["text"]
