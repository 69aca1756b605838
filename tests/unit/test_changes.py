"""liftoff.changes against a fake ops GitLab (the compare API python-gitlab calls) and a fake
build source: the change range of two builds (count, first lines newest first, the compare
link), a build entry's ``sha``, and what is said instead of raising: a build without a known
commit, an unknown commit (404), an unreachable or slow GitLab. An internal build's version
never appears; pressure is the range from the running build to the newest build."""

from __future__ import annotations

import json
import threading
import time
from types import SimpleNamespace
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

from liftoff import builds, changes
from liftoff.changes import ChangeRange, ChangeSource
from liftoff.metrics import PipelineMetrics
from liftoff.versions import commit_sha
from tests.unit.apt_fakes import INDEX, packages_index
from tests.unit.http_fakes import FakeGateway, LocalServer, QuietHandler

PROJECT = "gitlab-org/gitlab"
TOKEN = "glpat-unit-token"
# a linear history, oldest first: 12 commits; the builds name some of them
HISTORY = [f"{i:02x}" + "c0ffee" + f"{i:032x}" for i in range(12)]
A = f"17.9.0+rnightly.100.{HISTORY[2][:8]}-0"  # commit 2
B = f"17.9.0+rnightly.101.{HISTORY[9][:8]}-0"  # commit 9: 7 commits after A
OFFICIAL = "17.8.0-ee.0"  # its build entry names commit 1
RC = "17.8.1-rc1.ee.0"  # no sha anywhere
NEWEST = f"17.9.0+rnightly.102.{HISTORY[11][:8]}-0"


class FakeGitLab:
    """``GET /api/v4/projects/:path/repository/compare`` over HISTORY like GitLab (404 for an
    unknown ref), and the build source: an apt repository's ``Packages`` index at ``INDEX``.
    Records every request and its token; ``delay`` holds compare answers."""

    def __init__(self):
        self.requests: list[tuple[str, dict, str | None]] = []
        self.builds = [{"version": A, "nightly": True}, {"version": B, "nightly": True},
                       {"version": OFFICIAL, "sha": HISTORY[1][:9]}, {"version": RC}]
        self.delay = 0.0
        fake = self

        class Handler(QuietHandler):
            def do_GET(self):  # noqa: N802
                parts = urlsplit(self.path)
                if parts.path == INDEX:
                    self.reply(200, packages_index(fake.builds).encode(), "text/plain")
                    return
                query = {k: v[0] for k, v in parse_qs(parts.query).items()}
                fake.requests.append((unquote(parts.path), query, self.headers.get("PRIVATE-TOKEN")))
                if fake.delay:
                    time.sleep(fake.delay)
                want = f"/api/v4/projects/{PROJECT}/repository/compare"
                if unquote(parts.path) != want:
                    self.reply(404, {"message": "404 Project Not Found"})
                    return
                self.reply(*fake.compare(query.get("from", ""), query.get("to", "")))

        self._http = LocalServer(Handler)
        self.url = self._http.url

    def compare(self, from_ref: str, to_ref: str) -> tuple[int, dict]:
        index = {ref: i for i, c in enumerate(HISTORY) for ref in (c, c[:7], c[:8], c[:9])}
        if from_ref not in index or to_ref not in index:
            return 404, {"message": "404 Ref Not Found"}
        commits = [{"id": c, "short_id": c[:8], "title": f"change {i}", "message": f"change {i}\n\nbody",
                    "author_name": "Ada", "created_at": "2026-01-01T00:00:00Z",
                    "web_url": f"{self.url}/c/{c}"}
                   for i, c in enumerate(HISTORY)][index[from_ref] + 1:index[to_ref] + 1]
        return 200, {"commit": commits[-1] if commits else None, "commits": commits, "diffs": [],
                     "compare_same_ref": from_ref == to_ref,
                     "web_url": f"{self.url}/{PROJECT}/-/compare/{from_ref}...{to_ref}"}

    def close(self):
        self._http.close()


@pytest.fixture()
def gitlab(monkeypatch):
    fake = FakeGitLab()
    for name in ("LIFTOFF_INVENTORY", "LIFTOFF_CONNECTIONS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AIRFLOW_CONN_LIFTOFF_OPS_GITLAB", json.dumps(
        {"conn_type": "http", "host": fake.url, "password": TOKEN, "extra": {"qa_project": "qa/runner"}}))
    monkeypatch.setenv("AIRFLOW_CONN_LIFTOFF_BUILDS", json.dumps(
        {"conn_type": "http", "host": fake.url}))
    yield fake
    fake.close()


