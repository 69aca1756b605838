"""Test helpers for a real lab: start one, drive it, look at it (used by the integration
and e2e fixtures)."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lab import processes
from lab.cli import collect_status
from lab.config import REPO_ROOT, LabConfig
from lab.liftoff_env import exports
from lab.topology import Topology

DEFAULT_TEST_OCTET = 43
SSH = "/usr/bin/ssh"


def lab_octet() -> int:
    return int(os.environ.get("LIFTOFF_TEST_LAB_OCTET", DEFAULT_TEST_OCTET))


def run_lab_cli(lab_dir: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m lab --lab-dir DIR ARGS`` as a user would run it."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    env.pop("LIFTOFF_LAB_OCTET", None)
    return subprocess.run(
        [sys.executable, "-m", "lab", "--lab-dir", str(lab_dir), *args],
        capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT, env=env,
    )


def wait_for(what: str, check: Callable[[], object], timeout: float, interval: float = 0.5):
    """Poll ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


class Lab:
    """A running lab and what tests do with it."""

    def __init__(self, config: LabConfig, env: dict[str, str]):
        self.config = config
        self.topology = Topology(config)
        self.env = env

    wait_for = staticmethod(wait_for)

    # -- the lab's own interfaces ---------------------------------------------------------
    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return run_lab_cli(self.config.lab_dir, *args, timeout=timeout)

    def status(self) -> dict:
        return collect_status(self.config)

    def host_status(self, name: str) -> dict:
        for env in self.status()["environments"].values():
            for host in env["hosts"]:
                if host["name"] == name:
                    return host
        raise KeyError(name)

    def build_add(self, version: str, **attrs) -> dict:
        return processes.control(self.config, "POST", "/builds", {"version": version, **attrs})

    def fault(self, fault: str, host: str) -> None:
        """``python -m lab fault host-down|host-up HOST``."""
        out = self.cli("fault", fault, host)
        assert out.returncode == 0, out.stderr

    # -- the fleet's interfaces -----------------------------------------------------------
    def ssh(self, host: str, command: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run a command on a lab host with the real OpenSSH client, host key verified."""
        c = self.config
        addr = self.topology.by_name[host].addr
        argv = [
            SSH, "-F", "/dev/null", "-p", str(c.ssh_port), "-i", self.env_key_file,
            "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
            "-o", f"UserKnownHostsFile={self.env_known_hosts}", "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "ConnectTimeout=5", "-o", "LogLevel=ERROR",
            f"{c.user}@{addr}", command,
        ]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)

    @property
    def env_key_file(self) -> str:
        return json.loads(self.env["AIRFLOW_CONN_LIFTOFF_SSH"])["extra"]["key_file"]

    @property
    def env_known_hosts(self) -> str:
        return json.loads(self.env["AIRFLOW_CONN_LIFTOFF_SSH"])["extra"]["known_hosts"]

    def haproxy(self, lb_name: str, command: str) -> str:
        lb = next(lb for lb in self.topology.lbs if lb.name == lb_name)
        return processes.haproxy_command(lb.addr, self.config.lb_admin_port, command)

    def prometheus_query(self, expr: str) -> list[dict]:
        url = f"http://{self.config.prometheus_addr}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=10) as resp:
            return json.load(resp)["data"]["result"]

    def alerts(self, **labels: str) -> list[dict]:
        """Active alerts in Alertmanager whose labels include ``labels``."""
        url = f"http://{self.config.alertmanager_addr}/api/v2/alerts?active=true"
        with urllib.request.urlopen(url, timeout=10) as resp:
            alerts = json.load(resp)
        return [a for a in alerts if all(a["labels"].get(k) == v for k, v in labels.items())]


PRODUCTION_LBS = ("fe-01-lb-gprd", "fe-02-lb-gprd")


def canary_lb_view(lab: Lab, lbs: tuple[str, ...] = PRODUCTION_LBS
                   ) -> dict[str, dict[tuple[str, str], tuple[str, int]]]:
    """Per production LB: (backend, canary server) -> (status, weight), from ``show stat``."""
    out = {}
    for lb in lbs:
        rows = csv.DictReader(io.StringIO(lab.haproxy(lb, "show stat").lstrip("# ")))
        out[lb] = {(r["pxname"], r["svname"]): (r["status"], int(r["weight"])) for r in rows
                   if "-cny-" in r["svname"]}
    return out


def canary_weights(lab: Lab) -> set[int]:
    """The canary servers' weights in every production backend (not the canary's own) of every
    production LB."""
    return {weight for view in canary_lb_view(lab).values() for (backend, _), (_, weight) in view.items()
            if not backend.startswith("canary")}


@contextlib.contextmanager
def running_lab(lab_dir: Path, octet: int, *args: str) -> Iterator[Lab]:
    """A lab brought up in ``lab_dir`` on ``octet`` for the block, then down."""
    out = run_lab_cli(lab_dir, "--octet", str(octet), "up", *args)
    if out.returncode != 0:
        run_lab_cli(lab_dir, "down")
        pytest.fail(f"lab up failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    config = LabConfig.load(lab_dir)
    try:
        yield Lab(config, exports(config))
    finally:
        down = run_lab_cli(lab_dir, "down")
        assert down.returncode == 0, f"lab down failed:\n{down.stdout}\n{down.stderr}"


DAGS = Path(__file__).resolve().parents[1] / "dags"


@contextlib.contextmanager
def dags_on(lab: Lab) -> Iterator[dict]:
    """The DAGs parsed from dags/ with ``lab``'s connections and inventory in the environment
    for the block (a module with a lab of its own)."""
    mp = pytest.MonkeyPatch()
    for name, value in lab.env.items():
        mp.setenv(name, value)
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAGS))
    assert not bag.import_errors, bag.import_errors
    try:
        yield bag.dags
    finally:
        mp.undo()
