"""The canary judge against a real lab's Prometheus (a lab of its own, octet 64,
``LIFTOFF_ANALYSIS_LAB_OCTET``).

The lab's own user traffic (``--traffic-rps 20`` per front end: the canary front end with the
``gitlab_canary`` cookie, both gprd front ends) reaches canary and main; Prometheus scrapes the
app on every host each second, labelled ``env`` (gprd-cny or gprd) and ``role``. First the
healthy canary (both fleets on the same build) is judged; then a build answering 5% of its
requests with HTTP 500 goes to the canary only (its Chef role on the canary's deploy node,
over SSH; the lab's Chef converges the canary hosts) and, once Prometheus has a whole window
of the new build's samples, the canary is judged again: ``fail``, its web or api error
ratio ``high``. Windows of 30 s at a 2 s step, rates over 20 s: the canary's web hosts see a
few requests a second, so a 10 s rate of a 2% error build was 0 in enough steps that a CI run
on a busy machine judged such a canary "pass" (its median error ratio 0): the test was a coin
toss rather than a check.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

from liftoff.analysis import analyze
from liftoff.inventory import load_inventory
from tests.labkit import Lab, running_lab

pytestmark = pytest.mark.lab

OCTET = int(os.environ.get("LIFTOFF_ANALYSIS_LAB_OCTET", "64"))
BAD = "17.5.1-ee.0"
WINDOW = {"window_s": 30.0, "step_s": 2.0, "rate_window_s": 20.0}
SETTLED_S = 52  # scrapes a window plus its rate window needs (1 s scrape interval)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with running_lab(tmp_path_factory.mktemp("analysis-lab"), OCTET, "--install-seconds", "0.2",
                     "--traffic-rps", "20", "--chef-interval", "1") as lab:
        yield lab


def judge_now(lab: Lab):
    inventory = load_inventory(lab.env["LIFTOFF_INVENTORY"])
    return analyze(inventory, "gprd-cny", prometheus=f"http://{lab.config.prometheus_addr}", **WINDOW)


def scraped_for(lab: Lab, selector: str, seconds: int) -> bool:
    """Whether every series of ``selector`` has about ``seconds`` samples over the last ``seconds``."""
    result = lab.prometheus_query(f"count_over_time({selector}[{seconds}s])")
    return bool(result) and min(float(r["value"][1]) for r in result) >= seconds - 2


def canary_runs(lab: Lab, version: str) -> bool:
    canary = lab.status()["environments"]["gprd-cny"]["hosts"]
    return all(h["running"] == version for h in canary if h["role"] in ("web", "api", "git"))


def test_healthy_canary_is_not_failed_and_a_bad_one_is(lab: Lab):
    lab.wait_for("a window of canary traffic in Prometheus",
                 lambda: scraped_for(lab, 'up{job="app",env=~"gprd|gprd-cny",role="web"}', SETTLED_S),
                 timeout=90, interval=1)
    healthy = judge_now(lab)
    assert healthy.verdict in ("pass", "marginal"), healthy.to_json()
    assert healthy.requests["canary"] >= 200 and healthy.requests["baseline"] >= 200
    assert healthy.metrics["error_ratio_web"].classification == "pass"
    assert healthy.metrics["error_ratio_web"].canary == 0.0

    lab.build_add(BAD, error_rate=0.05)
    deploy = lab.topology.deploy_node("gprd-cny").name
    out = lab.ssh(deploy, f"gitlab-chef-role set-version {BAD}")
    assert out.returncode == 0, out.stderr
    lab.wait_for(f"canary hosts on {BAD}", lambda: canary_runs(lab, BAD), timeout=30, interval=0.5)
    lab.wait_for(f"a window of {BAD} samples in Prometheus",
                 lambda: scraped_for(lab, f'gitlab_build_info{{env="gprd-cny",role="web",version="{BAD}"}}',
                                     SETTLED_S),
                 timeout=90, interval=1)
    assert canary_runs(lab, BAD)
    started = time.monotonic()
    bad = judge_now(lab)
    assert time.monotonic() - started < 10
    assert bad.verdict == "fail", bad.to_json()
    highs = {name for name, m in bad.metrics.items() if m.classification == "high"}
    assert highs and highs <= {"error_ratio_web", "error_ratio_api"}, bad.to_json()
    for name in highs:
        m = bad.metrics[name]
        assert m.p_value < 0.05 and m.baseline == 0.0 and 0.01 < m.canary < 0.15, bad.to_json()
        assert name in bad.reason
