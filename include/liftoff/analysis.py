"""The canary judge: is the canary fleet worse than the main fleet over the same window?

Per metric, the canary's samples (one per query step) are compared with the baseline's by a
one-sided Mann-Whitney U test (``scipy.stats.mannwhitneyu``, ``alternative="greater"``: only
worse counts against the canary) plus an effect-size floor: the canary's median must exceed
the baseline's by a relative margin AND by an absolute amount (:data:`METRIC_SPECS`), so a
significant but tiny difference passes. Each metric is classified

* ``high``: significantly worse, beyond the floors (counts against the canary);
* ``low``: significantly better, beyond the floors (informational: passes);
* ``pass``: neither;
* ``nodata``: fewer than :data:`MIN_SAMPLES` finite samples in either fleet (left out of the
  score).

Metric names say the direction: ``error_ratio*``, ``latency_*`` and ``sidekiq_failures*`` are
higher-is-worse and weigh in the score (error ratios heaviest); any other name is compared both
ways and shown, with weight 0 (its direction is unknown). ``p_value`` is the one-sided p-value
of the test that decided (``less`` for ``low``, ``greater`` otherwise; two-sided for metrics of
unknown direction).

Score (0-100) = weighted share of passing (``pass``/``low``) metrics among those with data.
Verdict: ``pass`` (score >= pass threshold), ``marginal`` (>= marginal threshold), ``fail``, or
``inconclusive`` - never ``pass`` - when either fleet served fewer than ``min_requests`` requests,
when the metrics with data carry less than ``min_coverage`` of the total weight (all ``nodata``
is coverage 0), or when Prometheus cannot be used (unreachable, an error, a malformed answer).

Settings per canary environment: the inventory's ``extra.analysis`` mapping (defaults in
:class:`AnalysisConfig`: pass 90, marginal 75, min_requests 200, alpha 0.05). The fleets' series
are told apart by each environment's ``extra.analysis.selector`` (labels), by default its
``alert_matchers`` (the lab: ``env="gprd-cny"`` against ``env="gprd"``, from the Prometheus
target labels of every app host); :func:`fleet_queries` holds the PromQL.

``python -m liftoff.analysis judge BASELINE.json CANARY.json [--json] [--env ENV]`` judges
samples from files, ``{"requests": N, "series": {"error_ratio": [...], ...}}``;
``python -m liftoff.analysis prometheus CANARY_ENV [--window S] [--json]`` judges the fleets
from the ``prometheus`` connection. Exit 0 for ``pass``; 1 for ``fail``, ``marginal`` or
``inconclusive``; 2 for bad input (a one-line error).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from liftoff.errors import InvalidInput, InventoryError, LiftoffError
from liftoff.inventory import Environment, Inventory

PASS, HIGH, LOW, NODATA = "pass", "high", "low", "nodata"
VERDICT_PASS, VERDICT_MARGINAL, VERDICT_FAIL, INCONCLUSIVE = "pass", "marginal", "fail", "inconclusive"
HIGHER_IS_WORSE, UNKNOWN = "higher_is_worse", "unknown"
MIN_SAMPLES = 3
METRIC_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_:]{0,99}")
LABEL_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,99}")
ROLE_RE = re.compile(r"[A-Za-z0-9_-]{1,60}")


@dataclass(frozen=True)
class MetricSpec:
    """How one metric is judged: its weight in the score, and the effect floor (the canary's
    median must exceed the baseline's by ``relative`` x the baseline median AND by ``absolute``)."""

    weight: float
    relative: float
    absolute: float
    direction: str = HIGHER_IS_WORSE


# First matching prefix wins. Floors tuned with bench/canary_judge.py (alpha 0.05): a canary
# must be 1.5x the baseline's error ratio, or 12% slower, before a significant difference counts.
METRIC_SPECS: tuple[tuple[str, MetricSpec], ...] = (
    ("error_ratio", MetricSpec(weight=4, relative=0.5, absolute=0.001)),
    ("latency_p99", MetricSpec(weight=1, relative=0.12, absolute=0.01)),
    ("latency_", MetricSpec(weight=2, relative=0.12, absolute=0.01)),
    ("sidekiq_failures", MetricSpec(weight=2, relative=0.5, absolute=0.001)),
)
OTHER_SPEC = MetricSpec(weight=0, relative=0.1, absolute=0.0, direction=UNKNOWN)


def spec_for(name: str) -> MetricSpec:
    return next((spec for prefix, spec in METRIC_SPECS if name.startswith(prefix)), OTHER_SPEC)


# -- settings -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AnalysisConfig:
    """The judge's settings (an environment's ``extra.analysis`` overrides any of them)."""

    pass_threshold: float = 90.0
    marginal_threshold: float = 75.0
    min_requests: int = 200
    alpha: float = 0.05
    min_coverage: float = 0.5  # share of the total weight that must have data
    window_s: float = 900.0
    step_s: float = 30.0
    rate_window_s: float = 60.0
    roles: tuple[str, ...] = ("web", "api", "git")
    role_label: str = "role"
    job: str = "app"
    selector: Mapping[str, str] | None = None  # this environment's series; None: its alert_matchers
    # The pipelines' use of the judge (liftoff.canary): on by default; stage 7's canary weight
    # steps, each held for interval_s (None: window_s) before the judge looks at that interval.
    enabled: bool = True
    steps: tuple[int, ...] = (5, 10, 25)
    interval_s: float | None = None

    @property
    def hold_s(self) -> float:
        """How long each judged step (stage 6, each stage 7 weight) is held: ``interval_s`` or
        ``window_s``."""
        return self.window_s if self.interval_s is None else self.interval_s

    @classmethod
    def from_environment(cls, env: Environment) -> AnalysisConfig:
        return parse_config(env.extra.get("analysis"), f"environments.{env.name}.extra.analysis")


_NUMBER_KEYS = {"pass_threshold": (0, 100), "marginal_threshold": (0, 100), "alpha": (0, 1),
                "min_coverage": (0, 1), "window_s": (0, 86400), "step_s": (0, 3600),
                "rate_window_s": (0, 86400), "interval_s": (0, 86400)}


def parse_config(data: Any, path: str = "analysis") -> AnalysisConfig:
    """An ``analysis`` mapping validated into :class:`AnalysisConfig` (errors name the field)."""
    if data is None:
        return AnalysisConfig()
    if not isinstance(data, Mapping):
        raise InventoryError(f"{path}: expected a mapping, got {type(data).__name__}")
    allowed = set(_NUMBER_KEYS) | {"min_requests", "roles", "role_label", "job", "selector", "enabled",
                                   "steps"}
    unknown = sorted(str(k) for k in data if k not in allowed)
    if unknown:
        raise InventoryError(f"{path}.{unknown[0]}: unknown field (allowed: {', '.join(sorted(allowed))})")
    values: dict[str, Any] = {}
    for key, (low, high) in _NUMBER_KEYS.items():
        if key in data:
            values[key] = _number(data[key], f"{path}.{key}", low, high)
    if "min_requests" in data:
        n = data["min_requests"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise InventoryError(f"{path}.min_requests: expected a whole number >= 0, got {n!r}")
        values["min_requests"] = n
    if "roles" in data:
        values["roles"] = _roles(data["roles"], f"{path}.roles")
    for key in ("role_label", "job"):
        if key in data:
            pattern = LABEL_NAME_RE if key == "role_label" else None
            values[key] = _label_value(data[key], f"{path}.{key}", pattern)
    if "selector" in data:
        values["selector"] = _selector(data["selector"], f"{path}.selector")
    if "enabled" in data:
        if not isinstance(data["enabled"], bool):
            raise InventoryError(f"{path}.enabled: expected true or false, got {data['enabled']!r}")
        values["enabled"] = data["enabled"]
    if "steps" in data:
        values["steps"] = _steps(data["steps"], f"{path}.steps")
    config = AnalysisConfig(**values)
    if config.marginal_threshold > config.pass_threshold:
        raise InventoryError(f"{path}.marginal_threshold: {config.marginal_threshold:g} is above "
                             f"pass_threshold {config.pass_threshold:g}")
    if config.step_s > config.window_s:
        raise InventoryError(f"{path}.step_s: {config.step_s:g} is longer than window_s {config.window_s:g}")
    return config


def _number(value: Any, path: str, low: float, high: float) -> float:
    """A number in ``(low, high]`` (``[0, high]`` for thresholds)."""
    inclusive = path.endswith("_threshold")
    fits = isinstance(value, (int, float)) and not isinstance(value, bool) and \
        (low <= value if inclusive else low < value) and value <= high
    if not fits:
        interval = f"{'[' if inclusive else '('}{low:g}, {high:g}]"
        raise InventoryError(f"{path}: expected a number in {interval}, got {value!r}")
    return float(value)


def _steps(value: Any, path: str) -> tuple[int, ...]:
    """Canary weights, 1..100, rising: [5, 10, 25]."""
    ok = isinstance(value, list) and 0 < len(value) <= 10 and all(
        isinstance(w, int) and not isinstance(w, bool) and 1 <= w <= 100 for w in value)
    if not ok or any(a >= b for a, b in zip(value, value[1:], strict=False)):
        raise InventoryError(f"{path}: expected rising canary weights within 1..100 like [5, 10, 25], "
                             f"got {value!r}"[:200])
    return tuple(value)


def _roles(value: Any, path: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(r, str) and ROLE_RE.fullmatch(r)
                                                           for r in value):
        raise InventoryError(f"{path}: expected a list of role names like [web, api, git], got {value!r}")
    return tuple(value)


def _label_value(value: Any, path: str, pattern: re.Pattern | None = None) -> str:
    ok = isinstance(value, str) and 0 < len(value) <= 200 and not any(c in value for c in '"\\\n\r')
    if not ok or (pattern is not None and not pattern.fullmatch(value)):
        kind = "name" if pattern else "value"
        raise InventoryError(f"{path}: expected a plain label {kind}, got {value!r}")
    return value


def _selector(value: Any, path: str) -> dict[str, str]:
    if not isinstance(value, Mapping) or not value:
        raise InventoryError(f"{path}: expected a mapping of labels like {{env: gprd-cny}}, got {value!r}")
    return {_label_value(k, f"{path}.{k}", LABEL_NAME_RE): _label_value(v, f"{path}.{k}")
            for k, v in value.items()}


# -- samples and results --------------------------------------------------------------------------

@dataclass(frozen=True)
class FleetSamples:
    """One fleet over the window: requests served, and one sample per step per metric."""

    requests: int | None
    series: Mapping[str, Sequence[float]] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Any, source: str = "samples") -> FleetSamples:
        """``{"requests": N, "series": {name: [numbers]}}``; InvalidInput names what is wrong."""
        if not isinstance(data, dict):
            raise InvalidInput(f"{source}: expected a JSON object with requests and series")
        unknown = sorted(set(data) - {"requests", "series"})
        if unknown:
            raise InvalidInput(f"{source}: unknown field {unknown[0]!r} (expected requests and series)")
        requests = data.get("requests")
        if isinstance(requests, bool) or not isinstance(requests, int) or requests < 0:
            raise InvalidInput(f"{source}: requests must be a whole number >= 0, got {requests!r}")
        series = data.get("series")
        if not isinstance(series, dict):
            raise InvalidInput(f"{source}: series must be an object of metric name -> list of numbers")
        out: dict[str, list[float]] = {}
        for name, values in series.items():
            if not METRIC_NAME_RE.fullmatch(name):
                raise InvalidInput(f"{source}: bad metric name {name[:60]!r}")
            if not isinstance(values, list):
                raise InvalidInput(f"{source}: series.{name} must be a list of numbers")
            for i, v in enumerate(values):
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise InvalidInput(f"{source}: series.{name}[{i}] is not a number: {v!r}"[:200])
            out[name] = [float(v) for v in values]
        return cls(requests, out)


@dataclass(frozen=True)
class MetricResult:
    classification: str
    p_value: float | None
    baseline: float | None  # median
    canary: float | None  # median
    weight: float

    def to_json(self) -> dict:
        return {"classification": self.classification, "p_value": _round(self.p_value),
                "baseline": _round(self.baseline), "canary": _round(self.canary), "weight": self.weight}


@dataclass(frozen=True)
class Verdict:
    verdict: str
    score: float | None
    reason: str
    metrics: Mapping[str, MetricResult] = field(default_factory=dict)
    requests: Mapping[str, int | None] = field(default_factory=dict)
    config: AnalysisConfig = field(default_factory=AnalysisConfig)

    @property
    def passed(self) -> bool:
        return self.verdict == VERDICT_PASS

    def to_json(self) -> dict:
        return {"verdict": self.verdict, "score": self.score, "reason": self.reason,
                "requests": dict(self.requests),
                "thresholds": {"pass": self.config.pass_threshold, "marginal": self.config.marginal_threshold,
                               "min_requests": self.config.min_requests, "alpha": self.config.alpha},
                "metrics": {name: m.to_json() for name, m in self.metrics.items()}}


def _round(value: float | None, digits: int = 6) -> float | None:
    return None if value is None else float(f"{value:.{digits}g}")


def inconclusive(reason: str, config: AnalysisConfig | None = None) -> Verdict:
    return Verdict(INCONCLUSIVE, None, reason, config=config or AnalysisConfig())


# -- the judge ------------------------------------------------------------------------------------

def _finite(values: Sequence[float]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(v)]


def _beyond_floor(worse: float, better: float, spec: MetricSpec) -> bool:
    """Whether ``worse`` exceeds ``better`` by the relative margin AND the absolute floor."""
    return worse - better >= max(spec.absolute, spec.relative * abs(better)) and worse > better


def compare_metric(name: str, baseline: Sequence[float], canary: Sequence[float],
                   alpha: float) -> MetricResult:
    """One metric's classification (see the module's docstring)."""
    from numpy import median
    from scipy.stats import mannwhitneyu

    spec = spec_for(name)
    base, cny = _finite(baseline), _finite(canary)
    if len(base) < MIN_SAMPLES or len(cny) < MIN_SAMPLES:
        return MetricResult(NODATA, None, float(median(base)) if base else None,
                            float(median(cny)) if cny else None, spec.weight)
    b_med, c_med = float(median(base)), float(median(cny))
    if spec.direction == UNKNOWN:
        p = float(mannwhitneyu(cny, base, alternative="two-sided").pvalue)
        worse = p < alpha and _beyond_floor(c_med, b_med, spec)
        better = p < alpha and _beyond_floor(b_med, c_med, spec)
        return MetricResult(HIGH if worse else LOW if better else PASS, p, b_med, c_med, spec.weight)
    p_greater = float(mannwhitneyu(cny, base, alternative="greater").pvalue)
    if p_greater < alpha and _beyond_floor(c_med, b_med, spec):
        return MetricResult(HIGH, p_greater, b_med, c_med, spec.weight)
    p_less = float(mannwhitneyu(cny, base, alternative="less").pvalue)
    if p_less < alpha and _beyond_floor(b_med, c_med, spec):
        return MetricResult(LOW, p_less, b_med, c_med, spec.weight)
    return MetricResult(PASS, p_greater, b_med, c_med, spec.weight)


def score_of(metrics: Mapping[str, MetricResult]) -> tuple[float | None, float]:
    """(score 0-100 over the weighted metrics with data or None, coverage: their share of the weight)."""
    total = sum(m.weight for m in metrics.values())
    with_data = [m for m in metrics.values() if m.classification != NODATA]
    weight = sum(m.weight for m in with_data)
    if total <= 0 or weight <= 0:
        return None, 0.0
    passing = sum(m.weight for m in with_data if m.classification in (PASS, LOW))
    return round(100.0 * passing / weight, 1), weight / total


def judge(baseline: FleetSamples, canary: FleetSamples, config: AnalysisConfig | None = None) -> Verdict:
    """The verdict on the canary against the baseline (both over the same window)."""
    config = config or AnalysisConfig()
    names = sorted(set(baseline.series) | set(canary.series))
    metrics = {n: compare_metric(n, baseline.series.get(n, ()), canary.series.get(n, ()), config.alpha)
               for n in names}
    score, coverage = score_of(metrics)
    requests = {"baseline": baseline.requests, "canary": canary.requests}
    verdict, reason = _decide(metrics, score, coverage, requests, config)
    return Verdict(verdict, score, reason, metrics, requests, config)


def _decide(metrics: Mapping[str, MetricResult], score: float | None, coverage: float,
            requests: Mapping[str, int | None], config: AnalysisConfig) -> tuple[str, str]:
    for fleet, n in requests.items():
        if n is None or n < config.min_requests:
            return INCONCLUSIVE, (f"too little data: the {fleet} served {n or 0} requests, fewer than "
                                  f"min_requests {config.min_requests}.")
    if score is None or coverage < config.min_coverage:
        empty = sorted(n for n, m in metrics.items() if m.classification == NODATA and m.weight > 0)
        return INCONCLUSIVE, (f"too little data: metrics with data carry {coverage:.0%} of the weight, below "
                              f"{config.min_coverage:.0%} (no data: {', '.join(empty[:6]) or 'no metrics'}).")
    high = sorted(n for n, m in metrics.items() if m.classification == HIGH and m.weight > 0)
    worse = f"; worse on the canary: {', '.join(high)}" if high else ""
    if score >= config.pass_threshold:
        return VERDICT_PASS, f"score {score:g} >= {config.pass_threshold:g}{worse}."
    if score >= config.marginal_threshold:
        return VERDICT_MARGINAL, f"score {score:g} is below {config.pass_threshold:g}{worse}."
    return VERDICT_FAIL, f"score {score:g} is below {config.marginal_threshold:g}{worse}."


# -- Prometheus -----------------------------------------------------------------------------------

class PrometheusUnusable(LiftoffError):
    """Prometheus was unreachable, refused a query or answered something malformed."""


@dataclass(frozen=True)
class Fleet:
    """Which series are one fleet's: labels equal to ``selector`` and different from ``exclude``
    (the baseline excludes the canary's own labels when its selector is a subset of the canary's,
    e.g. ``{env: gprd}`` against ``{env: gprd, stage: cny}``)."""

    name: str
    selector: Mapping[str, str]
    exclude: Mapping[str, str] = field(default_factory=dict)

    def matchers(self, **labels: str) -> str:
        eq = [f'{k}="{v}"' for k, v in {**labels, **self.selector}.items()]
        return ",".join([*eq, *(f'{k}!="{v}"' for k, v in self.exclude.items())])


def fleets_of(baseline: Mapping[str, str], canary: Mapping[str, str]) -> tuple[Fleet, Fleet]:
    """The baseline and canary fleets from their selectors (InvalidInput when they cannot differ)."""
    base, cny = dict(baseline), dict(canary)
    if cny.items() <= base.items():
        raise InvalidInput(f"the canary's series ({_describe(cny)}) cannot be told from the baseline's "
                           f"({_describe(base)}): set extra.analysis.selector")
    exclude = {k: v for k, v in cny.items() if k not in base} if base.items() <= cny.items() else {}
    return Fleet("baseline", base, exclude), Fleet("canary", cny)


def _describe(labels: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in labels.items())


def fleet_queries(config: AnalysisConfig, fleet: Fleet) -> dict[str, str]:
    """Metric name -> PromQL for one fleet: 5xx ratio and p95/p99 latency per role from the app's
    ``http_requests_total`` and ``http_request_duration_seconds`` histogram, and Sidekiq's failed
    share of jobs."""
    w = f"{max(1, round(config.rate_window_s))}s"
    out: dict[str, str] = {}
    for role in config.roles:
        http = fleet.matchers(job=config.job, **{config.role_label: role})
        errors = f'sum(rate(http_requests_total{{{http},status=~"5.."}}[{w}]))'
        total = f"sum(rate(http_requests_total{{{http}}}[{w}]))"
        out[f"error_ratio_{role}"] = f"({errors} or vector(0)) / {total}"
        buckets = f"rate(http_request_duration_seconds_bucket{{{http}}}[{w}])"
        for q in (95, 99):
            out[f"latency_p{q}_seconds_{role}"] = f"histogram_quantile(0.{q}, sum by (le) ({buckets}))"
    sel = fleet.matchers()
    out["sidekiq_failures_ratio"] = (f"(sum(rate(sidekiq_jobs_failed_total{{{sel}}}[{w}])) or vector(0)) / "
                                     f"sum(rate(sidekiq_jobs_completion_seconds_count{{{sel}}}[{w}]))")
    return out


def requests_query(config: AnalysisConfig, fleet: Fleet) -> str:
    roles = "|".join(config.roles)
    http = fleet.matchers(job=config.job) + f',{config.role_label}=~"{roles}"'
    return f"sum(increase(http_requests_total{{{http}}}[{max(1, round(config.window_s))}s]))"


class PrometheusClient:
    """``/api/v1/query_range`` and ``/api/v1/query`` through the http provider's ``HttpHook`` on the
    Prometheus connection (or a base URL)."""

    def __init__(self, prometheus: Any, timeout: float = 10.0):
        from liftoff.settings import base_url

        self.connection = prometheus
        self.url = prometheus.rstrip("/") if isinstance(prometheus, str) else base_url(prometheus)
        self.timeout = timeout

    def _get(self, endpoint: str, params: dict, what: str) -> Any:
        import requests

        from liftoff.settings import bound_hook

        hook = bound_hook(self.connection, method="GET", tcp_keep_alive=False)
        try:
            resp = hook.run(endpoint=endpoint, data=params, headers={"Accept": "application/json"},
                            extra_options={"timeout": self.timeout, "check_response": False})
        except requests.RequestException as exc:
            why = type(exc).__name__
            raise PrometheusUnusable(f"Prometheus at {self.url} is unreachable ({why}).") from None
        try:
            body = resp.json()
        except ValueError:
            body = None
        if resp.status_code != 200:
            error = str(body.get("error", ""))[:200] if isinstance(body, dict) else ""
            raise PrometheusUnusable(f"Prometheus answered HTTP {resp.status_code} to the {what} query"
                                     + (f": {error}." if error else "."))
        ok = isinstance(body, dict) and body.get("status") == "success" and isinstance(body.get("data"), dict)
        if not ok:
            raise PrometheusUnusable(f"Prometheus answered the {what} query with something that is not a "
                                     "successful API response.")
        return body["data"]

    def query_range(self, expr: str, start: float, end: float, step: float, what: str = "") -> list[float]:
        """The finite values of the query's one series (empty: no series)."""
        data = self._get("/api/v1/query_range", {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}",
                                                 "step": f"{step:g}"}, what or expr)
        result = _result(data, "matrix", what or expr)
        if len(result) > 1:
            raise PrometheusUnusable(f"Prometheus answered the {what} query with {len(result)} series, "
                                     "not one.")
        return _values(result[0].get("values") if result else [], what or expr)

    def query(self, expr: str, at: float, what: str = "") -> float | None:
        data = self._get("/api/v1/query", {"query": expr, "time": f"{at:.3f}"}, what or expr)
        result = _result(data, "vector", what or expr)
        if not result:
            return None
        values = _values([result[0].get("value")], what or expr)
        return values[0] if values else None


