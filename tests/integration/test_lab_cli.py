"""``python -m lab build faults`` against a real lab, and the lab's GitLab refusing a stale
private token with 401 (as GitLab does) so liftoff's QA client says which token to fix.

The lab of this module runs on octet 54 (``LIFTOFF_LAB_CLI_TEST_OCTET`` to change it).
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from lab.gitlab_api import QA_PROJECT_PATH
from liftoff.errors import QAError
from liftoff.qa import QAClient
from tests.labkit import Lab, running_lab

pytestmark = pytest.mark.lab

OCTET = int(os.environ.get("LIFTOFF_LAB_CLI_TEST_OCTET", "54"))
NIGHTLY = "17.9.0+rnightly.42.abcdef1-0"  # '+' in the control API's path
HOST = "web-cny-03-sv-gprd"  # the default lab's third canary web host
PROJECT = QA_PROJECT_PATH.replace("/", "%2F")


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with running_lab(tmp_path_factory.mktemp("lab-cli"), OCTET, "--install-seconds", "0.2",
                     "--traffic-rps", "1") as lab:
        yield lab


def build(lab: Lab, version: str) -> dict:
    out = lab.cli("build", "list", "--json")
    assert out.returncode == 0, out.stderr
    return next(b for b in json.loads(out.stdout) if b["version"] == version)


def test_build_faults_changes_only_the_faults_given(lab: Lab) -> None:
    assert lab.cli("build", "add", NIGHTLY, "--nightly", "--latency-ms", "5").returncode == 0
    out = lab.cli("build", "faults", NIGHTLY, "--error-rate", "0.5", "--qa-fails", "--install-fails-on", HOST)
    assert out.returncode == 0, out.stderr
    assert out.stdout == (f"build {NIGHTLY} faults: qa_fails error_rate=0.5 latency_ms=5 "
                          f"install_fails_on={HOST}\n")
    b = build(lab, NIGHTLY)
    assert (b["error_rate"], b["qa_fails"], b["install_fails_on"]) == (0.5, True, [HOST])
    assert (b["nightly"], b["latency_ms"], b["migration_fails"]) == (True, 5, False)  # untouched
    failed = lab.ssh(HOST, f"sudo apt-get install -y gitlab-ee={NIGHTLY}")
    assert failed.returncode == 100, failed.stderr

    out = lab.cli("build", "faults", NIGHTLY, "--no-qa-fails", "--error-rate", "0", "--no-install-fails",
                  "--migration-fails", "--json")
    assert out.returncode == 0, out.stderr
    b = json.loads(out.stdout)
    assert (b["error_rate"], b["qa_fails"], b["install_fails_on"]) == (0.0, False, [])
    assert b["migration_fails"] is True
    assert build(lab, NIGHTLY) == b
    assert lab.ssh(HOST, "sudo chef-client-disable 'lab cli test'").returncode == 0
    try:
        installed = lab.ssh(HOST, f"sudo apt-get install -y gitlab-ee={NIGHTLY}")
        assert installed.returncode == 0, installed.stderr
    finally:
        lab.ssh(HOST, "sudo chef-client-enable")


@pytest.mark.parametrize(("args", "error"), [
    (("9.9.9-ee.0", "--qa-fails"), "no build 9.9.9-ee.0 in the lab at {dir} (see: python -m lab build list)"),
    ((NIGHTLY, "--error-rate", "2"), "--error-rate must be within 0..1, got 2"),
    ((NIGHTLY, "--latency-ms", "-1"), "--latency-ms must not be negative, got -1"),
    ((NIGHTLY, "--install-fails-on", "web-99-sv-gprd"),
     "unknown hosts: web-99-sv-gprd (see: python -m lab status)"),
    ((NIGHTLY,), "nothing to change: give --error-rate, --latency-ms, --install-fails-on, "
                 "--no-install-fails, --[no-]migration-fails or --[no-]qa-fails"),
])
def test_build_faults_refuses_in_one_line(lab: Lab, args: tuple[str, ...], error: str) -> None:
    if lab.cli("build", "list").stdout.count(NIGHTLY) == 0:
        assert lab.cli("build", "add", NIGHTLY, "--nightly").returncode == 0
    before = build(lab, NIGHTLY)
    out = lab.cli("build", "faults", *args)
    assert (out.returncode, out.stdout) == (2, "")
    assert out.stderr == f"lab: {error.format(dir=lab.config.lab_dir)}\n"
    assert build(lab, NIGHTLY) == before


def test_build_faults_refuses_a_value_that_is_not_a_number(lab: Lab) -> None:
    out = lab.cli("build", "faults", NIGHTLY, "--error-rate", "half")
    assert out.returncode == 2 and "argument --error-rate: invalid float value: 'half'" in out.stderr


def trigger(lab: Lab, private_token: str | None, trigger_token: str) -> tuple[int, dict]:
    req = urllib.request.Request(f"{lab.config.gitlab_url}/api/v4/projects/{PROJECT}/trigger/pipeline",
                                 data=json.dumps({"ref": "main", "token": trigger_token}).encode(),
                                 headers={"Content-Type": "application/json",
                                          **({"PRIVATE-TOKEN": private_token} if private_token else {})})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_a_wrong_private_token_is_401_even_on_the_trigger(lab: Lab) -> None:
    refused = (401, {"message": "401 Unauthorized"})
    assert trigger(lab, "glpat-stale", "glptt-stale") == refused
    assert trigger(lab, "glpat-stale", lab_tokens(lab)["trigger_token"]) == refused
    assert trigger(lab, None, "glptt-stale") == (404, {"message": "404 Not Found"})  # no private token


def lab_tokens(lab: Lab) -> dict:
    conn = json.loads(lab.env["AIRFLOW_CONN_LIFTOFF_OPS_GITLAB"])
    return {"private_token": conn["password"], "trigger_token": conn["extra"]["trigger_token"]}


def test_qa_with_the_token_of_a_purged_lab_says_which_token_to_fix(lab: Lab, monkeypatch) -> None:
    """The connection still holds the tokens of the lab before ``down --purge``: both stale."""
    for name, value in lab.env.items():
        monkeypatch.setenv(name, value)
    conn = json.loads(lab.env["AIRFLOW_CONN_LIFTOFF_OPS_GITLAB"])
    conn["password"], conn["extra"]["trigger_token"] = "glpat-before-the-purge", "glptt-before-the-purge"
    monkeypatch.setenv("AIRFLOW_CONN_LIFTOFF_OPS_GITLAB", json.dumps(conn))
    with pytest.raises(QAError) as err:
        QAClient.from_settings().trigger("gstg", "http://127.0.0.1:1", "17.5.0-ee.0")
    assert str(err.value) == (
        f"the ops GitLab at {lab.config.gitlab_url} refused liftoff's token (HTTP 401) when triggering the "
        "pipeline: check the liftoff_ops_gitlab connection's password (a lab purge makes a new token: "
        f"source {lab.config.lab_dir}/liftoff.env again)")
    assert "before-the-purge" not in str(err.value)
