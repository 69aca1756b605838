"""Benchmark: how often the canary judge (liftoff.analysis) fails a healthy canary, and how
often it catches a bad one, on simulated fleets.

    source scripts/env.sh && python bench/canary_judge.py              # 200 analyses each, seed 1
    python bench/canary_judge.py --runs 1000 --seed 7 --alpha 0.01

Each analysis simulates what Prometheus would answer for the default window (900 s at a 30 s
step, rates over 60 s: 30 samples per metric per fleet). Per role (web, api, git) the main fleet
serves 200/300/100 requests a second and the canary 5% of that; per 30 s step the request
count is Poisson, the 5xx count binomial (error rate drifting from step to step, together in
both fleets and apart per fleet) and the latencies fall into GitLab's histogram buckets
(lognormal, multinomial counts); error ratio and p95/p99 come from the rolling 60 s sums the
way ``rate()`` and ``histogram_quantile`` compute them. Sidekiq: failed share of ~50 jobs a
second in the main fleet.

Per analysis the baseline's levels are drawn at random (5xx ratio 0.2-1%, median latency
0.1-0.3 s). Scenarios, ``--runs`` analyses each:

* ``healthy``: the canary as the baseline, give or take a real but harmless difference
  (errors x0.9-1.15, latency x0.97-1.05);
* ``errors x2``: the canary's 5xx ratio doubled in every role;
* ``p95 +30%``: every canary latency 30% longer (p95 and p99 +30%).

Prints, per scenario, the share of verdicts ``fail`` and the share not ``pass`` (fail, marginal
or inconclusive: either stops a promotion). Goals: healthy fail <= 2%; detection (not pass)
>= 95% for both bad scenarios. Prints figures; never a pass/fail.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
from scipy.special import ndtr

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "include"))

from liftoff.analysis import AnalysisConfig, FleetSamples, judge  # noqa: E402

STEP_S = 30
RATE_STEPS = 2  # rate(...[60s]) at a 30 s step
SAMPLES = 30  # 900 s window
MAIN_RPS = {"web": 200.0, "api": 300.0, "git": 100.0}
CANARY_SHARE = 0.05
SIDEKIQ_JPS = 50.0
BOUNDS = np.array([0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0])


def bucket_probs(median: float, sigma: float) -> np.ndarray:
    """Probability of each bucket (+Inf last) for lognormal latencies."""
    cdf = ndtr((np.log(BOUNDS) - math.log(median)) / sigma)
    return np.diff(np.concatenate([[0.0], cdf, [1.0]]))


def histogram_quantile(q: float, counts: np.ndarray) -> np.ndarray:
    """Prometheus' histogram_quantile on per-row bucket counts (linear within a bucket)."""
    cum = np.cumsum(counts, axis=1)
    total = cum[:, -1]
    rank = q * total
    idx = np.argmax(cum >= rank[:, None], axis=1)
    idx = np.minimum(idx, len(BOUNDS) - 1)  # the +Inf bucket answers its lower bound
    upper = BOUNDS[idx]
    lower = np.where(idx > 0, BOUNDS[np.maximum(idx - 1, 0)], 0.0)
    below = np.where(idx > 0, cum[np.arange(len(cum)), np.maximum(idx - 1, 0)], 0)
    inside = counts[np.arange(len(counts)), idx]
    frac = np.divide(rank - below, inside, out=np.zeros_like(rank, dtype=float), where=inside > 0)
    return np.where(total > 0, lower + (upper - lower) * frac, np.nan)


def rolling(values: np.ndarray) -> np.ndarray:
    """Sums over RATE_STEPS consecutive steps (axis 0), SAMPLES rows."""
    return sum(values[i:i + SAMPLES] for i in range(RATE_STEPS))


