"""When a user's queued renders will start: the claim's own order replayed on the live slots.

What is ahead of a render is what the claim will take before it: the user's own jobs before it in
priority order, and the other tenants' taken in turns with them (the claim serves tenants round-robin:
every tenant's 1st job, then every tenant's 2nd, ...). Those jobs are laid on the workers' slots as
they free up: a slot of a running render frees when that render's expected time is over (what it has
run already counted), an idle slot at once. A job's expected time comes from recent renders of the
same kind and size, or of the same kind scaled by its work (pixels times steps times frames); with no
history at all, there is no estimate.

Pure: the store gathers the figures (`QueueSnapshot`), this module does the arithmetic.
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from statistics import fmean
from typing import Any

MAX_SIMULATED = 1000
"""Jobs laid on the slots at most: a render further back is told its place, not a time."""
TRUSTED_PROGRESS = 0.1
"""The progress past which a running render's own pace predicts its end better than history."""
SAME_SIZE_SAMPLES = 3
"""Recent renders of exactly a job's kind and size it takes to trust their mean over the kind's rate."""


@dataclass(frozen=True)
class Job:
    """A render as the estimate sees it: its tenant, kind and parameters (width, height, steps,
    duration_s, fps)."""

    render_id: str
    tenant: str
    kind: str
    params: dict[str, Any]
    run_after_s: float = 0.0
    """Seconds from now before which it may not start (a retry's backoff)."""


@dataclass(frozen=True)
class Running:
    job: Job
    elapsed_s: float


@dataclass(frozen=True)
class Sample:
    """A recent render that succeeded, and how long it ran."""

    kind: str
    params: dict[str, Any]
    seconds: float


@dataclass(frozen=True)
class QueueSnapshot:
    """The queue as it stands, for one user's estimates."""

    slots: int
    """The live workers' slots."""
    running: Sequence[Running]
    own: Sequence[Job]
    """The user's queued jobs, in the claim's order."""
    others: Mapping[str, Sequence[Job]]
    """Other tenants' queued jobs, each in the claim's order, by tenant in the order the claim serves
    them (least recently served first); the user's own place in that order is `own_turn`."""
    own_turn: int = 0
    """How many of `others` are served before the user in each round."""
    tenant_cap: int = 0
    """The most renders one tenant may run at once (0: no cap)."""
    reserved: int = 0
    """Slots no one tenant may hold (see `claim_jobs`)."""

    @property
    def cap(self) -> int | None:
        """The claim's cap per tenant: the lesser of `tenant_cap` and the slots less `reserved`."""
        caps = [self.tenant_cap] if self.tenant_cap else []
        if self.slots > self.reserved:
            caps.append(self.slots - self.reserved)
        return min(caps) if caps else None


@dataclass(frozen=True)
class Estimate:
    queue_position: int
    """Jobs the claim takes before it (0: it is next)."""
    eta_s: float | None
    """Seconds until it starts; None without a history to go by, or without live slots."""


class Durations:
    """Expected run times from recent samples: by kind and size, and each kind's seconds per unit of
    work."""

    def __init__(self, samples: Iterable[Sample]) -> None:
        self._by_size: dict[tuple[Any, ...], list[float]] = defaultdict(list)
        work: dict[str, float] = defaultdict(float)
        seconds: dict[str, float] = defaultdict(float)
        for sample in samples:
            self._by_size[_size(sample.kind, sample.params)].append(sample.seconds)
            work[sample.kind] += _work(sample.kind, sample.params)
            seconds[sample.kind] += sample.seconds
        self._rate = {kind: seconds[kind] / work[kind] for kind in work if work[kind] > 0}

    def __bool__(self) -> bool:
        return bool(self._rate)

    def of(self, job: Job) -> float | None:
        same = self._by_size.get(_size(job.kind, job.params), [])
        if len(same) >= SAME_SIZE_SAMPLES:
            return fmean(same)
        rate = self._rate.get(job.kind)
        return None if rate is None else rate * _work(job.kind, job.params)


