"""Benchmark: roll one lab role of N hosts in 10% batches with liftoff.fleet, and compare with
the naive Airflow way (one mapped SSHOperator task instance per host and step).

    python bench/fleet_rollout.py --hosts 100            # starts its own lab (octet 59), rolls, stops it
    python bench/fleet_rollout.py --hosts 1000 --install-seconds 2
    python bench/fleet_rollout.py --lab-dir /tmp/x --keep  # reuse / keep a lab
    python bench/fleet_rollout.py --mode both --no-naive   # lockstep, then the sliding window

``--mode``: ``lockstep`` (default), ``window`` (``RolloutOptions.rollout_mode``: at most a
batch's worth of hosts out at once, the next drained as soon as one is back) or ``both`` (one
rollout each, a new build each). Prints wall time, the ideal (batches x install time; the same
for a window: the role's hosts / batch size, rounded up), their ratio, the orchestrator's CPU
seconds and peak memory (getrusage of this process), and the per-host overhead. The naive
way is measured on a few hosts (a task process start with the SSH provider imported, plus
one paramiko SSHHook connection + command per task, as SSHOperator does) and extrapolated.
Never a pass/fail: it prints figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "include")]

from bench.labcli import lab_cli  # noqa: E402
from lab.config import LabConfig  # noqa: E402
from lab.liftoff_env import exports  # noqa: E402
from liftoff.fleet import RolloutOptions, rollout  # noqa: E402
from liftoff.inventory import load_inventory  # noqa: E402
from liftoff.store import Store  # noqa: E402

ENV, ROLE = "gprd", "web"
STEPS_PER_HOST = 9  # dpkg, chef stop, install, reconfigure, hup puma, restart x2, status x2


def quiet_login_shell(lab_dir: Path) -> bool:
    """Stop bash from sourcing ~/.bashrc for every SSH command of this bench's lab.

    bash sources ~/.bashrc when sshd starts it (SSH_CLIENT set, SHLVL < 2); on a machine
    whose ~/.bashrc runs e.g. ``pyenv init`` that costs ~100 ms of CPU per command, which
    measures the machine, not liftoff. ``SetEnv SHLVL=1`` in the lab's generated sshd_config
    (this lab only) turns it off; returns whether it was applied."""
    cfg = lab_dir / "ssh" / "sshd_config"
    text = cfg.read_text()
    if "SetEnv SHLVL" in text:
        return False
    cfg.write_text(text.replace("ForceCommand", "SetEnv SHLVL=1\nForceCommand", 1))
    pid = int((lab_dir / "run" / "sshd.pid").read_text())
    os.kill(pid, signal.SIGHUP)
    time.sleep(1.0)
    return True


def lab_cpu_s(lab_dir: Path) -> dict[str, float]:
    """CPU seconds the lab's processes used so far (sshd counts its exited children)."""
    out = {}
    tick = os.sysconf("SC_CLK_TCK")
    for name in ("sshd", "labd"):
        try:
            pid = int((lab_dir / "run" / f"{name}.pid").read_text())
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            out[name] = sum(int(x) for x in fields[11:15]) / tick
        except (OSError, ValueError):
            out[name] = float("nan")
    return out


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def mean_phases(phases: list[dict[str, float]]) -> dict[str, float]:
    keys = [k for p in phases for k in p]
    return {k: round(sum(p.get(k, 0.0) for p in phases) / len(phases), 3) for k in dict.fromkeys(keys)}


