"""The canary judge (liftoff.analysis): samples of known distributions (seeded), the verdict
rules, the inventory's thresholds, the command, and a fake Prometheus."""

from __future__ import annotations

import json
import socket
import urllib.parse

import numpy as np
import pytest
import yaml

from liftoff import analysis
from liftoff.analysis import (
    AnalysisConfig,
    FleetSamples,
    analyze,
    compare_metric,
    fleet_queries,
    fleets_of,
    judge,
    main,
    parse_config,
)
from liftoff.errors import InvalidInput, InventoryError
from liftoff.inventory import parse_inventory
from tests.unit.http_fakes import LocalServer, QuietHandler

N = 40  # samples per metric per fleet


def fleet(seed: int, *, error: float = 0.01, p95: float = 0.5, requests: int = 50_000,
          n: int = N) -> FleetSamples:
    """A fleet whose per-step error ratio is binomial over 1,000 requests and whose p95 is
    lognormal around ``p95`` (10% spread)."""
    rng = np.random.default_rng(seed)
    errors = rng.binomial(1000, error, size=n) / 1000
    latency = p95 * np.exp(rng.normal(0, 0.1, size=n))
    return FleetSamples(requests, {"error_ratio": errors.tolist(), "latency_p95_seconds": latency.tolist()})


def test_identical_fleets_pass():
    verdict = judge(fleet(1), fleet(2))
    assert verdict.verdict == "pass", verdict.reason
    assert verdict.score == 100.0
    assert {m.classification for m in verdict.metrics.values()} == {"pass"}
    assert all(m.p_value >= 0.05 for m in verdict.metrics.values())


def test_a_canary_with_twice_the_error_ratio_fails():
    verdict = judge(fleet(1), fleet(2, error=0.02))
    er = verdict.metrics["error_ratio"]
    assert er.classification == "high" and er.p_value < 1e-6
    assert er.canary == pytest.approx(2 * er.baseline, rel=0.25)
    assert verdict.metrics["latency_p95_seconds"].classification == "pass"
    assert verdict.verdict == "fail"
    assert verdict.score == pytest.approx(100 * 2 / 6, abs=0.1)  # error_ratio weighs 4, p95 2
    assert "error_ratio" in verdict.reason


def test_a_canary_30_percent_slower_at_p95_is_high():
    verdict = judge(fleet(1), fleet(2, p95=0.65))
    assert verdict.metrics["latency_p95_seconds"].classification == "high"
    assert verdict.metrics["error_ratio"].classification == "pass"
    assert verdict.verdict == "fail"  # 4 of 6: 66.7 < 75


def test_a_significant_but_tiny_difference_passes():
    """5% more errors over many samples is significant, but under the effect floor."""
    base, cny = fleet(1, error=0.01, n=400), fleet(2, error=0.0105, n=400)
    # the same samples with a 2x effect are high: only the floor tells the two apart
    assert compare_metric("error_ratio", base.series["error_ratio"],
                          [2 * v for v in base.series["error_ratio"]], 0.05).classification == "high"
    tiny = compare_metric("error_ratio", base.series["error_ratio"],
                          [v + 0.0004 for v in base.series["error_ratio"]], 0.05)
    assert tiny.p_value < 0.05 and tiny.classification == "pass"
    assert judge(base, cny).verdict == "pass"


def test_a_better_canary_is_low_and_passes():
    verdict = judge(fleet(1), fleet(2, error=0.004, p95=0.3))
    assert verdict.metrics["error_ratio"].classification == "low"
    assert verdict.metrics["latency_p95_seconds"].classification == "low"
    assert verdict.metrics["error_ratio"].p_value < 0.05
    assert verdict.verdict == "pass" and verdict.score == 100.0


@pytest.mark.parametrize("which", ["baseline", "canary"])
def test_too_few_requests_is_inconclusive_never_pass(which):
    few = {"requests": 199}
    base = fleet(1, **(few if which == "baseline" else {}))
    for cny in (fleet(2, **(few if which == "canary" else {})),
                fleet(2, error=0.03, **(few if which == "canary" else {}))):
        verdict = judge(base, cny)
        assert verdict.verdict == "inconclusive"
        assert f"the {which} served 199 requests" in verdict.reason
    assert judge(fleet(1, requests=200), fleet(2, requests=200)).verdict == "pass"


