"""GPU profiles, model states under ZeRO, FLOPs and the step-time model. Torch-free.

NOTE [ Step-time model ]
  1. A layer's forward on one rank: its GEMM FLOPs at ``peak * gemm_eff`` plus its causal
     attention FLOPs (``2 s^2 q`` per sequence, q = heads x head_dim, split evenly over the SP
     ranks by the zigzag layout) at ``peak * attn_fwd_eff`` (x ``ring_eff`` when a ring is
     involved: NOTE [ SP communication model ] rule 4).
     Backward: twice the FLOPs, attention at ``attn_bwd_eff``.
     Where measured (``elementwise_passes`` > 0), the memory-bound element-wise ops around the
     GEMMs (norms, RoPE, SiLU, residual adds, dtype casts) add ``elementwise_passes`` HBM passes
     over the layer's saved-activation bytes per forward (twice that per backward): they scale
     with tokens x hidden while the GEMMs scale with tokens x hidden^2, so they matter for small
     hidden sizes (a third of a TinyLlama layer's non-attention time on H100, a sixth of Llama-2-7B's).
  2. Sequence-parallel communication per layer, by backend: see NOTE [ SP communication model ].
  3. Swapped bytes of a layer (input + attention output + LSE in full, alpha of the rest) are
     copied out during the next layer's forward and back in during the next layer's backward;
     the part of a copy longer than that compute is exposed. The last ``keep`` layers are not swapped.
  4. The dropped ``1 - alpha`` of the other tokens are recomputed before the layer's backward:
     the layer's GEMM (and element-wise) time, no attention, times ``1 - alpha``. Memory-bound element-wise ops are
     ignored throughout (they are a few percent at these lengths).
  5. MFU counts model FLOPs only (layers, attention, LM head; forward + backward = 3x forward),
     no recompute, over ``step_time * gpus * peak``.
  6. ZeRO gradient/parameter collectives and the optimizer step are added unhidden; at long
     lengths they are well under 1% of a step.
  7. Layer policies (NOTE [ Layer policies ] in memo/executor.py; the planner's side: NOTE [ Policy
     choice ] in planner/policies.py). A "memo" layer is rules 3-4. An "input" layer swaps only its
     input (copied like rule 3) and before its backward runs its whole forward again: the GEMM and
     element-wise time, the attention forward and the forward's exposed SP communication (the
     ring or the all-to-alls run again). A "kept" layer (the last ``keep``) copies and recomputes
     nothing.
  8. Token tiling (NOTE [ Token tiling ] in memo/tiling.py): a tiled MLP's backward runs the MLP's
     forward again, tile by tile: every tiled layer (whatever its policy) adds the MLP's GEMM time
     plus ``elementwise_passes`` over the bytes the untiled MLP would have saved
     (``mlp_saved_bytes``). Rule 1's element-wise passes count those bytes too: tiling changes
     what is saved, not the element-wise work. Where nothing the layer saves after the MLP's input
     depends on its output (the profile checks it on the traced layer: ``mlp_output_unused``;
     Llama, Mistral, Qwen), memo's recomputes save that input without running the MLP (NOTE
     [ Token tiling ] rule 7), so a "memo" layer's token-wise recompute and an "input" layer's
     forward again leave the MLP's time out: its forwards per step are two, as untiled at ratio 0.
  9. Parameter offload (``offload_params``: ZeRO-3 with the weights on the host, DeepSpeed's
     ``offload_param``; NOTE [ Parameter offload ] for the bytes). Every layer, whatever its policy,
     moves over the host link, per rank (its 1/``gpus`` shard; ZeRO-3's all-gather of the shards is
     rule 6's): its bf16 weights host-to-device before its forward and again before its backward
     (memo's recompute and an "input" layer's forward again run inside that backward, on the weights
     already gathered: no third copy), and its fp32 gradients device-to-host after its backward.
     With L a layer's parameters, ``w = wb L / gpus / host_link`` and ``g = 4 L / gpus / host_link``.
     DeepSpeed prefetches the next layer's weights while this one computes, so each copy hides
     behind one layer's compute and only its excess is exposed: forward ``max(0, w - t_fwd)``;
     backward, where the weights share the host-to-device direction with memo's prefetch of the
     swapped activations, ``max(0, w + a - t_bwd) - max(0, a - t_bwd)`` beyond rule 3's own
     exposure (``a`` the layer's copy: a "memo" or "input" layer's, 0 for a kept layer), and
     ``max(0, g - t_bwd)`` for the gradients (the other direction). The embedding, LM head and final norm (no layer compute to hide behind) move
     weights twice and gradients once fully exposed. The optimizer step then moves nothing: CPU
     Adam updates the host's weights in place (rule 6's ``p / 1e9`` per rank only).

NOTE [ SP communication model ]
  P = SP degree, s = S / P tokens per rank, b = micro batch, h / kv = heads / kv heads, d =
  head_dim, wb = activation bytes. Degrees: ``ring`` is a ring of R = P ranks; ``ulysses`` an
  all-to-all over U = P ranks; ``hybrid`` Ulysses over U = min(P, GPUs per node) ranks in a node
  and a ring over R = P / U groups across nodes. Bytes are what one rank sends, per layer.
  1. Ring (R > 1), zigzag: every rank does 1/R of its attention per ring step. Forward: R - 1
     steps, each sending one k+v block (2 b s kv d wb; in hybrid the block holds s U tokens of
     kv / U heads: the same bytes). Backward: R - 1 steps sending the k+v block and, with it, the
     accumulated dk+dv in fp32 (2 b s kv d 4), then one final step returning dk/dv to their
     owner. A step's transfer hides behind that step's attention; only the excess is exposed.
     The final backward step has nothing to hide behind: exposed in full.
  2. Ulysses (U > 1): all-to-alls over heads, never overlapped with compute (fully exposed).
     Each rank sends (U - 1) / U of: forward q, k, v (b s (h + 2 kv) d wb), then out
     (b s h d wb) and LSE (b s h 4) back; backward q, k, v, out, dout, LSE again
     (b s ((3 h + 2 kv) d wb + 4 h)), then dq, dk, dv back (b s (h + 2 kv) d wb).
  3. Links: a transfer inside a node runs at ``interconnect_Bps``, across nodes at
     ``inter_node_Bps``. A ring spanning nodes goes at the speed of its slowest hop. An all-to-all
     over more ranks than a node holds sends the part for the ranks of its own node over the
     interconnect and the rest over the inter-node link at the same time: the slower part counts.
  4. Attention runs at ``ring_eff`` of single-GPU flash attention only when a ring is involved
     (R > 1); Ulysses runs plain causal flash attention over the full (or, in hybrid, the
     Ulysses-gathered) sequence on h / U heads, and the work is balanced across ranks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Optional

from .presets import layer_parameters, mlp_kind, model_parameters

GIB = 1 << 30


@dataclass(frozen=True)
class GPUProfile:
    name: str
    peak_tflops: float          # dense bf16 peak
    memory_bytes: int
    host_link_Bps: float        # achieved device<->host bandwidth per GPU, one direction
    interconnect_Bps: float     # GPU<->GPU in a node (NVLink), one direction
    hbm_Bps: float              # device memory bandwidth (optimizer step)
    gemm_eff: float             # achieved / peak for large bf16 GEMMs
    attn_fwd_eff: float         # achieved / peak for causal flash attention, forward
    attn_bwd_eff: float         # ... backward
    ring_eff: float = 0.9       # zigzag ring attention vs single-GPU flash attention
    inter_node_Bps: float = 25e9  # per GPU across nodes (200 Gb/s InfiniBand)
    elementwise_passes: float = 0.0  # HBM passes over a layer's saved bytes by its element-wise ops
                                     # (NOTE [ Step-time model ] rule 1); 0: not modelled (not measured)
    notes: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


# Peaks, memory and links from REFERENCE.md. Efficiencies are model-FLOP rates / peak:
# A100/A800 bf16 GEMMs ~75%; FlashAttention-2 forward ~68% for causal head_dim 128 at long
# lengths; its backward reaches ~63% in the FlashAttention-2 paper's own count, which includes
# recomputing Q K^T (2.5x the forward's FLOPs instead of the 2x counted as model FLOPs), so ~50% of
# model FLOPs. On H100 FlashAttention-2 reaches roughly a third of peak (FlashAttention-3 about
# double; memo's flash extra is FlashAttention-2), and an 8192^3 bf16 GEMM ~798 TFLOP/s (81%).
# Ring efficiency 0.9: ring-flash-attention's zigzag figure. All overridable (--peak-tflops etc.).
#
# NOTE [ Measured H100 constants ]
#   From memo's run on one H100 80GB HBM3 (torch 2.11 + CUDA 13, cuDNN attention; 2026-11-22,
#   measured with benchmarks/gpu_step.py and benchmarks/gpu_check.py; the figures are in
#   tests/test_planner_h100.py).
#   1. host_link_Bps 53 GB/s: 1 GB bf16 token slices to/from pinned host, 53.0 D2H / 52.7 H2D
#      (contiguous cudaMemcpy 54.1-54.9).
#   2. gemm_eff 0.80: a large bf16 GEMM on H100 (~798 of 989 TFLOP/s; not re-measured there).
#   3. attn_fwd_eff 0.70, attn_bwd_eff 0.31 and elementwise_passes 5.3: the least-squares fit
#      (relative error) of this step-time model to the 14 measured forward + backward step times
#      of RESULTS.md (TinyLlama-1.1B shape: no saving 16K/32K, HF checkpointing 16K-128K, memo
#      ratio 0 16K-128K; Llama-2-7B shape: checkpointing and memo ratio 0 at 32K/64K), with
#      gemm_eff fixed at 0.80. Three kernel rates for the whole table, none per run: every one of
#      the 14 steps is then predicted within 10% (tests/test_planner_h100.py checks four).
#      Attention runs at ~690 TFLOP/s forward and ~300 backward (model FLOPs; cuDNN's backward
#      recomputes the attention matrix, which model FLOPs do not count).
#   4. hbm_Bps 3.35 TB/s: the H100 SXM data sheet.
H100_MEASURED = dict(host_link_Bps=53e9, interconnect_Bps=450e9, hbm_Bps=3.35e12, gemm_eff=0.80, attn_fwd_eff=0.70,
                     attn_bwd_eff=0.31, elementwise_passes=5.3, notes="measured on one H100 (cuDNN attention)")
GPU_PROFILES: dict[str, GPUProfile] = {
    "a800": GPUProfile("a800", 312.0, 80 * GIB, 25e9, 200e9, 2.0e12, 0.75, 0.68, 0.50,
                       notes="A100 variant, NVLink capped at 400 GB/s"),
    "a100-80g": GPUProfile("a100-80g", 312.0, 80 * GIB, 25e9, 300e9, 2.0e12, 0.75, 0.68, 0.50),
    "h100": GPUProfile("h100", 989.0, 80 * GIB, **H100_MEASURED),
    # Same GH100 die and cuDNN kernels as the H100 (the efficiencies carry over), faster HBM.
    "h200": GPUProfile("h200", 989.0, 141 * 10**9, **dict(H100_MEASURED, hbm_Bps=4.8e12)),
}
GPU_ALIASES = {"a100": "a100-80g", "a100-80gb": "a100-80g", "h100-80g": "h100", "h100-sxm": "h100", "h200-141g": "h200"}


class UnknownGPU(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


def get_gpu(name: str, **overrides) -> GPUProfile:
    """A GPU profile by name, with fields overridden (None values are ignored)."""
    key = GPU_ALIASES.get(name.lower(), name.lower())
    if key not in GPU_PROFILES:
        raise UnknownGPU(f"unknown GPU {name!r}; known: {', '.join(GPU_PROFILES)} (override numbers with "
                         f"--peak-tflops, --gpu-memory, --pcie)")
    return replace(GPU_PROFILES[key], **{k: v for k, v in overrides.items() if v is not None})


DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


# --- sequence-parallel backends ------------------------------------------------------------------

SP_BACKENDS = ("ring", "ulysses", "hybrid")


class SPBackendError(ValueError):
    """A sequence-parallel backend this model or cluster cannot use; the message names the fix."""


@dataclass(frozen=True)
class SPDegrees:
    """How the SP degree splits: ``ulysses`` ranks exchange heads by all-to-all (U), ``ring``
    groups pass key/value blocks (R); ``ulysses * ring`` is the SP degree."""

    backend: str
    ulysses: int
    ring: int


def sp_degrees(model: dict, sp: int, backend: str = "ring", gpus_per_node: int = 8) -> SPDegrees:
    """The Ulysses and ring degrees of ``backend`` at SP degree ``sp``; raises ``SPBackendError``
    for an unknown backend, heads the Ulysses degree does not divide, or a hybrid split that
    does not divide ``sp``. See NOTE [ SP communication model ]."""
    if backend not in SP_BACKENDS:
        raise SPBackendError(f"memo.plan: --sp-backend {backend!r} is not one of {', '.join(SP_BACKENDS)}; pass one "
                             f"of those (ring, the default, works for any head count)")
    if backend == "ring":
        return SPDegrees(backend, 1, sp)
    u = sp if backend == "ulysses" else min(sp, gpus_per_node)
    if backend == "hybrid" and sp % u:
        raise SPBackendError(f"memo.plan: --sp-backend hybrid runs Ulysses over the {u} GPUs of a node and a ring "
                             f"across nodes, but {u} does not divide --sp {sp}; choose --sp a multiple of {u} (or "
                             f"--gpus-per-node dividing {sp}), or use --sp-backend ring")
    bad = [f"{model[k]} {name}" for k, name in (("heads", "heads"), ("kv_heads", "kv heads")) if model[k] % u]
    if bad:
        where = "over --sp" if backend == "ulysses" else "over the GPUs of a node (min(--sp, --gpus-per-node))"
        raise SPBackendError(f"memo.plan: --sp-backend {backend} splits attention heads {where} = {u} ranks, but the "
                             f"model has {' and '.join(bad)}, not divisible by {u}; use --sp-backend ring, which has "
                             f"no head-count limit (or an SP degree dividing {model['heads']} heads and "
                             f"{model['kv_heads']} kv heads)")
    return SPDegrees(backend, u, sp // u)


@dataclass
class SPComm:
    """One rank's sequence-parallel communication of one layer. See NOTE [ SP communication model ]."""

    backend: str
    ulysses_degree: int
    ring_degree: int
    ring_fwd_bytes: float          # all ring steps together
    ring_bwd_bytes: float
    ring_fwd_transfer_s: float
    ring_bwd_transfer_s: float
    ring_fwd_exposed_s: float      # what attention does not hide
    ring_bwd_exposed_s: float
    a2a_fwd_bytes: float           # Ulysses all-to-alls, sent by this rank
    a2a_bwd_bytes: float
    a2a_fwd_s: float               # never overlapped: all exposed
    a2a_bwd_s: float

    @property
    def fwd_exposed_s(self) -> float:
        return self.ring_fwd_exposed_s + self.a2a_fwd_s

    @property
    def bwd_exposed_s(self) -> float:
        return self.ring_bwd_exposed_s + self.a2a_bwd_s

    def to_dict(self) -> dict:
        return {**asdict(self), "fwd_exposed_s": self.fwd_exposed_s, "bwd_exposed_s": self.bwd_exposed_s}


