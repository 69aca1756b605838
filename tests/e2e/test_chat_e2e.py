"""Issue #11's ChatOps notifications end to end: the lab's chat receiver (lab/chat.py) hears a
real Airflow (api-server, scheduler, dag-processor, triggerer; tests/airflow_stack.py) run the
DAGs on a lab of its own (octet 57, ``LIFTOFF_CHAT_E2E_LAB_OCTET``).

One stack for the module, three runs in file order, versions going up (no downgrade):

1. a good deploy_canary while the chat hangs (slower than the ``liftoff_chat`` connection's
   timeout): the run succeeds, every notification gave up within that timeout (the receiver's
   arrival time against the task log's give-up line) and was counted in the Pushgateway;
2. a deploy_canary whose build fails staging QA (``on_failure: halt``): the chat hears the
   run's events in order, the failure with its reason, and every link in those messages
   resolves: the run's own name a run (and task) the api-server knows and answer 200, the lab
   GitLab's (QA pipeline and jobs, the range of changes) exist there;
3. fast_deploy of an internal (undisclosed security) build, started with ``liftoff fast-deploy
   --internal --watch``: no message carries its version, nor the part after its '+', the fast
   deploy message says "internal", and the CLI printed only the build's label.

Links start at ``LIFTOFF_AIRFLOW_URL`` (include/liftoff/notify.py); the stack gets the URL of
its own api-server, whose port is chosen before the stack starts.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

import pytest
import requests

import tests.airflow_stack as airflow_stack_module
from lab import chat as lab_chat
from lab.repository import REPO_PROJECT_ID, REPO_PROJECT_PATH
from tests.airflow_stack import Stack, airflow_stack, free_port
from tests.labkit import Lab, running_lab, wait_for

LIFTOFF = str(Path(sys.executable).parent / "liftoff")

pytestmark = [pytest.mark.airflow, pytest.mark.lab]

OCTET = int(os.environ.get("LIFTOFF_CHAT_E2E_LAB_OCTET", "57"))
CANARY = "deploy_canary"
FAST = "fast_deploy"
GOOD = "17.6.0+rnightly.5701.a57a57a-0"
BAD = "17.6.1+rnightly.5702.b57b57b-0"  # staging QA fails on it
INTERNAL = "17.6.2+rnightly.5703.c57c57c-0"  # the undisclosed security build
CHAT_TIMEOUT_S = 2.0  # the liftoff_chat connection's extra.timeout in this stack
SLOW_S = 5.0  # the hanging receiver answers only after this long (more than the timeout)
# A deferred quiet period must outlast the executor's report of the deferring workload: the task
# supervisor may notice its task's exit only at its next wake-up ([workers] min_heartbeat_interval,
# 5 s by default, set to 1 s here); a trigger that fires before that report makes the scheduler fail
# the re-queued sensor ("finished with state success, but the task instance's state is queued").
QUIET_S = 4
ENVS = ("gstg", "gprd-cny")
URL = re.compile(r"https?://[^\s<>|\"']+")
LINK_PATH = re.compile(r"^/dags/([^/]+)/runs/([^/]+)(?:/tasks/([^/]+))?$")
GAVE_UP = re.compile(r"chat notification (\w+) to \S+ failed \(the run goes on\)")


@pytest.fixture(scope="module")
def lab_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Lab, Stack]]:
    with running_lab(tmp_path_factory.mktemp("chat-lab"), OCTET, "--install-seconds", "0.2") as lab:
        lab.build_add(GOOD, nightly=True)
        lab.build_add(BAD, nightly=True, qa_fails=True)
        lab.build_add(INTERNAL, internal=True)  # in the lab's internal apt repository only
        chat = json.loads(lab.env["AIRFLOW_CONN_LIFTOFF_CHAT"])
        chat["extra"] = {**chat.get("extra", {}), "timeout": CHAT_TIMEOUT_S}
        # The links must name this stack's api-server: its port, chosen here and given to the stack.
        port = free_port()
        env = {**lab.env, "AIRFLOW_CONN_LIFTOFF_CHAT": json.dumps(chat),
               "LIFTOFF_AIRFLOW_URL": f"http://127.0.0.1:{port}",
               "AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL": "1"}
        mp = pytest.MonkeyPatch()
        mp.setattr(airflow_stack_module, "free_port", lambda: port)
        try:
            with airflow_stack(tmp_path_factory.mktemp("chat-airflow"), env) as stack:
                mp.undo()
                assert stack.base_url == env["LIFTOFF_AIRFLOW_URL"]
                stack.wait_until_dag_parsed(CANARY)
                stack.wait_until_dag_parsed(FAST)
                yield lab, stack
        finally:
            mp.undo()
        assert stack.leftovers() == [], "the airflow stack left something behind"


# -- helpers -----------------------------------------------------------------------------------------

def set_chat(lab: Lab, *args: str) -> None:
    out = lab.cli("chat", *args)
    assert out.returncode == 0, out.stdout + out.stderr


def fields_of(message: dict) -> dict[str, str]:
    out: dict[str, str] = {}
    for attachment in message["payload"].get("attachments") or []:
        for f in attachment.get("fields") or []:
            out[f["title"]] = f["value"]
    return out


def run_messages(lab: Lab, run_id: str, status: int | None = 200) -> list[dict]:
    """The receiver's messages of one run (its ``run`` field), oldest first."""
    return [m for m in lab_chat.read_messages(lab.config)
            if fields_of(m).get("run") == run_id and (status is None or m["status"] == status)]


