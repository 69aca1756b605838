"""What changed, against a lab of its own (octet 56): two nightly builds (and one between them)
are added to the lab; the first is deployed to gstg through the engine; the change range to
the second lists exactly the commits between them in the lab's repository (read here
independently, through the lab GitLab's commit listing), the deploy-started message in the
lab's chat carries the count and the compare link, the Pushgateway holds gstg's pressure, and
``liftoff status`` shows it. A build without a known commit and an unknown ref say so."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from urllib.parse import quote

import pytest

from lab import chat as lab_chat
from liftoff import changes, deploy, notify, status
from liftoff.inventory import load_inventory
from liftoff.runs import Run
from tests.labkit import Lab, running_lab

pytestmark = pytest.mark.lab

OCTET = 56
A = "17.9.0+rnightly.4101.1a2b3c4d-0"  # deployed to gstg first
MIDDLE = "17.9.0+rnightly.4102.5e6f7a8b-0"  # built between the two, never deployed
B = "17.9.0+rnightly.4104.3a4b5c6d-0"  # the deploy whose range is checked
PROJECT = "gitlab-org/gitlab"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with running_lab(tmp_path_factory.mktemp("changes-lab"), OCTET, "--install-seconds", "0.2") as lab:
        for version in (A, MIDDLE, B):
            lab.build_add(version, nightly=True)
        yield lab


@pytest.fixture
def lab_env(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> Lab:
    for name, value in lab.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("LIFTOFF_NOTIFY_EVENTS", raising=False)
    monkeypatch.setenv("LIFTOFF_AIRFLOW_URL", "http://airflow.lab:8080")
    assert lab.cli("chat", "--clear").returncode == 0
    return lab


def lab_api(lab: Lab, path: str) -> tuple[int, object]:
    """GET the lab GitLab's API with its private token (not through liftoff)."""
    conn = json.loads(lab.env["AIRFLOW_CONN_LIFTOFF_OPS_GITLAB"])
    req = urllib.request.Request(f"{conn['host'].rstrip('/')}/api/v4{path}",
                                 headers={"PRIVATE-TOKEN": conn["password"]})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def listed_between(lab: Lab, older_sha: str, newer_sha: str) -> list[dict]:
    """The commits after ``older_sha`` up to ``newer_sha``, newest first, from the full listing."""
    code, listing = lab_api(lab, f"/projects/{quote(PROJECT, safe='')}/repository/commits?per_page=100")
    assert code == 200 and isinstance(listing, list), listing
    ids = [c["id"] for c in listing]
    newer = next(i for i, cid in enumerate(ids) if cid.startswith(newer_sha))
    older = next(i for i, cid in enumerate(ids) if cid.startswith(older_sha))
    assert newer < older, ids
    return listing[newer:older]


def deploy_to_gstg(version: str, run_id: str) -> Run:
    """The engine's begin, a rollout of gstg's web role, and the cleanup that records it."""
    run = Run(run_id=run_id, who="tester")
    deploy.begin_env(run, "gstg", version, previous="17.5.0-ee.0")
    deploy.deploy_roles(run, "gstg", version, roles=["web"])
    deploy.finish_env(run, "gstg", version)
    return run


def pushed_pressure(lab: Lab, env: str) -> float | None:
    with urllib.request.urlopen(f"http://{lab.config.pushgateway_addr}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    for line in text.splitlines():
        if line.startswith("liftoff_deploy_pressure{") and f'env="{env}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return None


def test_the_change_range_of_a_lab_deploy_lists_the_commits_between_the_builds(lab_env):
    lab = lab_env
    deploy_to_gstg(A, "changes-lab-a")
    expected = listed_between(lab, "1a2b3c4d", "3a4b5c6d")  # MIDDLE's commits and B's
    assert len(expected) > changes.TITLES_KEPT  # enough to see the first ones kept
    assert expected[0]["id"].startswith("3a4b5c6d")

    run = Run(run_id="changes-lab-b", who="tester")
    assert run.store.current_version("gstg") == A
    rng = changes.change_range(run, A, B)
    assert rng.known, rng.reason
    assert (rng.from_sha, rng.to_sha, rng.count) == ("1a2b3c4d", "3a4b5c6d", len(expected))
    assert list(rng.titles) == [c["title"] for c in expected[:changes.TITLES_KEPT]]
    assert rng.web_url.endswith(f"/{PROJECT}/-/compare/1a2b3c4d...3a4b5c6d")

    # the deploy-started message in the lab's chat carries the count and the link
    assert notify.deploy_started(run, B, ["gstg"]) is True
    [message] = [m for m in lab_chat.read_messages(lab.config) if lab_chat.event_of(m) == "deploy_started"]
    text = message["payload"]["text"]
    assert f"what changed: {len(expected)} commits ({A} → {B}): {rng.web_url}" in text
    assert f"• {expected[0]['title']}" in text and f"… and {len(expected) - changes.TITLES_KEPT} more" in text
    fields = {f["title"]: f["value"] for f in message["payload"]["attachments"][0]["fields"]}
    assert fields["commits"] == str(len(expected))

    # gstg's pressure: pushed when the deploy of A finished and when B's started; status shows it
    assert pushed_pressure(lab, "gstg") == len(expected)
    snap = status.snapshot(load_inventory(), run.store, lbs=False, pressure=True)
    gstg = snap["environments"]["gstg"]["pressure"]
    assert (gstg["commits"], gstg["newest_build"], gstg["note"]) == (len(expected), B, None)
    assert snap["environments"]["gprd"]["pressure"]["note"] == "no successful deploy of gprd recorded"


def test_unknown_builds_and_refs_say_so(lab_env):
    lab = lab_env
    run = Run(run_id="changes-lab-unknown", who="tester")
    rng = changes.change_range(run, "17.5.0-ee.0", B)  # the lab's first build names no commit
    assert not rng.known and "no known commit for 17.5.0-ee.0" in rng.reason
    stray = changes.change_range(run, A, "17.9.0+rnightly.4199.deadbee-0")
    assert not stray.known and "not found" in stray.reason
    path = f"/projects/{quote(PROJECT, safe='')}/repository/compare?from=deadbee&to=1a2b3c4d"
    code, body = lab_api(lab, path)
    assert (code, body) == (404, {"message": "404 Ref Not Found"})
    assert notify.deploy_started(run, B, ["gprd"]) is True
    [message] = lab_chat.read_messages(lab.config)
    assert "what changed: not known (no successful deploy of gprd recorded)" in message["payload"]["text"]
