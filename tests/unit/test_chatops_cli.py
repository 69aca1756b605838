"""The ``liftoff`` CLI: argument parsing, validation before any call, the conf each DAG gets,
and its handling of the API's answers, against a tiny fake Airflow API on loopback."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

from liftoff.chatops import cli
from liftoff.chatops.api import AirflowClient, BadInput, Credentials, decode_xcom, normalize_url
from liftoff.errors import InvalidInput
from tests.airflow_stack import free_port
from tests.unit.http_fakes import LocalServer, QuietHandler

USER, PASSWORD, TOKEN = "admin", "s3cret-pass-word", "eyJhbGciOi.fake-token-value.sig"
GOOD = "17.6.0+rnightly.101.abcdef2-0"
RUN = "manual__2026-11-29T11:00:00+00:00"
STAGES = ["stage_1_staging_migrations", "stage_2_staging_gitaly", "stage_3_staging_fleet"]


class FakeAirflow:
    """Just enough of /auth/token and /api/v2 for the CLI; records every request."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.dags = {"deploy_canary", "rollback", "deploy_production", "canary_weight", "post_deploy_patch",
                     "deploy_lock"}
        self.run_states: list[str] = ["success"]  # successive answers of GET dagRuns/{id}
        self.task_instances: list[dict] = []
        self.xcoms: dict[tuple[str, str], object] = {}
        self.trigger_error: tuple[int, object] | None = None
        self.valid_tokens = {TOKEN}
        self.http = LocalServer(self._handler(), poll_interval=0.02)
        self.url = self.http.url

    def triggers(self) -> list[dict]:
        return [r for r in self.requests if r["method"] == "POST" and r["path"].endswith("/dagRuns")]

    def clears(self) -> list[dict]:
        return [r for r in self.requests if r["path"].endswith("/clearTaskInstances")]

    def _handler(self):
        fake = self

        class Handler(QuietHandler):
            def _answer(self, status: int, body: object) -> None:
                self.reply(status, body)

            def _do(self, method: str) -> None:
                parts = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                path = unquote(parts.path)
                fake.requests.append({"method": method, "path": path, "query": parse_qs(parts.query),
                                      "body": body, "auth": self.headers.get("Authorization")})
                if path == "/auth/token" and method == "POST":
                    if body == {"username": USER, "password": PASSWORD}:
                        return self._answer(201, {"access_token": TOKEN})
                    return self._answer(401, {"detail": "Invalid credentials"})
                if self.headers.get("Authorization") not in {f"Bearer {t}" for t in fake.valid_tokens}:
                    return self._answer(401, {"detail": "Not authenticated"})
                m = re.fullmatch(r"/api/v2/dags/([^/]+)(/.*)?", path)
                if not m:
                    return self._answer(404, {"detail": "Not Found"})
                dag, rest = m.group(1), m.group(2) or ""
                if dag not in fake.dags:
                    return self._answer(404, {"detail": f"The Dag with ID: `{dag}` was not found"})
                if rest == "":
                    return self._answer(200, {"dag_id": dag, "is_paused": False})
                if rest == "/dagRuns" and method == "POST":
                    if fake.trigger_error:
                        return self._answer(*fake.trigger_error)
                    return self._answer(200, {"dag_run_id": RUN, "dag_id": dag, "state": "queued",
                                              "conf": body["conf"]})
                if rest == "/dagRuns" and method == "GET":
                    return self._answer(200, {"dag_runs": [self._run(dag, peek=True)], "total_entries": 1})
                if rest == f"/dagRuns/{RUN}":
                    return self._answer(200, self._run(dag))
                if rest == f"/dagRuns/{RUN}/taskInstances":
                    return self._answer(200, {"task_instances": fake.task_instances,
                                              "total_entries": len(fake.task_instances)})
                x = re.fullmatch(rf"/dagRuns/{re.escape(RUN)}/taskInstances/([^/]+)/xcomEntries/return_value",
                                 rest)
                if x:
                    if (dag, x.group(1)) in fake.xcoms:
                        value = fake.xcoms[(dag, x.group(1))]
                        return self._answer(200, {"key": "return_value", "value": value})
                    return self._answer(404, {"detail": "XCom entry not found"})
                if rest == "/clearTaskInstances" and method == "POST":
                    group = {t.split(".")[0] for t in body["task_ids"]}
                    hit = [t for t in fake.task_instances if t["state"] in ("failed", "upstream_failed")
                           and (t["task_id"].split(".")[0] in group or t["task_id"] == "finalize")]
                    if not body["dry_run"]:
                        for t in hit:
                            t["state"] = None
                        fake.run_states = ["queued"]
                    return self._answer(200, {"task_instances": hit, "total_entries": len(hit)})
                return self._answer(404, {"detail": "Not Found"})

            def _run(self, dag: str, peek: bool = False) -> dict:
                states = fake.run_states
                state = states[0] if peek or len(states) == 1 else states.pop(0)
                return {"dag_run_id": RUN, "dag_id": dag, "state": state, "conf": {"version": GOOD},
                        "start_date": "2026-11-29T11:00:01Z", "end_date": None, "run_type": "manual"}

            def do_GET(self) -> None:
                self._do("GET")

            def do_POST(self) -> None:
                self._do("POST")

        return Handler


