"""Replay of a planned arena (csrc/arena.h, NOTE [ Arena replay ]) on CPU, from recorded
request sequences: hits, misses, out-of-order frees, plans that do not match, rounding,
unplanned slots, suspension, and stream-ordered frees (NOTE [ Stream-ordered arena frees ])
through the integer-stream stand-in."""

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
    arena = ArenaReplay(ArenaPlan(peak, [slots], alignment=1))
    for _ in range(3):                                   # every layer reuses the plan
        arena.begin_phase(0)
        seen = replay(arena, events)
        assert [seen[i][0] - arena.base for i in range(60)] == [o for o, _ in slots]
    s = arena.stats()
    assert (s["requests"], s["hits"], s["misses"], s["hit_bytes"]) == (180, 180, 0, 3 * sum(z for _, z in slots))
    assert s["live_arena_blocks"] == 0 and s["live_fallback_blocks"] == 0


def test_an_unplanned_request_shifts_nothing_and_a_skipped_slot_is_passed_over():
    # NOTE [ Arena replay ] rule 2: an insertion keeps the counter; a match further on skips.
    plan = ArenaPlan(8192, [[(0, 1024), (1024, 2048), (3072, 512), (4096, 1024)]], alignment=1)
    arena = ArenaReplay(plan)
    arena.begin_phase(0)
    a = arena.allocate(1024)
    w = arena.allocate(96)                               # a workspace the plan never saw: miss
    b = arena.allocate(2048)                             # still slot 1
    c = arena.allocate(1024)                             # slot 2 (512) was not allocated: slot 3
    assert (a, b, c) == (arena.base, arena.base + 1024, arena.base + 4096) and not arena.owns(w)
    s = arena.stats()
    assert (s["hits"], s["misses"], s["skipped"]) == (3, 1, 1)
    for p in (w, b, a, c):
        arena.free(p)
    d = arena.allocate(512)                              # past the plan's end: miss
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
        arena = ArenaReplay(ArenaPlan(peak, [slots], alignment=1))
        # Perturb: change some sizes, swap neighbouring frees, so the plan only partly matches.
        sizes = {i: slots[i][1] + rng.choice([-1, 1, 256]) for i in rng.sample(range(80), 10)}
        planned = set(slots)
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
                if arena.owns(addr[e[1]]):                # a hit is at a planned slot of its size
                    assert (addr[e[1]] - arena.base, size) in planned
            else:
                arena.free(addr.pop(e[1]))
                live.pop(e[1])
        s = arena.stats()
        assert s["requests"] == 80 and s["hits"] + s["misses"] == 80
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
    with pytest.raises(MemoError, match=r"alignment 384 is not a power of two"):
        ArenaPlan(1024, [], alignment=384)
    with pytest.raises(ValueError, match="alignment 3 is not a power of two"):
        _ext._module.ArenaReplay(100, [], 3)


def test_no_csrc_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(_ext.DISABLE_ENV, "1")
    with pytest.raises(MemoError, match=r"^memo\.arena: the planned arena needs memo\._C"):
        ArenaReplay(ArenaPlan(64, [[(0, 64)]]))


def test_requests_are_rounded_to_the_alignment_before_they_are_matched():
    # NOTE [ Arena replay ] rule 3: the plan holds 512-rounded sizes; PyTorch asks for nbytes.
    arena = ArenaReplay(ArenaPlan(4096, [[(0, 1024), (1024, 512), (1536, 512)]]))
    arena.begin_phase(0)
    a = arena.allocate(1000)                             # rounds to 1024: hit
    b = arena.allocate(1)                                # rounds to 512: hit
    c = arena.allocate(513)                              # rounds to 1024, planned 512: miss
    assert (a, b) == (arena.base, arena.base + 1024) and not arena.owns(c)
    s = arena.stats()
    assert (s["hits"], s["misses"], s["hit_bytes"], s["fallback_bytes"]) == (2, 1, 1536, 513)
    assert s["live_arena_bytes"] == 1536 and s["peak_arena_bytes"] == 1536
    for p in (a, b, c):
        arena.free(p)
    assert arena.stats()["live_arena_bytes"] == 0


