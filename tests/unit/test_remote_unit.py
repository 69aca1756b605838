"""liftoff.remote against an in-process asyncssh server: one connection per host, per-command
timeouts, host keys verified, every command audited, the Airflow hook and the settings path."""

from __future__ import annotations

import asyncio
import json
import shlex

import asyncssh
import pytest
from airflow.providers.ssh.hooks.ssh import SSHHookAsync

from liftoff.errors import ConfigError
from liftoff.inventory import HostRef
from liftoff.remote import CommandFailed, FleetSSHHook, Remote
from liftoff.store import Store


class Server:
    """An SSH server on 127.0.0.1 that runs ``echo``, ``sleep``, ``fail`` and counts connections."""

    def __init__(self, tmp_path):
        self.host_key = asyncssh.generate_private_key("ssh-ed25519")
        client_key = asyncssh.generate_private_key("ssh-ed25519")
        self.key_file = tmp_path / "id_ed25519"
        client_key.write_private_key(str(self.key_file))
        self.client_public = client_key.export_public_key().decode()
        self.connections = 0
        self.running = 0
        self.max_running = 0
        self.commands: list[str] = []
        self.started = asyncio.Event()  # a command began
        self.release = asyncio.Event()  # lets ``block`` commands finish
        self.server = None
        self.port = 0
        self.tmp_path = tmp_path

    async def start(self) -> None:
        outer = self

        class Handler(asyncssh.SSHServer):
            def connection_made(self, conn):
                outer.connections += 1

        async def process(proc: asyncssh.SSHServerProcess) -> None:
            argv = shlex.split(proc.command or "")
            outer.commands.append(proc.command or "")
            outer.started.set()
            outer.running += 1
            outer.max_running = max(outer.max_running, outer.running)
            try:
                if argv[0] == "echo":
                    proc.stdout.write(" ".join(argv[1:]) + "\n")
                    proc.exit(0)
                elif argv[0] == "block":
                    await outer.release.wait()
                    proc.exit(0)
                elif argv[0] == "sleep":
                    await asyncio.sleep(float(argv[1]))
                    proc.exit(0)
                else:
                    proc.stderr.write("boom\n")
                    proc.exit(3)
            finally:
                outer.running -= 1

        self.server = await asyncssh.create_server(
            Handler, "127.0.0.1", 0, server_host_keys=[self.host_key],
            authorized_client_keys=asyncssh.import_authorized_keys(self.client_public),
            process_factory=process)
        self.port = self.server.sockets[0].getsockname()[1]

    def known_hosts(self, name: str = "known_hosts", trusted: bool = True) -> str:
        path = self.tmp_path / name
        key = self.host_key.export_public_key().decode().strip() if trusted else \
            asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
        path.write_text(f"[127.0.0.1]:{self.port} {key}\n")
        return str(path)

    def conn(self, **extra) -> str:
        extra = {"key_file": str(self.key_file), "known_hosts": self.known_hosts(), **extra}
        return json.dumps({"conn_type": "ssh", "host": "127.0.0.1", "port": self.port, "login": "liftoff",
                           "extra": extra})


HOST = HostRef("web-01-sv-test", "127.0.0.1")


def run(tmp_path, monkeypatch, body, *, airflow: bool = True, **extra):
    async def main():
        server = Server(tmp_path)
        await server.start()
        monkeypatch.setenv("AIRFLOW_CONN_LIFTOFF_TEST_SSH", server.conn(**extra))
        if not airflow:
            monkeypatch.setenv("LIFTOFF_NO_AIRFLOW", "1")
        try:
            return await body(server)
        finally:
            server.server.close()

    return asyncio.run(main())