def source(fake: FakeGitLab, **kw) -> ChangeSource:
    return ChangeSource(fake.url, TOKEN, PROJECT, **kw)


def test_versions_and_build_entries_name_their_commit(gitlab):
    assert commit_sha(A) == HISTORY[2][:8]
    assert commit_sha("16.3.202311291200-13bd0cc7c2a.3f6b8fe0f4d") == "13bd0cc7c2a"  # the rails SHA
    assert commit_sha(OFFICIAL) is None and commit_sha("nonsense") is None
    assert builds.build_sha(OFFICIAL, gitlab.builds) == HISTORY[1][:9]
    assert builds.build_sha(RC, gitlab.builds) is None
    assert builds.build_sha(OFFICIAL, [{"version": OFFICIAL, "sha": "not hex; rm -rf"}]) is None
    assert builds.newest_build([*gitlab.builds, {"version": NEWEST}, {"version": "bad"}]) == NEWEST


def test_the_range_between_two_builds(gitlab):
    rng = changes.change_range(source(gitlab), A, B)
    assert rng.known and rng.reason == ""
    assert (rng.from_sha, rng.to_sha, rng.count) == (HISTORY[2][:8], HISTORY[9][:8], 7)
    assert rng.titles == ("change 9", "change 8", "change 7", "change 6", "change 5")  # newest first
    assert rng.web_url == f"{gitlab.url}/{PROJECT}/-/compare/{HISTORY[2][:8]}...{HISTORY[9][:8]}"
    [(path, query, token)] = gitlab.requests
    assert query == {"from": HISTORY[2][:8], "to": HISTORY[9][:8]} and token == TOKEN
    line = changes.summary_line(rng)
    span = f"{HISTORY[2][:8]}..{HISTORY[9][:8]}"
    assert line.startswith(f"what changed: 7 commits ({span}): change 9; change 8")
    assert "… and 2 more" in line and line.endswith(rng.web_url)
    chat = changes.chat_lines(rng, "gstg")
    assert chat[0] == f"what changed on gstg: 7 commits ({A} → {B}): {rng.web_url}"
    assert chat[1:] == ["• change 9", "• change 8", "• change 7", "• change 6", "• change 5", "… and 2 more"]


def test_settings_from_the_connection_and_a_build_entry_sha(gitlab, monkeypatch):
    found, why = changes.source_of(None)
    assert why == ""
    assert (found.gitlab_url, found.project, found.private_token) == (gitlab.url, PROJECT, TOKEN)
    assert TOKEN not in repr(found)
    rng = changes.change_range(SimpleNamespace(inventory=None), OFFICIAL, A)  # the build list read
    assert rng.known and rng.from_sha == HISTORY[1][:9] and rng.count == 1 and rng.titles == ("change 2",)
    monkeypatch.setenv("AIRFLOW_CONN_LIFTOFF_OPS_GITLAB", json.dumps(
        {"conn_type": "http", "host": gitlab.url, "extra": {"source_project": "mirror/gitlab"}}))
    assert changes.source_of(None)[0].project == "mirror/gitlab"
    monkeypatch.setenv("AIRFLOW_CONN_LIFTOFF_OPS_GITLAB", json.dumps(
        {"conn_type": "http", "host": gitlab.url, "extra": {"source_project": "../etc"}}))
    assert changes.source_of(None)[0] is None


def test_same_build_is_no_change_without_asking(gitlab):
    rng = changes.change_range(source(gitlab), B, B)
    assert rng.known and rng.count == 0 and gitlab.requests == []
    assert changes.summary_line(rng) == "what changed: no new commits"


def test_a_build_without_a_known_commit_says_so(gitlab):
    rng = changes.change_range(source(gitlab), RC, B, builds=gitlab.builds)
    assert not rng.known and RC in rng.reason and "no known commit" in rng.reason
    assert gitlab.requests == []  # nothing to ask
    assert changes.summary_line(rng).startswith("what changed: not known (no known commit for 17.8.1-rc1")


def test_an_unknown_commit_is_a_reason(gitlab):
    stray = "17.9.0+rnightly.103.deadbee-0"
    rng = changes.change_range(source(gitlab), A, stray)
    assert not rng.known and "not found" in rng.reason and "404" in rng.reason and "deadbee" in rng.reason


def test_an_unreachable_gitlab_is_a_reason_and_quick(gitlab):
    gone = ChangeSource("http://127.0.0.1:9", TOKEN, PROJECT, timeout=2)
    started = time.monotonic()
    rng = changes.change_range(gone, A, B)
    assert time.monotonic() - started < 2.5
    assert not rng.known and rng.reason.startswith("GitLab unreachable") and TOKEN not in rng.reason


