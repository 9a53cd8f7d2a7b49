"""Replay of a planned arena (csrc/arena.h, NOTE [ Arena replay ]) on CPU, from recorded
request sequences: hits, misses, out-of-order frees, plans that do not match."""

import random

import pytest

from memo import _ext
from memo.arena import ArenaPlan, ArenaReplay
from memo.errors import MemoError

pytestmark = pytest.mark.skipif(_ext._module is None, reason=f"memo._C not built: {_ext._load_error}")


@pytest.fixture(autouse=True)
def csrc_on(monkeypatch):
    """The arena has no pure-torch fallback: these tests run the C++ replay even when the
    suite runs with MEMO_DISABLE_CSRC=1."""
    monkeypatch.setenv(_ext.DISABLE_ENV, "0")


def first_fit_plan(events):
    """Plan a recorded sequence of ('alloc', id, size) / ('free', id) events: offsets, peak."""
    free, where, slots = [(0, 1 << 60)], {}, []
    for ev in events:
        if ev[0] == "alloc":
            size = ev[2]
            i = next(i for i, (_, s) in enumerate(free) if s >= size)
            off, s = free[i]
            free[i:i + 1] = [(off + size, s - size)] if s > size else []
            where[ev[1]] = (off, size)
            slots.append((off, size))
        else:
            off, size = where.pop(ev[1])
            free.append((off, size))
            free.sort()
            merged = [free[0]]
            for o, s in free[1:]:
                if merged[-1][0] + merged[-1][1] == o:
                    merged[-1] = (merged[-1][0], merged[-1][1] + s)
                else:
                    merged.append((o, s))
            free = merged
    peak = max(o + s for o, s in slots)
    return slots, peak


def replay(arena, events, sizes=None):
    """Run events against the arena; returns {id: address} of every allocation."""
    addr, seen = {}, {}
    for ev in events:
        if ev[0] == "alloc":
            size = sizes.get(ev[1], ev[2]) if sizes else ev[2]
            addr[ev[1]] = arena.allocate(size)
            seen[ev[1]] = (addr[ev[1]], size)
        else:
            arena.free(addr.pop(ev[1]))
    return seen


def random_events(rng, n):
    events, live = [], []
    for i in range(n):
        events.append(("alloc", i, rng.choice([256, 512, 4096, rng.randrange(1, 10_000)])))
        live.append(i)
        while live and rng.random() < 0.5:
            events.append(("free", live.pop(rng.randrange(len(live)))))
    events += [("free", i) for i in live]
    return events


def assert_disjoint(live):
    spans = sorted((a, a + s) for a, s in live if s)
    assert all(e0 <= s1 for (_, e0), (s1, _) in zip(spans, spans[1:])), "two live blocks overlap"


def test_exact_replay_hits_every_request_at_its_offset_every_time():
    events = random_events(random.Random(1), 60)
    slots, peak = first_fit_plan(events)
    arena = ArenaReplay(ArenaPlan(peak, [slots]))
    for _ in range(3):                                   # every layer reuses the plan
        arena.begin_phase(0)
        seen = replay(arena, events)
        assert [seen[i][0] - arena.base for i in range(60)] == [o for o, _ in slots]
    s = arena.stats()
    assert (s["requests"], s["hits"], s["misses"], s["hit_bytes"]) == (180, 180, 0, 3 * sum(z for _, z in slots))
    assert s["live_arena_blocks"] == 0 and s["live_fallback_blocks"] == 0


def test_size_mismatch_misses_only_that_request():
    plan = ArenaPlan(4096, [[(0, 1024), (1024, 1024), (2048, 1024)]])
    arena = ArenaReplay(plan)
    arena.begin_phase(0)
    a = arena.allocate(1024)
    b = arena.allocate(1000)                             # planned 1024: miss, heap memory
    c = arena.allocate(1024)                             # the counter moved on: still a hit
    assert a == arena.base and c == arena.base + 2048
    assert not arena.owns(b)
    assert arena.stats()["misses"] == 1 and arena.stats()["hits"] == 2
    for p in (b, a, c):
        arena.free(p)
    d = arena.allocate(1024)                             # past the plan's end: miss
    assert not arena.owns(d) and arena.stats()["misses"] == 2
    arena.free(d)