@pytest.fixture
def fake() -> Iterator[FakeAirflow]:
    f = FakeAirflow()
    yield f
    f.http.close()


def run_cli(fake: FakeAirflow | None, *argv: str, env: dict | None = None) -> tuple[int, str, str]:
    if env is None:
        env = {"LIFTOFF_API_URL": fake.url if fake else "http://127.0.0.1:9",
               "LIFTOFF_API_USER": USER, "LIFTOFF_API_PASSWORD": PASSWORD}
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(list(argv), env=env, stdout=out, stderr=err)
    text_out, text_err = out.getvalue(), err.getvalue()
    for secret in (PASSWORD, TOKEN):
        assert secret not in text_out and secret not in text_err
    return code, text_out, text_err


def ti(task_id: str, state: str | None) -> dict:
    return {"task_id": task_id, "state": state, "map_index": -1}


def failed_run() -> list[dict]:
    return [ti("resolve_version", "success"),
            ti("stage_1_staging_migrations.precheck", "success"),
            ti("stage_1_staging_migrations.stage_done", "success"),
            ti("stage_3_staging_fleet.precheck", "success"),
            ti("stage_3_staging_fleet.deploy", "failed"),
            ti("stage_3_staging_fleet.qa", "upstream_failed"),
            ti("stage_4_staging_post_migrations.precheck", "upstream_failed"),
            ti("on_failure", "success"), ti("halt", "success"), ti("rollback", "skipped"),
            ti("finalize", "failed")]


# -- conf building ---------------------------------------------------------------------------

def test_deploy_triggers_deploy_canary_with_its_conf(fake):
    code, out, _ = run_cli(fake, "deploy", GOOD, "--dry-run", "--allow-precheck-failure",
                           "INC-42 known alert", "--on-failure", "halt", "--quiet-period", "5")
    assert code == 0
    [req] = fake.triggers()
    assert req["path"] == "/api/v2/dags/deploy_canary/dagRuns"
    assert req["body"] == {"logical_date": None, "conf": {
        "version": GOOD, "dry_run": True, "allow_precheck_failure": "INC-42 known alert",
        "on_failure": "halt", "quiet_period_seconds": 5}}
    assert RUN in out
    assert f"{fake.url}/dags/deploy_canary/runs/manual__2026-11-29T11%3A00%3A00%2B00%3A00" in out


def test_deploy_defaults_leave_the_dag_defaults_alone(fake):
    assert run_cli(fake, "deploy", "17.6.0-ee.0")[0] == 0
    assert fake.triggers()[0]["body"]["conf"] == {"version": "17.6.0-ee.0", "dry_run": False}


def test_promote_triggers_deploy_production(fake):
    code, _, _ = run_cli(fake, "promote", "17.6.0-ee.0", "--override-reason", "verified by hand on cny",
                         "--approval", "--canary-weight", "10")
    assert code == 0
    [req] = fake.triggers()
    assert req["path"] == "/api/v2/dags/deploy_production/dagRuns"
    assert req["body"]["conf"] == {"version": "17.6.0-ee.0", "approval": True,
                                   "override_reason": "verified by hand on cny", "canary_weight": 10}


