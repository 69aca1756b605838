"""Security properties that need no process: host keys are always verified (no code path that
switches checking off), and the ChatOps CLI never prints a password or token, even when the
API answers with them.

The rest is proven against real processes: task logs masking connection secrets (a real
scheduler, LocalExecutor and supervisor) and the API refusing unauthenticated calls in
tests/e2e/test_faults_dags.py; the CLI against a real api-server in tests/e2e/test_chatops_api.py;
host keys against the lab's sshd in tests/integration/test_fleet_lab.py.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from liftoff.chatops.api import AirflowClient, Credentials
from liftoff.chatops.cli import main
from liftoff.errors import ConfigError
from liftoff.inventory import HostRef
from liftoff.remote import Remote, check_host_key_policy
from tests.unit.http_fakes import LocalServer, QuietHandler

ROOT = Path(__file__).resolve().parents[2]
PRODUCTION_CODE = ("include", "plugins", "dags")

# What would switch host-key checking off, in any SSH library or client liftoff could use.
INSECURE = {
    "paramiko AutoAddPolicy": re.compile(r"AutoAddPolicy"),
    "paramiko WarningPolicy": re.compile(r"WarningPolicy"),
    "missing host key policy": re.compile(r"set_missing_host_key_policy"),
    "asyncssh known_hosts=None": re.compile(r"known_hosts\s*=\s*None|[\"']known_hosts[\"']\s*:\s*None"),
    "OpenSSH StrictHostKeyChecking=no": re.compile(r"StrictHostKeyChecking\s*=?\s*(no|off|accept-new)", re.I),
    "OpenSSH known hosts in /dev/null": re.compile(r"UserKnownHostsFile\s*=?\s*/dev/null", re.I),
    "no_host_key_check": re.compile(r"no_host_key_check"),
    "allow_host_key_change": re.compile(r"allow_host_key_change"),
    "TLS verify off": re.compile(r"verify\s*=\s*False|ssl_verify\s*=\s*False|CERT_NONE"),
}
# The one place allowed to name an insecure switch: the function that refuses it.
ALLOWED = {("include/liftoff/remote.py", "no_host_key_check")}


def production_files() -> list[Path]:
    files = [p for d in PRODUCTION_CODE for p in (ROOT / d).rglob("*.py") if "__pycache__" not in p.parts]
    assert len(files) > 20, files
    return sorted(files)


def test_no_production_code_turns_host_key_checking_off():
    found = []
    for path in production_files():
        rel = path.relative_to(ROOT).as_posix()
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            for name, pattern in INSECURE.items():
                if pattern.search(line) and not any(rel == f and k in line for f, k in ALLOWED):
                    found.append(f"{rel}:{lineno}: {name}: {line.strip()}")
    assert found == []


def test_the_allowed_mention_is_the_refusal():
    text = (ROOT / "include/liftoff/remote.py").read_text()
    mentions = [ln for ln in text.splitlines()
                if "no_host_key_check" in ln and not ln.lstrip().startswith("a ")]
    assert any("for key in (" in ln for ln in mentions), mentions
    assert "def check_host_key_policy" in text and "raise ConfigError" in text


def test_the_scanner_finds_what_it_looks_for(tmp_path):
    sample = ["client.set_missing_host_key_policy(paramiko.AutoAddPolicy())",
              "await asyncssh.connect(host, known_hosts=None)",
              "opts = {'known_hosts': None}", "ssh -o StrictHostKeyChecking=no host",
              "requests.get(url, verify=False)"]
    hits = {name for line in sample for name, p in INSECURE.items() if p.search(line)}
    assert {"paramiko AutoAddPolicy", "asyncssh known_hosts=None", "OpenSSH StrictHostKeyChecking=no",
            "TLS verify off", "missing host key policy"} <= hits


@pytest.mark.parametrize("extra", [
    {"no_host_key_check": True}, {"no_host_key_check": "true"}, {"no_host_key_check": "yes"},
    {"ignore_hostkey_verification": "1"}, {"known_hosts": "/dev/null", "no_host_key_check": "on"},
])
def test_connections_that_switch_checking_off_are_refused(extra: dict):
    with pytest.raises(ConfigError, match="always verifies host keys"):
        check_host_key_policy(extra, "liftoff_ssh")


def test_a_connection_without_a_readable_known_hosts_file_connects_nowhere(tmp_path, monkeypatch):
    missing = tmp_path / "nope" / "known_hosts"
    conn = {"conn_type": "ssh", "login": "x", "port": 1, "extra": {"known_hosts": str(missing)}}
    monkeypatch.setenv("AIRFLOW_CONN_LIFTOFF_SEC_TEST", json.dumps(conn))
    monkeypatch.setenv("LIFTOFF_NO_AIRFLOW", "true")

    async def go():
        async with Remote("liftoff_sec_test") as remote:
            return await remote.run(HostRef("web-01", "127.0.0.1"), "true", 30)

    result = asyncio.run(go())
    assert result.exit_code is None and not result.ok
    assert f"known_hosts file {missing} does not exist" in result.error
    assert "host keys must be verifiable" in result.error


# -- the CLI never prints secrets -----------------------------------------------------------------

PASSWORD = "pw-" + secrets.token_urlsafe(16)
TOKEN = "eyJhbGciOiJIUzI1NiJ9." + secrets.token_urlsafe(24) + "." + secrets.token_urlsafe(24)
JWT = re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}")


class HostileApi(QuietHandler):
    """An Airflow API that hands out a token, then answers every call with an error quoting the
    caller's Authorization header, the password and the token back (the worst case for a CLI
    that prints error details)."""

    def _answer(self, status: int, body: dict) -> None:
        self.reply(status, body)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length) or b"{}")
        if self.path == "/auth/token":
            if body.get("password") == PASSWORD:
                self._answer(201, {"access_token": TOKEN})
            else:
                self._answer(401, {"detail": f"bad password {body.get('password')}"})
            return
        self._answer(400, {"detail": f"refused conf {body} from {self.headers.get('Authorization')} "
                                     f"(password {PASSWORD})"})

    def do_GET(self) -> None:
        self._answer(500, {"detail": f"boom for {self.headers.get('Authorization')}, token {TOKEN}, "
                                     f"password {PASSWORD}"})

    do_PATCH = do_GET


@pytest.fixture(scope="module")
def api() -> Iterator[str]:
    server = LocalServer(HostileApi)
    try:
        yield server.url
    finally:
        server.close()


def cli(*argv: str, **env: str) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), env=env, stdout=out, stderr=err)
    return code, out.getvalue() + err.getvalue()


def assert_no_secret(printed: str, password: bool = True) -> None:
    assert not password or PASSWORD not in printed, printed
    assert TOKEN not in printed and TOKEN[-20:] not in printed, printed
    assert not JWT.search(printed), printed


@pytest.mark.parametrize("argv", [
    ("status",), ("--json", "status"), ("deploy", "17.6.0-ee.0", "--dry-run"),
    ("watch", "manual__2026-01-01T00:00:00+00:00", "--interval", "1"),
    ("lock", "gstg", "--reason", "incident 42"),
])
@pytest.mark.parametrize("auth", ["password", "token"])
def test_cli_prints_no_secret_even_when_the_api_echoes_them(api: str, argv: tuple[str, ...], auth: str):
    env = ({"LIFTOFF_API_USER": "admin", "LIFTOFF_API_PASSWORD": PASSWORD} if auth == "password"
           else {"LIFTOFF_API_TOKEN": TOKEN})
    code, printed = cli(*argv, LIFTOFF_API_URL=api, **env)
    assert code != 0, printed
    assert_no_secret(printed, password=auth == "password")  # with a token the CLI has no password
    assert "***" in printed, printed  # the API's detail was shown, redacted


def test_cli_wrong_password_names_the_user_not_the_password(api: str):
    code, printed = cli("status", LIFTOFF_API_URL=api, LIFTOFF_API_USER="admin",
                        LIFTOFF_API_PASSWORD=PASSWORD + "x")
    assert code == 4, printed
    assert "refused the credentials of user 'admin'" in printed
    assert_no_secret(printed)
    assert PASSWORD + "x" not in printed


def test_credentials_and_client_never_show_secrets_in_repr():
    creds = Credentials(url="http://127.0.0.1:1", user="admin", password=PASSWORD, token=TOKEN)
    assert_no_secret(repr(creds) + repr(AirflowClient(creds)) + str(creds))


@pytest.mark.parametrize("url", [
    f"http://admin:{PASSWORD}@127.0.0.1:8080",
    f"ftp://admin:{PASSWORD}@127.0.0.1:8080",
    f"http://127.0.0.1:8080/?token={TOKEN}",
], ids=["userinfo", "userinfo-and-bad-scheme", "token-in-query"])
def test_cli_refuses_credentials_in_the_url_without_echoing_them(url: str):
    code, printed = cli("status", LIFTOFF_API_URL=url, LIFTOFF_API_USER="admin", LIFTOFF_API_PASSWORD="x" * 8)
    assert code == 2, printed
    assert_no_secret(printed)
