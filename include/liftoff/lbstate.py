"""What liftoff intends its load balancers to hold, from its own records, and putting it back on
an LB that lost it.

HAProxy keeps runtime changes (``set server .. state``, ``set weight``) in memory only: an LB
killed and started again (a reload without a server-state file) comes back with its config
file's states and weights, while its peers keep what liftoff set. Nothing on the LBs says which
one is right, so the intent comes from liftoff's records (:func:`intent_from_records`):

* a host with a drain record (``Store.drained``, any environment) is out of service on every
  LB that lists it: drained (in maintenance where an LB already has it so; then on all);
* the canary setting liftoff last made (``Store.lb_settings``, written by
  :func:`liftoff.canary.apply_weight`): its weight in the recorded backends, its state
  (drain/ready/maint) in every backend holding its hosts; a drain record wins over "ready";
* a server the records say nothing about is left as it is while the LBs agree on it; when they
  disagree the safe side wins: the most out-of-service state (maint > drain > ready) and the
  lowest weight, put on the LBs that differ (a server is never put back in service, nor given
  more traffic, on a guess).

:func:`areconcile` reads every LB (an unreachable LB raises HAProxyError naming it: the caller
fails closed, as before), re-applies the intent where an LB differs, logs one line per LB it
changed (what and how many), and records an ``lb_reconciled`` event in the environment's lock
history (a rollout's batch boundaries call it only when an LB may have lost state: see
``liftoff.fleet._LBPhases._reconcile``). The admin state of hosts someone else is changing right
now is left alone: ``skip`` (a
rollout's own hosts being put back in service, ready but not yet cleared) and hosts whose drain
record belongs to another run that holds a lock (:func:`busy_hosts`; that run reconciles them
at its own batch boundaries and on its retry). A rollout that puts hosts back in service also
takes them out of a recorded canary state (``Store.forget_lb_state``): the last thing liftoff
did to them was "ready".
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from liftoff.haproxy import HAProxy, ServerState
from liftoff.inventory import Environment, LoadBalancerRef
from liftoff.versions import validate_name

log = logging.getLogger(__name__)

SEVERITY = {"ready": 0, "drain": 1, "maint": 2}
EVENT = "lb_reconciled"


@dataclass(frozen=True)
class Intent:
    """What liftoff's records say the LBs must hold."""

    drained: frozenset[str] = frozenset()  # hosts with a drain record
    states: dict[str, str] = field(default_factory=dict)  # host -> canary state (every backend)
    weights: dict[str, tuple[int, frozenset[str]]] = field(default_factory=dict)  # host -> (weight, backends)
    sources: tuple[str, ...] = ()  # the records, in words (for the log and the event)


@dataclass(frozen=True)
class Fix:
    """One server line to set on one LB."""

    backend: str
    server: str
    kind: str  # drain | ready | maint | weight
    value: int | str

    def command(self) -> str:
        target = f"{validate_name('backend', self.backend)}/{validate_name('server', self.server)}"
        if self.kind == "weight":
            return f"set weight {target} {int(self.value)}"
        return f"set server {target} state {self.kind}"


def intent_from_records(drain_records: Iterable, settings: Iterable) -> Intent:
    """The intent from drain records (``DrainRecord``) and LB settings (``LBSetting``)."""
    drained = frozenset(r.host for r in drain_records)
    states: dict[str, str] = {}
    weights: dict[str, tuple[int, frozenset[str]]] = {}
    sources = [f"{len(drained)} drain record(s)"] if drained else []
    for s in settings:
        if s.kind == "state" and s.value in SEVERITY:
            states.update(dict.fromkeys(s.hosts, s.value))
        elif s.kind == "weight" and s.value.isdigit():
            weights.update(dict.fromkeys(s.hosts, (int(s.value), frozenset(s.backends))))
        else:
            continue
        sources.append(f"{s.env} {s.kind} {s.value}")
    return Intent(drained, states, weights, tuple(sources))


def wanted_admin(server: str, seen: Sequence[str], intent: Intent) -> str | None:
    """The admin state ``server`` must have on every LB (None: leave it), from what the LBs show."""
    worst = max(seen, key=SEVERITY.__getitem__)
    want = intent.states.get(server)
    if server in intent.drained:
        # out of service; maintenance an LB (or the canary state) has is kept, on every LB
        return max([want or "drain", "drain", worst], key=SEVERITY.__getitem__)
    if want is not None:
        return want
    return worst if len(set(seen)) > 1 else None


def wanted_weight(backend: str, server: str, seen: Sequence[int], intent: Intent) -> int | None:
    recorded = intent.weights.get(server)
    if recorded is not None and (not recorded[1] or backend in recorded[1]):
        return recorded[0]
    return min(seen) if len(set(seen)) > 1 else None