def test_rollback_conf(fake):
    code = run_cli(fake, "rollback", "gprd", "--to", "17.5.0-ee.0", "--fast", "--reason", "INC-7 errors")[0]
    assert code == 0
    assert fake.triggers()[0]["path"] == "/api/v2/dags/rollback/dagRuns"
    assert fake.triggers()[0]["body"]["conf"] == {"environment": "gprd", "target_version": "17.5.0-ee.0",
                                                  "mode": "fast", "reason": "INC-7 errors"}
    assert run_cli(fake, "rollback", "gstg")[0] == 0
    assert fake.triggers()[1]["body"]["conf"] == {"environment": "gstg", "target_version": None,
                                                  "mode": "normal", "reason": None}


def test_rollback_check_waits_and_reads_the_safety_check_xcom(fake):
    fake.run_states = ["running", "success"]
    fake.xcoms[("rollback", "safety_check")] = json.dumps(
        {"safe": True, "current": GOOD, "target": "17.5.0-ee.0", "reasons": [],
         "command": "liftoff rollback gstg --to 17.5.0-ee.0"})
    code, out, _ = run_cli(fake, "rollback", "check", "gstg", "--interval", "0.05")
    assert code == 0, out
    assert fake.triggers()[0]["body"]["conf"] == {"environment": "gstg", "target_version": None,
                                                  "mode": "normal", "reason": None, "check_only": True}
    assert "is SAFE" in out and "liftoff rollback gstg --to 17.5.0-ee.0" in out


def test_rollback_check_unsafe_exits_1(fake):
    fake.xcoms[("rollback", "safety_check")] = {"safe": False, "reasons": ["post migration 000002 ran"]}
    code, out, _ = run_cli(fake, "--json", "rollback", "check", "gprd", "--interval", "0.05")
    assert code == 1
    assert json.loads(out)["result"]["safe"] is False


@pytest.mark.parametrize(("argv", "conf"), [
    (["5"], {"weight": 5, "force": False}),
    (["0", "--force"], {"weight": 0, "force": True}),
    (["--drain"], {"weight": "drain", "force": False}),
    (["--ready"], {"weight": "ready", "force": False}),
    (["--maint", "--force"], {"weight": "maint", "force": True}),
])
def test_canary_weight_conf(fake, argv, conf):
    assert run_cli(fake, "canary", "weight", *argv)[0] == 0
    [req] = fake.triggers()
    assert req["path"] == "/api/v2/dags/canary_weight/dagRuns" and req["body"]["conf"] == conf


@pytest.mark.parametrize("argv", [["101"], ["-1"], ["five"], [], ["5", "--drain"], ["--drain", "--ready"]])
def test_canary_weight_bad_input(fake, argv):
    assert run_cli(fake, "canary", "weight", *argv)[0] == 2
    assert fake.requests == []


def test_patch_conf_carries_the_file(fake, tmp_path: Path):
    patch = tmp_path / "fix-puma-timeout.patch"
    patch.write_text("--- a/x\n+++ b/x\n@@ -1 +1 @@\n-a\n+b\n")
    code, out, _ = run_cli(fake, "patch", "gprd", str(patch), "--roles", "web, api,web",
                           "--reason", "INC-9 fix")
    assert code == 0
    [req] = fake.triggers()
    assert req["path"] == "/api/v2/dags/post_deploy_patch/dagRuns"
    assert req["body"]["conf"] == {"environment": "gprd", "patch_id": "fix-puma-timeout",
                                   "patch": patch.read_text(), "roles": ["web", "api"], "reason": "INC-9 fix"}
    assert "---" not in out  # the patch itself is not echoed


@pytest.mark.parametrize(("roles", "name"),
                         [("web;reboot", "ok.patch"), ("", "ok.patch"), ("web", "b@d.patch")])
