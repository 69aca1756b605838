"""The ``liftoff`` CLI: argument parsing, validation before any call, the conf each DAG gets,
and its handling of the API's answers, against a tiny fake Airflow API on loopback."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
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
                     "deploy_lock", "fast_deploy", "traffic"}
        self.run_states: list[str] = ["success"]  # successive answers of GET dagRuns/{id}
        self.task_instances: list[dict] = []
        self.xcoms: dict[tuple[str, str], object] = {}
        self.trigger_error: tuple[int, object] | None = None
        self.valid_tokens = {TOKEN}
        self.health: dict | None = None  # GET /api/v2/monitor/health; None: 404
        self.hitl: list[dict] = []  # GET /api/v2/dags/~/dagRuns/~/hitlDetails
        self.note: str | None = None  # the run's note
        self.hitl_user = {"id": USER, "name": USER}  # who answers a HITL request (PATCH)
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
                if path == "/api/v2/monitor/health":
                    if fake.health is None:
                        return self._answer(404, {"detail": "Not Found"})
                    return self._answer(200, fake.health)
                if path == "/api/v2/dags/~/dagRuns/~/hitlDetails":
                    return self._answer(200, {"hitl_details": fake.hitl, "total_entries": len(fake.hitl)})
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
                x = re.fullmatch(rf"/dagRuns/{re.escape(RUN)}/taskInstances/([^/]+)/xcomEntries/([^/]+)",
                                 rest)
                if x:
                    key = (dag, x.group(1)) if x.group(2) == "return_value" else (dag, x.group(1), x.group(2))
                    if key in fake.xcoms:
                        return self._answer(200, {"key": x.group(2), "value": fake.xcoms[key]})
                    return self._answer(404, {"detail": "XCom entry not found"})
                if rest == f"/dagRuns/{RUN}/hitlDetails":
                    return self._answer(200, self._run_hitl(dag, parse_qs(parts.query)))
                h = re.fullmatch(rf"/dagRuns/{re.escape(RUN)}/taskInstances/([^/]+)/(-?\d+)/hitlDetails",
                                 rest)
                if h:
                    return self._hitl_one(dag, h.group(1), int(h.group(2)), method, body)
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

            def _run_hitl(self, dag: str, query: dict) -> dict:
                mine = [d for d in fake.hitl if d["task_instance"]["dag_id"] == dag]
                if query.get("response_received") == ["false"]:
                    mine = [d for d in mine if not d["response_received"]]
                return {"hitl_details": mine, "total_entries": len(mine)}

            def _hitl_one(self, dag: str, task: str, map_index: int, method: str, body: dict | None) -> None:
                found = [d for d in fake.hitl if (d["task_instance"]["dag_id"], d["task_instance"]["task_id"],
                                                  d["task_instance"]["map_index"]) == (dag, task, map_index)]
                if not found:
                    return self._answer(404, {"detail": "Human-in-the-loop detail does not exist"})
                detail = found[0]
                if method == "GET":
                    return self._answer(200, detail)
                if detail["response_received"]:
                    return self._answer(409, {"detail": "Human-in-the-loop detail has already been updated "
                                                        "for Task Instance with id x and is not allowed to "
                                                        "write again."})
                assigned = {u["id"] for u in detail["assigned_users"]}
                if assigned and fake.hitl_user["id"] not in assigned:
                    name = fake.hitl_user["name"]
                    return self._answer(403, {"detail": f"User={name} (id={name}) is not a respondent for "
                                                        "the task."})
                if set(body["chosen_options"]) - set(detail["options"]):
                    return self._answer(400, {"detail": "Invalid options"})
                at = "2026-12-03T08:10:00Z"
                detail.update(response_received=True, chosen_options=body["chosen_options"],
                              params_input=body["params_input"], responded_by_user=fake.hitl_user,
                              responded_at=at)
                return self._answer(200, {"responded_by": fake.hitl_user, "responded_at": at,
                                          "chosen_options": body["chosen_options"],
                                          "params_input": body["params_input"]})

            def _run(self, dag: str, peek: bool = False) -> dict:
                states = fake.run_states
                state = states[0] if peek or len(states) == 1 else states.pop(0)
                return {"dag_run_id": RUN, "dag_id": dag, "state": state, "conf": {"version": GOOD},
                        "start_date": "2026-11-29T11:00:01Z", "end_date": None, "run_type": "manual",
                        "note": fake.note}

            def do_GET(self) -> None:
                self._do("GET")

            def do_POST(self) -> None:
                self._do("POST")

            def do_PATCH(self) -> None:
                self._do("PATCH")

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
    run_id, note = req["body"].pop("dag_run_id"), req["body"].pop("note")
    assert req["body"] == {"logical_date": None, "conf": {
        "version": GOOD, "dry_run": True, "allow_precheck_failure": "INC-42 known alert",
        "on_failure": "halt", "quiet_period_seconds": 5}}
    assert re.fullmatch(rf"deploy_{re.escape(GOOD)}__\d{{8}}T\d{{6}}Z_[0-9a-f]{{4}}", run_id)
    assert note == f"deploy {GOOD} (dry run: plan only) (liftoff CLI)"
    assert RUN in out
    assert f"{fake.url}/dags/deploy_canary/runs/manual__2026-11-29T11%3A00%3A00%2B00%3A00" in out


def test_run_ids_say_what_the_run_does_in_airflow_s_alphabet():
    from liftoff.chatops.cli import readable_run_id
    from liftoff.versions import validate_name

    when = datetime(2026, 12, 3, 8, 0, 12, tzinfo=UTC)
    for what, label in [("rollback gprd to the previous version", "rollback_gprd_to_the_previous_version"),
                        ("canary weight 25 (forced)", "canary_weight_25"),
                        ("patch p-1 on gprd (web, api)", "patch_p-1_on_gprd"),
                        ("<script>alert(1)</script>", "script_alert_1_script")]:
        run_id = readable_run_id(what, when)
        assert run_id.startswith(f"{label}__20261203T080012Z_"), run_id
        assert re.fullmatch(r"[A-Za-z0-9_.~:+-]+", run_id) and validate_name("run_id", run_id) == run_id
    assert readable_run_id("deploy x", when) != readable_run_id("deploy x", when)


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


def test_promote_takes_a_quiet_period_and_its_reason(fake):
    code, _, _ = run_cli(fake, "promote", "17.6.0-ee.0", "--quiet-period", "30",
                         "--allow-precheck-failure", "INC-9 short window agreed")
    assert code == 0
    assert fake.triggers()[0]["body"]["conf"] == {
        "version": "17.6.0-ee.0", "approval": False, "quiet_period_seconds": 30,
        "allow_precheck_failure": "INC-9 short window agreed"}
    code, _, err = run_cli(fake, "promote", "17.6.0-ee.0", "--quiet-period", "-5")
    assert code == 2 and "quiet-period" in err and len(fake.triggers()) == 1


def test_rollout_mode_is_passed_to_every_pipeline_that_rolls_a_fleet(fake, capsys):
    assert run_cli(fake, "deploy", GOOD, "--rollout", "window")[0] == 0
    assert run_cli(fake, "promote", GOOD, "--rollout", "lockstep")[0] == 0
    assert run_cli(fake, "rollback", "gprd", "--rollout", "window")[0] == 0
    assert [(t["path"].split("/")[4], t["body"]["conf"]["rollout_mode"]) for t in fake.triggers()] == [
        ("deploy_canary", "window"), ("deploy_production", "lockstep"), ("rollback", "window")]
    code = run_cli(fake, "deploy", GOOD, "--rollout", "sliding")[0]
    err = capsys.readouterr().err  # argparse's own refusal
    assert code == 2 and "--rollout: invalid choice: 'sliding'" in err and len(fake.triggers()) == 3
    from liftoff.chatops.cli import deploy_conf

    with pytest.raises(InvalidInput, match="^rollout must be one of lockstep, window, got 'sliding'$"):
        deploy_conf(GOOD, rollout="sliding")


def test_status_into_a_closed_pipe_ends_quietly(fake):
    """`liftoff status | head`: the reader went away; no BrokenPipeError traceback."""
    import os
    import subprocess
    import sys

    fake.task_instances = failed_run()
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first line
    try:
        done = subprocess.run([str(Path(sys.executable).parent / "liftoff"), "status"], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=60,
                              env={**os.environ, "LIFTOFF_API_URL": fake.url, "LIFTOFF_API_USER": USER,
                                   "LIFTOFF_API_PASSWORD": PASSWORD})
    finally:
        os.close(write_end)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr


def test_rollback_conf(fake):
    code = run_cli(fake, "rollback", "gprd", "--to", "17.5.0-ee.0", "--fast", "--reason", "INC-7 errors")[0]
    assert code == 0
    assert fake.triggers()[0]["path"] == "/api/v2/dags/rollback/dagRuns"
    assert fake.triggers()[0]["body"]["conf"] == {"environment": "gprd", "target_version": "17.5.0-ee.0",
                                                  "mode": "fast", "reason": "INC-7 errors"}
    assert run_cli(fake, "rollback", "gstg")[0] == 0
    assert fake.triggers()[1]["body"]["conf"] == {"environment": "gstg", "target_version": None,
                                                  "mode": "normal", "reason": None}


def test_fast_deploy_triggers_fast_deploy_with_its_conf(fake):
    code, out, _ = run_cli(fake, "fast-deploy", "gprd", "17.6.1-ee.0", "--reason", "CVE-2026-1 fix",
                           "--rollout", "window")
    assert code == 0
    [req] = fake.triggers()
    assert req["path"] == "/api/v2/dags/fast_deploy/dagRuns"
    assert req["body"]["conf"] == {"environment": "gprd", "version": "17.6.1-ee.0",
                                   "reason": "CVE-2026-1 fix", "internal": False, "rollout_mode": "window"}
    assert req["body"]["note"] == "fast deploy 17.6.1-ee.0 to gprd (liftoff CLI)"
    assert req["body"]["dag_run_id"].startswith("fast_deploy_17.6.1-ee.0_to_gprd__")
    assert RUN in out


def test_an_internal_fast_deploy_shows_its_label_and_never_its_version(fake):
    from liftoff.status import internal_label

    secret = "17.6.2+rnightly.5703.c57c57c-0"
    traces = (secret, secret.replace("+", "_"), "rnightly.5703.c57c57c-0", "c57c57c", "17.6.2")
    for as_json in ((), ("--json",)):
        code, out, err = run_cli(fake, *as_json, "fast-deploy", "gstg", secret, "--internal",
                                 "--reason", f"embargoed fix, build {secret}, commit c57c57c")
        assert code == 0, err
        assert internal_label(secret) in out
        assert not [t for t in traces if t in out + err], out
    for req in fake.triggers():  # the DAG alone gets the version
        assert req["body"]["conf"]["version"] == secret and req["body"]["conf"]["internal"] is True
        shown = json.dumps({k: v for k, v in req["body"].items() if k != "conf"})
        assert not [t for t in traces if t in shown], shown
    printed = json.loads(out)["conf"]
    label = internal_label(secret)
    assert printed["version"] == label
    assert printed["reason"] == f"embargoed fix, build {label}, commit {label}"


@pytest.mark.parametrize("argv, message", [
    (("fast-deploy", "gprd", "17.6.1-ee.0", "--reason", " "), "reason"),
    (("fast-deploy", "gp rd", "17.6.1-ee.0", "--reason", "CVE fix"), "env"),
    (("fast-deploy", "gprd", "17.6.1-ee.0\n", "--reason", "CVE fix"), "version"),
])
def test_fast_deploy_refuses_bad_input_in_one_line_and_triggers_nothing(fake, argv, message):
    code, _, err = run_cli(fake, *argv)
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert fake.triggers() == []


def test_traffic_triggers_the_traffic_dag_with_only_what_was_given(fake):
    assert run_cli(fake, "traffic")[0] == 0
    code, out, _ = run_cli(fake, "traffic", "--env", "gstg", "--env", "gprd-cny", "--env", "gstg",
                           "--rps", "20", "--for", "10m", "--endpoint", "/explore", "--endpoint", "/help?x=1",
                           "--concurrency", "4")
    assert code == 0 and RUN in out
    first, second = fake.triggers()
    assert first["path"] == "/api/v2/dags/traffic/dagRuns" and first["body"]["conf"] == {}
    assert second["body"]["conf"] == {"environments": ["gstg", "gprd-cny"], "rps": 20.0, "duration_s": 600,
                                      "concurrency": 4, "endpoints": ["/explore", "/help?x=1"]}
    assert second["body"]["note"] == "traffic to gstg, gprd-cny (liftoff CLI)"


@pytest.mark.parametrize("argv, message", [
    (("--rps", "0"), "rps must be within"),
    (("--rps", "1000"), "rps must be within"),
    (("--for", "2h"), "at most 3600 s"),
    (("--for", "0m"), "is zero"),
    (("--concurrency", "0"), "concurrency must be within"),
    (("--endpoint", "http://elsewhere.example/"), "is not a path"),
    (("--endpoint", "/../admin"), "is not a path"),
    (("--env", "gs tg"), "env"),
])
def test_traffic_refuses_bad_input_in_one_line_and_triggers_nothing(fake, argv, message):
    code, _, err = run_cli(fake, "traffic", *argv)
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert fake.triggers() == []


def test_rollback_check_waits_and_reads_the_safety_check_xcom(fake):
    fake.run_states = ["running", "success"]
    fake.xcoms[("rollback", "safety_check")] = json.dumps(
        {"safe": True, "current": GOOD, "target": "17.5.0-ee.0", "reasons": [],
         "command": "liftoff rollback gstg --to 17.5.0-ee.0"})
    code, out, _ = run_cli(fake, "rollback", "check", "gstg", "--interval", "0.05")
    assert code == 0, out
    assert fake.triggers()[0]["body"]["conf"] == {"environment": "gstg", "target_version": None,
                                                  "mode": "normal", "reason": None, "check_only": True}
    assert "is SAFE" in out and "command: liftoff rollback gstg --to 17.5.0-ee.0" in out
    assert "override" not in out


def test_rollback_check_unsafe_exits_1(fake):
    fake.xcoms[("rollback", "safety_check")] = {"safe": False, "reasons": ["post migration 000002 ran"]}
    code, out, _ = run_cli(fake, "--json", "rollback", "check", "gprd", "--interval", "0.05")
    assert code == 1
    assert json.loads(out)["result"]["safe"] is False


def test_rollback_check_not_safe_prints_why_and_what_to_do_not_the_command(fake):
    fake.xcoms[("rollback", "safety_check")] = json.dumps(
        {"safe": False, "overridable": True, "current": GOOD, "target": "17.5.0-ee.0", "env": "gprd",
         "reasons": ["post-deployment migration 20261128_drop_x ran on gprd's database"],
         "command": "liftoff rollback gprd --to 17.5.0-ee.0"})
    code, out, _ = run_cli(fake, "rollback", "check", "gprd", "--interval", "0.05")
    assert code == 1
    assert "rollback of gprd to 17.5.0-ee.0 is NOT SAFE" in out
    assert "command:" not in out
    assert "  - post-deployment migration 20261128_drop_x ran on gprd's database" in out
    [next_line] = [ln for ln in out.splitlines() if "next:" in ln]
    assert 'liftoff rollback gprd --to 17.5.0-ee.0 --override-reason "WHY"' in next_line
    assert out.count("liftoff rollback gprd --to") == 1  # only with the override reason


def test_rollback_check_not_safe_and_not_overridable(fake):
    fake.xcoms[("rollback", "safety_check")] = {
        "safe": False, "overridable": False, "current": GOOD, "target": None,
        "reasons": ["no earlier successful deployment of gstg is recorded: name the target version"],
        "command": "liftoff rollback gstg --to VERSION"}
    code, out, _ = run_cli(fake, "rollback", "check", "gstg", "--interval", "0.05")
    assert code == 1
    assert "is NOT SAFE" in out and "command:" not in out and "--override-reason" not in out
    assert "cannot be overridden" in out and "then check again: liftoff rollback check gstg" in out
    assert "no earlier successful deployment of gstg" in out


@pytest.mark.parametrize(("result", "shows_command"), [
    ({"safe": True, "command": "liftoff rollback gstg --to 17.5.0-ee.0"}, True),
    ({"safe": False, "command": "liftoff rollback gstg --to 17.5.0-ee.0", "reasons": ["r"]}, False),
    ({"command": "liftoff rollback gstg --to 17.5.0-ee.0"}, False),  # no verdict: no command either
])
def test_rollback_check_lines_show_the_command_only_when_safe(result, shows_command):
    lines = cli.rollback_check_lines("gstg", result)
    assert any(ln.startswith("command: liftoff rollback") for ln in lines) is shows_command


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


def _hitl(state: str, subject: str) -> dict:
    return {"subject": subject, "options": ["Approve", "Reject"], "created_at": "2026-12-03T08:00:00Z",
            "assigned_users": [{"id": "bob", "name": "bob"}], "response_received": False,
            "task_instance": {"dag_id": "deploy_production", "dag_run_id": RUN, "task_id": "approval",
                              "map_index": -1, "state": state}}


def test_status_says_how_many_commits_are_not_deployed_yet():
    from liftoff.chatops.cli import _pressure_lines

    assert _pressure_lines(None) == []
    assert _pressure_lines({"commits": 7, "newest_build": "17.9.0+rnightly.43.abcdef2-0",
                            "web_url": "https://ops.example/compare?from=a&to=b", "note": None}) == [
        "  not deployed yet: 7 commit(s) (up to 17.9.0+rnightly.43.abcdef2-0): "
        "https://ops.example/compare?from=a&to=b"]
    unknown = {"commits": None, "newest_build": None, "web_url": None, "note": "GitLab unreachable"}
    assert _pressure_lines(unknown) == ["  not deployed yet: not known (GitLab unreachable)"]


def test_status_shows_pending_approvals_with_where_to_answer(fake):
    fake.task_instances = failed_run()
    fake.run_states = ["failed"]
    fake.hitl = [_hitl("deferred", "Promote 17.6.0 <b>now</b>?"), _hitl("failed", "an old request")]
    fake.xcoms[("deploy_canary", "finalize", "summary")] = {
        "status": "failed", "summary": "deploy_canary failed at stage_3_staging_fleet.deploy (first): boom"}
    code, out, _ = run_cli(fake, "status")
    assert code == 0
    [req] = [r for r in fake.requests if r["path"].endswith("/hitlDetails")]
    assert req["query"]["response_received"] == ["false"]
    assert re.search(rf"^approval waiting: Promote 17\.6\.0 <b>now</b>\?  run {re.escape(RUN)}  "
                     r"since .*for bob$", out, re.M)
    assert "an old request" not in out
    assert f"  answer it: {fake.url}/dags/deploy_production/runs/" in out
    assert "    deploy_canary failed at stage_3_staging_fleet.deploy (first): boom" in out.splitlines()
    code, out, _ = run_cli(fake, "--json", "status")
    data = json.loads(out)
    [waiting] = data["approvals"]
    assert waiting["task_id"] == "approval"
    assert waiting["url"].endswith("/tasks/approval/required_actions?map_index=-1")
    assert data["dags"]["deploy_canary"]["runs"][0]["summary"].endswith("(first): boom")
    fake.hitl = []
    assert "approvals: none waiting" in run_cli(fake, "status")[1]


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


def test_watch_lists_the_failed_tasks_first_failed_first(fake):
    fake.run_states = ["failed"]
    fake.task_instances = [
        {**ti("rollback", "failed"), "start_date": "2026-11-29T11:09:00Z"},
        {**ti("stage_3_staging_fleet.deploy", "failed"), "start_date": "2026-11-29T11:05:00Z"},
        {**ti("stage_2_staging_gitaly.qa", "failed"), "start_date": "2026-11-29T11:07:00+00:00"},
        ti("stage_4_staging_post_migrations.precheck", "upstream_failed")]
    code, out, _ = run_cli(fake, "watch", RUN, "--interval", "0.05")
    assert code == 1
    assert "  failed: stage_3_staging_fleet.deploy, stage_2_staging_gitaly.qa, rollback" in out
    assert f"liftoff retry {RUN} stage_3_staging_fleet --dag deploy_canary" in out


def test_watch_ends_with_the_run_s_sentence(fake):
    """The reason, not only task names: finalize's summary (pushed as XCom ``summary`` when
    the run failed) is printed, as plain text, and is in the JSON end event."""
    fake.run_states = ["running", "failed"]
    fake.task_instances = failed_run()
    first = "deploy_canary failed at stage_3_staging_fleet.deploy (first): web-02-sv-gstg"
    sentence = f"{first}: install failed (exit 100)\x1b[2J; locks taken: gstg; locks released: gstg"
    fake.xcoms[("deploy_canary", "finalize", "summary")] = json.dumps({"status": "failed",
                                                                        "summary": sentence})
    code, out, _ = run_cli(fake, "watch", RUN, "--interval", "0.05")
    assert code == 1
    [line] = [ln for ln in out.splitlines() if "install failed" in ln]
    assert line.strip().startswith(first)
    assert "\x1b" not in out
    code, out, _ = run_cli(fake, "--json", "watch", RUN, "--interval", "0.05")
    end = [json.loads(ln) for ln in out.splitlines() if '"end"' in ln][-1]
    assert end["summary"].startswith("deploy_canary failed at stage_3_staging_fleet.deploy (first)")


def test_watch_of_a_dag_without_finalize_prints_the_failure_note(fake):
    fake.run_states = ["failed"]
    fake.task_instances = [ti("set_weight", "failed")]
    fake.note = "deploy_canary failed at set_weight: fe-02-lb-gprd unreachable (connection refused)"
    code, out, _ = run_cli(fake, "watch", RUN, "--interval", "0.05")
    assert code == 1 and f"  {fake.note}" in out.splitlines()
    fake.note = "canary weight 10 (liftoff CLI)"  # what the CLI said at the start: not a result
    code, out, _ = run_cli(fake, "watch", RUN, "--interval", "0.05")
    assert "(liftoff CLI)" not in out


def test_watch_of_a_good_run_prints_its_sentence_too(fake):
    fake.run_states = ["success"]
    fake.task_instances = [ti("resolve_version", "success"), ti("finalize", "success")]
    fake.xcoms[("deploy_canary", "finalize")] = {"status": "success",
                                                 "summary": "deploy_canary succeeded; no lock taken"}
    code, out, _ = run_cli(fake, "watch", RUN, "--interval", "0.05")
    assert code == 0 and "  deploy_canary succeeded; no lock taken" in out.splitlines()


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


# -- stuck tasks: watch says when a running task may have lost its worker ----------------------

def _ago(seconds: float) -> str:
    return (datetime.now(UTC) - timedelta(seconds=seconds)).isoformat().replace("+00:00", "Z")


def running_run(**extra) -> list[dict]:
    return [ti("stage_1_staging_migrations.precheck", "success"),
            {**ti("stage_3_staging_fleet.deploy", "running"), "try_number": 1, **extra},
            ti("finalize", None)]


def health(scheduler_silent_s: float | None, status: str = "healthy") -> dict:
    beat = None if scheduler_silent_s is None else _ago(scheduler_silent_s)
    return {"metadatabase": {"status": "healthy"},
            "scheduler": {"status": status, "latest_scheduler_heartbeat": beat},
            "triggerer": {"status": "healthy", "latest_triggerer_heartbeat": _ago(1)}}


def test_watch_says_when_the_scheduler_stopped_heartbeating(fake):
    fake.run_states = ["running", "running", "running", "failed"]
    fake.task_instances = running_run()
    fake.health = health(95, "unhealthy")
    code, out, _ = run_cli(fake, "watch", RUN, "--interval", "0.05")
    assert code == 1
    [line] = [ln for ln in out.splitlines() if "heartbeat" in ln]  # said once, not on every poll
    assert re.search(r"task stage_3_staging_fleet\.deploy is running but the scheduler has not heartbeated "
                     r"for 9\d s: the task's worker may have died with it", line)
    assert "Airflow fails a task that stopped heartbeating after the heartbeat timeout (60 s)" in line
    assert f"`liftoff retry {RUN} stage_3_staging_fleet --dag deploy_canary`" in line
    # /monitor/health is read at most every HEALTH_EVERY_S, not on every poll
    assert len([r for r in fake.requests if r["path"] == "/api/v2/monitor/health"]) == 1


def test_watch_says_nothing_while_the_scheduler_heartbeats(fake):
    fake.run_states = ["running", "running", "success"]
    fake.task_instances = running_run()
    fake.health = health(2)
    code, out, _ = run_cli(fake, "watch", RUN, "--interval", "0.05")
    assert code == 0
    assert "heartbeat" not in out
    assert any(r["path"] == "/api/v2/monitor/health" for r in fake.requests)


def test_watch_without_a_health_endpoint_goes_on(fake):
    fake.run_states = ["running", "success"]
    fake.task_instances = running_run()
    fake.health = None  # 404
    code, out, _ = run_cli(fake, "watch", RUN, "--interval", "0.05")
    assert code == 0 and "heartbeat" not in out


def test_watch_uses_a_task_s_own_heartbeat_when_the_api_gives_one(fake):
    fake.run_states = ["running", "running", "failed"]
    fake.task_instances = running_run(last_heartbeat_at=_ago(45))
    fake.health = health(1)
    code, out, _ = run_cli(fake, "watch", RUN, "--interval", "0.05")
    assert code == 1
    assert re.search(r"task stage_3_staging_fleet\.deploy has not heartbeated for 4\d s: its worker may have "
                     r"died; Airflow fails it after the heartbeat timeout \(60 s\), then "
                     rf"`liftoff retry {re.escape(RUN)} stage_3_staging_fleet --dag deploy_canary`", out)
    assert not any(r["path"] == "/api/v2/monitor/health" for r in fake.requests)


def test_watch_json_has_a_heartbeat_event(fake):
    fake.run_states = ["running", "failed"]
    fake.task_instances = running_run()
    fake.health = health(120)
    code, out, _ = run_cli(fake, "--json", "watch", RUN, "--interval", "0.05")
    events = [json.loads(line) for line in out.splitlines()]
    [beat] = [e for e in events if e["event"] == "heartbeat"]
    assert beat["task_id"] == "stage_3_staging_fleet.deploy" and beat["source"] == "scheduler"
    assert 115 <= beat["silent_s"] <= 130


def test_deploy_watch_says_it_too(fake):
    fake.run_states = ["queued", "running", "failed"]
    fake.task_instances = running_run()
    fake.health = health(61)
    code, out, _ = run_cli(fake, "deploy", GOOD, "--watch", "--interval", "0.05")
    assert code == 1
    assert "scheduler has not heartbeated for" in out


def test_rollback_check_says_it_while_it_waits(fake):
    fake.run_states = ["running", "running", "success"]
    fake.task_instances = [{**ti("safety_check", "running"), "try_number": 1}]
    fake.health = health(300)
    fake.xcoms[("rollback", "safety_check")] = {"safe": True,
                                                "command": "liftoff rollback gstg --to 17.5.0-ee.0"}
    code, out, _ = run_cli(fake, "rollback", "check", "gstg", "--interval", "0.05")
    assert code == 0
    assert "task safety_check is running but the scheduler has not heartbeated" in out
    assert "clear safety_check in the Airflow UI" in out  # not a stage: no liftoff retry
    code, out, err = run_cli(fake, "--json", "rollback", "check", "gstg", "--interval", "0.05")
    json.loads(out)  # still one document; the warning went to stderr
    assert "liftoff: warning: task safety_check" in err


NOW = datetime(2026, 12, 2, 16, 40, tzinfo=UTC)


def _at(seconds_ago: float) -> str:
    return (NOW - timedelta(seconds=seconds_ago)).isoformat()


@pytest.mark.parametrize(("silent", "warned"), [(29, False), (30, False), (31, True), (400, True)])
def test_stale_heartbeats_threshold(silent, warned):
    tis = [{**ti("stage_3_staging_fleet.deploy", "running"), "last_heartbeat_at": _at(silent)}]
    found = cli.stale_heartbeats(tis, dag_id="deploy_canary", run_id=RUN, now=NOW)
    assert bool(found) is warned
    if warned:
        assert found[0]["silent_s"] == silent and found[0]["source"] == "task"


def test_stale_heartbeats_only_for_running_tasks():
    tis = [ti("a", "deferred"), ti("b", "queued"), ti("c", "success"), ti("d", None),
           ti("stage_2_staging_gitaly.deploy", "running")]
    dead = {"scheduler": {"status": "unhealthy", "latest_scheduler_heartbeat": _at(200)}}
    found = cli.stale_heartbeats(tis, dag_id="deploy_canary", run_id=RUN, now=NOW, health=dead)
    assert [f["task_id"] for f in found] == ["stage_2_staging_gitaly.deploy"]
    # health unknown (None, or no scheduler in it): nothing is claimed
    for unknown in (None, {}, {"metadatabase": {"status": "healthy"}}):
        assert cli.stale_heartbeats(tis, dag_id="deploy_canary", run_id=RUN, now=NOW, health=unknown) == []
    # no scheduler heartbeat at all and not healthy: said, without a number
    none = {"scheduler": {"status": None, "latest_scheduler_heartbeat": None}}
    [f] = cli.stale_heartbeats(tis, dag_id="deploy_canary", run_id=RUN, now=NOW, health=none)
    assert "has not heartbeated at all" in f["message"] and f["silent_s"] is None


class _HealthOnly:
    def __init__(self) -> None:
        self.answer: dict = {}

    def health(self) -> dict:
        return self.answer


def test_heartbeat_watch_says_once_and_when_heard_from_again(monkeypatch):
    monkeypatch.setattr(cli, "HEALTH_EVERY_S", 0.0)
    client = _HealthOnly()
    out = cli.Output(False, io.StringIO(), io.StringIO())
    watch = cli.HeartbeatWatch(client, out, "deploy_canary", RUN, clock=lambda: NOW)
    tis = [{**ti("stage_3_staging_fleet.deploy", "running"), "try_number": 1}]
    client.answer = {"scheduler": {"status": "unhealthy", "latest_scheduler_heartbeat": _at(50)}}
    assert len(watch(tis)) == 1 and len(watch(tis)) == 1
    client.answer = {"scheduler": {"status": "healthy", "latest_scheduler_heartbeat": _at(1)}}
    assert watch(tis) == []
    text = out.out.getvalue()
    assert text.count("has not heartbeated for 50 s") == 1
    assert "the scheduler heartbeats again; task stage_3_staging_fleet.deploy is still running" in text


# -- the finalize summary and the version help (plugins/liftoff_airflow/dagkit.py) ----------------

DAGS = Path(__file__).resolve().parents[2] / "dags"


@pytest.fixture(scope="module")
def real_dags() -> dict:
    from airflow.dag_processing.dagbag import DagBag

    dags = {}
    for name in ("deploy_canary", "deploy_production"):
        bag = DagBag(dag_folder=str(DAGS / f"{name}.py"))
        assert bag.import_errors == {}
        dags[name] = bag.dags[name]
    return dags


@pytest.fixture(scope="module")
def small_dag():
    """Declared out of order on purpose: alphabetical and declaration order are not run order."""
    from airflow.providers.standard.operators.empty import EmptyOperator
    from airflow.sdk import DAG, TaskGroup

    with DAG("small", schedule=None) as dag:
        finalize = EmptyOperator(task_id="finalize")
        rollback = EmptyOperator(task_id="rollback")
        with TaskGroup("stage_2_later") as s2:
            s2_deploy = EmptyOperator(task_id="deploy")
            s2_check = EmptyOperator(task_id="a_precheck")
            s2_check >> s2_deploy
        with TaskGroup("stage_1_first") as s1:
            zz = EmptyOperator(task_id="zz_begin")
            check = EmptyOperator(task_id="precheck")
            check >> zz
        version = EmptyOperator(task_id="resolve_version")
        version >> s1 >> s2 >> rollback >> finalize
    return dag


def test_failed_tasks_lists_only_failed_tasks_in_run_order(small_dag):
    from liftoff_airflow import dagkit

    states = {"resolve_version": "success", "stage_1_first.precheck": "failed",
              "stage_1_first.zz_begin": "upstream_failed", "stage_2_later.a_precheck": None,
              "stage_2_later.deploy": "failed", "rollback": "failed", "finalize": "failed"}
    assert dagkit.failed_tasks(states, small_dag) == ["stage_1_first.precheck", "stage_2_later.deploy",
                                                      "rollback"]


def test_failed_tasks_on_deploy_canary(real_dags):
    """The issue's run: begin_env never ran and stood (alphabetically) before precheck."""
    from liftoff_airflow import dagkit

    dag = real_dags["deploy_canary"]
    states = {t.task_id: None for t in dag.tasks}
    states.update({"resolve_version": "success", "stage_1_staging_migrations.precheck": "failed",
                   "stage_1_staging_migrations.begin_env": "upstream_failed",
                   "stage_1_staging_migrations.regular_migrations": "upstream_failed",
                   "on_failure": "success", "rollback": "failed", "halt": "skipped", "finalize": "running"})
    assert dagkit.failed_tasks(states, dag) == ["stage_1_staging_migrations.precheck", "rollback"]


