"""Alert client and quiet-period logic against a tiny fake Alertmanager (real HTTP, fake answers)."""

import asyncio
import base64
import json
from urllib.parse import parse_qs, urlsplit

import pytest

from liftoff.alerts import (
    FAILED,
    QUIET,
    WAITING,
    Alert,
    AlertClient,
    GateResult,
    QuietPeriod,
    check_async,
    evaluate,
    fetch_alerts_async,
    normalize_severity,
    parse_alerts,
    run_quiet_period,
)
from liftoff.errors import AlertsUnavailable, InvalidInput
from tests.unit.http_fakes import LocalServer, QuietHandler


def am_alert(name, severity="critical", env="gstg", state="active", silenced=(), **labels):
    return {
        "labels": {"alertname": name, "env": env, **({"severity": severity} if severity else {}), **labels},
        "annotations": {"summary": f"{name} is firing"},
        "startsAt": "2026-11-29T11:00:00.000Z",
        "fingerprint": f"fp-{name}",
        "status": {"state": state, "silencedBy": list(silenced), "inhibitedBy": []},
        "generatorURL": "http://prometheus/graph",
    }


class FakeAM:
    def __init__(self):
        self.status = 200
        self.body: object = []
        self.raw: bytes | None = None
        self.queries: list[dict] = []
        self.auth: list[str | None] = []
        fake = self

        class Handler(QuietHandler):
            def do_GET(self):  # noqa: N802
                parts = urlsplit(self.path)
                fake.queries.append({"path": parts.path, **parse_qs(parts.query)})
                fake.auth.append(self.headers.get("Authorization"))
                self.reply(fake.status, fake.raw if fake.raw is not None else fake.body)

        self._http = LocalServer(Handler)
        self.url = self._http.url

    def close(self):
        self._http.close()


@pytest.fixture()
def am():
    fake = FakeAM()
    yield fake
    fake.close()


@pytest.fixture()
def dead_url():
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"


def test_query_asks_for_active_unsilenced_uninhibited_alerts_of_the_env(am):
    am.body = [am_alert("HighErrorRate")]
    alerts = AlertClient(am.url).active_alerts({"env": "gstg", "stage": "main"})
    assert am.queries[-1]["path"] == "/api/v2/alerts"
    assert am.queries[-1]["active"] == ["true"]
    assert am.queries[-1]["silenced"] == ["false"]
    assert am.queries[-1]["inhibited"] == ["false"]
    assert am.queries[-1]["filter"] == ['env="gstg"', 'stage="main"']
    assert alerts == []  # the fake ignores filters; our second look drops the one without stage=main


def test_severity_order_and_filtering(am):
    am.body = [am_alert("Info", "info"), am_alert("Warn", "warning"), am_alert("Crit", "critical"),
               am_alert("S1", "s1"), am_alert("NoSev", None), am_alert("Odd", "blocker"),
               am_alert("Watchdog", "none"), am_alert("Other", env="gprd"),
               am_alert("Silenced", silenced=["abc"]), am_alert("Suppressed", state="suppressed")]
    client = AlertClient(am.url)
    names = [a.name for a in client.active_alerts({"env": "gstg"})]
    assert names == ["Crit", "NoSev", "Odd", "S1", "Warn", "Info", "Watchdog"]
    assert [a.name for a in client.active_alerts({"env": "gstg"}, min_severity="warning")] == \
        ["Crit", "NoSev", "Odd", "S1", "Warn"]
    crit = client.active_alerts({"env": "gstg"}, min_severity="critical")
    assert [a.severity for a in crit] == ["critical"] * 4
    with pytest.raises(InvalidInput, match="unknown severity"):
        client.active_alerts({"env": "gstg"}, min_severity="urgent")


def test_normalize_severity():
    assert normalize_severity("CRITICAL") == "critical"
    assert normalize_severity("s3") == "warning"
    assert normalize_severity(None) == "critical"
    assert normalize_severity("weird") == "critical"
    assert normalize_severity("none") == "none"


def test_check_passes_when_quiet_and_names_alerts_when_not(am):
    client = AlertClient(am.url)
    am.body = [am_alert("Warn", "warning")]
    ok = client.check({"env": "gstg"}, ("critical",))
    assert ok.ok and "no active alert for env=gstg" in ok.reason and ok.error is None
    am.body = [am_alert("Warn", "warning"), am_alert("HighErrorRate", "critical")]
    bad = client.check({"env": "gstg"}, ("critical",))
    assert not bad.ok
    assert "HighErrorRate (critical): HighErrorRate is firing" in bad.reason
    assert [a.name for a in bad.alerts] == ["HighErrorRate"]
    assert not client.check({"env": "gstg"}, ["critical", "warning"]).ok
    assert not client.check({"env": "gstg"}, None).ok
    assert GateResult.from_dict(bad.to_dict()) == bad


