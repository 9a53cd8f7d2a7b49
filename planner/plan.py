"""From a layer profile and a cluster to a plan: Level 1, alpha, Level 2, times, fit. Torch-free.

The profile is ``memo.profile.LayerProfile.to_dict()`` (plain numbers), so everything here runs
without torch; the CLI does the profiling and hands the dict over.

NOTE [ Level-2 step timeline ]
  Steps, in order: embedding forward; layer 0..n-1 forward; head + loss (forward and backward);
  layer n-1..0 backward; embedding backward. Blocks on it:
  1. ``L{i}.fwd`` / ``L{i}.bwd``: the Level-1 peak of a layer's forward / backward, during that step.
  2. ``L{i}.swap_out``: what layer i swaps (input, attention output, LSE in full; alpha of the
     rest), live during layer i+1's forward while it is copied out (two buffers alternate).
  3. ``L{i}.prefetch``: the same bytes copied back in during layer i+1's backward; during layer
     i's own backward they are part of ``L{i}.bwd`` (its saved activations are live at step 0).
  4. ``L{i}.kept``: the last ``keep`` layers keep all their saved activations from the end of
     their forward to their backward.
  5. Weights, gradients, device optimizer states, the ZeRO-3 gather buffer and the shared
     tensors (RoPE cos/sin, kept once) live for the whole step.
  6. ``L{i}.recompute``: the token-wise recompute that opens a swapped layer's backward saves
     its outputs as tensors of its own ((1 - alpha) of the other saved bytes) and then copies
     them into the restored buffers that ``L{i}.bwd`` holds: both exist at once, so the block
     lives during layer i's backward step. (Its transients are forward transients of
     ``1 - alpha`` of the tokens, smaller than the backward's own.)
  7. Gradients: a step starts from ``zero_grad(set_to_none=True)`` (torch's optimizers and HF's
     Trainer), so layer i's gradients (``L{i}.grad``, its share of the gradient bytes) appear
     at its backward and the rest (LM head, norm, embedding: ``grads.rest``) at the head step,
     all living to the step's end. ``Options.grads_persist`` (gradient accumulation across
     micro-batches) keeps one ``gradients`` block for the whole step instead, and so does
     ``Options.offload_params``, whose block is one module's gradient buffer (NOTE [ Parameter
     offload ] rule 2 in cost.py; its weights block is empty, its gather buffer rule 5's).
     Rules 6 and 7 are what the measured H100 peaks show (NOTE [ Measured H100 constants ] in
     cost.py): Llama-2-7B's peak is at its first layer's backward, weights + gradients + that
     layer's backward arena + its recompute, TinyLlama's at the head.
  8. Layer policies (NOTE [ Policy choice ] in policies.py): rules 2, 3 and 6 are a "memo"
     layer's. An "input" layer's swap buffer and prefetch hold its input only, and its backward
     step holds ``max(forward arena + output gradient, backward arena)``: the executor runs the
     whole forward again (its arena, the restored input included) while the output gradient from
     the layer above waits, and keeps what it saves as the backward's saved tensors (no copy, no
     recompute block); then the backward arena. A "kept" layer is rule 4.
  9. Token tiling is inside the Level-1 arenas: the profile runs the MLP tiled as the runtime does
     (NOTE [ Profiler allocation steps ] rule 6 in memo/profile.py).

NOTE [ SP buffers in Level 1 ]
  The profile runs one layer with plain sdpa at the per-rank length s and adds the ring's
  in-flight buffers at the attention step when sp > 1 (``memo/profile.py``, NOTE [ Profiler
  allocation steps ] rule 5). Per backend (degrees: NOTE [ SP communication model ] in cost.py):
  1. ``ring``: the trace as profiled.
  2. Ulysses (U > 1) adds, live during the attention step only (kind ``ulysses_buffer``), the
     head-sharded tensors the attention kernel works on. Each holds s U tokens of heads / U
     heads, i.e. the bytes of its seq-sharded twin, whatever U is. Forward: gathered q, k, v,
     the kernel's out and LSE: b s ((2 h + 2 kv) d wb + 4 h). Backward: gathered q, k, v, out,
     dout, LSE and the kernel's dq, dk, dv: b s ((4 h + 4 kv) d wb + 4 h). The seq-sharded
     tensors around them (q, k, v, out, LSE, dq, dk, dv) are already in the trace.
  3. Pure Ulysses (R = 1) has no ring: the profile's ring buffers are dropped. Hybrid (R > 1)
     keeps them: its ring blocks hold s U tokens of kv / U heads, the same bytes.
  4. Assumed, not modelled: the contiguous copies an all-to-all may need around its send and
     receive buffers (at most one more q-sized buffer, b s h d wb, if they are made one tensor at
     a time) and the communicator's own workspace (inside the runtime reserve).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional, Union

from .policies import MAX_KEEP, LayerSizes, Mix, choose, enumerate_mixes, least_host
from .search import max_fitting_seq_len, max_fitting_seq_len_interp  # noqa: F401  (re-exported)
from .cost import DTYPE_BYTES, GPUProfile, SPDegrees, model_state_bytes, sp_degrees, step_time
from .presets import layer_parameters, model_parameters
from .dsa import ProgressFn, align_allocs, solve_layout
from .layout import Alloc, Layout, live_bytes_over_time, lower_bound
from .units import format_bytes

PLAN_VERSION = 1
ALIGN = 512


@dataclass
class Cluster:
    gpus: int
    sp: int
    gpu: GPUProfile
    host_memory: int                 # bytes per node
    gpus_per_node: int = 8
    reserve_bytes: int = 2 << 30     # CUDA context, NCCL and cuBLAS workspaces: not plannable
    sp_backend: str = "ring"         # ring (any head count), ulysses or hybrid: NOTE [ SP communication model ]

    def __post_init__(self) -> None:
        self.gpus_per_node = min(self.gpus_per_node, self.gpus)

    def sp_degrees(self, model: dict) -> SPDegrees:
        """Ulysses and ring degrees of this cluster's SP backend; raises ``SPBackendError``."""
        return sp_degrees(model, self.sp, self.sp_backend, self.gpus_per_node)


