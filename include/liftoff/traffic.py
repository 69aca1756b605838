"""Synthetic traffic against staging and canary, so a bad build shows as alerts on staging
before it reaches canary.

A bounded run: per environment, ``rps`` requests a second for ``duration_s`` seconds, spread
over the given endpoints, sent by a fixed pool of workers. Requests never pile up: a tick
that finds the queue full is counted as skipped, every request has a timeout, and the run
ends at its deadline (requests still in flight are waited for at most one timeout). Canary
requests carry the environment's QA cookie (``gitlab_canary=true``) so they reach canary.

Counts, errors (HTTP 5xx, connection failures, timeouts) and latency go to the Pushgateway
every ``push_interval_s`` and at the end, job ``liftoff_traffic``, one group per environment:
``liftoff_traffic_requests_total{endpoint,code}``, ``liftoff_traffic_errors_total{endpoint}``,
``liftoff_traffic_skipped_total``, ``liftoff_traffic_request_duration_seconds`` (histogram),
``liftoff_traffic_target_rps`` and ``liftoff_traffic_last_push_timestamp_seconds``. No version
label: an internal build's version must not reach metrics. Counters restart at 0 with each run
(Prometheus ``rate()`` handles the reset).
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import contextlib
import logging
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from liftoff.errors import InvalidInput, LiftoffError
from liftoff.inventory import Inventory

log = logging.getLogger(__name__)

JOB = "liftoff_traffic"
MAX_RPS = 200.0
MAX_DURATION_S = 3600.0
MAX_CONCURRENCY = 256
MAX_ENDPOINTS = 20
DEFAULT_ENDPOINTS = ("/", "/explore", "/api/v4/projects", "/help")
# the traffic DAG's defaults (its form and `liftoff traffic`)
DEFAULT_RPS = 5
DEFAULT_DURATION_S = 300
DEFAULT_CONCURRENCY = 16
DEFAULT_TIMEOUT_S = 5.0
BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
ENDPOINT_PATTERN = r"^/[A-Za-z0-9/_.~%=&?-]{0,200}$"
ENDPOINT_RE = re.compile(ENDPOINT_PATTERN)


@dataclass(frozen=True)
class Target:
    env: str
    url: str
    cookie: str | None = None


@dataclass
class EnvStats:
    """What one environment's traffic saw so far."""

    env: str
    requests: dict[tuple[str, str], int] = field(default_factory=dict)  # (endpoint, code) -> n
    errors: dict[str, int] = field(default_factory=dict)  # endpoint -> n
    skipped: int = 0
    buckets: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))
    latency_sum: float = 0.0
    last_error: str = ""

    @property
    def total(self) -> int:
        return sum(self.requests.values())

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def observe(self, endpoint: str, code: str, seconds: float, error: bool, detail: str = "") -> None:
        key = (endpoint, code)
        self.requests[key] = self.requests.get(key, 0) + 1
        if error:
            self.errors[endpoint] = self.errors.get(endpoint, 0) + 1
            self.last_error = detail or code
        self.buckets[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.latency_sum += seconds

    def quantile(self, q: float) -> float | None:
        """Upper bound of the bucket holding the q-quantile (None without requests)."""
        n = self.total
        if not n:
            return None
        rank, seen = q * n, 0
        for i, count in enumerate(self.buckets):
            seen += count
            if seen >= rank:
                return BUCKETS[i] if i < len(BUCKETS) else float("inf")
        return float("inf")

    def summary(self) -> dict:
        n = self.total
        return {"env": self.env, "requests": n, "errors": self.error_count, "skipped": self.skipped,
                "error_ratio": round(self.error_count / n, 4) if n else None,
                "mean_latency_s": round(self.latency_sum / n, 4) if n else None,
                "p50_s": self.quantile(0.5), "p95_s": self.quantile(0.95), "last_error": self.last_error,
                "codes": dict(sorted(_codes(self.requests).items()))}


def _codes(requests: dict[tuple[str, str], int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for (_, code), n in requests.items():
        out[code] = out.get(code, 0) + n
    return out


def validate(rps: float, duration_s: float, endpoints: Sequence[str], concurrency: int) -> list[str]:
    """Check the bounds; returns the endpoints (paths on the environment's own URL only)."""
    if isinstance(rps, bool) or not isinstance(rps, (int, float)) or not 0 < rps <= MAX_RPS:
        raise InvalidInput(f"rps must be within (0, {MAX_RPS:g}], got {rps!r}")
    if isinstance(duration_s, bool) or not isinstance(duration_s, (int, float)) \
            or not 0 < duration_s <= MAX_DURATION_S:
        raise InvalidInput(f"duration_s must be within (0, {MAX_DURATION_S:g}], got {duration_s!r}")
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) \
            or not 1 <= concurrency <= MAX_CONCURRENCY:
        raise InvalidInput(f"concurrency must be within 1..{MAX_CONCURRENCY}, got {concurrency!r}")
    paths = list(endpoints or DEFAULT_ENDPOINTS)
    if len(paths) > MAX_ENDPOINTS:
        raise InvalidInput(f"at most {MAX_ENDPOINTS} endpoints, got {len(paths)}")
    for p in paths:
        if not isinstance(p, str) or not ENDPOINT_RE.fullmatch(p) or ".." in p or p.startswith("//"):
            raise InvalidInput(f"endpoint {p!r} is not a path like /explore on the environment's URL")
    return paths


def targets_for(inventory: Inventory, envs: Iterable[str]) -> list[Target]:
    """Each environment's URL from the inventory; canary with its QA cookie."""
    out = []
    for name in dict.fromkeys(envs):
        env = inventory.env(name)
        out.append(Target(env.name, env.url, env.qa_cookie))
    if not out:
        raise InvalidInput("name at least one environment")
    return out


class Pusher:
    """Pushes each environment's stats as one Pushgateway group (job ``liftoff_traffic``)."""

    def __init__(self, gateway_url: str, login: str | None = None, password: str | None = None,
                 timeout: float = 5.0, job: str = JOB):
        self.gateway_url = gateway_url.rstrip("/")
        self.auth = (login, password) if login else None
        self.timeout = timeout
        self.job = job

    @classmethod
    def from_settings(cls, inventory: Inventory | None = None) -> Pusher:
        from liftoff.settings import base_url, connection_for

        conn = connection_for("pushgateway", inventory)
        return cls(base_url(conn), conn.login, conn.password)

    def _handler(self, url, method, timeout, headers, data):
        from prometheus_client.exposition import default_handler

        if self.auth:
            token = base64.b64encode(f"{self.auth[0]}:{self.auth[1] or ''}".encode()).decode()
            headers = [*headers, ("Authorization", f"Basic {token}")]
        return default_handler(url, method, timeout, headers, data)

    def push(self, stats: EnvStats, rps: float) -> bool:
        """Replace the environment's group; False (logged) when the gateway refused or is down."""
        from prometheus_client import CollectorRegistry
        from prometheus_client.exposition import push_to_gateway

        reg = CollectorRegistry()
        reg.register(_StatsCollector(stats, rps))
        try:
            push_to_gateway(self.gateway_url, job=self.job, registry=reg, grouping_key={"env": stats.env},
                            timeout=self.timeout, handler=self._handler)
            return True
        except Exception as exc:  # metrics never stop the traffic
            log.warning("traffic metrics push for %s failed: %s: %s", stats.env, type(exc).__name__,
                        str(exc)[:200])
            return False


class _StatsCollector:
    def __init__(self, stats: EnvStats, rps: float):
        self.stats = stats
        self.rps = rps

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        s = self.stats
        req = CounterMetricFamily("liftoff_traffic_requests", "Synthetic requests by endpoint and code.",
                                  labels=["endpoint", "code"])
        for (endpoint, code), n in sorted(s.requests.items()):
            req.add_metric([endpoint, code], n)
        err = CounterMetricFamily("liftoff_traffic_errors", "Synthetic requests that failed (5xx, "
                                  "connection error, timeout).", labels=["endpoint"])
        for endpoint, n in sorted(s.errors.items()):
            err.add_metric([endpoint], n)
        skipped = CounterMetricFamily("liftoff_traffic_skipped", "Ticks dropped: every worker was busy.",
                                      value=s.skipped)
        cumulative, acc = [], 0
        for bound, count in zip((*BUCKETS, float("inf")), s.buckets, strict=True):
            acc += count
            cumulative.append(("+Inf" if bound == float("inf") else repr(bound), acc))
        hist = HistogramMetricFamily("liftoff_traffic_request_duration_seconds", "Synthetic request latency.",
                                     buckets=cumulative, sum_value=s.latency_sum)
        target = GaugeMetricFamily("liftoff_traffic_target_rps", "Requests a second asked for.",
                                   value=self.rps)
        pushed = GaugeMetricFamily("liftoff_traffic_last_push_timestamp_seconds", "When this was pushed.",
                                   value=time.time())
        return iter([req, err, skipped, hist, target, pushed])


async def _request(session: Any, target: Target, endpoint: str, stats: EnvStats, timeout: float) -> None:
    import aiohttp

    headers = {"Cookie": target.cookie} if target.cookie else {}
    started = time.monotonic()
    try:
        async with session.get(target.url + endpoint, headers=headers, allow_redirects=False,
                               timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            await resp.read()
            code = resp.status
        stats.observe(endpoint, str(code), time.monotonic() - started, code >= 500, f"HTTP {code} {endpoint}")
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        stats.observe(endpoint, "error", time.monotonic() - started, True,
                      f"{endpoint}: {type(exc).__name__}: {str(exc)[:120]}")


async def run_traffic(targets: Sequence[Target], *, rps: float, duration_s: float,
                      endpoints: Sequence[str] = DEFAULT_ENDPOINTS, concurrency: int = DEFAULT_CONCURRENCY,
                      timeout: float = DEFAULT_TIMEOUT_S,
                      push: Callable[[EnvStats, float], bool] | None = None,
                      push_interval_s: float = 5.0) -> dict[str, EnvStats]:
    """Send the traffic (per environment: ``rps`` a second for ``duration_s``), push as it goes;
    returns each environment's stats."""
    import aiohttp

    paths = validate(rps, duration_s, endpoints, concurrency)
    stats = {t.env: EnvStats(t.env) for t in targets}
    queues = {t.env: asyncio.Queue(maxsize=concurrency) for t in targets}
    deadline = time.monotonic() + duration_s
    connector = aiohttp.TCPConnector(limit=concurrency * len(targets), force_close=False)

    async def schedule(target: Target) -> None:
        q, st, i = queues[target.env], stats[target.env], 0
        interval = 1.0 / rps
        nxt = time.monotonic()
        while nxt < deadline:
            try:
                q.put_nowait(paths[i % len(paths)])
            except asyncio.QueueFull:
                st.skipped += 1
            i += 1
            nxt += interval
            await asyncio.sleep(max(0.0, nxt - time.monotonic()))

    async def work(session: Any, target: Target) -> None:
        q, st = queues[target.env], stats[target.env]
        while True:
            endpoint = await q.get()
            try:
                await _request(session, target, endpoint, st, timeout)
            finally:
                q.task_done()

    async def pusher() -> None:
        while True:
            await asyncio.sleep(push_interval_s)
            for t in targets:
                await asyncio.to_thread(push, stats[t.env], rps)

    async with aiohttp.ClientSession(connector=connector) as session:
        workers = [asyncio.create_task(work(session, t)) for t in targets for _ in range(concurrency)]
        pushing = asyncio.create_task(pusher()) if push else None
        try:
            await asyncio.gather(*(schedule(t) for t in targets))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*(q.join() for q in queues.values())), timeout + 1)
        finally:
            for task in [*workers, *([pushing] if pushing else [])]:
                task.cancel()
            await asyncio.gather(*workers, *([pushing] if pushing else []), return_exceptions=True)
    if push:
        for t in targets:
            await asyncio.to_thread(push, stats[t.env], rps)
    return stats


_DURATION = re.compile(r"^[1-9][0-9]{0,5}(ms|s|m|h)$")


def alert_rules(window: str = "1m", error_ratio: float = 0.05, p95_s: float = 1.0,
                for_: str = "30s") -> dict:
    """Prometheus rules on the traffic metrics (Prometheus scraping the Pushgateway with
    ``honor_labels``): alerts carry the ``env`` label, so the environment's quiet period sees
    them. Counters left on the gateway after a run stop moving, so the alerts clear.
    ``python -m liftoff.traffic rules`` prints them as YAML for Prometheus' ``rule_files``."""
    for name, value in (("window", window), ("for", for_)):
        if not _DURATION.match(value):
            raise InvalidInput(f"{name} {value!r} is not a Prometheus duration like 30s or 2m")
    if not 0 < error_ratio < 1 or p95_s <= 0:
        raise InvalidInput("error_ratio must be between 0 and 1 and p95_s above 0")
    requests = f"sum by (env) (rate(liftoff_traffic_requests_total{{job=\"{JOB}\"}}[{window}]))"
    errors = f"sum by (env) (rate(liftoff_traffic_errors_total{{job=\"{JOB}\"}}[{window}]))"
    buckets = f"liftoff_traffic_request_duration_seconds_bucket{{job=\"{JOB}\"}}[{window}]"
    latency = f"histogram_quantile(0.95, sum by (env, le) (rate({buckets})))"
    return {"groups": [{"name": "liftoff_traffic", "rules": [
        {"alert": "SyntheticTrafficErrors", "expr": f"{errors} / {requests} > {error_ratio}", "for": for_,
         "labels": {"severity": "critical"},
         "annotations": {"summary": "{{ $labels.env }}: {{ $value | humanizePercentage }} of synthetic "
                                    "requests fail"}},
        {"alert": "SyntheticTrafficSlow", "expr": f"{latency} > {p95_s}", "for": for_,
         "labels": {"severity": "warning"},
         "annotations": {"summary": "{{ $labels.env }}: synthetic p95 latency "
                                    "{{ $value | humanizeDuration }}"}},
    ]}]}


def run_from_inventory(inventory: Inventory, envs: Iterable[str], *, rps: float, duration_s: float,
                       endpoints: Sequence[str] | None = None, concurrency: int = DEFAULT_CONCURRENCY,
                       push_interval_s: float = 5.0) -> dict:
    """The traffic DAG's task: run against the environments' URLs, push to the inventory's
    Pushgateway, return a summary per environment."""
    targets = targets_for(inventory, envs)
    try:
        pusher: Pusher | None = Pusher.from_settings(inventory)
    except LiftoffError as exc:
        log.warning("no Pushgateway (%s): traffic runs without metrics", exc)
        pusher = None
    started = time.time()
    stats = asyncio.run(run_traffic(targets, rps=rps, duration_s=duration_s,
                                    endpoints=list(endpoints or DEFAULT_ENDPOINTS), concurrency=concurrency,
                                    push=pusher.push if pusher else None, push_interval_s=push_interval_s))
    return {"duration_s": round(time.time() - started, 1), "rps": rps, "pushed": pusher is not None,
            "environments": {env: s.summary() for env, s in stats.items()}}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m liftoff.traffic rules [--window 1m] [--for 30s] ...``: the alert rules as YAML."""
    import argparse

    import yaml

    p = argparse.ArgumentParser(prog="python -m liftoff.traffic", description="liftoff synthetic traffic")
    sub = p.add_subparsers(dest="cmd", required=True)
    rules = sub.add_parser("rules", help="print the Prometheus alert rules on the traffic metrics")
    rules.add_argument("--window", default="1m")
    rules.add_argument("--for", dest="for_", default="30s")
    rules.add_argument("--error-ratio", type=float, default=0.05)
    rules.add_argument("--p95-seconds", type=float, default=1.0)
    args = p.parse_args(argv)
    try:
        doc = alert_rules(args.window, args.error_ratio, args.p95_seconds, args.for_)
    except InvalidInput as exc:
        p.error(str(exc))
    print(yaml.safe_dump(doc, sort_keys=False), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
