"""The engine's service clients against real Prometheus, Alertmanager and Pushgateway processes
(Debian binaries, started here on 127.56.0.x with free ports and temporary directories), and
the state store on the local PostgreSQL.

The full loop is exercised: liftoff pushes metrics to the Pushgateway, Prometheus scrapes it
and fires an alert rule into Alertmanager, and liftoff's alert gate sees that alert.
"""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing
import os
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from liftoff.alerts import AlertClient, QuietPeriod, check_async, run_quiet_period, run_quiet_period_async
from liftoff.errors import LockHeld
from liftoff.metrics import PipelineMetrics
from liftoff.store import Store
from tests.unit.test_store import check_many_statuses, many_statuses

NET = "127.56.0"
BINARIES = {
    "alertmanager": "/usr/bin/prometheus-alertmanager",
    "pushgateway": "/usr/bin/prometheus-pushgateway",
    "prometheus": "/usr/bin/prometheus",
}
PG_ADMIN_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"

RULES = """
groups:
  - name: liftoff-test
    interval: 1s
    rules:
      - alert: LiftoffRollbackSeen
        expr: liftoff_rollbacks_total{job="liftoff"} > 0
        labels: {severity: critical}
        annotations: {summary: "rollback of {{ $labels.env }}"}
"""


def free_port(addr: str) -> int:
    with socket.socket() as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


def wait_for(what: str, check: Callable[[], object], timeout: float = 60, interval: float = 0.25):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except Exception as exc:  # not ready yet
            last = exc
        if last and not isinstance(last, Exception):
            return last
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


def http(method: str, url: str, body: object | None = None, timeout: float = 10) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@dataclass
class Services:
    alertmanager: str
    pushgateway: str
    prometheus: str
    tmp: Path

    def post_alert(self, name: str, severity: str | None = "critical", minutes: int = 30,
                   **labels: str) -> None:
        now = datetime.now(UTC)
        alert = {
            "labels": {"alertname": name, **({"severity": severity} if severity else {}), **labels},
            "annotations": {"summary": f"{name} is firing"},
            "startsAt": now.isoformat(),
            "endsAt": (now + timedelta(minutes=minutes)).isoformat(),
        }
        status, body = http("POST", f"{self.alertmanager}/api/v2/alerts", [alert])
        assert status == 200, body

    def silence(self, **labels: str) -> str:
        now = datetime.now(UTC)
        silence = {
            "matchers": [{"name": k, "value": v, "isRegex": False, "isEqual": True}
                         for k, v in labels.items()],
            "startsAt": now.isoformat(), "endsAt": (now + timedelta(hours=1)).isoformat(),
            "createdBy": "liftoff-test", "comment": "test silence",
        }
        status, body = http("POST", f"{self.alertmanager}/api/v2/silences", silence)
        assert status == 200, body
        return json.loads(body)["silenceID"]

    def gateway_samples(self) -> dict[tuple, float]:
        status, body = http("GET", f"{self.pushgateway}/metrics")
        assert status == 200
        out = {}
        for fam in text_string_to_metric_families(body.decode()):
            for s in fam.samples:
                if s.labels.get("job") == "liftoff":
                    out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    def prom_query(self, expr: str) -> list[dict]:
        query = urllib.parse.urlencode({"query": expr})
        status, body = http("GET", f"{self.prometheus}/api/v1/query?{query}")
        assert status == 200, body
        return json.loads(body)["data"]["result"]