def test_an_empty_series_is_nodata_and_left_out_of_the_score():
    base, cny = fleet(1), fleet(2)
    cny = FleetSamples(cny.requests, {**cny.series, "latency_p95_seconds": [float("nan")] * 5 + [0.5, 0.5]})
    verdict = judge(base, cny)
    assert verdict.metrics["latency_p95_seconds"].classification == "nodata"
    assert verdict.metrics["latency_p95_seconds"].p_value is None
    assert verdict.verdict == "pass" and verdict.score == 100.0  # error_ratio: 4 of 6 weight has data


def test_all_nodata_or_too_little_weight_with_data_is_inconclusive():
    base, cny = fleet(1), fleet(2)
    empty = FleetSamples(cny.requests, {"error_ratio": [], "latency_p95_seconds": []})
    verdict = judge(base, empty)
    assert verdict.verdict == "inconclusive" and verdict.score is None
    assert "0% of the weight" in verdict.reason
    # only latency (2 of 6) has data: 33% < min_coverage 50%, whatever it says
    no_errors = FleetSamples(cny.requests,
                             {"error_ratio": [], "latency_p95_seconds": cny.series["latency_p95_seconds"]})
    verdict = judge(base, no_errors)
    assert verdict.verdict == "inconclusive" and "error_ratio" in verdict.reason
    assert judge(base, no_errors, AnalysisConfig(min_coverage=0.3)).verdict == "pass"
    assert judge(FleetSamples(500, {}), FleetSamples(500, {})).verdict == "inconclusive"


def test_metrics_of_unknown_direction_are_shown_but_weigh_nothing():
    base, cny = fleet(1), fleet(2)
    base = FleetSamples(base.requests, {**base.series, "queue_depth": [1.0] * 20})
    cny = FleetSamples(cny.requests, {**cny.series, "queue_depth": [9.0] * 20})
    verdict = judge(base, cny)
    assert verdict.metrics["queue_depth"].classification == "high"
    assert verdict.metrics["queue_depth"].weight == 0
    assert verdict.verdict == "pass"


# -- thresholds from the inventory ------------------------------------------------------------

INVENTORY = """
environments:
  gprd-cny:
    url: http://127.0.0.1:1
    canary_of: gprd
    alert_matchers: {env: gprd-cny}
    deploy_node: {name: deploy-cny-01-sv-gprd, address: 127.0.0.20}
    roles: [{name: web, stage: fleet, hosts: [{name: web-cny-01-sv-gprd, address: 127.0.0.21}]}]
    extra: {analysis: {pass_threshold: 60, marginal_threshold: 40, min_requests: 10, roles: [web]}}
  gprd:
    url: http://127.0.0.1:2
    alert_matchers: {env: gprd}
    deploy_node: {name: deploy-01-sv-gprd, address: 127.0.0.30}
    roles: [{name: web, stage: fleet, hosts: [{name: web-01-sv-gprd, address: 127.0.0.31}]}]
"""


def inventory(**analysis_block):
    data = yaml.safe_load(INVENTORY)
    if analysis_block:
        data["environments"]["gprd-cny"]["extra"]["analysis"] = analysis_block
    return parse_inventory(data)


def test_thresholds_come_from_the_environments_analysis_block():
    config = AnalysisConfig.from_environment(inventory().env("gprd-cny"))
    assert (config.pass_threshold, config.marginal_threshold, config.min_requests) == (60, 40, 10)
    assert config.alpha == 0.05 and config.roles == ("web",)
    assert AnalysisConfig.from_environment(inventory().env("gprd")) == AnalysisConfig()
    assert (AnalysisConfig().pass_threshold, AnalysisConfig().marginal_threshold) == (90, 75)
    assert AnalysisConfig().min_requests == 200
    slower = (fleet(1), fleet(2, p95=0.65))  # score 66.7
    assert judge(*slower).verdict == "fail"
    assert judge(*slower, config).verdict == "pass"
    marginal = parse_config({"pass_threshold": 80, "marginal_threshold": 60})
    assert judge(*slower, marginal).verdict == "marginal"


