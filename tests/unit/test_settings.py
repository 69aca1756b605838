import base64
import dataclasses
import json
import logging

import pytest
from airflow.sdk import Connection
from sqlalchemy.engine import make_url

from liftoff.errors import ConfigError, ConnectionNotFound
from liftoff.inventory import QAConfig, parse_inventory
from liftoff.settings import (
    alertmanager_url,
    base_url,
    bound_hook,
    gitlab_settings,
    prometheus_url,
    pushgateway_url,
    resolve_connection,
    state_url,
)
from tests.unit.http_fakes import LocalServer, QuietHandler


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
    assert isinstance(info, Connection) and info.conn_id == "t_am" and info.conn_type == "http"
    assert (info.host, info.port, info.login, info.password) == ("127.56.0.9", 9093, "u", "s3cret-pw")
    assert info.extra_dejson == {"path": "/am"}
    assert base_url(info) == "http://127.56.0.9:9093/am"
    assert "s3cret-pw" not in repr(info) and "/am" not in repr(info)


def test_uri_connection_from_env(monkeypatch, mode):
    monkeypatch.setenv("AIRFLOW_CONN_T_PGW", "http://127.56.0.9:9091")
    assert base_url(resolve_connection("t_pgw")) == "http://127.56.0.9:9091"


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
    f.write_text("file_am: {host: 127.0.0.9, port: 9093, extra: {path: am}}\nfile_uri: http://127.0.0.10:1\n")
    monkeypatch.setenv("LIFTOFF_CONNECTIONS", str(f))
    found = resolve_connection("file_am")
    assert isinstance(found, Connection) and found.conn_id == "file_am"
    assert base_url(found) == "http://127.0.0.9:9093/am"
    assert base_url(resolve_connection("file_uri")) == "http://127.0.0.10:1"
    with pytest.raises(ConnectionNotFound):
        resolve_connection("file_none")
    j = tmp_path / "conns.json"  # what the lab writes: the JSON form, by id
    j.write_text(json.dumps({"file_json": {"conn_type": "http", "host": "http://127.0.0.11:2",
                                           "password": "pw", "extra": {"timeout": 5}}}))
    monkeypatch.setenv("LIFTOFF_CONNECTIONS", str(j))
    found = resolve_connection("file_json")
    assert (base_url(found), found.password) == ("http://127.0.0.11:2", "pw")
    assert found.extra_dejson == {"timeout": 5}


def test_a_bad_connections_file_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setenv("LIFTOFF_NO_AIRFLOW", "1")
    for name, text in (("conns.yaml", "a: [unclosed, secret-in-file\n"), ("conns.txt", "a: {host: h}\n")):
        (tmp_path / name).write_text(text)
        monkeypatch.setenv("LIFTOFF_CONNECTIONS", str(tmp_path / name))
        with pytest.raises(ConfigError, match="LIFTOFF_CONNECTIONS file .* is unreadable") as err:
            resolve_connection("a")
        assert "secret-in-file" not in str(err.value)


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


@pytest.mark.parametrize("value,message", [
    ("{nope", "AIRFLOW_CONN_C is not valid JSON"),
    (json.dumps({"host": "h", "port": "x"}), "Expected integer value for `port`, but got 'x'"),
    ("just-text", "AIRFLOW_CONN_C is not a connection URI or JSON"),
])
def test_bad_env_values_are_config_errors(monkeypatch, value, message):
    monkeypatch.setenv("LIFTOFF_NO_AIRFLOW", "1")
    monkeypatch.setenv("AIRFLOW_CONN_C", value)
    with pytest.raises(ConfigError, match=message):
        resolve_connection("c")


def test_base_url_as_http_hook_builds_it():
    with pytest.raises(ConfigError, match="connection c has no host"):
        base_url(Connection(conn_id="c"))
    assert base_url(Connection(conn_id="c", host="::1", port=9093)) == "http://[::1]:9093"
    assert base_url(Connection(conn_id="c", host="h", schema="https")) == "https://h"
    assert base_url(Connection(conn_id="c", host="https://h/x/", port=8443)) == "https://h:8443/x"
    assert base_url(Connection(conn_id="c", host="h", conn_type="generic"), default_scheme="https") == "https://h"


def test_uri_with_extra_and_credentials(monkeypatch):
    monkeypatch.setenv("LIFTOFF_NO_AIRFLOW", "1")
    monkeypatch.setenv("AIRFLOW_CONN_C",
                       "https://user:pa%40ss@host.example:8443/schema?__extra__=%7B%22a%22%3A+1%7D")
    info = resolve_connection("c")
    assert (info.login, info.password, info.host, info.port, info.schema, info.conn_type) == \
        ("user", "pa@ss", "host.example", 8443, "schema", "https")
    assert info.extra_dejson == {"a": 1}
    assert base_url(info) == "https://host.example:8443"
    assert "pa@ss" not in repr(info) and "pa%40ss" not in repr(info)


def test_bound_hook_uses_the_resolved_connection(monkeypatch, mode):
    """The HttpHook asks nothing of Airflow again: the URL with extra.path, Basic auth from
    login/password, the extra's other keys as headers, liftoff's own keys not sent."""
    seen: list[tuple[str, str | None, str | None, str | None]] = []

    class Handler(QuietHandler):
        def do_GET(self):  # noqa: N802
            seen.append((self.path, self.headers.get("Authorization"), self.headers.get("X-Team"),
                         self.headers.get("path")))
            self.reply(200, {"ok": True})

    server = LocalServer(Handler)
    try:
        host, port = server.url.removeprefix("http://").split(":")
        monkeypatch.setenv("AIRFLOW_CONN_T_BOUND", json.dumps(
            {"conn_type": "http", "host": host, "port": int(port), "login": "u", "password": "pw-bound",
             "extra": {"path": "/api", "X-Team": "delivery"}}))
        hook = bound_hook(resolve_connection("t_bound"), method="GET")
        assert hook.run("/v2/alerts", data={"a": "1"}, extra_options={"timeout": 5}).json() == {"ok": True}
        hook = bound_hook(server.url, method="GET")
        hook.run("/plain")
    finally:
        server.close()
    basic = "Basic " + base64.b64encode(b"u:pw-bound").decode()
    assert seen == [("/api/v2/alerts?a=1", basic, "delivery", None), ("/plain", None, None, None)]


def test_secrets_not_logged(monkeypatch, caplog, mode):
    monkeypatch.setenv("AIRFLOW_CONN_T_LOG", json.dumps({"host": "127.0.0.1", "password": "hunter2-secret"}))
    with caplog.at_level(logging.DEBUG):
        resolve_connection("t_log")
        with pytest.raises(ConnectionNotFound):
            resolve_connection("t_log_missing")
    assert "hunter2-secret" not in caplog.text
