"""The invariants the chaos soak (bench/soak.py) checks after every run, against the lab (its
status, LBs and audit log) and liftoff's state store. Each check returns violation sentences;
the soak adds the seed and the step.

1. every host runs a known build and is UP and READY on every LB, or is recorded (drained,
   failed) in liftoff's state;
2. the LBs of an environment agree on every server's state and weight;
3. no lock is held by a run that has ended; no deployment record says "running" for one;
4. chef is stopped only on hosts liftoff lists as such;
5. every command a host ran (the lab's audit log) is in liftoff's audit trail, and no host of a
   locked environment ran a changing command for a run that did not hold the lock;
6. no environment went back to an older package past a post-deployment migration without a
   recorded override; the canary weight is 0 whenever a canary deploy (deploy_canary's stage 6)
   or a rollback of the canary is running (sampled during the run by the soak:
   :func:`canary_weight_now`); a fast_deploy to the canary is not held to it (the design zeroes
   the weight in the canary pipeline's stage 6 only; the soak counts the weights it sees then);
7. metrics (the Pushgateway) and notifications (the chat receiver) never carry an internal
   build's version.
"""

from __future__ import annotations

import re
import urllib.request
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from lab import chat
from lab.hostsim import split_chain
from lab.topology import DATABASE, LB_ROLES

# Commands that change a host (the lock part of invariant 5); read-only inspections may run
# before a run takes its lock (the precheck).
CHANGING = re.compile(r"^(apt-get install|gitlab-ctl (restart|hup|reconfigure)|gitlab-rake db:migrate$|"
                      r"chef-client-(disable|enable)|systemctl (stop|start) chef-client|"
                      r"gitlab-chef-role set-version|gitlab-patch apply)")
LAB_ONLY = "chef-client (interval run)"  # labd's own chef timer, not a command anyone sent
MANUAL_LOCK = "manual-"  # a lock a person took (deploy_lock): held on purpose after its run


def words_of(command: str) -> list[tuple[str, ...]]:
    """The commands of a line or ``&&`` chain as word tuples, step markers (echo) and ``sudo``
    left out, so the lab's per-command lines and liftoff's chains compare."""
    try:
        chain = split_chain(command)
    except ValueError:
        return [(command.strip(),)]
    out = []
    for words in chain:
        if words and words[0] == "sudo":
            words = words[1:]
        if words and words[0] != "echo":
            out.append(tuple(words))
    return out


def lab_audit(path) -> list[tuple[str, str, int, str]]:
    """(time, host, exit code, command) of every line of labd's audit log."""
    out = []
    if not path.exists():
        return out
    for line in path.read_text(errors="replace").splitlines():
        parts = line.split("\t", 4)
        if len(parts) == 5:
            out.append((parts[0], parts[1], int(parts[2]), parts[4]))
    return out


