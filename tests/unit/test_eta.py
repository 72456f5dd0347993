"""The start estimate of queued renders: the claim's order (each user's own in priority order,
tenants in turns) laid on the slots as they free up, with run times from recent renders."""

from __future__ import annotations

from typing import Any

import pytest

from services.generation.eta import Durations, Job, QueueSnapshot, Running, Sample, estimate, queue_snapshot

SMALL: dict[str, Any] = {"width": 64, "height": 64, "steps": 10}
LARGE: dict[str, Any] = {"width": 128, "height": 128, "steps": 10}  # 4 times the work


def _jobs(tenant: str, n: int, params: dict[str, Any] = SMALL) -> list[Job]:
    return [Job(f"{tenant}{i}", tenant, "image", params) for i in range(n)]


def _history(seconds: float = 2.0, params: dict[str, Any] = SMALL, n: int = 3) -> Durations:
    return Durations([Sample("image", params, seconds)] * n)


def test_queued_renders_start_as_the_slots_free_up() -> None:
    running = [Running(Job("r0", "other", "image", SMALL), elapsed_s=1.5)]
    snapshot = QueueSnapshot(slots=2, running=running, own=_jobs("me", 4), others={})
    got = estimate(snapshot, _history())
    # One slot is idle (now), one frees when r0's 2 s are up (in 0.5 s); then every 2 s per slot.
    assert [(e.queue_position, e.eta_s) for e in got.values()] == [(0, 0.0), (1, 0.5), (2, 2.0), (3, 2.5)]


def test_other_tenants_take_their_turns_in_between() -> None:
    others = {"a": _jobs("a", 5), "b": _jobs("b", 1)}
    snapshot = QueueSnapshot(slots=1, running=[], own=_jobs("me", 2), others=others, own_turn=1)
    got = estimate(snapshot, _history(1.0))
    # Round 1: a0, me0, b0; round 2: a1, me1 (b has no more).
    assert {k: (e.queue_position, e.eta_s) for k, e in got.items()} == {"me0": (1, 1.0), "me1": (4, 4.0)}


def test_a_size_without_history_is_scaled_from_its_kinds_rate() -> None:
    own = [Job("large", "me", "image", LARGE), Job("small", "me", "image", SMALL)]
    got = estimate(QueueSnapshot(slots=1, running=[], own=own, others={}), _history(2.0, n=1))
    # Too few of the same size: the kind's rate, 2 s for SMALL's work, so 8 s for LARGE.
    assert (got["large"].eta_s, got["small"].eta_s) == (0.0, 8.0)


@pytest.mark.parametrize(
    ("slots", "history"),
    [(0, _history()), (1, Durations([]))],
    ids=["no-workers", "no-history"],
)
def test_without_workers_or_history_there_is_a_place_but_no_time(slots: int, history: Durations) -> None:
    got = estimate(QueueSnapshot(slots=slots, running=[], own=_jobs("me", 2), others={}), history)
    # With an idle slot, the next one starts now whatever the history; the one after cannot be told.
    first = 0.0 if slots else None
    assert [(e.queue_position, e.eta_s) for e in got.values()] == [(0, first), (1, None)]


def test_a_job_in_backoff_starts_no_sooner_than_it_may() -> None:
    own = [Job("me0", "me", "image", SMALL, run_after_s=3.0)]
    got = estimate(QueueSnapshot(slots=4, running=[], own=own, others={}), _history())
    assert got["me0"].eta_s == 3.0


def test_the_snapshot_rows_in_the_claims_order() -> None:
    def queued(render_id: str, tenant: str, rank: int, turn: int) -> dict[str, Any]:
        row = {"part": "queued", "render_id": render_id, "tenant": tenant, "kind": "image", "params": SMALL}
        return row | {"seconds": 0.0, "rank": rank, "turn": turn}

    rows = [
        {"part": "slots", "seconds": 3.0, "params": {"cap": 0, "reserved": 1}},
        {
            "part": "running",
            "render_id": "x",
            "tenant": "b",
            "kind": "image",
            "params": SMALL,
            "seconds": 1.0,
        },
        queued("m1", "me", 2, 2),
        queued("m0", "me", 2, 1),
        queued("a0", "a", 1, 1),
    ]
    snapshot = queue_snapshot("me", rows)
    assert (snapshot.slots, snapshot.reserved) == (3, 1) and [r.job.render_id for r in snapshot.running] == [
        "x"
    ]
    assert [j.render_id for j in snapshot.own] == ["m0", "m1"] and snapshot.own_turn == 1
    assert {t: [j.render_id for j in jobs] for t, jobs in snapshot.others.items()} == {"a": ["a0"]}


def test_a_tenant_at_its_cap_waits_while_others_take_the_free_slots() -> None:
    # Four slots, two reserved: the user may run two at once. The other tenant's job takes a slot at
    # once, and the user's third waits for one of its own to end although a slot is idle.
    own, others = _jobs("me", 3), {"b": _jobs("b", 1)}
    snapshot = QueueSnapshot(slots=4, running=[], own=own, others=others, own_turn=0, reserved=2)
    assert snapshot.cap == 2
    got = estimate(snapshot, _history(2.0))
    assert [(e.queue_position, e.eta_s) for e in got.values()] == [(0, 0.0), (2, 0.0), (3, 2.0)]
    capped = QueueSnapshot(slots=3, running=[], own=own, others={}, tenant_cap=1)
    assert [e.eta_s for e in estimate(capped, _history(2.0)).values()] == [0.0, 2.0, 4.0]
