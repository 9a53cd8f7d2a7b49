"""GPU profiles, model states under ZeRO, FLOPs and the step-time model. Torch-free.

NOTE [ Step-time model ]
  1. A layer's forward on one rank: its GEMM FLOPs at ``peak * gemm_eff`` plus its causal
     attention FLOPs (``2 s^2 q`` per sequence, q = heads x head_dim, split evenly over the SP
     ranks by the zigzag layout) at ``peak * attn_fwd_eff`` (x ``ring_eff`` when sp > 1).
     Backward: twice the FLOPs, attention at ``attn_bwd_eff``.
  2. Ring attention sends one key/value block per ring step (and, in backward, also its
     gradient); a step's transfer hides behind that step's attention compute, the excess is exposed.
  3. Swapped bytes of a layer (input + attention output + LSE in full, alpha of the rest) are
     copied out during the next layer's forward and back in during the next layer's backward;
     the part of a copy longer than that compute is exposed. The last ``keep`` layers are not swapped.
  4. The dropped ``1 - alpha`` of the other tokens are recomputed before the layer's backward:
     the layer's GEMM time (no attention) times ``1 - alpha``. Memory-bound element-wise ops are
     ignored throughout (they are a few percent at these lengths).
  5. MFU counts model FLOPs only (layers, attention, LM head; forward + backward = 3x forward),
     no recompute, over ``step_time * gpus * peak``.
  6. ZeRO gradient/parameter collectives and the optimizer step are added unhidden; at long
     lengths they are well under 1% of a step.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

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
GPU_PROFILES: dict[str, GPUProfile] = {
    "a800": GPUProfile("a800", 312.0, 80 * GIB, 25e9, 200e9, 2.0e12, 0.75, 0.68, 0.50,
                       notes="A100 variant, NVLink capped at 400 GB/s"),
    "a100-80g": GPUProfile("a100-80g", 312.0, 80 * GIB, 25e9, 300e9, 2.0e12, 0.75, 0.68, 0.50),
    "h100": GPUProfile("h100", 989.0, 80 * GIB, 50e9, 450e9, 3.35e12, 0.80, 0.35, 0.28,
                       notes="attention efficiencies of FlashAttention-2"),
    "h200": GPUProfile("h200", 989.0, 141 * 10**9, 50e9, 450e9, 4.8e12, 0.80, 0.35, 0.28,
                       notes="attention efficiencies of FlashAttention-2"),
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


# --- model states --------------------------------------------------------------------------------

def model_state_bytes(model: dict, *, zero_stage: int, ranks: int, offload_optimizer: bool,
                      dtype: str = "bf16") -> dict:
    """Bytes per rank of weights, gradients and optimizer states (Adam: fp32 master weights,
    momentum, variance), device and host, under ZeRO ``zero_stage`` sharded over ``ranks``.

    Mixed precision: 2 (weights) + 2 (grads) + 12 (master, m, v) = 16 bytes per parameter
    unsharded. ZeRO-1 shards the optimizer states, ZeRO-2 also the gradients, ZeRO-3 also the
    weights (plus a gather buffer of two layers' full weights). Offload keeps the optimizer
    states and an fp32 gradient copy on the host (DeepSpeed's CPU Adam), ZeRO stage >= 1 only.
    """
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"memo.plan: ZeRO stage {zero_stage} is not 0, 1, 2 or 3")
    if offload_optimizer and zero_stage == 0:
        raise ValueError("memo.plan: --offload-optimizer needs ZeRO stage 1, 2 or 3 (it offloads the sharded "
                         "optimizer states); add --zero-stage 1")
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
    return {"parameters": p, "weights": int(weights), "zero3_gather": int(gather), "gradients": int(grads),
            "optimizer": int(opt), "device_total": int(weights + gather + grads + opt), "host": int(host)}


# --- FLOPs and time ------------------------------------------------------------------------------

def layer_flops(model: dict, seq_len: int, micro_batch: int = 1) -> dict:
    """Forward FLOPs of one decoder layer over a whole sequence (REFERENCE.md formulas)."""
    s, h, f = seq_len * micro_batch, model["hidden"], model["intermediate"]
    q = model["heads"] * model["head_dim"]
    kv = model["kv_heads"] * model["head_dim"]
    proj = 2 * s * h * (q + 2 * kv) + 2 * s * q * h
    mlp = 2 * s * h * f * (2 if mlp_kind(model) == "gelu" else 3)
    attn = 2 * seq_len * seq_len * q * micro_batch
    return {"gemm": float(proj + mlp), "attention": float(attn)}


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
    copy_out_s: float
    copy_in_s: float
    copy_exposed_s: float
    head_s: float
    optimizer_s: float
    collectives_s: float
    step_time_s: float
    model_flops: float
    mfu: float

    def to_dict(self) -> dict:
        return asdict(self)


def step_time(model: dict, gpu: GPUProfile, *, seq_len: int, micro_batch: int, sp: int, gpus: int,
              gpus_per_node: int, alpha: float, swap_bytes_fixed: float, swap_bytes_other: float, keep_layers: int,
              zero_stage: int, offload_optimizer: bool, dtype: str = "bf16") -> StepTimes:
    """Predicted time of one training step on one rank. See NOTE [ Step-time model ]."""
    peak = gpu.peak_tflops * 1e12
    n = model["layers"]
    lf = layer_flops(model, seq_len, micro_batch)
    ring = gpu.ring_eff if sp > 1 else 1.0
    gemm_f = lf["gemm"] / sp / (peak * gpu.gemm_eff)
    attn_f = lf["attention"] / sp / (peak * gpu.attn_fwd_eff * ring)
    attn_b = 2 * lf["attention"] / sp / (peak * gpu.attn_bwd_eff * ring)
    t_fwd, t_bwd = gemm_f + attn_f, 2 * gemm_f + attn_b
    # Ring: P - 1 transfers of a key/value block of s/P tokens, each behind 1/P of the attention.
    ring_fwd = ring_bwd = 0.0
    if sp > 1:
        wb = DTYPE_BYTES[dtype]
        kv_block = 2 * micro_batch * (seq_len // sp) * model["kv_heads"] * model["head_dim"] * wb
        link = gpu.interconnect_Bps if sp <= gpus_per_node else gpu.inter_node_Bps
        ring_fwd = (sp - 1) * max(0.0, kv_block / link - attn_f / sp)
        ring_bwd = (sp - 1) * max(0.0, 2 * kv_block / link - attn_b / sp)
    recompute = (1.0 - alpha) * gemm_f
    swapped = swap_bytes_fixed + alpha * swap_bytes_other
    swapped_layers = max(n - keep_layers, 0)
    copy = swapped / gpu.host_link_Bps
    exposed = swapped_layers * (max(0.0, copy - t_fwd) + max(0.0, copy - t_bwd))
    head = 3 * 2 * seq_len * micro_batch * model["hidden"] * model["vocab"] / sp / (peak * gpu.gemm_eff)
    states = model_state_bytes(model, zero_stage=zero_stage, ranks=gpus, offload_optimizer=offload_optimizer,
                               dtype=dtype)
    p = states["parameters"]
    if offload_optimizer:
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
    total = (n * (t_fwd + t_bwd + recompute) + ring_fwd * n + ring_bwd * n + exposed + head + optimizer
             + collectives)
    dp = max(gpus // sp, 1)
    flops = model_flops_per_step(model, seq_len, micro_batch, dp)
    mfu = flops / (total * gpus * peak)
    return StepTimes(t_fwd, t_bwd, recompute, ring_fwd, ring_bwd, copy, copy, exposed, head, optimizer, collectives,
                     total, flops, mfu)