@pytest.mark.parametrize(("block", "field"), [
    ({"pass_threshold": 101}, "pass_threshold"),
    ({"alpha": 0}, "alpha"),
    ({"alpha": "0.05"}, "alpha"),
    ({"min_requests": -1}, "min_requests"),
    ({"pass_threshold": 50, "marginal_threshold": 60}, "marginal_threshold"),
    ({"roles": []}, "roles"),
    ({"selector": {"env": 'x"}'}}, "selector"),
    ({"treshold": 3}, "treshold"),
])
def test_a_bad_analysis_block_names_its_field(block, field):
    with pytest.raises(InventoryError, match=rf"environments\.gprd-cny\.extra\.analysis\.{field}"):
        AnalysisConfig.from_environment(inventory(**block).env("gprd-cny"))


def test_fleets_that_cannot_be_told_apart_are_refused():
    with pytest.raises(InvalidInput, match="cannot be told"):
        fleets_of({"env": "gprd"}, {"env": "gprd"})
    base, cny = fleets_of({"env": "gprd"}, {"env": "gprd", "stage": "cny"})
    assert 'env="gprd",stage!="cny"' in fleet_queries(AnalysisConfig(), base)["error_ratio_web"]
    assert 'stage="cny"' in fleet_queries(AnalysisConfig(), cny)["error_ratio_web"]


# -- the command ----------------------------------------------------------------------------------

def write(tmp_path, name: str, samples: FleetSamples | object) -> str:
    data = {"requests": samples.requests, "series": samples.series} if isinstance(samples, FleetSamples) \
        else samples
    path = tmp_path / name
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return str(path)


def test_judge_command_prints_a_table_and_exits_0_on_pass(tmp_path, capsys):
    code = main(["judge", write(tmp_path, "b.json", fleet(1)), write(tmp_path, "c.json", fleet(2))])
    out = capsys.readouterr().out
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["metric", "classification", "p-value", "baseline", "canary"]
    assert lines[1].split()[:2] == ["error_ratio", "pass"]
    assert lines[-1].startswith("verdict: pass (score 100; pass >= 90, marginal >= 75)")