def test_unplanned_slots_and_suspension_keep_the_counter_in_step():
    # rule 1: slot 1 is known but left to the fallback; rule 7: suspended requests take no index.
    arena = ArenaReplay(ArenaPlan(2048, [[(0, 512), (None, 4096), (512, 512)]]))
    arena.begin_phase(0)
    a = arena.allocate(512)
    arena.suspend()
    arena.suspend()                                      # nests
    off = [arena.allocate(512), arena.allocate(100)]
    arena.resume()
    off.append(arena.allocate(512))
    arena.resume()
    u = arena.allocate(4096)                             # slot 1, unplanned
    c = arena.allocate(512)                              # slot 2: still a hit at its offset
    assert a == arena.base and c == arena.base + 512 and not any(arena.owns(p) for p in off + [u])
    s = arena.stats()
    assert (s["hits"], s["misses"], s["unplanned"], s["outside"]) == (2, 0, 1, 3)
    assert s["fallback_bytes"] == 512 + 100 + 512 + 4096
    with pytest.raises(RuntimeError, match="resume\\(\\) without suspend"):
        arena.resume()
    for p in [a, u, c] + off:
        arena.free(p)


def test_a_span_freed_on_one_stream_is_reused_on_another_only_after_its_event():
    # NOTE [ Stream-ordered arena frees ]: x at [0, 1024) freed on stream 1; the plan reuses the
    # span for y on stream 2, then z on stream 3.
    plan = ArenaPlan(2048, [[(0, 1024), (0, 1024), (512, 1024), (0, 512)]])
    arena = ArenaReplay(plan)
    arena.begin_phase(0)
    x = arena.allocate(1024, stream=1)
    arena.free(x, stream=1)                              # event 1 on stream 1, not complete
    assert arena.pending_frees == 1
    y = arena.allocate(1024, stream=2)                   # hit, after stream 2 waits for it (rule 3)
    assert y == arena.base and arena.waits() == [(2, 1, 1)]
    arena.free(y, stream=2)                              # event 1 on stream 2
    z = arena.allocate(1024, stream=3)                   # [512, 1536) overlaps both pending frees
    assert z == arena.base + 512 and sorted(arena.waits()[1:]) == [(3, 1, 1), (3, 2, 1)]
    assert arena.stats()["stream_waits"] == 2
    arena.free(z, stream=3)
    arena.complete(1)
    arena.complete(2)
    w = arena.allocate(512, stream=3)                    # same stream as z's free; 1 and 2 are done
    assert w == arena.base and len(arena.waits()) == 3 and arena.stats()["stream_waits"] == 2
    assert arena.pending_frees == 1                      # z's free (stream 3) is still pending
    arena.free(w, stream=3)


def test_same_stream_reuse_needs_no_event_and_completed_frees_are_dropped():
    arena = ArenaReplay(ArenaPlan(1024, [[(0, 1024)] * 3]))
    arena.begin_phase(0)
    for stream in (5, 5):                                # rule 2: same stream, in order
        arena.free(arena.allocate(1024, stream=stream), stream=stream)
    assert arena.waits() == [] and arena.pending_frees == 2
    arena.complete(5)
    p = arena.allocate(1024, stream=6)                   # another stream, events complete: no wait
    assert p == arena.base and arena.waits() == [] and arena.pending_frees == 0
    arena.free(p, stream=6)


def test_the_pending_list_is_swept_when_it_doubles_not_at_every_free():
    # NOTE [ Stream-ordered arena frees ] rule 4: the host runs ahead of the device, so frees
    # pile up with events not yet complete; a sweep queries them all, and only a list that
    # doubled since the last sweep earns another (kPrunePending = 64, then 2x what was left).
    n = 300
    arena = ArenaReplay(ArenaPlan(n * 512, [[(i * 512, 512) for i in range(n)]]))
    arena.begin_phase(0)
    blocks = [arena.allocate(512, stream=1) for _ in range(n)]   # n distinct spans, all hits
    for b in blocks[:100]:
        arena.free(b, stream=1)         # swept at 65 (nothing complete): the next mark is 130
    arena.complete(1)                   # the device caught up: every pending event is complete
    arena.free(blocks[100], stream=1)
    assert arena.pending_frees == 101   # no sweep below the mark, though all could be released
    for b in blocks[101:131]:
        arena.free(b, stream=1)         # the 131st pending free sweeps: the completed 100 go
    assert arena.pending_frees == 31
    for b in blocks[131:]:
        arena.free(b, stream=1)
