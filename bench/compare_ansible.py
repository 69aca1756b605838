"""Benchmark: the same rollout of one lab role with liftoff and with the Ansible playbook a user
would write (bench/ansible/rollout.yml: `serial: 10%`, the `community.general.haproxy` module,
as GitLab's deployer did), side by side, against the same lab, in one run.

    python bench/compare_ansible.py --hosts 100            # a lab on octet 73, both rollouts, lab down
    python bench/compare_ansible.py --hosts 100,1000       # one lab per size, one after the other
    python bench/compare_ansible.py --hosts 100 --only ansible --keep

Per host both do: drain on every LB, wait for its sessions, the same command chain on the host
(chef stop, apt-get install, reconfigure, HUP/restarts, gitlab-ctl status), back in service
on every LB, wait until every LB reports it UP; 10% of the role at a time. liftoff also inspects
each host first and checks the version and health over HTTP; the playbook does not.

ansible-core and community.general come from the `ansible` package on PyPI (ANSIBLE_PACKAGE),
installed on first use into a venv of the bench's own, `.bench/ansible` (not liftoff's .venv).
Ansible reaches the lab's hosts with OpenSSH like liftoff does (the lab's key and known_hosts;
ssh's ControlPersist multiplexing, Ansible's default) and the LBs through their Unix admin
sockets (lab/configs.py ``lb_admin_socket``), the haproxy module running on the controller
(``delegate_to`` an LB with ``ansible_connection: local``). ``forks`` is the batch size, so a
batch's hosts run at once as they do in liftoff.

Prints, per size and side: wall, ideal (batches x install), wall/ideal, the orchestrator's CPU
(liftoff: this process's; Ansible: ansible-playbook and every process under it, the forks, the
module runs and the ssh clients including the ControlPersist masters, which this process adopts
as a child subreaper and reaps), the lab's CPU (sshd + labd), and the hosts left out of service
(a server of the role not UP on some LB afterwards). Never a pass/fail: it prints figures.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "include")]

from bench.fleet_rollout import (  # noqa: E402
    ENV,
    ROLE,
    add_build,
    bench_liftoff,
    lab_cpu_s,
    point_liftoff_at,
    start_lab,
)
from bench.labcli import lab_cli  # noqa: E402
from lab import configs, processes  # noqa: E402
from lab.cli import parse_show_stat  # noqa: E402
from lab.config import LabConfig  # noqa: E402
from lab.topology import Topology  # noqa: E402
from liftoff.commands import chained_command  # noqa: E402
from liftoff.fleet import host_steps  # noqa: E402
from liftoff.inventory import Role, load_inventory  # noqa: E402

ANSIBLE_PACKAGE = "ansible==11.13.0"  # ansible-core 2.18, community.general 10.7
BENCH_DIR = REPO / ".bench"
ANSIBLE_VENV = BENCH_DIR / "ansible"
PLAYBOOK = REPO / "bench" / "ansible" / "rollout.yml"
DEFAULT_OCTET = 73
PR_SET_CHILD_SUBREAPER = 36


# -- the Ansible side: install, inventory, configuration ----------------------------------------
def ensure_ansible(venv: Path = ANSIBLE_VENV, package: str = ANSIBLE_PACKAGE) -> Path:
    """``ansible-playbook`` of the bench's venv, made and filled from PyPI on first use."""
    playbook = venv / "bin" / "ansible-playbook"
    marker = venv / ".installed"
    if playbook.exists() and marker.exists() and marker.read_text().strip() == package:
        return playbook
    print(f"installing {package} into {venv} (once)")
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", package], check=True)
    marker.write_text(package + "\n")
    return playbook


def ansible_version(venv: Path = ANSIBLE_VENV) -> str:
    out = subprocess.run([str(venv / "bin" / "ansible-playbook"), "--version"], capture_output=True,
                         text=True)
    first = out.stdout.splitlines()[0] if out.stdout else "?"
    m = re.search(r"core ([\d.]+)", first)
    return f"ansible-core {m.group(1)}" if m else first