@dataclass
class Options:
    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_params: bool = False        # weights on the host too (ZeRO-3 only): NOTE [ Parameter offload ] in cost.py
    swap_ratio: Union[str, float] = "auto"
    keep_layers: Optional[int] = None   # None: the planner chooses (NOTE [ Policy choice ] rule 5)
    policy: str = "auto"                # "auto" (a mix), "memo" or "input": NOTE [ Policy choice ] rule 8
    max_keep: int = MAX_KEEP
    time_limit: float = 60.0
    use_mip: bool = True
    threads: int = 2
    grads_persist: bool = False      # gradients live from the step's start: NOTE [ Level-2 step timeline ] rule 7


def trace_allocs(trace: dict) -> list[Alloc]:
    """Allocations of a profiled block that belong in its arena (parameter gradients are model
    states), aligned to 512 bytes."""
    allocs = [Alloc(a["id"], a["bytes"], a["start"], a["end"], a["kind"], a.get("op", "")) for a in trace["allocs"]
              if a["kind"] != "param_grad"]
    return align_allocs(allocs, ALIGN)


def ulysses_buffer_bytes(profile: dict) -> dict:
    """Bytes of the head-sharded tensors Ulysses adds during the attention step of the layer's
    forward and backward (one rank). See NOTE [ SP buffers in Level 1 ] rule 2."""
    m = profile["model"]
    tokens = profile["micro_batch"] * profile["local_seq_len"]
    h, kv, d, wb = m["heads"], m["kv_heads"], m["head_dim"], DTYPE_BYTES[profile["dtype"]]
    fwd = {"q": h * d * wb, "k": kv * d * wb, "v": kv * d * wb, "out": h * d * wb, "lse": 4 * h}
    bwd = dict(fwd, dout=h * d * wb, dq=h * d * wb, dk=kv * d * wb, dv=kv * d * wb)
    return {part: {k: tokens * v for k, v in sizes.items()} for part, sizes in (("forward", fwd), ("backward", bwd))}


