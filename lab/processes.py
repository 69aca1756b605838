"""Start, wait for and stop the lab's processes.

Every process runs detached in its own session, logs to ``<lab>/log/<name>.log`` and has
its pid in ``<lab>/run/<name>.pid``; each carries the lab directory in its command line,
which is how ``down`` proves that nothing of this lab is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from lab import configs
from lab.config import REPO_ROOT, LabConfig
from lab.topology import LoadBalancer, Topology


class LabError(RuntimeError):
    """The lab could not be started or stopped; the message says why."""


@dataclass
class Proc:
    name: str
    argv: list[str]
    ready: Callable[[], bool]
    timeout: float = 30.0
    # stdout/stderr file under log/ (labd keeps log/labd.log itself)
    output: str = ""

    @property
    def output_log(self) -> str:
        return self.output or f"{self.name}.log"


# -- probes --------------------------------------------------------------------------------
def tcp_answers(host: str, port: int, banner: bytes | None = None, timeout: float = 1.0) -> bool:
    """A TCP connect succeeds (and the server greets with ``banner``, if given)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            if banner is None:
                return True
            s.settimeout(timeout)
            ok = s.recv(len(banner)) == banner
            if ok and banner.startswith(b"SSH-"):
                s.sendall(b"SSH-2.0-lab-probe\r\n")  # a polite client: sshd logs no error
            return ok
    except OSError:
        return False


