import dataclasses
import json
import logging

import pytest
from sqlalchemy.engine import make_url

from liftoff.errors import ConfigError, ConnectionNotFound
from liftoff.inventory import QAConfig, parse_inventory
from liftoff.settings import (
    ConnInfo,
    alertmanager_url,
    gitlab_settings,
    parse_connection,
    prometheus_url,
    pushgateway_url,
    resolve_connection,
    state_url,
)


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    for var in ("LIFTOFF_STATE_URL", "LIFTOFF_CONNECTIONS", "LIFTOFF_NO_AIRFLOW"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(params=["airflow", "plain"])
def mode(request, monkeypatch):
    """Every lookup is tested through Airflow and through the plain fallback."""
    if request.param == "plain":
        monkeypatch.setenv("LIFTOFF_NO_AIRFLOW", "1")
    return request.param


def _inventory(**connections):
    return parse_inventory({
        "connections": connections,
        "qa": {"ref": "stable"},
        "environments": {"gstg": {
            "url": "http://127.0.0.1:1", "alert_matchers": {"env": "gstg"},
            "deploy_node": {"name": "d", "address": "127.0.0.1"},
            "roles": [{"name": "web", "stage": "fleet", "hosts": [{"name": "w", "address": "127.0.0.2"}]}],
        }},
    })


def test_json_connection_from_env(monkeypatch, mode):
    monkeypatch.setenv("AIRFLOW_CONN_T_AM", json.dumps(
        {"conn_type": "http", "host": "127.56.0.9", "port": 9093, "login": "u", "password": "s3cret-pw",
         "extra": {"path": "/am"}}))
    info = resolve_connection("t_am")
    assert (info.host, info.port, info.login, info.password) == ("127.56.0.9", 9093, "u", "s3cret-pw")
    assert info.base_url() == "http://127.56.0.9:9093/am"
    assert "s3cret-pw" not in repr(info)


def test_uri_connection_from_env(monkeypatch, mode):
    monkeypatch.setenv("AIRFLOW_CONN_T_PGW", "http://127.56.0.9:9091")
    assert resolve_connection("t_pgw").base_url() == "http://127.56.0.9:9091"


def test_purpose_helpers_follow_the_inventory(monkeypatch, mode):
    inv = _inventory(alertmanager="x_am", pushgateway="x_pgw", prometheus="x_prom", gitlab="x_gl")
    monkeypatch.setenv("AIRFLOW_CONN_X_AM", json.dumps({"conn_type": "http", "host": "127.0.0.5", "port": 1}))
    monkeypatch.setenv("AIRFLOW_CONN_X_PGW", json.dumps({"host": "https://pgw.example.com"}))
    monkeypatch.setenv("AIRFLOW_CONN_X_PROM", json.dumps({"host": "127.0.0.6", "port": 9090,
                                                          "extra": {"scheme": "https"}}))
    monkeypatch.setenv("AIRFLOW_CONN_X_GL", json.dumps({
        "conn_type": "http", "host": "127.0.0.7", "port": 8080, "password": "glpat-secret",
        "extra": {"trigger_token": "trig-secret", "project": "ops/qa", "ssl_verify": "false"}}))
    assert alertmanager_url(inv) == "http://127.0.0.5:1"
    assert pushgateway_url(inv) == "https://pgw.example.com"
    assert prometheus_url(inv) == "https://127.0.0.6:9090"
    gl = gitlab_settings(inv)
    assert gl.url == "http://127.0.0.7:8080"
    assert (gl.private_token, gl.trigger_token) == ("glpat-secret", "trig-secret")
    assert gl.project == "ops/qa" and gl.ref == "stable" and gl.ssl_verify is False
    assert "secret" not in repr(gl)
    monkeypatch.setenv("AIRFLOW_CONN_X_GL", json.dumps({
        "host": "http://127.0.0.7:8080", "password": "t",
        "extra": {"qa_project": "lab/qa", "qa_ref": "dev"}}))
    gl = gitlab_settings(dataclasses.replace(inv, qa=QAConfig()))
    assert (gl.project, gl.ref) == ("lab/qa", "dev")


def test_default_connection_ids(monkeypatch, mode):
    monkeypatch.setenv("AIRFLOW_CONN_LIFTOFF_ALERTMANAGER", "http://127.0.0.8:9093")
    assert alertmanager_url() == "http://127.0.0.8:9093"


def test_missing_connection_is_a_clear_error(mode):
    with pytest.raises(ConnectionNotFound, match="'nope_conn' is not defined") as err:
        resolve_connection("nope_conn")
    assert ("Airflow said: AirflowNotFoundException" in str(err.value)) == (mode == "airflow")


def test_connections_file_fallback(tmp_path, monkeypatch, mode):
    f = tmp_path / "conns.yml"
    f.write_text("file_am: {host: 127.0.0.9, port: 9093}\nfile_uri: http://127.0.0.10:1\n")
    monkeypatch.setenv("LIFTOFF_CONNECTIONS", str(f))
    assert resolve_connection("file_am").base_url() == "http://127.0.0.9:9093"
    assert resolve_connection("file_uri").base_url() == "http://127.0.0.10:1"
    with pytest.raises(ConnectionNotFound):
        resolve_connection("file_none")


def test_state_url(monkeypatch, mode):
    monkeypatch.setenv("LIFTOFF_STATE_URL", "sqlite:////tmp/x.db")
    assert state_url() == "sqlite:////tmp/x.db"
    monkeypatch.delenv("LIFTOFF_STATE_URL")
    with pytest.raises(ConfigError, match="no state store"):
        state_url(_inventory(state="absent_state"))
    monkeypatch.setenv("AIRFLOW_CONN_S1", json.dumps({"extra": {"url": "sqlite:////tmp/y.db"}}))
    assert state_url(_inventory(state="s1")) == "sqlite:////tmp/y.db"
    monkeypatch.setenv("AIRFLOW_CONN_S2", json.dumps(
        {"conn_type": "postgres", "host": "127.0.0.1", "port": 5432, "login": "postgres", "password": "p w",
         "schema": "liftoff"}))
    url = make_url(state_url(_inventory(state="s2")))
    assert (url.drivername, url.username, url.password, url.host, url.port, url.database) == \
        ("postgresql+psycopg2", "postgres", "p w", "127.0.0.1", 5432, "liftoff")


def test_parse_connection_errors():
    with pytest.raises(ConfigError, match="not valid JSON"):
        parse_connection("c", "{nope")
    with pytest.raises(ConfigError, match="port 'x' is not a number"):
        parse_connection("c", {"host": "h", "port": "x"})
    with pytest.raises(ConfigError, match="not a connection URI"):
        parse_connection("c", "just-text")
    with pytest.raises(ConfigError, match="has no host"):
        ConnInfo(conn_id="c").base_url()


def test_uri_with_extra_and_credentials():
    info = parse_connection("c", "https://user:pa%40ss@host.example:8443/schema?__extra__=%7B%22a%22%3A+1%7D")
    assert (info.login, info.password, info.host, info.port, info.schema) == \
        ("user", "pa@ss", "host.example", 8443, "schema")
    assert info.extra == {"a": 1}
    assert info.base_url() == "https://host.example:8443"


def test_secrets_not_logged(monkeypatch, caplog, mode):
    monkeypatch.setenv("AIRFLOW_CONN_T_LOG", json.dumps({"host": "127.0.0.1", "password": "hunter2-secret"}))
    with caplog.at_level(logging.DEBUG):
        resolve_connection("t_log")
        with pytest.raises(ConnectionNotFound):
            resolve_connection("t_log_missing")
    assert "hunter2-secret" not in caplog.text