def test_out_of_order_frees_never_give_overlapping_memory():
    # Plan: x at 0, free x, y reuses 0. Replayed with x still live when y comes: conflict miss.
    plan = ArenaPlan(2048, [[(0, 1024), (0, 1024), (1024, 512)]])
    arena = ArenaReplay(plan)
    arena.begin_phase(0)
    x = arena.allocate(1024)
    y = arena.allocate(1024)
    z = arena.allocate(512)
    assert x == arena.base and not arena.owns(y) and z == arena.base + 1024
    s = arena.stats()
    assert (s["hits"], s["misses"], s["conflicts"]) == (2, 1, 1)
    arena.free(z)                                        # frees in any order
    arena.free(x)
    arena.free(y)
    arena.begin_phase(0)                                 # in plan order it all hits again
    x = arena.allocate(1024)
    arena.free(x)
    y = arena.allocate(1024)
    assert y == arena.base and arena.stats()["conflicts"] == 1
    arena.free(y)
    with pytest.raises(RuntimeError, match="never handed out"):
        arena.free(y)


def test_randomized_perturbed_replays_stay_disjoint():
    rng = random.Random(7)
    for trial in range(20):
        events = random_events(rng, 80)
        slots, peak = first_fit_plan(events)
        arena = ArenaReplay(ArenaPlan(peak, [slots]))
        # Perturb: change some sizes, swap neighbouring frees, so the plan only partly matches.
        sizes = {i: slots[i][1] + rng.choice([-1, 1, 256]) for i in rng.sample(range(80), 10)}
        ev = list(events)
        for _ in range(15):
            j = rng.randrange(len(ev) - 1)
            if ev[j][0] == "free" and ev[j + 1][0] == "free":
                ev[j], ev[j + 1] = ev[j + 1], ev[j]
        arena.begin_phase(0)
        addr, live = {}, {}
        for e in ev:
            if e[0] == "alloc":
                size = max(1, sizes.get(e[1], e[2]))
                addr[e[1]] = arena.allocate(size)
                live[e[1]] = (addr[e[1]], size)
                assert_disjoint(live.values())
                if arena.owns(addr[e[1]]):
                    assert addr[e[1]] - arena.base == slots[e[1]][0] and size == slots[e[1]][1]
            else:
                arena.free(addr.pop(e[1]))
                live.pop(e[1])
        s = arena.stats()
        assert s["requests"] == 80 and s["hits"] + s["misses"] == 80
        assert s["misses"] >= len(sizes)                 # every resized request missed
        assert s["live_arena_blocks"] == 0 and s["live_fallback_blocks"] == 0


def test_plan_that_does_not_match_at_all_falls_back_for_everything():
    arena = ArenaReplay(ArenaPlan(1 << 16, [[(0, 100)] * 5, [(4096, 8)]]))
    arena.begin_phase(1)
    ptrs = [arena.allocate(3000) for _ in range(5)]
    assert not any(arena.owns(p) for p in ptrs) and len(set(ptrs)) == 5
    assert arena.stats()["misses"] == 5
    for p in ptrs:
        arena.free(p)
    arena.end_phase()
    p = arena.allocate(100)                              # outside a phase: a miss
    assert not arena.owns(p)
    arena.free(p)


def test_two_phases_and_bad_plans():
    arena = ArenaReplay(ArenaPlan(1024, [[(0, 512)], [(512, 512)]]))
    arena.begin_phase(1)
    assert arena.allocate(512) == arena.base + 512
    with pytest.raises(MemoError, match=r"^memo\.arena: phase 2 does not exist"):
        arena.begin_phase(2)
    with pytest.raises(MemoError, match=r"outside the 1000 B arena; re-plan"):
        ArenaPlan(1000, [[(900, 200)]])
    with pytest.raises(ValueError, match="outside the 100 B arena"):    # the C++ check, for direct callers
        _ext._module.ArenaReplay(100, [[(0, 200)]])


def test_no_csrc_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(_ext.DISABLE_ENV, "1")
    with pytest.raises(MemoError, match=r"^memo\.arena: the planned arena needs memo\._C"):
        ArenaReplay(ArenaPlan(64, [[(0, 64)]]))