def http_ok(url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return 200 <= resp.status < 300
    except (OSError, urllib.error.URLError, ValueError):
        return False


def haproxy_command(addr: str, port: int, command: str, timeout: float = 5.0) -> str:
    """One command on an HAProxy runtime API (TCP socket, non-interactive mode)."""
    with socket.create_connection((addr, port), timeout=timeout) as s:
        s.settimeout(timeout)
        s.sendall(command.encode() + b"\n")
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode()


def haproxy_answers(addr: str, port: int) -> bool:
    try:
        return "Name: HAProxy" in haproxy_command(addr, port, "show info", timeout=1.0)
    except OSError:
        return False


# -- process table ---------------------------------------------------------------------------
def lab_processes(config: LabConfig) -> list[Proc]:
    """The lab's processes in start order."""
    topology = Topology(config)
    d = str(config.lab_dir)
    procs = [
        Proc(
            "labd",
            [sys.executable, "-m", "lab.daemon", "--lab-dir", d],
            lambda: http_ok(f"http://{config.control_addr}:{config.control_port}/health"),
            timeout=60.0 + topology.size / 20,
            output="labd.stderr.log",
        ),
        Proc(
            "sshd",
            [configs.SSHD, "-D", "-e", *configs.sshd_flags(), "-f", str(configs.sshd_config_file(config))],
            lambda: tcp_answers(config.control_addr, config.ssh_port, banner=b"SSH-"),
        ),
    ]
    for lb in topology.lbs:
        procs.append(Proc(
            f"haproxy-{lb.name}",
            ["/usr/sbin/haproxy", "-db", "-f", str(configs.haproxy_config_file(config, lb))],
            _lb_ready(config, lb),
        ))
    procs += [
        Proc(
            "alertmanager",
            ["/usr/bin/prometheus-alertmanager",
             f"--config.file={configs.alertmanager_config_file(config)}",
             f"--storage.path={config.path('alertmanager', 'data')}",
             f"--web.listen-address={config.alertmanager_addr}",
             f"--web.external-url=http://{config.alertmanager_addr}/",
             "--cluster.listen-address=",
             "--log.level=warn"],
            lambda: http_ok(f"http://{config.alertmanager_addr}/-/ready"),
        ),
        Proc(
            "pushgateway",
            ["/usr/bin/prometheus-pushgateway",
             f"--web.listen-address={config.pushgateway_addr}",
             f"--persistence.file={config.path('pushgateway', 'metrics.store')}",
             "--persistence.interval=5s",
             "--log.level=warn"],
            lambda: http_ok(f"http://{config.pushgateway_addr}/-/ready"),
        ),
        Proc(
            "prometheus",
            ["/usr/bin/prometheus",
             f"--config.file={configs.prometheus_config_file(config)}",
             f"--storage.tsdb.path={config.path('prometheus', 'data')}",
             "--storage.tsdb.retention.time=2d",
             f"--web.listen-address={config.prometheus_addr}",
             f"--web.external-url=http://{config.prometheus_addr}/",
             "--web.enable-lifecycle",
             "--rules.alert.resend-delay=1s",
             "--log.level=warn"],
            lambda: http_ok(f"http://{config.prometheus_addr}/-/ready"),
            timeout=60.0,
        ),
        Proc(
            "chat",
            [sys.executable, "-m", "lab.chat", "--lab-dir", d],
            lambda: http_ok(f"http://{config.chat_addr}/health"),
        ),
    ]
    return procs


def _lb_ready(config: LabConfig, lb: LoadBalancer) -> Callable[[], bool]:
    return lambda: haproxy_answers(lb.addr, config.lb_admin_port)


# -- pids ----------------------------------------------------------------------------------
def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def alive(pid: int) -> bool:
    """Running and not a zombie (a killed child of an init that does not reap)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def mentions(args: list[str], lab_dir: Path) -> bool:
    d = str(lab_dir)
    return any(a == d or a.endswith("=" + d) or d + "/" in a for a in args)


def read_pid(config: LabConfig, name: str) -> int | None:
    try:
        return int(configs.pid_file(config, name).read_text().strip())
    except (OSError, ValueError):
        return None


def running_pid(config: LabConfig, name: str) -> int | None:
    """The pid of a lab process that is alive and still ours (not a reused pid)."""
    pid = read_pid(config, name)
    if pid and alive(pid) and mentions(cmdline(pid), config.lab_dir):
        return pid
    return None


def liveness(config: LabConfig) -> dict[str, int | None]:
    return {p.name: running_pid(config, p.name) for p in lab_processes(config)}


def _ancestors() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return pids


def leftovers(lab_dir: Path) -> list[int]:
    """Live processes (other than this one and its ancestors) naming the lab directory."""
    mine = _ancestors()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            pid = int(entry.name)
            if pid not in mine and alive(pid) and mentions(cmdline(pid), Path(lab_dir)):
                found.append(pid)
    return sorted(found)


def log_tail(config: LabConfig, proc: Proc, lines: int = 30) -> str:
    out = []
    for name in dict.fromkeys([proc.output_log, f"{proc.name}.log"]):
        file = config.path("log", name)
        if file.exists():
            text = "\n".join(file.read_text(errors="replace").splitlines()[-lines:])
            out.append(f"==> {file} <==\n{text}")
    return "\n".join(out) or "(no log)"


# -- start and stop --------------------------------------------------------------------------
def start(config: LabConfig, proc: Proc) -> int:
    config.path("log").mkdir(parents=True, exist_ok=True)
    config.path("run").mkdir(parents=True, exist_ok=True)
    log = open(config.path("log", proc.output_log), "ab")  # noqa: SIM115 - handed to the child
    log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} start: {' '.join(proc.argv)}\n".encode())
    log.flush()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    try:
        child = subprocess.Popen(
            proc.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            cwd=config.lab_dir, env=env, start_new_session=True, close_fds=True,
        )
    finally:
        log.close()
    configs.pid_file(config, proc.name).write_text(f"{child.pid}\n")
    return child.pid


def wait_ready(config: LabConfig, proc: Proc, pid: int) -> None:
    deadline = time.monotonic() + proc.timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            _reap(pid)
            raise LabError(f"{proc.name} exited during start-up; log tail:\n{log_tail(config, proc)}")
        if proc.ready():
            return
        time.sleep(0.1)
    raise LabError(
        f"{proc.name} (pid {pid}) did not become ready within {proc.timeout:.0f}s; "
        f"log tail:\n{log_tail(config, proc)}"
    )


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def stop_pids(pids: list[int], timeout: float = 10.0) -> list[int]:
    """SIGTERM, then SIGKILL after ``timeout``; returns the pids that survived both."""
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    remaining = list(pids)
    while remaining and time.monotonic() < deadline:
        for pid in remaining:
            _reap(pid)
        remaining = [p for p in remaining if alive(p)]
        if remaining:
            time.sleep(0.05)
    for pid in remaining:
        _signal(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while remaining and time.monotonic() < deadline:
        for pid in remaining:
            _reap(pid)
        remaining = [p for p in remaining if alive(p)]
        if remaining:
            time.sleep(0.05)
    return remaining


def up(config: LabConfig, log: Callable[[str], None] = print) -> list[str]:
    """Start every process of the lab that is not running; returns the names started.

    Configs are generated only when nothing of the lab runs. On failure, what this call
    started is stopped again and ``LabError`` carries the failing process's log tail.
    """
    procs = lab_processes(config)
    if not any(running_pid(config, p.name) for p in procs):
        if leftovers(config.lab_dir):
            raise LabError(f"processes of {config.lab_dir} are running without pid files: "
                           f"{leftovers(config.lab_dir)}; run: python -m lab down")
        config.save()
        configs.write_all(config, Topology(config))
    started: list[tuple[str, int]] = []
    try:
        for proc in procs:
            if running_pid(config, proc.name):
                continue
            pid = start(config, proc)
            started.append((proc.name, pid))
            log(f"started {proc.name} (pid {pid})")
            wait_ready(config, proc, pid)
            if proc.name == "labd":
                # labd may write state the other configs depend on (denied addresses).
                configs.write_sshd_config(config)
    except BaseException:
        stop_pids([pid for _, pid in reversed(started)])
        for name, _ in started:
            configs.pid_file(config, name).unlink(missing_ok=True)
        raise
    return [name for name, _ in started]


def down(config: LabConfig, timeout: float = 10.0, log: Callable[[str], None] = print) -> None:
    """Stop every process of this lab, verify none is left, remove the pid files."""
    procs = lab_processes(config)
    pids = []
    for proc in reversed(procs):
        pid = running_pid(config, proc.name)
        if pid:
            pids.append(pid)
            log(f"stopping {proc.name} (pid {pid})")
    survivors = stop_pids(pids, timeout)
    strays = leftovers(config.lab_dir)
    if strays:
        log(f"stopping stray processes of {config.lab_dir}: {strays}")
        survivors += stop_pids(strays, timeout=3.0)
    left = leftovers(config.lab_dir)
    if left or survivors:
        raise LabError(f"processes of {config.lab_dir} survived SIGKILL: {sorted(set(left + survivors))}")
    for proc in procs:
        configs.pid_file(config, proc.name).unlink(missing_ok=True)


def control_url(config: LabConfig, path: str) -> str:
    return f"http://{config.control_addr}:{config.control_port}{path}"


def control(config: LabConfig, method: str, path: str, body: dict | None = None, timeout: float = 30.0):
    """Call labd's control API; returns the decoded JSON answer. HTTP errors raise LabError."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(control_url(config, path), data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
    except urllib.error.HTTPError as e:
        detail = e.read().decode(errors="replace").strip()
        with contextlib.suppress(ValueError, AttributeError):
            detail = json.loads(detail).get("error", detail)
        raise LabError(f"labd {method} {path}: HTTP {e.code}: {detail}") from e
    except OSError as e:
        raise LabError(f"labd does not answer at {control_url(config, path)}: {e}") from e
    return json.loads(raw) if raw else None


def on_reachability_change(world) -> Awaitable[None] | None:
    """labd's reachability hook: apply ``ssh/denied_addresses`` to a running sshd."""
    config = world.config
    if not running_pid(config, "sshd"):
        return None  # sshd is not up yet: ``up`` writes its config from the file
    return asyncio.to_thread(configs.reload_sshd, config)
