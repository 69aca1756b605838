"""The sliding-window rollout of a role (``rollout: window``; issue 15), as Kubernetes'
maxUnavailable does it: at most the role's batch size of hosts out of service at any moment,
the next host drained as soon as one is back UP on every LB and its record cleared, so a slow
host holds only itself. Groups of hosts go through the lockstep batch's own phases
(:meth:`liftoff.fleet._Rollout._batch`: classify, write-ahead drain records, drain, sessions,
then each host on its own), so records, statuses and the capacity floor are the lockstep
rollout's. After a failed host nothing new starts and the groups in flight finish.

:class:`WindowRollout` is a part of ``liftoff.fleet._Rollout`` (its batch phases, host flows and
report are there); this module holds only what the window adds.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from liftoff.errors import LiftoffError
from liftoff.inventory import HostRef, Role

if TYPE_CHECKING:
    from liftoff.fleet import _Batch, _Inspection

# A window drains in steps of at least 1/WINDOW_STEPS of its slots (rounded up; or
# options.window_step hosts): a group drains once that many slots are free (or no more hosts are
# left). Each group costs LB reads and store writes like a batch does: with batches of 10 hosts or
# fewer the window moves host by host. (Hosts go back in service as soon as they are ready.)
WINDOW_STEPS = 10

@dataclass
class Window:
    """A role's sliding window while it runs (:meth:`WindowRollout._window`): at most ``free`` more
    hosts may go out of service; a slot comes back when a host is back UP and cleared."""

    role: Role
    pending: deque[HostRef]  # hosts not started yet, in order
    free: int  # slots: the role's batch size minus the hosts out of service because of it
    step: int = 1  # hosts a group starts with, at least (fewer when no more are left)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    groups: dict[asyncio.Task, list[HostRef]] = field(default_factory=dict)  # groups in flight
    insp: dict[str, asyncio.Task] = field(default_factory=dict)  # inspections started ahead
    count: int = 0  # groups started
    failed: str = ""  # label of the first group with a failed host
    untouched: bool = False  # a group was stopped before it touched anything (its hosts stay pending)
    error: BaseException | None = None  # an unexpected error of a group (raised once all are done)

    def release(self, n: int) -> None:
        if n:
            self.free += n
            self.wake.set()


class WindowRollout:
    """The window's part of ``liftoff.fleet._Rollout`` (a mixin: ``self`` is the rollout)."""

    async def _window(self, role: Role, hosts: list[HostRef]) -> None:
        """At most the role's batch size out of service at once: the hosts start in that order,
        in groups (:meth:`_batch`'s phases; past the drain, :meth:`_window_hosts`), the next as
        soon as a slot is free (a host back UP on every LB and cleared). A group's
        classify-to-drain runs alone, so every capacity check sees the groups before it drained,
        and the slots freed meanwhile join one group. After a failed host (or another role's)
        nothing new starts; the groups in flight finish."""
        w = Window(role, deque(hosts), role.batch_size(), step=self._window_step(role))
        try:
            while w.pending and not self._window_stopping(w):
                if w.free < min(w.step, len(w.pending)) and (w.groups or w.free <= 0):
                    if not w.groups:  # cannot happen: slots come back when groups end well
                        raise LiftoffError(f"role {role.name}: window without a free slot")
                    await self._window_wait(w)
                    continue
                group = [w.pending.popleft() for _ in range(min(w.free, len(w.pending)))]
                w.free -= len(group)
                drained = asyncio.Event()
                task = asyncio.create_task(self._window_group(w, group, drained))
                task.add_done_callback(lambda _: w.wake.set())
                w.groups[task] = group
                await drained.wait()
            while w.groups:
                await self._window_wait(w)
        finally:
            await self._window_cancel(w)
        if w.error is not None:
            raise w.error
        self._window_end(w)

    def _window_step(self, role: Role) -> int:
        """The hosts a sliding window moves by at least (:data:`WINDOW_STEPS`)."""
        size = role.batch_size()
        return max(1, min(size, self.options.window_step or -(-size // WINDOW_STEPS)))

    def _window_stopping(self, w: Window, own: list[HostRef] | None = None) -> bool:
        """Start nothing more: a host of the role failed (one in flight, or a group ended failed)
        or another role failed. ``own``: the group asking, whose hosts do not count (like a batch,
        a group drains its hosts whose inspection went well beside one whose did not)."""
        if not w.failed:
            hosts = self.report.hosts
            bad = next((hosts[h.name] for group in w.groups.values() if group is not own for h in group
                        if hosts[h.name].status == "failed"), None)
            if bad is not None:
                w.failed = f"window group {bad.batch}"
        return bool(w.failed) or w.error is not None or self.stop.is_set()

    async def _window_wait(self, w: Window) -> None:
        """Until a slot frees or a group ends (then one more tick: slots freed at the same moment
        start together); ended groups are collected."""
        if self._window_reap(w):
            return
        w.wake.clear()
        await w.wake.wait()
        await asyncio.sleep(0)
        self._window_reap(w)

    @staticmethod
    def _window_reap(w: Window) -> int:
        """Forget the groups that ended (keeping the first unexpected error); how many."""
        ended = [t for t in w.groups if t.done()]
        for task in ended:
            del w.groups[task]
            exc = None if task.cancelled() else task.exception()
            if exc is not None and w.error is None:
                w.error = exc
        return len(ended)

    async def _window_cancel(self, w: Window) -> None:
        """Inspections started ahead and never used (and groups, if the role was cancelled) end."""
        tasks = [*w.insp.values(), *w.groups]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        w.insp.clear()

    def _window_end(self, w: Window) -> None:
        """The role's status after its window: failed, stopped (another role failed) or running
        (every host done or skipped; :meth:`_role` makes it a success)."""
        rr = self.report.roles[w.role.name]
        if w.failed or rr.error or any(self.report.hosts[h.name].status == "failed" for h in w.role.hosts):
            self._role_failed(w.role, w.failed or "window")
        elif w.pending or w.untouched:
            rr.status = "stopped"
            rr.error = rr.error or "stopped: another role failed"

    async def _window_group(self, w: Window, group: list[HostRef], drained: asyncio.Event) -> None:
        """One group of the window through :meth:`_batch`; ``drained`` is set once it drained (or
        ended, or started nothing)."""
        w.count += 1
        index = w.count
        rr = self.report.roles[w.role.name]
        rr.batches.append([h.name for h in group])
        rr.batch_durations.append(0.0)
        rr.batch_phases.append({})
        slot, started = len(rr.batches) - 1, time.monotonic()
        phase: dict[str, float] = {}
        untouched = False

        def on_phase(kind: str, b: _Batch) -> bool:
            nonlocal untouched
            if kind == "classify":
                if b.work and self._window_stopping(w, group):
                    for h in b.work:  # untouched: they stay pending
                        self.report.hosts[h.name].batch = None
                    b.work, w.untouched = [], True
                    untouched = True
                    return False
                w.release(len(b.hosts) - len(b.work))  # skipped (or failed inspection): never out
            elif kind == "drain":
                drained.set()
            elif kind == "clear":
                w.release(len(b.good))  # back UP on every LB, records cleared
            return True

        try:
            insp = await self._window_inspections(w, group)
            phase["inspect_wait"] = time.monotonic() - started
            ok = await self._batch(w.role, index, group, insp, phase, on_phase=on_phase)
        except LiftoffError as exc:
            rr.error = rr.error or str(exc)
            ok = False
        finally:
            drained.set()
            rr.batch_durations[slot] = round(time.monotonic() - started, 3)
            rr.batch_phases[slot] = {k: round(v, 3) for k, v in phase.items()}
        if not ok and not w.failed and not untouched:
            w.failed = f"window group {index}"
        w.wake.set()

    async def _window_hosts(self, b: _Batch, handlers: Mapping[str, Callable], rest: list[str]) -> bool:
        """A window group past its drain: each host's own steps (:meth:`_host`) concurrently; the
        hosts whose steps ended go on together, a part of the group, through the phases after
        (``rest``: ready, up, clear, chef), then those that ended meanwhile, and so on: a slow
        host holds only itself, and a group has one part in those phases at a time (its LB
        changes and reads stay batched). True when every host is back in service."""
        if b.draining is not None:
            await b.draining
        installing = asyncio.create_task(self._set_statuses(
            [(h.name, "installing", f"batch {b.index}") for h in b.work]))
        flows = {asyncio.create_task(self._host(b.role, h, b.flows[h.name], b.insp[h.name])): h
                 for h in b.work}
        ended: list[asyncio.Task] = []
        wake = asyncio.Event()
        for t in flows:
            t.add_done_callback(lambda t: (ended.append(t), wake.set()))
        ok = True
        try:
            while flows:
                await wake.wait()
                wake.clear()
                hosts = self._window_ended(flows, ended)
                ok = await self._window_part(b, hosts, handlers, rest, installing) and ok
        finally:
            for t in (*flows, installing):
                t.cancel()
        b.good = [h for h in b.work if self.report.hosts[h.name].status == "done"]
        return ok

    def _window_ended(self, flows: dict[asyncio.Task, HostRef], ended: list[asyncio.Task]) -> list[HostRef]:
        """The hosts whose own steps ended (``ended``, emptied; out of ``flows``); those that
        failed are marked failed now."""
        hosts = []
        for t in ended:
            h = flows.pop(t)
            err = t.result()
            if err is not None:
                self._fail(h, self.report.hosts[h.name].step, err)
            hosts.append(h)
        ended.clear()
        return hosts

    async def _window_part(self, b: _Batch, hosts: list[HostRef], handlers: Mapping[str, Callable],
                           rest: list[str], installing: asyncio.Task) -> bool:
        """Hosts of a window group whose own steps ended: the group's phases after ``host``
        across them. True when they are all back in service."""
        good = [h for h in hosts if self.report.hosts[h.name].status != "failed"]
        part = dataclasses.replace(b, hosts=hosts, work=hosts, good=good, statuses=[], draining=None,
                                   lb_work=[h.name for h in hosts if h.name in self.lb_names], not_up={},
                                   mark=time.monotonic())
        await installing  # its statuses are written before any host's final one
        part.lap("hosts")
        for kind in rest:
            if not await handlers[kind](part):
                return False
            part.tell(kind)
        return len(part.good) == len(hosts)

    async def _window_inspections(self, w: Window, group: list[HostRef]) -> dict[str, _Inspection]:
        """The group's inspections (started ahead when ``options.prefetch``), and the next hosts'
        (as many as the batch size) started now."""
        ahead = list(itertools.islice(w.pending, w.role.batch_size())) if self.options.prefetch else []
        for h in (*group, *ahead):
            if h.name not in w.insp:
                w.insp[h.name] = asyncio.create_task(self._inspect(h))
        results = await asyncio.gather(*(w.insp[h.name] for h in group))
        for h in group:
            del w.insp[h.name]
        return {h.name: r for h, r in zip(group, results, strict=True)}

    # -- inspection (read-only) ----------------------------------------------------------------
