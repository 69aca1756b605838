"""Deferrable triggers: waits that must not hold a worker slot.

They live in ``plugins/`` so the triggerer can import them. Airflow keeps the kwargs
``serialize()`` returned when the task deferred and re-creates the trigger from exactly those
after a triggerer restart (or when another triggerer takes it over); nothing a trigger learns
while it runs is saved. So:

* :class:`QAPipelineTrigger` resumes: its deadline is an absolute time and the pipeline id is
  in its kwargs, so a new triggerer follows the same pipeline until the same deadline.
* :class:`QuietPeriodTrigger` starts its window over: the alert-free time seen before the
  restart is not counted (nobody watched while the triggerer was down). That is the safe
  direction: the gate waits longer, it never passes early.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from liftoff.alerts import QuietPeriod, run_quiet_period_async

_MODULE = "liftoff_airflow.triggers"


class QuietPeriodTrigger(BaseTrigger):
    """Polls Alertmanager (``HttpAsyncHook``) until the environment has been quiet for a whole window.

    ``period`` is the QuietPeriod as it was at deferral (not started): re-created after a
    triggerer restart, the trigger starts a whole new window. With ``conn_id`` the triggerer
    resolves that connection when it runs (credentials never sit in the trigger's kwargs);
    without it (a trigger deferred before ``conn_id`` existed) it polls ``alertmanager_url``.
    A connection that cannot be resolved fails the gate closed.
    """

    def __init__(self, alertmanager_url: str, matchers: dict[str, str], period: dict[str, Any],
                 severities: list[str] | None = None, env: str = "", conn_id: str = ""):
        super().__init__()
        self.alertmanager_url = alertmanager_url
        self.matchers = dict(matchers)
        self.period = dict(period)
        self.severities = list(severities or ["critical", "warning"])
        self.env = env
        self.conn_id = conn_id

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (f"{_MODULE}.QuietPeriodTrigger", {
            "alertmanager_url": self.alertmanager_url, "matchers": self.matchers,
            "period": self.period, "severities": self.severities, "env": self.env, "conn_id": self.conn_id,
        })

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from liftoff.alerts import unavailable
        from liftoff.settings import resolve_connection

        try:
            alertmanager = (await asyncio.to_thread(resolve_connection, self.conn_id) if self.conn_id
                            else self.alertmanager_url)
        except Exception as exc:  # noqa: BLE001 - no usable connection: the gate fails closed
            yield TriggerEvent({"env": self.env, "ok": False, "alerts": [], "polls": 0,
                                "reason": unavailable(self.matchers, f"{type(exc).__name__}: {exc}").reason})
            return
        period = await run_quiet_period_async(alertmanager, self.matchers,
                                              QuietPeriod.from_dict(self.period), self.severities)
        yield TriggerEvent({"env": self.env, "ok": period.ok, "reason": period.reason,
                            "alerts": period.alerts, "polls": period.polls})


class QAPipelineTrigger(BaseTrigger):
    """Follows a triggered GitLab-QA pipeline on the ops instance until it ends or times out.

    ``deadline`` is epoch seconds, fixed when the task deferred: re-created after a triggerer
    restart, the trigger follows the same pipeline until the same deadline.
    """

    def __init__(self, pipeline_id: int, web_url: str, deadline: float, poll_interval: float = 5.0,
                 env: str = "", inventory_path: str | None = None):
        super().__init__()
        self.pipeline_id = pipeline_id
        self.web_url = web_url
        self.deadline = deadline
        self.poll_interval = poll_interval
        self.env = env
        self.inventory_path = inventory_path

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (f"{_MODULE}.QAPipelineTrigger", {
            "pipeline_id": self.pipeline_id, "web_url": self.web_url, "deadline": self.deadline,
            "poll_interval": self.poll_interval, "env": self.env, "inventory_path": self.inventory_path,
        })

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from liftoff.errors import QAError
        from liftoff.inventory import load_inventory
        from liftoff.qa import QAClient

        base = {"env": self.env, "pipeline_id": self.pipeline_id, "web_url": self.web_url}
        try:
            client = await asyncio.to_thread(QAClient.from_settings, load_inventory(self.inventory_path))
        except Exception as exc:  # noqa: BLE001 - any configuration fault fails the gate closed
            yield TriggerEvent({**base, "passed": False, "state": "error",
                                "reason": f"QA client unavailable: {exc}", "failed_jobs": []})
            return
        errors = 0
        while True:
            try:
                status = await asyncio.to_thread(client.status, self.pipeline_id)
                errors = 0
            except QAError as exc:
                errors += 1
                if errors >= 3:
                    yield TriggerEvent({**base, "passed": False, "state": "error", "reason": str(exc),
                                        "failed_jobs": []})
                    return
                status = None
            if status is not None and status.done:
                yield TriggerEvent({**base, "passed": status.state == "passed", "state": status.state,
                                    "reason": f"QA pipeline {status.state}: {status.web_url or self.web_url}",
                                    "failed_jobs": [list(j) for j in status.failed_jobs]})
                return
            if time.time() >= self.deadline:
                await asyncio.to_thread(client.cancel, self.pipeline_id)
                yield TriggerEvent({**base, "passed": False, "state": "timeout",
                                    "reason": f"QA pipeline {self.pipeline_id} did not finish in time: "
                                              f"{self.web_url}", "failed_jobs": []})
                return
            await asyncio.sleep(max(0.0, min(self.poll_interval, self.deadline - time.time())))