def _start(name: str, args: list[str], tmp: Path) -> subprocess.Popen:
    log = open(tmp / f"{name}.log", "wb")  # noqa: SIM115 - kept open for the process's life
    return subprocess.Popen([BINARIES[name], *args], stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, cwd=tmp, start_new_session=True)


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    missing = [b for b in BINARIES.values() if not os.path.exists(b)]
    if missing:
        pytest.skip(f"Debian Prometheus packages missing: {missing}")
    tmp = tmp_path_factory.mktemp("engine-services")
    am_addr, pgw_addr, prom_addr = f"{NET}.4", f"{NET}.5", f"{NET}.3"
    am = f"{am_addr}:{free_port(am_addr)}"
    pgw = f"{pgw_addr}:{free_port(pgw_addr)}"
    prom = f"{prom_addr}:{free_port(prom_addr)}"
    (tmp / "alertmanager.yml").write_text(
        "route: {receiver: devnull, group_wait: 1s, group_interval: 1s}\nreceivers: [{name: devnull}]\n")
    (tmp / "rules.yml").write_text(RULES)
    (tmp / "prometheus.yml").write_text(json.dumps({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "alerting": {"alertmanagers": [{"static_configs": [{"targets": [am]}]}]},
        "rule_files": [str(tmp / "rules.yml")],
        "scrape_configs": [{"job_name": "pushgateway", "honor_labels": True,
                            "static_configs": [{"targets": [pgw]}]}],
    }))
    procs = {
        "alertmanager": _start("alertmanager", [
            f"--config.file={tmp / 'alertmanager.yml'}", f"--storage.path={tmp / 'am-data'}",
            f"--web.listen-address={am}", "--cluster.listen-address="], tmp),
        "pushgateway": _start("pushgateway", [f"--web.listen-address={pgw}", "--persistence.file="], tmp),
        "prometheus": _start("prometheus", [
            f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'prom-data'}",
            f"--web.listen-address={prom}"], tmp),
    }
    urls = {"alertmanager": f"http://{am}", "pushgateway": f"http://{pgw}", "prometheus": f"http://{prom}"}
    try:
        for name, url in urls.items():
            def ready(name=name, url=url):
                if procs[name].poll() is not None:
                    pytest.fail(f"{name} exited: {(tmp / f'{name}.log').read_text()[-2000:]}")
                return http("GET", f"{url}/-/ready", timeout=2)[0] == 200
            wait_for(f"{name} ready", ready)
        # our own processes answered, not someone else's on a recycled port
        time.sleep(0.5)
        dead = {n: (tmp / f"{n}.log").read_text()[-500:] for n, p in procs.items() if p.poll() is not None}
        assert not dead, dead
        services = Services(urls["alertmanager"], urls["pushgateway"], urls["prometheus"], tmp)
        assert services.gateway_samples() == {}
        yield services
    finally:
        for p in procs.values():
            p.terminate()
        for p in procs.values():
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


# -- Alertmanager -----------------------------------------------------------------------------------

def test_active_alerts_by_env_and_severity(services):
    env = unique("gstg")
    services.post_alert("HighErrorRate", "critical", env=env)
    services.post_alert("SlowRequests", "warning", env=env)
    services.post_alert("Chatter", "info", env=env)
    services.post_alert("HighErrorRate", "critical", env=unique("gprd"))
    client = AlertClient(services.alertmanager, timeout=5)
    alerts = wait_for("three alerts", lambda: (a := client.active_alerts({"env": env})) and len(a) == 3 and a)
    assert [(a.name, a.severity) for a in alerts] == [
        ("HighErrorRate", "critical"), ("SlowRequests", "warning"), ("Chatter", "info")]
    assert all(a.labels["env"] == env for a in alerts) and alerts[0].fingerprint
    assert [a.name for a in client.active_alerts({"env": env}, min_severity="warning")] == \
        ["HighErrorRate", "SlowRequests"]
    gate = client.check({"env": env}, ("critical",))
    assert not gate.ok and "HighErrorRate (critical)" in gate.reason and len(gate.alerts) == 1
    assert client.check({"env": unique("gstg")}, ("critical",)).ok


def test_silenced_alerts_do_not_count(services):
    env = unique("gstg")
    services.post_alert("NoisyButKnown", "critical", env=env)
    client = AlertClient(services.alertmanager, timeout=5)
    wait_for("the alert", lambda: not client.check({"env": env}).ok)
    services.silence(alertname="NoisyButKnown", env=env)
    gate = wait_for("the silence to apply", lambda: (g := client.check({"env": env})).ok and g)
    assert "no active alert" in gate.reason


def test_alert_without_severity_counts_as_critical(services):
    env = unique("gstg")
    services.post_alert("Unlabelled", None, env=env)
    client = AlertClient(services.alertmanager, timeout=5)
    gate = wait_for("the alert", lambda: (g := client.check({"env": env}, "critical")) and not g.ok and g)
    assert gate.alerts[0].name == "Unlabelled" and gate.alerts[0].severity == "critical"


def test_unreachable_and_wrong_services_fail_closed(services):
    dead = f"http://{NET}.6:{free_port(NET + '.6')}"
    gate = AlertClient(dead, timeout=3).check({"env": "gstg"})
    assert not gate.ok and "unreachable" in gate.reason and "fail closed" in gate.reason
    # The Pushgateway is not an Alertmanager: an HTTP error, not a pass.
    gate = AlertClient(services.pushgateway, timeout=3).check({"env": "gstg"})
    assert not gate.ok and "answered HTTP" in gate.reason
    down = asyncio.run(check_async(dead, {"env": "gstg"}, timeout=3))
    assert not down.ok and "unreachable" in down.reason