def test_patch_bad_input(fake, tmp_path: Path, roles, name):
    patch = tmp_path / name
    patch.write_text("content\n")
    assert run_cli(fake, "patch", "gprd", str(patch), "--roles", roles, "--reason", "INC-9 fix")[0] == 2
    assert fake.requests == []


def test_patch_missing_or_empty_file(fake, tmp_path: Path):
    missing = str(tmp_path / "nope.patch")
    assert run_cli(fake, "patch", "gprd", missing, "--roles", "web", "--reason", "x y")[0] == 2
    (tmp_path / "empty.patch").write_text("\n")
    assert run_cli(fake, "patch", "gprd", str(tmp_path / "empty.patch"), "--roles", "web",
                   "--reason", "x y")[0] == 2
    assert fake.requests == []


@pytest.mark.parametrize("action", ["lock", "unlock"])
def test_lock_conf(fake, action):
    assert run_cli(fake, action, "gprd", "--reason", "change freeze CR-12")[0] == 0
    [req] = fake.triggers()
    assert req["path"] == "/api/v2/dags/deploy_lock/dagRuns"
    assert req["body"]["conf"] == {"environment": "gprd", "action": action, "reason": "change freeze CR-12"}


def test_lock_needs_a_reason(fake):
    assert run_cli(fake, "lock", "gprd")[0] == 2
    assert fake.requests == []


# -- validation first, then errors mapped to exit codes ----------------------------------------

@pytest.mark.parametrize("argv", [
    ["deploy", "17.6.0"], ["deploy", "17.6.0-ee.0; rm -rf /"], ["deploy", "latest"],
    ["deploy", GOOD, "--allow-precheck-failure", "because; reboot"],
    ["deploy", GOOD, "--quiet-period", "-3"],
    ["promote", "v17"], ["rollback", "gstg;id"], ["rollback", "gstg", "--to", "old"],
    ["rollback", "check"], ["rollback", "check", "a", "b"], ["rollback", "../etc"],
    ["lock", "gprd", "--reason", "$(id)"], ["unlock", "gp rd", "--reason", "ok then"],
    ["retry", "bad run;id", "stage_3"], ["retry", RUN, "stage 3"], ["watch", "a|b"],
    ["deploy"], ["frobnicate"],
])
def test_bad_input_exits_2_before_any_call(fake, argv):
    code, out, err = run_cli(fake, *argv)
    assert code == 2, (out, err)
    assert fake.requests == []


def test_error_is_json_with_json_flag(fake):
    code, out, err = run_cli(fake, "--json", "deploy", "nope")
    assert code == 2
    assert json.loads(out) == {"error": err.removeprefix("liftoff: error: ").strip(), "exit_code": 2}


def test_api_down_exits_3():
    url = f"http://127.0.0.1:{free_port()}"
    code, _, err = run_cli(None, "status", env={"LIFTOFF_API_URL": url, "LIFTOFF_API_USER": USER,
                                                "LIFTOFF_API_PASSWORD": PASSWORD})
    assert code == 3
    assert f"cannot reach Airflow at {url}" in err


def test_wrong_password_exits_4(fake):
    env = {"LIFTOFF_API_URL": fake.url, "LIFTOFF_API_USER": USER, "LIFTOFF_API_PASSWORD": "not-it"}
    code, out, err = run_cli(fake, "deploy", GOOD, env=env)
    assert code == 4
    assert "refused the credentials" in err and "not-it" not in out + err
    assert fake.triggers() == []


def test_bad_token_exits_4_without_echoing_it(fake):
    env = {"LIFTOFF_API_URL": fake.url, "LIFTOFF_API_TOKEN": "eyJbad.token.value"}
    code, out, err = run_cli(fake, "status", env=env)
    assert code == 4
    assert "eyJbad.token.value" not in out + err


def test_token_from_env_is_used_as_is(fake):
    code, _, _ = run_cli(fake, "status", env={"LIFTOFF_API_URL": fake.url, "LIFTOFF_API_TOKEN": TOKEN})
    assert code == 0
    assert not any(r["path"] == "/auth/token" for r in fake.requests)
    assert all(r["auth"] == f"Bearer {TOKEN}" for r in fake.requests)