def layer_allocs(profile: dict, part: str, degrees: Optional[SPDegrees] = None) -> list[Alloc]:
    """The layer's ``part`` ("forward" or "backward") allocations for this SP backend (None:
    the profile's ring), aligned. See NOTE [ SP buffers in Level 1 ]."""
    trace = profile[part]
    if degrees is None or degrees.ulysses == 1:
        return trace_allocs(trace)
    allocs = [a for a in trace["allocs"] if degrees.ring > 1 or a["kind"] != "ring_buffer"]
    if part == "forward":
        steps = [a["start"] for a in trace["allocs"] if a["kind"] == "attention_output"]
    else:
        steps = [a["start"] for a in trace["allocs"]
                 if a["kind"] == "ring_buffer" or ("attention" in a.get("op", "") and "backward" in a.get("op", ""))]
    assert steps, f"memo.plan: the layer's {part} trace has no attention step to place Ulysses buffers at"
    step, tag = min(steps), part[0]
    extra = [{"id": f"{tag}u.{name}", "bytes": nbytes, "start": step, "end": step + 1, "kind": "ulysses_buffer"}
             for name, nbytes in ulysses_buffer_bytes(profile)[part].items()]
    return trace_allocs({"allocs": allocs + extra})


@dataclass
class Level1:
    forward: Layout
    backward: Layout
    embedding_forward: Layout
    embedding_backward: Layout
    head: Layout
    degrees: Optional[SPDegrees] = None     # the SP split the layer layouts were made for


def solve_level1(profile: dict, *, degrees: Optional[SPDegrees] = None, time_limit: float = 60.0,
                 use_mip: bool = True, threads: int = 2,
                 progress: Optional[Callable[[str, float, float], None]] = None) -> Level1:
    """Level 1: one MIP for the layer's forward, one for its backward (each within ``time_limit``);
    the embedding and head blocks are placed greedily (they hold a handful of tensors).
    ``degrees`` (``Cluster.sp_degrees``; None: a ring of the profile's SP degree) says which
    SP buffers the layer holds. See NOTE [ SP buffers in Level 1 ]."""
    def prog(name: str) -> Optional[ProgressFn]:
        return None if progress is None else (lambda el, lim: progress(name, el, lim))
    degrees = degrees or SPDegrees("ring", 1, profile["sp"])
    fwd = solve_layout(layer_allocs(profile, "forward", degrees), time_limit=time_limit, use_mip=use_mip,
                       threads=threads, progress=prog("layer forward"))
    bwd = solve_layout(layer_allocs(profile, "backward", degrees), time_limit=time_limit, use_mip=use_mip,
                       threads=threads, progress=prog("layer backward"))
    quick = dict(use_mip=False)
    return Level1(fwd, bwd, solve_layout(trace_allocs(profile["embedding_forward"]), **quick),
                  solve_layout(trace_allocs(profile["embedding_backward"]), **quick),
                  solve_layout(trace_allocs(profile["head"]), **quick), degrees)


def swap_sizes(profile: dict) -> tuple[int, int, int]:
    """(layer input, attention output + LSE, other saved activations) bytes of one layer."""
    sb = profile["saved_bytes"]
    return sb["layer_input"], sb["attention_output"] + sb["lse"], sb["other"]