def test_quiet_period_against_alertmanager(services):
    env = unique("gstg")
    client = AlertClient(services.alertmanager, timeout=5)
    q = run_quiet_period(client, {"env": env}, QuietPeriod(window_s=2, interval_s=0.5))
    assert q.ok and q.polls >= 4, q.reason
    services.post_alert("HighErrorRate", "critical", env=env)
    wait_for("the alert", lambda: not client.check({"env": env}).ok)
    q = run_quiet_period(client, {"env": env}, QuietPeriod(window_s=2, interval_s=0.5))
    assert not q.ok and "HighErrorRate" in q.reason


def test_async_quiet_period_resets_then_times_out(services):
    env = unique("gstg")
    services.post_alert("Flapping", "critical", env=env)
    client = AlertClient(services.alertmanager, timeout=5)
    wait_for("the alert", lambda: not client.check({"env": env}).ok)
    seen: list[int] = []
    period = QuietPeriod(window_s=1, interval_s=0.3, fail_on_alert=False, timeout_s=1.5)
    q = asyncio.run(run_quiet_period_async(services.alertmanager, {"env": env}, period,
                                           on_poll=lambda p: seen.append(p.polls)))
    assert not q.ok and q.resets >= 2 and "within" in q.reason and "Flapping" in q.reason
    assert seen == list(range(1, q.polls + 1))


# -- Pushgateway and Prometheus --------------------------------------------------------------------

def test_metrics_land_in_the_gateway_and_prometheus_and_fire_an_alert(services):
    env = unique("gstg")
    pipeline = unique("deploy_canary")
    m = PipelineMetrics(services.pushgateway, pipeline, timeout=5)
    assert m.pipeline_status("running", start=1000.0)
    assert m.stage(env, "fleet", "success", 1000.0, 1042.0)
    assert m.deployed_version(env, "16.3.0-ee.0", at=1050.0)
    assert m.deployed_version(env, "16.3.1-ee.0", at=1060.0)  # replaces the old version's series
    assert m.rollback(env) and m.rollback(env)
    assert m.pipeline_status("success", start=1000.0, end=1100.0)
    s = services.gateway_samples()

    def get(name, **labels):
        matches = [v for (n, lbl), v in s.items() if n == name and all(dict(lbl).get(k) == x
                                                                         for k, x in labels.items())]
        assert len(matches) == 1, (name, labels, matches)
        return matches[0]

    assert get("liftoff_stage_duration_seconds", env=env, pipeline=pipeline, stage="fleet") == 42.0
    assert get("liftoff_stage_status", env=env, stage="fleet", status="success") == 1
    assert get("liftoff_stage_status", env=env, stage="fleet", status="failed") == 0
    assert get("liftoff_stage_end_timestamp_seconds", env=env, stage="fleet") == 1042.0
    assert get("liftoff_deployed_version_info", env=env, version="16.3.1-ee.0") == 1
    old = {("version", "16.3.0-ee.0"), ("env", env)}
    assert not [k for k in s if k[0] == "liftoff_deployed_version_info" and old <= set(k[1])]
    assert get("liftoff_rollbacks_total", env=env) == 2
    assert get("liftoff_pipeline_status", pipeline=pipeline, status="success") == 1
    assert get("liftoff_pipelines_total", pipeline=pipeline, status="success") == 1

    versions = wait_for("Prometheus to scrape the version", lambda: services.prom_query(
        f'liftoff_deployed_version_info{{env="{env}"}}'))
    assert [r["metric"]["version"] for r in versions] == ["16.3.1-ee.0"]
    client = AlertClient(services.alertmanager, timeout=5)
    gate = wait_for("the rollback alert in Alertmanager",
                    lambda: (g := client.check({"env": env}, "critical")) and not g.ok and g, timeout=90)
    assert gate.alerts[0].name == "LiftoffRollbackSeen"
    assert gate.alerts[0].annotations["summary"] == f"rollback of {env}"


def test_redacted_version_never_reaches_the_gateway(services):
    env = unique("gprd")
    assert PipelineMetrics(services.pushgateway, "security", redact_version=True).deployed_version(
        env, "16.3.2-ee.0")
    _, body = http("GET", f"{services.pushgateway}/metrics")
    text = body.decode()
    assert f'env="{env}"' in text and 'version="internal"' in text and "16.3.2-ee.0" not in text