def _all_to_all_s(nbytes: float, group: int, gpu: GPUProfile, gpus_per_node: int) -> float:
    """Seconds to send ``nbytes`` (already the (group-1)/group share) in an all-to-all over
    ``group`` ranks. See NOTE [ SP communication model ] rule 3."""
    if group <= 1:
        return 0.0
    local = min(group, gpus_per_node)
    intra = nbytes * (local - 1) / (group - 1)
    return max(intra / gpu.interconnect_Bps, (nbytes - intra) / gpu.inter_node_Bps)


def sp_comm(model: dict, gpu: GPUProfile, *, seq_len: int, micro_batch: int, sp: int, gpus_per_node: int,
            backend: str = "ring", attn_fwd_s: float = 0.0, attn_bwd_s: float = 0.0,
            dtype: str = "bf16") -> SPComm:
    """Bytes, transfer and exposed seconds of one layer's SP communication on one rank;
    ``attn_fwd_s`` / ``attn_bwd_s`` are that rank's attention time of the layer, which ring
    steps hide behind. See NOTE [ SP communication model ]."""
    deg = sp_degrees(model, sp, backend, gpus_per_node)
    u, r = deg.ulysses, deg.ring
    wb = DTYPE_BYTES[dtype]
    tokens = micro_batch * (seq_len // sp)          # b s
    h, kv, d = model["heads"], model["kv_heads"], model["head_dim"]
    ring_part = (0.0,) * 6          # bytes fwd, bwd; transfer s fwd, bwd; exposed s fwd, bwd
    if r > 1:
        # Rule 1: the block holds s U tokens of kv / U heads, i.e. b s kv d elements for k and v each.
        block = 2 * tokens * kv * d * wb
        dkv = 2 * tokens * kv * d * 4
        link = gpu.interconnect_Bps if sp <= gpus_per_node else gpu.inter_node_Bps
        fwd_b, bwd_b = (r - 1) * block, (r - 1) * (block + dkv) + dkv
        ring_part = (fwd_b, bwd_b, fwd_b / link, bwd_b / link,
                     (r - 1) * max(0.0, block / link - attn_fwd_s / r),
                     (r - 1) * max(0.0, (block + dkv) / link - attn_bwd_s / r) + dkv / link)
    a2a_f = a2a_b = 0.0
    if u > 1:
        share = (u - 1) / u
        a2a_f = share * tokens * ((h + 2 * kv) * d * wb + h * d * wb + 4 * h)
        a2a_b = share * tokens * ((3 * h + 2 * kv) * d * wb + 4 * h + (h + 2 * kv) * d * wb)
    return SPComm(backend, u, r, *ring_part, a2a_f, a2a_b, _all_to_all_s(a2a_f, u, gpu, gpus_per_node),
                  _all_to_all_s(a2a_b, u, gpu, gpus_per_node))


# --- model states --------------------------------------------------------------------------------

# NOTE [ Parameter offload ]
#   ``offload_params`` is ZeRO-3 with DeepSpeed's ``offload_param`` (device cpu) on top of optimizer
#   offload: the job ALST runs at 500K tokens on one H100.
#   1. Host, per rank: its 1/ranks shard of the bf16 weights, the fp32 gradients and Adam's states
#      (fp32 master, momentum, variance): (wb + 4 + 12) p / ranks bytes.
#   2. Device: no resident weights. ZeRO-3 gathers one module whole at a time (a decoder layer is a
#      leaf module, NOTE [ ZeRO-3 and recomputation ] rule 3 in integrations/deepspeed.py; the
#      embedding and the LM head are one weight each) and prefetches the next: the gather buffer is
#      two of the largest such module, ``2 wb max(layer, vocab x hidden)``. One module's bf16
#      gradients wait on the device until they are copied to the host: ``wb max(layer, vocab x
#      hidden)``, live for the whole step (NOTE [ Level-2 step timeline ] rule 7 does not apply).
#   3. Needs ZeRO stage 3 (only stage 3 partitions the weights) and ``offload_optimizer`` (the
#      gradients go to the host for CPU Adam; DeepSpeed refuses offload_param without it).
#   4. Its time: NOTE [ Step-time model ] rule 9.

def model_state_bytes(model: dict, *, zero_stage: int, ranks: int, offload_optimizer: bool,
                      dtype: str = "bf16", offload_params: bool = False) -> dict:
    """Bytes per rank of weights, gradients and optimizer states (Adam: fp32 master weights,
    momentum, variance), device and host, under ZeRO ``zero_stage`` sharded over ``ranks``.

    Mixed precision: 2 (weights) + 2 (grads) + 12 (master, m, v) = 16 bytes per parameter
    unsharded. ZeRO-1 shards the optimizer states, ZeRO-2 also the gradients, ZeRO-3 also the
    weights (plus a gather buffer of two layers' full weights). Offload keeps the optimizer
    states and an fp32 gradient copy on the host (DeepSpeed's CPU Adam), ZeRO stage >= 1 only.
    ``offload_params`` also keeps the weights there: NOTE [ Parameter offload ].
    """
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"memo.plan: ZeRO stage {zero_stage} is not 0, 1, 2 or 3")
    if offload_optimizer and zero_stage == 0:
        raise ValueError("memo.plan: --offload-optimizer needs ZeRO stage 1, 2 or 3 (it offloads the sharded "
                         "optimizer states); add --zero-stage 1")
    if offload_params and (zero_stage != 3 or not offload_optimizer):
        raise ValueError(f"memo.plan: --offload-params needs ZeRO stage 3 and --offload-optimizer (only stage 3 "
                         f"partitions the weights, and their gradients go to the host for CPU Adam); got stage "
                         f"{zero_stage}{'' if offload_optimizer else ' without --offload-optimizer'}: add "
                         f"--zero-stage 3 --offload-optimizer")
    p = model_parameters(model)
    wb = DTYPE_BYTES[dtype]
    master = 4 if wb < 4 else 0
    opt_per_param = master + 8
    weights = wb * p / (ranks if zero_stage >= 3 else 1)
    gather = 2 * wb * layer_parameters(model) if zero_stage >= 3 else 0
    grads = wb * p / (ranks if zero_stage >= 2 else 1)
    opt = opt_per_param * p / (ranks if zero_stage >= 1 else 1)
    host = 0.0
    if offload_optimizer:
        host = opt + 4 * p / ranks
        opt = 0.0
    if offload_params:
        # NOTE [ Parameter offload ] rules 1 and 2.
        module = max(layer_parameters(model), model["vocab"] * model["hidden"])
        host += weights
        weights, gather, grads = 0.0, 2 * wb * module, wb * module
    return {"parameters": p, "weights": int(weights), "zero3_gather": int(gather), "gradients": int(grads),
            "optimizer": int(opt), "device_total": int(weights + gather + grads + opt), "host": int(host)}