def run_to_end(stack: Stack, dag_id: str, conf: dict) -> tuple[str, str]:
    run_id = stack.trigger(dag_id, conf)["dag_run_id"]
    return run_id, stack.wait_run(dag_id, run_id, timeout=600)


def failed_totals(lab: Lab, pipeline: str) -> Counter[str]:
    """``liftoff_notifications_failed_total`` of one pipeline in the lab's Pushgateway, by event."""
    with urllib.request.urlopen(f"http://{lab.config.pushgateway_addr}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: Counter[str] = Counter()
    for line in text.splitlines():
        if line.startswith("liftoff_notifications_failed_total{") and f'pipeline="{pipeline}"' in line:
            event = re.search(r'event="([^"]+)"', line)
            assert event, line
            out[event.group(1)] += int(float(line.rsplit(" ", 1)[1]))
    return out


def task_log_records(stack: Stack, dag_id: str, run_id: str) -> list[tuple[str, dict]]:
    """(task id, record) of every JSON line in the run's task logs."""
    root = stack.home / "logs" / f"dag_id={dag_id}" / f"run_id={run_id}"
    files = sorted(p for p in root.rglob("*.log") if p.is_file())
    assert files, f"no task log under {root}"
    out = []
    for path in files:
        task = next(part.split("=", 1)[1] for part in path.parts if part.startswith("task_id="))
        for line in path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                out.append((task, record))
    return out


def when(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def links_of(message: dict) -> list[str]:
    texts = [message["payload"].get("text") or ""]
    for attachment in message["payload"].get("attachments") or []:
        texts += [str(attachment.get("fallback") or ""), str(attachment.get("text") or "")]
        texts += [str(f.get("value")) for f in attachment.get("fields") or []]
    return [u.rstrip(".,;)") for t in texts for u in URL.findall(t)]


def check_airflow_link(stack: Stack, link: str, run_id: str, run_state: str) -> str | None:
    """A link to this stack's UI: the run (and task) it names exist, the page answers 200;
    returns the task id it names, if any."""
    parts = urlsplit(link)
    named = LINK_PATH.match(parts.path)
    assert named and not parts.query, link
    dag_id, named_run, task_id = (unquote(p) if p else None for p in named.groups())
    assert (dag_id, named_run) == (CANARY, run_id), link
    path = f"/dags/{quote(dag_id)}/dagRuns/{quote(named_run, safe='')}"
    assert stack.get(path)["state"] == run_state, link
    if task_id is not None:
        ti = stack.get(f"{path}/taskInstances/{quote(task_id, safe='')}")
        assert ti["task_id"] == task_id, link
    page = requests.get(link, timeout=30)
    assert page.status_code == 200 and "<html" in page.text.lower(), (link, page.status_code)
    return task_id


def check_gitlab_link(lab: Lab, link: str) -> None:
    """A link to the lab's ops GitLab (a QA pipeline or job page, the range of changes) resolves."""
    base = lab.config.gitlab_url.rstrip("/")
    assert link.startswith(base + "/"), link
    compare = re.fullmatch(rf"{re.escape(base)}/{REPO_PROJECT_PATH}/-/compare/(\w+)\.\.\.(\w+)", link)
    if compare:  # the lab serves GitLab's compare API, not its web page: the API names this page
        token = json.loads(lab.env["AIRFLOW_CONN_LIFTOFF_OPS_GITLAB"])["password"]
        resp = requests.get(f"{base}/api/v4/projects/{REPO_PROJECT_ID}/repository/compare",
                            params={"from": compare.group(1), "to": compare.group(2)},
                            headers={"PRIVATE-TOKEN": token}, timeout=30)
        assert resp.status_code == 200, (link, resp.status_code)
        assert resp.json()["web_url"] == link and resp.json()["commits"], resp.json()
        return
    page = requests.get(link, timeout=30)
    assert page.status_code == 200, (link, page.status_code)


# -- 1. a good run while the chat hangs ------------------------------------------------------------------

def test_a_good_canary_deploy_succeeds_while_the_chat_hangs_and_each_post_gives_up_in_time(lab_stack):
    lab, stack = lab_stack
    before = failed_totals(lab, CANARY)
    set_chat(lab, "--fail", "off", "--slow", str(SLOW_S))
    try:
        run_id, state = run_to_end(stack, CANARY, {"version": GOOD, "quiet_period_seconds": QUIET_S})
    finally:
        set_chat(lab, "--slow", "0")
    states = stack.task_states(CANARY, run_id)
    assert state == "success", states
    # Nothing failed because of chat: every step ran and passed; only the failure branch was skipped.
    assert {t: s for t, s in states.items() if s != "success"} == {
        "on_failure": "skipped", "rollback": "skipped", "halt": "skipped",
        "stage_6_canary_fleet.canary_decision": "skipped"}, states  # the judge asked nobody
    tries = {ti["task_id"]: ti["try_number"] for ti in stack.task_instances(CANARY, run_id)}
    assert {t: n for t, n in tries.items() if n != (1 if states[t] == "success" else 0)} == {}, tries

    # Every event of the run was attempted, and every attempt gave up (the task log's line).
    records = task_log_records(stack, CANARY, run_id)
    gave_up = [(task, rec) for task, rec in records if GAVE_UP.search(str(rec.get("event", "")))]
    events = [GAVE_UP.search(str(rec["event"])).group(1) for _, rec in gave_up]
    expected = Counter({"deploy_started": 1, "stage_passed": 6, "canary_verified": 1, "run_finished": 1})
    assert Counter(events) == expected, [rec["event"] for _, rec in gave_up]
    tasks = Counter(task for task, _ in gave_up)
    stage_done = {t for t in states if t.endswith(".stage_done")}
    assert len(stage_done) == 6
    posting = ["resolve_version", *stage_done, "stage_6_canary_fleet.canary_verified", "finalize"]
    assert tasks == Counter(posting), tasks  # one post each
    assert all(str(rec.get("level", "warning")).lower() == "warning" for _, rec in gave_up)
    for _, rec in gave_up:  # the log names the chat's host, never the webhook's token path
        assert lab_chat.webhook_path(lab.config).rsplit("/", 1)[-1] not in json.dumps(rec)

    # Each post reached the hanging receiver, which answered SLOW_S later (and then kept it): the
    # post gave up within the timeout of its arrival.
    def all_arrived() -> list[dict]:
        got = run_messages(lab, run_id)
        return got if len(got) >= len(events) else []

    arrived = wait_for("the hanging receiver's late records of the run", all_arrived, timeout=SLOW_S + 60)
    assert len(arrived) == len(events), [lab_chat.event_of(m) for m in arrived]
    posts = sorted(arrived, key=lambda m: m["time"])
    gave_up.sort(key=lambda tr: when(tr[1]["timestamp"]))
    assert [lab_chat.event_of(m) for m in posts] == [GAVE_UP.search(str(r["event"])).group(1)
                                                    for _, r in gave_up]
    for message, (task, rec) in zip(posts, gave_up, strict=True):
        arrival = when(message["time"]) - SLOW_S
        waited = when(rec["timestamp"]) - arrival
        assert waited <= CHAT_TIMEOUT_S + 0.5, (task, lab_chat.event_of(message), waited)  # + logging

    # ... and each failure was counted in the Pushgateway, by event.
    wait_for("the failed notifications counted in the Pushgateway",
             lambda: failed_totals(lab, CANARY) - before == expected, timeout=30)


# -- 2. a failed gate: the events in order, and their links ------------------------------------------------

def test_a_failed_gate_is_told_in_order_with_its_reason_and_links_that_resolve(lab_stack):
    lab, stack = lab_stack
    set_chat(lab, "--fail", "off", "--slow", "0")
    run_id, state = run_to_end(stack, CANARY, {"version": BAD, "quiet_period_seconds": QUIET_S,
                                              "on_failure": "halt"})
    states = stack.task_states(CANARY, run_id)
    assert state == "failed", states
    failed = "stage_3_staging_fleet.qa"
    assert states[failed] == "failed" and states["halt"] == "success", states
    assert states["rollback"] == "skipped" and states["finalize"] == "failed", states

    # What the DAG did, in its order, is what chat hears.
    passed = [t for t in sorted(states) if t.endswith(".stage_done") and states[t] == "success"]
    assert passed == ["stage_1_staging_migrations.stage_done", "stage_2_staging_gitaly.stage_done"], states
    told = [t for t, s in states.items() if s == "failed" and t != "finalize"]
    assert told == [failed], states
    expected = ["deploy_started", *["stage_passed"] * len(passed), "stage_failed", "halted", "run_finished"]
    messages = run_messages(lab, run_id, status=None)
    assert [m["status"] for m in messages] == [200] * len(messages)
    assert [lab_chat.event_of(m) for m in messages] == expected, lab_chat.format_messages(messages)

    started, *stages, failure, halted, finished = messages
    assert fields_of(started)["version"] == BAD and BAD in started["payload"]["text"]
    assert fields_of(started)["environments"] == ", ".join(ENVS)
    assert [(fields_of(m)["environment"], fields_of(m)["stage"]) for m in stages] == [
        ("gstg", "stage_1"), ("gstg", "stage_2")]
    why = fields_of(failure)
    assert why["step"] == failed
    assert why["reason"].startswith("QA failed on gstg:") and why["reason"] in failure["payload"]["text"]
    assert "stage_3_staging_fleet failed at qa" in failure["payload"]["text"]
    assert fields_of(halted)["environments"] == "gstg"  # the environment it was changing
    assert "deploy_canary halted: gstg left as it is" in halted["payload"]["text"]
    assert ":red_circle: deploy_canary failed" in finished["payload"]["text"]
    assert fields_of(finished)["status"] == "failed"
    assert f"deploy_canary failed at {failed} (first)" in finished["payload"]["text"]

    # `liftoff watch` (and the run's note in the UI) end with the reason, not only task names.
    watched = subprocess.run([LIFTOFF, "watch", run_id, "--dag", CANARY], env=stack.cli_env(),
                             capture_output=True, text=True, timeout=120)
    assert watched.returncode == 1, watched.stdout + watched.stderr
    sentence = next((ln.strip() for ln in watched.stdout.splitlines() if "(first)" in ln), "")
    assert sentence.startswith(f"deploy_canary failed at {failed} (first): QA failed on gstg:"), \
        watched.stdout
    assert "what changed:" in sentence and stack.dag_run(CANARY, run_id)["note"] == sentence

    # Every link resolves: the run's own (this stack's api-server: the run and task it names exist
    # and the page answers 200) and the lab GitLab's (QA pipeline and jobs, the range of changes).
    for message in messages:
        assert links_of(message), f"no link in {lab_chat.event_of(message)}"
    links = {link for m in messages for link in links_of(m)}
    ours = {link for link in links if link.startswith(stack.base_url + "/")}
    named_tasks = {check_airflow_link(stack, link, run_id, "failed") for link in ours}
    assert named_tasks == {None, failed}, sorted(ours)  # the run, and the failed step
    assert f"{stack.base_url}/dags/{CANARY}/runs/{quote(run_id, safe='')}" in ours
    for link in links - ours:
        check_gitlab_link(lab, link)
    # each message ends with its own link to the run (the failure's: to its step)
    for message in messages:
        last = message["payload"]["text"].splitlines()[-1]
        assert last in ours, last


# -- 3. an internal build: its version never reaches chat ---------------------------------------------------

def test_an_internal_fast_deploy_is_told_as_internal_without_its_version(lab_stack):
    lab, stack = lab_stack
    set_chat(lab, "--fail", "off", "--slow", "0")
    reason = f"embargoed security fix {INTERNAL}"
    # from chat, through the CLI: `liftoff fast-deploy ... --internal --watch` until the run ends
    cli = subprocess.run([LIFTOFF, "--json", "fast-deploy", "gstg", INTERNAL, "--internal", "--reason",
                          reason, "--watch", "--interval", "1"], env=stack.cli_env(), capture_output=True,
                         text=True, timeout=600)
    run_id = json.loads(cli.stdout.splitlines()[0])["dag_run_id"]
    state = stack.wait_run(FAST, run_id, timeout=60)
    assert (cli.returncode, state) == (0, "success"), (cli.stderr, stack.task_states(FAST, run_id))
    assert stack.get(f"/dags/{FAST}/dagRuns/{quote(run_id, safe='')}")["conf"]["version"] == INTERNAL
    hosts = lab.status()["environments"]["gstg"]["hosts"]
    assert {h["installed"] for h in hosts} == {INTERNAL}, hosts  # this build went out, silently

    messages = run_messages(lab, run_id, status=None)
    assert [lab_chat.event_of(m) for m in messages] == ["fast_deploy", "run_finished"], \
        lab_chat.format_messages(messages)
    suffix = INTERNAL.split("+", 1)[1]
    # the version, its safe-name form, the part after the '+', its commit and its base version
    traces = {INTERNAL, INTERNAL.replace("+", "_"), suffix, "c57c57c", INTERNAL.split("+", 1)[0]}
    for message in messages:
        shown = json.dumps(message)
        assert not [t for t in traces if t in shown], shown
    assert not [t for t in traces if t in cli.stdout + cli.stderr + run_id], cli.stdout  # the CLI's own
    told = messages[0]
    assert ":zap: fast deploy of internal to gstg" in told["payload"]["text"]
    no_trace_anywhere(lab, stack, run_id, traces)
    assert fields_of(told)["version"] == "internal"
    assert "reason: embargoed security fix internal" in told["payload"]["text"]
    assert ":checkered_flag: fast_deploy succeeded" in messages[1]["payload"]["text"]



def no_trace_anywhere(lab: Lab, stack: Stack, run_id: str, traces: set[str]) -> None:
    """Issue #10: an internal build's version leaves no trace in the run's task logs, its XCom
    values (what the UI shows), the Pushgateway's metrics, ``liftoff status --json`` or the
    fleet view's JSON."""
    def leaks(text: str) -> list[str]:
        return sorted(t for t in traces if t in text)

    logs = [p for p in (stack.home / "logs").rglob("*") if p.is_file() and f"run_id={run_id}" in str(p)]
    assert logs, "no task log of the run"
    for path in logs:
        assert not leaks(path.read_text(errors="replace")), f"{path}: {leaks(path.read_text())}"
    for ti in stack.task_instances(FAST, run_id):
        base = f"/dags/{FAST}/dagRuns/{quote(run_id, safe='')}/taskInstances/{ti['task_id']}/xcomEntries"
        for entry in stack.get(base).get("xcom_entries", []):
            value = stack.get(f"{base}/{quote(entry['key'], safe='')}")
            assert not leaks(json.dumps(value)), (ti["task_id"], entry["key"], value)
    gateway = json.loads(lab.env["AIRFLOW_CONN_LIFTOFF_PUSHGATEWAY"])["host"]
    metrics = requests.get(f"{gateway.rstrip('/')}/metrics", timeout=30).text
    assert 'version="internal"' in metrics and not leaks(metrics), leaks(metrics)
    status = subprocess.run([LIFTOFF, "--json", "status"], env=stack.cli_env(), capture_output=True,
                            text=True, timeout=120)
    assert status.returncode == 0 and not leaks(status.stdout), leaks(status.stdout)
    fleet = requests.get(f"{stack.base_url}/liftoff/api/fleet", timeout=60,
                         headers={"Authorization": f"Bearer {stack.token()}"})
    assert fleet.status_code == 200 and not leaks(fleet.text), leaks(fleet.text)
