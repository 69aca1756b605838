"""Pipeline and stage metrics, pushed to the Prometheus Pushgateway (job ``liftoff``).

Groups (grouping keys under job ``liftoff``):

* ``{pipeline, env, stage}``: ``liftoff_stage_duration_seconds``, ``liftoff_stage_status{status}``
  (1 for the current status, 0 for the others), ``liftoff_stage_start_timestamp_seconds``,
  ``liftoff_stage_end_timestamp_seconds`` (replaced as a whole on each push);
* ``{pipeline}``: ``liftoff_pipeline_status{status}``, ``liftoff_pipeline_start_timestamp_seconds``,
  ``liftoff_pipeline_end_timestamp_seconds``, ``liftoff_pipelines_total{status}``;
* ``{env}``: ``liftoff_deployed_version_info{env,version}`` (``version="internal"`` when
  redacted, for undisclosed security builds), ``liftoff_deployed_timestamp_seconds``,
  ``liftoff_rollbacks_total``, ``liftoff_deploy_pressure{env}`` (commits not yet deployed: between
  the build the environment runs and the newest build, :mod:`liftoff.changes`), pushed when a
  deploy starts (``notify.deploy_started``) and, for instances made by :meth:`from_settings`,
  with each ``deployed_version`` (a deploy or rollback finished on the environment).

``pipeline`` is the pipeline's name (e.g. the DAG id), not a run id, so series stay few.

Counters (``liftoff_pipelines_total``, ``liftoff_rollbacks_total``, ``liftoff_fast_deploys_total``;
subclasses count with :meth:`PipelineMetrics._count`) are a read-modify-write of the gateway
done under one lock: :func:`counter_lock` holds, for the whole read (``GET /metrics`` through
the http provider's ``HttpHook``), increment and push, a process-local lock and a lock in
liftoff's state store that every worker and host shares: a PostgreSQL advisory transaction
lock on the group (``pg_advisory_xact_lock``), or SQLite's database write lock (the store's
transactions begin ``IMMEDIATE``). The Pushgateway applies a push before it answers, so each
increment reads the value the previous one pushed and N concurrent increments add exactly N
(tests/integration/test_pushgateway_lab.py: 8 processes against the lab's gateway). Series stay
one per group and label, as before; the alternatives were rejected: a group per run
(``{pipeline, run_id}``, summed in PromQL) grows without bound and deleting old groups makes
the sums go down, and totals computed from the store need records the store does not keep
(notification failures, pipeline outcomes). Without a state store (an instance made by hand,
a test) increments are serialised within the process only. A gateway that restarts without its
persistence file starts counters again at 0, which ``rate()``/``increase()`` read as a reset.

Pushes use prometheus-client with its ``basic_auth_handler`` when the connection has a login.
A failed push is logged (without credentials) and returns False: metrics never break a deploy.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any
from urllib.parse import quote, urlsplit

from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.exposition import basic_auth_handler, default_handler, pushadd_to_gateway
from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger(__name__)

JOB = "liftoff"
STAGE_STATUSES = ("running", "success", "failed", "skipped", "halted", "rolled_back")
ANALYSIS_VERDICTS = ("pass", "marginal", "fail", "inconclusive")
PIPELINE_STATUSES = ("running", "success", "failed", "halted", "canceled", "rolled_back")
REDACTED = "internal"


class _Families:
    """A collector of ready-made metric families (counters without ``_created`` series)."""

    def __init__(self, *families: Metric):
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


_process_lock = threading.Lock()
_engines: dict[tuple[int, str], Any] = {}


def _store_engine(state_url: str) -> Any:
    """The state store's engine (its SQLite transactions begin IMMEDIATE), one per process."""
    key = (os.getpid(), state_url)
    if key not in _engines:
        from liftoff.store import Store

        _engines[key] = Store(state_url, create=False).engine
    return _engines[key]


