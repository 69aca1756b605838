"""``liftoff status``: the state of every environment in one JSON-able dict, from liftoff's
state store and (optionally) one read of every load balancer.

:func:`snapshot` is what ``GET /liftoff/api/status`` serves (the liftoff Airflow plugin), what
the ChatOps CLI prints and what the fleet view shows. Per environment:

- ``roles``: the version each role's hosts run, as counts. liftoff's view, not the hosts':
  every host runs the version of the newest successful deployment (or rollback) record,
  unless a later record's rollout (store host statuses of ``ENV:VERSION``, written after that
  record started) says the host is ``done`` or ``skipped`` on its version. ``unknown``: no
  successful record yet.
- ``lock``: holder, run id as it is (pasteable into ``liftoff watch``), since, reason.
- ``out_of_service``: hosts with a drain record and hosts an LB shows not UP/ready, each with its
  drain record, or ``"note": "no record"`` when no record explains what an LB shows.
- ``failed_hosts``: hosts the last rollout left failed, with the reason it recorded.
- ``chef_stopped``: what liftoff knows (it does not ask the hosts): a deployment record still
  ``running`` means chef was stopped on every host when the deploy began
  (:func:`liftoff.deploy.begin_env`) and is started again only at its cleanup; the cleanup
  leaves chef stopped on the hosts with a drain record (:func:`liftoff.deploy.restart_chef`),
  and a rollout leaves it stopped on the hosts it failed on.
- ``load_balancers``: each LB read once (several environments may share an LB); an LB that
  cannot be read is an entry with its ``error``, never an exception. ``lb_disagreements``:
  the environment's servers the LBs report differently.
- ``canary`` (on a canary environment): the canary servers' weight in the production backends
  and their state on every production LB, and whether the LBs agree.
- ``patches``: active post-deployment patches (:func:`liftoff.fleet.pending_patches`) with their
  newest record; ``deployments``: the last deployment and rollback records.
- ``pressure``: the commits not yet deployed (:func:`liftoff.changes.pressure`: between the build
  the environment runs and the newest build of the build source): ``commits`` (None when not
  known, with the ``note`` saying why), ``newest_build``, ``web_url`` of the compare. Read from
  the ops GitLab while the LBs are read, one compare per environment, within
  :data:`PRESSURE_TIMEOUT` seconds; not read with ``lbs=False`` unless asked.

Top level: active ``halts``, ``generated_at``, whether the LBs were read. Times are ISO 8601
UTC with an ``age_s``. Versions pass through ``redact`` (identity by default) so a caller can
hide the version of an internal build everywhere it appears (a version ``redact`` changes is
also replaced in every text: reasons, a failed host's detail).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from liftoff.haproxy import HAProxy, ServerState, disagreements
from liftoff.inventory import Environment, Inventory, LoadBalancerRef
from liftoff.store import Deployment, DrainRecord, HostProgress, Store

LB_TIMEOUT = 3.0  # seconds per LB read: status must answer fast, even with an LB down
PRESSURE_TIMEOUT = 3.0  # seconds for the build source and the compares, all environments at once
DEPLOYMENTS_SHOWN = 5
DEPLOYMENTS_SCANNED = 50  # records read to find the newest successful one
ROLLOUTS_REPLAYED = 10  # unfinished records after it whose host statuses count
ON_VERSION = ("done", "skipped")
IN_PROGRESS = ("draining", "installing")
UNKNOWN = "unknown"
NO_RECORD = "no record"
CHEF_SOURCE = ("liftoff's records, not the hosts: a running deployment stopped chef on every host of "
               "the environment; its cleanup starts it again except on hosts with a drain record or "
               "that failed in the last rollout; a deployment that halted or failed without its "
               "cleanup left it stopped on every host until a retry or the next deployment")
# The newest deployment ended in one of these: its begin stopped chef on every host, its cleanup
# (finish) never ran; a rollback after it is a newer record whose own cleanup starts chef.
CHEF_LEFT_STOPPED = ("halted", "failed")

LbReader = Callable[[Sequence[LoadBalancerRef]], Mapping[str, "list[ServerState] | BaseException | str"]]
Redact = Callable[[str], str]
# (inventory, {env: the build it runs or None}) -> {env: liftoff.changes.ChangeRange}
PressureReader = Callable[[Inventory, Mapping[str, "str | None"]], Mapping[str, Any]]


def _identity(version: str) -> str:
    return version


# -- reading the LBs --------------------------------------------------------------------------------

def read_lbs(lbs: Sequence[LoadBalancerRef], timeout: float = LB_TIMEOUT
             ) -> dict[str, list[ServerState] | BaseException]:
    """Every LB read once (``show stat`` + ``show servers state``), all at the same time:
    ``{lb name: [ServerState]}``, or the exception for an LB that could not be read."""
    if not lbs:
        return {}

    async def go() -> list:
        return await asyncio.gather(*(HAProxy([lb], timeout=timeout).asnapshot() for lb in lbs),
                                    return_exceptions=True)

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        results = asyncio.run(go())
    else:  # called from a coroutine: read on a thread of our own
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            results = pool.submit(asyncio.run, go()).result()
    out: dict[str, list[ServerState] | BaseException] = {}
    for lb, result in zip(lbs, results, strict=True):
        out[lb.name] = result if isinstance(result, BaseException) else result.get(lb.name, [])
    return out


def _unique_lbs(inventory: Inventory) -> list[LoadBalancerRef]:
    seen: dict[str, LoadBalancerRef] = {}
    for env in inventory.environments.values():
        for lb in env.load_balancers:
            seen.setdefault(lb.name, lb)
    return list(seen.values())


# -- small helpers ----------------------------------------------------------------------------------

def _epoch(now: datetime | float | None) -> float:
    if now is None:
        return time.time()
    return now.timestamp() if isinstance(now, datetime) else float(now)


def _iso(dt: datetime | None) -> str | None:
    return None if dt is None else dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _when(dt: datetime | None, now: float) -> dict[str, Any]:
    return {"at": _iso(dt), "age_s": None if dt is None else max(0, int(now - dt.timestamp()))}


def _record(rec: DrainRecord, now: float) -> dict[str, Any]:
    when = _when(rec.since, now)
    return {"run_id": rec.run_id, "reason": rec.reason, "since": when["at"], "age_s": when["age_s"]}


def _deployment(d: Deployment, now: float, redact: Redact) -> dict[str, Any]:
    return {"version": redact(d.version), "run_id": d.run_id, "kind": d.kind, "status": d.status,
            "started": _iso(d.started), "updated": _iso(d.updated),
            "age_s": max(0, int(now - d.updated.timestamp()))}


def _lb_text(s: ServerState) -> str:
    return f"{s.backend} {s.raw_status or s.status}/{s.admin}"


# -- versions from the records ----------------------------------------------------------------------

def host_versions(store: Store, env: Environment, deployments: Sequence[Deployment]
                  ) -> tuple[dict[str, str], Deployment | None, dict[str, HostProgress]]:
    """``({host: version}, the newest record, {host: its status in that record's rollout})``
    from the deployment records (newest first) and the host statuses of their rollouts."""
    replay: list[Deployment] = []
    base: str | None = None
    for d in deployments:
        if d.status == "success":
            base = d.version
            break
        if len(replay) < ROLLOUTS_REPLAYED:
            replay.append(d)
    versions = {h.name: base or UNKNOWN for h in env.hosts()}
    newest = deployments[0] if deployments else None
    last: dict[str, HostProgress] = {}
    for d in reversed(replay):  # oldest first: a later rollout wins
        fresh = {h: p for h, p in store.host_statuses(f"{env.name}:{d.version}").items()
                 if p.updated >= d.started}
        for host, p in fresh.items():
            if p.status in ON_VERSION and host in versions:
                versions[host] = d.version
        if d is newest:
            last = fresh
    if newest is not None and not replay:  # the newest record succeeded: its failures, if any
        last = {h: p for h, p in store.host_statuses(f"{env.name}:{newest.version}").items()
                if p.updated >= newest.started}
    return versions, newest, last


# -- the snapshot -----------------------------------------------------------------------------------

def internal_label(version: str) -> str:
    """How an internal build's version is shown: ``internal-`` and a short hash of it, so two
    internal builds can be told apart without the version leaving liftoff."""
    import hashlib

    return f"internal-{hashlib.sha256(str(version).encode()).hexdigest()[:8]}"


def internal_traces(version: str) -> list[str]:
    """Every form an internal build's version could leak in: the version, its safe-name form,
    the part after the '+', its commit, its base version (longest first; 5 characters or more)."""
    from liftoff.versions import commit_sha

    text = str(version)
    forms = {text, text.replace("+", "_"), text.split("+", 1)[1] if "+" in text else "",
             commit_sha(text) or "", text.split("+", 1)[0] if "+" in text else ""}
    return sorted((f for f in forms if len(f) >= 5), key=lambda f: (-len(f), f))


def scrub_internal(value: Any, version: str) -> Any:
    """``value`` (text, or dicts and lists of it) with every form of an internal build's
    version (:func:`internal_traces`) as its :func:`internal_label`."""
    shown = internal_label(version)
    traces = internal_traces(version)

    def scrub(v: Any) -> Any:
        if isinstance(v, str):
            for trace in traces:
                v = v.replace(trace, shown)
            return v
        if isinstance(v, dict):
            return {scrub(k): scrub(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [scrub(x) for x in v]
        return v

    return scrub(value)


def internal_redactor(internal: Iterable[str]) -> Redact:
    """``redact`` for :func:`snapshot`: the versions in ``internal`` as :func:`internal_label`."""
    hidden = frozenset(v for v in internal if v)
    return lambda version: internal_label(version) if version in hidden else version


def freezes(inventory: Inventory, store: Store, t: float) -> list[dict[str, Any]]:
    """Change freezes in force or to come: ``liftoff freeze``'s (the store) and the inventory's
    (``extra.freezes``); an inventory entry that cannot be read is an entry with its ``error``."""
    from liftoff.checks import inventory_freezes
    from liftoff.errors import InvalidInput

    now = datetime.fromtimestamp(t, tz=UTC)
    out: list[dict[str, Any]] = []
    for f in store.freezes():
        if f.lifted_at is None and f.until > now:
            out.append({"env": f.env, "source": "liftoff freeze", "who": f.who, "reason": f.reason,
                        "since": _iso(f.since), "until": _iso(f.until), "active": f.since <= now})
    for env in inventory.environments.values():
        try:
            declared = inventory_freezes(env)
        except InvalidInput as exc:
            out.append({"env": env.name, "source": "inventory", "error": str(exc), "active": True})
            continue
        out += [{"env": env.name, "source": "inventory", "who": "inventory", "reason": f["reason"],
                 "since": _iso(f["from"]), "until": _iso(f["until"]), "active": f["from"] <= now}
                for f in declared if f["until"] > now]
    return out


def snapshot(inventory: Inventory, store: Store, *, lbs: bool = True, now: datetime | float | None = None,
             redact: Redact = _identity, read: LbReader | None = None,
             deployments_shown: int = DEPLOYMENTS_SHOWN, pressure: bool | None = None,
             read_pressure: PressureReader | None = None) -> dict[str, Any]:
    """The state of every environment of ``inventory`` (see the module's doc), JSON-able.

    ``lbs``: read every load balancer once (False: liftoff's records only). ``now``: the time
    ages are counted from. ``redact``: applied to every version shown (an internal build's).
    ``read``: reads a list of LBs (default :func:`read_lbs`; tests give a fake). ``pressure``:
    read each environment's pressure (default: as ``lbs``); ``read_pressure``: how (default
    :func:`liftoff.changes.pressures`; tests give a fake)."""
    started = time.monotonic()
    t = _epoch(now)
    want_pressure = lbs if pressure is None else pressure
    pending = _start_pressure(inventory, store, read_pressure) if want_pressure else None
    lb_view: dict[str, list[ServerState] | str] | None = None
    if lbs:
        raw = (read or read_lbs)(_unique_lbs(inventory))
        lb_view = {name: (states if isinstance(states, list) else str(states) or type(states).__name__)
                   for name, states in raw.items()}
    locks = {lock.env: lock for lock in store.list_locks()}
    drained: dict[str, list[DrainRecord]] = {}
    for rec in store.drained():
        drained.setdefault(rec.env, []).append(rec)
    seen: set[str] = set()  # every version read, for redact
    envs = {name: _environment(inventory, env, store, lb_view, locks.pop(name, None), drained.get(name, []),
                               t, redact, deployments_shown, seen)
            for name, env in inventory.environments.items()}
    out = {
        "generated_at": _iso(datetime.fromtimestamp(t, tz=UTC)),
        "lbs_read": lbs,
        "halts": [{"id": h.id, "reason": h.reason, "patch_id": h.patch_id, "who": h.who,
                   "since": _iso(h.since), "age_s": _when(h.since, t)["age_s"]}
                  for h in store.active_halts()],
        "freezes": freezes(inventory, store, t),
        "canary_analyses": canary_analyses(inventory, store, t),
        "environments": envs,
        # locks on environments this inventory does not know (a renamed environment, say)
        "other_locks": [_lock(lock, t) for lock in locks.values()],
    }
    if pending is not None:
        _add_pressure(envs, pending, redact, seen)
    hidden = {trace: redact(v) for v in seen if redact(v) != v for trace in internal_traces(v)}
    if hidden:  # also where a version stands in free text (a reason, a failed host's detail)
        out = _scrub(out, hidden)
    out["duration_ms"] = round((time.monotonic() - started) * 1000, 1)
    return out


def analysis_record(record: Any, t: float | None = None) -> dict[str, Any]:
    """One stored canary judgement as people and pages read it (liftoff.store.AnalysisRecord)."""
    data = record.verdict_data()
    out = {"run_id": record.run_id, "env": record.env, "stage": record.stage, "weight": record.weight,
           "verdict": record.verdict, "score": record.score, "decision": record.decision,
           "reason": data.get("reason"), "requests": data.get("requests") or {},
           "metrics": data.get("metrics") or {}, "thresholds": data.get("thresholds") or {},
           "at": _iso(record.at)}
    if t is not None:
        out["age_s"] = _when(record.at, t)["age_s"]
    return out


_TABLE_KEYS = ("metrics", "thresholds")


def canary_analyses(inventory: Inventory, store: Store, t: float, shown: int = 3) -> dict[str, list[dict]]:
    """Per canary environment, its last ``shown`` judgements (newest last), metrics left out."""
    out = {}
    for name, env in inventory.environments.items():
        if env.canary_of:
            out[name] = [{k: v for k, v in analysis_record(r, t).items() if k not in _TABLE_KEYS}
                         for r in store.analyses(env=name, limit=shown)]
    return out


def _default_pressure(inventory: Inventory, running: Mapping[str, str | None]) -> Mapping[str, Any]:
    from liftoff.changes import pressures

    return pressures(inventory, running, timeout=PRESSURE_TIMEOUT)


def _start_pressure(inventory: Inventory, store: Store, reader: PressureReader | None
                    ) -> tuple[concurrent.futures.Future, dict[str, str | None]]:
    """The builds each environment runs (from the records), and the pressure read started on a
    thread of its own (it runs while the LBs are read)."""
    running: dict[str, str | None] = {}
    for name in inventory.environments:
        records = store.deployments(name, limit=DEPLOYMENTS_SCANNED)
        running[name] = next((d.version for d in records if d.status == "success"), None)
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="liftoff-status-pressure")
    future = pool.submit(reader or _default_pressure, inventory, dict(running))
    pool.shutdown(wait=False)
    return future, running


def _add_pressure(envs: dict[str, dict], pending: tuple[concurrent.futures.Future, dict[str, str | None]],
                  redact: Redact, seen: set[str]) -> None:
    """Each environment's ``pressure`` entry; an error or no answer in time becomes its note."""
    future, running = pending
    try:
        found = future.result(timeout=PRESSURE_TIMEOUT + 1.0)
        note = "not read"
    except concurrent.futures.TimeoutError:
        found, note = {}, f"no answer within {PRESSURE_TIMEOUT:g} s"
    except Exception as exc:  # status never fails for what changed
        found, note = {}, f"not read: {type(exc).__name__}: {str(exc)[:120]}"
    for name, env in envs.items():
        rng = found.get(name)
        seen.update(v for v in (running.get(name), getattr(rng, "to_version", None)) if v)
        if rng is None:
            env["pressure"] = {"commits": None, "newest_build": None, "web_url": None, "note": note}
            continue
        newest = rng.to_version
        env["pressure"] = {"commits": rng.count if rng.known else None,
                           "newest_build": redact(newest) if newest else None,
                           "web_url": rng.web_url or None, "note": None if rng.known else rng.reason}


def _scrub(value: Any, hidden: Mapping[str, str]) -> Any:
    if isinstance(value, str):
        for version, shown in hidden.items():
            value = value.replace(version, shown)
        return value
    if isinstance(value, dict):
        return {_scrub(k, hidden): _scrub(v, hidden) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub(v, hidden) for v in value]
    return value


def _lock(lock, now: float) -> dict[str, Any]:
    from liftoff.locks import by_hand

    when = _when(lock.since, now)
    return {"env": lock.env, "who": lock.who, "run_id": lock.run_id, "since": when["at"],
            "age_s": when["age_s"], "reason": lock.reason, "by_hand": by_hand(lock)}


def _env_lb_states(env: Environment, lb_view: Mapping[str, list[ServerState] | str] | None
                   ) -> tuple[list[dict], dict[str, list[ServerState]]]:
    """The environment's LB entries and the snapshot of those that answered."""
    entries: list[dict] = []
    snap: dict[str, list[ServerState]] = {}
    for lb in env.load_balancers:
        entry: dict[str, Any] = {"name": lb.name, "admin": lb.admin}
        if lb_view is None:
            entry.update(ok=None, error="not read")
        elif isinstance(lb_view.get(lb.name), list):
            snap[lb.name] = lb_view[lb.name]  # type: ignore[assignment]
            entry.update(ok=True, error=None, servers=len(snap[lb.name]))
        else:
            entry.update(ok=False, error=str(lb_view.get(lb.name) or "not read"))
        entries.append(entry)
    return entries, snap


def _out_of_service(env: Environment, snap: dict[str, list[ServerState]], records: list[DrainRecord],
                    role_of: dict[str, str], canary_state: str | None, lbs_asked: bool,
                    now: float) -> list[dict[str, Any]]:
    """Every host an LB shows out of service (not UP/ready) or a drain record names, with why."""
    shown: dict[str, dict[str, list[str]]] = {}
    for lb_name, states in snap.items():
        for s in states:
            if s.server in role_of and not s.in_service:
                shown.setdefault(s.server, {}).setdefault(lb_name, []).append(_lb_text(s))
    by_host = {r.host: r for r in records}
    out = []
    for host in sorted(set(shown) | set(by_host), key=lambda h: (role_of.get(h, ""), h)):
        rec = by_host.get(host)
        entry: dict[str, Any] = {"host": host, "role": role_of.get(host),
                                 "record": _record(rec, now) if rec else None,
                                 "lbs": {lb: ", ".join(v) for lb, v in sorted(shown.get(host, {}).items())}}
        if rec is None:
            entry["note"] = NO_RECORD + (f" (canary set to {canary_state})"
                                         if canary_state in ("drain", "maint") else "")
        elif host not in shown and snap and len(snap) == len(env.load_balancers):
            entry["note"] = "drain record, but in service on every LB"
        elif host not in shown and snap:
            entry["note"] = "drain record; not seen out of service on the LBs that answered"
        elif lbs_asked and env.load_balancers and not snap:
            entry["note"] = "drain record; no LB answered"
        else:
            entry["note"] = "drain record"
        out.append(entry)
    return out


def _roles(env: Environment, versions: dict[str, str], redact: Redact, oos: set[str], failed: dict,
           last: dict, rolling: bool) -> list[dict[str, Any]]:
    """Per role: host count, versions with counts, hosts out of service, failed, in progress."""
    roles = []
    for role in env.roles:
        counts: dict[str, int] = {}
        for h in role.hosts:
            v = versions.get(h.name, UNKNOWN)
            key = v if v == UNKNOWN else redact(v)
            counts[key] = counts.get(key, 0) + 1
        names = [h.name for h in role.hosts]
        roles.append({
            "name": role.name, "stage": role.stage, "hosts": len(names),
            "versions": dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))),
            "out_of_service": sum(1 for n in names if n in oos),
            "failed": sum(1 for n in names if n in failed),
            "in_progress": sum(1 for n in names if n in last and last[n].status in IN_PROGRESS and rolling),
        })
    return roles


def _chef_stopped(records: list[DrainRecord], failed: dict, newest, deployments, role_of: dict[str, str],
                  redact: Redact) -> dict[str, Any]:
    """Where liftoff left chef stopped (see CHEF_SOURCE), and a deploy or rollback still running."""
    chef_hosts = {r.host: ("drain record", r.run_id) for r in records}
    for host in failed:
        chef_hosts.setdefault(host, ("failed in the last rollout", newest.run_id if newest else None))
    stopper = next((d for d in deployments if d.status == "running"), None)
    if stopper is None and deployments and deployments[0].status in CHEF_LEFT_STOPPED:
        stopper = deployments[0]  # ended without its cleanup: chef stays stopped until a retry or a deploy
    return {"source": CHEF_SOURCE,
            "hosts": [{"host": h, "role": role_of.get(h), "why": why, "run_id": run_id}
                      for h, (why, run_id) in sorted(chef_hosts.items())],
            "env_wide": None if stopper is None else {
                "run_id": stopper.run_id, "version": redact(stopper.version), "kind": stopper.kind,
                "status": stopper.status, "since": _iso(stopper.started)}}


def _environment(inventory: Inventory, env: Environment, store: Store,
                 lb_view: Mapping[str, list[ServerState] | str] | None, lock, records: list[DrainRecord],
                 now: float, redact: Redact, deployments_shown: int, seen: set[str]) -> dict[str, Any]:
    from liftoff.canary import canary_env_of

    deployments = store.deployments(env.name, limit=DEPLOYMENTS_SCANNED)
    seen.update(d.version for d in deployments)
    versions, newest, last = host_versions(store, env, deployments)
    role_of = {h.name: r.name for r in env.roles for h in r.hosts}
    lb_entries, snap = _env_lb_states(env, lb_view)
    canary = _canary(inventory, env, lb_view) if env.canary_of else None

    out_of_service = _out_of_service(env, snap, records, role_of, canary.get("state") if canary else None,
                                     lb_view is not None, now)
    failed = {h: p for h, p in last.items() if p.status == "failed"}
    roles = _roles(env, versions, redact, {e["host"] for e in out_of_service}, failed, last,
                   newest is not None and newest.status == "running")
    chef = _chef_stopped(records, failed, newest, deployments, role_of, redact)

    current = next((d.version for d in deployments if d.status == "success"), None)
    return {
        "name": env.name,
        "canary_of": env.canary_of,
        "canary_env": canary_env_of(inventory, env.name),
        "current_version": redact(current) if current else None,
        "hosts": len(role_of),
        "roles": roles,
        "lock": _lock(lock, now) if lock else None,
        "out_of_service": out_of_service,
        "failed_hosts": [{"host": h, "role": role_of.get(h), "version": redact(p.version), "reason": p.detail,
                          "run_id": newest.run_id if newest else None, "at": _iso(p.updated)}
                         for h, p in sorted(failed.items())],
        "chef_stopped": chef,
        "load_balancers": lb_entries,
        "lb_disagreements": _disagreements(snap, role_of),
        "canary": canary,
        "patches": _patches(store, env, now),
        "deployments": [_deployment(d, now, redact) for d in deployments[:deployments_shown]],
    }


def _disagreements(snap: dict[str, list[ServerState]], hosts: Iterable[str]) -> list[dict]:
    names = set(hosts)
    mine = {lb: [s for s in states if s.server in names] for lb, states in snap.items()}
    return [{"backend": d.backend, "server": d.server, "states": d.states} for d in disagreements(mine)]


def _canary(inventory: Inventory, env: Environment, lb_view: Mapping[str, list[ServerState] | str] | None
            ) -> dict[str, Any]:
    """The canary servers on every LB of the production environment. Per LB: their weight in the
    production backends (the highest, as :func:`liftoff.canary.current_canary_weight`; ``weights``
    lists them when they differ on that LB) and their state. ``agree``: every LB that answered
    reports each canary server alike (status, state and weight, in every backend, none missing
    on one LB); ``disagreements`` lists those that differ. ``weight`` and ``state``: the one
    value every canary server has on those LBs, else None."""
    main = inventory.environments.get(env.canary_of or "")
    out: dict[str, Any] = {"of": env.canary_of, "lbs": [], "weight": None, "state": None, "agree": None,
                           "complete": False, "disagreements": []}
    if main is None or lb_view is None:
        out["error"] = "production LBs not read" if main is not None else f"no environment {env.canary_of}"
        return out
    hosts = {h.name for h in env.hosts()}
    backends = {r.name for r in main.roles}
    mine: dict[str, list[ServerState]] = {}
    for lb in main.load_balancers:
        states = lb_view.get(lb.name)
        if not isinstance(states, list):
            out["lbs"].append({"name": lb.name, "weight": None, "state": None,
                               "error": str(states or "not read")})
            continue
        mine[lb.name] = [s for s in states if s.server in hosts]
        weights = sorted({s.weight for s in mine[lb.name] if s.backend in backends})
        admin = sorted({s.admin for s in mine[lb.name]})
        entry = {"name": lb.name, "weight": max(weights, default=None),
                 "state": admin[0] if len(admin) == 1 else ("mixed: " + ",".join(admin) if admin else None),
                 "servers": len(mine[lb.name]), "error": None}
        if len(weights) > 1:
            entry["weights"] = weights
        out["lbs"].append(entry)
    out["complete"] = len(mine) == len(main.load_balancers)
    if mine:
        weights = {s.weight for states in mine.values() for s in states if s.backend in backends}
        admin = {s.admin for states in mine.values() for s in states}
        diffs = _disagreements(mine, hosts)
        out.update(weight=next(iter(weights)) if len(weights) == 1 else None,
                   state=next(iter(admin)) if len(admin) == 1 else None, agree=not diffs, disagreements=diffs)
    return out


def _patches(store: Store, env: Environment, now: float) -> list[dict]:
    """Active post-deployment patches (re-applied after each install) with their newest record."""
    from liftoff.fleet import pending_patches

    active = pending_patches(store, env)
    if not active:
        return []
    newest: dict[str, Any] = {}
    for rec in store.patches(env.name):  # newest first
        newest.setdefault(rec.patch_id, rec)
    out = []
    for patch_id, roles in active.items():
        rec = newest[patch_id]
        try:
            reason = json.loads(rec.detail).get("reason", "")
        except (ValueError, AttributeError):
            reason = ""
        when = _when(rec.at, now)
        out.append({"patch_id": patch_id, "status": rec.status, "roles": list(roles), "hosts": len(rec.hosts),
                    "who": rec.who, "run_id": rec.run_id, "reason": str(reason), "at": when["at"],
                    "age_s": when["age_s"]})
    return out
