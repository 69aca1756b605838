"""Benchmark: a normal and a fast rollback of production on the same lab fleet.

    python bench/rollback_speed.py                        # starts its own lab (octet 48), stops it
    python bench/rollback_speed.py --web 40 --install-seconds 1
    python bench/rollback_speed.py --lab-dir /tmp/x --keep

Each round puts a new build on gprd (fast deploy steps), then times the rollback steps the
``rollback`` DAG runs: safety check, canary drained, lock/chef/role, fleet roles, gitaly,
chef back on, recorded. ``normal``: the inventory's batches (10%) and a 60 s drain wait;
``fast``: half a role per batch, no capacity floor, a 2 s drain wait. The normal DAG then
also runs QA and the quiet period (fixed waits, not timed here). Prints both durations and
the batches per role; never a pass/fail.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "include")]

from bench.labcli import lab_cli  # noqa: E402
from lab.config import LabConfig  # noqa: E402
from lab.liftoff_env import exports  # noqa: E402

ENV = "gprd"
BASE = "17.5.0-ee.0"


def put_build(run_id: str, version: str) -> None:
    """Set-up: ``version`` on every gprd host, fast (not timed)."""
    from liftoff import deploy
    from liftoff.runs import Run

    run = Run(run_id=run_id, pipeline="bench")
    previous = run.store.current_version(ENV) or BASE
    deploy.begin_fast_deploy(run, ENV, version, "bench set-up", False, previous)
    deploy.migrate(run, ENV, version, post=False)
    for stage in ("gitaly", "fleet"):
        deploy.roll_stage(run, ENV, version, stage, "fast")
    deploy.finish_fast_deploy(run, ENV, version, "bench set-up", False)


def rollback(run_id: str, mode: str) -> dict:
    """The rollback DAG's steps, timed one by one (QA and the quiet period left out)."""
    from liftoff import canary, deploy
    from liftoff import rollback as rb
    from liftoff.runs import Run

    run = Run(run_id=run_id, pipeline="rollback")
    steps: dict[str, float] = {}
    batches: dict[str, int] = {}
    t0 = time.perf_counter()

    def timed(name: str, fn, *args):
        start = time.perf_counter()
        out = fn(*args)
        steps[name] = round(time.perf_counter() - start, 2)
        return out

    check = timed("safety_check", rb.safety_check, run, ENV)
    rb.require_safe(check)
    target = check["target"]
    timed("shield_traffic", canary.shield_for_rollback, run, ENV)
    timed("begin_rollback", rb.begin_rollback, run, ENV, target, mode, f"bench {mode}")
    for stage in ("fleet", "gitaly"):
        report = timed(f"rollback_{stage}", rb.roll, run, ENV, target, stage, mode)
        batches.update({r: len(v["batches"]) for r, v in report.get("roles", {}).items()})
    timed("restart_chef", deploy.restart_chef, run, ENV, target)
    timed("rollback_done", rb.rollback_done, run, ENV, target)
    return {"mode": mode, "target": target, "total_s": round(time.perf_counter() - t0, 2), "steps": steps,
            "batches": batches}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lab-dir", type=Path, default=Path("/tmp/liftoff-bench-rollback"))
    p.add_argument("--octet", type=int, default=48)
    p.add_argument("--web", type=int, default=20, help="gprd web hosts (api as many, git and sidekiq half)")
    p.add_argument("--gitaly", type=int, default=4)
    p.add_argument("--install-seconds", type=float, default=0.5)
    p.add_argument("--keep", action="store_true", help="leave the lab running")
    args = p.parse_args()

    fresh = not (args.lab_dir / "lab.json").exists()
    if fresh:
        half = max(1, args.web // 2)
        lab_cli(args.lab_dir, "--octet", str(args.octet), "up",
                "--install-seconds", str(args.install_seconds),
                "--hosts", f"gprd:web={args.web}", "--hosts", f"gprd:api={args.web}",
                "--hosts", f"gprd:git={half}", "--hosts", f"gprd:sidekiq={half}",
                "--hosts", f"gprd:gitaly={args.gitaly}")
    else:
        lab_cli(args.lab_dir, "up")
    config = LabConfig.load(args.lab_dir)
    os.environ.update(exports(config))
    os.environ.pop("LIFTOFF_STATE_URL", None)
    try:
        from liftoff.canary import apply_weight
        from liftoff.inventory import load_inventory
        from liftoff.runs import Run

        env = load_inventory().env(ENV)
        stamp = int(time.time())
        results = []
        for i, mode in enumerate(("normal", "fast")):
            version = f"17.{9 + i}.{stamp % 100000}-ee.0"
            lab_cli(args.lab_dir, "build", "add", version)
            put_build(f"bench-deploy-{mode}-{stamp}", version)
            results.append(rollback(f"bench-rollback-{mode}-{stamp}", mode))
            apply_weight(Run(run_id=f"bench-canary-{stamp}"), "ready", canary_env="gprd-cny", force=True)
        normal, fast = results
        print(json.dumps({"hosts": {r.name: len(r.hosts) for r in env.roles},
                          "install_seconds": config.install_seconds, "normal": normal, "fast": fast,
                          "fast_vs_normal": round(fast["total_s"] / normal["total_s"], 3)}, indent=2))
        print(f"rollback of {len(env.hosts())} gprd hosts: normal {normal['total_s']} s, "
              f"fast {fast['total_s']} s (normal then adds QA and the quiet period)")
    finally:
        if fresh and not args.keep:
            lab_cli(args.lab_dir, "down")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