class _Metrics:
    def __init__(self) -> None:
        self.statuses: list[str] = []

    def pipeline_status(self, status: str, start: float | None, end: float) -> None:
        self.statuses.append(status)


@pytest.fixture
def engine_run(tmp_path: Path):
    from types import SimpleNamespace

    from liftoff.store import Store

    metrics = _Metrics()
    return SimpleNamespace(run_id="manual__2026-12-02T16_40_00_00_00", who="alice",
                           store=Store(f"sqlite:///{tmp_path / 'state.db'}"), metrics=lambda: metrics,
                           metrics_seen=metrics)


def _canary_failed_states(dag) -> dict:
    states = {t.task_id: None for t in dag.tasks}
    states.update({"resolve_version": "success", "stage_1_staging_migrations.precheck": "success",
                   "stage_3_staging_fleet.deploy": "failed", "stage_3_staging_fleet.qa": "upstream_failed",
                   "on_failure": "success", "rollback": "failed", "halt": "skipped"})
    return states


def test_finalize_says_which_locks_the_run_took_after_rollback_released_them(real_dags, engine_run):
    from airflow.sdk.exceptions import AirflowFailException

    from liftoff.locks import release_locks
    from liftoff_airflow import dagkit

    store = engine_run.store
    store.acquire("gstg", "scheduled__other_run", "scheduler", "an earlier run")
    store.release("gstg", "scheduled__other_run")
    store.acquire("gstg", engine_run.run_id, "alice", "deploy_canary")
    assert release_locks(engine_run, ["gstg"]) == ["gstg"]  # the rollback task released it
    store.record_step_failure(engine_run.run_id, "stage_3_staging_fleet.deploy", "an earlier attempt")
    store.record_step_failure(engine_run.run_id, "stage_3_staging_fleet.deploy",
                              "web-02-sv-gstg: install failed (exit 100).")
    dag = real_dags["deploy_canary"]
    with pytest.raises(AirflowFailException) as failed:
        dagkit.finalize_run("deploy_canary", ["gstg", "gprd-cny"], run=engine_run,
                            states=_canary_failed_states(dag), dag=dag)
    assert str(failed.value) == (
        "deploy_canary failed at stage_3_staging_fleet.deploy (first): web-02-sv-gstg: install failed "
        "(exit 100); then rollback; locks taken: gstg; locks released: gstg. next: fix the cause, then "
        f"retry the stage (liftoff retry {engine_run.run_id} stage_3_staging_fleet --dag deploy_canary) "
        "or roll back (liftoff rollback ENV)")
    assert "none held" not in str(failed.value)
    assert engine_run.metrics_seen.statuses == ["failed"]