def step_allocs(n: int, level1: Level1, *, states: dict, shared: int, swap_bytes: int, kept_bytes: int,
                keep: int = 0, recompute_bytes: int = 0, layer_grad_bytes: Optional[int] = None,
                policies: Optional[list[str]] = None, input_bytes: int = 0, input_bwd_bytes: int = 0
                ) -> tuple[list[Alloc], list[str]]:
    """Level 2's allocations and step labels. See NOTE [ Level-2 step timeline ]. ``layer_grad_bytes``
    (one layer's share of ``states["gradients"]``) makes gradients appear at each layer's
    backward (rule 7); None keeps them for the whole step. ``policies`` (one per layer: "memo",
    "input", "kept"; default: "memo" but the last ``keep``) with ``input_bytes`` (an "input" layer's
    host copy) and ``input_bwd_bytes`` (its backward block: rule 8)."""
    if policies is None:
        policies = ["memo"] * max(n - keep, 0) + ["kept"] * min(keep, n)
    labels = ["embedding fwd"] + [f"layer {i} fwd" for i in range(n)] + ["head+loss"] + \
             [f"layer {i} bwd" for i in reversed(range(n))] + ["embedding bwd"]
    T = len(labels)
    fwd_step = lambda i: 1 + i                     # noqa: E731
    bwd_step = lambda i: n + 2 + (n - 1 - i)       # noqa: E731
    out = []
    grads_whole_step = layer_grad_bytes is None
    for name in ("weights", "gradients", "optimizer", "zero3_gather"):
        if states[name] and (name != "gradients" or grads_whole_step):
            out.append(Alloc(name, states[name], 0, T, "model_state"))
    if not grads_whole_step:
        out.append(Alloc("grads.rest", states["gradients"] - n * layer_grad_bytes, n + 1, T, "model_state"))
        out += [Alloc(f"L{i}.grad", layer_grad_bytes, bwd_step(i), T, "model_state") for i in range(n)]
    if shared:
        out.append(Alloc("shared", shared, 0, T, "shared"))
    out.append(Alloc("embedding.fwd", level1.embedding_forward.peak, 0, 1, "block"))
    for i in range(n):
        policy = policies[i]
        out.append(Alloc(f"L{i}.fwd", level1.forward.peak, fwd_step(i), fwd_step(i) + 1, "block"))
        bwd = input_bwd_bytes if policy == "input" else level1.backward.peak
        out.append(Alloc(f"L{i}.bwd", bwd, bwd_step(i), bwd_step(i) + 1, "block"))
        if policy == "kept":
            out.append(Alloc(f"L{i}.kept", kept_bytes, fwd_step(i) + 1, bwd_step(i), "kept"))
            continue
        copied = input_bytes if policy == "input" else swap_bytes
        out.append(Alloc(f"L{i}.swap_out", copied, fwd_step(i) + 1, fwd_step(i) + 2, "swap_buffer"))
        out.append(Alloc(f"L{i}.prefetch", copied, bwd_step(i) - 1, bwd_step(i), "swap_buffer"))
        if policy == "memo":
            out.append(Alloc(f"L{i}.recompute", recompute_bytes, bwd_step(i), bwd_step(i) + 1, "recompute"))
    out.append(Alloc("head", level1.head.peak, n + 1, n + 2, "block"))
    out.append(Alloc("embedding.bwd", level1.embedding_backward.peak, T - 1, T, "block"))
    return [a for a in out if a.bytes > 0], labels


def bound_level1(level1: "Level1") -> "Level1":
    """``level1`` with each block's peak at its lower bound (live bytes, no layout)."""
    def lb(lay: Layout) -> Layout:
        return replace(lay, peak=lay.lower_bound)
    return Level1(lb(level1.forward), lb(level1.backward), lb(level1.embedding_forward),
                  lb(level1.embedding_backward), lb(level1.head), level1.degrees)


def input_backward_bytes(level1: "Level1", grad_out_bytes: int) -> int:
    """An "input" layer's backward block (NOTE [ Level-2 step timeline ] rule 8): its forward arena
    run again with the output gradient waiting, then its backward arena."""
    return max(level1.forward.peak + grad_out_bytes, level1.backward.peak)


@dataclass
class PlanContext:
    """What ``finish_plan`` needs besides the ZeRO stage, so stages can be compared cheaply."""

    profile: dict
    cluster: Cluster
    options: Options
    level1: Level1
    model_name: str = ""


def _times(ctx: PlanContext, zero_stage: int, mix: Mix):
    prof, cl, opt = ctx.profile, ctx.cluster, ctx.options
    s_in, s_attn, s_other = swap_sizes(prof)
    return step_time(prof["model"], cl.gpu, seq_len=prof["seq_len"], micro_batch=prof["micro_batch"], sp=cl.sp,
                     gpus=cl.gpus, gpus_per_node=cl.gpus_per_node, alpha=mix.alpha, swap_bytes_fixed=s_in + s_attn,
                     swap_bytes_other=s_other, keep_layers=mix.keep, zero_stage=zero_stage,
                     offload_optimizer=opt.offload_optimizer, dtype=prof["dtype"], sp_backend=cl.sp_backend,
                     input_layers=mix.inputs, swap_bytes_input=s_in, tiled=prof.get("tile_tokens") is not None,
                     mlp_saved_bytes=prof.get("mlp_saved_bytes", 0), offload_params=opt.offload_params,
                     mlp_output_unused=prof.get("mlp_output_unused", False))