def bench_liftoff(config: LabConfig, version: str, install_s: float, profile: Path | None = None,
                  mode: str = "lockstep") -> dict:
    env = load_inventory().env(ENV)
    role = env.role(ROLE)
    n = len(role.hosts)
    batches = -(-n // role.batch_size())
    store = Store(f"sqlite:///{config.path('bench-state.db')}")
    options = RolloutOptions(drain_timeout=30, up_timeout=120, health_timeout=60, rollout_mode=mode)
    lab0 = lab_cpu_s(config.lab_dir)
    profiler = None
    if profile:
        import cProfile

        profiler = cProfile.Profile(time.process_time)  # CPU, not wall: what the goal counts
        profiler.enable()
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    report = asyncio.run(rollout(env, version, run_id=f"bench-{int(time.time())}", store=store, roles=[ROLE],
                                 options=options))
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    user, system = r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime
    cpu = user + system
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(str(profile))
    lab1 = lab_cpu_s(config.lab_dir)
    lab_cpu = {k: round(lab1[k] - lab0[k], 1) for k in lab0}
    load = os.getloadavg()[0]
    ideal = batches * install_s
    durations = report.roles[ROLE].batch_durations
    audit_rows = len(store.audit_records(run_id=report.run_id))
    return {
        "mode": mode, "hosts": n, "batch_size": role.batch_size(), "batches": batches,
        "groups": len(report.roles[ROLE].batches), "status": report.status,
        "counts": report.counts(), "wall_s": round(wall, 2), "ideal_s": round(ideal, 2),
        "ratio": round(wall / ideal, 3) if ideal else None, "cpu_s": round(cpu, 2),
        "cpu_ms_per_host": round(1000 * cpu / n, 1),
        # user: Python (liftoff, asyncssh); system: the kernel, mostly loopback TCP to the lab
        "cpu_user_sys_ms_per_host": [round(1000 * user / n, 1), round(1000 * system / n, 1)],
        "peak_rss_mb": round(rss_mb(), 1),
        "overhead_per_batch_s": round((wall - ideal) / batches, 3),
        "overhead_per_host_s": round((wall - ideal) / n, 4),
        "batch_s_min_max": [min(durations), max(durations)] if durations else [],
        "audit_rows": audit_rows,
        "lab_cpu_s": lab_cpu, "cores": os.cpu_count(), "loadavg_1m_after": round(load, 2),
        "mean_phase_s": mean_phases(report.roles[ROLE].batch_phases),
        "failed": dict(list(report.failed_hosts.items())[:5]),
    }


NAIVE_TASK = """
import time, json, sys
t0 = time.perf_counter()
from airflow.providers.ssh.hooks.ssh import SSHHook
from airflow.providers.ssh.operators.ssh import SSHOperator  # noqa: F401  what a task process imports
t1 = time.perf_counter()
hook = SSHHook(ssh_conn_id="liftoff_ssh", remote_host=sys.argv[1], cmd_timeout=600)
with hook.get_conn() as client:
    code, out, err = hook.exec_ssh_client_command(client, "dpkg-query -W -f='${Version}' gitlab-ee",
                                                  get_pty=False, environment=None)
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "ssh_s": t2 - t1, "code": code}))
"""


def bench_naive(config: LabConfig, hosts: list, install_s: float, samples: int) -> dict:
    """One task process per (host, step): measure a few, extrapolate to the role."""
    # the sync SSHHook (paramiko) ignores extra.known_hosts: give it the lab's host key instead
    conn = json.loads(os.environ["AIRFLOW_CONN_LIFTOFF_SSH"])
    key = Path(conn["extra"]["known_hosts"]).read_text().split("\n", 1)[0].split()[1:3]
    conn["extra"] = {"key_file": conn["extra"]["key_file"], "host_key": " ".join(key)}
    task_env = dict(os.environ, AIRFLOW_CONN_LIFTOFF_SSH=json.dumps(conn))
    runs = []
    for h in hosts[:samples]:
        cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", NAIVE_TASK, h.address], capture_output=True, text=True,
                             timeout=300, env=task_env)
        wall = time.perf_counter() - t0
        cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        if out.returncode != 0:
            return {"error": out.stderr.strip().splitlines()[-1:]}
        data = json.loads(out.stdout.strip().splitlines()[-1])
        data.update(wall_s=wall, cpu_s=(cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime))
        runs.append(data)
    per_ti_wall = sum(r["wall_s"] for r in runs) / len(runs)
    per_ti_cpu = sum(r["cpu_s"] for r in runs) / len(runs)
    n = len(hosts)
    tis = n * STEPS_PER_HOST
    parallelism = 32  # Airflow's default core.parallelism (and LocalExecutor slots)
    cores = os.cpu_count() or 1
    # lower bounds: no scheduler loop, no DB writes, no supervisor/API round trips per TI
    wall_by_slots = (tis / parallelism) * per_ti_wall + (n / parallelism) * install_s
    wall_by_cpu = tis * per_ti_cpu / cores
    return {
        "samples": len(runs), "per_task_wall_s": round(per_ti_wall, 2),
        "per_task_cpu_s": round(per_ti_cpu, 2),
        "import_s": round(sum(r["import_s"] for r in runs) / len(runs), 2),
        "ssh_connect_and_run_s": round(sum(r["ssh_s"] for r in runs) / len(runs), 3),
        "task_instances": tis, "estimated_wall_s_lower_bound": round(max(wall_by_slots, wall_by_cpu), 1),
        "estimated_cpu_s": round(tis * per_ti_cpu, 1),
        "note": (f"{STEPS_PER_HOST} mapped SSHOperator TIs per host (one per step), parallelism "
                 f"{parallelism}, {cores} cores; core.max_map_length (1024) caps one mapped task at 1024 "
                 "hosts; LB drain on every LB, batches, capacity floor and stop-after-failed-batch need "
                 "extra task groups per batch"),
    }


