"""`make demo` / `make demo-stop`: the Airflow api-server on the demo's metadata DB, in the background.

    python scripts/demo_api.py start [--port 8080] [--timeout 180]
    python scripts/demo_api.py stop [--quiet]

Run from the project's environment (``source scripts/env.sh``): ``AIRFLOW_HOME`` (``.airflow``)
holds the demo's database, so the runs ``make demo`` made are there to see. ``start`` binds
127.0.0.1 (port 8080, or a free one when 8080 is taken), turns SimpleAuthManager on with user
``admin`` and a password file it generates (mode 0600, ``$AIRFLOW_HOME/demo-passwords.json``;
the password is never printed), gives the server the lab's ``liftoff.env`` (what the liftoff
plugin reads), writes ``$AIRFLOW_HOME/demo-api.pid``, waits for ``/api/v2/monitor/health`` and
prints the URLs. ``stop`` ends the server's whole process group and removes the pid file.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
DEFAULT_PORT = 8080
USER = "admin"
AUTH_MANAGER = "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
HEALTH = "/api/v2/monitor/health"
FLEET = "/liftoff/fleet"


@dataclass(frozen=True)
class Paths:
    """Where the demo's api-server keeps its files."""

    home: Path  # AIRFLOW_HOME: the demo's metadata DB and airflow.cfg
    lab_dir: Path

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Paths:
        home = Path(environ.get("AIRFLOW_HOME") or ROOT / ".airflow")
        return cls(home=home, lab_dir=Path(environ.get("LIFTOFF_LAB_DIR") or ROOT / ".lab"))

    @property
    def pid_file(self) -> Path:
        return self.home / "demo-api.pid"

    @property
    def passwords(self) -> Path:
        return self.home / "demo-passwords.json"

    @property
    def log(self) -> Path:
        return self.home / "demo-api-server.log"

    @property
    def lab_env(self) -> Path:
        return self.lab_dir / "liftoff.env"


# -- port ------------------------------------------------------------------------------------------

def port_free(port: int, host: str = HOST) -> bool:
    """Whether a server could listen on host:port now (SO_REUSEADDR, as uvicorn binds)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def choose_port(preferred: int = DEFAULT_PORT, host: str = HOST) -> int:
    """``preferred`` when free, else a port the kernel hands out."""
    if port_free(preferred, host):
        return preferred
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# -- files -----------------------------------------------------------------------------------------

def ensure_password(file: Path, user: str = USER) -> None:
    """SimpleAuthManager's password file with a password for ``user`` (generated once, mode 0600).
    Written here, not by Airflow, so the api-server never prints the password into its log."""
    try:
        passwords = json.loads(file.read_text())
    except (OSError, ValueError):
        passwords = {}
    if not isinstance(passwords, dict):
        passwords = {}
    if not passwords.get(user):
        passwords[user] = secrets.token_urlsafe(18)
    file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(json.dumps(passwords) + "\n")
    os.chmod(file, 0o600)


def read_env_file(file: Path) -> dict[str, str]:
    """The ``export NAME=value`` lines of a shell env file (the lab's liftoff.env); {} if absent."""
    if not file.exists():
        return {}
    env = {}
    for line in file.read_text().splitlines():
        words = shlex.split(line, comments=True)
        if words and words[0] == "export":
            words = words[1:]
        for word in words:
            name, sep, value = word.partition("=")
            if sep and name.isidentifier():
                env[name] = value
    return env


def write_pid_file(paths: Paths, pid: int, port: int) -> None:
    paths.pid_file.write_text(json.dumps({"pid": pid, "port": port}) + "\n")


def read_pid_file(paths: Paths) -> dict | None:
    """``{"pid": ..., "port": ...}``, or None when there is no (readable) pid file."""
    try:
        data = json.loads(paths.pid_file.read_text())
        return {"pid": int(data["pid"]), "port": int(data["port"])}
    except (OSError, ValueError, KeyError, TypeError):
        return None


# -- processes -------------------------------------------------------------------------------------

def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state first), or None."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()
    except OSError:
        return None


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group ``pgid``."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields and fields[0] != "Z" and int(fields[2]) == pgid:
                members.append(int(entry.name))
    return sorted(members)


def is_api_server(pid: int) -> bool:
    """Whether ``pid`` is alive and an ``airflow api-server`` (not some process that got its pid)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    fields = _stat(pid)
    if not fields or fields[0] == "Z":
        return False
    # Airflow's setproctitle rewrites the command line: "airflow api_server -- host:... port:..."
    line = b" ".join(argv)
    return b"airflow" in line and (b"api-server" in line or b"api_server" in line)


def server_env(paths: Paths, port: int, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The api-server's environment: ours, the lab's liftoff.env, SimpleAuthManager on loopback."""
    return {
        **environ,
        **read_env_file(paths.lab_env),
        "AIRFLOW_HOME": str(paths.home),
        "AIRFLOW__CORE__AUTH_MANAGER": AUTH_MANAGER,
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{USER}:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(paths.passwords),
        "AIRFLOW__API__HOST": HOST,
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API__WORKERS": "1",
    }