def test_expired_token_logs_in_again_once(fake):
    client = AirflowClient(Credentials(fake.url, USER, PASSWORD))
    client._token = "expired"
    assert client.dag("deploy_canary")["dag_id"] == "deploy_canary"
    assert [r["path"] for r in fake.requests] == ["/api/v2/dags/deploy_canary", "/auth/token",
                                                  "/api/v2/dags/deploy_canary"]


def test_no_credentials_exits_2(fake):
    assert run_cli(fake, "status", env={"LIFTOFF_API_URL": fake.url})[0] == 2
    assert run_cli(fake, "status", env={"LIFTOFF_API_URL": "ftp://x", "LIFTOFF_API_TOKEN": "t"})[0] == 2


def test_api_400_prints_its_detail_and_exits_2(fake):
    fake.trigger_error = (400, {"detail": "Invalid input for param allow_precheck_failure: "
                                          "'abc' is too short"})
    code, _, err = run_cli(fake, "deploy", GOOD, "--allow-precheck-failure", "abc")
    assert code == 2
    assert "'abc' is too short" in err


def test_api_422_lists_fields(fake):
    fake.trigger_error = (422, {"detail": [{"loc": ["body", "conf"], "msg": "Input should be a dict"}]})
    code, _, err = run_cli(fake, "deploy", GOOD)
    assert code == 2 and "conf: Input should be a dict" in err


def test_unknown_dag_exits_5(fake):
    fake.dags.discard("canary_weight")
    code, _, err = run_cli(fake, "canary", "weight", "5")
    assert code == 5 and "no DAG 'canary_weight'" in err


# -- status, watch, retry ----------------------------------------------------------------------

def test_status_with_a_missing_dag(fake):
    fake.dags.discard("deploy_production")
    fake.run_states = ["failed"]
    fake.task_instances = failed_run()
    fake.xcoms[("deploy_canary", "resolve_version")] = json.dumps(GOOD)
    fake.xcoms[("deploy_canary", "stage_1_staging_migrations.precheck")] = {"previous_version": "17.5.0-ee.0"}
    code, out, _ = run_cli(fake, "status")
    assert code == 0, out
    assert "deploy_production: not deployed" in out
    assert f"{RUN}  failed  17.5.0-ee.0 -> {GOOD}" in out
    assert re.search(r"stage_3_staging_fleet\s+failed", out)
    assert re.search(r"stage_4_staging_post_migrations\s+upstream_failed", out)
    code, out, _ = run_cli(fake, "--json", "status")
    data = json.loads(out)["dags"]
    assert data["deploy_production"] == {"exists": False, "runs": []}
    [run] = data["deploy_canary"]["runs"]
    assert run["stages"]["stage_1_staging_migrations"] == "success" and run["version"] == GOOD
    assert run["tasks"]["halt"] == "success"


def test_watch_prints_transitions_and_exits_by_result(fake):
    fake.run_states = ["running", "failed"]
    fake.task_instances = failed_run()
    code, out, _ = run_cli(fake, "watch", RUN, "--interval", "0.05")
    assert code == 1
    assert re.search(r"stage_3_staging_fleet\s+pending -> failed", out)
    assert f"liftoff retry {RUN} stage_3_staging_fleet --dag deploy_canary" in out
    fake.run_states = ["success"]
    fake.task_instances = [ti("stage_1_staging_migrations.precheck", "success")]
    code, out, _ = run_cli(fake, "--json", "watch", RUN, "--dag", "deploy_canary")
    assert code == 0
    events = [json.loads(line) for line in out.splitlines()]
    assert events[-1]["event"] == "end" and events[-1]["state"] == "success"


def test_watch_gives_up_after_max_wait(fake):
    fake.run_states = ["running"]
    code, _, err = run_cli(fake, "watch", RUN, "--interval", "0.05", "--max-wait", "0.2")
    assert code == 1 and "still running" in err


