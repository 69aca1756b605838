"""SSH fan-out to the fleet: one connection per host, a concurrency limit, audited commands.

Connections go through :class:`FleetSSHHook`, a small subclass of the SSH provider's async
hook (``SSHHookAsync``, asyncssh underneath), built once per fan-out from the inventory's
``ssh`` connection: looked up through Airflow (``AIRFLOW_CONN_LIFTOFF_SSH`` works without a
metadata DB: ``get_async_connection`` reads the env var through the secrets backends), or,
when Airflow is not importable or does not know it (a ``LIFTOFF_CONNECTIONS`` file), through
``liftoff.settings.resolve_connection`` (the same ``airflow.sdk.Connection``). Each host gets
one connection, opened on first use and reused for all its commands.

Host keys are always verified against the connection's ``known_hosts`` (or ``host_key``);
a connection with ``no_host_key_check`` is refused. Every command (and every failed
connection) is audited through ``liftoff.store`` with host, command, exit code, duration
and the tail of its output: its row is written BEFORE it runs (one transaction for a fan-out's
concurrent commands) and its result after, in small batches off the event loop.
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

from airflow.providers.ssh.hooks.ssh import SSHHookAsync

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
    """The audit trail of one fan-out, written ahead: :meth:`begin` records a command BEFORE it
    runs (the fan-out's concurrent starters share one transaction, ``store.audit_begin_many``)
    and :meth:`add` its result, buffered and written with ``store.audit_finish_many`` in a
    worker thread. A process killed -9 between the two leaves the row saying the command started
    with no result, never a command the trail does not name."""

    def __init__(self, store: Any, flush_s: float):
        self.store = store
        self.flush_s = flush_s
        self.rows: list[tuple] = []
        self.intents: list[tuple[tuple, asyncio.Future]] = []
        self.task: asyncio.Task | None = None
        self.intent_task: asyncio.Task | None = None
        self.lock = asyncio.Lock()

    async def begin(self, row: tuple) -> int | None:
        """Record (run_id, env, host, command) as started; its row id (None without a store).
        Raises when the row cannot be written: the command must not run then."""
        if self.store is None:
            return None
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.intents.append((row, future))
        if self.intent_task is None or self.intent_task.done():
            self.intent_task = loop.create_task(self._write_intents())
        return await future

    async def _write_intents(self) -> None:
        await asyncio.sleep(0)  # the rest of a fan-out's starters join this transaction
        while self.intents:
            batch, self.intents = self.intents, []
            try:
                ids = await asyncio.to_thread(self.store.audit_begin_many, [r for r, _ in batch])
            except Exception as exc:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), row_id in zip(batch, ids, strict=True):
                if not future.done():
                    future.set_result(row_id)

    def add(self, row_id: int | None, row: tuple) -> None:
        """The result of a begun command: (exit_code, duration_s, output_tail)."""
        if self.store is None or row_id is None:
            return
        self.rows.append((row_id, *row))
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
                    await asyncio.to_thread(self.store.audit_finish_many, rows)
                except Exception:
                    log.exception("could not write %d audit results; logging them instead", len(rows))
                    for r in rows:
                        log.warning("audit row %s exit=%s %.2fs", r[0], r[1], r[2])


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


async def lookup_connection(conn_id: str) -> tuple[Any, str]:
    """The SSH connection, once: through Airflow's async lookup (``AIRFLOW_CONN_*`` and the
    secrets backends, no metadata DB needed), else ``liftoff.settings.resolve_connection``
    (outside Airflow, or a connection only in a ``LIFTOFF_CONNECTIONS`` file)."""
    if not _truthy(os.environ.get("LIFTOFF_NO_AIRFLOW", "")):
        try:
            from airflow.providers.common.compat.connection import get_async_connection
        except ImportError:
            pass
        else:
            try:
                return await get_async_connection(conn_id), "airflow"
            except Exception as exc:  # not found, no Airflow context, ...
                log.info("Airflow cannot resolve %s (%s); using liftoff.settings", conn_id,
                         type(exc).__name__)
    from liftoff.settings import resolve_connection

    return resolve_connection(conn_id), "settings"


def _host_key_line(value: Any) -> str:
    parts = str(value).strip().split()
    return " ".join(parts[:2]) if len(parts) >= 2 else f"ssh-rsa {parts[0]}"


def _load_known_hosts(path: str, conn_id: str) -> Any:
    """Parse the known_hosts file once for all hosts (asyncssh would re-read and re-parse it
    on every connection: O(hosts^2) key decodings for a large fleet)."""
    import asyncssh

    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise ConfigError(f"connection {conn_id}: known_hosts file {path} does not exist; "
                          "host keys must be verifiable")
    return asyncssh.read_known_hosts(path)


class FleetSSHHook(SSHHookAsync):
    """The SSH provider's async hook for a fleet: the connection's settings go through the
    hook's own constructor once (user, password, key file, private key and passphrase,
    known_hosts, keepalive), then :meth:`connect` opens each host with them. What liftoff adds:
    known_hosts parsed once for every host, a pinned ``host_key`` bound to each host's address,
    AES-GCM preferred, and no way to switch host-key checking off."""

    def __init__(self, *, ssh_conn_id: str, host_key: str | None = None, known_hosts_parsed: Any = None,
                 **kwargs: Any):
        super().__init__(ssh_conn_id=ssh_conn_id, **kwargs)
        self.host_key = host_key
        self.known_hosts_parsed = known_hosts_parsed

    @classmethod
    def from_connection(cls, conn: Any, conn_id: str, keepalive_interval: int = 30) -> FleetSSHHook:
        extra = dict(conn.extra_dejson or {})
        check_host_key_policy(extra, conn_id)
        host_key = _host_key_line(extra["host_key"]) if extra.get("host_key") else None
        known = extra.get("known_hosts") or cls.default_known_hosts
        return cls(ssh_conn_id=conn_id, port=conn.port or SSH_PORT, username=conn.login,
                   password=conn.password or None, key_file=extra.get("key_file") or "",
                   passphrase=extra.get("passphrase") or extra.get("private_key_passphrase") or "",
                   private_key=extra.get("private_key") or "", known_hosts=known,
                   keepalive_interval=keepalive_interval, host_key=host_key,
                   known_hosts_parsed=None if host_key else _load_known_hosts(known, conn_id))

    def connect_options(self) -> dict[str, Any]:
        """asyncssh.connect options for every host (the address added per host), keys loaded once:
        asyncssh re-reads a key given by path on every connect, which at 1,000 hosts cost a fifth
        of the rollout's SSH set-up CPU. A pinned ``host_key`` is the one key trusted for the
        hosts these options reach (asyncssh's ``(trusted, ca, revoked)`` form)."""
        import asyncssh

        opts: dict[str, Any] = {"port": self.port, "username": self.username,
                                "keepalive_interval": self.keepalive_interval,
                                "encryption_algs": preferred_ciphers()}
        if self.password:
            opts["password"] = self.password
        if self.private_key:
            opts["client_keys"] = [asyncssh.import_private_key(self.private_key, self.passphrase or None)]
        elif self.key_file:
            opts["client_keys"] = asyncssh.load_keypairs(self.key_file, self.passphrase or None)
        elif self.passphrase:
            opts["passphrase"] = self.passphrase
        if self.host_key:
            opts["known_hosts"] = ([asyncssh.import_public_key(self.host_key)], [], [])
        else:
            opts["known_hosts"] = self.known_hosts_parsed
        return opts


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
        self._mode: str | None = None  # where the connection came from: "airflow" or "settings"
        self._hook: FleetSSHHook | None = None
        self._options: dict | None = None  # asyncssh options, host excepted
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
        """Look the connection up once per fan-out (inside a task, many concurrent lookups from
        the event loop deadlock the task's channel to its supervisor) and build the hook."""
        async with self._mode_lock:
            if self._hook is not None:
                return
            conn, mode = await lookup_connection(self.conn_id)
            hook = FleetSSHHook.from_connection(conn, self.conn_id, self.keepalive_interval)
            try:
                options = hook.connect_options()
            except (OSError, ValueError) as exc:  # a key that cannot be read or parsed
                raise ConfigError(f"connection {self.conn_id}: its key cannot be loaded: "
                                  f"{type(exc).__name__}: {exc}") from None
            self._hook, self._mode, self._options = hook, mode, options

    async def _open(self, host: HostRef) -> Any:
        await self._choose_mode()
        import asyncssh

        assert self._options is not None
        return await asyncssh.connect(host.address, **self._options)

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

        The command is in the audit trail before it runs (a write-ahead row; a command whose
        row cannot be written is not run). ``started`` is called once the remote command runs
        (or could not start), so that a caller can hold back less urgent work until then."""
        if not command or "\n" in command or "\0" in command:
            raise RemoteError(f"refusing an empty or multi-line command for {host.name}")
        limit = self.timeout if timeout is None else float(timeout)
        pending = [started] if started is not None else []

        def now_started() -> None:
            while pending:
                pending.pop()()

        async with self._run_slots:
            start = time.monotonic()
            try:
                row_id = await self._audit.begin((self.run_id or "-", self.env or "-", host.name, command))
            except Exception as exc:
                now_started()
                result = CommandResult(None, "", "", time.monotonic() - start, host.name, command,
                                       f"not run: its audit row could not be written ({type(exc).__name__}: "
                                       f"{exc})")
                log.warning("%s: %s -> %s", host.name, command, result.error)
                return result
            result = await self._execute(host, command, limit, start, now_started)
        now_started()
        self.commands_run += 1
        self._record(row_id, result)
        return result

    async def _execute(self, host: HostRef, command: str, limit: float, start: float,
                       now_started: Callable[[], None]) -> CommandResult:
        import asyncssh

        try:
            conn = await self.connection(host)
        except Exception as exc:  # unreachable, refused, host key not verified ...
            now_started()
            why = f"cannot connect to {host.name} ({host.address}): {type(exc).__name__}: {exc}"
            return CommandResult(None, "", "", time.monotonic() - start, host.name, command, why)
        try:
            process = await conn.create_process(command)
            now_started()
            proc = await process.wait(False, limit)
            code = proc.exit_status
            error = ""
            if code is None:
                signal = proc.exit_signal[0] if proc.exit_signal else None
                error = f"killed by signal {signal}" if signal else "no exit status"
            return CommandResult(code, _text(proc.stdout), _text(proc.stderr), time.monotonic() - start,
                                 host.name, command, error)
        except asyncssh.TimeoutError as exc:
            return CommandResult(None, _text(exc.stdout), _text(exc.stderr), time.monotonic() - start,
                                 host.name, command, f"timed out after {limit:g}s")
        except asyncssh.ChannelOpenError as exc:  # the connection lives on (e.g. MaxSessions)
            return CommandResult(None, "", "", time.monotonic() - start, host.name, command,
                                 f"session refused: {exc}")
        except (OSError, asyncssh.Error) as exc:
            if self._conns.get(host.name) is not None:
                await self.close_host(host)
            return CommandResult(None, "", "", time.monotonic() - start, host.name, command,
                                 f"connection lost: {type(exc).__name__}: {exc}")

    async def check(self, host: HostRef, command: str, timeout: float | None = None) -> CommandResult:
        """Run a command and raise :class:`CommandFailed` unless it exits 0."""
        result = await self.run(host, command, timeout)
        if not result.ok:
            raise CommandFailed(result)
        return result

    def _record(self, row_id: int | None, r: CommandResult) -> None:
        level = logging.DEBUG if r.ok else logging.WARNING
        log.log(level, "%s: %s -> %s (%.2fs)", r.host, r.command, r.exit_code if r.error == "" else r.error,
                r.duration)
        self._audit.add(row_id, (r.exit_code, r.duration, r.tail()))


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)
