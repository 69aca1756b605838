"""A real Airflow for end-to-end tests: api-server, scheduler, dag-processor and triggerer as
separate processes, LocalExecutor, a fresh PostgreSQL database, auth on.

    with airflow_stack(tmp_path, lab.env) as stack:
        stack.wait_until_dag_parsed("deploy_canary")
        run = stack.trigger("deploy_canary", {"version": "17.6.0-ee.0"})
        stack.wait_run("deploy_canary", run["dag_run_id"], timeout=600)

``executor="celery"`` gives the distributed topology without Docker: CeleryExecutor with the
local Redis (127.0.0.1:6379, a database 1-15 of its own, claimed with a key) as the broker, the
result backend in the stack's PostgreSQL database, one ``airflow celery worker`` process more,
and liftoff's state store in a PostgreSQL database of its own (``stack.state_url``, given to
every process as ``LIFTOFF_STATE_URL``). ``stack.kill("scheduler")`` is a kill -9 of one
component and everything it started; ``stack.start("scheduler")`` starts it again, same
command line and environment.

Everything binds to 127.0.0.1; the log servers are off. Every process carries a marker in its
environment, so :func:`stack_processes` finds them all (task subprocesses included) and the
exit stops every one of them (SIGTERM, then SIGKILL). The databases are dropped and the Redis
database flushed afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

REPO_ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
PG_DSN = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}
USER = "admin"
MARKER = "LIFTOFF_AIRFLOW_STACK"
TERMINAL = {"success", "failed"}
PROCESSES = {
    "api-server": ["api-server", "--host", "127.0.0.1", "--port", "{port}", "--workers", "1"],
    "scheduler": ["scheduler", "--skip-serve-logs"],
    "dag-processor": ["dag-processor"],
    "triggerer": ["triggerer", "--skip-serve-logs"],
}
# The Celery worker of executor="celery": no log server (the task logs are files under the
# shared AIRFLOW_HOME), no mingle/gossip with workers of other stacks.
WORKER = ["celery", "worker", "--concurrency", "{concurrency}", "--celery-hostname", "{worker_name}",
          "--skip-serve-logs", "--without-mingle", "--without-gossip"]
EXECUTORS = {"local": "LocalExecutor", "celery": "CeleryExecutor"}
REDIS = ("127.0.0.1", 6379)
REDIS_DBS = range(1, 16)  # db 0 is left to whatever else uses this Redis
REDIS_CLAIM_KEY = "liftoff:airflow-stack"


class StackError(RuntimeError):
    """The stack could not start, or an API call answered an error."""

    def __init__(self, message: str, status: int | None = None, body: Any = None):
        super().__init__(message)
        self.status = status
        self.body = body


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- processes -----------------------------------------------------------------------------------

def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    out = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            out[key.decode(errors="replace")] = value.decode(errors="replace")
    return out


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, session id) of a process, or None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()
    except OSError:
        return None
    return fields[0], int(fields[3])


def stack_processes(stack_id: str, sessions: tuple[int, ...] | list[int] = ()) -> list[int]:
    """Live pids (not zombies) of a stack: in one of its sessions (every process we start leads
    its own), or with the stack's marker in their environment (setproctitle hides it from
    some, hence both)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        pid = int(entry.name)
        stat = _stat(pid)
        if stat is None or stat[0] == "Z":
            continue
        if stat[1] in sessions or _environ(pid).get(MARKER) == stack_id:
            pids.append(pid)
    return sorted(pids)


def _signal_all(pids: list[int], pgids: list[int], sig: int) -> None:
    """Signal each process group once, and each process outside those groups (a second SIGTERM
    makes some Airflow components skip their graceful exit)."""
    for pgid in pgids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if os.getpgid(pid) not in pgids:
                os.kill(pid, sig)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


def stop_all(stack_id: str, procs: list[subprocess.Popen], timeout: float = 20.0) -> list[int]:
    """SIGTERM every process group we started and every process of the stack, then SIGKILL what
    is left after ``timeout``; returns the pids that survived even that."""
    sessions = [p.pid for p in procs]
    _signal_all(stack_processes(stack_id, sessions), [p.pid for p in procs if p.poll() is None],
                signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            p.poll()
        if not stack_processes(stack_id, sessions) and all(p.returncode is not None for p in procs):
            return []
        time.sleep(0.2)
    _signal_all(stack_processes(stack_id, sessions), sessions, signal.SIGKILL)
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=5)
    deadline = time.monotonic() + 5
    while stack_processes(stack_id, sessions) and time.monotonic() < deadline:
        time.sleep(0.1)
    return stack_processes(stack_id, sessions)


