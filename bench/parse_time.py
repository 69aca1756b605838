"""Benchmark: how long each DAG file in dags/ takes to parse.

    source scripts/env.sh && python bench/parse_time.py             # every file, 5 warm rounds
    python bench/parse_time.py --rounds 20 deploy_canary.py rollback.py

Per file, two figures:

* ``first``: a fresh Python process with Airflow already imported parses the file once, so
  the file's own imports (liftoff, the inventory) count, as on a dag-processor's first parse;
* ``warm``: the same file parsed again ``--rounds`` times in this process, everything
  imported (min and median), as on each later re-parse.

Airflow's default ``[dag_processor] dag_file_processor_timeout`` is 50 s and the files here
are meant to parse well under a second. Prints figures; never a pass/fail.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DAGS = REPO / "dags"

_FIRST = """
import json, sys, time
from airflow.dag_processing.dagbag import DagBag
started = time.perf_counter()
bag = DagBag(dag_folder=sys.argv[1])
elapsed = time.perf_counter() - started
print(json.dumps({"s": elapsed, "dags": sorted(bag.dag_ids), "errors": sorted(bag.import_errors)}))
"""


def environment() -> dict[str, str]:
    """This checkout's paths, and an Airflow home of its own unless one is set."""
    env = dict(os.environ)
    paths = [str(REPO / "include"), str(REPO / "plugins"), str(REPO)]
    env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in [env.get("PYTHONPATH")] if p])
    env.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="liftoff-parse-time-"))
    env.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    env.setdefault("AIRFLOW__CORE__DAGS_FOLDER", str(DAGS))
    env.setdefault("AIRFLOW__CORE__PLUGINS_FOLDER", str(REPO / "plugins"))
    return env


def first_parse(path: Path, env: dict[str, str]) -> dict:
    out = subprocess.run([sys.executable, "-c", _FIRST, str(path)], env=env, capture_output=True,
                         text=True, timeout=300)
    if out.returncode != 0:
        return {"s": float("nan"), "dags": [], "errors": [out.stderr.strip().splitlines()[-1:]]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def warm_parses(path: Path, rounds: int) -> list[float]:
    from airflow.dag_processing.dagbag import DagBag

    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        DagBag(dag_folder=str(path))
        times.append(time.perf_counter() - started)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="*", help="file names in dags/ (default: all)")
    parser.add_argument("--rounds", type=int, default=5, help="warm parses per file (default 5)")
    args = parser.parse_args(argv)

    env = environment()
    os.environ.update({k: v for k, v in env.items() if k.startswith("AIRFLOW")})
    sys.path[:0] = env["PYTHONPATH"].split(os.pathsep)
    paths = [DAGS / f for f in args.files] if args.files else sorted(DAGS.glob("*.py"))

    from airflow.dag_processing.dagbag import DagBag

    DagBag(dag_folder=str(DAGS))  # warm-up: every import done once

    print(f"{'file':<24} {'first s':>8} {'warm min s':>11} {'warm med s':>11}  dags / import errors")
    total_first = 0.0
    for path in paths:
        first = first_parse(path, env)
        warm = warm_parses(path, max(1, args.rounds))
        total_first += first["s"]
        note = ", ".join(first["dags"]) + (f"  ERRORS: {first['errors']}" if first["errors"] else "")
        print(f"{path.name:<24} {first['s']:>8.3f} {min(warm):>11.3f} {statistics.median(warm):>11.3f}"
              f"  {note}")
    print(f"{'all files, first parse':<24} {total_first:>8.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