@pytest.mark.parametrize("airflow", [True, False], ids=["SSHHookAsync", "settings"])
def test_one_connection_per_host_and_every_command_audited(tmp_path, monkeypatch, airflow):
    store = Store(f"sqlite:///{tmp_path / 's.db'}")

    async def body(server):
        async with Remote("liftoff_test_ssh", store=store, run_id="run-9", env="gstg") as remote:
            ok = await remote.run(HOST, "echo hello", 60)
            bad = await remote.run(HOST, "explode", 60)
            both = await asyncio.gather(remote.run(HOST, "sleep 0.2", 60), remote.run(HOST, "sleep 0.2", 60))
            mode = remote._mode
            assert isinstance(remote._hook, FleetSSHHook) and isinstance(remote._hook, SSHHookAsync)
        return server, ok, bad, both, mode

    server, ok, bad, both, mode = run(tmp_path, monkeypatch, body, airflow=airflow)
    assert mode == ("airflow" if airflow else "settings")
    assert (ok.exit_code, ok.stdout, ok.ok) == (0, "hello\n", True)
    assert (bad.exit_code, bad.stderr) == (3, "boom\n") and "exit 3: boom" in bad.describe()
    assert all(r.ok for r in both) and server.max_running == 2
    assert server.connections == 1
    rows = store.audit_records(run_id="run-9")
    assert [(r.host, r.command, r.exit_code, r.env) for r in rows] == [
        (HOST.name, "echo hello", 0, "gstg"), (HOST.name, "explode", 3, "gstg"),
        (HOST.name, "sleep 0.2", 0, "gstg"), (HOST.name, "sleep 0.2", 0, "gstg")]
    assert rows[1].output_tail == "boom\n" and rows[2].duration_s >= 0.2


def test_timeout_is_per_command_and_reported(tmp_path, monkeypatch):
    async def body(server):
        async with Remote("liftoff_test_ssh") as remote:
            slow = await remote.run(HOST, "sleep 5", timeout=0.3)
            after = await remote.run(HOST, "echo still here", 60)
            with pytest.raises(CommandFailed, match="timed out"):
                await remote.check(HOST, "sleep 5", timeout=0.2)
        return slow, after

    slow, after = run(tmp_path, monkeypatch, body)
    assert slow.exit_code is None and slow.error == "timed out after 0.3s" and slow.duration < 3
    assert after.ok


def test_default_timeout_is_long():
    with pytest.raises(ConfigError):
        Remote("x", timeout=10)
    assert Remote("x").timeout >= 600


def test_concurrency_limit(tmp_path, monkeypatch):
    async def body(server):
        async with Remote("liftoff_test_ssh", max_concurrency=3) as remote:
            await asyncio.gather(*(remote.run(HOST, "sleep 0.1", 60) for _ in range(9)))
        return server

    assert run(tmp_path, monkeypatch, body).max_running == 3


@pytest.mark.parametrize("airflow", [True, False], ids=["SSHHookAsync", "settings"])
def test_unknown_host_key_is_refused(tmp_path, monkeypatch, airflow):
    async def body(server):
        monkeypatch.setenv("AIRFLOW_CONN_LIFTOFF_TEST_SSH",
                           json.dumps({**json.loads(server.conn()), "extra": {
                               "key_file": str(server.key_file),
                               "known_hosts": server.known_hosts("other", trusted=False)}}))
        async with Remote("liftoff_test_ssh") as remote:
            return server, await remote.run(HOST, "echo hi", 60)

    server, r = run(tmp_path, monkeypatch, body, airflow=airflow)
    assert r.exit_code is None and "HostKeyNotVerifiable" in r.error


@pytest.mark.parametrize("airflow", [True, False], ids=["SSHHookAsync", "settings"])
def test_switching_host_key_checking_off_is_refused(tmp_path, monkeypatch, airflow):
    async def body(server):
        async with Remote("liftoff_test_ssh") as remote:
            return server, await remote.run(HOST, "echo hi", 60)

    server, r = run(tmp_path, monkeypatch, body, airflow=airflow, no_host_key_check="true")
    assert r.exit_code is None and "no_host_key_check" in r.error and server.connections == 0


@pytest.mark.parametrize("pinned", ["right", "wrong"])
def test_a_pinned_host_key_is_the_only_key_trusted(tmp_path, monkeypatch, pinned):
    async def body(server):
        key = server.host_key if pinned == "right" else asyncssh.generate_private_key("ssh-ed25519")
        line = key.export_public_key().decode().strip()
        extra = {"key_file": str(server.key_file), "host_key": line}
        conn = {**json.loads(server.conn()), "extra": extra}
        monkeypatch.setenv("AIRFLOW_CONN_LIFTOFF_TEST_SSH", json.dumps(conn))
        async with Remote("liftoff_test_ssh") as remote:
            first = await remote.run(HOST, "echo hi", 60)
            second = await remote.run(HostRef("web-02-sv-test", "127.0.0.1"), "echo hi", 60)
        return server, first, second

    server, first, second = run(tmp_path, monkeypatch, body)
    if pinned == "right":
        assert (first.stdout, second.stdout) == ("hi\n", "hi\n") and server.connections == 2
    else:
        assert all(r.exit_code is None and "HostKeyNotVerifiable" in r.error for r in (first, second))