def test_finalize_releases_what_the_run_still_holds_and_names_a_force_release(real_dags, engine_run):
    from airflow.sdk.exceptions import AirflowFailException

    from liftoff_airflow import dagkit

    store = engine_run.store
    store.acquire("gstg", engine_run.run_id, "alice", "deploy_canary")
    store.acquire("gprd-cny", engine_run.run_id, "alice", "deploy_canary")
    store.force_release("gprd-cny", "bob", "INC-42 hands off canary")
    dag = real_dags["deploy_canary"]
    with pytest.raises(AirflowFailException) as failed:
        dagkit.finalize_run("deploy_canary", ["gstg", "gprd-cny"], run=engine_run,
                            states=_canary_failed_states(dag), dag=dag)
    assert ("locks taken: gstg, gprd-cny; locks released: gstg; "
            "gprd-cny force-released by bob (INC-42 hands off canary). next:") in str(failed.value)
    assert store.list_locks() == []


def test_finalize_of_a_good_run(real_dags, engine_run):
    from liftoff_airflow import dagkit

    engine_run.store.acquire("gstg", engine_run.run_id, "alice", "deploy_canary")
    dag = real_dags["deploy_canary"]
    states = {t.task_id: "success" for t in dag.tasks} | {"rollback": "skipped", "halt": "skipped",
                                                           "finalize": "running"}
    result = dagkit.finalize_run("deploy_canary", ["gstg", "gprd-cny"], run=engine_run, states=states,
                                 dag=dag)
    assert result["status"] == "success" and result["released"] == ["gstg"]
    assert result["summary"] == "deploy_canary succeeded; locks taken: gstg; locks released: gstg"
    assert engine_run.store.get_lock("gstg") is None
    nothing = dagkit.finalize_run("deploy_canary", ["gprd-cny"], run=engine_run, states=states, dag=dag)
    assert nothing["summary"] == "deploy_canary succeeded; no lock taken"