def _level2_allocs(ctx: PlanContext, states: dict, mix: Mix) -> tuple[list[Alloc], list[str]]:
    prof, opt = ctx.profile, ctx.options
    model = prof["model"]
    n = model["layers"]
    s_in, s_attn, s_other = swap_sizes(prof)
    # Rule 7; offloaded parameters keep one module's gradient buffer instead (NOTE [ Parameter offload ] rule 2).
    layer_grads = None if opt.grads_persist or opt.offload_params else \
        int(states["gradients"] * layer_parameters(model) / model_parameters(model))
    return step_allocs(n, ctx.level1, states=states, shared=prof["saved_bytes"].get("shared", 0),
                       swap_bytes=int(s_in + s_attn + mix.alpha * s_other), kept_bytes=s_in + s_attn + s_other,
                       recompute_bytes=int((1 - mix.alpha) * s_other), layer_grad_bytes=layer_grads,
                       policies=mix.policies(), input_bytes=s_in,
                       input_bwd_bytes=input_backward_bytes(ctx.level1, s_in))


def choose_mix(ctx: PlanContext, zero_stage: int) -> dict:
    """The layer policies, kept layers and alpha of the plan (NOTE [ Policy choice ]), with what
    was considered: ``{"candidate", "fitting", "considered", "least_host", "t_fwd"}``."""
    prof, cl, opt = ctx.profile, ctx.cluster, ctx.options
    n = prof["model"]["layers"]
    sizes = LayerSizes(*swap_sizes(prof))
    states = model_state_bytes(prof["model"], zero_stage=zero_stage, ranks=cl.gpus,
                               offload_optimizer=opt.offload_optimizer, dtype=prof["dtype"],
                               offload_params=opt.offload_params)
    budget = cl.host_memory / cl.gpus_per_node - states["host"]
    t_fwd = _times(ctx, zero_stage, Mix(n, 0, 0, 1.0)).layer_forward_s

    def bound(mix: Mix) -> int:
        return lower_bound(_level2_allocs(ctx, states, mix)[0]) + cl.reserve_bytes

    cands = enumerate_mixes(sizes, n=n, host_budget=budget, device_memory=cl.gpu.memory_bytes,
                            bandwidth=cl.gpu.host_link_Bps, t_fwd=t_fwd, device_bound=bound,
                            step_s=lambda m: _times(ctx, zero_stage, m).step_time_s, keep=opt.keep_layers,
                            max_keep=opt.max_keep, policy=opt.policy,
                            alpha=None if opt.swap_ratio == "auto" else float(opt.swap_ratio))
    best, fitting = choose(cands)
    return {"candidate": best, "fitting": fitting, "considered": len(cands), "least_host": least_host(cands, sizes),
            "t_fwd": t_fwd, "states": states, "budget": budget, "candidates": cands}