@dataclass
class Checker:
    """Checks the invariants; remembers what it reported so a violation is reported once."""

    lab: object  # tests.labkit.Lab
    store: object  # liftoff.store.Store
    inventory: object  # liftoff.inventory.Inventory
    internal_versions: set[str] = field(default_factory=set)
    reported: set[str] = field(default_factory=set)
    _snap: dict | None = None

    def check(self, runs: Mapping[str, str]) -> list[str]:
        """Every invariant; ``runs``: {run id: Airflow state} of every run the soak started."""
        found: list[str] = []
        self._snap = None
        status = self.lab.status()
        found += self.hosts_in_service_or_recorded(status)
        found += self.lbs_agree(status)
        found += self.no_lock_of_an_ended_run(runs)
        found += self.chef_stopped_only_where_listed(status)
        found += self.every_command_audited()
        found += self.changes_under_the_lock()
        found += self.no_downgrade_past_post_migrations(status)
        found += self.no_internal_version_in_metrics_or_chat()
        new = [v for v in found if v not in self.reported]
        self.reported.update(new)
        return new

    # 1 ----------------------------------------------------------------------------------------
    def hosts_in_service_or_recorded(self, status: dict) -> list[str]:
        known = {b["version"] for b in (status.get("builds") or {}).values()} \
            if isinstance(status.get("builds"), dict) else {b["version"] for b in status.get("builds") or []}
        drained = {(d.env, d.host) for d in self.store.drained()}
        failed = self._failed_hosts()
        shielded = canary_set_aside(status)
        out = []
        for env, e in status["environments"].items():
            for h in e["hosts"]:
                name = h["name"]
                recorded = (env, name) in drained or (env, name) in failed or name in shielded
                if h["installed"] not in known:
                    out.append(f"1: {name} runs {h['installed']!r}, not a known build")
                if h["reachable"] is False and not recorded:
                    out.append(f"1: {name} is unreachable and liftoff has no record of it")
                for lb, backends in h["lbs"].items():
                    if not backends and h["role"] in LB_ROLES:
                        out.append(f"1: {name} is missing on {lb}")
                    for backend, s in backends.items():
                        if not str(s["status"]).startswith("UP") and not recorded:
                            out.append(f"1: {name} is {s['status']} in {backend} on {lb} without a drain "
                                       f"or failed record in liftoff's state")
        return out

    def _snapshot(self) -> dict:
        """liftoff's own view (records only, no LB read): failed hosts, where chef is stopped."""
        from liftoff.status import snapshot

        if self._snap is None:
            self._snap = snapshot(self.inventory, self.store, lbs=False, pressure=False)
        return self._snap

    def _failed_hosts(self) -> set[tuple[str, str]]:
        snap = self._snapshot()
        return {(env, f["host"]) for env, e in snap["environments"].items() for f in e["failed_hosts"]}

    # 2 ----------------------------------------------------------------------------------------
    def lbs_agree(self, status: dict) -> list[str]:
        out = []
        for e in status["environments"].values():
            for h in e["hosts"]:
                views = {lb: {b: (s["status"], s["weight"]) for b, s in backends.items()}
                         for lb, backends in h["lbs"].items() if backends}
                if len({repr(sorted(v.items())) for v in views.values()}) > 1:
                    out.append(f"2: the LBs disagree on {h['name']}: {views}")
        return out

    # 3 ----------------------------------------------------------------------------------------
    def no_lock_of_an_ended_run(self, runs: Mapping[str, str]) -> list[str]:
        out = []
        for lock in self.store.list_locks():
            if lock.run_id.startswith(MANUAL_LOCK):
                continue
            state = runs.get(lock.run_id)
            if state is None:
                out.append(f"3: {lock.env} is locked by {lock.run_id}, a run the soak never started")
            elif state in ("success", "failed"):
                out.append(f"3: {lock.env} is still locked by {lock.run_id}, which ended {state}")
        for env in self.inventory.environments:
            for d in self.store.deployments(env, limit=50):
                if d.status == "running" and runs.get(d.run_id) in ("success", "failed"):
                    out.append(f"3: the {d.kind} record of {env} says running for {d.run_id}, which ended "
                               f"{runs[d.run_id]}")
        return out

    # 4 ----------------------------------------------------------------------------------------
    def chef_stopped_only_where_listed(self, status: dict) -> list[str]:
        snap = self._snapshot()
        out = []
        for env, e in status["environments"].items():
            listed = snap["environments"].get(env, {}).get("chef_stopped", {})
            hosts = {h["host"] for h in listed.get("hosts", [])}
            env_wide = listed.get("env_wide") is not None
            for h in e["hosts"]:
                if h["chef_running"] is False and not env_wide and h["name"] not in hosts:
                    out.append(f"4: chef is stopped on {h['name']} ({h['chef_disabled_reason']!r}) but "
                               f"liftoff does not list it")
        return out

    # 5 ----------------------------------------------------------------------------------------
    def every_command_audited(self) -> list[str]:
        ran: Counter = Counter()
        first: dict = {}
        for at, host, _code, command in lab_audit(self.lab.config.path("state", "audit.log")):
            if command == LAB_ONLY:
                continue
            for w in words_of(command):
                ran[(host, w)] += 1
                first.setdefault((host, w), at)
        audited: Counter = Counter()
        for r in self.store.audit_records():
            for w in words_of(r.command):
                audited[(r.host, w)] += 1
        out = []
        for key, n in sorted(ran.items()):
            if audited[key] < n:
                out.append(f"5: {key[0]} ran `{' '.join(key[1])}` {n} time(s) (first at {first[key]}), "
                           f"liftoff's audit trail has it {audited[key]} time(s)")
        return out

    def changes_under_the_lock(self) -> list[str]:
        held: dict[tuple[str, str], list[list[float]]] = {}
        for ev in sorted(self.store.lock_events(), key=lambda e: e.at):
            key = (ev.env, ev.run_id)
            t = ev.at.timestamp()
            if ev.action == "acquire":
                held.setdefault(key, []).append([t, float("inf")])
            elif ev.action in ("release", "force_release") and held.get(key):
                held[key][-1][1] = min(held[key][-1][1], t)
        out = []
        for r in self.store.audit_records():
            if r.env in ("-", "") or not any(CHANGING.match(" ".join(w)) for w in words_of(r.command)):
                continue
            end = r.at.timestamp() if hasattr(r.at, "timestamp") else float(r.at)
            start = end - float(r.duration_s or 0)
            spans = held.get((r.env, r.run_id), [])
            if not any(a - 1.0 <= start <= b + 1.0 or a - 1.0 <= end <= b + 1.0 for a, b in spans):
                out.append(f"5: {r.host} ({r.env}) ran `{r.command[:120]}` for {r.run_id}, which did not "
                           f"hold the lock of {r.env} then")
        return out

    # 6 ----------------------------------------------------------------------------------------
    def no_downgrade_past_post_migrations(self, status: dict) -> list[str]:
        from liftoff.versions import parse_version

        builds = status.get("builds") or {}
        items = builds.values() if isinstance(builds, dict) else builds
        by_post = {f"{b['seq']:06d}_post_": b["version"] for b in items}
        overrides = {ev.env for ev in self.store.lock_events() if ev.action == "override"}
        out = []
        for env, e in status["environments"].items():
            posts = [by_post.get(m[:12]) for m in e["migrations"] if "_post_" in m]
            posts = [p for p in posts if p]
            if not posts or env in overrides:
                continue
            newest = max(posts, key=parse_version)
            for h in e["hosts"]:
                if h["installed"] and parse_version(h["installed"]) < parse_version(newest):
                    out.append(f"6: {h['name']} ({env}) runs {h['installed']}, older than {newest} whose "
                               f"post-deployment migration ran on {DATABASE[env]}, and no override is "
                               f"recorded")
        return out

    # 7 ----------------------------------------------------------------------------------------
    def no_internal_version_in_metrics_or_chat(self) -> list[str]:
        if not self.internal_versions:
            return []
        config = self.lab.config
        try:
            with urllib.request.urlopen(f"http://{config.pushgateway_addr}/metrics", timeout=10) as resp:
                metrics = resp.read().decode(errors="replace")
        except OSError as exc:
            return [f"7: the Pushgateway did not answer ({exc}); metrics not checked"]
        messages = "\n".join(repr(m) for m in chat.read_messages(config))
        out = []
        for version in sorted(self.internal_versions):
            for trace in traces(version):
                if trace in metrics:
                    out.append(f"7: the Pushgateway's metrics carry the internal build {version} ({trace!r})")
                if trace in messages:
                    out.append(f"7: a chat message carries the internal build {version} ({trace!r})")
        return out