def test_push_failure_returns_false(services, caplog):
    dead = f"http://{NET}.6:{free_port(NET + '.6')}"
    m = PipelineMetrics(dead, "deploy_canary", timeout=3, login="u", password="pgw-secret-pw")
    with caplog.at_level(logging.WARNING):
        assert m.stage("gstg", "fleet", "failed", 1.0, 2.0) is False
        assert m.rollback("gstg") is False
    assert "failed" in caplog.text and "pgw-secret-pw" not in caplog.text


def test_clients_from_airflow_connections(services, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_LIFTOFF_ALERTMANAGER", json.dumps(
        {"conn_type": "http", "host": services.alertmanager}))
    am_host, am_port = services.alertmanager.removeprefix("http://").split(":")
    monkeypatch.setenv("AIRFLOW_CONN_LIFTOFF_PUSHGATEWAY", json.dumps(
        {"conn_type": "http", "host": am_host.replace(".4", ".5"),
         "port": int(services.pushgateway.rsplit(":", 1)[1])}))
    env = unique("gstg")
    services.post_alert("ViaConnection", "critical", env=env)
    client = AlertClient.from_settings()
    assert client.base_url == f"http://{am_host}:{am_port}"
    wait_for("the alert", lambda: not client.check({"env": env}).ok)
    m = PipelineMetrics.from_settings("from_conn")
    assert m.gateway_url == services.pushgateway
    assert m.deployed_version(env, "16.3.0-ee.0")
    assert any(k[0] == "liftoff_deployed_version_info" and ("env", env) in k[1]
               for k in services.gateway_samples())


