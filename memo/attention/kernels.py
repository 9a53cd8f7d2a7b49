"""Blockwise attention with log-sum-exp, on torch's own flash kernels, and merging of blocks.

q: (batch, heads, sq, head_dim); k, v: (batch, heads, sk, head_dim) (grouped-query heads already
repeated); mask: None or an additive float mask (batch or 1, 1, sq, sk) in q's dtype, whose
disallowed entries are ``masked_value(dtype)`` (finite: a row with no allowed key in one block then
gets a finite, very negative log-sum-exp and vanishes when blocks are merged, where ``-inf`` makes
torch's CPU kernel return lse 0). Returns out (batch, heads, sq, head_dim) in q's dtype and
lse (batch, heads, sq) in fp32.

Kernels: CPU: ``_scaled_dot_product_flash_attention_for_cpu`` (+ ``_backward``). CUDA: the flash
kernel for fp16/bf16 without a mask, the memory-efficient kernel otherwise (fp32, masks). flash-attn
for unmasked blocks when chosen (``memo.attention.flash``). The
backward kernels take the *merged* out and lse of all blocks, so each block's gradient is its exact
share of the full attention's gradient.
"""

from __future__ import annotations

import time
from typing import Optional

import torch

from memo.attention import flash

aten = torch.ops.aten


# Host seconds spent in block kernels by this process (benchmarks/ring.py reads them to show the load
# balance between ranks). On a GPU these are enqueue times, not kernel times.
KERNEL_SECONDS = {"forward": 0.0, "backward": 0.0}


def masked_value(dtype: torch.dtype) -> float:
    """Finite and far below any score, without overflowing when a kernel scales it (by log2 e, in
    fp32): -1e30 where the dtype holds it, the dtype's lowest value otherwise (fp16)."""
    return -1e30 if torch.finfo(dtype).max > 1e31 else torch.finfo(dtype).min


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of out/lse/grads: fp32, or fp64 for fp64 inputs (the CPU kernels' own rule)."""
    return torch.promote_types(dtype, torch.float32)


def block_forward(q, k, v, *, causal: bool, mask: Optional[torch.Tensor], scale: float):
    start = time.perf_counter()
    try:
        return _block_forward(q, k, v, causal=causal, mask=mask, scale=scale)
    finally:
        KERNEL_SECONDS["forward"] += time.perf_counter() - start


def _block_forward(q, k, v, *, causal: bool, mask: Optional[torch.Tensor], scale: float):
    if flash.use_flash(q, mask):
        return flash.forward(q, k, v, causal=causal, scale=scale)
    if q.device.type == "cpu":
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=mask, scale=scale)
        return out, lse.to(acc_dtype(q.dtype))
    if _cuda_flash(q, mask):
        res = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
        return res[0], res[1].float()
    out, lse, _, _ = aten._scaled_dot_product_efficient_attention(q, k, v, _cuda_bias(mask, q, k), True, 0.0, causal,
                                                                  scale=scale)
    return out, lse[..., :q.shape[2]].float()


def _cuda_flash(q, mask) -> bool:
    """torch's CUDA flash kernel: fp16/bf16, no mask, head_dim <= 256 and a multiple of 8, sm80+."""
    return (mask is None and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256
            and q.shape[-1] % 8 == 0 and torch.cuda.get_device_capability(q.device)[0] >= 8)


def block_backward(dout, q, k, v, out, lse, *, causal: bool, mask: Optional[torch.Tensor], scale: float):
    """Gradients (dq, dk, dv) of one block, given the merged ``out`` and ``lse`` of the query rows."""
    start = time.perf_counter()
    try:
        return _block_backward(dout, q, k, v, out, lse, causal=causal, mask=mask, scale=scale)
    finally:
        KERNEL_SECONDS["backward"] += time.perf_counter() - start


def _block_backward(dout, q, k, v, out, lse, *, causal: bool, mask: Optional[torch.Tensor], scale: float):
    if flash.use_flash(q, mask):
        return flash.backward(dout, q, k, v, out, lse, causal=causal, scale=scale)
    if q.device.type == "cpu":
        return aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, causal, attn_mask=mask, scale=scale)
    # Undefined (None), not empty, tensors where the schema's optional inputs are absent: the kernels
    # test ``defined()`` (an empty cum_seq_q would select flash's varlen path, an empty bias a bias).
    # Without dropout the philox seed/offset are never read.
    empty = torch.empty(0, device=q.device)
    if _cuda_flash(q, mask):
        return aten._scaled_dot_product_flash_attention_backward(
            dout, q, k, v, out, lse.contiguous(), None, None, q.shape[2], k.shape[2], 0.0, causal,
            empty, empty, scale=scale)
    pad = -(-q.shape[2] // 32) * 32   # the efficient kernel's lse rows are padded to 32
    lse_p = torch.nn.functional.pad(lse, (0, pad - q.shape[2])).contiguous()
    dq, dk, dv, _ = aten._scaled_dot_product_efficient_attention_backward(
        dout, q, k, v, _cuda_bias(mask, q, k), out, lse_p, empty, empty, 0.0, [True, True, True, False], causal,
        scale=scale)
    return dq, dk, dv


def _cuda_bias(mask, q, k):
    """The efficient kernel wants a bias whose last dim is 16-aligned in memory; expand over heads."""
    if mask is None:
        return None
    b, h, sq, sk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    aligned = -(-sk // 16) * 16
    buf = torch.empty(b, h, sq, aligned, dtype=q.dtype, device=q.device)
    buf[..., :sk] = mask
    return buf[..., :sk]


def merge_into(out_acc: torch.Tensor, lse_acc: torch.Tensor, out_blk: torch.Tensor, lse_blk: torch.Tensor) -> None:
    """Fold one block's (out, lse) into the accumulators, in place (softmax over the union of keys).

    A row with lse -inf on either side (no key yet, or a kernel that returns -inf for a row with no
    allowed key) contributes nothing, instead of inf - inf = NaN.
    """
    new = torch.logaddexp(lse_acc, lse_blk)
    w_acc = torch.where(torch.isneginf(lse_acc), 0.0, torch.exp(lse_acc - new))
    w_blk = torch.where(torch.isneginf(lse_blk), 0.0, torch.exp(lse_blk - new))
    out_acc.mul_(w_acc.unsqueeze(-1)).add_(out_blk.to(out_acc.dtype) * w_blk.unsqueeze(-1))
    lse_acc.copy_(new)


def repeat_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(b, kv_heads, s, d) -> (b, heads, s, d): kv head j serves query heads j*rep .. j*rep+rep-1."""
    kvh = x.shape[1]
    if kvh == heads:
        return x
    b, _, s, d = x.shape
    return x[:, :, None].expand(b, kvh, heads // kvh, s, d).reshape(b, heads, s, d)


def reduce_kv(dx: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """The inverse of ``repeat_kv`` for gradients: sum over the query heads sharing a kv head."""
    b, h, s, d = dx.shape
    if h == kv_heads:
        return dx
    return dx.view(b, kv_heads, h // kv_heads, s, d).sum(2)