def plan(snap: dict[str, list[ServerState]], intent: Intent,
         skip: Iterable[str] = ()) -> dict[str, list[Fix]]:
    """``{lb: [Fix]}``: what to set on each LB so that it holds the intent (see the module doc).
    The admin state of servers in ``skip`` is left alone (their weight is not)."""
    skipped = set(skip)
    lines: dict[tuple[str, str], dict[str, ServerState]] = {}
    for lb, states in snap.items():
        for s in states:
            lines.setdefault((s.backend, s.server), {})[lb] = s
    out: dict[str, list[Fix]] = {}
    for (backend, server), by_lb in sorted(lines.items()):
        admin = None if server in skipped else wanted_admin(server, [s.admin for s in by_lb.values()], intent)
        weight = wanted_weight(backend, server, [s.weight for s in by_lb.values()], intent)
        for lb, s in by_lb.items():
            if admin is not None and s.admin != admin:
                out.setdefault(lb, []).append(Fix(backend, server, admin, admin))
            if weight is not None and s.weight != weight:
                out.setdefault(lb, []).append(Fix(backend, server, "weight", weight))
    return out


@dataclass
class Reconciled:
    """What a reconcile found and did: ``{lb: {kind: server lines}}`` for the LBs it changed."""

    changed: dict[str, dict[str, int]] = field(default_factory=dict)
    sources: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.changed)

    def sentence(self) -> str:
        what = "; ".join(f"{lb}: " + ", ".join(f"{k} {n}" for k, n in sorted(c.items()))
                         for lb, c in sorted(self.changed.items()))
        return (f"LB state put back from liftoff's records ({', '.join(self.sources) or 'no record'}; "
                f"disagreements without a record: the safe side) on {what}")


def busy_hosts(drain_records: Iterable, locks: Iterable, run_id: str) -> set[str]:
    """Hosts another live run (one holding a lock) is draining or putting back in service: it
    owns their state (production and its canary share LBs but not locks); its own checks and
    its retry put them back, not this run."""
    live = {lock.run_id for lock in locks} - {run_id}
    return {r.host for r in drain_records if r.run_id in live}


async def areconcile(haproxy: HAProxy, store, env_name: str, run_id: str, who: str, *,
                     skip: Iterable[str] | Callable[[], Iterable[str]] = (), why: str = "") -> Reconciled:
    """Read every LB, put the intent back where an LB differs, log and record it (see the module
    doc). HAProxyError when an LB cannot be read (nothing changed), PartialApplication when one
    failed while being changed. ``skip`` may be a callable, asked before and after the LBs and
    the records are read: a rollout's own hosts changing at either moment (drained, or readied
    and cleared, between the two reads) are left alone."""
    if not haproxy.lbs or store is None:
        return Reconciled()
    changing_before = set(skip()) if callable(skip) else set()
    snap = await haproxy.aadmin_snapshot()  # admin states and weights: all a plan compares
    # every environment's records count: environments share LBs (production and its canary);
    # the store is read off the event loop, like the rollout's other store calls
    records, settings, locks = await asyncio.to_thread(
        lambda: (store.drained(), store.lb_settings(), store.list_locks()))
    intent = intent_from_records(records, settings)
    skipped = {*changing_before, *skip()} if callable(skip) else skip  # changing at any time of the reads
    fixes = plan(snap, intent, {*skipped, *busy_hosts(records, locks, run_id)})
    if not fixes:
        return Reconciled(sources=intent.sources)
    await haproxy.aput_back({lb: [f.command() for f in fs] for lb, fs in fixes.items()})
    done = Reconciled({lb: dict(Counter(f.kind for f in fs)) for lb, fs in fixes.items()}, intent.sources)
    for lb, counts in sorted(done.changed.items()):
        log.warning("haproxy reconcile%s: %s differed from liftoff's records (restarted?); set %s",
                    f" ({why})" if why else "", lb, ", ".join(f"{k} on {n} server line(s)"
                                                              for k, n in sorted(counts.items())))
    await asyncio.to_thread(store.record_event, env_name, EVENT, run_id, who,
                            (f"{why}: " if why else "") + done.sentence())
    return done


def lbs_of(env: Environment, *others: Environment) -> list[LoadBalancerRef]:
    """The LBs of ``env`` and of ``others`` (a canary's production), each once."""
    seen: dict[str, LoadBalancerRef] = {}
    for e in (env, *others):
        for lb in e.load_balancers:
            seen.setdefault(lb.name, lb)
    return list(seen.values())