def test_version_help_says_what_an_empty_version_means(real_dags):
    from liftoff_airflow import dagkit

    nightly = "Empty on a scheduled run: the newest nightly build."
    assert dagkit.version_param(False).description.endswith(nightly)
    assert "Empty" not in dagkit.version_param(True).description
    own = dagkit.version_param(False, when_empty="Empty: canary's.").description
    assert own.endswith(". Empty: canary's.") and "nightly build." not in own
    production = real_dags["deploy_production"].params.get_param("version").description
    assert "nightly build" not in production and "the version canary verified" in production
    assert real_dags["deploy_canary"].params.get_param("version").description.endswith(nightly)


def test_finalize_inside_a_task_reads_the_context_and_keeps_the_summary(real_dags, engine_run, monkeypatch):
    """The task path: states from the task SDK's get_task_states, the DAG from the context, the
    summary pushed as XCom ``summary`` (a failed task's return value is never pushed)."""
    from types import SimpleNamespace

    from airflow.sdk.exceptions import AirflowFailException

    from liftoff_airflow import dagkit

    dag = real_dags["deploy_canary"]
    dag_run = SimpleNamespace(dag_id="deploy_canary", run_id="manual__2026-12-02T16:40:00+00:00",
                              start_date=NOW)
    pushed: dict = {}

    class TI:
        def get_task_states(self, dag_id: str, run_ids: list[str]) -> dict:
            assert (dag_id, run_ids) == ("deploy_canary", [dag_run.run_id])
            return {dag_run.run_id: _canary_failed_states(dag)}

        def xcom_push(self, key: str, value: object) -> None:
            pushed[key] = value

    monkeypatch.setattr(dagkit, "get_current_context", lambda: {"ti": TI(), "dag_run": dag_run, "dag": dag})
    monkeypatch.setattr(dagkit, "run_handle", lambda pipeline: engine_run)
    engine_run.store.acquire("gstg", engine_run.run_id, "alice", "deploy_canary")
    with pytest.raises(AirflowFailException, match=r"failed at stage_3_staging_fleet\.deploy \(first\)"):
        dagkit.finalize_run("deploy_canary", ["gstg", "gprd-cny"])
    assert pushed["summary"]["failed"] == ["stage_3_staging_fleet.deploy", "rollback"]
    assert pushed["summary"]["locks_taken"] == ["gstg"] and pushed["summary"]["released"] == ["gstg"]


