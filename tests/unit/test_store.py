import multiprocessing
import threading

import pytest

from liftoff.errors import InvalidInput, LockHeld, StoreError
from liftoff.store import Store


@pytest.fixture()
def url(tmp_path):
    return f"sqlite:///{tmp_path / 'state.db'}"


@pytest.fixture()
def store(url):
    s = Store(url)
    yield s
    s.close()


def test_lock_acquire_release_and_holder(store):
    lock = store.acquire("gstg", "run-1", "alice", "deploy 16.3.0-ee.0")
    assert (lock.env, lock.run_id, lock.who, lock.reason) == ("gstg", "run-1", "alice", "deploy 16.3.0-ee.0")
    assert lock.since.tzinfo is not None
    with pytest.raises(LockHeld) as err:
        store.acquire("gstg", "run-2", "bob")
    assert err.value.lock.run_id == "run-1"
    assert "locked by run run-1 (alice)" in str(err.value) and "deploy 16.3.0-ee.0" in str(err.value)
    # the holder may take it again (a retried task)
    assert store.acquire("gstg", "run-1", "alice").run_id == "run-1"
    # another environment is independent
    store.acquire("gprd", "run-2", "bob")
    assert [lk.env for lk in store.list_locks()] == ["gprd", "gstg"]
    assert store.release("gstg", "run-2") is False  # not the holder
    assert store.get_lock("gstg").run_id == "run-1"
    assert store.release("gstg", "run-1") is True
    assert store.get_lock("gstg") is None
    assert store.release("gstg", "run-1") is False
    store.acquire("gstg", "run-3", "carol")
    assert [e.action for e in store.lock_events("gstg")] == ["acquire", "release", "acquire"]


def test_force_release_records_who_and_why(store):
    store.acquire("gprd", "run-9", "alice")
    with pytest.raises(InvalidInput, match="reason is empty"):
        store.force_release("gprd", "bob", "")
    removed = store.force_release("gprd", "bob", "run died: INC-12")
    assert removed.run_id == "run-9" and removed.who == "alice"
    assert store.get_lock("gprd") is None
    event = store.lock_events("gprd")[0]
    assert (event.action, event.run_id, event.who, event.reason) == \
        ("force_release", "run-9", "bob", "run died: INC-12")
    assert store.force_release("gprd", "bob", "again") is None


def test_lock_survives_a_new_store_on_the_same_database(url):
    a = Store(url)
    a.acquire("gstg", "run-1", "alice")
    a.close()
    b = Store(url)
    with pytest.raises(LockHeld, match="run-1"):
        b.acquire("gstg", "run-2", "bob")
    b.close()


def test_lock_inputs_are_validated(store):
    with pytest.raises(InvalidInput):
        store.acquire("gstg; drop table", "r", "w")
    with pytest.raises(InvalidInput):
        store.acquire("gstg", "run 1", "w")
    with pytest.raises(InvalidInput):
        store.acquire("gstg", "r", "w", reason="a`b`")


def test_threads_race_for_one_lock(url):
    store = Store(url)
    n = 16
    barrier = threading.Barrier(n)
    results: list[str] = []
    holders: list[str] = []

    def worker(i: int) -> None:
        barrier.wait()
        try:
            store.acquire("gstg", f"run-{i}", f"user{i}")
            results.append(f"run-{i}")
        except LockHeld as exc:
            holders.append(exc.lock.run_id)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 1, results
    assert len(holders) == n - 1 and set(holders) == set(results)
    assert store.get_lock("gstg").run_id == results[0]
    store.close()


def _race(url: str, i: int, barrier, queue) -> None:
    store = Store(url)
    barrier.wait()
    try:
        store.acquire("gprd", f"proc-{i}", f"user{i}")
        queue.put(("won", f"proc-{i}"))
    except LockHeld as exc:
        queue.put(("held", exc.lock.run_id))
    except Exception as exc:  # surface anything else to the test
        queue.put(("error", repr(exc)))
    finally:
        store.close()


def test_processes_race_for_one_lock(url):
    Store(url).close()  # tables exist before the race
    ctx = multiprocessing.get_context("fork")
    n = 6
    barrier = ctx.Barrier(n)
    queue = ctx.Queue()
    procs = [ctx.Process(target=_race, args=(url, i, barrier, queue)) for i in range(n)]
    for p in procs:
        p.start()
    outcomes = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert [o for o in outcomes if o[0] == "error"] == []
    winners = [o[1] for o in outcomes if o[0] == "won"]
    assert len(winners) == 1, outcomes
    assert {o[1] for o in outcomes if o[0] == "held"} == set(winners)
    s = Store(url)
    assert s.get_lock("gprd").run_id == winners[0]
    s.close()


