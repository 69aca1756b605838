"""Counters against the real Pushgateway of a lab of its own (octet 62): 8 processes bump the
same counters at once, serialised by the state store's lock (liftoff.metrics.counter_lock); read
back from the gateway, not one increment is lost."""

from __future__ import annotations

import multiprocessing
import urllib.request
import uuid
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from liftoff.metrics import PipelineMetrics
from tests.labkit import Lab, running_lab

pytestmark = pytest.mark.lab

OCTET = 62
RUNS = 8
BUMPS = 5  # per run, of each counter


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with running_lab(tmp_path_factory.mktemp("pushgateway-lab"), OCTET, "--install-seconds", "0.2") as lab:
        yield lab


def gateway_value(lab: Lab, name: str, **labels: str) -> float | None:
    with urllib.request.urlopen(f"http://{lab.config.pushgateway_addr}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


def one_run(gateway: str, pipeline: str, env: str, state_url: str, start: multiprocessing.Barrier) -> None:
    """A pipeline run's counters: BUMPS finished pipelines and BUMPS rollbacks, pushed as a run would."""
    metrics = PipelineMetrics(gateway, pipeline, timeout=10, state_url=state_url)
    start.wait(timeout=120)  # every run pushes at once
    for _ in range(BUMPS):
        if not (metrics.pipeline_status("success", start=1.0, end=2.0) and metrics.rollback(env)):
            raise SystemExit(3)


def test_concurrent_runs_lose_no_increment(lab: Lab, tmp_path):
    gateway = f"http://{lab.config.pushgateway_addr}"
    pipeline, env = f"pgw-{uuid.uuid4().hex[:8]}", f"gstg-{uuid.uuid4().hex[:8]}"
    state_url = f"sqlite:///{tmp_path / 'liftoff-state.db'}"  # the lab's kind of state store
    PipelineMetrics(gateway, pipeline, state_url=state_url).rollback(env)  # one before: counting goes on
    ctx = multiprocessing.get_context("fork")
    start = ctx.Barrier(RUNS)
    runs = [ctx.Process(target=one_run, args=(gateway, pipeline, env, state_url, start)) for _ in range(RUNS)]
    for p in runs:
        p.start()
    for p in runs:
        p.join(timeout=300)
    assert [p.exitcode for p in runs] == [0] * RUNS
    assert gateway_value(lab, "liftoff_pipelines_total", job="liftoff", pipeline=pipeline,
                         status="success") == RUNS * BUMPS
    assert gateway_value(lab, "liftoff_rollbacks_total", job="liftoff", env=env) == RUNS * BUMPS + 1