def traces(version: str) -> list[str]:
    """How an internal version can show: as it is, its safe-name form, the part after '+', its
    commit (its base version, e.g. 17.9.0, is shared with public builds: not a trace)."""
    from liftoff.versions import commit_sha

    forms = {version, version.replace("+", "_"), version.split("+", 1)[1] if "+" in version else "",
             commit_sha(version) or ""}
    return sorted(f for f in forms if len(f) >= 7)


def canary_set_aside(status: dict) -> set[str]:
    """The canary hosts when the whole canary is set aside on purpose: every canary server in
    the same DRAIN or MAINT state on every production LB (``canary_weight --drain|--maint``, or
    the shield a production rollback leaves: "gprd-cny stays drained"); liftoff's status shows
    that as the canary's state, not as hosts out of service."""
    hosts = [h for h in status["environments"].get("gprd-cny", {}).get("hosts", []) if h["role"] in LB_ROLES]
    states = {s["status"].split()[0] for h in hosts for backends in h["lbs"].values()
              for s in backends.values()}
    if hosts and len(states) == 1 and states <= {"DRAIN", "MAINT"}:
        return {h["name"] for h in status["environments"]["gprd-cny"]["hosts"]}
    return set()


def canary_weight_now(lab, hosts: Iterable[str]) -> dict[str, set[int]]:
    """{LB: weights} of the canary hosts in the production (non-canary) backends, from the lab."""
    status = lab.status()
    names = set(hosts)
    out: dict[str, set[int]] = {}
    for h in status["environments"]["gprd-cny"]["hosts"]:
        if h["name"] not in names:
            continue
        for lb, backends in h["lbs"].items():
            for backend, s in backends.items():
                if not backend.startswith("canary_"):
                    out.setdefault(lb, set()).add(int(s["weight"]))
    return out