def test_drain_records(store):
    rec = store.record_drained("gstg", "web-01-sv-gstg", "run-1", "deploy")
    assert rec.host == "web-01-sv-gstg" and rec.run_id == "run-1"
    store.record_drained("gstg", "web-02-sv-gstg", "run-1")
    store.record_drained("gprd", "web-01-sv-gprd", "run-2")
    again = store.record_drained("gstg", "web-01-sv-gstg", "run-3", "retry")
    assert again.run_id == "run-3" and again.since == rec.since  # first drain time kept
    assert [r.host for r in store.drained("gstg")] == ["web-01-sv-gstg", "web-02-sv-gstg"]
    assert len(store.drained()) == 3
    assert store.clear_drained("gstg", "web-01-sv-gstg") is True
    assert store.clear_drained("gstg", "web-01-sv-gstg") is False
    assert [r.host for r in store.drained("gstg")] == ["web-02-sv-gstg"]


def test_host_progress(store):
    store.set_host_status("gstg-16.3.0", "gstg", "web-01", "draining", "16.3.0-ee.0")
    store.set_host_status("gstg-16.3.0", "gstg", "web-01", "done", "16.3.0-ee.0", "pids changed")
    store.set_host_status("gstg-16.3.0", "gstg", "web-02", "failed", "16.3.0-ee.0", "exit 100")
    store.set_host_status("gstg-16.4.0", "gstg", "web-01", "pending", "16.4.0-ee.0")
    st = store.host_statuses("gstg-16.3.0")
    assert {h: p.status for h, p in st.items()} == {"web-01": "done", "web-02": "failed"}
    assert st["web-01"].detail == "pids changed" and st["web-02"].version == "16.3.0-ee.0"
    with pytest.raises(InvalidInput, match="host status 'bogus'"):
        store.set_host_status("r", "gstg", "h", "bogus", "v")


def test_audit(store):
    store.audit("run-1", "gstg", "web-01", "apt-get install -y gitlab-ee=16.3.0-ee.0", 0, 1.5, "ok")
    store.audit("run-1", "gstg", "web-02", "gitlab-ctl reconfigure", 1, 0.2, "x" * 10000)
    store.audit("run-2", "gstg", "web-01", "gitlab-ctl status", None, 30.0)
    rows = store.audit_records(run_id="run-1")
    assert [(r.host, r.exit_code) for r in rows] == [("web-01", 0), ("web-02", 1)]
    assert len(rows[1].output_tail) == 4000
    assert [r.run_id for r in store.audit_records(host="web-01")] == ["run-1", "run-2"]
    assert store.audit_records(run_id="run-2")[0].exit_code is None
    assert len(store.audit_records()) == 3


def test_deployments_and_versions(store):
    assert store.current_version("gstg") is None and store.previous_version("gstg") is None
    store.record_deployment("gstg", "16.2.0-ee.0", "run-1", "deploy", "running")
    store.record_deployment("gstg", "16.2.0-ee.0", "run-1", "deploy", "success")
    assert store.current_version("gstg") == "16.2.0-ee.0" and store.previous_version("gstg") is None
    store.record_deployment("gstg", "16.3.0-ee.0", "run-2", "deploy", "success")
    store.record_deployment("gstg", "16.4.0-ee.0", "run-3", "deploy", "failed")
    assert store.current_version("gstg") == "16.3.0-ee.0"
    assert store.previous_version("gstg") == "16.2.0-ee.0"
    store.record_deployment("gstg", "16.2.0-ee.0", "run-4", "rollback", "success")
    assert store.current_version("gstg") == "16.2.0-ee.0"
    assert store.previous_version("gstg") == "16.3.0-ee.0"
    deps = store.deployments("gstg")
    assert [(d.run_id, d.status) for d in deps] == [("run-4", "success"), ("run-3", "failed"),
                                                    ("run-2", "success"), ("run-1", "success")]
    assert store.deployments("gprd") == []
    with pytest.raises(InvalidInput):
        store.record_deployment("gstg", "16.4.0; reboot", "run-5")
    with pytest.raises(InvalidInput, match="deployment status"):
        store.record_deployment("gstg", "16.4.0-ee.0", "run-5", "deploy", "great")


def test_patches_and_halts(store):
    store.record_patch("patch-1", "gprd", "run-1", "alice", hosts=["web-01", "web-02"], detail="hotfix")
    store.record_patch("patch-2", "gstg", "run-2", "bob")
    assert [p.patch_id for p in store.patches()] == ["patch-2", "patch-1"]
    assert store.patches("gprd")[0].hosts == ("web-01", "web-02")
    assert store.active_halt() is None
    h1 = store.set_halt("patch-1 applied by hand", "patch-1", "alice")
    h2 = store.set_halt("patch-2 applied by hand", "patch-2", "bob")
    assert store.active_halt().id == h2.id
    lifted = store.lift_halt("carol", "build 16.3.1-ee.0 contains patch-2", patch_id="patch-2")
    assert lifted.id == h2.id and lifted.lifted_by == "carol" and not lifted.active
    assert store.active_halt().id == h1.id
    assert store.lift_halt("carol", "all clear").id == h1.id
    assert store.active_halt() is None and store.active_halts() == []
    assert store.lift_halt("carol", "nothing to lift") is None
    assert len(store.halts()) == 2
    with pytest.raises(InvalidInput):
        store.set_halt("", None, "alice")


