"""swap_ratio="auto" and the host pool, decided from injected measurements.

The model, the runtime, the pool and the step timer run for real on the CPU; only the times the
timer reports are replaced, by those of a ``Machine`` (what a GPU would measure). See
NOTE [ Auto swap ratio ] in memo/auto_ratio.py and NOTE [ Host pool sizing ] in memo/runtime.py.
"""

import pytest

import memo
from memo import MemoConfig
from memo.swap.timing import StepTimer
from memo.wrap import runtime_of
from models import batch, build, run_step

SEQ = 128
MICRO = [batch(1, SEQ)]


def _tokens(ratio: float) -> float:
    """``ratio`` as the runtime runs it: a whole number of tokens (floor)."""
    return int(ratio * SEQ) / SEQ


class Machine:
    """Step, layer and copy times at each swap ratio, as a GPU would report them.

    Per swapped layer: forward ``t_f``, backward ``t_b``, recomputing all tokens ``recompute_all``;
    copies run at ``bandwidth`` and hide up to ``hide_at``. A step costs ``base`` plus, per swapped
    layer, the recompute and the exposed copies, plus ``jump_s`` at ratios above ``jump_above``
    (what the model does not know: copies that slow compute down).
    """

    def __init__(self, *, hide_at=0.503, t_f=0.010, t_b=0.020, recompute_all=0.008, base=0.100,
                 jump_above=None, jump_s=0.0, bandwidth=None):
        self.hide_at, self.t_f, self.t_b, self.recompute_all, self.base = hide_at, t_f, t_b, recompute_all, base
        self.jump_above, self.jump_s, self.bandwidth = jump_above, jump_s, bandwidth

    def bind(self, rt):
        self.rt = rt
        return self

    def copy_bandwidth(self):
        sizes = self.rt.sizes
        if self.bandwidth is None:
            self.bandwidth = (sizes["fixed_bytes_per_layer"] + self.hide_at * sizes["other_bytes_per_layer"]) / self.t_f
        return self.bandwidth

    def step_s(self, r):
        sizes, b = self.rt.sizes, self.copy_bandwidth()
        copy = (sizes["fixed_bytes_per_layer"] + r * sizes["other_bytes_per_layer"]) / b
        recompute = self.recompute_all * (1 - r)
        per_layer = recompute + max(0.0, copy - self.t_f) + max(0.0, copy - self.t_b - recompute)
        jump = self.jump_s if self.jump_above is not None and r > self.jump_above else 0.0
        return self.base + sizes["swapped_layers"] * per_layer + jump

    def measure(self, t):
        """Replace the times of a resolved step; its ratio and copy bytes stay the real ones."""
        r = t.ratio
        t.forward_s = {i: self.t_f for i in t.forward_s}
        t.backward_s = {i: self.t_b for i in t.backward_s}
        t.recompute_s = {i: self.recompute_all * (1 - r) for i in t.recompute_s}
        t.d2h_s, t.h2d_s = t.d2h_bytes / self.copy_bandwidth(), t.h2d_bytes / self.copy_bandwidth()
        if t.step_s is not None:
            t.step_s = self.step_s(r)


class MachineTimer(StepTimer):
    """The real step timer, reporting the machine's times for the steps it resolves."""

    def __init__(self, streams, machine):
        super().__init__(streams)
        self.machine = machine

    def resolve(self, block):
        steps = super().resolve(block)
        for t in steps:
            self.machine.measure(t)
        return steps


def _auto_model(machine, **kw):
    model = build("llama")
    memo.wrap(model, MemoConfig(swap_ratio="auto", loss_chunk_size=None, **{"host_memory_budget": "1GiB", **kw}))
    rt = runtime_of(model)
    machine.bind(rt)
    rt.timer_factory = lambda streams: MachineTimer(streams, machine)
    return model, rt


def _step(model):
    """One training step; returns its stats (a stats read resolves the step's times)."""
    run_step(model, MICRO)
    return memo.stats(model)


def test_auto_swaps_where_copies_hide_re_solves_once_and_sizes_the_pool_for_the_ratio():
    machine = Machine()
    model, rt = _auto_model(machine)
    warm = _step(model)
    assert warm.swap_ratio == 0.0 and rt.auto.phase.value == "measure"
    need_at_0 = warm.host_pool["high_water_bytes"]              # what one step at ratio 0 holds
    assert warm.host_pool["capacity_bytes"] == need_at_0       # not the 1 GiB budget
    _step(model)                                               # first measured step: solve
    st = _step(model)                                          # steady step at the chosen ratio
    chosen = _tokens(0.5)
    assert [d["phase"] for d in st.swap_ratio_decisions] == ["warm-up", "measure", "steady"]
    assert [d["ratio"] for d in st.swap_ratio_decisions] == [0.0, 0.0, chosen]
    assert st.swap_ratio == chosen and rt.auto.settled
    assert sum("solve" in d for d in st.swap_ratio_decisions) == 2           # solved, then re-solved once
    steady = st.swap_ratio_decisions[2]
    assert steady["predicted_s"] == pytest.approx(steady["step_s"], rel=0.10)
    assert "within" in steady["decision"] and st.swap_ratio_reason.startswith("auto (settled)")
    after = _step(model)
    assert len(after.swap_ratio_decisions) == 3 and after.swap_ratio == chosen   # no further measuring
    pool = after.host_pool
    assert pool["capacity_bytes"] == pool["high_water_bytes"] > need_at_0        # grown to the need, exactly
    assert pool["capacities"] == [need_at_0, pool["capacity_bytes"]]
    assert pool["pin_s"] > 0 and after.timing_source == "host clock"
    assert after.layers[0].forward_s == machine.t_f and after.step["d2h_s"] > 0


