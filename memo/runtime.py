"""MemoRuntime: memo's state for one wrapped model (pool, engine, traces, swap ratio, stats)."""

from __future__ import annotations

import logging
import warnings
import weakref
from typing import Callable, Optional

import torch

from memo import ops
from memo.auto_ratio import AutoRatio
from memo.config import MemoConfig
from memo.errors import MemoError
from memo.executor import LayerState, plan_layer_records
from memo.planned_memory import planned_layer
from memo.planner.units import format_bytes
from memo.stats import LayerStats, MemoStats
from memo.swap.engine import SwapEngine
from memo.swap.host_pool import ALIGNMENT, HostPool
from memo.swap.timing import StepTimer, StepTimes
from memo.trace import AttentionKernelMode, Classifier, LayerCall, LayerTrace, SavedClass, storage_key, trace_layer

logger = logging.getLogger("memo")


# NOTE [ Host pool sizing ]
#
# 1. The host pool holds what the swap ratio in use needs, never the whole budget up front. With
#    ``swap_ratio="auto"`` that is the measuring ratio's need first (NOTE [ Auto swap ratio ] in
#    memo/auto_ratio.py); the pool grows when a later step needs more, and once auto settles it is
#    cut to the settled ratio's need.
# 2. The pool is replaced only at a step boundary (the first layer's forward of a pass), after the
#    streams are synchronised (no copy still touches it) and only when no swapped record lives in
#    it. A ratio change that finds records still there (a graph kept from an earlier forward)
#    waits for the next boundary; new, longer inputs with records still there are refused.
# 3. The host seconds spent reserving and page-locking pools are reported (``host_pool["pin_s"]``).

# NOTE [ Several forwards before one backward ]
#
# 1. Gradient accumulation by summing micro-batch losses (``(model(a).loss + model(b).loss).backward()``)
#    keeps every forward's swapped activations alive until the one backward. A forward that starts
#    while the pool still holds records of an earlier forward (a step boundary of rule 2 with a live
#    graph) is served from another pool: an idle one held already, or a new one sized as the last
#    forward's (a forward of other shapes then gets one sized for its own, as any first forward of
#    new shapes). Records stay in the pool they were allocated from and are freed to it
#    (``HostBlock.pool``), so each graph's backward is exactly what it would be alone.
# 2. All pools held together stay within ``host_memory_budget``: pools without records are closed
#    before a new one is made, and a forward whose pool would cross the budget is refused before
#    it computes anything, saying how many forwards' activations are waiting, what one more needs,
#    and the two fixes: backward after each micro-batch (``loss_i.backward()``, which accumulates
#    the same gradient sum in ``.grad``) or a budget for all the forwards.
# 3. The same holds for a graph kept by accident (an output from the last step still referenced
#    while the next forward runs); its pool is reused once its records are freed.
# 4. ``memo.stats(model).host_pool`` sums the pools held (``pools``: how many).