def finish_plan(ctx: PlanContext, zero_stage: int, *, level2_time_limit: Optional[float] = None) -> dict:
    """Layer policies, alpha, Level 2, step time and fit for one ZeRO stage: the plan as a JSON-able dict."""
    prof, cl, opt = ctx.profile, ctx.cluster, ctx.options
    model = prof["model"]
    n = model["layers"]
    s_in, s_attn, s_other = swap_sizes(prof)
    degrees = cl.sp_degrees(model)
    if ctx.level1.degrees is not None and ctx.level1.degrees != degrees:
        raise ValueError(f"memo.plan: the Level-1 layouts were solved for {ctx.level1.degrees}, the cluster runs "
                         f"{degrees}; solve them with solve_level1(profile, degrees=cluster.sp_degrees(model))")
    choice = choose_mix(ctx, zero_stage)
    states = choice["states"]
    host_per_rank_budget = cl.host_memory / cl.gpus_per_node
    tl = opt.time_limit if level2_time_limit is None else level2_time_limit
    # The fastest fitting mix whose Level-2 layout fits too (the bound can be below any layout);
    # the MIP only for the one kept, and only when the greedy layout is above the bound.
    tries = choice["fitting"][:4] or [choice["candidate"]]
    for cand in tries:
        allocs, labels = _level2_allocs(ctx, states, cand.mix)
        level2 = solve_layout(allocs, use_mip=False)
        if level2.peak + cl.reserve_bytes <= cl.gpu.memory_bytes:
            break
    if opt.use_mip and level2.peak > level2.lower_bound:
        level2 = solve_layout(allocs, time_limit=tl, use_mip=True, threads=opt.threads)
    mix, alpha_d = cand.mix, dict(cand.alpha_detail)
    alpha = mix.alpha
    times = _times(ctx, zero_stage, mix)
    keep = mix.keep
    swap_bytes = int(s_in + s_attn + alpha * s_other)   # floor: alpha fills the host budget exactly
    kept_bytes = s_in + s_attn + s_other
    host_rank = mix.host_bytes(LayerSizes(s_in, s_attn, s_other)) + states["host"]
    host_node = host_rank * cl.gpus_per_node
    device_peak = level2.peak + cl.reserve_bytes
    reasons = []
    if device_peak > cl.gpu.memory_bytes:
        reasons.append(f"device peak {format_bytes(device_peak)} exceeds the GPU's {format_bytes(cl.gpu.memory_bytes)}")
    if not cand.host_fits or host_node > cl.host_memory * (1 + 1e-12):
        need = (n - keep) * s_in + states["host"]
        reasons.append(f"host memory: each rank needs at least {format_bytes(need)} (the inputs of {n - keep} layers "
                       f"recomputing attention{_offloaded(opt) if states['host'] else ''}), "
                       f"{format_bytes(host_per_rank_budget)} available per rank")
    least = choice["least_host"]
    least_rank = None if least is None else least[1] + states["host"]
    # Which blocks are live at the step of the peak.
    curve = live_bytes_over_time(allocs)
    peak_step = max(curve, key=lambda x: x[1])[0] if curve else 0
    at_peak = {a.id: a.bytes for a in allocs if a.start <= peak_step < a.end}
    # NOTE [ SP buffers in Level 1 ]: what the layer arenas hold for SP, at the attention step.
    sp_buffers = {part: sum(a.bytes for a in lay.allocs if a.kind in ("ring_buffer", "ulysses_buffer"))
                  for part, lay in (("forward", ctx.level1.forward), ("backward", ctx.level1.backward))}
    policies = mix.policies()
    # NOTE [ Level-2 step timeline ]: everything but the model states, at its own highest step; with
    # the planned arenas, and as live bytes (the Level-1 lower bounds: no layout, what a count of live
    # storages sees).
    activation_peak = lower_bound([a for a in allocs if a.kind != "model_state"])
    live_ctx = PlanContext(prof, cl, opt, bound_level1(ctx.level1), ctx.model_name)
    activation_live = lower_bound([a for a in _level2_allocs(live_ctx, states, mix)[0] if a.kind != "model_state"])
    plan = {
        "memo_plan_version": PLAN_VERSION,
        "model": dict(model),
        "model_name": ctx.model_name,
        "seq_len": prof["seq_len"], "local_seq_len": prof["local_seq_len"], "micro_batch": prof["micro_batch"],
        "dtype": prof["dtype"], "sp": cl.sp, "sp_backend": degrees.backend,
        "sp_degrees": {"ulysses": degrees.ulysses, "ring": degrees.ring},
        "gpus": cl.gpus, "gpus_per_node": cl.gpus_per_node,
        "gpu": cl.gpu.to_dict(), "host_memory_bytes": int(cl.host_memory), "reserve_bytes": cl.reserve_bytes,
        "zero_stage": zero_stage, "offload_optimizer": opt.offload_optimizer,
        "offload_params": opt.offload_params, "keep_layers": keep,
        "keep_layers_chosen": opt.keep_layers is None,
        "layer_policies": policies, "tile_tokens": prof.get("tile_tokens"),
        "policy_counts": {p: policies.count(p) for p in ("memo", "input", "kept")},
        "alpha": alpha, "alpha_detail": alpha_d,
        "fits": not reasons, "reasons": reasons,
        "predicted": {"step_time_s": times.step_time_s, "mfu": times.mfu, "device_peak_bytes": int(device_peak),
                      "activation_peak_bytes": int(activation_peak),
                      "activation_live_peak_bytes": int(activation_live),
                      "host_bytes": int(host_node), "host_bytes_per_rank": int(host_rank),
                      "host_bytes_min": None if least_rank is None else int(least_rank * cl.gpus_per_node),
                      "host_bytes_min_per_rank": None if least_rank is None else int(least_rank),
                      "host_bytes_min_policies": None if least is None else least[0].policies(),
                      "times": times.to_dict(), "sp_comm": times.sp_comm.to_dict()},
        "policy_search": {"considered": choice["considered"], "fitting": len(choice["fitting"]),
                          # The least device bound of the mixes the host holds (else of the all-"input"
                          # ones) and the least host bytes of any mix: how far from fitting (the length
                          # search interpolates on them).
                          "least_device_bound_bytes": int(min(
                              (c.device_bound for c in choice["candidates"] if c.host_fits),
                              default=min(c.device_bound for c in choice["candidates"]))),
                          "least_host_bytes_per_rank": int(min(c.host_bytes for c in choice["candidates"])
                                                           + states["host"]),
                          "fastest": [c.summary() for c in choice["fitting"][:5]],
                          "chosen": cand.summary()},
        "model_states": states,
        "swap": {"layer_input_bytes": s_in, "attention_output_bytes": s_attn, "other_bytes": s_other,
                 "swapped_bytes_per_layer": swap_bytes, "recomputed_bytes_per_layer": int((1 - alpha) * s_other),
                 "swapped_layers": n - keep, "memo_layers": mix.memos, "input_layers": mix.inputs,
                 "input_swapped_bytes_per_layer": s_in, "mlp_saved_bytes_untiled": prof.get("mlp_saved_bytes", 0)},
        "layer": {"forward": ctx.level1.forward.to_dict(), "backward": ctx.level1.backward.to_dict(),
                  "embedding_forward_peak_bytes": ctx.level1.embedding_forward.peak,
                  "embedding_backward_peak_bytes": ctx.level1.embedding_backward.peak,
                  "head_peak_bytes": ctx.level1.head.peak, "sp_buffer_bytes": sp_buffers,
                  "input_backward_bytes": input_backward_bytes(ctx.level1, s_in)},
        "step": {**{k: v for k, v in level2.to_dict().items()}, "step_labels": labels, "peak_step": peak_step,
                 "live_at_peak": at_peak},
    }
    from .planfile import param_grad_requests, planned_allocations   # (planfile imports this module)
    plan["layer"]["param_grads"] = param_grad_requests(prof)   # NOTE [ Planned allocations ] rule 2
    plan["layer"]["planned"] = planned_allocations(plan)
    return plan


