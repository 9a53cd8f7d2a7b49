"""Varlen kernels for the documents of a diagonal block (GPU-only; NOTE [ Document blocks ] rule 6).

The block's tokens, (b, H, s, d), become one packed batch (b*s, H, d) in which every document of
every row is one sequence (cu_seqlens from the document runs); the kernel's out and log-sum-exp,
(b*s, H, d) and (H, b*s) fp32, are put back in (b, H, s, d) and (b, H, s). The backward takes the
merged out and lse (the contract of memo.attention.kernels).

Kernels, in order of preference:
  flash_attn  flash-attn's ``_flash_attn_varlen_forward/backward`` (2.7/2.8 signatures), when
              flash-attn is installed and chosen (``memo.attention.flash``: fp16/bf16 on CUDA under
              MEMO_ATTENTION_KERNEL=auto, always under =flash_attn).
  torch       torch.nn.attention.varlen's ops (``torch.ops.torch_attn._varlen_attn`` and
              ``_varlen_attn_backward``), where this torch has them: CUDA, fp16/bf16.
Neither: the documents run one dense kernel call each (memo.attention.documents), as on the CPU.
"""

from __future__ import annotations

import functools
import importlib
from typing import Optional

import torch

from memo.attention import flash


@functools.lru_cache(maxsize=None)
def _torch_ops():
    """torch.nn.attention.varlen's private forward/backward ops, or None where this torch lacks them."""
    try:
        importlib.import_module("torch.nn.attention.varlen")
        ops = torch.ops.torch_attn
        return ops._varlen_attn, ops._varlen_attn_backward
    except (ImportError, AttributeError, RuntimeError):
        return None


def kernel_for(q: torch.Tensor) -> Optional[str]:
    """Which varlen kernel runs the diagonal block of ``q``'s documents, or None (one dense call per document)."""
    if flash.use_flash(q, None) and hasattr(flash._interface(), "_flash_attn_varlen_forward"):
        return "flash_attn"
    if q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16) and _torch_ops() is not None:
        return "torch"
    return None


def describe() -> dict:
    """For memo.backend_info(): which kernel packed documents use on each device, and why."""
    fa = flash._interface() is not None and hasattr(flash._interface(), "_flash_attn_varlen_forward")
    on_cuda = ("flash-attn varlen (_flash_attn_varlen_forward/backward), fp16/bf16" if fa else
               "torch varlen (torch.nn.attention.varlen), fp16/bf16" if _torch_ops() is not None else
               "one dense kernel call per document (no varlen kernel: flash-attn not installed and this torch "
               "has no torch.nn.attention.varlen)")
    return {"cpu": "one torch CPU flash kernel call per document and block, merged by log-sum-exp (no mask)",
            "cuda": on_cuda + "; fp32 and blocks off the diagonal: one dense kernel call per document"}


def _pack(x: torch.Tensor) -> torch.Tensor:
    b, h, s, d = x.shape
    return x.transpose(1, 2).reshape(b * s, h, d)


def _unpack(x: torch.Tensor, b: int) -> torch.Tensor:
    total, h, d = x.shape
    return x.reshape(b, total // b, h, d).transpose(1, 2)


def _cu_seqlens(pairs, b: int, s: int, device) -> tuple[torch.Tensor, int]:
    starts = [r * s + qa for r, qa, qb, ka, kb in pairs]
    assert all((qa, qb) == (ka, kb) for _, qa, qb, ka, kb in pairs) and len(set(starts)) == len(starts), \
        "memo.attention: varlen runs the diagonal block only (bug in memo)"
    cu = torch.tensor(sorted(starts) + [b * s], dtype=torch.int32, device=device)
    longest = max(qb - qa for _, qa, qb, _, _ in pairs)
    assert int(cu[0]) == 0 and sum(qb - qa for _, qa, qb, _, _ in pairs) == b * s, \
        "memo.attention: the documents of a diagonal block do not cover it (bug in memo)"
    return cu, longest


def forward(q, k, v, pairs, *, scale: float):
    """(out (b, H, s, d), lse (b, H, s) fp32) of the diagonal block; k, v with H heads."""
    b, h, s, _ = q.shape
    cu, longest = _cu_seqlens(pairs, b, s, q.device)
    qp, kp, vp = _pack(q), _pack(k), _pack(v)
    if kernel_for(q) == "flash_attn":
        out, lse, _, _ = flash._interface()._flash_attn_varlen_forward(
            qp, kp, vp, cu, cu, longest, longest, 0.0, scale, True, -1, -1, 0.0, None, False)
    else:
        out, lse, _ = _torch_ops()[0](qp, kp, vp, cu, cu, longest, longest, True, scale)
    return _unpack(out, b), lse.float().reshape(h, b, s).permute(1, 0, 2)


def backward(dout, q, k, v, out, lse, pairs, *, scale: float):
    """(dq, dk, dv) in (b, H, s, d) of the diagonal block, given its rows' merged out and lse."""
    b, h, s, _ = q.shape
    cu, longest = _cu_seqlens(pairs, b, s, q.device)
    packed = [_pack(t).contiguous() for t in (dout, q, k, v, out)]
    lse_p = lse.permute(1, 0, 2).reshape(h, b * s).contiguous()
    if kernel_for(q) == "flash_attn":
        dq, dk, dv = (torch.empty_like(t) for t in packed[1:4])
        flash._interface()._flash_attn_varlen_backward(
            *packed, lse_p, dq, dk, dv, cu, cu, longest, longest, 0.0, scale, True, -1, -1, 0.0, None, False, None)
    else:
        rng = torch.zeros(2, dtype=torch.uint64, device=q.device)
        dq, dk, dv = _torch_ops()[1](*packed, lse_p, cu, cu, longest, longest, True, rng, scale)
    return _unpack(dq, b), _unpack(dk, b), _unpack(dv, b)