# --- FLOPs and time ------------------------------------------------------------------------------

def layer_flops(model: dict, seq_len: int, micro_batch: int = 1) -> dict:
    """Forward FLOPs of one decoder layer over a whole sequence (REFERENCE.md formulas); ``mlp``
    is the MLP's part of ``gemm``."""
    s, h, f = seq_len * micro_batch, model["hidden"], model["intermediate"]
    q = model["heads"] * model["head_dim"]
    kv = model["kv_heads"] * model["head_dim"]
    proj = 2 * s * h * (q + 2 * kv) + 2 * s * q * h
    mlp = 2 * s * h * f * (2 if mlp_kind(model) == "gelu" else 3)
    attn = 2 * seq_len * seq_len * q * micro_batch
    return {"gemm": float(proj + mlp), "attention": float(attn), "mlp": float(mlp)}


def model_flops_per_step(model: dict, seq_len: int, micro_batch: int, dp: int) -> float:
    """Model FLOPs (forward + backward, no recompute) of one step over all data-parallel groups."""
    lf = layer_flops(model, seq_len, micro_batch)
    head = 2 * seq_len * micro_batch * model["hidden"] * model["vocab"]
    return 3.0 * (model["layers"] * (lf["gemm"] + lf["attention"]) + head) * dp


@dataclass
class StepTimes:
    layer_forward_s: float
    layer_backward_s: float
    layer_recompute_s: float
    ring_exposed_fwd_s: float
    ring_exposed_bwd_s: float
    ulysses_a2a_fwd_s: float      # per layer, never overlapped
    ulysses_a2a_bwd_s: float
    sp_comm_fwd_s: float          # per layer, exposed: ring excess + all-to-alls
    sp_comm_bwd_s: float
    copy_out_s: float
    copy_in_s: float
    copy_exposed_s: float
    head_s: float
    optimizer_s: float
    collectives_s: float
    step_time_s: float
    model_flops: float
    mfu: float
    sp_comm: Optional[SPComm] = None  # the detail behind sp_comm_*_s (its own entry in a plan)
    # Layer policies and tiling (rules 7 and 8); per layer unless named per step.
    memo_layers: int = 0
    input_layers: int = 0
    kept_layers: int = 0
    layer_input_recompute_s: float = 0.0   # an "input" layer's forward again (attention and SP comm included)
    input_copy_s: float = 0.0              # an "input" layer's copy, each way
    mlp_recompute_s: float = 0.0           # a tiled layer's extra MLP forward (0 untiled)
    recompute_per_step_s: float = 0.0      # all recompute of the step: memo + input + tiled MLP
    # Parameter offload (rule 9); 0 without it.
    param_copy_s: float = 0.0              # a layer's weights host-to-device, once (forward; again in backward)
    grad_copy_s: float = 0.0               # a layer's gradients device-to-host
    param_offload_exposed_s: float = 0.0   # per step: what compute does not hide, the non-layer modules included

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "sp_comm"}


