"""MemoRuntime: memo's state for one wrapped model (pool, engine, traces, swap ratio, stats)."""

from __future__ import annotations

import logging
import statistics
import time
import warnings
import weakref
from typing import Callable, Optional

import torch

from memo.config import MemoConfig
from memo.errors import MemoError
from memo.executor import LayerState, plan_layer_records
from memo.planner.alpha import AlphaResult, solve_alpha
from memo.planner.units import format_bytes
from memo.stats import LayerStats, MemoStats
from memo.swap.engine import SwapEngine
from memo.swap.host_pool import ALIGNMENT, HostPool
from memo.trace import AttentionKernelMode, Classifier, LayerCall, LayerTrace, SavedClass, storage_key, trace_layer

logger = logging.getLogger("memo")


def _aligned(n: int) -> int:
    return 0 if n == 0 else (n + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


class MemoRuntime:
    def __init__(self, config: MemoConfig, layers: list[torch.nn.Module]) -> None:
        self.config = config
        self.layers = layers
        n = len(layers)
        self.swapped = set(range(max(n - config.keep_last_layers, 0)))
        self.originals: dict[int, Callable] = {}
        self.traces: dict[tuple, LayerTrace] = {}
        self.prepared_key: Optional[tuple] = None
        self.pool: Optional[HostPool] = None
        self.engine: Optional[SwapEngine] = None
        self.alpha: Optional[float] = None if config.swap_ratio == "auto" else float(config.swap_ratio)
        self.alpha_reason = "not chosen yet (no forward pass)" if config.swap_ratio == "auto" else "set by the user"
        self.alpha_result: Optional[AlphaResult] = None
        self.auto_pending = False
        self.sizes: dict = {}
        self.pass_states: list[weakref.ref] = []
        self.layer_stats = {i: LayerStats(index=i, kept=i not in self.swapped) for i in range(n)}
        self.bandwidth: Optional[float] = None
        self.timing_pass = False
        self.step_times: dict = {}
        self._cache_warned = False
        self.plan: Optional[dict] = None
        self.shared_args: dict[int, int] = {}
        self.sp = None                 # memo.parallel.SequenceParallel when sequence parallelism is on
        self.sp_binding = None
        self.original_attn_implementation: Optional[str] = None

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
        if index == min(self.layers_in_pass()):
            self._start_pass()
        if self.engine is not None:
            self.engine.layer_starting(index % 2)
        if index not in self.swapped:
            return self._run_kept(index, layer, original, hidden_states, args, kwargs)
        call = LayerCall(hidden_states, args, kwargs)
        trace = self._prepare(index, layer, original, call)
        state = LayerState(self, index, layer, original, call, trace, self.alpha)
        start = self._now()
        with torch.autograd.graph.saved_tensors_hooks(state.pack, state.unpack), state.kernel_mode:
            out = original(hidden_states, *args, **kwargs)
        state.forward_s = self._now() - start
        state.finish_forward()
        self.pass_states.append(weakref.ref(state))
        for t in call.shared_tensors():   # kept for recomputation, once per model (not per layer)
            self.shared_args[storage_key(t)] = t.untyped_storage().nbytes()
        st = self.layer_stats[index]
        st.activation_bytes = state.activation_bytes()
        st.swapped_bytes = state.host_bytes()
        st.recomputed_bytes = state.recomputed_bytes()
        st.resident_bytes = 0
        st.forward_s = state.forward_s
        return out

    def layers_in_pass(self) -> range:
        return range(len(self.layers))

    def _now(self) -> float:
        if self.timing_pass and torch.accelerator.is_available():
            torch.accelerator.synchronize()
        return time.perf_counter()

    def _run_kept(self, index, layer, original, hidden_states, args, kwargs):
        """Kept layers run as they are; memo only counts what they keep resident."""
        classify = Classifier(layer, LayerCall(hidden_states, args, kwargs), AttentionKernelMode())
        seen: dict[int, int] = {}

        def count(t):
            if classify(t) not in (SavedClass.PARAM, SavedClass.SHARED):
                seen[storage_key(t)] = t.untyped_storage().nbytes()
            return t.detach()   # See NOTE [ Pack returns a detached tensor ] in memo/trace.py

        start = self._now()
        with torch.autograd.graph.saved_tensors_hooks(count, lambda t: t):
            out = original(hidden_states, *args, **kwargs)
        st = self.layer_stats[index]
        st.forward_s = self._now() - start
        st.activation_bytes = st.resident_bytes = sum(seen.values())
        return out

    # --- passes -----------------------------------------------------------------------------
    def _start_pass(self) -> None:
        self.pass_states = [r for r in self.pass_states if r() is not None and r().phase.value != "done"]
        self.shared_args = {}
        self.timing_pass = self.auto_pending
        if self.engine is not None:
            self.engine.reset_timers()
        self.step_times = {"forward_start": time.perf_counter()}   # durations in seconds; see MemoStats.step

    def end_forward(self) -> None:
        """The decoder stack returned: drain the in-flight slots; choose alpha after the first pass."""
        if self.engine is None:
            return
        self.engine.drain()
        if "forward_start" in self.step_times:
            self.step_times["forward_s"] = time.perf_counter() - self.step_times.pop("forward_start")
            self.step_times["swap_out_s"] = self.engine.swap_out_s
        if self.auto_pending:
            self._choose_alpha()

    def on_layer_restored(self, state: LayerState) -> None:
        """Prefetch the layer whose backward comes next (the previous one in forward order)."""
        self.layer_stats[state.index].recompute_s = state.recompute_s
        self.step_times.setdefault("backward_start", state.restore_start)
        self.step_times["recompute_s"] = self.step_times.get("recompute_s", 0.0) + state.recompute_s
        states = [r() for r in self.pass_states]
        if state in states:
            i = states.index(state)
            for prev in reversed(states[:i]):
                if prev is not None and prev.phase.value == "swapped" and not prev.prefetched:
                    self.engine.prefetch(prev)
                    break

    def on_layer_done(self, state: LayerState) -> None:
        self.step_times["swap_in_s"] = self.engine.swap_in_s
        self.step_times["wait_s"] = self.engine.wait_s
        if "backward_start" in self.step_times:
            self.step_times["swapped_backward_s"] = time.perf_counter() - self.step_times["backward_start"]

    # --- sizing, budget and the swap ratio ------------------------------------------------------
    def _trace_key(self, layer: torch.nn.Module, call: LayerCall) -> tuple:
        mask = call.kwargs.get("attention_mask")
        return (type(layer).__name__, getattr(layer, "attention_type", None), tuple(call.hidden_states.shape),
                call.hidden_states.dtype, str(call.hidden_states.device), call.hidden_states.requires_grad,
                None if mask is None else (tuple(mask.shape), mask.dtype))

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

    def _host_need(self, traces: list[LayerTrace], alpha: float, device: torch.device) -> int:
        host_dtype = self.config.offload_torch_dtype
        return sum(_aligned(r.host_bytes()) for t in traces for r in plan_layer_records(t, alpha, device, host_dtype))

    def _size_pool(self, call: LayerCall) -> None:
        """Check the host budget and size the pool before the first forward of these shapes."""
        device = call.hidden_states.device
        traces = self._layer_traces(call)
        budget = self.config.host_budget_bytes
        need_full = self._host_need(traces, 1.0, device)
        need_min = self._host_need(traces, 0.0, device)
        n = len(traces)
        self.sizes = {"fixed_bytes_per_layer": need_min / max(n, 1),
                      "other_bytes_per_layer": (need_full - need_min) / max(n, 1), "swapped_layers": n}
        if self.config.swap_ratio == "auto":
            if need_min > budget:
                raise MemoError(
                    f"memo.wrap: host budget {format_bytes(budget)} cannot hold the layer inputs and attention "
                    f"outputs of {n} swapped layers ({format_bytes(need_min)}); set "
                    f"MemoConfig(host_memory_budget='{_ceil_gib(need_min)}GiB') or more, or raise keep_last_layers")
            # Until the first pass measured the layer time, swap as much as the host holds.
            memory_bound = 1.0 if need_full <= budget else (budget - need_min) / (need_full - need_min)
            if self.alpha is None or self.alpha > memory_bound:
                self.alpha = _floor_ratio(memory_bound, call.seq)
                self.alpha_reason = "first pass: as much as the host budget holds; measuring layer time"
                self.auto_pending = True
            alpha = self.alpha
        else:
            alpha = self.alpha
        need = self._host_need(traces, alpha, device)
        if need > budget:
            raise MemoError(
                f"memo.wrap: swap_ratio={alpha} needs {format_bytes(need)} of host memory for {n} swapped layers "
                f"but host_memory_budget is {format_bytes(budget)}; set host_memory_budget='{_ceil_gib(need)}GiB' "
                f"or lower swap_ratio (0.0 needs {format_bytes(need_min)})")
        if self.pool is None or self.pool.capacity < need or self.pool.pin != (device.type != "cpu"):
            if self.engine is not None:
                self.engine.streams.synchronize()   # no copy may still touch the old pool
            if self.pool is not None and self.pool.used_bytes:
                raise MemoError(
                    f"memo.swap: the sequence grew while {format_bytes(self.pool.used_bytes)} of swapped activations "
                    f"are still waiting for their backward; run backward before a forward with longer inputs")
            self.pool = HostPool(max(need, ALIGNMENT), pin=device.type != "cpu")
            self.engine = SwapEngine(device, self.pool)
        self.pool.reserve()

    def _measure_bandwidth(self, device: torch.device) -> float:
        """Device-to-host copy bandwidth (bytes/s), best of three 64 MiB copies into the pool's kind of memory."""
        n = 64 << 20
        src = torch.empty(n, dtype=torch.uint8, device=device)
        dst = torch.empty(n, dtype=torch.uint8, pin_memory=device.type != "cpu")
        best = float("inf")
        for _ in range(3):
            if torch.accelerator.is_available():
                torch.accelerator.synchronize()
            start = time.perf_counter()
            dst.copy_(src, non_blocking=True)
            if torch.accelerator.is_available():
                torch.accelerator.synchronize()
            best = min(best, time.perf_counter() - start)
        return n / best

    def _choose_alpha(self) -> None:
        """The paper's alpha program from the first pass's measured layer time (see memo.planner.alpha)."""
        self.auto_pending = False
        self.timing_pass = False
        times = [self.layer_stats[i].forward_s for i in sorted(self.swapped)]
        if not times:
            self.alpha_reason = "no layer is swapped (keep_last_layers covers the model)"
            return
        if self.bandwidth is None:
            self.bandwidth = self._measure_bandwidth(self.pool_device())
        t_fwd = statistics.median(times)
        fixed = self.sizes["fixed_bytes_per_layer"]
        result = solve_alpha(s_in=fixed, s_attn=0.0, s_other=self.sizes["other_bytes_per_layer"],
                             bandwidth=self.bandwidth, t_fwd=t_fwd, n_layers=len(self.layers),
                             keep_layers=len(self.layers) - len(self.swapped),
                             host_budget=self.config.host_budget_bytes)
        self.alpha_result = result
        self.alpha = min(self.alpha, result.alpha)
        self.alpha_reason = (f"auto: {result.reason} (layer forward {t_fwd * 1e3:.1f} ms, copy bandwidth "
                             f"{self.bandwidth / 1e9:.2f} GB/s)")
        logger.info("memo: swap_ratio=%.3f; %s", self.alpha, self.alpha_reason)
        if not result.hidden:
            warnings.warn(
                f"memo: copying each layer's input and attention output ({format_bytes(fixed)}) takes "
                f"{fixed / self.bandwidth * 1e3:.1f} ms at {self.bandwidth / 1e9:.2f} GB/s, longer than the layer's "
                f"forward ({t_fwd * 1e3:.1f} ms), so the copies cannot hide behind compute. memo now recomputes "
                f"every other activation (swap_ratio=0) and the remaining copies are exposed; longer sequences, a "
                f"larger keep_last_layers or a faster host link would hide them", stacklevel=2)

    def pool_device(self) -> torch.device:
        return self.engine.streams.device

    # --- reporting ----------------------------------------------------------------------------
    def stats(self) -> MemoStats:
        pool = self.pool.stats() if self.pool is not None else {
            "capacity_bytes": 0, "reserved_bytes": 0, "used_bytes": 0, "high_water_bytes": 0, "pinned": False,
            "num_allocs": 0}
        return MemoStats(layers=[self.layer_stats[i] for i in sorted(self.layer_stats)], host_pool=pool,
                         swap_ratio=self.alpha, swap_ratio_setting=self.config.swap_ratio,
                         swap_ratio_reason=self.alpha_reason, shared_bytes=sum(self.shared_args.values()),
                         step={k: v for k, v in self.step_times.items() if not k.endswith("_start")})

    def close(self) -> None:
        if self.engine is not None:
            self.engine.streams.synchronize()   # no copy may still touch the pool
        if self.pool is not None and self.pool.used_bytes == 0:
            self.pool.close()


def _ceil_gib(n: int) -> int:
    return max(1, -(-n // (1 << 30)))


def _floor_ratio(alpha: float, seq: int) -> float:
    """Largest alpha <= ``alpha`` that is a whole number of tokens out of ``seq``."""
    return max(0.0, min(1.0, int(alpha * seq) / seq))
