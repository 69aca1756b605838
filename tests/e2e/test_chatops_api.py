"""The ``liftoff`` console script against a real Airflow api-server (tests/airflow_stack.py)
driving deploy_canary on a lab of its own (octet 46, ``LIFTOFF_CHATOPS_LAB_OCTET``).

Exit codes for wrong credentials (4), an API that is down (3), bad input and an API 400 (2);
a dry-run deploy followed to its end by ``watch`` and shown by ``status``; and no token or
password in anything the CLI printed or the api-server logged.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from liftoff.chatops.api import AirflowClient, Credentials
from tests.airflow_stack import Stack, airflow_stack, free_port
from tests.labkit import Lab, running_lab

pytestmark = [pytest.mark.airflow, pytest.mark.lab]

OCTET = int(os.environ.get("LIFTOFF_CHATOPS_LAB_OCTET", "46"))
DAG = "deploy_canary"
GOOD = "17.6.0+rnightly.201.fedcba9-0"
LIFTOFF = str(Path(sys.executable).parent / "liftoff")
JWT = re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}")
OUTPUTS: list[str] = []  # everything the CLI printed in this module


@pytest.fixture(scope="module")
def lab_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Lab, Stack]]:
    with running_lab(tmp_path_factory.mktemp("chatops-lab"), OCTET, "--install-seconds", "0.2") as lab:
        with airflow_stack(tmp_path_factory.mktemp("chatops-airflow"), lab.env) as stack:
            stack.wait_until_dag_parsed(DAG)
            lab.build_add(GOOD, nightly=True)
            yield lab, stack
        assert stack.leftovers() == [], "the airflow stack left something behind"


def liftoff(stack: Stack, *args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    out = subprocess.run([LIFTOFF, *args], env=stack.cli_env(**env), capture_output=True, text=True,
                         timeout=timeout)
    OUTPUTS.append(out.stdout + out.stderr)
    return out


def run_ids(stack: Stack) -> set[str]:
    return {r["dag_run_id"] for r in stack.dag_runs(DAG)}


def installed(lab: Lab) -> dict[str, str]:
    return {h["name"]: h["installed"] for env in lab.status()["environments"].values() for h in env["hosts"]}


def test_wrong_password_exits_4(lab_stack):
    _, stack = lab_stack
    before = run_ids(stack)
    out = liftoff(stack, "deploy", GOOD, "--dry-run", LIFTOFF_API_PASSWORD="not-the-password-42")
    assert out.returncode == 4, out.stdout + out.stderr
    assert "refused the credentials of user 'admin'" in out.stderr
    assert "not-the-password-42" not in out.stdout + out.stderr
    assert run_ids(stack) == before


def test_api_down_exits_3(lab_stack):
    _, stack = lab_stack
    url = f"http://127.0.0.1:{free_port()}"
    out = liftoff(stack, "status", LIFTOFF_API_URL=url)
    assert out.returncode == 3, out.stdout + out.stderr
    assert f"cannot reach Airflow at {url}" in out.stderr


def test_bad_input_is_refused_locally_and_by_the_api(lab_stack):
    _, stack = lab_stack
    before = run_ids(stack)
    local = liftoff(stack, "deploy", "17.6.0; reboot", "--dry-run")
    assert local.returncode == 2 and "package version '17.6.0; reboot'" in local.stderr, local.stderr
    # Passes liftoff's reason check but not the DAG's Param (minLength 5): Airflow's 400, its detail.
    api = liftoff(stack, "deploy", GOOD, "--dry-run", "--allow-precheck-failure", "abc")
    assert api.returncode == 2, api.stdout + api.stderr
    assert "Airflow refused the request" in api.stderr and "allow_precheck_failure" in api.stderr
    assert run_ids(stack) == before


def test_dry_run_deploy_is_watched_to_its_end_and_shown_by_status(lab_stack):
    lab, stack = lab_stack
    hosts_before = installed(lab)
    out = liftoff(stack, "--json", "deploy", GOOD, "--dry-run", "--quiet-period", "5")
    assert out.returncode == 0, out.stdout + out.stderr
    started = json.loads(out.stdout)
    run_id = started["dag_run_id"]
    assert started["url"].startswith(stack.base_url + "/dags/deploy_canary/runs/")
    assert stack.dag_run(DAG, run_id)["conf"] == {"version": GOOD, "dry_run": True, "quiet_period_seconds": 5}

    watch = liftoff(stack, "watch", run_id, "--interval", "1", timeout=600)
    assert watch.returncode == 0, watch.stdout + watch.stderr
    assert re.search(r"stage_1_staging_migrations\s+\S+ -> success", watch.stdout), watch.stdout
    assert re.search(r"stage_6_canary_fleet\s+\S+ -> success", watch.stdout), watch.stdout
    assert f"run {run_id}: success" in watch.stdout
    assert stack.dag_run(DAG, run_id)["state"] == "success"

    status = liftoff(stack, "status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert f"{run_id}  success dry-run" in status.stdout and GOOD in status.stdout, status.stdout
    assert re.search(r"stage_3_staging_fleet\s+success", status.stdout), status.stdout
    as_json = json.loads(liftoff(stack, "--json", "status", "--dag", DAG).stdout)
    [run] = [r for r in as_json["dags"][DAG]["runs"] if r["dag_run_id"] == run_id]
    assert run["version"] == GOOD and set(run["stages"].values()) == {"success"}

    retry = liftoff(stack, "retry", run_id, "stage_3")
    assert retry.returncode == 2 and "nothing failed" in retry.stderr, retry.stderr
    assert installed(lab) == hosts_before, "a dry run changed hosts"


def test_no_token_or_password_in_output_or_api_log(lab_stack):
    _, stack = lab_stack
    token = AirflowClient(Credentials.from_env(stack.cli_env())).login()
    with_token = liftoff(stack, "status", LIFTOFF_API_TOKEN=token, LIFTOFF_API_USER="",
                         LIFTOFF_API_PASSWORD="")
    assert with_token.returncode == 0, with_token.stderr
    bad_token = liftoff(stack, "status", LIFTOFF_API_TOKEN=token[:-6] + "AAAAAA", LIFTOFF_API_USER="",
                        LIFTOFF_API_PASSWORD="")
    assert bad_token.returncode == 4, bad_token.stdout + bad_token.stderr
    assert len(OUTPUTS) >= 8
    for printed in OUTPUTS:
        assert token not in printed and token[:-6] not in printed
        assert stack.password not in printed
        assert not JWT.search(printed), printed
    api_log = stack.log_text("api-server")
    assert "POST /auth/token" in api_log or "/auth/token" in api_log, "the api-server log captured nothing"
    for secret in (token, token[:-6], stack.password, stack.token()):
        assert secret not in api_log
        assert secret not in stack.all_logs_text()