def test_retry_shows_then_clears_the_failed_stage(fake):
    fake.run_states = ["failed"]
    fake.task_instances = failed_run()
    code, out, _ = run_cli(fake, "retry", RUN, "3")
    assert code == 0, out
    preview, real = fake.clears()
    group = ["stage_3_staging_fleet.deploy", "stage_3_staging_fleet.precheck", "stage_3_staging_fleet.qa"]
    for req, dry in ((preview, True), (real, False)):
        assert req["path"] == "/api/v2/dags/deploy_canary/clearTaskInstances"
        assert req["body"]["dry_run"] is dry
        assert req["body"]["only_failed"] is True and req["body"]["include_downstream"] is True
        assert req["body"]["dag_run_id"] == RUN and sorted(req["body"]["task_ids"]) == group
    assert out.index("stage_3_staging_fleet.deploy") < out.index("cleared 3 task(s)")
    assert "+ finalize (1 downstream task)" in out


def test_retry_dry_run_only_shows(fake):
    fake.run_states = ["failed"]
    fake.task_instances = failed_run()
    code, out, _ = run_cli(fake, "--json", "retry", RUN, "stage_3_staging_fleet", "--dry-run")
    assert code == 0
    assert [c["body"]["dry_run"] for c in fake.clears()] == [True]
    will = {t["task_id"] for t in json.loads(out)["will_clear"]}
    assert will >= {"stage_3_staging_fleet.deploy", "finalize"}


@pytest.mark.parametrize(("states", "stage", "message"), [
    ("running", "stage_3", "still running"),
    ("failed", "stage_1", "nothing failed in stage_1_staging_migrations"),
    ("failed", "stage_4", "what failed: stage_3_staging_fleet"),
    ("failed", "stage_9", "no stage 'stage_9'"),
])
def test_retry_refusals(fake, states, stage, message):
    fake.run_states = [states]
    fake.task_instances = failed_run()
    code, _, err = run_cli(fake, "retry", RUN, stage)
    assert code == 2 and message in err
    assert fake.clears() == []


def test_retry_refuses_a_run_that_rolled_back(fake):
    fake.run_states = ["failed"]
    fake.task_instances = [ti("rollback", "success") if t["task_id"] == "rollback" else t
                           for t in failed_run()]
    code, _, err = run_cli(fake, "retry", RUN, "stage_3")
    assert code == 2 and "went to rollback" in err
    assert fake.clears() == []


def test_retry_unknown_run(fake):
    code, _, err = run_cli(fake, "retry", "manual__nope", "stage_3")
    assert code == 5 and "no run 'manual__nope'" in err


# -- pure helpers ----------------------------------------------------------------------------

@pytest.mark.parametrize(("states", "expected"), [
    (["success", "skipped"], "success"), (["skipped"], "skipped"), ([None, None], "pending"),
    (["success", None], "running"), (["success", "deferred"], "deferred"),
    (["deferred", "running"], "running"), (["success", "failed", "upstream_failed"], "failed"),
    (["upstream_failed", None], "upstream_failed"), (["queued"], "running"),
])
def test_unit_state(states, expected):
    assert cli.unit_state(states) == expected


def test_resolve_stage():
    assert cli.resolve_stage("stage_2", STAGES) == "stage_2_staging_gitaly"
    assert cli.resolve_stage("3", STAGES) == "stage_3_staging_fleet"
    assert cli.resolve_stage("stage_1_staging_migrations", STAGES) == "stage_1_staging_migrations"
    with pytest.raises(InvalidInput):
        cli.resolve_stage("stage_7", STAGES)


def test_helpers():
    assert normalize_url("http://127.0.0.1:8080/") == "http://127.0.0.1:8080"
    with pytest.raises(BadInput):
        normalize_url("http://admin:pw@127.0.0.1:8080")
    assert decode_xcom('{"a": 1}') == {"a": 1} and decode_xcom("plain") == "plain" and decode_xcom(3) == 3
    assert "s3cret" not in repr(Credentials("http://x", USER, "s3cret", "tok"))


def test_json_flag_after_the_command(fake):
    code, out, _ = run_cli(fake, "lock", "gstg", "--reason", "CR-1 freeze", "--json")
    assert code == 0
    assert json.loads(out)["conf"] == {"environment": "gstg", "action": "lock", "reason": "CR-1 freeze"}