def test_auto_measures_the_neighbours_when_the_prediction_is_off_and_keeps_the_fastest():
    # Above ratio 0.45 every step is 40 ms slower than the model says: 0.5 is measured slow.
    machine = Machine(jump_above=0.45, jump_s=0.040)
    model, rt = _auto_model(machine)
    for _ in range(5):   # warm-up, measure, steady at 0.5, then its neighbours 0.4 and 0.6
        st = _step(model)
    low, high = _tokens(0.5 - 0.1), _tokens(0.5 + 0.1)
    assert [d["phase"] for d in st.swap_ratio_decisions] == ["warm-up", "measure", "steady", "neighbours",
                                                             "neighbours"]
    assert [d["ratio"] for d in st.swap_ratio_decisions] == [0.0, 0.0, _tokens(0.5), low, high]
    steady = st.swap_ratio_decisions[2]
    assert abs(steady["step_s"] - steady["predicted_s"]) > 0.10 * steady["step_s"]
    measured = {d["ratio"]: d["step_s"] for d in st.swap_ratio_decisions[1:]}
    assert min(measured, key=measured.get) == low
    assert rt.auto.settled and rt.auto.ratio == low and "fastest measured" in st.swap_ratio_reason
    final = _step(model)
    assert final.swap_ratio == low
    caps = final.host_pool["capacities"]
    assert caps[0] < caps[1] < caps[2]                  # grown for 0.5, then for 0.6 (never the budget)
    assert caps[-1] == final.host_pool["capacity_bytes"] == final.host_pool["high_water_bytes"] < caps[2]


def test_auto_warns_and_recomputes_when_copies_cannot_hide():
    machine = Machine(bandwidth=1e3)   # 1 kB/s
    model, rt = _auto_model(machine)
    _step(model)
    with pytest.warns(UserWarning, match="cannot hide behind compute.*swap_ratio=0"):
        _step(model)
    st = _step(model)
    assert st.swap_ratio == 0.0 and rt.auto.settled and st.recomputed_bytes > 0


def test_auto_ratio_limited_by_host_budget():
    probe = build("llama")
    memo.wrap(probe, MemoConfig(swap_ratio=1.0, loss_chunk_size=None, host_memory_budget="1GiB"))
    run_step(probe, MICRO)
    sizes = runtime_of(probe).sizes
    budget = int(sizes["fixed_bytes_per_layer"] * 2 + sizes["other_bytes_per_layer"] * 2 * 0.5) + 4096
    model, rt = _auto_model(Machine(bandwidth=1e15), host_memory_budget=budget)   # every copy hides
    for _ in range(3):
        st = _step(model)
    assert rt.auto.settled and 0.45 < st.swap_ratio < 0.55, st.swap_ratio
    assert "host memory" in st.swap_ratio_decisions[1]["decision"]
    assert st.host_pool["reserved_bytes"] <= budget


def test_the_pool_grows_only_when_no_swapped_record_lives_in_it():
    """NOTE [ Host pool sizing ] rule 2: a ratio change waits while a graph holds host blocks."""
    model, rt = _auto_model(Machine())
    _step(model)
    pool = rt.pool
    loss = model(input_ids=MICRO[0][0], labels=MICRO[0][2]).loss     # its swapped activations live in the pool
    assert pool.used_bytes > 0
    rt._switch_ratio(0.75)
    assert rt.pool is pool and rt.alpha == 0.0 and "waiting" in rt.alpha_reason
    loss.backward()
    rt._switch_ratio(0.75)
    assert rt.pool is not pool and rt.alpha == 0.75 and rt.pool.capacity > pool.capacity


def test_a_real_cpu_step_fills_the_timing_stats():
    model = build("llama")
    memo.wrap(model, MemoConfig(swap_ratio=0.5, loss_chunk_size=None, host_memory_budget="1GiB"))
    run_step(model, MICRO)
    st = memo.stats(model)
    assert st.timing_source == "host clock"
    for layer in st.layers:
        assert layer.forward_s > 0
        if not layer.kept:
            assert layer.backward_s > 0 and layer.recompute_s > 0
    assert st.step["d2h_s"] > 0 and st.step["h2d_s"] > 0
    assert st.step["step_s"] > st.step["forward_s"] + st.step["backward_s"] + st.step["recompute_s"]
    assert st.host_pool["pin_s"] > 0 and st.host_pool["capacities"] == [st.host_pool["capacity_bytes"]]
    assert st.to_dict()["timing_source"] == "host clock"