def test_in_memory_and_bad_urls():
    s = Store("sqlite://")
    s.acquire("gstg", "r", "w")
    assert s.get_lock("gstg").run_id == "r"
    s.close()
    with pytest.raises(StoreError, match="not a database URL"):
        Store("not a url")
    with pytest.raises(StoreError, match="cannot create tables") as err:
        Store("postgresql+psycopg2://nobody:secretpw@127.0.0.1:1/x")
    assert "secretpw" not in str(err.value)


def test_in_memory_store_serialises_threads():
    """One shared in-memory connection: concurrent writers take turns instead of colliding."""
    s = Store("sqlite://")
    n, per_thread = 8, 40
    barrier = threading.Barrier(n)
    errors: list[BaseException] = []

    def writer(i: int) -> None:
        barrier.wait()
        try:
            for j in range(per_thread):
                s.set_host_status("r1", "gstg", f"h{i}-{j}", "done", "17.5.0-ee.0", "")
        except BaseException as exc:  # collected, asserted below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(s.host_statuses("r1")) == n * per_thread
    s.close()


def test_batch_drain_records_and_statuses(store):
    assert store.record_drained_many("gprd", ["web-01", "web-02", "web-03"], "run-1", "batch 1") == 3
    assert store.record_drained_many("gprd", ["web-03"], "run-2", "again") == 1
    recs = {r.host: r for r in store.drained("gprd")}
    assert set(recs) == {"web-01", "web-02", "web-03"} and recs["web-03"].run_id == "run-2"
    assert store.clear_drained_many("gprd", ["web-01", "web-03", "nope"]) == 2
    assert [r.host for r in store.drained("gprd")] == ["web-02"]
    assert store.clear_drained_many("gprd", []) == 0
    store.set_host_statuses("gprd:v1", "gprd", [("web-01", "done", ""), ("web-02", "failed", "boom")], "v1")
    got = store.host_statuses("gprd:v1")
    assert {h: (p.status, p.detail) for h, p in got.items()} == {"web-01": ("done", ""),
                                                                  "web-02": ("failed", "boom")}
    with pytest.raises(InvalidInput):
        store.set_host_statuses("gprd:v1", "gprd", [("web-01", "done", ""), ("web-03", "bogus", "")], "v1")
    after = store.host_statuses("gprd:v1")
    assert after["web-01"].status == "done" and "web-03" not in after
    with pytest.raises(InvalidInput):
        store.record_drained_many("gprd", ["ok", "bad host;rm"], "run-1")
    assert [r.host for r in store.drained("gprd")] == ["web-02"], "bad input touches nothing"


def many_statuses(store: Store) -> dict:
    """450 hosts (more than one key-lookup chunk): 200 written first, then all 450 with one
    given twice (the last wins); drained records likewise (an environment of their own: the
    PostgreSQL test shares its database with others)."""
    hosts = [f"web-{i:03d}-sv-gprd" for i in range(450)]
    store.set_host_statuses("gmany:v2", "gmany", [(h, "draining", "batch 1") for h in hosts[:200]], "v2")
    rows = [(h, "done", f"#{i}") for i, h in enumerate(hosts)] + [(hosts[7], "failed", "up: not UP")]
    store.set_host_statuses("gmany:v2", "gmany", rows, "v2")
    store.set_host_statuses("gmany:v1", "gmany", [(hosts[0], "done", "older")], "v1")
    store.record_drained_many("gmany", hosts[:3], "run-1", "deploy")
    store.record_drained_many("gmany", hosts[1:5], "run-2", "retry")
    return {"statuses": store.host_statuses("gmany:v2"), "older": store.host_statuses("gmany:v1"),
            "drained": {r.host: r.run_id for r in store.drained("gmany")}, "hosts": hosts}


def check_many_statuses(seen: dict) -> None:
    statuses, hosts = seen["statuses"], seen["hosts"]
    assert len(statuses) == 450
    assert {h: (p.status, p.detail) for h, p in statuses.items() if h != hosts[7]} == {
        h: ("done", f"#{i}") for i, h in enumerate(hosts) if h != hosts[7]}
    assert (statuses[hosts[7]].status, statuses[hosts[7]].detail) == ("failed", "up: not UP")
    assert {h: p.detail for h, p in seen["older"].items()} == {hosts[0]: "older"}
    assert seen["drained"] == {hosts[0]: "run-1", **{h: "run-2" for h in hosts[1:5]}}


def test_many_rows_are_updated_or_inserted_in_one_write(store):
    check_many_statuses(many_statuses(store))
