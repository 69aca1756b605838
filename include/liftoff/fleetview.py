"""The fleet view (issue #12): what ``GET /liftoff/api/fleet`` serves and the fleet page shows.

:func:`view` is :func:`liftoff.status.snapshot` plus:

- ``weekly_change_lock``: whether GitLab's weekly production change lock
  (:func:`liftoff.checks.in_weekly_change_lock`) is on now, and the environments it applies to
  (inventory ``extra: {change_lock: weekly}``).
- ``progress``: per environment whose newest deployment record is still running, its rollout
  (store host statuses of ``ENV:VERSION`` written since the record started): per role batch
  k of n, hosts done/failed/left, and an estimate of the time left from the measured batch
  durations. A batch's final statuses are written in one transaction, so the distinct
  ``updated`` times of a role's done/failed rows are its batch completions; the time between
  two completions is one batch.
- per environment ``exceptions``: counts of the hosts out of service, failed, with chef
  stopped and those the LBs disagree on, and ``healthy`` (the rest). The snapshot's lists name
  only those exceptional hosts (cut to :data:`LIST_MAX`); a healthy host is never a row, so
  1,000 hosts stay small.
- ``runs`` and ``approvals``: given by the caller (the plugin reads Airflow's metadata DB),
  each with links into the Airflow UI.

:func:`host_audit` is one host's audit trail. A version in ``internal`` (an internal build's)
is shown as ``internal-<short hash>`` everywhere, in free text too. No Airflow import here.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from liftoff import status
from liftoff.checks import in_weekly_change_lock
from liftoff.inventory import Environment, Inventory, Role
from liftoff.status import internal_label
from liftoff.store import Deployment, HostProgress, Store

LIST_MAX = 200  # exceptional hosts listed per list; the rest are counted
AUDIT_LIMIT = 200
OUTPUT_TAIL_SHOWN = 400
WEEKLY_WINDOW = "Friday 23:00 to Monday 06:00 UTC"
FINISHED = ("done", "failed")  # written at a batch's end, in one transaction per batch
ON_VERSION = ("done", "skipped")
IN_PROGRESS = ("draining", "installing")
_BATCH = re.compile(r"\bbatch (\d+)\b")
_SAFE = "-_.!~*'()"  # what encodeURIComponent leaves as it is


def ui_path(*parts: str) -> str:
    """An Airflow UI path, each part encoded as the UI encodes it."""
    return "/" + "/".join(quote(str(p), safe=_SAFE) for p in parts)


def _iso(ts: float | datetime | None) -> str | None:
    if ts is None:
        return None
    dt = ts if isinstance(ts, datetime) else datetime.fromtimestamp(ts, tz=UTC)
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- the view -----------------------------------------------------------------------------------------

def view(inventory: Inventory, store: Store, *, lbs: bool = True, runs: Iterable[Mapping] = (),
         approvals: Iterable[Mapping] = (), internal: Iterable[str] = (), now: float | None = None,
         read: status.LbReader | None = None, pressure: bool | None = None,
         read_pressure: status.PressureReader | None = None) -> dict[str, Any]:
    """The fleet view (see the module's doc), JSON-able. ``runs``/``approvals``: Airflow's (see
    :func:`runs_section`, :func:`approvals_section`); ``internal``: versions shown as
    ``internal``; the other arguments are :func:`liftoff.status.snapshot`'s."""
    hidden = {v: internal_label(v) for v in internal if v}

    def redact(version: str) -> str:
        return hidden.get(version, version)

    t = status._epoch(now)
    out = status.snapshot(inventory, store, lbs=lbs, now=t, redact=redact, read=read, pressure=pressure,
                          read_pressure=read_pressure)
    for env in out["environments"].values():
        _exceptions(env)
    out["weekly_change_lock"] = weekly_lock(inventory, t)
    out["progress"] = progress(inventory, store, t, redact)
    out["runs"] = runs_section(runs)
    out["approvals"] = approvals_section(approvals)
    out["deploying"] = bool(out["progress"])
    return status._scrub(out, hidden) if hidden else out


def weekly_lock(inventory: Inventory, now: float) -> dict[str, Any]:
    """The weekly change lock now, and the environments it applies to."""
    envs = [e.name for e in inventory.environments.values() if e.extra.get("change_lock") == "weekly"]
    on = in_weekly_change_lock(datetime.fromtimestamp(now, tz=UTC))
    return {"active": on, "envs": envs, "window": WEEKLY_WINDOW, "in_force": on and bool(envs)}


def _exceptions(env: dict[str, Any]) -> None:
    """Counts of the exceptional hosts (and the healthy rest); each list cut to LIST_MAX."""
    lists = {"out_of_service": env["out_of_service"], "failed": env["failed_hosts"],
             "chef_stopped": env["chef_stopped"]["hosts"], "lb_disagreements": env["lb_disagreements"]}
    named = set()
    for entries in lists.values():
        named.update(e.get("host") or e.get("server") for e in entries)
    counts = {k: len(v) for k, v in lists.items()}
    counts["healthy"] = max(0, env["hosts"] - len(named))
    cut = {k: n - LIST_MAX for k, n in counts.items() if k != "healthy" and n > LIST_MAX}
    env["exceptions"] = {**counts, "not_listed": cut}
    if cut:
        env["out_of_service"] = env["out_of_service"][:LIST_MAX]
        env["failed_hosts"] = env["failed_hosts"][:LIST_MAX]
        env["chef_stopped"]["hosts"] = env["chef_stopped"]["hosts"][:LIST_MAX]
        env["lb_disagreements"] = env["lb_disagreements"][:LIST_MAX]


# -- the running deploys ----------------------------------------------------------------------------

def progress(inventory: Inventory, store: Store, now: float, redact=lambda v: v) -> list[dict[str, Any]]:
    """The rollout of every environment whose newest deployment record is still running."""
    out = []
    for env in inventory.environments.values():
        records = store.deployments(env.name, limit=1)
        if records and records[0].status == "running":
            d = records[0]
            rows = {h: p for h, p in store.host_statuses(f"{env.name}:{d.version}").items()
                    if p.updated >= d.started}
            out.append(rollout_progress(env, d, rows, now, redact))
    return out


def rollout_progress(env: Environment, d: Deployment, rows: Mapping[str, HostProgress], now: float,
                     redact=lambda v: v) -> dict[str, Any]:
    """One running rollout: per role, then for the environment (roles of a stage run together,
    stages one after the other, so the time left is the sum over stages of their slowest role)."""
    started = d.started.timestamp()
    roles = {r.name: role_progress(r, rows, started, now) for r in env.roles}
    measured = [s for r in roles.values() for s in r.pop("_intervals")]
    firsts = [r["_first_s"] for r in roles.values() if r["_first_s"] is not None]
    # no two batches of one role finished yet: a first batch (from the record's start) it is
    batch_s = statistics.median(measured or firsts) if (measured or firsts) else None
    etas = {name: role_eta(r, batch_s, now) for name, r in roles.items()}
    eta: float | None = 0.0
    for stage in env.stages():
        lefts = [etas[r.name] for r in env.roles_in_stage(stage)]
        eta = None if eta is None or None in lefts else eta + max(lefts, default=0.0)
    # a failed batch stops the rollout (every role): nothing more will run until it is retried
    stopped = any(r["state"] == "failed" for r in roles.values()) and not any(
        r["state"] == "running" and r["in_progress"] for r in roles.values())
    if stopped:
        eta = None
    totals = {k: sum(r[k] for r in roles.values())
              for k in ("hosts", "done", "failed", "left", "in_progress")}
    return {"env": env.name, "version": redact(d.version), "run_id": d.run_id, "kind": d.kind,
            "started": _iso(d.started), "age_s": max(0, int(now - started)), "hosts": totals,
            "stopped": stopped, "roles": list(roles.values()),
            "batch_s": None if batch_s is None else round(batch_s, 1),
            "eta_s": None if eta is None else round(eta), "eta_at": None if eta is None else _iso(now + eta),
            "eta_source": "median of the measured batch durations (time between two batch completions of a "
                          "role; before there are any, from the deploy's start to a first batch's end)"}


def role_progress(role: Role, rows: Mapping[str, HostProgress], started: float, now: float) -> dict[str, Any]:
    """A role's hosts done/failed/left, batch k of n, and its measured batch durations."""
    mine = [rows[h.name] for h in role.hosts if h.name in rows]
    size = role.batch_size()
    batches = math.ceil(len(role.hosts) / size) if size else 0
    done = sum(p.status in ON_VERSION for p in mine)
    failed = sum(p.status == "failed" for p in mine)
    active = [p for p in mine if p.status in IN_PROGRESS]
    ends = sorted({p.updated.timestamp() for p in mine if p.status in FINISHED})
    intervals = [b - a for a, b in zip(ends, ends[1:], strict=False)]
    numbers = [int(m[1]) for p in active if (m := _BATCH.search(p.detail))]
    completed = min(len(ends), batches)
    left = len(role.hosts) - done - failed
    if not mine:
        state = "waiting"
    elif active:
        state = "running"
    elif failed:
        state = "failed"
    else:
        state = "done" if left == 0 else "running"
    if state == "done":
        completed = batches
    batch = max(numbers) if numbers else completed
    return {"role": role.name, "stage": role.stage, "state": state, "batch": batch, "batches": batches,
            "batch_size": size, "hosts": len(role.hosts), "done": done, "failed": failed, "left": left,
            "in_progress": len(active), "completed_batches": completed,
            "last_batch_end": _iso(ends[-1]) if ends else None, "_last_end": ends[-1] if ends else None,
            "_first_s": ends[0] - started if ends else None, "_intervals": intervals,
            "batch_s": round(statistics.median(intervals), 1) if intervals else None}


def role_eta(r: dict[str, Any], rollout_batch_s: float | None, now: float) -> float | None:
    """Seconds left for the role: its batches not completed times its batch duration (its own
    median, else the rollout's, else its first batch), less the time the current one has run."""
    last_end = r.pop("_last_end", None)
    first_s = r.pop("_first_s", None)
    remaining = r["batches"] - r["completed_batches"]
    if r["state"] in ("done", "failed") or remaining <= 0:
        r["eta_s"] = 0
        return 0.0
    per = r["batch_s"] or rollout_batch_s or first_s
    if per is None:
        r["eta_s"] = None
        return None
    running_for = now - last_end if (last_end is not None and r["state"] == "running") else 0.0
    left = max(0.0, remaining * per - min(running_for, per))
    r["eta_s"] = round(left)
    return left


# -- Airflow's runs and approvals -------------------------------------------------------------------

def runs_section(runs: Iterable[Mapping]) -> list[dict[str, Any]]:
    """Runs (``dag_id``, ``run_id``, ``state``, ``note``, dates, ``stages`` of ``{name, state,
    task_id}``) with the Airflow UI path of each run and stage."""
    out = []
    for r in runs:
        dag, run = str(r["dag_id"]), str(r["run_id"])
        stages = [{**s, "url": ui_path("dags", dag, "runs", run, "tasks", s["task_id"]) if s.get("task_id")
                   else None} for s in r.get("stages") or ()]
        out.append({**r, "stages": stages, "url": ui_path("dags", dag, "runs", run)})
    return out


def approvals_section(approvals: Iterable[Mapping]) -> list[dict[str, Any]]:
    """Pending approvals (``dag_id``, ``run_id``, ``task_id``, ``map_index``, ``subject``, ...) with
    the path of the UI's required-actions page of each."""
    out = []
    for a in approvals:
        path = ui_path("dags", a["dag_id"], "runs", a["run_id"], "tasks", a["task_id"], "required_actions")
        out.append({**a, "url": f"{path}?map_index={int(a.get('map_index', -1))}"})
    return out


# -- one host's audit trail ------------------------------------------------------------------------

def host_audit(store: Store, host: str, limit: int = AUDIT_LIMIT, internal: Iterable[str] = (),
               inventory: Inventory | None = None) -> dict[str, Any]:
    """The commands liftoff ran on ``host``, newest first (at most ``limit``): when, run id,
    environment, command, exit code, duration, the tail of the output of a failed one."""
    records = store.audit_records(host=host)
    shown = records[::-1][:max(0, limit)]
    where = _where(inventory, host) if inventory is not None else None
    out = {"host": host, "known": where is not None, "env": where and where[0], "role": where and where[1],
           "total": len(records), "truncated": len(records) > len(shown),
           "records": [{"id": r.id, "at": _iso(r.at), "run_id": r.run_id, "env": r.env, "command": r.command,
                        "exit_code": r.exit_code, "ok": r.exit_code == 0,
                        "duration_s": round(r.duration_s, 3),
                        "output_tail": "" if r.exit_code == 0 else r.output_tail[-OUTPUT_TAIL_SHOWN:]}
                       for r in shown]}
    hidden = {v: internal_label(v) for v in internal if v}
    return status._scrub(out, hidden) if hidden else out


def _where(inventory: Inventory, host: str) -> tuple[str, str] | None:
    for env in inventory.environments.values():
        for role in env.roles:
            if any(h.name == host for h in role.hosts):
                return env.name, role.name
        if env.deploy_node.name == host:
            return env.name, "deploy node"
    return None