# -- approve / reject (human in the loop) ----------------------------------------------------

def _request(state: str = "deferred", users: tuple[str, ...] = (), params: dict | None = None,
             task: str = "approval", map_index: int = -1) -> dict:
    detail = _hitl(state, "Promote 17.6.0 to production?")
    detail["assigned_users"] = [{"id": u, "name": u} for u in users]
    detail["params"] = params or {}
    detail["task_instance"].update(task_id=task, map_index=map_index)
    return detail


def _patches(fake: FakeAirflow) -> list[dict]:
    return [r for r in fake.requests if r["method"] == "PATCH"]


def test_approve_answers_the_run_s_pending_request(fake):
    fake.hitl = [_request(users=(USER, "bob"))]
    code, out, err = run_cli(fake, "approve", RUN, "--reason", "CAB-7 approved in the release call")
    assert (code, err) == (0, "")
    [get] = [r for r in fake.requests if r["path"].endswith(f"/dagRuns/{RUN}/hitlDetails")]
    assert get["path"] == f"/api/v2/dags/deploy_production/dagRuns/{RUN}/hitlDetails"
    assert get["query"]["response_received"] == ["false"]
    [patch] = _patches(fake)
    assert patch["path"] == (f"/api/v2/dags/deploy_production/dagRuns/{RUN}/taskInstances/approval/-1/"
                             "hitlDetails")
    assert patch["body"] == {"chosen_options": ["Approve"], "params_input": {}}
    assert out.splitlines()[0] == (f"approved: Promote 17.6.0 to production?  (deploy_production run {RUN}, "
                                   f"task approval) as {USER}")
    assert "  reason: CAB-7 approved in the release call" in out.splitlines()