def inventory(config: LabConfig, hosts: list[tuple[str, str]], lbs: list[tuple[str, Path]]) -> dict:
    """The role's hosts (name, address) as group ``rollout``, the LBs (name, admin socket) as group
    ``lbs`` run on the controller; SSH as the lab's user with its key and known_hosts, no PTY."""
    return {"all": {
        "vars": {
            "ansible_user": config.user,
            "ansible_port": config.ssh_port,
            "ansible_ssh_private_key_file": str(configs.client_key(config)),
            "ansible_ssh_common_args": (f"-o UserKnownHostsFile={configs.known_hosts_file(config)} "
                                        "-o StrictHostKeyChecking=yes"),
            # `raw` asks for a PTY (ssh -tt) by default; the lab's sshd refuses them (PermitTTY no)
            # and then ends the session, so no PTY, as liftoff's sessions
            "ansible_ssh_use_tty": False,
        },
        "children": {
            "rollout": {"hosts": {name: {"ansible_host": addr} for name, addr in hosts}},
            "lbs": {
                "hosts": {name: {"haproxy_socket": str(sock)} for name, sock in lbs},
                "vars": {"ansible_connection": "local",
                         "ansible_python_interpreter": "{{ ansible_playbook_python }}"},
            },
        },
    }}


def ansible_cfg(forks: int, control_path_dir: Path, local_tmp: Path) -> str:
    """ansible.cfg: forks, per-task timings (profile_tasks), pipelining; SSH left at Ansible's
    defaults (ControlMaster=auto, ControlPersist=60s) but for where the control sockets go."""
    return "\n".join([
        "[defaults]",
        f"forks = {forks}",
        "host_key_checking = True",
        "gathering = explicit",
        "retry_files_enabled = False",
        "callbacks_enabled = ansible.posix.profile_tasks",
        f"local_tmp = {local_tmp}",
        "",
        "[callback_profile_tasks]",
        "sort_order = none",
        "output_limit = all",
        "",
        "[ssh_connection]",
        "pipelining = True",  # the usual advice: one process per module run instead of four
        f"control_path_dir = {control_path_dir}",
        "",
    ])


def install_command(role: Role, version: str, reason: str) -> str:
    """The command chain liftoff runs on a drained host of ``role`` (one SSH session)."""
    return chained_command(host_steps(reason, version, role))


def extra_vars(role: Role, version: str, reason: str) -> dict:
    return {"haproxy_backend": role.name, "install_command": install_command(role, version, reason),
            "install_version": version}


# -- Ansible's output ---------------------------------------------------------------------------
_RECAP = re.compile(r"^(\S+)\s+:\s+((?:\w+=\d+\s*)+)$")
_PROFILE = re.compile(r"^(.+?) -+ (\d+(?:\.\d+)?)s$")


def parse_recap(text: str) -> dict[str, dict[str, int]]:
    """The PLAY RECAP: {host: {ok, changed, unreachable, failed, skipped, rescued, ignored}}."""
    out: dict[str, dict[str, int]] = {}
    lines = text.splitlines()
    try:
        start = max(i for i, line in enumerate(lines) if line.startswith("PLAY RECAP"))
    except ValueError:
        return out
    for line in lines[start + 1:]:
        m = _RECAP.match(line.strip())
        if not m:
            if out:
                break
            continue
        out[m.group(1)] = {k: int(v) for k, v in (kv.split("=") for kv in m.group(2).split())}
    return out


def parse_task_times(text: str) -> dict[str, float]:
    """profile_tasks' summary after the recap: {task name: seconds summed over the batches}."""
    out: dict[str, float] = {}
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("PLAY RECAP")]
    for line in lines[(starts[-1] if starts else 0):]:
        m = _PROFILE.match(line.strip())
        if m:
            out[m.group(1).strip()] = out.get(m.group(1).strip(), 0.0) + float(m.group(2))
    return out