def _result(data: dict, kind: str, what: str) -> list[dict]:
    result = data.get("result")
    if data.get("resultType") != kind or not isinstance(result, list) or \
            not all(isinstance(r, dict) for r in result):
        raise PrometheusUnusable(f"Prometheus answered the {what} query with no {kind} result.")
    return result


def _values(pairs: Any, what: str) -> list[float]:
    if not isinstance(pairs, list):
        raise PrometheusUnusable(f"Prometheus answered the {what} query with malformed values.")
    out = []
    for pair in pairs:
        try:
            _, text = pair
            value = float(text)
        except (TypeError, ValueError):
            raise PrometheusUnusable(f"Prometheus answered the {what} query with a malformed "
                                     "sample.") from None
        if math.isfinite(value):
            out.append(value)
    return out


def fetch_fleet(client: PrometheusClient, config: AnalysisConfig, fleet: Fleet,
                start: float, end: float) -> FleetSamples:
    """One fleet's samples over ``[start, end]`` (raises :class:`PrometheusUnusable`)."""
    series = {name: client.query_range(expr, start, end, config.step_s, f"{fleet.name} {name}")
              for name, expr in fleet_queries(config, fleet).items()}
    config_for_requests = replace(config, window_s=end - start)
    total = client.query(requests_query(config_for_requests, fleet), end, f"{fleet.name} requests")
    return FleetSamples(int(round(total or 0)), series)