def _lock_id(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


@contextmanager
def counter_lock(state_url: str | None, name: str) -> Iterator[None]:
    """Hold the lock of counter group ``name`` for the block: in this process, and in the state
    store at ``state_url`` across processes and hosts (PostgreSQL: an advisory lock until the
    transaction ends; SQLite: the database write lock). Without ``state_url``, in this process only."""
    with _process_lock:
        if not state_url:
            yield
            return
        with _store_engine(state_url).begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.exec_driver_sql("SELECT pg_advisory_xact_lock(%(id)s)", {"id": _lock_id(name)})
            else:  # SQLite: BEGIN IMMEDIATE took the write lock; make sure the transaction began
                conn.exec_driver_sql("SELECT 1")
            yield


def _state_url_of(inventory: Any) -> str | None:
    """The state store that serialises counters, or None (then only within this process)."""
    try:
        from liftoff.settings import state_url

        return state_url(inventory)
    except Exception as exc:  # no store: counters still count, serialised in this process only
        log.debug("metrics counters without a state store lock: %s", type(exc).__name__)
        return None


def _safe(url: str) -> str:
    parts = urlsplit(url)
    if parts.username or parts.password:
        return f"{parts.scheme}://{parts.hostname}{':' + str(parts.port) if parts.port else ''}{parts.path}"
    return url


class PipelineMetrics:
    """Pushes one pipeline's metrics; every method returns True on success, False on failure."""

    def __init__(self, gateway_url: str | None, pipeline: str, *, timeout: float = 5.0,
                 redact_version: bool = False, login: str | None = None, password: str | None = None,
                 job: str = JOB, pressure_after_deploy: bool = False, inventory: Any = None,
                 state_url: str | None = None):
        self.gateway_url = (gateway_url or "").rstrip("/")
        self.pressure_after_deploy = pressure_after_deploy  # deployed_version pushes the pressure too
        self.inventory = inventory
        self.pipeline = pipeline
        self.timeout = timeout
        self.redact_version = redact_version
        self.job = job
        self.state_url = state_url  # the store whose lock serialises counter increments
        self._auth = (login, password) if login else None

    def __repr__(self) -> str:
        return f"PipelineMetrics({_safe(self.gateway_url)!r}, pipeline={self.pipeline!r})"

    @property
    def enabled(self) -> bool:
        return bool(self.gateway_url)

    @classmethod
    def from_settings(cls, pipeline: str, inventory=None, **kwargs: Any) -> PipelineMetrics:
        """From the ``pushgateway`` connection; when it is missing, a disabled instance whose
        pushes log a warning and return False (metrics never stop a deploy)."""
        from liftoff.settings import base_url, connection_for

        kwargs.setdefault("pressure_after_deploy", True)
        kwargs.setdefault("inventory", inventory)
        try:
            conn = connection_for("pushgateway", inventory)
            kwargs.setdefault("state_url", _state_url_of(inventory))
            return cls(base_url(conn), pipeline, login=conn.login, password=conn.password, **kwargs)
        except Exception as exc:
            log.warning("metrics disabled: no usable pushgateway connection (%s)", exc)
            return cls(None, pipeline, **kwargs)

    # -- public, never raising -------------------------------------------------------------------
    def stage(self, env: str, stage: str, status: str, start: float, end: float | None = None) -> bool:
        """Push a stage's status, start/end timestamps and duration (so far, if still running)."""
        return self._guard("stage", self._stage, env, stage, status, start, end)

    @contextmanager
    def stage_timer(self, env: str, stage: str) -> Iterator[None]:
        """Push ``running`` on entry, then ``success`` or ``failed`` with the duration on exit."""
        start = time.time()
        self.stage(env, stage, "running", start)
        try:
            yield
        except BaseException:
            self.stage(env, stage, "failed", start, time.time())
            raise
        self.stage(env, stage, "success", start, time.time())

    def pipeline_status(self, status: str, start: float | None = None, end: float | None = None,
                        count: bool = True) -> bool:
        """Push the pipeline's status and timestamps; a final status bumps ``liftoff_pipelines_total``."""
        return self._guard("pipeline_status", self._pipeline_status, status, start, end, count)

    def deployed_version(self, env: str, version: str, redact: bool | None = None,
                         at: float | None = None) -> bool:
        """Push ``liftoff_deployed_version_info{env,version} 1`` (version ``internal`` when redacted);
        with ``pressure_after_deploy``, then the environment's pressure from ``version`` on
        (best effort: the result is the version's push)."""
        pushed = self._guard("deployed_version", self._deployed_version, env, version, redact, at)
        if self.pressure_after_deploy and self.enabled:
            self.pressure_from(env, version)
        return pushed

    def deploy_pressure(self, env: str, commits: int) -> bool:
        """Push ``liftoff_deploy_pressure{env}``: the commits not yet deployed in ``env``."""
        return self._guard("deploy_pressure", self._deploy_pressure, env, commits)

    def pressure_from(self, env: str, running: str) -> int | None:
        """Read ``env``'s pressure when it runs ``running`` (:func:`liftoff.changes.pressure`) and
        push it; the commit count, or None when not known. Never raises."""
        try:
            from liftoff.changes import pressure

            rng = pressure(self.inventory, env, running=running, timeout=self.timeout)
        except Exception as exc:  # never raise into a deploy
            log.warning("deploy pressure of %s not read: %s", env, type(exc).__name__)
            return None
        if not rng.known:
            log.info("deploy pressure of %s not known: %s", env, rng.reason)
            return None
        self.deploy_pressure(env, rng.count)
        return rng.count

    def rollback(self, env: str) -> bool:
        """Count one rollback of ``env``."""
        return self._guard("rollback", self._rollback, env)

    def fast_deploy(self, env: str, version: str, reason: str) -> bool:
        """Group ``{pipeline="fast_deploy", env}``: ``liftoff_fast_deploys_total``,
        ``liftoff_fast_deploy_info{version, reason}`` (the last one; pass version ``internal``
        when undisclosed), ``liftoff_fast_deploy_timestamp_seconds``."""
        return self._guard("fast_deploy", self._fast_deploy, env, version, reason)

    def canary_analysis(self, env: str, stage: str, verdict: str, score: float | None) -> bool:
        """Group ``{pipeline, env, stage}``: ``liftoff_canary_analysis_verdict{verdict}`` (1 for the
        last verdict), ``liftoff_canary_analysis_score`` (-1 when there was none) and
        ``liftoff_canary_analysis_timestamp_seconds``."""
        return self._guard("canary_analysis", self._canary_analysis, env, stage, verdict, score)

    def _canary_analysis(self, env: str, stage: str, verdict: str, score: float | None) -> None:
        reg = CollectorRegistry()
        v = Gauge("liftoff_canary_analysis_verdict", "1 for the canary judge's last verdict.", ["verdict"],
                  registry=reg)
        for name in dict.fromkeys((*ANALYSIS_VERDICTS, verdict)):
            v.labels(name).set(1 if name == verdict else 0)
        Gauge("liftoff_canary_analysis_score", "The canary judge's last score (0-100; -1: none).",
              registry=reg).set(-1 if score is None else score)
        Gauge("liftoff_canary_analysis_timestamp_seconds", "When the canary was last judged.",
              registry=reg).set(time.time())
        self._push(reg, {"pipeline": self.pipeline, "env": env, "stage": stage}, replace=True)

    def _guard(self, what: str, fn, *args: Any) -> bool:
        if not self.enabled:
            log.warning("metrics push (%s) skipped: no Pushgateway configured", what)
            return False
        try:
            fn(*args)
            return True
        except Exception as exc:  # never raise into a deploy
            msg = str(exc)
            if self._auth and self._auth[1]:
                msg = msg.replace(self._auth[1], "***")
            log.warning("metrics push (%s) to %s failed: %s: %s", what, _safe(self.gateway_url),
                        type(exc).__name__, msg[:300])
            return False

    # -- implementation --------------------------------------------------------------------------
    def _handler(self, url, method, timeout, headers, data):
        if self._auth:
            return basic_auth_handler(url, method, timeout, headers, data, self._auth[0], self._auth[1] or "")
        return default_handler(url, method, timeout, headers, data)

    def _count(self, name: str, doc: str, grouping: dict[str, str], label: str | None = None,
               value: str = "", registry: CollectorRegistry | None = None, replace: bool = False) -> None:
        """Add 1 to counter ``<name>_total`` (``{label=value}`` when labelled) in the group, pushed
        with ``registry``'s other metrics: under :func:`counter_lock`, read the group's values back
        from the gateway and push them with this one incremented."""
        with counter_lock(self.state_url, f"{self.gateway_url}{group_path(grouping, self.job)}"):
            totals = self._read_counter(f"{name}_total", grouping, label)
            totals[value] = totals.get(value, 0.0) + 1
            family = CounterMetricFamily(name, doc, labels=[label] if label else None)
            for label_value, total in sorted(totals.items()):
                family.add_metric([label_value] if label else [], total)
            registry = registry or CollectorRegistry()
            registry.register(_Families(family))
            self._push(registry, grouping, replace)

    def _push(self, registry: CollectorRegistry, grouping: dict[str, str], replace: bool) -> None:
        from prometheus_client.exposition import push_to_gateway

        push = push_to_gateway if replace else pushadd_to_gateway
        push(self.gateway_url, job=self.job, registry=registry, grouping_key=grouping, timeout=self.timeout,
             handler=self._handler)

    def _stage(self, env: str, stage: str, status: str, start: float, end: float | None) -> None:
        reg = CollectorRegistry()
        duration = Gauge("liftoff_stage_duration_seconds", "Stage duration (so far, while running).",
                         registry=reg)
        st = Gauge("liftoff_stage_status", "1 for the stage's current status.", ["status"], registry=reg)
        started = Gauge("liftoff_stage_start_timestamp_seconds", "Stage start.", registry=reg)
        ended = Gauge("liftoff_stage_end_timestamp_seconds", "Stage end (0 while running).", registry=reg)
        for s in dict.fromkeys((*STAGE_STATUSES, status)):
            st.labels(s).set(1 if s == status else 0)
        started.set(start)
        ended.set(end or 0)
        duration.set(max(0.0, (end if end is not None else time.time()) - start))
        self._push(reg, {"pipeline": self.pipeline, "env": env, "stage": stage}, replace=True)

    def _pipeline_status(self, status: str, start: float | None, end: float | None, count: bool) -> None:
        grouping = {"pipeline": self.pipeline}
        reg = CollectorRegistry()
        st = Gauge("liftoff_pipeline_status", "1 for the pipeline's current status.", ["status"],
                   registry=reg)
        for s in dict.fromkeys((*PIPELINE_STATUSES, status)):
            st.labels(s).set(1 if s == status else 0)
        if start is not None:
            Gauge("liftoff_pipeline_start_timestamp_seconds", "Pipeline start.", registry=reg).set(start)
        if end is not None:
            Gauge("liftoff_pipeline_end_timestamp_seconds", "Pipeline end.", registry=reg).set(end)
        if count and status != "running":
            self._count("liftoff_pipelines", "Finished pipelines by status.", grouping, "status", status, reg)
        else:
            self._push(reg, grouping, replace=False)

    def _deployed_version(self, env: str, version: str, redact: bool | None, at: float | None) -> None:
        redact = self.redact_version if redact is None else redact
        reg = CollectorRegistry()
        info = Gauge("liftoff_deployed_version_info", "The version deployed to the environment.",
                     ["env", "version"], registry=reg)
        info.labels(env, REDACTED if redact else str(version)).set(1)
        Gauge("liftoff_deployed_timestamp_seconds", "When the environment's version was deployed.",
              registry=reg).set(at if at is not None else time.time())
        self._push(reg, {"env": env}, replace=False)

    def _deploy_pressure(self, env: str, commits: int) -> None:
        reg = CollectorRegistry()
        Gauge("liftoff_deploy_pressure", "Commits not yet deployed: between the build the environment runs "
              "and the newest build.", ["env"], registry=reg).labels(env).set(int(commits))
        self._push(reg, {"env": env}, replace=False)

    def _rollback(self, env: str) -> None:
        self._count("liftoff_rollbacks", "Rollbacks started.", {"env": env})

    def _fast_deploy(self, env: str, version: str, reason: str) -> None:
        grouping = {"pipeline": "fast_deploy", "env": env}
        reg = CollectorRegistry()
        Gauge("liftoff_fast_deploy_info", "The last fast deploy: version and reason.", ["version", "reason"],
              registry=reg).labels(version, reason).set(1)
        Gauge("liftoff_fast_deploy_timestamp_seconds", "When the last fast deploy finished.",
              registry=reg).set(time.time())
        self._count("liftoff_fast_deploys", "Fast deploys.", grouping, registry=reg, replace=True)

    def _read_counter(self, sample: str, grouping: Mapping[str, str],
                      label: str | None = None) -> dict[str, float]:
        """Current values of a counter in our group on the gateway (by ``label`` value), read
        with ``HttpHook`` (GET ``/metrics``, the connection's credentials)."""
        from airflow.sdk import Connection

        from liftoff.settings import bound_hook

        login, password = self._auth or (None, None)
        gateway = Connection(conn_id="liftoff_pushgateway", conn_type="http", host=self.gateway_url,
                             login=login, password=password)
        resp = bound_hook(gateway, method="GET", tcp_keep_alive=False).run(
            "/metrics", extra_options={"timeout": self.timeout})
        text = resp.text
        want = {"job": self.job, **grouping}
        values: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name != sample or any(s.labels.get(k) != v for k, v in want.items()):
                    continue
                values[s.labels.get(label, "") if label else ""] = s.value
        return values


def delete_group(gateway_url: str, grouping: Mapping[str, str], timeout: float = 5.0, job: str = JOB) -> bool:
    """Remove one group from the gateway (e.g. a finished pipeline's stages); never raises."""
    from prometheus_client.exposition import delete_from_gateway

    try:
        delete_from_gateway(gateway_url, job=job, grouping_key=dict(grouping), timeout=timeout)
        return True
    except Exception as exc:
        log.warning("metrics delete of %s at %s failed: %s", dict(grouping), _safe(gateway_url),
                    type(exc).__name__)
        return False


def group_path(grouping: Mapping[str, str], job: str = JOB) -> str:
    """The gateway URL path of a group, keys sorted as prometheus_client pushes them."""
    return f"/metrics/job/{quote(job, safe='')}" + "".join(
        f"/{quote(k, safe='')}/{quote(v, safe='')}" for k, v in sorted(grouping.items()))