def test_approve_puts_the_reason_in_the_request_s_reason_param(fake):
    params = {"reason": {"value": "", "description": None, "schema": {}},
              "ticket": {"value": "CR-1", "description": None, "schema": {}}}
    fake.hitl = [_request(params=params)]
    code, out, _ = run_cli(fake, "--json", "approve", RUN, "--reason", "CAB-7")
    assert code == 0
    [patch] = _patches(fake)
    assert patch["body"]["params_input"] == {"reason": "CAB-7", "ticket": "CR-1"}
    data = json.loads(out)
    assert (data["chosen_options"], data["reason"], data["responded_by"]) == (["Approve"], "CAB-7", USER)


def test_reject_needs_no_reason_and_says_so(fake):
    fake.hitl = [_request()]
    code, out, _ = run_cli(fake, "reject", RUN)
    assert code == 0
    assert _patches(fake)[0]["body"]["chosen_options"] == ["Reject"]
    assert out.startswith("rejected: ") and "  reason: none given" in out.splitlines()


def test_approve_without_a_reason_is_a_usage_error(fake, capsys):
    code, _, _ = run_cli(fake, "approve", RUN)
    assert code == 2 and "the following arguments are required: --reason" in capsys.readouterr().err
    assert fake.requests == []


def test_approve_twice_says_who_answered_first(fake):
    fake.hitl = [_request()]
    assert run_cli(fake, "approve", RUN, "--reason", "first")[0] == 0
    code, _, err = run_cli(fake, "approve", RUN, "--reason", "second")
    assert code == 5
    assert err.strip() == (f"liftoff: error: run {RUN} of deploy_production: already answered by {USER}: "
                           "Approve at 2026-12-03 08:10:00Z")
    assert len(_patches(fake)) == 1


