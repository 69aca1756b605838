"""The lab's application repository (``gitlab-org/gitlab`` on the lab's GitLab): a deterministic
linear history in which every lab build with a known commit is one commit.

A build's commit: its ``sha`` attribute when it has one, else the SHA its version carries (a
nightly's ``+rnightly.<pipeline>.<sha>-<rev>``, an auto-deploy version's first SHA). Its full
id is 40 hex digits starting with that SHA. Builds in the order they were added (``seq``); before
each build's commit come ``commits_before(version) - 1`` other commits (1 to 5 in all, from the
version alone), after a root commit. Builds without a known commit (official and RC versions)
have none. Same builds, same history: ids, titles, authors and dates never depend on the clock.

Only the lab uses this (it does not import liftoff).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

REPO_PROJECT_ID = 278964
REPO_PROJECT_PATH = "gitlab-org/gitlab"
MAX_BETWEEN = 5
EPOCH = 1735689600  # 2025-01-01T00:00:00Z: the root commit; each next one 10 minutes later
STEP_S = 600
_SHA = re.compile(r"^[0-9a-f]{7,40}$")
_NIGHTLY = re.compile(r"\+rnightly\.[0-9]+\.([0-9a-f]{7,40})-[0-9]+$")
_AUTO_DEPLOY = re.compile(r"^[0-9]+\.[0-9]+\.[0-9]{12}-([0-9a-f]{7,40})\.[0-9a-f]{7,40}$")
_VERBS = ("Fix", "Add", "Remove", "Refactor", "Speed up", "Document", "Harden", "Simplify")
_AREAS = ("merge request widget", "CI pipeline graph", "issue boards", "Gitaly client", "Sidekiq cron",
          "project import", "container registry", "search API", "user settings", "audit events")
_AUTHORS = ("Ada Lovelace", "Grace Hopper", "Alan Turing", "Barbara Liskov", "Edsger Dijkstra")


def _hex(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def build_sha(build: Any) -> str | None:
    """The commit a build names: its ``sha`` attribute, else its version's SHA, else None."""
    sha = getattr(build, "sha", None)
    if isinstance(sha, str) and _SHA.match(sha):
        return sha
    version = str(getattr(build, "version", ""))
    m = _NIGHTLY.search(version) or _AUTO_DEPLOY.match(version)
    return m.group(1) if m else None


def commits_before(version: str) -> int:
    """How many commits a build adds to the history (its own included): 1 to MAX_BETWEEN."""
    return 1 + int(_hex(f"lab-count:{version}")[:8], 16) % MAX_BETWEEN


def full_id(sha: str) -> str:
    """The 40-hex id of a build's commit, starting with the build's SHA."""
    return (sha + _hex(f"lab-build:{sha}"))[:40]


@dataclass(frozen=True)
class Commit:
    id: str
    title: str
    message: str
    author_name: str
    created: int
    parent: str | None
    build: str | None = None  # the version whose commit this is

    def to_json(self, base: str, path: str = REPO_PROJECT_PATH) -> dict:
        when = datetime.fromtimestamp(self.created, UTC).isoformat().replace("+00:00", "Z")
        email = self.author_name.lower().replace(" ", ".") + "@example.com"
        return {"id": self.id, "short_id": self.id[:8], "created_at": when,
                "parent_ids": [self.parent] if self.parent else [], "title": self.title,
                "message": self.message, "author_name": self.author_name, "author_email": email,
                "authored_date": when, "committer_name": self.author_name, "committer_email": email,
                "committed_date": when, "trailers": {}, "extended_trailers": {},
                "web_url": f"{base}/{path}/-/commit/{self.id}"}


def _change(key: str, n: int, parent: str | None) -> Commit:
    cid = _hex(f"lab-change:{key}")
    h = int(cid[:8], 16)
    title = f"{_VERBS[h % len(_VERBS)]} {_AREAS[(h >> 4) % len(_AREAS)]} (lab change {cid[:8]})"
    return Commit(cid, title, f"{title}\n\nChangelog: other\n", _AUTHORS[(h >> 8) % len(_AUTHORS)],
                  EPOCH + n * STEP_S, parent)


def history(builds: Iterable[Any]) -> list[Commit]:
    """Every commit, oldest first (see the module's doc)."""
    commits = [_change("root", 0, None)]
    seen = {commits[0].id}
    for build in sorted(builds, key=lambda b: getattr(b, "seq", 0)):
        sha = build_sha(build)
        if sha is None or full_id(sha) in seen:
            continue
        for i in range(1, commits_before(build.version)):
            commits.append(_change(f"{build.version}:{i}", len(commits), commits[-1].id))
        title = f"Merge branch 'lab-release-{sha[:8]}' into 'master'"
        commits.append(Commit(full_id(sha), title, f"{title}\n\nSee merge request !{len(commits)}\n",
                              _AUTHORS[0], EPOCH + len(commits) * STEP_S, commits[-1].id, build.version))
        seen.add(commits[-1].id)
    return commits


class Repository:
    """A history and the refs that resolve in it (an id or a prefix of 7+ hex digits, ``master``,
    ``main``, ``HEAD``)."""

    def __init__(self, commits: list[Commit]):
        self.commits = commits

    @classmethod
    def of_builds(cls, builds: Iterable[Any]) -> Repository:
        return cls(history(builds))

    def resolve(self, ref: str | None) -> int | None:
        """The index of the commit ``ref`` names, None when none (or several) does."""
        if not ref:
            return None
        if ref in ("master", "main", "HEAD"):
            return len(self.commits) - 1
        ref = ref.lower()
        if not re.fullmatch(r"[0-9a-f]{7,40}", ref):
            return None
        found = [i for i, c in enumerate(self.commits) if c.id.startswith(ref)]
        return found[0] if len(found) == 1 else None

    def compare(self, from_ref: str, to_ref: str) -> list[Commit] | None:
        """The commits reachable from ``to_ref`` and not from ``from_ref``, oldest first (none when
        ``to_ref`` is older); None when a ref is unknown."""
        start, end = self.resolve(from_ref), self.resolve(to_ref)
        if start is None or end is None:
            return None
        return self.commits[start + 1:end + 1]

    def log(self, ref: str | None = None) -> list[Commit] | None:
        """The commits reachable from ``ref`` (default ``master``), newest first."""
        end = self.resolve(ref or "master")
        return None if end is None else list(reversed(self.commits[:end + 1]))