def selector_of(env: Environment) -> dict[str, str]:
    """The labels of an environment's series: ``extra.analysis.selector``, else its alert_matchers."""
    own = AnalysisConfig.from_environment(env).selector
    return dict(own or env.alert_matchers)


def analyze(inventory: Inventory, canary_env: str, *, end: float | None = None, prometheus: Any = None,
            **overrides: Any) -> Verdict:
    """Judge ``canary_env`` against the environment it is the canary of, from Prometheus, over the
    window ending at ``end`` (default now). ``overrides``: AnalysisConfig fields (e.g. window_s)."""
    env = inventory.env(canary_env)
    if env.canary_of is None:
        raise InvalidInput(f"environment {canary_env} is no canary (it has no canary_of)")
    config = replace(AnalysisConfig.from_environment(env), **overrides)
    base_fleet, canary_fleet = fleets_of(selector_of(inventory.env(env.canary_of)), selector_of(env))
    end = time.time() if end is None else end
    start = end - config.window_s
    try:
        if prometheus is None:
            from liftoff.settings import connection_for

            prometheus = connection_for("prometheus", inventory)
        client = PrometheusClient(prometheus)
        base = fetch_fleet(client, config, base_fleet, start, end)
        cny = fetch_fleet(client, config, canary_fleet, start, end)
    except PrometheusUnusable as exc:
        return inconclusive(str(exc), config)
    except LiftoffError as exc:  # no connection, a bad connection
        return inconclusive(f"Prometheus cannot be used: {exc}.", config)
    return judge(base, cny, config)