def estimate(snapshot: QueueSnapshot, durations: Durations) -> dict[str, Estimate]:
    """Each of the user's queued renders' place and expected start. At each moment a slot frees, it
    goes to the first job in the claim's order whose tenant is under the cap, as the claim gives it."""
    order = _claim_order(snapshot)
    places = {job.render_id: i for i, job in enumerate(order)}
    order = order[:MAX_SIMULATED]
    own = {job.render_id for job in snapshot.own}
    unknown = {job_id: Estimate(places[job_id], None) for job_id in own - {job.render_id for job in order}}
    own -= set(unknown)
    running = [durations.of(r.job) for r in snapshot.running]
    known = None not in running
    # Each slot as the moment it frees: a running render's at the end of its expected time, an idle
    # one now (a workers' table a little stale may count fewer slots than renders run).
    ends: dict[str, list[float]] = defaultdict(list)
    free: list[float] = []
    for seconds, run in zip(running, snapshot.running, strict=True):
        end = max(0.0, (seconds or 0.0) - run.elapsed_s)
        free.append(end)
        ends[run.job.tenant].append(end)
    free += [0.0] * max(0, snapshot.slots - len(free))
    if not free:  # no worker: nothing starts until one comes
        return {job_id: Estimate(places[job_id], None) for job_id in places if job_id in own} | unknown
    heapq.heapify(free)
    cap = snapshot.cap
    estimates: dict[str, Estimate] = dict(unknown)
    pending = list(order)
    while pending and len(estimates) < len(own) + len(unknown):
        now = heapq.heappop(free)
        job = next((j for j in pending if j.run_after_s <= now and _under(cap, ends[j.tenant], now)), None)
        if job is None:  # every tenant waiting is at its cap, or in backoff: the slot waits too
            later = [j.run_after_s for j in pending if j.run_after_s > now]
            later += [
                min(e for e in ends[j.tenant] if e > now)
                for j in pending
                if not _under(cap, ends[j.tenant], now)
            ]
            heapq.heappush(free, min(later))
            continue
        pending.remove(job)
        if job.render_id in own:
            estimates[job.render_id] = Estimate(places[job.render_id], round(now, 1) if known else None)
        seconds = durations.of(job)
        if seconds is None:
            known = False  # nothing after it can be told
        heapq.heappush(free, now + (seconds or 0.0))
        ends[job.tenant].append(now + (seconds or 0.0))
    return estimates


def _under(cap: int | None, ends: list[float], now: float) -> bool:
    """Whether a tenant whose renders end at `ends` runs fewer than `cap` at `now`."""
    return cap is None or sum(end > now for end in ends) < cap


def queue_snapshot(user_id: str, rows: Iterable[dict[str, Any]]) -> QueueSnapshot:
    """The snapshot of the rows of `queue_snapshot` (queries.sql): by `part`, slots, running jobs and
    queued jobs by tenant (rank) and turn."""
    slots, limits = 0, dict[str, Any]()
    running: list[Running] = []
    queued: dict[tuple[int, str], list[tuple[int, Job]]] = defaultdict(list)
    for row in rows:
        if row["part"] == "slots":
            slots, limits = int(row["seconds"]), row.get("params") or {}
            continue
        job = Job(row["render_id"], row["tenant"], row["kind"], row["params"])
        if row["part"] == "running":
            running.append(Running(job, row["seconds"]))
        else:
            ready = Job(job.render_id, job.tenant, job.kind, job.params, run_after_s=row["seconds"])
            queued[(row["rank"], row["tenant"])].append((row["turn"], ready))
    tenants = sorted(queued)
    jobs = {
        tenant: [job for _, job in sorted(turns, key=lambda t: t[0])] for (_, tenant), turns in queued.items()
    }
    own_turn = next((i for i, (_, tenant) in enumerate(tenants) if tenant == user_id), 0)
    others = {tenant: jobs[tenant] for _, tenant in tenants if tenant != user_id}
    return QueueSnapshot(
        slots,
        running,
        jobs.get(user_id, []),
        others,
        own_turn,
        tenant_cap=int(limits.get("cap", 0)),
        reserved=int(limits.get("reserved", 0)),
    )


def _claim_order(snapshot: QueueSnapshot) -> list[Job]:
    """The jobs in the order the claim will take them, up to the user's last: round after round,
    each tenant's next job, the tenants in the order they are served."""
    tenants = list(snapshot.others.values())
    tenants.insert(snapshot.own_turn, snapshot.own)
    order: list[Job] = []
    for turn in range(len(snapshot.own)):
        order += [jobs[turn] for jobs in tenants if turn < len(jobs)]
    return order


def _size(kind: str, params: dict[str, Any]) -> tuple[Any, ...]:
    # Another workflow is another amount of work: renders of one workflow are timed by their own.
    names = ("width", "height", "steps", "duration_s", "fps", "workflow")
    return (kind, *(params.get(name) or None for name in names))


def _work(kind: str, params: dict[str, Any]) -> float:
    frames = float(params.get("duration_s") or 0) * float(params.get("fps") or 0) if kind == "video" else 1.0
    return (
        float(params.get("width", 0))
        * float(params.get("height", 0))
        * float(params.get("steps", 0))
        * max(frames, 1.0)
    )
