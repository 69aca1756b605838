"""`make demo`: a new nightly build through deploy_canary then deploy_production on the lab.

Runs both DAGs in-process with ``dag.test()`` against the running lab (``python -m lab up``)
and prints what changed: versions per environment, stage durations, the result.
"""

from __future__ import annotations

import os
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "include"), str(ROOT / "plugins")]

from lab import processes  # noqa: E402
from lab.cli import collect_status  # noqa: E402
from lab.config import LabConfig  # noqa: E402
from lab.liftoff_env import exports  # noqa: E402


def new_nightly(config: LabConfig) -> str:
    """A nightly build newer than any in the catalog."""
    stamp = int(time.time())
    version = f"17.8.0+rnightly.{stamp}.{stamp:08x}-0"
    processes.control(config, "POST", "/builds", {"version": version, "nightly": True})
    return version


def stage_durations(dag_run) -> list[tuple[str, float, str]]:
    groups: dict[str, list] = {}
    for ti in dag_run.get_task_instances():
        if "." in ti.task_id and ti.start_date and ti.end_date:
            groups.setdefault(ti.task_id.split(".")[0], []).append(ti)
    rows = []
    for group, tis in sorted(groups.items()):
        start = min(t.start_date for t in tis)
        end = max(t.end_date for t in tis)
        state = "failed" if any(t.state == "failed" for t in tis) else "ok"
        rows.append((group, (end - start).total_seconds(), state))
    return rows


def summary(config: LabConfig) -> None:
    status = collect_status(config)
    print("\nversions per environment (hosts):")
    for env, data in status["environments"].items():
        counts = Counter(h["running"] for h in data["hosts"])
        print(f"  {env:9} " + ", ".join(f"{v} x{n}" for v, n in counts.most_common()))
    print(f"active alerts: {len(status.get('alerts') or [])}")


def main() -> int:
    config = LabConfig.load()
    os.environ.update(exports(config))
    quiet = int(os.environ.get("LIFTOFF_DEMO_QUIET_SECONDS", "10"))
    from airflow.dag_processing.dagbag import DagBag

    dags = DagBag(dag_folder=str(ROOT / "dags")).dags
    version = new_nightly(config)
    print(f"liftoff demo: deploying nightly {version} (quiet periods of {quiet}s)")
    ok = True
    for dag_id in ("deploy_canary", "deploy_production"):
        started = time.time()
        dag_run = dags[dag_id].test(run_conf={"version": version, "quiet_period_seconds": quiet})
        print(f"\n{dag_id}: {dag_run.state} in {time.time() - started:.0f}s")
        for group, seconds, state in stage_durations(dag_run):
            print(f"  {group:40} {seconds:6.1f}s  {state}")
        if dag_run.state != "success":
            ok = False
            break
    summary(config)
    print(f"\nresult: {'deployed ' + version + ' everywhere' if ok else 'FAILED (see the task logs above)'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