def start_lab(lab_dir: Path, hosts: int, install_s: float, octet: int, keep: bool = False) -> bool:
    """Start a lab of ``hosts`` gprd web hosts in ``lab_dir`` (unless ``keep`` and one is there);
    returns whether this call started it (then the caller stops it)."""
    if (lab_dir / "lab.json").exists() and keep:
        return False
    print(f"starting a lab: {hosts} {ENV} {ROLE} hosts, install {install_s}s ({lab_dir})")
    t0 = time.perf_counter()
    lab_cli(lab_dir, "--octet", str(octet), "up", "--hosts", f"{ENV}:{ROLE}={hosts}",
            "--install-seconds", str(install_s), "--traffic-rps", "2")
    print(f"  lab up in {time.perf_counter() - t0:.1f}s")
    return True


def point_liftoff_at(lab_dir: Path, *, as_is: bool = False, app_port: bool = True) -> LabConfig:
    """Set this process's environment as an Airflow worker's for the lab (connections, inventory
    with ``app_port`` unless told not to), import what a worker has loaded already, and quiet the
    lab's login shell (:func:`quiet_login_shell`) unless ``as_is``."""
    config = LabConfig.load(lab_dir)
    # what an Airflow worker has loaded already: not part of the rollout's time
    import airflow.providers.ssh.hooks.ssh  # noqa: F401
    import asyncssh  # noqa: F401
    if not as_is and quiet_login_shell(lab_dir):
        print("  lab sshd: SetEnv SHLVL=1 (bash no longer sources ~/.bashrc per command; --as-is to keep it)")
    for k, v in exports(config).items():
        os.environ[k] = v
    if app_port:  # the inventory field liftoff reads for HTTP version/health checks
        data = yaml.safe_load(Path(os.environ["LIFTOFF_INVENTORY"]).read_text())
        data["environments"][ENV].setdefault("extra", {})["app_port"] = config.app_port
        inventory = lab_dir / "bench-inventory.yaml"
        inventory.write_text(yaml.safe_dump(data, sort_keys=False))
        os.environ["LIFTOFF_INVENTORY"] = str(inventory)
    return config


def add_build(lab_dir: Path, tag: int = 0) -> str:
    """A new build in the lab's catalog (a version no host has yet); returns its version."""
    version = f"17.9.{int(time.time()) % 100000 + tag}-ee.0"
    lab_cli(lab_dir, "build", "add", version)
    return version


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hosts", type=int, default=100)
    p.add_argument("--install-seconds", type=float, default=2.0)
    p.add_argument("--octet", type=int, default=59)
    p.add_argument("--mode", choices=("lockstep", "window", "both"), default="lockstep",
                   help="the rollout's rollout_mode (both: lockstep, then window, a build each)")
    p.add_argument("--lab-dir", type=Path)
    p.add_argument("--keep", action="store_true", help="leave the lab running")
    p.add_argument("--naive-samples", type=int, default=5)
    p.add_argument("--no-naive", action="store_true")
    p.add_argument("--profile", type=Path, help="write a cProfile of the rollout here")
    p.add_argument("--no-app-port", action="store_true", help="verify with dpkg over SSH instead of HTTP")
    p.add_argument("--as-is", action="store_true",
                   help="keep the login shell's ~/.bashrc on every SSH command (see quiet_login_shell)")
    args = p.parse_args()
    lab_dir = args.lab_dir or Path(f"/tmp/engb-bench-{args.hosts}")
    started = start_lab(lab_dir, args.hosts, args.install_seconds, args.octet, args.keep)
    try:
        config = point_liftoff_at(lab_dir, as_is=args.as_is, app_port=not args.no_app_port)
        time.sleep(2)  # let HAProxy's first health checks pass
        modes = ("lockstep", "window") if args.mode == "both" else (args.mode,)
        for i, mode in enumerate(modes):
            version = add_build(lab_dir, tag=i)
            result = bench_liftoff(config, version, args.install_seconds, args.profile, mode=mode)
            print(f"\nliftoff.fleet, {mode} (one asyncio fan-out in one task):")
            for k, v in result.items():
                print(f"  {k:24} {v}")
        if not args.no_naive:
            hosts = load_inventory().env(ENV).role(ROLE).hosts
            naive = bench_naive(config, list(hosts), args.install_seconds, args.naive_samples)
            print("\nnaive Airflow (one mapped SSHOperator task instance per host and step), estimated:")
            for k, v in naive.items():
                print(f"  {k:30} {v}")
            if "estimated_wall_s_lower_bound" in naive:
                factor = naive["estimated_wall_s_lower_bound"] / result["wall_s"]
                print(f"\n  => naive / liftoff wall: >= {factor:.1f}x")
    finally:
        if started and not args.keep:
            lab_cli(lab_dir, "down")
    return 0


if __name__ == "__main__":
    sys.exit(main())