def _aligned(n: int) -> int:
    return 0 if n == 0 else (n + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


class MemoRuntime:
    def __init__(self, config: MemoConfig, layers: list[torch.nn.Module]) -> None:
        self.config = config
        self.layers = layers
        n = len(layers)
        self.swapped = set(range(max(n - config.keep_last_layers, 0)))
        # NOTE [ Layer policies ]: "memo" for every swapped layer unless a plan or the host budget says "input".
        self.policies: dict[int, str] = {i: "memo" for i in self.swapped}
        self.plan_policies: Optional[dict[int, str]] = None   # a plan's mix, applied as given
        self.tiled: dict = {}          # layer index -> memo.tiling.TiledLayer (NOTE [ Token tiling ])
        self.tile_setting = config.tile_tokens
        self.originals: dict[int, Callable] = {}
        self.traces: dict[tuple, LayerTrace] = {}
        self.prepared_key: Optional[tuple] = None
        self.pool: Optional[HostPool] = None
        self.engine: Optional[SwapEngine] = None
        self.alpha: Optional[float] = None if config.swap_ratio == "auto" else float(config.swap_ratio)
        self.alpha_reason = "not chosen yet (no forward pass)" if config.swap_ratio == "auto" else "set by the user"
        self.auto: Optional[AutoRatio] = None
        self.sizes: dict = {}
        self.pass_states: list[weakref.ref] = []
        self.layer_stats = {i: LayerStats(index=i, kept=i not in self.swapped,
                                          policy="memo" if i in self.swapped else "kept") for i in range(n)}
        self.step_times: dict = {}
        self.copies_at_step = ops.copy_counters()   # counters at the last step boundary (MemoStats.copies)
        # Makes the engine's StepTimer; tests hand in one that reports chosen measurements.
        self.timer_factory: Callable = StepTimer
        self.timing_source: Optional[str] = None
        self.pin_s = 0.0                      # NOTE [ Host pool sizing ] rule 3
        self.pool_sizes: list[int] = []       # capacity of every pool made, in order
        self.pools: list[HostPool] = []       # every pool held now, self.pool among them (NOTE [ Several forwards
                                              # before one backward ])
        self.current_traces: list[LayerTrace] = []
        self.current_device: Optional[torch.device] = None
        self.step_end_state: Optional[weakref.ref] = None   # its backward ends the step's timing
        self._cache_warned = False
        self._warned_policies: Optional[tuple] = None
        self.policy_note = ""   # why some layers run "input" (NOTE [ Layer policies ] rule 2), for memo.stats
        self.plan: Optional[dict] = None
        self.shared_args: dict[int, int] = {}
        self.sp = None                 # memo.parallel.SequenceParallel when sequence parallelism is on
        self.sp_binding = None
        self.original_attn_implementation: Optional[str] = None
        self.planned_memory = None     # memo.planned_memory.PlannedMemory, made at the first swapped forward

    # --- the wrapped layer forward --------------------------------------------------------
    def run_layer(self, index: int, layer: torch.nn.Module, hidden_states: torch.Tensor, args: tuple,
                  kwargs: dict):
        original = self.originals[index]
        saves = torch.is_grad_enabled() and isinstance(hidden_states, torch.Tensor) and (
            hidden_states.requires_grad or any(p.requires_grad for p in layer.parameters()))
        if not saves:
            return original(hidden_states, *args, **kwargs)   # nothing is saved for backward
        cache_keys = [k for k in ("past_key_values", "cache") if kwargs.get(k) is not None]   # (renamed in 5.x)
        if cache_keys:
            if not self._cache_warned:
                warnings.warn("memo: a KV cache was passed to a wrapped layer during training; memo ignores it "
                              "(pass use_cache=False to silence this)", stacklevel=3)
                self._cache_warned = True
            kwargs = dict(kwargs, use_cache=False, **{k: None for k in cache_keys})
        first = index == min(self.layers_in_pass())
        if first:
            self._start_pass()
        if self.engine is not None:
            self.engine.layer_starting(index % 2)
        if index not in self.swapped:
            return self._run_kept(index, layer, original, hidden_states, args, kwargs, first)
        call = LayerCall(hidden_states, args, kwargs)
        trace = self._prepare(index, layer, original, call)
        state = LayerState(self, index, layer, original, call, trace, self.alpha, self.policies[index])
        if index == min(self.swapped):
            self.step_end_state = weakref.ref(state)
        self._mark_forward("start", index, first)
        with torch.autograd.graph.saved_tensors_hooks(state.pack, state.unpack), state.kernel_mode, \
                planned_layer(self, hidden_states) as outputs:   # NOTE [ Planned memory at run time ] rule 3
            out = original(hidden_states, *args, **kwargs)
            outputs.append(out)
        self._mark_forward("stop", index, first)
        state.finish_forward()
        self.pass_states.append(weakref.ref(state))
        for t in call.shared_tensors():   # kept for recomputation, once per model (not per layer)
            self.shared_args[storage_key(t)] = t.untyped_storage().nbytes()
        st = self.layer_stats[index]
        st.activation_bytes = state.activation_bytes()
        st.swapped_bytes = state.host_bytes()
        st.recomputed_bytes = state.recomputed_bytes()
        st.resident_bytes = 0
        st.policy = state.policy
        st.tile_tokens = self._tile_of(index)
        return out

    def _tile_of(self, index: int) -> Optional[int]:
        """Tokens per MLP tile in layer ``index``'s last forward (None: untiled)."""
        tiled = self.tiled.get(index)
        return None if tiled is None else tiled.tile

    def layers_in_pass(self) -> range:
        return range(len(self.layers))

    def _mark_forward(self, which: str, index: int, first: bool) -> None:
        """Timing marks around a layer's forward; the first layer's start also starts the step
        (after the pool was sized: pinning is not step time). See NOTE [ Step timing ]."""
        if self.engine is None:
            return
        timer, compute = self.engine.timer, self.engine.streams.compute
        if which == "start":
            if first:
                timer.start_step(self.alpha, compute)
            timer.start("forward", index, compute)
        else:
            timer.stop("forward", index, compute)

    def _run_kept(self, index, layer, original, hidden_states, args, kwargs, first):
        """Kept layers run as they are; memo only counts what they keep resident."""
        classify = Classifier(layer, LayerCall(hidden_states, args, kwargs), AttentionKernelMode())
        seen: dict[int, int] = {}

        def count(t):
            if classify(t) not in (SavedClass.PARAM, SavedClass.SHARED):
                seen[storage_key(t)] = t.untyped_storage().nbytes()
            return t.detach()   # See NOTE [ Pack returns a detached tensor ] in memo/trace.py

        self._mark_forward("start", index, first)
        with torch.autograd.graph.saved_tensors_hooks(count, lambda t: t):
            out = original(hidden_states, *args, **kwargs)
        self._mark_forward("stop", index, first)
        st = self.layer_stats[index]
        st.activation_bytes = st.resident_bytes = sum(seen.values())
        st.tile_tokens = self._tile_of(index)
        return out

    # --- passes -----------------------------------------------------------------------------
    def _start_pass(self) -> None:
        """A step boundary: close the last step's marks, let auto decide, apply its ratio."""
        self.pass_states = [r for r in self.pass_states if r() is not None and r().phase.value != "done"]
        self.shared_args = {}
        self.copies_at_step = ops.copy_counters()
        if self.engine is None:
            return
        self.engine.timer.close_step()
        # Auto waits for the step it needs at this boundary; otherwise only finished marks are read.
        self._take_times(block=self.auto is not None and not self.auto.settled)
        if self.pool.used_bytes:   # an earlier forward's graph still waits for its backward
            self._pool_for_another_forward()
        if self.auto is not None:
            self._switch_ratio(self.auto.ratio)

    def _pool_for_another_forward(self) -> None:
        """NOTE [ Several forwards before one backward ] rules 1 and 2: serve this forward from a pool
        without records, sized as the last forward's."""
        need = max(self._host_need(self.current_traces, self.alpha, self.current_device), ALIGNMENT)
        idle = next((p for p in self.pools if p.used_bytes == 0 and p.capacity >= need), None)
        if idle is not None:
            self.pool = idle
            self.engine.serve_from(idle)
            idle.reserve()
        else:
            self._new_pool(need, self.pool.pin, self.current_device)

    def _take_times(self, block: bool) -> None:
        """Resolved steps into memo.stats and auto's protocol (NOTE [ Step timing ] rule 2)."""
        for times in self.engine.timer.resolve(block):
            self._record_times(times)
            if self.auto is not None and not self.auto.settled:
                had_warning = self.auto.warning is not None
                self.auto.observe(times)
                self.alpha_reason = self.auto.reason
                logger.info("memo: %s", self.auto.reason)
                if self.auto.warning is not None and not had_warning:
                    warnings.warn(f"memo: {self.auto.warning}", stacklevel=4)

    def _record_times(self, times: StepTimes) -> None:
        self.timing_source = times.source
        for i, st in self.layer_stats.items():
            st.forward_s = times.forward_s.get(i, st.forward_s)
            st.backward_s = times.backward_s.get(i, st.backward_s)
            st.recompute_s = times.recompute_s.get(i, st.recompute_s)
        self.step_times = {"step_s": times.step_s, "forward_s": sum(times.forward_s.values()),
                           "backward_s": sum(times.backward_s.values()),
                           "recompute_s": sum(times.recompute_s.values()), "d2h_s": times.d2h_s,
                           "h2d_s": times.h2d_s}
        if times.step_s is None:
            del self.step_times["step_s"]

    def end_forward(self) -> None:
        """The decoder stack returned: drain the in-flight slots."""
        if self.engine is not None:
            self.engine.drain()

    def on_layer_restored(self, state: LayerState) -> None:
        """Prefetch the layer whose backward comes next (the previous one in forward order)."""
        timer, compute = self.engine.timer, self.engine.streams.compute
        timer.stop("recompute", state.index, compute)   # started by SwapEngine.wait_restored
        timer.start("backward", state.index, compute)
        states = [r() for r in self.pass_states]
        if state in states:
            i = states.index(state)
            for prev in reversed(states[:i]):
                if prev is not None and prev.phase.value == "swapped" and not prev.prefetched:
                    self.engine.prefetch(prev)
                    break

    def on_layer_done(self, state: LayerState) -> None:
        timer, compute = self.engine.timer, self.engine.streams.compute
        timer.stop("backward", state.index, compute)
        if self.step_end_state is not None and self.step_end_state() is state:   # this step's last swapped backward
            timer.stop("step", 0, compute)

    # --- sizing, budget and the swap ratio ------------------------------------------------------
    def _trace_key(self, layer: torch.nn.Module, call: LayerCall) -> tuple:
        mask = call.kwargs.get("attention_mask")
        return (type(layer).__name__, getattr(layer, "attention_type", None), tuple(call.hidden_states.shape),
                call.hidden_states.dtype, str(call.hidden_states.device), call.hidden_states.requires_grad,
                None if mask is None else (tuple(mask.shape), mask.dtype),
                # packed documents run memo's attention op, not SDPA's kernel (NOTE [ Packed documents ])
                getattr(self.sp_binding, "doc", None) is not None)

    def _prepare(self, index: int, layer: torch.nn.Module, original: Callable, call: LayerCall) -> LayerTrace:
        key = self._trace_key(layer, call)
        if key not in self.traces:
            self.traces[key] = trace_layer(original, layer, call)
        shapes = key[2:5] + key[6:]   # everything but the layer kind and whether the input requires grad
        if self.prepared_key != shapes:
            if self.plan is not None:
                self.check_plan(call)
            self._size_pool(call)
            self.prepared_key = shapes
        return self.traces[key]

    def check_plan(self, call: LayerCall) -> None:
        """Refuse a plan made for another sequence length, micro-batch or dtype (before any compute)."""
        from memo.planner.planfile import PlanMismatch, check_plan_matches
        try:
            sp = 1 if self.sp is None else self.sp.size
            check_plan_matches(self.plan, model=self.plan["model"], seq_len=call.seq * sp, micro_batch=call.batch,
                               dtype=str(call.hidden_states.dtype), sp=sp,
                               sp_backend=None if self.sp is None else self.sp.backend)
        except PlanMismatch as e:
            raise MemoError(str(e)) from e

    def _layer_traces(self, call: LayerCall) -> list[LayerTrace]:
        """Trace of every swapped layer for this call's shapes (one trace per distinct layer kind)."""
        out = []
        # Layers after the first get their input from a layer with parameters: it requires grad.
        later = LayerCall(call.hidden_states.detach().requires_grad_(True), call.args, call.kwargs)
        for i in sorted(self.swapped):
            layer = self.layers[i]
            layer_call = call if i == 0 else later
            key = self._trace_key(layer, layer_call)
            if key not in self.traces:
                self.traces[key] = trace_layer(self.originals[i], layer, layer_call)
            out.append(self.traces[key])
        return out

    def _layer_needs(self, traces: list[LayerTrace], alpha: float, device: torch.device,
                     policies: Optional[dict[int, str]] = None) -> list[int]:
        """Host bytes of each swapped layer (``traces`` in the order of ``sorted(self.swapped)``)."""
        host_dtype = self.config.offload_torch_dtype
        policies = self.policies if policies is None else policies
        return [sum(_aligned(r.host_bytes()) for r in plan_layer_records(t, alpha, device, host_dtype, policies[i]))
                for t, i in zip(traces, sorted(self.swapped))]

    def _host_need(self, traces: list[LayerTrace], alpha: float, device: torch.device,
                   policies: Optional[dict[int, str]] = None) -> int:
        return sum(self._layer_needs(traces, alpha, device, policies))

    def _choose_policies(self, traces: list[LayerTrace], device: torch.device) -> None:
        """NOTE [ Layer policies ] rules 2 and 3: the plan's mix, else "memo" everywhere, else (auto, when the
        host budget cannot hold inputs and attention outputs) the fewest "input" layers that fit."""
        swapped = sorted(self.swapped)
        if self.plan_policies is not None:
            self.policies = dict(self.plan_policies)
            return
        self.policies = {i: "memo" for i in swapped}
        budget = self.config.host_budget_bytes
        if not self._auto_enabled() or self._host_need(traces, 0.0, device) <= budget:
            return
        all_input = {i: "input" for i in swapped}
        need_input = self._host_need(traces, 0.0, device, all_input)
        if need_input > budget:
            raise MemoError(
                f"memo.wrap: host budget {format_bytes(budget)} cannot hold even the layer inputs of {len(swapped)} "
                f"swapped layers, which need {format_bytes(need_input)} with every layer recomputing its attention; "
                f"set MemoConfig(host_memory_budget='{_ceil_gib(need_input)}GiB') or more, or raise keep_last_layers")
        for k in range(1, len(swapped) + 1):   # the first k swapped layers recompute attention
            mix = {i: ("input" if j < k else "memo") for j, i in enumerate(swapped)}
            if self._host_need(traces, 0.0, device, mix) <= budget:
                self.policies = mix
                return

    def _size_pool(self, call: LayerCall) -> None:
        """Check the host budget, choose the layer policies and size the pool before the first forward of
        these shapes."""
        device = call.hidden_states.device
        traces = self._layer_traces(call)
        budget = self.config.host_budget_bytes
        self._choose_policies(traces, device)
        swapped = sorted(self.swapped)
        memo_layers = [i for i in swapped if self.policies[i] == "memo"]
        need_full = self._host_need(traces, 1.0, device)
        need_min = self._host_need(traces, 0.0, device)
        input_need = sum(self._layer_needs(traces, 0.0, device)[j] for j, i in enumerate(swapped)
                         if self.policies[i] == "input")
        n, m = len(traces), len(memo_layers)
        self.sizes = {"fixed_bytes_per_layer": (need_min - input_need) / max(m, 1),
                      "other_bytes_per_layer": (need_full - need_min) / max(m, 1), "swapped_layers": n,
                      "input_layers": n - m}
        self.current_traces, self.current_device = traces, device
        if self._auto_enabled():
            fallback = "" if m == n else (f"; {n - m} of {n} swapped layers keep only their input on the host and "
                                          f"recompute attention (the host budget {format_bytes(budget)} cannot hold "
                                          f"every layer's input and attention output)")
            self.policy_note = fallback
            if fallback and self._warned_policies != (n - m, n):
                self._warned_policies = (n - m, n)
                warnings.warn(f"memo: {fallback[2:]}; steps are slower by one attention forward per such layer. "
                              f"Raise host_memory_budget to avoid it", stacklevel=4)
            if m == 0:
                self.auto = None
                self.alpha, self.alpha_reason = 0.0, "auto: no layer keeps its attention output"
            else:
                memory_bound = 1.0 if need_full <= budget else (budget - need_min) / (need_full - need_min)
                if self.auto is None or not self.auto.settled:   # (again) for these shapes: NOTE [ Auto swap ratio ]
                    seq = call.seq
                    self.auto = AutoRatio(s_fixed=self.sizes["fixed_bytes_per_layer"],
                                          s_other=self.sizes["other_bytes_per_layer"], swapped=memo_layers,
                                          tokens=call.batch * seq, seq=seq, host_budget=budget - input_need,
                                          quantize=lambda a: _floor_ratio(a, seq))
                    self.alpha, self.alpha_reason = self.auto.ratio, self.auto.reason
                elif self.alpha > memory_bound:
                    self.alpha = _floor_ratio(memory_bound, call.seq)
                    self.alpha_reason = f"auto: {self.alpha_reason}; cut to {self.alpha:.3f} by the host budget for " \
                                        f"inputs of {call.seq} tokens"
        need = self._host_need(traces, self.alpha, device)
        if need > budget:
            raise MemoError(
                f"memo.wrap: swap_ratio={self.alpha} needs {format_bytes(need)} of host memory for {n} swapped layers "
                f"but host_memory_budget is {format_bytes(budget)}; set host_memory_budget='{_ceil_gib(need)}GiB' "
                f"or lower swap_ratio (0.0 needs {format_bytes(need_min)}), or use swap_ratio='auto', which makes "
                f"layers recompute their attention when the budget cannot hold their attention outputs")
        self._ensure_pool(need, device)

    def _auto_enabled(self) -> bool:
        return self.config.swap_ratio == "auto" and self.plan is None   # a plan's alpha is used as given

    def _ensure_pool(self, need: int, device: torch.device, exact: bool = False) -> None:
        """A reserved pool of at least ``need`` bytes (exactly, with ``exact``). See NOTE [ Host pool sizing ]."""
        size, pin = max(need, ALIGNMENT), device.type != "cpu"
        pool = self.pool
        if pool is not None and pool.pin == pin and (pool.capacity == size if exact else pool.capacity >= size):
            pool.reserve()
            return
        if pool is not None and pool.used_bytes:
            raise MemoError(
                f"memo.swap: the sequence grew while {format_bytes(pool.used_bytes)} of swapped activations "
                f"are still waiting for their backward; run backward before a forward with longer inputs")
        self._new_pool(size, pin, device)

    def _new_pool(self, size: int, pin: bool, device: torch.device) -> None:
        """Serve from a new pool of ``size`` bytes; pools without records are closed first, and the pools
        held stay within the budget (NOTE [ Several forwards before one backward ] rule 2)."""
        if self.engine is not None:
            self.engine.streams.synchronize()   # no copy may still touch a pool that is closed
        live = [p for p in self.pools if p.used_bytes]
        held = sum(p.capacity for p in live)
        budget = self.config.host_budget_bytes
        if live and held + size > budget:
            raise MemoError(
                f"memo.wrap: a forward started while {format_bytes(sum(p.used_bytes for p in live))} of swapped "
                f"activations from {len(live)} earlier forward(s) still wait for their backward (several forwards "
                f"before one backward, e.g. summed micro-batch losses); this forward needs {format_bytes(size)} "
                f"more and host_memory_budget is {format_bytes(budget)}. Call backward after each micro-batch's "
                f"forward (loss_i.backward() accumulates the same gradient sum in .grad), or set "
                f"host_memory_budget='{_ceil_gib(held + size)}GiB' or more for {len(live) + 1} forwards")
        for p in self.pools:
            if not p.used_bytes:
                p.close()
        self.pools = live
        self.pool = HostPool(size, pin=pin)
        self.pool.reserve()
        self.pools.append(self.pool)
        self.pin_s += self.pool.pin_s
        self.pool_sizes.append(self.pool.capacity)
        if self.engine is None or self.engine.streams.device != device:
            self.engine = SwapEngine(device, self.pool, self.timer_factory)
        else:
            self.engine.serve_from(self.pool)

    def _switch_ratio(self, ratio: float) -> None:
        """At a step boundary: run the next step at auto's ``ratio``, the pool sized for it.

        See NOTE [ Host pool sizing ] rules 1 and 2.
        """
        need = self._host_need(self.current_traces, ratio, self.current_device)
        exact = self.auto.settled
        if ratio == self.alpha and (not exact or self.pool.capacity == max(need, ALIGNMENT)):
            return
        waiting = sum(p.used_bytes for p in self.pools)   # NOTE [ Several forwards before one backward ]
        if waiting and (exact or self.pool.capacity < need):
            self.alpha_reason = (f"{self.auto.reason} (waiting: {format_bytes(waiting)} of swapped "
                                 f"activations from an earlier forward still live in the host pool)")
            return
        self._ensure_pool(need, self.current_device, exact=exact)
        self.alpha = ratio

    # --- reporting ----------------------------------------------------------------------------
    def stats(self) -> MemoStats:
        if self.engine is not None:   # a stats read is outside a step: resolve it (NOTE [ Step timing ] rule 2)
            if self.engine.timer.step_complete():
                self.engine.timer.close_step()
            self._take_times(block=True)
        pool = self.pool.stats() if self.pool is not None else {
            "capacity_bytes": 0, "reserved_bytes": 0, "used_bytes": 0, "high_water_bytes": 0, "pinned": False,
            "num_allocs": 0}
        if len(self.pools) > 1:   # NOTE [ Several forwards before one backward ] rule 4
            for key in ("capacity_bytes", "reserved_bytes", "used_bytes", "high_water_bytes", "num_allocs"):
                pool[key] = sum(p.stats()[key] for p in self.pools)
        pool["pools"] = len(self.pools)
        pool.update(pin_s=self.pin_s, capacities=list(self.pool_sizes))   # every pool this model made, in order
        return MemoStats(layers=[self.layer_stats[i] for i in sorted(self.layer_stats)], host_pool=pool,
                         swap_ratio=self.alpha, swap_ratio_setting=self.config.swap_ratio,
                         swap_ratio_reason=self.alpha_reason + self.policy_note, shared_bytes=sum(self.shared_args.values()),
                         step=dict(self.step_times), timing_source=self.timing_source,
                         copies={k: v - self.copies_at_step.get(k, 0) for k, v in ops.copy_counters().items()},
                         swap_ratio_decisions=[] if self.auto is None else list(self.auto.decisions),
                         planned_memory={} if self.planned_memory is None else self.planned_memory.stats())

    def close(self) -> None:
        if self.engine is not None:
            self.engine.streams.synchronize()   # no copy may still touch the pool
        for pool in self.pools:
            if pool.used_bytes == 0:
                pool.close()


def _ceil_gib(n: int) -> int:
    return max(1, -(-n // (1 << 30)))


def _floor_ratio(alpha: float, seq: int) -> float:
    """Largest alpha <= ``alpha`` that is a whole number of tokens out of ``seq``."""
    return max(0.0, min(1.0, int(alpha * seq) / seq))