# -- the command ----------------------------------------------------------------------------------

def exit_code(verdict: Verdict) -> int:
    """0 for pass; 1 for fail, marginal and inconclusive."""
    return 0 if verdict.passed else 1


def render_table(verdict: Verdict) -> str:
    return table_of(verdict.to_json())


def table_of(data: Mapping[str, Any]) -> str:
    """The judgement's table for people, from its JSON (:meth:`Verdict.to_json`, as stored)."""
    rows = [("metric", "classification", "p-value", "baseline", "canary")]
    for name, m in (data.get("metrics") or {}).items():
        rows.append((str(name), str(m.get("classification")), _fmt(m.get("p_value"), ".4f"),
                     _fmt(m.get("baseline"), ".6g"), _fmt(m.get("canary"), ".6g")))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    req = data.get("requests") or {}
    lines.append(f"requests: baseline {req.get('baseline', '-')}, canary {req.get('canary', '-')}")
    score = "-" if data.get("score") is None else f"{data['score']:g}"
    limits = data.get("thresholds") or {}
    lines.append(f"verdict: {data.get('verdict')} (score {score}; pass >= {_fmt(limits.get('pass'), 'g')}, "
                 f"marginal >= {_fmt(limits.get('marginal'), 'g')}): {data.get('reason')}")
    return "\n".join(lines)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def load_samples(path: str) -> FleetSamples:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise InvalidInput(f"{path}: cannot read ({exc.strerror or type(exc).__name__})") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise InvalidInput(f"{path}: not valid JSON (line {getattr(exc, 'lineno', '?')})") from None
    return FleetSamples.from_json(data, path)