@pytest.mark.parametrize("setup,reason", [
    (lambda am: setattr(am, "status", 500), "answered HTTP 500"),
    (lambda am: setattr(am, "raw", b"<html>oops</html>"), "not JSON"),
    (lambda am: setattr(am, "body", {"data": []}), "expected a list"),
    (lambda am: setattr(am, "body", [{"nolabels": 1}]), "has no labels"),
    (lambda am: setattr(am, "body", [{"labels": {}, "status": "x"}]), "bad status"),
])
def test_bad_answers_fail_closed(am, setup, reason):
    setup(am)
    client = AlertClient(am.url)
    result = client.check({"env": "gstg"})
    assert not result.ok and reason in result.reason and "fail closed" in result.reason
    assert result.error
    with pytest.raises(AlertsUnavailable, match=reason):
        client.active_alerts({"env": "gstg"})


def test_unreachable_fails_closed(dead_url):
    result = AlertClient(dead_url, timeout=2).check({"env": "gstg"})
    assert not result.ok and "unreachable" in result.reason


def test_bad_matchers_are_refused(am):
    client = AlertClient(am.url)
    with pytest.raises(InvalidInput):
        client.active_alerts({"env": 'gstg",x="'})
    with pytest.raises(InvalidInput):
        client.active_alerts({"bad label": "x"})
    with pytest.raises(InvalidInput):
        AlertClient("127.0.0.1:9093")


def test_async_fetch_and_check(am, dead_url):
    am.body = [am_alert("HighErrorRate"), am_alert("Warn", "warning")]
    alerts = asyncio.run(fetch_alerts_async(am.url, {"env": "gstg"}, min_severity="critical"))
    assert [a.name for a in alerts] == ["HighErrorRate"]
    assert am.queries[-1]["filter"] == ['env="gstg"']
    result = asyncio.run(check_async(am.url, {"env": "gstg"}, ("warning",)))
    assert not result.ok and [a.name for a in result.alerts] == ["Warn"]
    assert asyncio.run(check_async(am.url, {"env": "gprd"})).ok
    down = asyncio.run(check_async(dead_url, {"env": "gstg"}, timeout=2))
    assert not down.ok and "unreachable" in down.reason
    am.raw = b"not json"
    bad = asyncio.run(check_async(am.url, {"env": "gstg"}))
    assert not bad.ok and "not JSON" in bad.reason


@pytest.mark.parametrize("no_airflow", ["1", ""])
def test_clients_use_the_alertmanager_connection(am, monkeypatch, no_airflow):
    """HttpHook and HttpAsyncHook on ``liftoff_alertmanager``: its path, credentials, timeout."""
    monkeypatch.setenv("LIFTOFF_NO_AIRFLOW", no_airflow)
    host, port = am.url.removeprefix("http://").split(":")
    monkeypatch.setenv("AIRFLOW_CONN_LIFTOFF_ALERTMANAGER", json.dumps(
        {"conn_type": "http", "host": host, "port": int(port), "login": "am", "password": "am-secret-pw",
         "extra": {"path": "/proxy", "timeout": 3}}))
    am.body = [am_alert("HighErrorRate")]
    client = AlertClient.from_settings()
    assert (client.base_url, client.timeout) == (f"{am.url}/proxy", 3.0)
    assert not client.check({"env": "gstg"}).ok
    result = asyncio.run(check_async(client.connection, {"env": "gstg"}))
    assert not result.ok and "HighErrorRate" in result.reason
    basic = "Basic " + base64.b64encode(b"am:am-secret-pw").decode()
    assert [q["path"] for q in am.queries] == ["/proxy/api/v2/alerts"] * 2 and am.auth == [basic] * 2


def test_parse_alerts_keeps_details():
    [a] = parse_alerts([am_alert("X", "warning", team="gitaly")], {"env": "gstg"})
    assert a.labels["team"] == "gitaly" and a.starts_at.startswith("2026") and a.fingerprint == "fp-X"
    assert Alert.from_dict(a.to_dict()) == a


# -- quiet period state machine ------------------------------------------------------------------

