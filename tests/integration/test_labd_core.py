"""labd as a real process: the sshd relay script, the control API, persistence and restart.

Runs ``python -m lab.daemon`` on its own lab (octet 50) and talks to it the way sshd's
ForceCommand and ``python -m lab`` do; no sshd is needed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from lab.config import REPO_ROOT, LabConfig
from lab.hostsim import relay_script
from lab.model import BASE_VERSION
from lab.topology import Topology

OCTET = 50
NEW = "17.6.0-ee.0"
WEB = "web-01-sv-gstg"
WEB2 = "web-02-sv-gstg"
API = "api-01-sv-gstg"
DEPLOY = "deploy-01-sv-gstg"


class Labd:
    def __init__(self, config: LabConfig):
        self.config = config
        self.topology = Topology(config)
        self.proc: subprocess.Popen | None = None
        self.relay = config.path("ssh", "hostsim.sh")
        self.relay.parent.mkdir(parents=True, exist_ok=True)
        self.relay.write_text(relay_script(config))

    def start(self) -> None:
        log = open(self.config.path("labd.out"), "ab")  # noqa: SIM115 - handed to the child
        argv = [sys.executable, "-m", "lab.daemon", "--lab-dir", str(self.config.lab_dir)]
        self.proc = subprocess.Popen(argv, cwd=REPO_ROOT, stdout=log, stderr=log, start_new_session=True)
        log.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.config.path("labd.out").read_text()
            try:
                if self.http("GET", "/health", raw=True) == "ok\n":
                    return
            except OSError:
                time.sleep(0.1)
        raise AssertionError("labd did not answer /health")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout=30)
        self.proc = None
        return code

    def http(self, method: str, path: str, body: dict | None = None, raw: bool = False):
        url = f"http://{self.config.control_addr}:{self.config.control_port}{path}"
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"}
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                text = resp.read().decode()
                return text if raw else (resp.status, json.loads(text))
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read().decode())

    def status(self) -> dict:
        code, body = self.http("GET", "/status")
        assert code == 200
        return body

    def ssh(self, host: str, command: str, addr: str | None = None) -> subprocess.CompletedProcess:
        """What sshd does: run the ForceCommand with the connection and the original command."""
        addr = addr or self.topology.by_name[host].addr
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
               "SSH_CONNECTION": f"127.0.0.1 40022 {addr} {self.config.ssh_port}",
               "SSH_ORIGINAL_COMMAND": command}
        return subprocess.run(["bash", str(self.relay)], env=env, capture_output=True, text=True, timeout=60)


@pytest.fixture
def labd():
    lab_dir = Path(tempfile.mkdtemp(prefix="/tmp/labd-core-"))
    config = LabConfig(lab_dir=lab_dir, octet=OCTET, install_seconds=0.2, migration_seconds=0.05,
                       chef_interval=0.5)
    config.save()
    daemon = Labd(config)
    yield daemon
    if daemon.proc is not None:
        daemon.proc.kill()
        daemon.proc.wait(timeout=30)
    shutil.rmtree(lab_dir, ignore_errors=True)


def wait_for(predicate, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_labd_relay_control_persistence_and_restart(labd):
    labd.start()
    config = labd.config
    status = labd.status()
    assert status["config"]["octet"] == OCTET
    assert status["hosts"][WEB]["installed"] == BASE_VERSION
    assert status["hosts"][WEB]["addr"] == labd.topology.by_name[WEB].addr

    # Control API: builds, with validation.
    code, build = labd.http("POST", "/builds", {"version": NEW, "includes_patches": ["p-1"]})
    assert code == 201 and build["version"] == NEW and build["seq"] == 2
    code, err = labd.http("POST", "/builds", {"version": "17.7.0-ee.0", "error_rate": 3})
    assert code == 400 and "error_rate" in err["error"]
    code, err = labd.http("POST", "/builds", {"version": "17.7.0-ee.0", "install_fails_on": ["nohost"]})
    assert code == 400 and "nohost" in err["error"]
    code, err = labd.http("POST", "/builds", {"version": "not a version"})
    assert code == 400 and "version" in err["error"]
    code, err = labd.http("POST", "/builds", {"version": NEW})
    assert code == 409
    code, builds = labd.http("GET", "/builds")
    assert [b["version"] for b in builds] == [BASE_VERSION, NEW]
    code, build = labd.http("PATCH", f"/builds/{NEW}", {"latency_ms": 250})
    assert code == 200 and build["latency_ms"] == 250
    assert labd.http("PATCH", f"/builds/{NEW}", {"version": "x"})[0] == 400
    assert labd.http("PATCH", "/builds/9.9.9", {"latency_ms": 1})[0] == 404

    # The relay: stdout, stderr and exit codes come back as from a real host.
    r = labd.ssh(WEB, "sudo chef-client-disable 'deploy 17.6'")
    assert r.returncode == 0, r.stderr
    r = labd.ssh(WEB, f"sudo apt-get install -y gitlab-ee={NEW}")
    assert r.returncode == 0, r.stderr
    pid_before = labd.status()["hosts"][WEB]["pids"]["puma"]
    r = labd.ssh(WEB, "sudo gitlab-ctl hup puma")
    assert r.returncode == 0, r.stderr
    pid_after = labd.status()["hosts"][WEB]["pids"]["puma"]
    assert pid_after != pid_before
    assert f"(pid {pid_after})" in labd.ssh(WEB, "sudo gitlab-ctl status").stdout
    assert labd.ssh(WEB, "dpkg-query -W -f='${Version}' gitlab-ee").stdout.strip() == NEW
    assert labd.status()["hosts"][WEB]["running"] == NEW
    assert labd.status()["hosts"][WEB2]["installed"] == BASE_VERSION
    r = labd.ssh(WEB, "uptime")
    assert (r.returncode, r.stdout, r.stderr) == (127, "", "lab: unknown command: uptime\n")
    r = labd.ssh(WEB, "multi\nline")
    assert r.returncode == 127 and "multi line" in r.stderr
    r = labd.ssh(WEB, "gitlab-ctl status", addr=f"{config.net}.99.99")
    assert r.returncode == 255 and f"no host at {config.net}.99.99" in r.stderr
    r = labd.ssh(WEB, "gitlab-chef-role show")
    assert r.returncode == 1 and "deploy node" in r.stderr
    r = labd.ssh(DEPLOY, "gitlab-chef-role show")
    assert r.returncode == 0 and json.loads(r.stdout)["version"] == BASE_VERSION

    # Migrations on the deploy node, through the relay.
    assert labd.ssh(DEPLOY, "chef-client-disable 'deploy 17.6'").returncode == 0
    assert labd.ssh(DEPLOY, f"apt-get install -y gitlab-ee={NEW}").returncode == 0
    r = labd.ssh(DEPLOY, "SKIP_POST_DEPLOYMENT_MIGRATIONS=true gitlab-rake db:migrate")
    assert r.returncode == 0 and "000002_regular_17_6_0_ee_0" in r.stdout
    applied = labd.status()["databases"]["gstg"]["applied"]
    assert "000002_regular_17_6_0_ee_0" in applied and "000002_post_17_6_0_ee_0" not in applied

    # Chef left running: an installed host drifts back to the role's version.
    assert labd.ssh(API, f"apt-get install -y gitlab-ee={NEW}").returncode == 0
    wait_for(lambda: labd.status()["hosts"][API]["installed"] == BASE_VERSION, "chef to revert api-01")

    # A host goes down: the relay answers 255, denied_addresses lists it.
    code, body = labd.http("POST", "/faults/host-down", {"host": WEB2})
    assert code == 200 and body["hosts_down"] == [WEB2]
    assert labd.http("POST", "/faults/host-down", {"host": "nohost"})[0] == 404
    assert labd.status()["hosts"][WEB2]["reachable"] is False
    assert config.path("ssh", "denied_addresses").read_text() == labd.topology.by_name[WEB2].addr + "\n"
    assert labd.ssh(WEB2, "gitlab-ctl status").returncode == 255

    # Killed without warning: everything is on disk already.
    labd.stop(signal.SIGKILL)
    r = labd.ssh(WEB, "gitlab-ctl status")
    assert r.returncode == 255 and "labd is not reachable" in r.stderr
    state = config.path("state")
    web = json.loads((state / "hosts" / f"{WEB}.json").read_text())
    assert web["installed"] == NEW and web["running"] == NEW and web["chef_running"] is False
    assert web["services"]["puma"]["pid"] == pid_after
    assert json.loads((state / "hosts" / f"{WEB2}.json").read_text())["reachable"] is False
    assert json.loads((state / "builds.json").read_text())[NEW]["latency_ms"] == 250
    assert "000002_regular_17_6_0_ee_0" in json.loads((state / "db" / "gstg.json").read_text())["applied"]
    audit = [line.split("\t") for line in (state / "audit.log").read_text().splitlines()]
    assert [WEB, "127", "uptime"] in [[f[1], f[2], f[4]] for f in audit]
    assert [WEB, "0", f"sudo apt-get install -y gitlab-ee={NEW}"] in [[f[1], f[2], f[4]] for f in audit]

    # Restarted: labd serves the state it left.
    labd.start()
    status = labd.status()
    assert status["hosts"][WEB]["installed"] == NEW
    assert status["hosts"][WEB]["pids"]["puma"] == pid_after
    assert status["hosts"][WEB]["chef_running"] is False
    assert status["hosts"][WEB2]["reachable"] is False
    assert [b["version"] for b in status["builds"]] == [BASE_VERSION, NEW]
    assert labd.ssh(WEB, "dpkg-query -W -f='${Version}' gitlab-ee").stdout.strip() == NEW
    assert labd.http("POST", "/faults/host-up", {"host": WEB2})[0] == 200
    assert config.path("ssh", "denied_addresses").read_text() == ""
    assert labd.ssh(WEB2, "gitlab-ctl status").returncode == 0

    # SIGTERM: a clean exit that removes the pid file.
    assert config.path("run", "labd.pid").exists()
    assert labd.stop(signal.SIGTERM) == 0
    assert not config.path("run", "labd.pid").exists()