# -- database ------------------------------------------------------------------------------------

def _pg_admin(sql: str) -> None:
    import psycopg2

    conn = psycopg2.connect(dbname="postgres", **PG_DSN)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(sql)
    finally:
        conn.close()


def create_database(name: str) -> str:
    _pg_admin(f'CREATE DATABASE "{name}"')
    return f"postgresql+psycopg2://{PG_DSN['user']}@{PG_DSN['host']}:{PG_DSN['port']}/{name}"


def drop_database(name: str) -> None:
    _pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def database_exists(name: str) -> bool:
    import psycopg2

    conn = psycopg2.connect(dbname="postgres", **PG_DSN)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            return cur.fetchone() is not None
    finally:
        conn.close()


# -- Redis (the Celery broker) ----------------------------------------------------------------------

def _redis(db: int):
    import redis

    return redis.Redis(host=REDIS[0], port=REDIS[1], db=db, socket_timeout=10, socket_connect_timeout=5)


def claim_redis_db(stack_id: str) -> int:
    """An empty Redis database (1-15, in random order) for this stack's broker, claimed with a key
    set only if absent, so two stacks never share one."""
    import redis

    for db in random.sample(list(REDIS_DBS), len(REDIS_DBS)):
        client = _redis(db)
        try:
            if client.set(REDIS_CLAIM_KEY, stack_id, nx=True):
                if client.dbsize() == 1:
                    return db
                client.delete(REDIS_CLAIM_KEY)  # someone else's keys live here
        except redis.RedisError as exc:
            raise StackError(f"Redis at {REDIS[0]}:{REDIS[1]} (the Celery broker) does not answer: "
                             f"{type(exc).__name__}: {exc}; start redis-server") from None
        finally:
            client.close()
    raise StackError(f"no empty Redis database among {REDIS_DBS.start}-{REDIS_DBS.stop - 1} "
                     f"on {REDIS[0]}:{REDIS[1]}")


def flush_redis_db(db: int) -> None:
    client = _redis(db)
    try:
        client.flushdb()
    finally:
        client.close()


def redis_db_size(db: int) -> int:
    client = _redis(db)
    try:
        return int(client.dbsize())
    finally:
        client.close()


# -- the stack -----------------------------------------------------------------------------------