def test_judge_command_json_shape_and_exit_1_on_fail(tmp_path, capsys):
    files = [write(tmp_path, "b.json", fleet(1)), write(tmp_path, "c.json", fleet(2, error=0.02))]
    code = main(["judge", *files, "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 1
    assert doc["verdict"] == "fail" and doc["score"] == pytest.approx(33.3)
    assert set(doc["metrics"]) == {"error_ratio", "latency_p95_seconds"}
    er = doc["metrics"]["error_ratio"]
    assert {"classification", "p_value", "baseline", "canary"} <= set(er)
    assert er["classification"] == "high" and 0 <= er["p_value"] < 0.05 and er["canary"] > er["baseline"]


def test_judge_command_exits_1_when_inconclusive(tmp_path, capsys):
    files = [write(tmp_path, "b.json", fleet(1, requests=5)), write(tmp_path, "c.json", fleet(2))]
    code = main(["judge", *files, "--json"])
    assert code == 1 and json.loads(capsys.readouterr().out)["verdict"] == "inconclusive"


def test_judge_command_takes_thresholds_from_the_inventory(tmp_path, capsys, monkeypatch):
    inv = tmp_path / "inventory.yaml"
    inv.write_text(INVENTORY)
    monkeypatch.setenv("LIFTOFF_INVENTORY", str(inv))
    files = [write(tmp_path, "b.json", fleet(1)), write(tmp_path, "c.json", fleet(2, p95=0.65))]
    assert main(["judge", *files]) == 1
    assert main(["judge", *files, "--env", "gprd-cny"]) == 0
    assert "pass >= 60, marginal >= 40" in capsys.readouterr().out


@pytest.mark.parametrize(("content", "message"), [
    (None, "cannot read"),
    ("{not json", "not valid JSON"),
    ([1, 2], "expected a JSON object"),
    ({"series": {}}, "requests must be a whole number"),
    ({"requests": 10, "series": {"error_ratio": "0.1"}}, "must be a list of numbers"),
    ({"requests": 10, "series": {"error_ratio": [0.1, "x"]}}, r"series.error_ratio\[1\] is not a number"),
    ({"requests": 10, "series": {"bad name": [0.1]}}, "bad metric name"),
    ({"requests": 10, "series": {}, "extra": 1}, "unknown field"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, content, message):
    good = write(tmp_path, "b.json", fleet(1))
    bad = str(tmp_path / "missing.json") if content is None else write(tmp_path, "c.json", content)
    assert main(["judge", good, bad]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert __import__("re").search(message, err), err


# -- a fake Prometheus ----------------------------------------------------------------------------

class FakePrometheus:
    """Answers query_range and query: canary series (env="gprd-cny") from ``canary``, the others
    from ``baseline`` (name -> values); ``mode`` "malformed"/"error" answers badly."""

    def __init__(self, baseline: dict, canary: dict, requests: float = 5000.0):
        self.fleets = {"baseline": baseline, "canary": canary}
        self.requests = requests
        self.queries: list[tuple[str, dict]] = []
        self.mode = "ok"
        fake = self

        class Handler(QuietHandler):
            def do_GET(self):  # noqa: N802
                url = urllib.parse.urlsplit(self.path)
                params = dict(urllib.parse.parse_qsl(url.query))
                fake.queries.append((url.path, params))
                self.reply(*fake.answer(url.path, params))

        self._http = LocalServer(Handler)
        self.url = self._http.url

    def answer(self, path: str, params: dict) -> tuple[int, object]:
        if self.mode == "error":
            return 400, {"status": "error", "errorType": "bad_data", "error": "parse error at char 3"}
        if self.mode == "malformed":
            return 200, {"status": "success", "data": {"resultType": "matrix", "result": [{"values": 7}]}}
        query = params["query"]
        which = "canary" if 'env="gprd-cny"' in query else "baseline"
        if path == "/api/v1/query":
            return 200, {"status": "success", "data": {"resultType": "vector", "result": [
                {"metric": {}, "value": [float(params["time"]), str(self.requests)]}]}}
        values = self.fleets[which].get(self._metric(query), [])
        start, step = float(params["start"]), float(params["step"])
        result = [{"metric": {}, "values": [[start + i * step, str(v)] for i, v in enumerate(values)]}] \
            if values else []
        return 200, {"status": "success", "data": {"resultType": "matrix", "result": result}}

    @staticmethod
    def _metric(query: str) -> str:
        if "sidekiq" in query:
            return "sidekiq_failures_ratio"
        if "histogram_quantile(0.95" in query:
            return "latency_p95_seconds_web"
        if "histogram_quantile(0.99" in query:
            return "latency_p99_seconds_web"
        return "error_ratio_web"

    def close(self):
        self._http.close()


def web_series(seed: int, **kw) -> dict:
    f = fleet(seed, **kw)
    p95 = f.series["latency_p95_seconds"]
    return {"error_ratio_web": f.series["error_ratio"], "latency_p95_seconds_web": p95,
            "latency_p99_seconds_web": [2 * v for v in p95]}


def use_connection(monkeypatch, url: str) -> None:
    """The liftoff_prometheus connection (AIRFLOW_CONN_*, no Airflow metadata DB) at ``url``."""
    monkeypatch.setenv("LIFTOFF_NO_AIRFLOW", "1")
    monkeypatch.setenv("AIRFLOW_CONN_LIFTOFF_PROMETHEUS", json.dumps({"conn_type": "http", "host": url}))


@pytest.fixture
def prometheus():
    fake = FakePrometheus(web_series(1), web_series(2))
    yield fake
    fake.close()


def test_prometheus_range_queries_per_fleet_give_the_verdict(prometheus):
    verdict = analyze(inventory(), "gprd-cny", end=1_700_000_000.0, prometheus=prometheus.url)
    assert verdict.verdict == "pass", verdict.reason
    assert verdict.requests == {"baseline": 5000, "canary": 5000}
    assert verdict.metrics["sidekiq_failures_ratio"].classification == "nodata"
    assert verdict.metrics["error_ratio_web"].classification == "pass"
    ranges = [p for path, p in prometheus.queries if path == "/api/v1/query_range"]
    assert len(ranges) == 2 * 4  # error ratio, p95, p99 of web + sidekiq, per fleet
    assert {p["step"] for p in ranges} == {"30"}
    assert {(float(p["end"]) - float(p["start"])) for p in ranges} == {900.0}
    queries = {p["query"] for p in ranges}
    canary_web = 'job="app",role="web",env="gprd-cny"'
    assert (f'(sum(rate(http_requests_total{{{canary_web},status=~"5.."}}[60s])) or vector(0))'
            f' / sum(rate(http_requests_total{{{canary_web}}}[60s]))') in queries
    assert ('histogram_quantile(0.95, sum by (le) (rate(http_request_duration_seconds_bucket'
            '{job="app",role="web",env="gprd"}[60s])))') in queries


def test_prometheus_canary_with_more_errors_fails(prometheus, monkeypatch):
    prometheus.fleets["canary"] = web_series(2, error=0.02)
    use_connection(monkeypatch, prometheus.url)
    default_thresholds = inventory(roles=["web"])
    verdict = analyze(default_thresholds, "gprd-cny")  # through the liftoff_prometheus connection
    assert verdict.verdict == "fail" and verdict.score == pytest.approx(100 * 3 / 7, abs=0.1)
    assert verdict.metrics["error_ratio_web"].classification == "high"


def test_prometheus_too_few_requests_is_inconclusive(prometheus):
    prometheus.requests = 3
    verdict = analyze(inventory(), "gprd-cny", prometheus=prometheus.url)
    assert verdict.verdict == "inconclusive" and "served 3 requests" in verdict.reason


def test_prometheus_unreachable_is_inconclusive_with_the_reason():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: refused
    verdict = analyze(inventory(), "gprd-cny", prometheus=f"http://127.0.0.1:{port}")
    assert verdict.verdict == "inconclusive" and verdict.score is None
    assert verdict.reason == f"Prometheus at http://127.0.0.1:{port} is unreachable (ConnectionError)."


@pytest.mark.parametrize(("mode", "reason"), [
    ("malformed", "with malformed values"),
    ("error", "HTTP 400 to the baseline error_ratio_web query: parse error at char 3"),
])
def test_prometheus_bad_answers_are_inconclusive(prometheus, mode, reason):
    prometheus.mode = mode
    verdict = analyze(inventory(), "gprd-cny", prometheus=prometheus.url)
    assert verdict.verdict == "inconclusive" and reason in verdict.reason


def test_prometheus_not_json_is_inconclusive(monkeypatch):
    class Handler(QuietHandler):
        def do_GET(self):  # noqa: N802
            self.reply(200, b"<html>proxy login</html>", "text/html")

    server = LocalServer(Handler)
    try:
        verdict = analyze(inventory(), "gprd-cny", prometheus=server.url)
    finally:
        server.close()
    assert verdict.verdict == "inconclusive" and "not a successful API response" in verdict.reason


def test_prometheus_command_exit_code(prometheus, tmp_path, monkeypatch, capsys):
    inv = tmp_path / "inventory.yaml"
    inv.write_text(INVENTORY)
    monkeypatch.setenv("LIFTOFF_INVENTORY", str(inv))
    use_connection(monkeypatch, prometheus.url)
    assert main(["prometheus", "gprd-cny", "--json", "--window", "300"]) == 0
    assert json.loads(capsys.readouterr().out)["verdict"] == "pass"
    assert main(["prometheus", "gprd", "--json"]) == 2
    assert "no canary" in capsys.readouterr().err
    monkeypatch.setattr(analysis, "MIN_SAMPLES", 10_000)
    assert main(["prometheus", "gprd-cny"]) == 1
