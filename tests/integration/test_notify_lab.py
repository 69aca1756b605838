"""Chat notifications against the lab's chat receiver (lab/chat.py), through the ``liftoff_chat``
connection the lab exports: a message arrives and ``python -m lab chat`` prints it; with the
receiver failing or slow the call returns False, raises nothing, and the failure is counted in
the lab's Pushgateway."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from types import SimpleNamespace

import pytest

from lab import chat as lab_chat
from liftoff import notify


@pytest.fixture
def receiver(lab, lab_env, monkeypatch):
    """The lab's receiver, answering and empty; put back that way afterwards."""
    monkeypatch.delenv("LIFTOFF_NOTIFY_EVENTS", raising=False)
    monkeypatch.setenv("LIFTOFF_AIRFLOW_URL", "http://airflow.lab:8080")
    out = lab.cli("chat", "--fail", "off", "--slow", "0", "--clear")
    assert out.returncode == 0, out.stderr
    yield lab
    lab.cli("chat", "--fail", "off", "--slow", "0")


def _run():
    return SimpleNamespace(run_id="manual__2026-12-02T16_40_00_00_00", who="alice", pipeline="deploy_canary",
                           inventory=None)


def _failed_total(lab, event: str) -> float:
    with urllib.request.urlopen(f"http://{lab.config.pushgateway_addr}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    for line in text.splitlines():
        if (line.startswith("liftoff_notifications_failed_total{") and f'event="{event}"' in line
                and 'pipeline="deploy_canary"' in line):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_the_lab_exports_the_chat_connection(lab):
    conn = json.loads(lab.env["AIRFLOW_CONN_LIFTOFF_CHAT"])
    assert conn["host"] == f"http://{lab.config.chat_addr}"
    assert conn["password"] == lab_chat.webhook_path(lab.config)


def test_a_message_reaches_the_lab_chat_through_the_connection(receiver):
    lab = receiver
    assert notify.deploy_started(_run(), "17.6.0-ee.0", ["gstg", "gprd-cny"]) is True
    assert notify.stage_passed(_run(), "gstg", "stage_1", 4.0) is True
    stored = lab_chat.read_messages(lab.config)
    assert [m["status"] for m in stored] == [200, 200]
    assert [lab_chat.event_of(m) for m in stored] == ["deploy_started", "stage_passed"]
    assert "17.6.0-ee.0" in stored[0]["payload"]["text"]
    printed = lab.cli("chat")
    assert printed.returncode == 0, printed.stderr
    shown = printed.stdout
    assert "(deploy_started) :rocket: deploy_canary: deploying 17.6.0-ee.0 to gstg, gprd-cny" in shown
    assert "http://airflow.lab:8080/dags/deploy_canary/runs/manual__2026-12-02T16_40_00_00_00" in shown
    as_json = json.loads(lab.cli("chat", "--json", "--last", "1").stdout)
    assert len(as_json) == 1 and lab_chat.event_of(as_json[0]) == "stage_passed"


def test_a_wrong_webhook_path_is_refused_like_slack(receiver):
    req = urllib.request.Request(lab_chat.url(receiver.config, "/services/T/B/wrong"), data=b'{"text": "x"}',
                                 method="POST", headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(req, timeout=10)
    assert refused.value.code == 404 and refused.value.read() == b"no_service"


def test_a_failing_receiver_returns_false_and_is_counted(receiver):
    lab = receiver
    out = lab.cli("chat", "--fail", "on")
    assert out.returncode == 0 and "failing (HTTP 500)" in out.stdout
    before_local = notify.failed_counts().get("halted", 0)
    before_metric = _failed_total(lab, "halted")
    assert notify.halted(_run(), ["gstg"]) is False  # nothing raised
    assert notify.failed_counts()["halted"] == before_local + 1
    lab.wait_for("the failure counted in the Pushgateway",
                 lambda: _failed_total(lab, "halted") == before_metric + 1, timeout=15)
    assert [m["status"] for m in lab_chat.read_messages(lab.config)] == [500]
    assert "[HTTP 500]" in lab.cli("chat").stdout


def test_a_slow_receiver_returns_false_and_is_counted(receiver, monkeypatch):
    lab = receiver
    conn = json.loads(lab.env["AIRFLOW_CONN_LIFTOFF_CHAT"])
    monkeypatch.setenv("AIRFLOW_CONN_LIFTOFF_CHAT", json.dumps({**conn, "extra": {"timeout": 1}}))
    out = lab.cli("chat", "--slow", "3")
    assert out.returncode == 0 and "3 s before each answer" in out.stdout
    before = notify.failed_counts().get("rollback_finished", 0)
    assert notify.rollback_finished(_run(), "gstg", "17.5.0-ee.0") is False
    assert notify.failed_counts()["rollback_finished"] == before + 1


def test_the_chat_cli_refuses_bad_settings(receiver):
    assert receiver.cli("chat", "--slow", "-1").returncode == 2
    assert receiver.cli("chat", "--fail", "maybe").returncode == 2
