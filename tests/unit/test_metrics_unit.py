"""Metrics pushes against a tiny fake Pushgateway that records what it receives."""

import base64
import logging
import socket

import pytest
from prometheus_client.parser import text_string_to_metric_families

from liftoff.metrics import PipelineMetrics, delete_group, group_path
from tests.unit.http_fakes import FakeGateway


@pytest.fixture()
def gw():
    fake = FakeGateway()
    yield fake
    fake.close()


def samples(body: str) -> dict[tuple, float]:
    out = {}
    for fam in text_string_to_metric_families(body):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_stage_push(gw):
    m = PipelineMetrics(gw.url, "deploy_canary")
    assert m.stage("gstg", "fleet", "success", 1000.0, 1090.5)
    method, path, body, _ = gw.pushes[-1]
    assert method == "PUT"
    assert path == "/metrics/job/liftoff/env/gstg/pipeline/deploy_canary/stage/fleet"
    s = samples(body)
    assert s[("liftoff_stage_duration_seconds", ())] == 90.5
    assert s[("liftoff_stage_start_timestamp_seconds", ())] == 1000.0
    assert s[("liftoff_stage_end_timestamp_seconds", ())] == 1090.5
    assert s[("liftoff_stage_status", (("status", "success"),))] == 1
    assert s[("liftoff_stage_status", (("status", "failed"),))] == 0


def test_stage_timer_pushes_running_then_failed(gw):
    m = PipelineMetrics(gw.url, "deploy_canary")
    with pytest.raises(RuntimeError), m.stage_timer("gstg", "gitaly"):
        raise RuntimeError("boom")
    statuses = [[k[1][0][1] for k, v in samples(p[2]).items() if k[0] == "liftoff_stage_status" and v == 1][0]
                for p in gw.pushes]
    assert statuses == ["running", "failed"]
    with m.stage_timer("gstg", "gitaly"):
        pass
    assert samples(gw.pushes[-1][2])[("liftoff_stage_status", (("status", "success"),))] == 1


def test_deployed_version_and_redaction(gw):
    m = PipelineMetrics(gw.url, "deploy_canary")
    assert m.deployed_version("gstg", "16.3.0-ee.0", at=5.0)
    method, path, body, _ = gw.pushes[-1]
    assert (method, path) == ("POST", "/metrics/job/liftoff/env/gstg")
    s = samples(body)
    assert s[("liftoff_deployed_version_info", (("env", "gstg"), ("version", "16.3.0-ee.0")))] == 1
    assert s[("liftoff_deployed_timestamp_seconds", ())] == 5.0
    assert PipelineMetrics(gw.url, "p", redact_version=True).deployed_version("gprd", "16.3.1-ee.0")
    body = gw.pushes[-1][2]
    assert "16.3.1" not in body and 'version="internal"' in body
    assert m.deployed_version("gprd", "16.3.2-ee.0", redact=True)
    assert "16.3.2" not in gw.pushes[-1][2]


def test_rollback_counter_reads_back_and_increments(gw):
    gw.exposition = (
        "# TYPE liftoff_rollbacks_total counter\n"
        'liftoff_rollbacks_total{env="gstg",instance="",job="liftoff"} 2\n'
        'liftoff_rollbacks_total{env="gprd",instance="",job="liftoff"} 7\n'
    )
    m = PipelineMetrics(gw.url, "rollback")
    assert m.rollback("gstg")
    method, path, body, _ = gw.pushes[-1]
    assert (method, path) == ("POST", "/metrics/job/liftoff/env/gstg")
    assert samples(body) == {("liftoff_rollbacks_total", ()): 3.0}
    gw.exposition = ""
    assert m.rollback("gprd-cny")
    assert samples(gw.pushes[-1][2]) == {("liftoff_rollbacks_total", ()): 1.0}


