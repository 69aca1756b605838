"""A fixed-size slice of bench/fleet_scale.py: 200 hosts through the same simulated transport
(the real Remote and HAProxy client, fake SSH connections and in-process LBs). Counts, not
timings: timings belong in the benchmark."""

from __future__ import annotations

import logging

import pytest

from bench.fleet_scale import AUDIT_WRITES, PER_BATCH, TxCounter, checks, simulate
from liftoff.store import Store

HOSTS = 200


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    return simulate(HOSTS, "10%", db_dir=str(tmp_path_factory.mktemp("scale")))


def test_every_host_rolled(result):
    assert result["status"] == "success"
    assert result["counts"] == {"done": HOSTS}
    assert result["batches"] == 10


def test_batch_writes_are_one_transaction_per_batch(result):
    writes = result["write_tx"]
    assert {m: writes.get(m, 0) for m in PER_BATCH} == {"record_drained_many": 10, "clear_drained_many": 10,
                                                        "set_host_statuses": 30}
    assert set(writes) <= {*PER_BATCH, *AUDIT_WRITES}
    # Audit rows are written before their commands run, one transaction per fan-out of a batch
    # (inspect, the drained session, the version check, chef start) and one for the chef role
    # read; their results go in batches, not a transaction per command.
    assert writes["audit_begin_many"] == 4 * 10 + 1
    assert writes["audit_finish_many"] < HOSTS


def test_rows_per_host(result):
    rows = result["rows"]
    assert rows["liftoff_host_progress"] == HOSTS
    assert rows["liftoff_drained"] == 0  # every drain record cleared
    # inspect, the drained session, the version check, chef start; and the chef role read once
    assert rows["liftoff_audit"] == 4 * HOSTS + 1
    assert {t for t, n in rows.items() if n} == {"liftoff_host_progress", "liftoff_audit"}


def test_log_lines_name_the_batch_not_the_hosts(result):
    assert result["log_lines"]["liftoff.haproxy INFO"] == 2 * result["batches"]  # a drain, a ready
    assert result["log_lines"]["liftoff.fleet INFO"] == HOSTS  # the per-host result line
    assert result["most_host_names_in_a_line"] == 1


def test_drain_and_ready_lines_say_batch_and_count(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="liftoff"):
        simulate(40, "25%", db_dir=str(tmp_path))
    lines = [r.getMessage() for r in caplog.records if r.name == "liftoff.haproxy"]
    assert lines[:2] == ["haproxy drain: batch 1 of web, 10 host(s) on 2 LB(s)",
                         "haproxy ready: batch 1 of web, 10 host(s) on 2 LB(s)"]
    assert len(lines) == 8


def test_the_bench_checks_pass_on_the_slice(result):
    assert [line for ok, line in checks([result, result]) if not ok] == []


def test_tx_counter_sees_a_transaction_per_host_loop(tmp_path):
    """The instrument would catch a regression to one write per host."""
    store = Store(f"sqlite:///{tmp_path / 'state.db'}")
    counter = TxCounter()
    counter.install(store)
    try:
        for i in range(5):
            store.set_host_status("gprd:17.6.0-ee.0", "gprd", f"web-{i:02d}-sv-gprd", "done", "17.6.0-ee.0")
        store.record_drained_many("gprd", ["web-01-sv-gprd", "web-02-sv-gprd"], "run-1")
        store.drained("gprd")
    finally:
        store.close()
    assert counter.writes() == {"record_drained_many": 1, "set_host_status": 5}
    assert counter.reads() == {"drained": 1}


def test_memory_ratio_of_zero_growth_is_one_and_growth_from_zero_fails(result):
    flat = dict(result, peak_rss_kb_per_host=0.0)
    grown = dict(result, peak_rss_kb_per_host=2.0)
    assert not [line for ok, line in checks([flat, flat]) if not ok]
    failed = [line for ok, line in checks([flat, grown]) if not ok]
    assert len(failed) == 1 and failed[0].startswith("peak memory per host") and "infx" in failed[0]
