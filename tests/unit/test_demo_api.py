"""scripts/demo_api.py without a real api-server: port choice, the password and pid files, the
api-server's environment, the stop of a process group, and what start prints (no secret)."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from scripts import demo_api

SLEEPER = [sys.executable, "-c", "import time; print('ready', flush=True); time.sleep(60)"]


@pytest.fixture
def paths(tmp_path: Path):
    return demo_api.Paths(home=tmp_path / "airflow", lab_dir=tmp_path / "lab")


@pytest.fixture
def listener() -> Iterator[int]:
    """A port something listens on (127.0.0.1)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


# -- port ------------------------------------------------------------------------------------------

def test_preferred_port_when_free():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    assert demo_api.choose_port(free) == free


def test_another_port_when_preferred_is_taken(listener: int):
    assert not demo_api.port_free(listener)
    port = demo_api.choose_port(listener)
    assert port != listener and demo_api.port_free(port)


# -- files -----------------------------------------------------------------------------------------

def test_password_file_is_generated_once_and_private(paths):
    demo_api.ensure_password(paths.passwords)
    first = json.loads(paths.passwords.read_text())
    assert set(first) == {"admin"} and len(first["admin"]) >= 20
    assert stat.S_IMODE(paths.passwords.stat().st_mode) == 0o600
    demo_api.ensure_password(paths.passwords)
    assert json.loads(paths.passwords.read_text()) == first


def test_password_file_keeps_other_users_and_repairs_garbage(paths):
    paths.home.mkdir(parents=True)
    paths.passwords.write_text('{"viewer": "v-secret"}')
    demo_api.ensure_password(paths.passwords)
    assert json.loads(paths.passwords.read_text())["viewer"] == "v-secret"
    paths.passwords.write_text("not json")
    demo_api.ensure_password(paths.passwords)
    assert list(json.loads(paths.passwords.read_text())) == ["admin"]


def test_pid_file_round_trip_and_bad_content(paths):
    paths.home.mkdir(parents=True)
    assert demo_api.read_pid_file(paths) is None
    demo_api.write_pid_file(paths, 4242, 8080)
    assert demo_api.read_pid_file(paths) == {"pid": 4242, "port": 8080}
    paths.pid_file.write_text("garbage")
    assert demo_api.read_pid_file(paths) is None


def test_lab_env_file_is_read(paths):
    paths.lab_dir.mkdir(parents=True)
    conn = '{"conn_type": "ssh", "extra": {"key_file": "/x y/key"}}'
    paths.lab_env.write_text(f"# liftoff\nexport AIRFLOW_CONN_LIFTOFF_SSH='{conn}'\n"
                             "export LIFTOFF_INVENTORY=/lab/inventory.yaml\n\n")
    assert demo_api.read_env_file(paths.lab_env) == {
        "AIRFLOW_CONN_LIFTOFF_SSH": conn, "LIFTOFF_INVENTORY": "/lab/inventory.yaml"}
    assert demo_api.read_env_file(paths.lab_dir / "missing.env") == {}


def test_server_env_has_the_lab_and_simple_auth_on_loopback(paths):
    paths.lab_dir.mkdir(parents=True)
    paths.lab_env.write_text("export LIFTOFF_INVENTORY=/lab/inventory.yaml\n")
    env = demo_api.server_env(paths, 8123, {"PATH": "/bin", "AIRFLOW__API__HOST": "0.0.0.0"})
    assert env["LIFTOFF_INVENTORY"] == "/lab/inventory.yaml" and env["PATH"] == "/bin"
    assert env["AIRFLOW__API__HOST"] == "127.0.0.1" and env["AIRFLOW__API__PORT"] == "8123"
    assert env["AIRFLOW__CORE__AUTH_MANAGER"].endswith("SimpleAuthManager")
    assert env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"] == str(paths.passwords)
    assert env["AIRFLOW_HOME"] == str(paths.home)
    assert demo_api.command(8123)[1:] == ["api-server", "--host", "127.0.0.1", "--port", "8123",
                                          "--workers", "1"]


# -- what start prints -----------------------------------------------------------------------------

def test_banner_gives_urls_user_and_password_file_not_the_password(paths):
    demo_api.ensure_password(paths.passwords)
    password = json.loads(paths.passwords.read_text())["admin"]
    text = demo_api.banner(paths, 8080, 1234)
    assert "http://127.0.0.1:8080/liftoff/fleet" in text
    assert "http://127.0.0.1:8080/" in text
    assert "admin" in text and str(paths.passwords) in text and "make demo-stop" in text
    assert password not in text


# -- stop ------------------------------------------------------------------------------------------

def test_stop_without_pid_file(paths, capsys):
    assert demo_api.stop(paths) == 0
    assert "not running" in capsys.readouterr().out


def test_stop_leaves_a_process_that_is_not_an_api_server(paths, capsys):
    """A stale pid file whose pid now belongs to someone else: nothing is killed."""
    paths.home.mkdir(parents=True)
    other = subprocess.Popen(SLEEPER, start_new_session=True, stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "ready"
        demo_api.write_pid_file(paths, other.pid, 8080)
        assert demo_api.stop(paths) == 0
        assert other.poll() is None, "stop killed a process that is not the api-server"
        assert not paths.pid_file.exists()
        assert "is gone" in capsys.readouterr().out
    finally:
        other.kill()
        other.wait()


def test_terminate_group_ends_every_member(paths):
    """The leader and a child it started: both gone after terminate_group (no zombies counted)."""
    code = f"import subprocess, time; subprocess.Popen({SLEEPER!r}).wait(); " \
           "time.sleep(60)"
    leader = subprocess.Popen([sys.executable, "-c", code], start_new_session=True, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert leader.stdout.readline().strip() == "ready"
        assert len(demo_api.group_members(leader.pid)) == 2
        assert demo_api.terminate_group(leader.pid, timeout=10)
        leader.wait(timeout=10)
        assert demo_api.group_members(leader.pid) == []
    finally:
        leader.kill()
        leader.wait()


@pytest.mark.parametrize("argv", [["airflow", "api-server"],
                                  ["airflow api_server -- host:127.0.0.1 port:8080"]])
def test_is_api_server_matches_the_command_line(argv: list[str]):
    """As started, and as Airflow's setproctitle rewrites it."""
    fake = subprocess.Popen([*SLEEPER, *argv], stdout=subprocess.PIPE, text=True)
    try:
        assert fake.stdout.readline().strip() == "ready"  # exec'd: its own command line
        assert demo_api.is_api_server(fake.pid)
        assert not demo_api.is_api_server(os.getpid())
    finally:
        fake.kill()
        fake.wait()
    assert not demo_api.is_api_server(fake.pid)  # reaped: gone


def test_spawn_gives_the_lab_env_and_logs_to_the_file(paths, monkeypatch):
    """The server process gets liftoff.env and SimpleAuthManager settings; its output goes to the log."""
    paths.home.mkdir(parents=True)
    paths.lab_dir.mkdir(parents=True)
    paths.lab_env.write_text("export LIFTOFF_SPAWN_MARKER='from the lab'\n")
    show = ("import os; env = os.environ; "
            "print(env['LIFTOFF_SPAWN_MARKER'], env['AIRFLOW__API__PORT'], os.getpgid(0))")
    monkeypatch.setattr(demo_api, "command", lambda port: [sys.executable, "-c", show])
    proc = demo_api.spawn(paths, 8123)
    assert proc.wait(timeout=30) == 0
    assert paths.log.read_text().split() == ["from", "the", "lab", "8123", str(proc.pid)]