# -- state store on PostgreSQL ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    """A fresh database on the local PostgreSQL. Missing PostgreSQL or psycopg2 fails these
    tests instead of skipping them: CI has both, and a skip would hide the lock race."""
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        pytest.fail("psycopg2 is not installed (pip install psycopg2-binary); the PostgreSQL lock race "
                    "needs it", pytrace=False)
    from sqlalchemy import create_engine, text

    name = f"liftoff_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:
        admin.dispose()
        pytest.fail(f"local PostgreSQL unusable at {PG_ADMIN_URL}: {type(exc).__name__}: "
                    f"{str(exc).splitlines()[0] if str(exc) else ''}", pytrace=False)
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _race(url: str, env: str, i: int, barrier, queue) -> None:
    store = Store(url)
    barrier.wait()
    try:
        store.acquire(env, f"proc-{i}", f"user{i}")
        queue.put(("won", f"proc-{i}"))
    except LockHeld as exc:
        queue.put(("held", exc.lock.run_id))
    except Exception as exc:
        queue.put(("error", repr(exc)))
    finally:
        store.close()


def test_postgres_processes_race_for_one_lock(pg_url):
    Store(pg_url).close()
    ctx = multiprocessing.get_context("fork")
    n = 8
    barrier, queue = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(pg_url, "gprd", i, barrier, queue)) for i in range(n)]
    for p in procs:
        p.start()
    outcomes = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert [o for o in outcomes if o[0] == "error"] == []
    winners = [o[1] for o in outcomes if o[0] == "won"]
    assert len(winners) == 1, outcomes
    assert {o[1] for o in outcomes if o[0] == "held"} == set(winners)
    store = Store(pg_url)
    assert store.get_lock("gprd").run_id == winners[0]
    assert store.release("gprd", winners[0])
    store.close()


def test_postgres_threads_race_and_tables_created_concurrently(pg_url):
    # several fresh Store objects creating tables at once must all work
    stores: list[Store] = []
    errors: list[BaseException] = []

    def make():
        try:
            stores.append(Store(pg_url))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=make) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    store = stores[0]
    n = 12
    barrier = threading.Barrier(n)
    won: list[str] = []
    held: list[str] = []

    def worker(i: int) -> None:
        barrier.wait()
        try:
            store.acquire("gstg", f"run-{i}", "bot")
            won.append(f"run-{i}")
        except LockHeld as exc:
            held.append(exc.lock.run_id)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and set(held) == set(won) and len(held) == n - 1
    assert store.force_release("gstg", "alice", "test over").run_id == won[0]
    for s in stores:
        s.close()


def test_postgres_parallel_roles_forget_the_canary_state_without_losing_an_update(pg_url):
    """Two roles put their hosts back in service at once and each takes them out of the
    recorded canary state: read-modify-write of one row. Without a row lock PostgreSQL's read
    committed lost one of the updates, and the door's reconcile drained the other role's
    hosts again after a successful deploy (the --celery soak, seed 3 run 7)."""
    store = Store(pg_url)
    roles = {f"role{r}": [f"{r}-cny-{i:02d}" for i in range(1, 9)] for r in range(4)}
    for attempt in range(5):
        every = [h for hosts in roles.values() for h in hosts]
        store.record_lb_setting("gprd-cny", "state", "drain", every, [], f"shield-{attempt}", "bot")
        barrier = threading.Barrier(len(roles))
        errors: list[BaseException] = []

        def forget(hosts: list[str], barrier: threading.Barrier, errors: list[BaseException]) -> None:
            barrier.wait()
            try:
                for h in hosts:  # host by host: many overlapping transactions
                    store.forget_lb_state([h])
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=forget, args=(hosts, barrier, errors)) for hosts in roles.values()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        left = [s.hosts for s in store.lb_settings("gprd-cny") if s.kind == "state"]
        assert left == [], f"attempt {attempt}: updates lost, still recorded drained: {left}"
    store.close()


def test_postgres_store_round_trip(pg_url):
    store = Store(pg_url)
    store.record_drained("gprd", "web-01-sv-gprd", "run-1", "deploy")
    store.set_host_status("gprd-16.3.0", "gprd", "web-01-sv-gprd", "installing", "16.3.0-ee.0")
    store.audit("run-1", "gprd", "web-01-sv-gprd", "gitlab-ctl reconfigure", 0, 3.2, "ok")
    store.record_deployment("gprd", "16.2.0-ee.0", "run-0", "deploy", "success")
    store.record_deployment("gprd", "16.3.0-ee.0", "run-1", "deploy", "success")
    store.set_halt("patch p-1 applied", "p-1", "alice")
    store.close()
    again = Store(pg_url)  # a restart: everything is still there
    assert [r.host for r in again.drained("gprd")] == ["web-01-sv-gprd"]
    assert again.host_statuses("gprd-16.3.0")["web-01-sv-gprd"].status == "installing"
    assert again.audit_records(run_id="run-1")[0].command == "gitlab-ctl reconfigure"
    assert (again.current_version("gprd"), again.previous_version("gprd")) == ("16.3.0-ee.0", "16.2.0-ee.0")
    assert again.active_halt().patch_id == "p-1"
    again.close()


def test_postgres_many_rows_are_updated_or_inserted_in_one_write(pg_url):
    store = Store(pg_url)
    try:
        check_many_statuses(many_statuses(store))
    finally:
        store.close()


def test_postgres_a_setting_recorded_while_its_row_is_deleted_is_not_lost(pg_url):
    """``forget_lb_state`` deletes a state row (locked) while a new setting for the same key is
    being recorded: the recording waits for the lock and, the row gone, inserts it. Reading the
    keys without a lock saw the row, then updated nothing once it was deleted: the new setting
    was lost (the batched upsert before it read its keys FOR UPDATE)."""
    from sqlalchemy import text

    store = Store(pg_url)
    store.record_lb_setting("gprd-cny", "state", "drain", ["web-01-sv-gprd-cny"], [], "run-a", "bot")
    holder = store.engine.connect()
    tx = holder.begin()
    row = "FROM liftoff_lb_settings WHERE env = 'gprd-cny' AND kind = 'state'"
    holder.execute(text(f"SELECT 1 {row} FOR UPDATE"))
    holder.execute(text(f"DELETE {row}"))
    errors: list[BaseException] = []

    def record() -> None:
        try:
            store.record_lb_setting("gprd-cny", "state", "maint", ["web-02-sv-gprd-cny"], [], "run-b", "bot")
        except BaseException as exc:
            errors.append(exc)

    writer = threading.Thread(target=record)
    writer.start()
    watcher = store.engine.connect()
    deadline = time.monotonic() + 30
    while True:  # the writer waits on the holder's row lock
        waiting = watcher.execute(text(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND query LIKE '%liftoff_lb_settings%'")).scalar()
        if waiting or not writer.is_alive() or time.monotonic() > deadline:
            break
    watcher.close()
    tx.commit()
    holder.close()
    writer.join(30)
    assert errors == [] and not writer.is_alive()
    settings = [(s.kind, s.value, s.hosts, s.run_id) for s in store.lb_settings("gprd-cny")]
    assert settings == [("state", "maint", ("web-02-sv-gprd-cny",), "run-b")], settings
    store.close()
