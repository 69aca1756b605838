"""SSH fan-out to the fleet: one connection per host, a concurrency limit, audited commands.

Connections come from the SSH provider's async hook (``SSHHookAsync``, asyncssh underneath)
with the inventory's ``ssh`` connection (``AIRFLOW_CONN_LIFTOFF_SSH`` works without a
metadata DB: ``get_async_connection`` reads the env var through the secrets backends). Each
host gets one connection, opened on first use and reused for all its commands. When Airflow
is not importable, or does not know the connection (e.g. it is only in a
``LIFTOFF_CONNECTIONS`` file), the same asyncssh options are built from
``liftoff.settings.resolve_connection`` the way ``SSHHookAsync._get_conn`` builds them.

Host keys are always verified against the connection's ``known_hosts`` (or ``host_key``);
a connection with ``no_host_key_check`` is refused. Every command (and every failed
connection) is audited through ``liftoff.store`` with host, command, exit code, duration
and the tail of its output; audit rows are written in small batches off the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from liftoff.errors import ConfigError, RemoteError
from liftoff.inventory import HostRef

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 900.0  # a command; migrations pass hours
DEFAULT_CONNECT_TIMEOUT = 30.0
SSH_PORT = 22
TAIL_CHARS = 4000


@dataclass(frozen=True)
class CommandResult:
    """What one command did. ``exit_code`` is None when it never finished (timeout, lost
    connection, host unreachable); ``error`` then says why."""

    exit_code: int | None
    stdout: str
    stderr: str
    duration: float
    host: str = ""
    command: str = ""
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def tail(self, chars: int = TAIL_CHARS) -> str:
        text = self.stdout
        if self.stderr:
            text = (text + ("\n" if text and not text.endswith("\n") else "") + self.stderr)
        if self.error:
            text = (text + ("\n" if text and not text.endswith("\n") else "") + self.error)
        return text[-chars:]

    def describe(self) -> str:
        """One line for reports: command, exit code and the last line of output."""
        last = next((ln for ln in reversed(self.tail(1000).splitlines()) if ln.strip()), "")
        code = "no exit code" if self.exit_code is None else f"exit {self.exit_code}"
        return f"`{self.command}` on {self.host}: {code}" + (f": {last.strip()}" if last else "")

    def to_dict(self) -> dict:
        return asdict(self)


class CommandFailed(RemoteError):
    """A command exited non-zero or never finished; ``result`` holds what it did."""

    def __init__(self, result: CommandResult):
        self.result = result
        super().__init__(result.describe())


class _AuditSink:
    """Buffers audit rows and writes them with ``store.audit_many`` in a worker thread."""

    def __init__(self, store: Any, flush_s: float):
        self.store = store
        self.flush_s = flush_s
        self.rows: list[tuple] = []
        self.task: asyncio.Task | None = None
        self.lock = asyncio.Lock()

    def add(self, row: tuple) -> None:
        if self.store is None:
            return
        self.rows.append(row)
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._later())

    async def _later(self) -> None:
        await asyncio.sleep(self.flush_s)
        await self.flush()

    async def flush(self) -> None:
        async with self.lock:
            rows, self.rows = self.rows, []
            if rows:
                try:
                    await asyncio.to_thread(self.store.audit_many, rows)
                except Exception:
                    log.exception("could not write %d audit rows; logging them instead", len(rows))
                    for r in rows:
                        log.warning("audit %s %s %r exit=%s %.2fs", r[1], r[2], r[3], r[4], r[5])


def preferred_ciphers() -> list[str]:
    """asyncssh's default ciphers with AES-GCM first: AES runs in hardware and asyncssh's
    chacha20-poly1305 builds a cipher context per packet (about twice the client CPU per
    command). Still a preference: a server without AES-GCM negotiates the next one."""
    from asyncssh.encryption import get_default_encryption_algs

    names = [a.decode() for a in get_default_encryption_algs()]
    first = [a for a in ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com") if a in names]
    return first + [a for a in names if a not in first]


def _quiet_asyncssh() -> None:
    lg = logging.getLogger("asyncssh")
    if lg.level == logging.NOTSET:
        lg.setLevel(logging.WARNING)


def _truthy(value: Any) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "on")


def check_host_key_policy(extra: dict, conn_id: str) -> None:
    """Refuse connections that switch host-key checking off."""
    for key in ("no_host_key_check", "ignore_hostkey_verification"):
        if _truthy(extra.get(key, False)):
            raise ConfigError(f"connection {conn_id}: {key} is set; liftoff always verifies host keys "
                              "(set known_hosts or host_key instead)")


class Remote:
    """Run commands on hosts over SSH; ``async with Remote(...) as r: await r.run(host, cmd)``."""

    def __init__(self, conn_id: str = "liftoff_ssh", *, store: Any = None, run_id: str = "", env: str = "",
                 max_concurrency: int = 512, max_connecting: int = 64,
                 timeout: float = DEFAULT_TIMEOUT, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 keepalive_interval: int = 30, connect_retries: int = 3, audit_flush_s: float = 0.25):
        if timeout is None or timeout < 30:
            raise ConfigError(f"default command timeout {timeout!r}s is too short (at least 30 s)")
        self.conn_id = conn_id
        self.store = store
        self.run_id = run_id
        self.env = env
        self.timeout = float(timeout)
        self.connect_timeout = connect_timeout
        self.keepalive_interval = keepalive_interval
        self.connect_retries = connect_retries
        self._run_slots = asyncio.Semaphore(max_concurrency)
        self._connect_slots = asyncio.Semaphore(max_connecting)
        self._conns: dict[str, asyncio.Task] = {}
        self._audit = _AuditSink(store, audit_flush_s)
        self._mode: str | None = None  # "hook" or "settings"
        self._options: dict | None = None  # asyncssh options for the "settings" mode
        self._mode_lock = asyncio.Lock()
        self.commands_run = 0
        self.connections_opened = 0
        _quiet_asyncssh()

    async def __aenter__(self) -> Remote:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # -- connections ---------------------------------------------------------------------------------
    async def _choose_mode(self) -> None:
        async with self._mode_lock:
            if self._mode is not None:
                return
            if not _truthy(os.environ.get("LIFTOFF_NO_AIRFLOW", "")):
                try:
                    from airflow.providers.common.compat.connection import get_async_connection
                    from airflow.providers.ssh.hooks.ssh import SSHHookAsync  # noqa: F401
                except ImportError:
                    pass
                else:
                    try:
                        conn = await get_async_connection(self.conn_id)
                    except Exception as exc:  # not found, no Airflow context, ...
                        log.info("Airflow cannot resolve %s (%s); using liftoff.settings", self.conn_id,
                                 type(exc).__name__)
                    else:
                        self._options = self._options_from_hook(conn)
                        self._mode = "hook"
                        return
            self._options = self._options_from_settings()
            self._mode = "settings"

    def _preload_known_hosts(self, extra: dict) -> Any:
        """Parse the known_hosts file once for all hosts (asyncssh would re-read and re-parse
        it on every connection: O(hosts^2) key decodings for a large fleet). None when the
        connection pins a ``host_key`` instead (the hook handles that per host)."""
        if extra.get("host_key"):
            return None
        import asyncssh

        path = os.path.expanduser(extra.get("known_hosts") or "~/.ssh/known_hosts")
        if not os.path.isfile(path):
            raise ConfigError(f"connection {self.conn_id}: known_hosts file {path} does not exist; "
                              "host keys must be verifiable")
        return asyncssh.read_known_hosts(path)

    def _options_from_hook(self, conn: Any) -> dict:
        """asyncssh.connect options from the Airflow connection, parsed once by SSHHookAsync.

        The connection is looked up once per Remote, not once per host: inside a task, many
        concurrent lookups (and the secret masking they trigger) from the event loop deadlock
        the task's channel to its supervisor."""
        from airflow.providers.ssh.hooks.ssh import SSHHookAsync

        extra = conn.extra_dejson or {}
        check_host_key_policy(extra, self.conn_id)
        hook = SSHHookAsync(ssh_conn_id=self.conn_id, keepalive_interval=self.keepalive_interval)
        hook._parse_extras(conn)
        opts: dict[str, Any] = {"port": conn.port or SSH_PORT, "username": conn.login,
                                "keepalive_interval": self.keepalive_interval,
                                "encryption_algs": preferred_ciphers()}
        if conn.password:
            opts["password"] = conn.password
        if hook.key_file:
            opts["client_keys"] = hook.key_file
        if hook.private_key:
            import asyncssh

            opts["client_keys"] = [asyncssh.import_private_key(hook.private_key, hook.passphrase or None)]
        elif hook.passphrase:
            opts["passphrase"] = hook.passphrase
        if extra.get("host_key"):
            parts = str(extra["host_key"]).strip().split()
            opts["host_key"] = " ".join(parts[:2]) if len(parts) >= 2 else f"ssh-rsa {parts[0]}"
        else:
            opts["known_hosts"] = self._preload_known_hosts(extra)
        return opts

    def _options_from_settings(self) -> dict:
        """asyncssh.connect options as SSHHookAsync._get_conn builds them, from resolve_connection."""
        from liftoff.settings import resolve_connection

        info = resolve_connection(self.conn_id)
        extra = dict(info.extra_dejson)
        check_host_key_policy(extra, self.conn_id)
        opts: dict[str, Any] = {"port": info.port or SSH_PORT, "username": info.login,
                                "keepalive_interval": self.keepalive_interval,
                                "encryption_algs": preferred_ciphers()}
        if info.password:
            opts["password"] = info.password
        if extra.get("key_file"):
            opts["client_keys"] = extra["key_file"]
        if extra.get("private_key"):
            import asyncssh

            passphrase = extra.get("passphrase") or extra.get("private_key_passphrase") or None
            opts["client_keys"] = [asyncssh.import_private_key(extra["private_key"], passphrase)]
        elif extra.get("passphrase") or extra.get("private_key_passphrase"):
            opts["passphrase"] = extra.get("passphrase") or extra.get("private_key_passphrase")
        if extra.get("host_key"):
            parts = str(extra["host_key"]).strip().split()
            key = " ".join(parts[:2]) if len(parts) >= 2 else f"ssh-rsa {parts[0]}"
            opts["host_key"] = key  # bound to each host's address in _open
        else:
            opts["known_hosts"] = self._preload_known_hosts(extra)
        return opts

    async def _open(self, host: HostRef) -> Any:
        await self._choose_mode()
        import asyncssh

        opts = dict(self._options or {})
        key = opts.pop("host_key", None)
        if key:
            opts["known_hosts"] = f"{host.address} {key}".encode()
        return await asyncssh.connect(host.address, **opts)

    async def _connect(self, host: HostRef) -> Any:
        import asyncssh

        last: BaseException | None = None
        for attempt in range(self.connect_retries):
            async with self._connect_slots:
                try:
                    conn = await asyncio.wait_for(self._open(host), self.connect_timeout)
                    self.connections_opened += 1
                    return conn
                except (asyncssh.HostKeyNotVerifiable, asyncssh.PermissionDenied, ConfigError):
                    raise
                except (OSError, TimeoutError, asyncssh.Error) as exc:
                    last = exc
            await asyncio.sleep(0.2 * (attempt + 1))
        assert last is not None
        raise last

    async def connection(self, host: HostRef) -> Any:
        """The host's open connection (opened once, shared by concurrent callers)."""
        task = self._conns.get(host.name)
        if task is not None and task.done():
            exc = task.exception() if not task.cancelled() else None
            conn = None if exc else task.result()
            if exc is not None or conn is None or conn.is_closed():
                task = None
        if task is None:
            task = asyncio.get_running_loop().create_task(self._connect(host))
            self._conns[host.name] = task
        return await asyncio.shield(task)

    async def prepare(self, hosts: list[HostRef]) -> None:
        """Open connections ahead of use (errors surface later, on run)."""
        await asyncio.gather(*(self.connection(h) for h in hosts), return_exceptions=True)

    async def close_host(self, host: HostRef | str) -> None:
        name = host if isinstance(host, str) else host.name
        task = self._conns.pop(name, None)
        if task is None:
            return
        if not task.done():
            task.cancel()
            return
        if not task.cancelled() and task.exception() is None:
            conn = task.result()
            conn.close()
            with contextlib.suppress(TimeoutError, OSError):
                await asyncio.wait_for(conn.wait_closed(), 5)

    async def close(self) -> None:
        await asyncio.gather(*(self.close_host(n) for n in list(self._conns)), return_exceptions=True)
        await self._audit.flush()

    async def flush_audit(self) -> None:
        await self._audit.flush()

    # -- commands ----------------------------------------------------------------------------------
    async def run(self, host: HostRef, command: str, timeout: float | None = None,
                  started: Callable[[], None] | None = None) -> CommandResult:
        """Run one command; never raises for remote trouble (see ``CommandResult.error``).

        ``started`` is called once the remote command runs (or could not start), so that a
        caller can hold back less urgent work until then."""
        import asyncssh

        if not command or "\n" in command or "\0" in command:
            raise RemoteError(f"refusing an empty or multi-line command for {host.name}")
        limit = self.timeout if timeout is None else float(timeout)
        start = time.monotonic()
        pending = [started] if started is not None else []

        def now_started() -> None:
            while pending:
                pending.pop()()

        async with self._run_slots:
            try:
                conn = await self.connection(host)
            except Exception as exc:  # unreachable, refused, host key not verified ...
                now_started()
                result = CommandResult(None, "", "", time.monotonic() - start, host.name, command,
                                       f"cannot connect to {host.name} ({host.address}): "
                                       f"{type(exc).__name__}: {exc}")
                self._record(result)
                return result
            try:
                process = await conn.create_process(command)
                now_started()
                proc = await process.wait(False, limit)
                code = proc.exit_status
                error = ""
                if code is None:
                    signal = proc.exit_signal[0] if proc.exit_signal else None
                    error = f"killed by signal {signal}" if signal else "no exit status"
                result = CommandResult(code, _text(proc.stdout), _text(proc.stderr),
                                       time.monotonic() - start, host.name, command, error)
            except asyncssh.TimeoutError as exc:
                result = CommandResult(None, _text(exc.stdout), _text(exc.stderr), time.monotonic() - start,
                                       host.name, command, f"timed out after {limit:g}s")
            except asyncssh.ChannelOpenError as exc:  # the connection lives on (e.g. MaxSessions)
                result = CommandResult(None, "", "", time.monotonic() - start, host.name, command,
                                       f"session refused: {exc}")
            except (OSError, asyncssh.Error) as exc:
                result = CommandResult(None, "", "", time.monotonic() - start, host.name, command,
                                       f"connection lost: {type(exc).__name__}: {exc}")
                if self._conns.get(host.name) is not None:
                    await self.close_host(host)
        now_started()
        self.commands_run += 1
        self._record(result)
        return result

    async def check(self, host: HostRef, command: str, timeout: float | None = None) -> CommandResult:
        """Run a command and raise :class:`CommandFailed` unless it exits 0."""
        result = await self.run(host, command, timeout)
        if not result.ok:
            raise CommandFailed(result)
        return result

    def _record(self, r: CommandResult) -> None:
        level = logging.DEBUG if r.ok else logging.WARNING
        log.log(level, "%s: %s -> %s (%.2fs)", r.host, r.command, r.exit_code if r.error == "" else r.error,
                r.duration)
        self._audit.add((self.run_id or "-", self.env or "-", r.host, r.command, r.exit_code, r.duration,
                         r.tail()))


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)