def hosts_failed(recap: dict[str, dict[str, int]], hosts: list[str]) -> list[str]:
    """Hosts that failed, were unreachable or never ran (absent from the recap)."""
    return [h for h in hosts if h not in recap or recap[h].get("failed") or recap[h].get("unreachable")]


# -- running it ---------------------------------------------------------------------------------
def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _set_subreaper(on: bool) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def _adopted_children() -> list[int]:
    me, out = os.getpid(), []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == me:
                    out.append(int(d.name))
            except (OSError, IndexError, ValueError):
                pass
    return out


def _reap_adopted(timeout: float = 10.0) -> int:
    """End and reap what ansible-playbook left behind (ssh ControlPersist masters), so that
    their CPU counts in RUSAGE_CHILDREN; returns how many there were."""
    pids = _adopted_children()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    left = set(pids)
    while left and time.monotonic() < deadline:
        for pid in list(left):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                left.discard(pid)
        time.sleep(0.05)
    return len(pids)


@dataclass
class AnsibleRun:
    wall_s: float
    cpu_s: float
    returncode: int
    output: str
    adopted: int


def run_playbook(playbook_bin: Path, run_dir: Path, inv: dict, variables: dict, forks: int,
                 timeout: float) -> AnsibleRun:
    """ansible-playbook with its own config, inventory and vars in ``run_dir``; wall and CPU of it
    and of every process under it (this process is their subreaper for the duration)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "inventory.yml").write_text(yaml.safe_dump(inv, sort_keys=False))
    (run_dir / "vars.json").write_text(json.dumps(variables))
    cp_dir = Path(tempfile.mkdtemp(prefix="ansible-cp-"))  # ssh's control socket paths are short
    (run_dir / "ansible.cfg").write_text(ansible_cfg(forks, cp_dir, run_dir / "tmp"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
    env.update(ANSIBLE_CONFIG=str(run_dir / "ansible.cfg"), ANSIBLE_HOME=str(run_dir / "home"),
               ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0", PYTHONUNBUFFERED="1")
    env.pop("PYTHONPATH", None)
    argv = [str(playbook_bin), "-i", str(run_dir / "inventory.yml"), "-e", f"@{run_dir / 'vars.json'}",
            str(PLAYBOOK)]
    log = run_dir / "ansible.log"
    _set_subreaper(True)
    try:
        cpu0, t0 = _children_cpu(), time.perf_counter()
        with log.open("w") as out:
            proc = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=run_dir,
                                  timeout=timeout, check=False)
        wall = time.perf_counter() - t0
        adopted = _reap_adopted()
        cpu = _children_cpu() - cpu0
    finally:
        _set_subreaper(False)
        shutil.rmtree(cp_dir, ignore_errors=True)
    return AnsibleRun(wall, cpu, proc.returncode, log.read_text(), adopted)


def out_of_service(config: LabConfig, env_name: str, role: Role) -> list[str]:
    """The role's hosts that some LB of the environment does not report UP in the role's backend
    (an LB that does not answer counts every host out)."""
    names = [h.name for h in role.hosts]
    out: set[str] = set()
    lbs = [lb for lb in Topology(config).lbs if lb.tier == env_name]
    for lb in lbs:
        try:
            servers = parse_show_stat(processes.haproxy_command(lb.addr, config.lb_admin_port, "show stat"))
        except (OSError, ValueError):
            return names
        out.update(n for n in names if servers.get(n, {}).get(role.name, {}).get("status") != "UP")
    return [n for n in names if n in out]


def lb_sockets(config: LabConfig, env_name: str) -> list[tuple[str, Path]]:
    out = []
    for lb in Topology(config).lbs:
        if lb.tier == env_name:
            sock = configs.lb_admin_socket(config, lb)
            if sock is None or not sock.exists():
                raise SystemExit(f"{lb.name} has no Unix admin socket ({sock}): a lab from before it, or a "
                                 "lab directory with too long a path; start a new lab")
            out.append((lb.name, sock))
    return out


def bench_ansible(config: LabConfig, version: str, install_s: float, forks: int | None,
                  timeout: float, only_batches: int | None = None) -> dict:
    """The playbook on the role; with ``only_batches`` K, only its first K batches (of the
    full role's batch size), and wall and CPU extrapolated to every batch (``extrapolated``)."""
    env = load_inventory().env(ENV)
    role = env.role(ROLE)
    n = len(role.hosts)
    batch = max(1, n // 10)  # Ansible's serial "10%": int(10% of n), at least 1
    batches = -(-n // batch)
    ran = min(batches, only_batches or batches)
    hosts = role.hosts[:ran * batch] if ran < batches else role.hosts
    inv = inventory(config, [(h.name, h.address) for h in hosts], lb_sockets(config, ENV))
    variables = extra_vars(role, version, f"ansible rollout of {version}")
    if ran < batches:
        variables["rollout_serial"] = batch
    playbook_bin = ensure_ansible()
    lab0 = lab_cpu_s(config.lab_dir)
    run = run_playbook(playbook_bin, config.path("bench-ansible"), inv, variables, forks or batch, timeout)
    lab1 = lab_cpu_s(config.lab_dir)
    recap = parse_recap(run.output)
    failed = hosts_failed(recap, [h.name for h in hosts])
    tasks = parse_task_times(run.output)
    scale = batches / ran
    wall, cpu, ideal = run.wall_s * scale, run.cpu_s * scale, batches * install_s
    return {
        "hosts": n, "batch_size": batch, "batches": batches, "batches_run": ran, "forks": forks or batch,
        "extrapolated": ran < batches, "returncode": run.returncode, "hosts_failed": len(failed),
        "measured_wall_s": round(run.wall_s, 2), "measured_cpu_s": round(run.cpu_s, 2),
        "wall_s": round(wall, 2), "ideal_s": round(ideal, 2),
        "ratio": round(wall / ideal, 3) if ideal else None, "cpu_s": round(cpu, 2),
        "cpu_ms_per_host": round(1000 * cpu / n, 1),
        "overhead_per_batch_s": round((wall - ideal) / batches, 3),
        "lab_cpu_s": {k: round((lab1[k] - lab0[k]) * scale, 1) for k in lab0},
        "mean_task_s_per_batch": {k: round(v / ran, 3) for k, v in tasks.items()},
        "ssh_masters_reaped": run.adopted, "loadavg_1m_after": round(os.getloadavg()[0], 2),
        "log": str(config.path("bench-ansible", "ansible.log")),
        "failed": failed[:5],
    }


# -- the table ----------------------------------------------------------------------------------
COLUMNS = ("hosts", "orchestrator", "wall", "ideal", "wall/ideal", "orchestrator CPU", "lab CPU",
           "out of service", "failed")


def table_row(size: int, who: str, r: dict) -> tuple[str, ...]:
    lab = r.get("lab_cpu_s") or {}
    return (f"{size:,}", who, f"{r['wall_s']:.1f} s", f"{r['ideal_s']:g} s",
            f"{r['ratio']:.2f}" if r.get("ratio") is not None else "-",
            f"{r['cpu_s']:.1f} s ({r['cpu_ms_per_host']:g} ms/host)",
            f"{sum(lab.values()):.1f} s" if lab else "-",
            str(r["out_of_service"]), str(r["failed_count"]))


def format_table(rows: list[tuple[str, ...]], columns: tuple[str, ...] = COLUMNS) -> str:
    """Columns padded to their widest cell, numbers right-aligned."""
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]

    def line(cells: tuple[str, ...]) -> str:
        out = []
        for i, cell in enumerate(cells):
            right = i != 1 and cell[:1].isdigit()
            out.append(cell.rjust(widths[i]) if right else cell.ljust(widths[i]))
        return "  ".join(out).rstrip()

    return "\n".join([line(columns), line(tuple("-" * w for w in widths)), *(line(r) for r in rows)])


# -- main -----------------------------------------------------------------------------------------
def parse_sizes(text: str) -> list[int]:
    sizes = [int(s.replace("_", "")) for s in text.split(",") if s.strip()]
    if not sizes or any(s < 10 for s in sizes):
        raise argparse.ArgumentTypeError(f"--hosts: sizes of at least 10, comma-separated; got {text!r}")
    return sizes


def parse_batches(text: str) -> dict[int, int]:
    """``1000:2,5000:1`` -> {1000: 2, 5000: 1}."""
    try:
        pairs = [part.split(":") for part in text.split(",") if part.strip()]
        out = {int(size.replace("_", "")): int(k) for size, k in pairs}
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ansible-batches: SIZE:K,...; got {text!r}") from None
    if any(k < 1 for k in out.values()):
        raise argparse.ArgumentTypeError(f"--ansible-batches: K of at least 1; got {text!r}")
    return out


def compare(size: int, args: argparse.Namespace) -> list[tuple[str, ...]]:
    lab_dir = args.lab_dir or Path(f"/tmp/liftoff-bench-ansible-{size}")
    started = start_lab(lab_dir, size, args.install_seconds, args.octet, args.keep)
    rows = []
    try:
        config = point_liftoff_at(lab_dir)
        role = load_inventory().env(ENV).role(ROLE)
        time.sleep(2)  # let HAProxy's first health checks pass
        sides = [s for s in ("liftoff", "ansible") if args.only in (None, s)]
        for i, side in enumerate(sides):
            version = add_build(lab_dir, tag=i)
            print(f"\n{side}: {size} hosts to {version}")
            if side == "liftoff":
                r = bench_liftoff(config, version, args.install_seconds)
                r["failed_count"] = r["counts"].get("failed", 0)
            else:
                r = bench_ansible(config, version, args.install_seconds, args.forks, args.timeout,
                                  args.ansible_batches.get(size))
                r["failed_count"] = r["hosts_failed"]
            r["out_of_service"] = len(out_of_service(config, ENV, role))
            for k, v in r.items():
                print(f"  {k:24} {v}")
            who = "liftoff" if side == "liftoff" else f"ansible ({ansible_version()})"
            if r.get("extrapolated"):
                who += f", {r['batches_run']} of {r['batches']} batches run"
            rows.append(table_row(size, who, r))
    finally:
        if started and not args.keep:
            lab_cli(lab_dir, "down")
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hosts", type=parse_sizes, default=[100], help="sizes, e.g. 100,1000")
    p.add_argument("--install-seconds", type=float, default=2.0)
    p.add_argument("--octet", type=int, default=DEFAULT_OCTET)
    p.add_argument("--lab-dir", type=Path, help="with one size only")
    p.add_argument("--keep", action="store_true", help="leave the lab running (and reuse one there)")
    p.add_argument("--only", choices=("liftoff", "ansible"))
    p.add_argument("--forks", type=int, help="Ansible's forks (default: the batch size)")
    p.add_argument("--timeout", type=float, default=3600.0, help="for one ansible-playbook run")
    p.add_argument("--ansible-batches", type=parse_batches, default={}, metavar="SIZE:K,...",
                   help="run only the first K batches of Ansible's rollout at SIZE hosts and extrapolate "
                        "wall and CPU to every batch, e.g. 1000:2")
    args = p.parse_args()
    if args.lab_dir and len(args.hosts) > 1:
        p.error("--lab-dir takes one size")
    ensure_ansible()
    rows: list[tuple[str, ...]] = []
    for size in args.hosts:
        rows += compare(size, args)
    print(f"\n{os.cpu_count()} cores, load (1 min) {os.getloadavg()[0]:.1f} after the last run\n")
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