def fleet(rng: np.random.Generator, rps: float, err: np.ndarray, median: float, sigma: float,
          error_noise: np.ndarray) -> dict[str, np.ndarray]:
    """One role of one fleet: error ratio and p95/p99 samples."""
    steps = SAMPLES + RATE_STEPS - 1
    n = rng.poisson(rps * STEP_S, size=steps)
    errors = rng.binomial(n, np.clip(err * error_noise, 0, 1))
    counts = rng.multinomial(n, bucket_probs(median, sigma))
    n_sum, e_sum, c_sum = rolling(n), rolling(errors), rolling(counts)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = e_sum / n_sum
    return {"error_ratio": ratio, "latency_p95_seconds": histogram_quantile(0.95, c_sum),
            "latency_p99_seconds": histogram_quantile(0.99, c_sum), "requests": n_sum}


def analysis(rng: np.random.Generator, scenario: str, config: AnalysisConfig) -> str:
    err = math.exp(rng.uniform(math.log(0.002), math.log(0.01)))
    median, sigma = rng.uniform(0.1, 0.3), rng.uniform(0.7, 1.0)
    err_x, lat_x = {"healthy": (rng.uniform(0.9, 1.15), rng.uniform(0.97, 1.05)),
                    "errors x2": (2.0, 1.0), "p95 +30%": (1.0, 1.3)}[scenario]
    steps = SAMPLES + RATE_STEPS - 1
    common = np.exp(rng.normal(0, 0.2, size=steps))  # traffic mix drifting for everyone
    series: dict[str, dict[str, list[float]]] = {"baseline": {}, "canary": {}}
    requests = {"baseline": 0, "canary": 0}
    for role, rps in MAIN_RPS.items():
        for name, share, ex, lx in (("baseline", 1.0, 1.0, 1.0), ("canary", CANARY_SHARE, err_x, lat_x)):
            own = np.exp(rng.normal(0, 0.15, size=steps))
            f = fleet(rng, rps * share, err * ex * np.ones(steps), median * lx, sigma, common * own)
            for metric in ("error_ratio", "latency_p95_seconds", "latency_p99_seconds"):
                series[name][f"{metric}_{role}"] = f[metric].tolist()
            requests[name] += int(f["requests"][::RATE_STEPS].sum())
    for name, share in (("baseline", 1.0), ("canary", CANARY_SHARE)):  # Sidekiq: same in every scenario
        jobs = rng.poisson(SIDEKIQ_JPS * share * STEP_S, size=steps)
        failed = rng.binomial(jobs, 0.01)
        series[name]["sidekiq_failures_ratio"] = (rolling(failed) / np.maximum(rolling(jobs), 1)).tolist()
    base = FleetSamples(requests["baseline"], series["baseline"])
    cny = FleetSamples(requests["canary"], series["canary"])
    return judge(base, cny, config).verdict


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=200)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--alpha", type=float, help="override the default alpha")
    args = p.parse_args(argv)
    config = AnalysisConfig() if args.alpha is None else replace(AnalysisConfig(), alpha=args.alpha)
    canary_rps = {r: v * CANARY_SHARE for r, v in MAIN_RPS.items()}
    print(f"{args.runs} analyses per scenario, seed {args.seed}; {SAMPLES} samples per metric per fleet "
          f"(step {STEP_S}s, rate window {STEP_S * RATE_STEPS}s); requests a second main {MAIN_RPS}, "
          f"canary {canary_rps}; alpha {config.alpha:g}, pass >= {config.pass_threshold:g}, "
          f"marginal >= {config.marginal_threshold:g}")
    print(f"{'scenario':<12} {'fail':>7} {'not pass':>9}  verdicts")
    for i, scenario in enumerate(("healthy", "errors x2", "p95 +30%")):
        rng = np.random.default_rng([args.seed, i])
        started = time.perf_counter()
        verdicts = Counter(analysis(rng, scenario, config) for _ in range(args.runs))
        fail = verdicts["fail"] / args.runs
        not_pass = 1 - verdicts["pass"] / args.runs
        elapsed = time.perf_counter() - started
        print(f"{scenario:<12} {fail:>7.1%} {not_pass:>9.1%}  {dict(sorted(verdicts.items()))} "
              f"({elapsed:.1f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