def test_an_answer_racing_another_gets_the_409_as_who_answered(fake, monkeypatch):
    fake.hitl = [_request()]
    first = fake.hitl[0].copy()
    carol = {"id": "carol", "name": "carol"}
    fake.hitl[0].update(response_received=True, chosen_options=["Reject"],
                        responded_at="2026-12-03T08:09:00Z", responded_by_user=carol)
    monkeypatch.setattr(AirflowClient, "run_approvals", lambda *_a, **_k: [first])  # listed before the race
    code, _, err = run_cli(fake, "approve", RUN, "--reason", "late")
    assert code == 5
    assert err.strip() == "liftoff: error: already answered by carol: Reject at 2026-12-03 08:09:00Z"


def test_approve_by_someone_not_assigned_names_who_is(fake):
    fake.hitl = [_request(users=("bob", "carol"))]
    code, _, err = run_cli(fake, "approve", RUN, "--reason", "CAB-7")
    assert code == 4
    assert err.strip() == "liftoff: error: you are not among the assigned users: bob, carol"
    assert not fake.hitl[0]["response_received"]


def test_no_pending_request_exits_5(fake):
    fake.hitl = [_request(state="failed")]  # timed out: nobody can answer it any more
    code, _, err = run_cli(fake, "approve", RUN, "--reason", "x")
    assert code == 5
    assert err.strip() == f"liftoff: error: run {RUN} of deploy_production has no pending approval request"
    assert _patches(fake) == []
    code, _, err = run_cli(fake, "reject", "manual__no-such-run")
    assert code == 5 and "no run 'manual__no-such-run' of DAG 'deploy_production'" in err