def _config_for(env_name: str | None) -> AnalysisConfig:
    if not env_name:
        return AnalysisConfig()
    from liftoff.inventory import load_inventory

    return AnalysisConfig.from_environment(load_inventory().env(env_name))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m liftoff.analysis",
                                description="Canary analysis: is the canary worse than the main fleet? "
                                            "Exit 0 pass; 1 fail, marginal or inconclusive; 2 bad input.")
    sub = p.add_subparsers(dest="cmd", required=True)
    j = sub.add_parser("judge", help="judge samples from files")
    j.add_argument("baseline", help='JSON: {"requests": N, "series": {"error_ratio": [...], ...}}')
    j.add_argument("canary", help="the same for the canary")
    j.add_argument("--env", help="take the thresholds from this environment of $LIFTOFF_INVENTORY")
    j.add_argument("--json", action="store_true", help="print the verdict as JSON")
    pr = sub.add_parser("prometheus", help="judge a canary environment from Prometheus")
    pr.add_argument("env", help="the canary environment (its canary_of is the baseline)")
    pr.add_argument("--window", type=float, help="seconds (default: the inventory's, else 900)")
    pr.add_argument("--json", action="store_true")
    return p


def _run(args: argparse.Namespace) -> Verdict:
    if args.cmd == "judge":
        config = _config_for(args.env)
        return judge(load_samples(args.baseline), load_samples(args.canary), config)
    from liftoff.inventory import load_inventory

    if args.window is not None and not 0 < args.window <= 86400:
        raise InvalidInput(f"--window must be within (0, 86400] seconds, got {args.window:g}")
    overrides = {} if args.window is None else {"window_s": args.window}
    return analyze(load_inventory(), args.env, **overrides)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        verdict = _run(args)
    except LiftoffError as exc:  # bad files, a bad inventory
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(verdict.to_json(), indent=2) if args.json else render_table(verdict))
    return exit_code(verdict)


if __name__ == "__main__":
    raise SystemExit(main())