def _offloaded(opt: Options) -> str:
    return " + offloaded optimizer and weights" if opt.offload_params else " + offloaded optimizer"


def plan_for_stages(ctx: PlanContext, stage: Optional[int]) -> tuple[dict, list[dict]]:
    """The plan at ``stage``, or (None) at the lowest ZeRO stage that fits (the highest stage
    when none fits; stage 3 only with ``offload_params``). Returns (plan, plans of every stage tried)."""
    opt = ctx.options
    stages = [stage] if stage is not None else \
        [3] if opt.offload_params else [1, 2, 3] if opt.offload_optimizer else [0, 1, 2, 3]
    tried = []
    for s in stages:
        plan = finish_plan(ctx, s)
        plan["zero_stage_chosen"] = stage is None
        tried.append(plan)
        if plan["fits"]:
            return plan, tried
    return tried[-1], tried


def memory_rows(plan: dict) -> list[tuple[str, int, bool]]:
    """Rows of the memory table: (what, bytes per rank, live at the step's peak)."""
    live = plan["step"]["live_at_peak"]
    st = plan["model_states"]
    off = plan.get("offload_params", False)       # NOTE [ Parameter offload ] in cost.py
    rows = [("weights" + (" (on the host: parameter offload)" if off else ""), st["weights"], "weights" in live),
            ("gradients" + (" (one module's; the rest on the host)" if off else ""), st["gradients"],
                                                               any(k == "gradients" or k.endswith((".grad", "grads.rest")) for k in live)),
            ("optimizer states (device)", st["optimizer"], "optimizer" in live)]
    if st["zero3_gather"]:
        rows.append(("ZeRO-3 gather buffer", st["zero3_gather"], True))
    lay = plan["layer"]
    peak_ids = list(live)
    sp_buf = lay.get("sp_buffer_bytes", {})
    for part, tag in (("forward", ".fwd"), ("backward", ".bwd")):
        rows.append((f"layer {part} arena (Level 1)", lay[part]["peak_bytes"],
                     any(k.endswith(tag) and k.startswith("L") for k in peak_ids)))
        if sp_buf.get(part):
            # Inside that arena, at the attention step: NOTE [ SP buffers in Level 1 ].
            rows.append((f"  of which {plan.get('sp_backend', 'ring')} buffers (attention step)", sp_buf[part], False))
    if plan["swap"].get("input_layers"):
        # NOTE [ Level-2 step timeline ] rule 8: the forward again, then the backward.
        inputs = {i for i, p in enumerate(plan.get("layer_policies", [])) if p == "input"}
        rows.append(("'input' layer backward (forward again + backward)", lay.get("input_backward_bytes", 0),
                     any(k.endswith(".bwd") and int(k[1:-4]) in inputs for k in peak_ids if k.startswith("L"))))
    sw = plan["swap"]
    memo_ids = {i for i, p in enumerate(plan.get("layer_policies", [])) if p == "memo"} \
        if "layer_policies" in plan else set(range(plan["model"]["layers"]))

    def copy_live(ids: set) -> bool:
        return any(k.endswith((".swap_out", ".prefetch")) and int(k[1:k.index(".")]) in ids
                   for k in peak_ids if k.startswith("L"))
    if sw.get("input_layers"):
        inputs = set(range(plan["model"]["layers"])) - memo_ids - {
            i for i, p in enumerate(plan["layer_policies"]) if p == "kept"}
        rows.append(("swap buffer (per 'input' layer)", sw["input_swapped_bytes_per_layer"], copy_live(inputs)))
    rows += [
        ("swap buffer (per 'memo' layer)", sw["swapped_bytes_per_layer"] if memo_ids else 0, copy_live(memo_ids)),
        (f"kept layers ({plan['keep_layers']} x saved activations)",
         sum(v for k, v in live.items() if k.endswith(".kept")) or plan["keep_layers"] * (
             plan["swap"]["layer_input_bytes"] + plan["swap"]["attention_output_bytes"] + plan["swap"]["other_bytes"]),
         any(k.endswith(".kept") for k in peak_ids)),
        # NOTE [ Level-2 step timeline ] rule 6: the recomputed tokens' outputs, during one layer's backward.
        ("recompute block (per 'memo' layer)",
         plan["swap"].get("recomputed_bytes_per_layer", 0) if plan["swap"].get("memo_layers",
                                                                                plan["swap"].get("swapped_layers")) else 0,
         any(k.endswith(".recompute") for k in peak_ids)),
        ("LM head + loss block", lay["head_peak_bytes"], "head" in live),
        ("shared (RoPE cos/sin)", live.get("shared", 0), "shared" in live),
        ("runtime reserve (CUDA context, NCCL)", plan["reserve_bytes"], True),
    ]
    return rows


__all__ = ["Cluster", "Options", "PlanContext", "Level1", "solve_level1", "finish_plan", "plan_for_stages",
           "max_fitting_seq_len", "max_fitting_seq_len_interp", "memory_rows", "step_allocs", "trace_allocs", "layer_allocs", "ulysses_buffer_bytes",
           "swap_sizes", "PLAN_VERSION"]