def test_two_pending_requests_need_task(fake):
    fake.hitl = [_request(), _request(task="second_look")]
    code, _, err = run_cli(fake, "approve", RUN, "--reason", "x")
    assert code == 2 and "waits for 2 answers (approval, second_look): name one with --task" in err
    code, _, _ = run_cli(fake, "approve", RUN, "--reason", "x", "--task", "second_look")
    assert code == 0
    [patch] = _patches(fake)
    assert "/taskInstances/second_look/-1/hitlDetails" in patch["path"]
    code, _, err = run_cli(fake, "reject", RUN, "--task", "nope")
    assert code == 5 and err.strip().endswith("has no pending approval request of task nope")


def test_an_option_the_request_does_not_offer_is_refused_before_answering(fake):
    fake.hitl = [_request()]
    fake.hitl[0]["options"] = ["Deploy now", "Wait"]
    code, _, err = run_cli(fake, "approve", RUN, "--reason", "x")
    assert code == 2 and "offers Deploy now, Wait, not Approve" in err
    assert _patches(fake) == []


@pytest.mark.parametrize("argv", [["approve", "bad run id", "--reason", "x"],
                                  ["approve", RUN, "--reason", "x; rm -rf /"],
                                  ["reject", RUN, "--dag", "../etc"],
                                  ["reject", RUN, "--task", "a/b"]])
def test_approve_bad_input_exits_2_before_any_call(fake, argv):
    assert run_cli(fake, *argv)[0] == 2
    assert fake.requests == []


def test_status_says_how_to_answer_from_chat(fake):
    fake.hitl = [_request()]
    out = run_cli(fake, "status")[1]
    assert (f'  or: liftoff approve {RUN} --dag deploy_production --reason "WHY"  (or liftoff reject ...)'
            in out.splitlines())


def test_a_request_just_made_is_answered_once_airflow_has_parked_its_task(fake, monkeypatch):
    waits: list[float] = []
    monkeypatch.setattr(cli, "_sleep", waits.append)
    fake.hitl = [_request()]
    fake.hitl[0]["created_at"] = (datetime.now(UTC) - timedelta(seconds=1)).isoformat()
    assert run_cli(fake, "approve", RUN, "--reason", "fast bot")[0] == 0
    [waited] = waits
    assert 3.0 < waited <= cli.HITL_SETTLE_S
    made = datetime(2026, 12, 3, 8, 0, tzinfo=UTC)
    assert cli.settle({"created_at": "2026-12-03T08:00:00Z"}, now=made + timedelta(seconds=60)) == 0.0
    assert cli.settle({"created_at": "2026-12-03T08:00:00Z"}, now=made + timedelta(seconds=2)) == 3.0
    assert cli.settle({"created_at": "2026-12-03T08:00:00Z"}, now=made - timedelta(hours=1)) == 5.0  # skew
    assert cli.settle({}) == 0.0 and waits == [waited, 3.0, 5.0]
