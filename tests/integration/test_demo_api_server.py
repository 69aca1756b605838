"""scripts/demo_api.py for real: ``start`` on a temporary AIRFLOW_HOME (SQLite, as the demo's)
serves the health endpoint on loopback, logs in with the generated password only, hands the lab's
and prints no secret; ``stop`` leaves nothing behind."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import requests

from scripts import demo_api

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "demo_api.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def demo_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "LIFTOFF_"))}
    env.update(
        AIRFLOW_HOME=str(tmp / "airflow"),
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{tmp}/airflow/airflow.db",
        AIRFLOW__CORE__DAGS_FOLDER=str(REPO / "dags"),
        AIRFLOW__CORE__PLUGINS_FOLDER=str(REPO / "plugins"),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        LIFTOFF_LAB_DIR=str(tmp / "lab"),
        LIFTOFF_DEMO_API_PORT=str(free_port()),  # never the 8080 of a real demo
        PYTHONPATH=os.pathsep.join(str(REPO / p) for p in ("include", "plugins", ".")),
    )
    return env


def script(env: dict[str, str], *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


@pytest.fixture(scope="module")
def started(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict, demo_api.Paths, str]]:
    tmp = tmp_path_factory.mktemp("demo-api")
    env = demo_env(tmp)
    paths = demo_api.Paths.from_env(env)
    migrate = subprocess.run([str(Path(sys.executable).parent / "airflow"), "db", "migrate"], env=env,
                             capture_output=True, text=True, timeout=300)
    assert migrate.returncode == 0, migrate.stdout[-2000:] + migrate.stderr[-2000:]
    out = script(env, "start")
    try:
        assert out.returncode == 0, out.stdout + out.stderr
        yield env, paths, out.stdout
    finally:
        record = demo_api.read_pid_file(paths)
        if record and demo_api.is_api_server(record["pid"]):
            demo_api.terminate_group(record["pid"])


def test_start_serves_on_loopback_with_the_generated_password(started):
    env, paths, printed = started
    port = int(env["LIFTOFF_DEMO_API_PORT"])
    record = demo_api.read_pid_file(paths)
    assert record and record["port"] == port and demo_api.is_api_server(record["pid"])
    base = f"http://127.0.0.1:{port}"
    assert requests.get(f"{base}/api/v2/monitor/health", timeout=10).status_code == 200
    password = json.loads(paths.passwords.read_text())["admin"]
    good = requests.post(f"{base}/auth/token", json={"username": "admin", "password": password}, timeout=10)
    assert good.status_code == 201, good.text
    bad = requests.post(f"{base}/auth/token", json={"username": "admin", "password": "nope-42"}, timeout=10)
    assert bad.status_code == 401
    assert f"{base}/liftoff/fleet" in printed and str(paths.passwords) in printed
    assert password not in printed and password not in paths.log.read_text(errors="replace")


def test_the_server_listens_on_loopback_only(started):
    _, paths, _ = started
    pid = demo_api.read_pid_file(paths)["pid"]
    members = set(demo_api.group_members(pid))
    listening = {c.laddr.ip for c in psutil.net_connections(kind="tcp")
                 if c.status == psutil.CONN_LISTEN and c.pid in members}
    assert listening == {"127.0.0.1"}


def test_stop_leaves_nothing(started):
    env, paths, _ = started
    pid = demo_api.read_pid_file(paths)["pid"]
    out = script(env, "stop", timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "stopped" in out.stdout
    assert demo_api.group_members(pid) == []
    assert not paths.pid_file.exists()
    assert demo_api.port_free(int(env["LIFTOFF_DEMO_API_PORT"]))
    again = script(env, "stop", timeout=60)
    assert again.returncode == 0 and "not running" in again.stdout