def step_time(model: dict, gpu: GPUProfile, *, seq_len: int, micro_batch: int, sp: int, gpus: int,
              gpus_per_node: int, alpha: float, swap_bytes_fixed: float, swap_bytes_other: float, keep_layers: int,
              zero_stage: int, offload_optimizer: bool, dtype: str = "bf16", sp_backend: str = "ring",
              input_layers: int = 0, swap_bytes_input: Optional[float] = None, tiled: bool = False,
              mlp_saved_bytes: float = 0.0, offload_params: bool = False,
              mlp_output_unused: bool = False) -> StepTimes:
    """Predicted time of one training step on one rank. See NOTE [ Step-time model ].

    The first ``input_layers`` swapped layers run the "input" policy and copy ``swap_bytes_input``
    (the layer input; default ``swap_bytes_fixed``, an over-estimate) each way; the others, but
    the last ``keep_layers``, run "memo" (rule 7). ``tiled``: the MLP is tiled and the untiled one
    would save ``mlp_saved_bytes`` besides its input (rule 8); ``mlp_output_unused``: memo's
    recomputes skip the tiled MLP (rule 8). ``offload_params``: the weights live
    on the host (rule 9; ZeRO stage 3 with ``offload_optimizer`` only)."""
    peak = gpu.peak_tflops * 1e12
    n = model["layers"]
    lf = layer_flops(model, seq_len, micro_batch)
    deg = sp_degrees(model, sp, sp_backend, gpus_per_node)
    ring = gpu.ring_eff if deg.ring > 1 else 1.0        # NOTE [ SP communication model ] rule 4
    # Rule 1: GEMMs, plus the element-wise passes over the layer's saved bytes (this rank's).
    gemm_f = lf["gemm"] / sp / (peak * gpu.gemm_eff) + \
        gpu.elementwise_passes * (swap_bytes_fixed + swap_bytes_other + mlp_saved_bytes) / gpu.hbm_Bps
    attn_f = lf["attention"] / sp / (peak * gpu.attn_fwd_eff * ring)
    attn_b = 2 * lf["attention"] / sp / (peak * gpu.attn_bwd_eff * ring)
    t_fwd, t_bwd = gemm_f + attn_f, 2 * gemm_f + attn_b
    comm = sp_comm(model, gpu, seq_len=seq_len, micro_batch=micro_batch, sp=sp, gpus_per_node=gpus_per_node,
                   backend=sp_backend, attn_fwd_s=attn_f, attn_bwd_s=attn_b, dtype=dtype)
    keep = min(max(keep_layers, 0), n)
    n_input = min(max(input_layers, 0), n - keep)
    n_memo = n - keep - n_input
    # Rule 8: the tiled backward's MLP forward, in every layer.
    mlp_f = (lf["mlp"] / sp / (peak * gpu.gemm_eff) + gpu.elementwise_passes * mlp_saved_bytes / gpu.hbm_Bps
             if tiled else 0.0)
    skipped = mlp_f if mlp_output_unused else 0.0               # rule 8: the recomputes skip the MLP
    recompute = (1.0 - alpha) * (gemm_f - skipped)
    input_recompute = gemm_f - skipped + attn_f + comm.fwd_exposed_s      # rule 7
    swapped = swap_bytes_fixed + alpha * swap_bytes_other
    copy = swapped / gpu.host_link_Bps
    copy_in = (swap_bytes_fixed if swap_bytes_input is None else swap_bytes_input) / gpu.host_link_Bps
    exposed = n_memo * (max(0.0, copy - t_fwd) + max(0.0, copy - t_bwd)) + \
        n_input * (max(0.0, copy_in - t_fwd) + max(0.0, copy_in - t_bwd))
    head = 3 * 2 * seq_len * micro_batch * model["hidden"] * model["vocab"] / sp / (peak * gpu.gemm_eff)
    states = model_state_bytes(model, zero_stage=zero_stage, ranks=gpus, offload_optimizer=offload_optimizer,
                               dtype=dtype, offload_params=offload_params)
    p = states["parameters"]
    wb = DTYPE_BYTES[dtype]
    param_copy = grad_copy = param_exposed = 0.0
    if offload_params:
        # Rule 9: per rank, each layer's weight shard in twice and its fp32 gradient shard out once.
        lp = layer_parameters(model) / gpus
        param_copy, grad_copy = wb * lp / gpu.host_link_Bps, 4 * lp / gpu.host_link_Bps
        # Forward: the weights alone host-to-device. Backward: the weights after memo's prefetch on the
        # same direction (memo layers copy ``copy``, input layers ``copy_in``, kept layers nothing), the
        # gradients on the other.
        def bwd_extra(a: float) -> float:
            return max(0.0, param_copy + a - t_bwd) - max(0.0, a - t_bwd)
        param_exposed = n * (max(0.0, param_copy - t_fwd) + max(0.0, grad_copy - t_bwd)) + \
            n_memo * bwd_extra(copy) + n_input * bwd_extra(copy_in) + keep * bwd_extra(0.0)
        rest = p / gpus - n * lp                     # embedding, LM head, final norm: nothing hides them
        param_exposed += (2 * wb + 4) * rest / gpu.host_link_Bps
        optimizer = p / gpus / 1e9                   # CPU Adam; the weights stay on the host
    elif offload_optimizer:
        # fp32 grads out, bf16 weights back, CPU Adam at ~1e9 parameters/s per rank.
        optimizer = (4 + DTYPE_BYTES[dtype]) * p / gpus / gpu.host_link_Bps + p / gpus / 1e9
    else:
        optimizer = 2 * (states["optimizer"] + states["weights"] + states["gradients"]) / gpu.hbm_Bps
    link = gpu.interconnect_Bps if gpus <= gpus_per_node else gpu.inter_node_Bps
    grad_bytes = DTYPE_BYTES[dtype] * p
    volume = 2 * grad_bytes * (gpus - 1) / gpus       # all-reduce, or reduce-scatter + all-gather
    if zero_stage == 3:
        volume += grad_bytes * (gpus - 1) / gpus      # parameters gathered again for the backward
    collectives = volume / link if gpus > 1 else 0.0
    recompute_step = n_memo * recompute + n_input * input_recompute + n * mlp_f
    total = (n * (t_fwd + t_bwd + comm.fwd_exposed_s + comm.bwd_exposed_s) + recompute_step + exposed + head
             + optimizer + collectives + param_exposed)
    dp = max(gpus // sp, 1)
    flops = model_flops_per_step(model, seq_len, micro_batch, dp)
    mfu = flops / (total * gpus * peak)
    return StepTimes(t_fwd, t_bwd, recompute, comm.ring_fwd_exposed_s, comm.ring_bwd_exposed_s, comm.a2a_fwd_s,
                     comm.a2a_bwd_s, comm.fwd_exposed_s, comm.bwd_exposed_s, copy, copy, exposed, head, optimizer,
                     collectives, total, flops, mfu, comm, memo_layers=n_memo, input_layers=n_input,
                     kept_layers=keep, layer_input_recompute_s=input_recompute, input_copy_s=copy_in,
                     mlp_recompute_s=mlp_f, recompute_per_step_s=recompute_step, param_copy_s=param_copy,
                     grad_copy_s=grad_copy, param_offload_exposed_s=param_exposed)