def test_a_key_file_that_cannot_be_read_is_said_and_nothing_connects(tmp_path, monkeypatch):
    async def body(server):
        async with Remote("liftoff_test_ssh") as remote:
            return server, await remote.run(HOST, "echo hi", 60)

    server, r = run(tmp_path, monkeypatch, body, key_file=str(tmp_path / "no-such-key"))
    assert r.exit_code is None and "its key cannot be loaded" in r.error and "no-such-key" in r.error
    assert server.connections == 0


def test_unreachable_host_is_a_result_not_an_exception(tmp_path, monkeypatch):
    async def body(server):
        port = server.port
        server.server.close()
        await server.server.wait_closed()
        async with Remote("liftoff_test_ssh", connect_timeout=2, connect_retries=1) as remote:
            return port, await remote.run(HOST, "echo hi", 60)

    _, r = run(tmp_path, monkeypatch, body)
    assert r.exit_code is None and "cannot connect to web-01-sv-test" in r.error


def test_multi_line_commands_are_refused(tmp_path, monkeypatch):
    async def body(server):
        async with Remote("liftoff_test_ssh") as remote:
            with pytest.raises(Exception, match="multi-line"):
                await remote.run(HOST, "echo a\nreboot", 60)

    run(tmp_path, monkeypatch, body)


class CountingStore(Store):
    """A Store that counts its write-ahead audit transactions, or fails them."""

    def __init__(self, url: str, fail: bool = False):
        super().__init__(url)
        self.begins: list[int] = []
        self.fail = fail

    def audit_begin_many(self, records):
        records = list(records)
        if self.fail:
            raise OSError("disk full")
        self.begins.append(len(records))
        return super().audit_begin_many(records)


def test_a_command_is_in_the_audit_trail_before_it_runs(tmp_path, monkeypatch):
    """The row is written ahead: while the command runs, the trail already names it (no exit
    code, "started"); a process killed then leaves that row, not nothing. Its result fills the
    same row in."""
    from liftoff.store import AUDIT_STARTED

    store = Store(f"sqlite:///{tmp_path / 's.db'}")

    async def body(server):
        async with Remote("liftoff_test_ssh", store=store, run_id="run-w", env="gstg") as remote:
            task = asyncio.create_task(remote.run(HOST, "block", 60))
            await server.started.wait()
            during = [(r.command, r.exit_code, r.output_tail) for r in store.audit_records(run_id="run-w")]
            server.release.set()
            result = await task
        return during, result

    during, result = run(tmp_path, monkeypatch, body)
    assert during == [("block", None, AUDIT_STARTED)]
    assert result.ok
    rows = store.audit_records(run_id="run-w")
    assert [(r.command, r.exit_code, r.output_tail) for r in rows] == [("block", 0, "")]


def test_a_fan_out_writes_its_rows_ahead_in_one_transaction(tmp_path, monkeypatch):
    store = CountingStore(f"sqlite:///{tmp_path / 's.db'}")
    hosts = [HostRef(f"web-{i:02d}-sv-test", "127.0.0.1") for i in range(1, 21)]

    async def body(server):
        async with Remote("liftoff_test_ssh", store=store, run_id="run-f", env="gstg") as remote:
            await remote.prepare(hosts)
            return await asyncio.gather(*(remote.run(h, f"echo {h.name}", 60) for h in hosts))

    results = run(tmp_path, monkeypatch, body)
    assert all(r.ok for r in results)
    assert store.begins == [20]
    rows = store.audit_records(run_id="run-f")
    assert sorted((r.host, r.command, r.exit_code) for r in rows) == [
        (h.name, f"echo {h.name}", 0) for h in hosts]


def test_a_command_whose_audit_row_cannot_be_written_is_not_run(tmp_path, monkeypatch):
    store = CountingStore(f"sqlite:///{tmp_path / 's.db'}", fail=True)

    async def body(server):
        async with Remote("liftoff_test_ssh", store=store, run_id="run-x", env="gstg") as remote:
            result = await remote.run(HOST, "echo never", 60)
        return server, result

    server, result = run(tmp_path, monkeypatch, body)
    assert server.commands == [] and result.exit_code is None
    assert result.error == "not run: its audit row could not be written (OSError: disk full)"
    assert store.audit_records() == []
