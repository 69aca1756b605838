"""Benchmark: ``GET /liftoff/api/fleet`` of a 1,000-host lab, timed over N requests.

    python bench/fleet_view.py                       # starts its own lab (octet 60, --scale 1000), stops it
    python bench/fleet_view.py --requests 200
    python bench/fleet_view.py --lab-dir /tmp/x --keep  # reuse / keep a lab

The JSON is computed through the plugin's FastAPI app as the api-server mounts it (Airflow's
init_plugins, a JWT signed as the api-server signs, Airflow's token check), with the lab's real
HAProxy LBs and a state store holding a baseline deployment, a running deploy half way through
gprd's web role and a few drained hosts. Airflow's runs and approvals are a fixed list (no
metadata DB here). Prints median and p95 ms of: the app as served (LB reads shared for
fleet_api.LB_CACHE_S seconds), the app with every request reading every LB, and
liftoff.fleetview.view alone. Never a pass/fail: the goal is a median under 200 ms.
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "include"), str(REPO / "plugins")]
_home = tempfile.mkdtemp(prefix="liftoff-bench-airflow-")
os.environ["AIRFLOW_HOME"] = _home  # Airflow of its own: never the checkout's .airflow/
os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = f"sqlite:///{_home}/airflow.db"
os.environ["AIRFLOW__API_AUTH__JWT_SECRET"] = JWT_SECRET = secrets.token_urlsafe(64)

from bench.labcli import lab_cli  # noqa: E402
from lab.config import LabConfig  # noqa: E402
from lab.liftoff_env import exports  # noqa: E402

RUN = "deploy_production__bench_2026-12-03T10:00:00+00:00"
V_OLD, V_NEW = "17.8.0-ee.0", "17.8.1-ee.0"


def seed(store, inventory) -> dict[str, int]:
    """A baseline, a deploy running on gprd's web role (half done, one batch installing), and
    a few drained hosts with their records."""
    from liftoff.fleet import make_batches

    for env in inventory.environments:
        store.record_deployment(env, V_OLD, "baseline", status="success")
    store.record_deployment("gprd", V_NEW, RUN)
    web = inventory.env("gprd").role("web")
    batches = make_batches(list(web.hosts), web.batch_size())
    half = len(batches) // 2
    for batch in batches[:half]:
        store.set_host_statuses(f"gprd:{V_NEW}", "gprd", [(h.name, "done", "") for h in batch], V_NEW)
        time.sleep(0.01)
    installing = batches[half]
    store.set_host_statuses(f"gprd:{V_NEW}", "gprd", [(h.name, "installing", f"batch {half + 1}")
                                                     for h in installing], V_NEW)
    store.record_drained_many("gprd", [h.name for h in installing], RUN, f"liftoff deploy {V_NEW}")
    return {"web_hosts": len(web.hosts), "batches": len(batches), "done_batches": half}


def client():
    """A TestClient on the app as the api-server mounts it, and the headers of a viewer."""
    from airflow import settings
    from airflow.api_fastapi import app as api_app
    from airflow.api_fastapi.auth.tokens import JWTGenerator
    from airflow.models.revoked_token import RevokedToken
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from liftoff_plugin import LiftoffPlugin

    api_app.create_auth_manager()
    RevokedToken.__table__.create(settings.engine, checkfirst=True)
    import airflow.plugins_manager as pm

    pm.get_fastapi_plugins = lambda: (LiftoffPlugin.fastapi_apps, [])
    root = FastAPI()
    api_app.init_plugins(root)
    tok = JWTGenerator(secret_key=JWT_SECRET, valid_for=3600, audience="apache-airflow").generate(
        {"sub": "bench", "role": "viewer"})
    return TestClient(root), {"Authorization": f"Bearer {tok}"}


def timed(n: int, fn: Callable[[], object]) -> dict[str, float]:
    fn()  # warm
    ms = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ms.append((time.perf_counter() - t) * 1000)
    ms.sort()
    return {"median": statistics.median(ms), "p95": ms[max(0, int(len(ms) * 0.95) - 1)], "max": ms[-1]}


def bench(config: LabConfig, n: int) -> None:
    for k, v in exports(config).items():
        os.environ[k] = v
    from liftoff import fleetview
    from liftoff.inventory import load_inventory
    from liftoff.store import Store
    from liftoff_airflow import fleet_api

    inventory = load_inventory()
    store = Store(f"sqlite:///{tempfile.mkdtemp(prefix='liftoff-bench-state-')}/state.db")
    facts = seed(store, inventory)
    runs = [{"dag_id": "deploy_production", "run_id": RUN, "state": "running", "note": "deploying",
             "stages": [{"name": "stage_8_production_fleet", "state": "running",
                         "task_id": "stage_8_production_fleet.deploy", "tasks": 3}]}]
    records = {"runs": runs, "approvals": [], "internal": set()}
    fleet_api.app.dependency_overrides.update({fleet_api.sources: lambda: (inventory, store),
                                               fleet_api.airflow_records: lambda: records})
    api, headers = client()
    hosts = sum(len(e.hosts()) for e in inventory.environments.values())
    resp = api.get("/liftoff/api/fleet", headers=headers)
    assert resp.status_code == 200, resp.text
    lbs = [lb["name"] for lb in resp.json()["environments"]["gprd"]["load_balancers"]]
    print(f"{hosts} hosts in {len(inventory.environments)} environments; gprd web: {facts}; "
          f"JSON {len(resp.content) / 1024:.1f} KiB; gprd LBs {lbs}")

    def served() -> None:
        assert api.get("/liftoff/api/fleet", headers=headers).status_code == 200

    def uncached() -> None:
        fleet_api.read_lbs_cached.clear()
        served()

    rows = [(f"app, as served (LB reads shared for {fleet_api.LB_CACHE_S:.0f} s)", timed(n, served)),
            ("app, every request reads every LB", timed(n, uncached)),
            ("fleetview.view alone, reading every LB",
             timed(n, lambda: fleetview.view(inventory, store, runs=runs, pressure=False))),
            ("fleetview.view alone, no LB read",
             timed(n, lambda: fleetview.view(inventory, store, lbs=False)))]
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"  (load average {load} on {os.cpu_count()} CPUs while measuring)")
    for name, r in rows:
        print(f"  {name:<48} median {r['median']:7.1f} ms   p95 {r['p95']:7.1f} ms   max {r['max']:7.1f} ms")
    store.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", type=int, default=1000)
    p.add_argument("--octet", type=int, default=60)
    p.add_argument("--requests", type=int, default=50)
    p.add_argument("--lab-dir", type=Path)
    p.add_argument("--keep", action="store_true", help="leave the lab running")
    args = p.parse_args()
    lab_dir = args.lab_dir or Path(tempfile.mkdtemp(prefix="liftoff-bench-lab-"))
    started_here = not (lab_dir / "lab.json").exists()
    if started_here:
        t = time.monotonic()
        lab_cli(lab_dir, "--octet", str(args.octet), "up", "--scale", str(args.scale), "--traffic-rps", "1")
        print(f"lab up (--scale {args.scale}) in {time.monotonic() - t:.0f} s")
    try:
        bench(LabConfig.load(lab_dir), args.requests)
    finally:
        if started_here and not args.keep:
            lab_cli(lab_dir, "down")


if __name__ == "__main__":
    main()