def test_pipeline_status_and_counts(gw):
    gw.exposition = (
        "# TYPE liftoff_pipelines_total counter\n"
        'liftoff_pipelines_total{instance="",job="liftoff",pipeline="deploy_canary",status="success"} 4\n'
    )
    m = PipelineMetrics(gw.url, "deploy_canary")
    assert m.pipeline_status("running", start=10.0, count=True)
    running = samples(gw.pushes[-1][2])
    assert running[("liftoff_pipeline_status", (("status", "running"),))] == 1
    assert running[("liftoff_pipeline_start_timestamp_seconds", ())] == 10.0
    assert not any(k[0] == "liftoff_pipelines_total" for k in running)
    assert m.pipeline_status("success", start=10.0, end=20.0)
    method, path, body, _ = gw.pushes[-1]
    assert (method, path) == ("POST", "/metrics/job/liftoff/pipeline/deploy_canary")
    s = samples(body)
    assert s[("liftoff_pipelines_total", (("status", "success"),))] == 5
    assert s[("liftoff_pipeline_end_timestamp_seconds", ())] == 20.0


def test_basic_auth_is_sent_and_never_logged(gw, caplog):
    m = PipelineMetrics(gw.url, "p", login="pusher", password="pw-secret-123")
    assert m.stage("gstg", "fleet", "success", 1.0, 2.0)
    assert gw.pushes[-1][3] == "Basic " + base64.b64encode(b"pusher:pw-secret-123").decode()
    gw.status = 500
    with caplog.at_level(logging.DEBUG):
        assert m.stage("gstg", "fleet", "success", 1.0, 2.0) is False
    assert "metrics push (stage)" in caplog.text and "pw-secret-123" not in caplog.text
    assert "pw-secret-123" not in repr(m)


def test_push_failure_returns_false_and_never_raises(caplog):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    m = PipelineMetrics(f"http://127.0.0.1:{port}", "deploy_canary", timeout=2)
    with caplog.at_level(logging.WARNING):
        assert m.stage("gstg", "fleet", "failed", 1.0, 2.0) is False
        assert m.deployed_version("gstg", "16.3.0-ee.0") is False
        assert m.rollback("gstg") is False
        assert m.pipeline_status("failed") is False
        with m.stage_timer("gstg", "fleet"):
            pass
    assert caplog.text.count("failed") >= 4
    assert delete_group(f"http://127.0.0.1:{port}", {"pipeline": "x"}, timeout=2) is False


def test_delete_group_and_group_path(gw):
    assert delete_group(gw.url, {"pipeline": "deploy_canary", "env": "gstg", "stage": "fleet"})
    assert gw.pushes[-1][:2] == ("DELETE", "/metrics/job/liftoff/env/gstg/pipeline/deploy_canary/stage/fleet")
    assert group_path({"env": "gprd-cny"}) == "/metrics/job/liftoff/env/gprd-cny"


def test_missing_connection_gives_a_disabled_instance(monkeypatch, caplog):
    monkeypatch.setenv("LIFTOFF_NO_AIRFLOW", "1")
    monkeypatch.delenv("AIRFLOW_CONN_LIFTOFF_PUSHGATEWAY", raising=False)
    monkeypatch.delenv("LIFTOFF_CONNECTIONS", raising=False)
    with caplog.at_level(logging.WARNING):
        m = PipelineMetrics.from_settings("deploy_canary")
        assert not m.enabled
        assert m.stage("gstg", "fleet", "success", 1.0, 2.0) is False
    assert "metrics disabled" in caplog.text and "skipped" in caplog.text


def test_from_settings_uses_the_connection(gw, monkeypatch):
    monkeypatch.setenv("LIFTOFF_NO_AIRFLOW", "1")
    monkeypatch.setenv("AIRFLOW_CONN_LIFTOFF_PUSHGATEWAY", gw.url)
    m = PipelineMetrics.from_settings("deploy_canary", redact_version=True)
    assert m.enabled and m.deployed_version("gstg", "16.3.0-ee.0")
    assert 'version="internal"' in gw.pushes[-1][2]


def test_deploy_pressure_gauge_per_environment(gw):
    m = PipelineMetrics(gw.url, "deploy_canary")
    assert m.deploy_pressure("gprd-cny", 42)
    method, path, body, _ = gw.pushes[-1]
    assert (method, path) == ("POST", "/metrics/job/liftoff/env/gprd-cny")
    assert samples(body) == {("liftoff_deploy_pressure", (("env", "gprd-cny"),)): 42.0}