def test_a_refused_token_and_no_connection_are_reasons(gitlab, monkeypatch):
    class Refusing(QuietHandler):
        def do_GET(self):  # noqa: N802
            self.reply(401, {"message": "401 Unauthorized"})

    server = LocalServer(Refusing)
    try:
        rng = changes.change_range(ChangeSource(server.url, "wrong", PROJECT), A, B)
    finally:
        server.close()
    assert not rng.known and "authentication refused" in rng.reason
    monkeypatch.delenv("AIRFLOW_CONN_LIFTOFF_OPS_GITLAB")
    rng = changes.change_range(None, A, B)
    assert not rng.known and "no ops GitLab" in rng.reason


def test_an_internal_build_never_shows_its_version(gitlab):
    rng = changes.change_range(source(gitlab), A, B, internal=True)
    assert rng.known and rng.count == 7 and rng.titles == () and rng.withheld
    shown = json.dumps(rng.to_dict()) + changes.summary_line(rng) + "\n".join(changes.chat_lines(rng))
    assert B not in shown and "internal" in shown and "titles withheld" in shown
    # the run says it: Run.redact_version
    secret_rc = "17.9.1-rc2.ee.0"
    run = SimpleNamespace(inventory=None, redact_version=True)
    unknown = changes.change_range(run, A, secret_rc)
    assert not unknown.known and secret_rc not in json.dumps(unknown.to_dict())
    assert "internal" in unknown.reason
    assert changes.change_range(run, A, B, internal=False).titles  # said otherwise on purpose


class Records:
    """A run's store: ``deployments(env)`` newest first."""

    def __init__(self, **running: str):
        self.running = running

    def deployments(self, env: str, limit: int | None = None):
        version = self.running.get(env)
        return [SimpleNamespace(version=version, status="success")] if version else []


def test_pressure_from_the_running_build_to_the_newest(gitlab):
    gitlab.builds.append({"version": NEWEST, "nightly": True})
    run = SimpleNamespace(inventory=None, store=Records(gstg=A, gprd=NEWEST))
    rng = changes.pressure(run, "gstg")
    assert rng.known and rng.count == 9 and (rng.from_version, rng.to_version) == (A, NEWEST)
    assert changes.pressure(run, "gprd").count == 0
    none = changes.pressure(run, "gprd-cny")
    assert not none.known and "no successful deploy of gprd-cny" in none.reason
    many = changes.pressures(run, {"gstg": A, "gprd": B, "pre": None})
    assert {e: r.count for e, r in many.items()} == {"gstg": 9, "gprd": 2, "pre": 0}
    assert not many["pre"].known


def test_pressures_are_bounded_by_the_timeout(gitlab):
    gitlab.delay = 3.0
    started = time.monotonic()
    found = changes.pressures(SimpleNamespace(inventory=None), {"gstg": A, "gprd": B}, timeout=1.0)
    assert time.monotonic() - started < 2.5
    late = found["gstg"]
    assert not late.known and ("Timeout" in late.reason or "no answer" in late.reason), late
    assert found["gprd"].known and found["gprd"].count == 0  # runs the newest build: nothing to ask


def test_push_pressure_pushes_one_gauge_per_environment(gitlab, monkeypatch):
    gitlab.builds.append({"version": NEWEST, "nightly": True})
    gw = FakeGateway()
    try:
        run = SimpleNamespace(inventory=None, store=Records(gstg=A, gprd=RC),
                              metrics=lambda: PipelineMetrics(gw.url, "deploy_canary"))
        assert changes.push_pressure(run, ["gstg", "gprd"]) == {"gstg": 9, "gprd": None}
        [(method, path, body, _)] = gw.pushes  # gprd's is not known: nothing pushed
        assert (method, path) == ("POST", "/metrics/job/liftoff/env/gstg")
        assert 'liftoff_deploy_pressure{env="gstg"} 9.0' in body
    finally:
        gw.close()


def test_nothing_raises(monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(changes, "_change_range", boom)
    rng = changes.change_range(None, A, B)
    assert not rng.known and "RuntimeError" in rng.reason
    assert changes.push_pressure(SimpleNamespace(), ["gstg"]) == {}
    assert changes.summary_line(None) == "what changed: not known"
    assert changes.summary_line(ChangeRange(A, B, reason="x")) == "what changed: not known (x)"


def test_concurrent_calls_share_nothing(gitlab):
    results: list[int] = []
    def one() -> None:
        results.append(changes.change_range(source(gitlab), A, B).count)

    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert results == [7, 7, 7, 7]