def command(port: int) -> list[str]:
    airflow = Path(sys.executable).parent / "airflow"
    return [str(airflow), "api-server", "--host", HOST, "--port", str(port), "--workers", "1"]


def spawn(paths: Paths, port: int) -> subprocess.Popen:
    """The api-server in a session (and process group) of its own, its output in the log file."""
    with open(paths.log, "a") as log:
        return subprocess.Popen(command(port), env=server_env(paths, port), stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT,
                                start_new_session=True)


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}{HEALTH}", timeout=5) as resp:
            return resp.status == 200
    except (OSError, urllib.error.URLError):
        return False


def wait_healthy(proc: subprocess.Popen, port: int, timeout: float) -> str | None:
    """None once the health endpoint answers 200; else why not (the process exited, time ran out)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return f"the api-server exited with code {proc.returncode}"
        if healthy(port):
            return None
        time.sleep(0.5)
    return f"{HEALTH} did not answer 200 within {timeout:.0f}s"


def terminate_group(pgid: int, timeout: float = 20.0) -> bool:
    """SIGTERM the process group, SIGKILL what is left after ``timeout``; True when none is left."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)
        deadline = time.monotonic() + wait
        while group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not group_members(pgid):
            return True
    return False


# -- commands --------------------------------------------------------------------------------------

def banner(paths: Paths, port: int, pid: int) -> str:
    """What ``start`` prints: the URLs, who to log in as and where the password is (never the
    password itself)."""
    base = f"http://{HOST}:{port}"
    return "\n".join([
        f"Airflow api-server on the demo's database (pid {pid}, log {paths.log}):",
        f"  fleet view:  {base}{FLEET}",
        f"  Airflow UI:  {base}/",
        f"  log in as:   {USER}, with the password in {paths.passwords} (JSON: user -> password)",
        "  stop it (and the lab): make demo-stop",
    ])


def stop(paths: Paths, quiet: bool = False) -> int:
    """Stop the api-server of the pid file (if it is one) and remove the file."""
    record = read_pid_file(paths)
    if record is None:
        if not quiet:
            print("demo api-server: not running (no pid file)")
        paths.pid_file.unlink(missing_ok=True)
        return 0
    pid = record["pid"]
    if not is_api_server(pid):
        print(f"demo api-server: pid {pid} is gone; removing {paths.pid_file}")
        paths.pid_file.unlink()
        return 0
    if not terminate_group(pid):
        print(f"demo api-server: processes of group {pid} survived SIGKILL: {group_members(pid)}",
              file=sys.stderr)
        return 1
    paths.pid_file.unlink(missing_ok=True)
    print(f"demo api-server: stopped (pid {pid}, port {record['port']})")
    return 0


def start(paths: Paths, preferred: int, timeout: float) -> int:
    if stop(paths, quiet=True) != 0:  # one demo api-server at a time: a new start replaces the old
        return 1
    paths.home.mkdir(parents=True, exist_ok=True)
    ensure_password(paths.passwords)
    port = choose_port(preferred)
    proc = spawn(paths, port)
    write_pid_file(paths, proc.pid, port)
    problem = wait_healthy(proc, port, timeout)
    if problem:
        terminate_group(proc.pid)
        proc.wait(timeout=10)
        paths.pid_file.unlink(missing_ok=True)
        tail = paths.log.read_text(errors="replace")[-3000:] if paths.log.exists() else ""
        print(f"demo api-server did not start: {problem}; log {paths.log}:\n{tail}", file=sys.stderr)
        return 1
    print(banner(paths, port, proc.pid))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="action", required=True)
    start_p = sub.add_parser("start", help="start the api-server in the background, print the URLs")
    preferred = int(os.environ.get("LIFTOFF_DEMO_API_PORT", DEFAULT_PORT))
    start_p.add_argument("--port", type=int, default=preferred,
                         help="preferred port (default 8080; a free one when taken)")
    start_p.add_argument("--timeout", type=float, default=180, help="seconds to wait for health")
    stop_p = sub.add_parser("stop", help="stop the api-server started by start")
    stop_p.add_argument("--quiet", action="store_true", help="say nothing when none is running")
    args = parser.parse_args(argv)
    paths = Paths.from_env()
    if args.action == "start":
        return start(paths, args.port, args.timeout)
    return stop(paths, quiet=args.quiet)


if __name__ == "__main__":
    sys.exit(main())