@dataclass
class Stack:
    """A running Airflow: its URL, credentials, logs and a small REST client."""

    base_url: str
    home: Path
    logs: Path
    password: str = field(repr=False)
    stack_id: str
    database: str
    env: dict[str, str] = field(repr=False)  # carries the JWT secret and the lab's tokens
    procs: dict[str, subprocess.Popen] = field(default_factory=dict, repr=False)
    user: str = USER
    executor: str = "local"
    state_database: str | None = None  # liftoff's state store, when the stack has one
    redis_db: int | None = None  # the Celery broker's Redis database (executor="celery")
    commands: dict[str, list[str]] = field(default_factory=dict, repr=False)
    started: list[subprocess.Popen] = field(default_factory=list, repr=False)  # every one, ever
    _token: str | None = field(default=None, repr=False)

    # -- REST ----------------------------------------------------------------------------------
    def token(self) -> str:
        if self._token is None:
            resp = requests.post(f"{self.base_url}/auth/token",
                                 json={"username": self.user, "password": self.password}, timeout=30)
            if resp.status_code != 201:
                raise StackError(f"POST /auth/token: HTTP {resp.status_code}", resp.status_code)
            self._token = resp.json()["access_token"]
        return self._token

    def request(self, method: str, path: str, body: Any = None, params: dict | None = None,
                ok: tuple[int, ...] = (200, 201)) -> requests.Response:
        """One call to ``/api/v2{path}``; a status outside ``ok`` raises StackError with the detail."""
        resp = requests.request(method, f"{self.base_url}/api/v2{path}", json=body, params=params,
                                headers={"Authorization": f"Bearer {self.token()}"}, timeout=180)
        if resp.status_code not in ok:
            try:
                detail = resp.json()
            except ValueError:
                detail = resp.text
            raise StackError(f"{method} {path}: HTTP {resp.status_code}: {detail}", resp.status_code, detail)
        return resp

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params=params or None).json()

    def wait_until_dag_parsed(self, dag_id: str, timeout: float = 180) -> dict:
        """Wait for the dag-processor to have serialized the DAG; fail early on an import error."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            resp = self.request("GET", f"/dags/{dag_id}", ok=(200, 404))
            if resp.status_code == 200:
                dag = resp.json()
                if dag.get("has_import_errors"):
                    raise StackError(f"{dag_id} has import errors: {self.import_errors()}")
                details = self.request("GET", f"/dags/{dag_id}/details", ok=(200, 404))
                if details.status_code == 200:
                    return dag
            errors = self.import_errors()
            if any(dag_id in e.get("filename", "") or dag_id in e.get("stack_trace", "") for e in errors):
                raise StackError(f"{dag_id} does not import: {errors}")
            time.sleep(1)
        raise StackError(f"{dag_id} was not parsed within {timeout:.0f}s; import errors: "
                         f"{self.import_errors()}; see {self.logs}")

    def import_errors(self) -> list[dict]:
        return self.get("/importErrors", limit=100).get("import_errors", [])

    def trigger(self, dag_id: str, conf: dict, run_id: str | None = None) -> dict:
        """Trigger a run through the REST API; returns the DAG run (``dag_run_id``, ``state``...)."""
        body: dict[str, Any] = {"conf": conf, "logical_date": None}
        if run_id:
            body["dag_run_id"] = run_id
        return self.request("POST", f"/dags/{dag_id}/dagRuns", body).json()

    def dag_run(self, dag_id: str, run_id: str) -> dict:
        return self.get(f"/dags/{dag_id}/dagRuns/{run_id}")

    def dag_runs(self, dag_id: str) -> list[dict]:
        return self.get(f"/dags/{dag_id}/dagRuns", limit=100).get("dag_runs", [])

    def task_instances(self, dag_id: str, run_id: str) -> list[dict]:
        out: list[dict] = []
        while True:
            page = self.get(f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances", limit=100, offset=len(out))
            out.extend(page.get("task_instances", []))
            if len(out) >= page.get("total_entries", 0) or not page.get("task_instances"):
                return out

    def task_states(self, dag_id: str, run_id: str) -> dict[str, str | None]:
        return {ti["task_id"]: ti.get("state") for ti in self.task_instances(dag_id, run_id)}

    def wait_run(self, dag_id: str, run_id: str, timeout: float = 600, interval: float = 1.0,
                 on_poll: Callable[[dict, dict[str, str | None]], None] | None = None,
                 until: tuple[str, ...] = tuple(TERMINAL)) -> str:
        """Poll until the run's state is in ``until``; ``on_poll(run, task_states)`` sees every poll."""
        deadline = time.monotonic() + timeout
        state = None
        while time.monotonic() < deadline:
            self.check_alive()
            run = self.dag_run(dag_id, run_id)
            state = run.get("state")
            if on_poll is not None:
                on_poll(run, self.task_states(dag_id, run_id))
            if state in until:
                return state
            time.sleep(interval)
        raise StackError(f"run {run_id} of {dag_id} still {state} after {timeout:.0f}s; task states: "
                         f"{self.task_states(dag_id, run_id)}; logs in {self.logs}")

    def running_task_instances(self, dag_id: str = "~", run_id: str = "~") -> list[dict]:
        """Task instances in state ``running`` (every DAG and run by default)."""
        page = self.get(f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances", state="running", limit=100)
        return page.get("task_instances", [])

    # -- the distributed set-up ----------------------------------------------------------------
    @property
    def state_url(self) -> str | None:
        """SQLAlchemy URL of liftoff's state store (PostgreSQL), when the stack has one."""
        return self.env.get("LIFTOFF_STATE_URL") if self.state_database else None

    @property
    def broker_url(self) -> str:
        if self.redis_db is None:
            raise StackError("this stack has no Celery broker (executor='local')")
        return f"redis://{REDIS[0]}:{REDIS[1]}/{self.redis_db}"

    def celery(self, action: str = "active", timeout: float = 3.0,
               limit: int | None = None) -> dict[str, Any]:
        """A Celery remote-control inspection (``ping``, ``active``, ``reserved``...) through the
        stack's broker: ``{worker name: reply}``, empty when no worker answered within
        ``timeout``; ``limit`` returns as soon as that many workers answered."""
        from celery import Celery

        app = Celery(broker=self.broker_url)
        try:
            return getattr(app.control.inspect(timeout=timeout, limit=limit), action)() or {}
        finally:
            app.close()

    # -- processes -----------------------------------------------------------------------------
    @property
    def sessions(self) -> list[int]:
        return [p.pid for p in self.started]

    def component_processes(self, name: str) -> list[int]:
        """Live pids of one component: its process and everything it started (its session)."""
        proc = self.procs.get(name)
        if proc is None:
            return []
        return sorted(pid for pid in stack_processes(self.stack_id, [proc.pid])
                      if (_stat(pid) or ("", -1))[1] == proc.pid)

    def start(self, name: str) -> subprocess.Popen:
        """Start one component (again): same command line and environment, log appended."""
        if name in self.procs and self.procs[name].poll() is None:
            raise StackError(f"{name} is already running (pid {self.procs[name].pid})")
        out = open(self.logs / f"{name}.log", "a")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(self.commands[name], env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                cwd=REPO_ROOT, stdin=subprocess.DEVNULL, start_new_session=True)
        out.close()
        self.procs[name] = proc
        self.started.append(proc)
        return proc

    def kill(self, name: str, timeout: float = 15.0) -> list[int]:
        """kill -9 one component and every process of its session (a Celery worker's pool and
        task processes, say), as if its machine died; returns the pids killed."""
        proc = self.procs.get(name)
        if proc is None or proc.poll() is not None:
            raise StackError(f"{name} is not running")
        killed: set[int] = set()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pids = self.component_processes(name)  # again: a process may have forked meanwhile
            if not pids:
                break
            killed.update(pids)
            _signal_all(pids, [proc.pid], signal.SIGKILL)
            time.sleep(0.05)
        proc.wait(timeout=timeout)
        left = self.component_processes(name)
        if left:
            raise StackError(f"{name}: processes survived SIGKILL: {left}")
        del self.procs[name]
        return sorted(killed)

    def listening(self) -> list[str]:
        """``ip:port`` of every TCP socket the stack's processes listen on."""
        import psutil

        pids = set(self.processes())
        return sorted(f"{c.laddr.ip}:{c.laddr.port}" for c in psutil.net_connections(kind="tcp")
                      if c.status == psutil.CONN_LISTEN and c.pid in pids)

    def processes(self) -> list[int]:
        """Every live process of this stack (the four servers, executor workers, task runners)."""
        return stack_processes(self.stack_id, self.sessions)

    def leftovers(self) -> list[str]:
        """What is left of the stack after its exit: processes, a listening api-server, the
        database (each a line; empty when everything is gone)."""
        out = [f"process {pid}: {_cmdline(pid)}" for pid in self.processes()]
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
            out.append(f"something still listens on 127.0.0.1:{self.port}")
        for name in (self.database, self.state_database):
            if name and database_exists(name):
                out.append(f"database {name} still exists")
        if self.redis_db is not None and redis_db_size(self.redis_db):
            out.append(f"Redis database {self.redis_db} still holds {redis_db_size(self.redis_db)} key(s)")
        return out

    @property
    def port(self) -> int:
        return int(self.base_url.rsplit(":", 1)[1])

    def check_alive(self) -> None:
        dead = {name: p.returncode for name, p in self.procs.items() if p.poll() is not None}
        if dead:
            raise StackError(f"airflow processes exited: {dead}; see {self.logs}")

    def log_text(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def all_logs_text(self) -> str:
        """Every process log and every task log under AIRFLOW_HOME/logs."""
        parts = [p.read_text(errors="replace") for p in sorted(self.logs.glob("*.log"))]
        task_logs = sorted(p for p in (self.home / "logs").rglob("*") if p.is_file())
        parts += [p.read_text(errors="replace") for p in task_logs]
        return "\n".join(parts)

    def cli_env(self, **extra: str) -> dict[str, str]:
        """Environment for the ``liftoff`` CLI pointed at this stack (password, not a token)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("LIFTOFF_API_")}
        env.update(LIFTOFF_API_URL=self.base_url, LIFTOFF_API_USER=self.user,
                   LIFTOFF_API_PASSWORD=self.password, PYTHONPATH=_pythonpath())
        env.update(extra)
        return env


def _pythonpath() -> str:
    return os.pathsep.join(str(REPO_ROOT / p) for p in ("include", "plugins", "."))


def airflow_env(home: Path, db_url: str, port: int, password_file: Path, stack_id: str,
                extra: dict[str, str]) -> dict[str, str]:
    """The environment every process of the stack gets: the caller's lab exports on top of a
    clean copy of ours (no stray AIRFLOW_*/LIFTOFF_* from the shell)."""
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("AIRFLOW", "LIFTOFF_", "_AIRFLOW")) and k != "PYTHONPATH"}
    cfg = {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO_ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO_ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__PARALLELISM": "8",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        # no nightly deploy_canary of its own (default 02:00 UTC): a stack up at that hour would
        # start deploying the newest nightly to its lab in the middle of a test (a CI run at 02:40
        # saw staging migrate during a rejected promotion); a test may still set a cron in `extra`
        "LIFTOFF_CANARY_CRON": "",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        # a task's supervisor waits this long for the api-server (default 5 s) before the task is
        # killed with "no reason given": two stacks on two slow cores answered in more than 5 s
        "AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT": "60",
        "AIRFLOW__CORE__AUTH_MANAGER":
            "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{USER}:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(password_file),
        "AIRFLOW__CORE__MIN_SERIALIZED_DAG_UPDATE_INTERVAL": "1",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": db_url,
        # No asyncpg here: an empty async URL turns Airflow's (unused) async engine off.
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC": "",
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API__WORKERS": "1",
        "AIRFLOW__API__SECRET_KEY": secrets.token_hex(16),
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(32),
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
        # a new file is parsed within REFRESH_INTERVAL; the unchanged ones again only every 5 min
        # (every 10 s, an idle stack's dag-processor took 14% of a core)
        "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "300",
        "AIRFLOW__DAG_PROCESSOR__BUNDLE_REFRESH_CHECK_INTERVAL": "2",
        "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "1",
        "AIRFLOW__SCHEDULER__JOB_HEARTBEAT_SEC": "1",
        "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "0.2",
        "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
        # liftoff's documented setting (README "Stuck tasks"): a lost task fails after 60 s, not 300
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "60",
        "AIRFLOW__TRIGGERER__JOB_HEARTBEAT_SEC": "1",
        # a deferring task tells the scheduler within 1 s (default 5): a trigger that fires before
        # the deferral is known has its task failed ("finished with state success, but ... queued")
        "AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL": "1",
        "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(home / "logs"),
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
        "PYTHONPATH": _pythonpath(),
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        MARKER: stack_id,
    }
    return {**base, **cfg, **extra}


def celery_env(db_url: str, redis_db: int, concurrency: int) -> dict[str, str]:
    """CeleryExecutor with the local Redis as the broker and the stack's database as the result
    backend (the docker-compose.yml set-up, on loopback)."""
    return {
        "AIRFLOW__CORE__EXECUTOR": EXECUTORS["celery"],
        "AIRFLOW__CELERY__BROKER_URL": f"redis://{REDIS[0]}:{REDIS[1]}/{redis_db}",
        # db+postgresql+psycopg2://, the driver said: SQLAlchemy 2.1 takes psycopg 3 (not installed)
        # for a bare postgresql://
        "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + db_url,
        "AIRFLOW__CELERY__WORKER_CONCURRENCY": str(concurrency),
        "AIRFLOW__CELERY__SYNC_PARALLELISM": "1",
        # Airflow's default, said explicitly: a killed worker's task is never redelivered during
        # a test; it is failed by its heartbeat timeout and retried by clearing it.
        "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__VISIBILITY_TIMEOUT": "86400",
    }


def state_env(state_url: str) -> dict[str, str]:
    """liftoff's state store for every process (and the lab's liftoff_state connection, too)."""
    conn = {"conn_type": "generic", "extra": {"url": state_url}}
    return {"LIFTOFF_STATE_URL": state_url,
            "AIRFLOW_CONN_LIFTOFF_STATE": json.dumps(conn, separators=(",", ":"))}


@contextlib.contextmanager
def airflow_stack(tmp_dir: Path, env: dict[str, str], start_timeout: float = 180, *,
                  executor: str = "local", concurrency: int = 4,
                  state_db: bool | None = None) -> Iterator[Stack]:
    """Start a real Airflow in ``tmp_dir`` (its own AIRFLOW_HOME and database), stop it after.

    ``executor``: ``local`` (LocalExecutor) or ``celery`` (CeleryExecutor, Redis broker, one
    worker of ``concurrency`` slots). ``state_db``: liftoff's state store in a fresh PostgreSQL
    database (default: with celery only; otherwise the caller's ``env`` decides, e.g. the lab's
    SQLite file). ``env`` is applied over the stack's settings, so a test can tune Airflow."""
    if executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {sorted(EXECUTORS)}, not {executor!r}")
    if state_db is None:
        state_db = executor == "celery"
    tmp_dir = Path(tmp_dir)
    stack_id = secrets.token_hex(6)
    home = tmp_dir / "airflow"
    logs = tmp_dir / "airflow-logs"
    home.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    password = secrets.token_urlsafe(18)
    password_file = home / "passwords.json"
    fd = os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps({USER: password}) + "\n")
    port = free_port()
    database = f"liftoff_af_{stack_id}"
    state_database = f"liftoff_st_{stack_id}" if state_db else None
    redis_db = claim_redis_db(stack_id) if executor == "celery" else None
    stack: Stack | None = None
    try:
        db_url = create_database(database)
        # finalize writes the run's note through the REST API as this user (README "Reasons")
        settings: dict[str, str] = {"AIRFLOW_CONN_LIFTOFF_AIRFLOW_API": json.dumps(
            {"conn_type": "http", "host": f"http://127.0.0.1:{port}", "login": USER, "password": password,
             "extra": {"timeout": 10}}, separators=(",", ":"))}
        if redis_db is not None:
            settings.update(celery_env(db_url, redis_db, concurrency))
        if state_database:
            settings.update(state_env(create_database(state_database)))
        proc_env = airflow_env(home, db_url, port, password_file, stack_id, {**settings, **env})
        if state_database:
            proc_env.update(state_env(settings["LIFTOFF_STATE_URL"]))  # over the lab's SQLite file
        stack = Stack(base_url=f"http://127.0.0.1:{port}", home=home, logs=logs, password=password,
                      stack_id=stack_id, database=database, env=proc_env, executor=executor,
                      state_database=state_database, redis_db=redis_db)
        with open(logs / "db-migrate.log", "w") as out:
            migrate = subprocess.run([str(VENV_BIN / "airflow"), "db", "migrate"], env=proc_env, stdout=out,
                                     stderr=subprocess.STDOUT, cwd=REPO_ROOT, timeout=300)
        if migrate.returncode != 0:
            raise StackError(f"airflow db migrate failed: {(logs / 'db-migrate.log').read_text()[-3000:]}")
        commands = dict(PROCESSES)
        if executor == "celery":
            commands["worker"] = WORKER
        fill = {"port": port, "concurrency": concurrency, "worker_name": f"liftoff-{stack_id}@%h"}
        for name, args in commands.items():
            stack.commands[name] = [str(VENV_BIN / "airflow"), *(a.format(**fill) for a in args)]
            (logs / f"{name}.log").write_text("")
            stack.start(name)
        _wait_api(stack, start_timeout)
        yield stack
    finally:
        survivors = stop_all(stack_id, stack.started) if stack is not None else []
        for name in (database, state_database):
            if name:
                with contextlib.suppress(Exception):
                    drop_database(name)
        if redis_db is not None:
            with contextlib.suppress(Exception):
                flush_redis_db(redis_db)
        if survivors:
            raise StackError(f"airflow processes survived SIGKILL: {survivors}")


def _wait_api(stack: Stack, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        stack.check_alive()
        try:
            resp = requests.get(f"{stack.base_url}/api/v2/monitor/health", timeout=5)
            if resp.status_code == 200:
                stack.token()
                return
            last = resp.status_code
        except requests.RequestException as exc:
            last = type(exc).__name__
        time.sleep(0.5)
    raise StackError(f"api-server did not answer within {timeout:.0f}s (last: {last}); "
                     f"see {stack.logs / 'api-server.log'}")
