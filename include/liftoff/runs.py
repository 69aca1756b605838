"""A pipeline run as the engine sees it: who, which run, and the handles it works through.

Every step of every pipeline takes a :class:`Run`. Reads (installed versions, LB snapshots,
the state store) go through it freely; changes go through :mod:`liftoff.guard`, the one door.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from liftoff.commands import installed_version_command
from liftoff.inventory import Environment, Inventory, load_inventory
from liftoff.metrics import PipelineMetrics
from liftoff.remote import Remote
from liftoff.store import Store
from liftoff.versions import validate_name, validate_reason


@dataclass
class Run:
    """One pipeline run: who, which run, the safety override it carries, and the engine's handles.

    ``override_reason``: the recorded reason that lets a change back to an older package pass
    although post-deployment migrations newer than the target ran (the rollback DAG's
    ``override_reason``); None for every other run, so the guard refuses such a change."""

    run_id: str
    who: str = "liftoff"
    pipeline: str = "deploy_canary"
    inventory: Inventory | None = None
    _store: Store | None = None
    override_reason: str | None = None
    redact_version: bool = False  # an internal build: metrics never carry its version

    def __post_init__(self) -> None:
        validate_name("run_id", self.run_id)
        if self.override_reason:
            self.override_reason = validate_reason(self.override_reason, field_name="override_reason")
        self.inventory = self.inventory or load_inventory()

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = Store.from_settings(self.inventory)
        return self._store

    def env(self, name: str) -> Environment:
        return self.inventory.env(name)

    def remote(self, env: str = "") -> Remote:
        return Remote(self.inventory.conn_id("ssh"), store=self.store, run_id=self.run_id, env=env)

    def metrics(self, **kwargs: Any) -> PipelineMetrics:
        if self.redact_version:
            kwargs["redact_version"] = True
        return PipelineMetrics.from_settings(self.pipeline, self.inventory, **kwargs)


def for_build(run: Run, internal: bool) -> Run:
    """``run`` itself, or the same run with version-redacting metrics for an internal build."""
    if not internal or run.redact_version:
        return run
    return Run(run_id=run.run_id, who=run.who, pipeline=run.pipeline, inventory=run.inventory,
               _store=run._store, override_reason=run.override_reason, redact_version=True)


def run_sync(coro):
    """Run a coroutine from a plain (synchronous) Airflow task."""
    return asyncio.run(coro)


async def installed_versions(run: Run, env: Environment) -> dict[str, str | None]:
    """The installed package of the deploy node and every host (None: unreadable)."""
    hosts = [env.deploy_node, *env.hosts()]
    async with run.remote(env.name) as remote:
        results = await asyncio.gather(*(remote.run(h, installed_version_command(), 60) for h in hosts))
    return {h.name: ((r.stdout.strip() or None) if r.ok else None)
            for h, r in zip(hosts, results, strict=True)}


def read_installed(run: Run, env: Environment) -> dict[str, str | None]:
    return run_sync(installed_versions(run, env))
