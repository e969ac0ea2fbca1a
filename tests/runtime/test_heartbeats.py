"""The launcher's reading of heartbeats, on a stand-in store and clock: a live worker silent
past the hang timeout is hung, a late one is the suspect, and a stalled launcher blames no one."""

from __future__ import annotations

import pytest

from hetrain.runtime import failure
from hetrain.runtime.failure import HANG_FLOOR_S, Heartbeats


class Store:
    def __init__(self, world):
        self.beats = dict.fromkeys(range(world), 0)

    def counter(self, key):
        return self.beats[key]


@pytest.fixture
def clock(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(failure.time, "monotonic", lambda: now[0])
    return now


def advance(beats, store, clock, seconds, beating=(0, 1, 2)):
    """Let `seconds` pass in 0.5 s ticks; the `beating` workers beat at each."""
    for _ in range(int(seconds / 0.5)):
        clock[0] += 0.5
        for r in beating:
            store.beats[r] += 1
        beats.poll()


def test_a_silent_worker_is_hung_and_named_first(clock):
    store = Store(3)
    beats = Heartbeats(store, lambda r: r, 3, hang_timeout_s=3)
    advance(beats, store, clock, 5)
    advance(beats, store, clock, 2.5, beating=(0, 2))
    assert beats.suspect([0, 1, 2]) == 1 and beats.hung([0, 1, 2]) == []
    advance(beats, store, clock, 1, beating=(0, 2))
    assert beats.hung([0, 1, 2]) == [1]
    assert beats.hung([0, 2]) == []  # a worker already exiting is not judged


def test_startup_is_allowed_longer_and_the_default_follows_the_steps(clock):
    store = Store(2)
    beats = Heartbeats(store, lambda r: r, 2, hang_timeout_s=None)
    advance(beats, store, clock, 60, beating=(0,))
    assert beats.hung([0, 1]) == []  # rank 1 has not beaten yet: still starting
    assert beats.timeout_s == HANG_FLOOR_S
    beats.note_step(10.0)
    assert beats.timeout_s == 50.0


def test_a_stalled_launcher_blames_no_one(clock):
    store = Store(2)
    beats = Heartbeats(store, lambda r: r, 2, hang_timeout_s=3)
    advance(beats, store, clock, 2, beating=(0, 1))
    clock[0] += 30  # the launcher was not polling (swapped out, a slow callback)
    beats.poll()
    assert beats.hung([0, 1]) == []