def test_a_finished_deploy_pushes_the_pressure_from_its_version(gw, monkeypatch):
    from liftoff import changes

    asked = []

    def pressure(inventory, env, *, running, timeout):
        asked.append((env, running))
        return changes.ChangeRange(running, "17.9.0-ee.0", "a" * 8, "b" * 8, count=3, known=True)

    monkeypatch.setattr(changes, "pressure", pressure)
    monkeypatch.setenv("LIFTOFF_NO_AIRFLOW", "1")
    monkeypatch.setenv("AIRFLOW_CONN_LIFTOFF_PUSHGATEWAY", gw.url)
    assert PipelineMetrics.from_settings("deploy_canary").deployed_version("gstg", "17.8.0-ee.0")
    assert asked == [("gstg", "17.8.0-ee.0")]
    assert [p[1] for p in gw.pushes] == ["/metrics/job/liftoff/env/gstg"] * 2
    assert samples(gw.pushes[-1][2]) == {("liftoff_deploy_pressure", (("env", "gstg"),)): 3.0}
    # not known: nothing pushed; an instance built by hand does not ask
    unknown = changes.ChangeRange("x", None, reason="no build")
    monkeypatch.setattr(changes, "pressure", lambda *a, **k: unknown)
    assert PipelineMetrics.from_settings("deploy_canary").deployed_version("gstg", "17.8.0-ee.0")
    assert PipelineMetrics(gw.url, "deploy_canary").deployed_version("gstg", "17.8.0-ee.0")
    assert len(gw.pushes) == 4 and asked == [("gstg", "17.8.0-ee.0")]


def test_counter_lock_holds_the_state_store_write_lock(tmp_path):
    """While a counter is read, incremented and pushed, no other process can take the store's
    lock: a second SQLite writer is refused until the block ends."""
    import sqlite3

    from liftoff.metrics import counter_lock

    db = tmp_path / "state.db"
    url = f"sqlite:///{db}"

    def other_writer() -> str:
        conn = sqlite3.connect(db, timeout=0.2, isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("ROLLBACK")
            return "free"
        except sqlite3.OperationalError as exc:
            return str(exc)
        finally:
            conn.close()

    with counter_lock(url, "/metrics/job/liftoff/env/gstg"):
        assert other_writer() == "database is locked"
    assert other_writer() == "free"
    with counter_lock(None, "x"):  # no store: this process only
        pass


def test_from_settings_serialises_counters_in_the_state_store(gw, monkeypatch):
    monkeypatch.setenv("LIFTOFF_NO_AIRFLOW", "1")
    monkeypatch.setenv("AIRFLOW_CONN_LIFTOFF_PUSHGATEWAY", gw.url)
    monkeypatch.setenv("LIFTOFF_STATE_URL", "sqlite:////tmp/liftoff-metrics-unit.db")
    assert PipelineMetrics.from_settings("deploy_canary").state_url == "sqlite:////tmp/liftoff-metrics-unit.db"
    monkeypatch.delenv("LIFTOFF_STATE_URL")
    monkeypatch.delenv("AIRFLOW_CONN_LIFTOFF_STATE", raising=False)
    m = PipelineMetrics.from_settings("deploy_canary")
    assert m.enabled and m.state_url is None and m.rollback("gstg")  # counts, locked in-process only


def test_counter_reads_back_then_pushes_with_basic_auth(gw):
    gw.exposition = 'liftoff_rollbacks_total{env="gstg",instance="",job="liftoff"} 4\n'
    reads: list[str | None] = []
    m = PipelineMetrics(gw.url, "rollback", login="pusher", password="pw-read-123")
    m._read_counter = lambda *a, orig=m._read_counter: reads.append("read") or orig(*a)
    assert m.rollback("gstg") and reads == ["read"]
    assert samples(gw.pushes[-1][2]) == {("liftoff_rollbacks_total", ()): 5.0}
    assert gw.pushes[-1][3] == "Basic " + base64.b64encode(b"pusher:pw-read-123").decode()