QUIET_RESULT = GateResult(True, "no active alert")
ALERT = Alert("HighErrorRate", "critical", {"alertname": "HighErrorRate", "env": "gstg"})
NOISY_RESULT = evaluate([ALERT], {"env": "gstg"})
DOWN_RESULT = GateResult(False, "alerts unknown (fail closed): unreachable", (), "unreachable")


def test_quiet_only_after_every_poll_over_the_whole_window():
    q = QuietPeriod(window_s=60, interval_s=10)
    outcomes = [q.observe(1000 + t, QUIET_RESULT) for t in range(0, 60, 10)]
    assert outcomes == [WAITING] * 6 and not q.done
    assert q.next_poll_at() == 1060
    assert q.observe(1060, QUIET_RESULT) == QUIET
    assert q.ok and q.polls == 7 and "quiet for 60s" in q.reason


def test_alert_fails_at_once_naming_it():
    q = QuietPeriod(window_s=60, interval_s=10, fail_on_alert=True)
    q.observe(0, QUIET_RESULT)
    assert q.observe(10, NOISY_RESULT) == FAILED
    assert "HighErrorRate" in q.reason and q.alerts[0]["name"] == "HighErrorRate"
    assert q.observe(20, QUIET_RESULT) == FAILED  # stays failed


def test_unreachable_counts_as_not_quiet():
    q = QuietPeriod(window_s=60, interval_s=10)
    assert q.observe(0, DOWN_RESULT) == FAILED and "unreachable" in q.reason


def test_alert_resets_the_window_when_not_failing():
    q = QuietPeriod(window_s=30, interval_s=10, fail_on_alert=False, timeout_s=1000)
    for t in (0, 10, 20):
        q.observe(t, QUIET_RESULT)
    assert q.observe(25, NOISY_RESULT) == WAITING and q.resets == 1 and q.quiet_since is None
    for t in (35, 45, 55):
        assert q.observe(t, QUIET_RESULT) == WAITING
    assert q.observe(65, QUIET_RESULT) == QUIET  # 30 s from 35
    assert q.resets == 1


def test_timeout_when_never_quiet():
    q = QuietPeriod(window_s=30, interval_s=10, fail_on_alert=False)
    assert q.timeout_s == 100  # default: three windows and an interval
    t = 0
    while not q.done:
        q.observe(t, NOISY_RESULT if t % 20 == 0 else QUIET_RESULT)
        t += 10
    assert not q.ok and "within 100s" in q.reason


def test_a_gap_in_polling_restarts_the_window():
    q = QuietPeriod(window_s=60, interval_s=10)
    q.observe(0, QUIET_RESULT)
    q.observe(10, QUIET_RESULT)
    assert q.observe(70, QUIET_RESULT) == WAITING  # nobody watched 10..70
    assert q.quiet_since == 70 and q.resets == 1
    for t in range(80, 130, 10):
        q.observe(t, QUIET_RESULT)
    assert q.observe(130, QUIET_RESULT) == QUIET


def test_resumes_from_dict():
    q = QuietPeriod(window_s=20, interval_s=10)
    q.observe(0, QUIET_RESULT)
    q.observe(10, QUIET_RESULT)
    state = json.loads(json.dumps(q.to_dict()))
    r = QuietPeriod.from_dict(state)
    assert r.quiet_since == 0 and r.polls == 2
    assert r.observe(20, QUIET_RESULT) == QUIET


def test_zero_window_and_bad_parameters():
    assert QuietPeriod(window_s=0, interval_s=1).observe(5, QUIET_RESULT) == QUIET
    with pytest.raises(InvalidInput):
        QuietPeriod(window_s=10, interval_s=0)
    with pytest.raises(InvalidInput):
        QuietPeriod(window_s=-1, interval_s=1)


def test_next_poll_lands_on_the_window_end():
    q = QuietPeriod(window_s=25, interval_s=10)
    assert q.next_poll_at(now=5.0) == 5.0
    q.observe(0, QUIET_RESULT)
    q.observe(10, QUIET_RESULT)
    q.observe(20, QUIET_RESULT)
    assert q.next_poll_at() == 25


def test_run_quiet_period_with_a_fake_clock(am):
    now = [1000.0]
    am.body = []
    q = run_quiet_period(AlertClient(am.url), {"env": "gstg"}, QuietPeriod(window_s=30, interval_s=10),
                         clock=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s))
    assert q.ok and q.polls == 4 and len(am.queries) == 4
    am.body = [am_alert("HighErrorRate")]
    q = run_quiet_period(AlertClient(am.url), {"env": "gstg"}, QuietPeriod(window_s=30, interval_s=10),
                         clock=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s))
    assert not q.ok and "HighErrorRate" in q.reason
