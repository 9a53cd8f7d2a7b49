"""flash-attn as the block kernel of ring/Ulysses attention (optional extra: pip install 'memo[flash]').

flash-attn works in (batch, seqlen, heads, head_dim) with lse (batch, heads, seqlen) fp32; memo's
blocks are (batch, heads, seqlen, head_dim). The adapter transposes, calls flash-attn's forward
with its log-sum-exp and its backward with the *merged* out and lse (the same contract as
``memo.attention.kernels``), and transposes back. It is used for unmasked blocks when
``MEMO_ATTENTION_KERNEL=flash_attn`` (or ``auto`` with flash-attn importable, on CUDA, fp16/bf16);
blocks with a document mask keep torch's kernels (varlen packing is not wired yet).

Signatures followed (flash-attn 2.7/2.8, ``flash_attn.flash_attn_interface``):
``_flash_attn_forward(q, k, v, dropout_p, softmax_scale, causal, window_size_left, window_size_right,
softcap, alibi_slopes, return_softmax) -> (out, softmax_lse, S_dmask, rng_state)`` and
``_flash_attn_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal,
window_size_left, window_size_right, softcap, alibi_slopes, deterministic, rng_state)`` filling dq,
dk, dv in place.
"""

from __future__ import annotations

import functools
import importlib
import os
from typing import Optional

import torch

from memo.errors import MemoError

CHOICES = ("auto", "torch", "flash_attn")


@functools.lru_cache(maxsize=None)
def _interface():
    try:
        return importlib.import_module("flash_attn.flash_attn_interface")
    except ImportError:
        return None


def choice() -> str:
    value = os.environ.get("MEMO_ATTENTION_KERNEL", "auto")
    if value not in CHOICES:
        raise MemoError(f"memo.attention: MEMO_ATTENTION_KERNEL={value!r} is not one of {CHOICES}")
    if value == "flash_attn" and _interface() is None:
        raise MemoError("memo.attention: MEMO_ATTENTION_KERNEL=flash_attn but flash-attn is not installed; "
                        "pip install 'memo[flash]' or unset MEMO_ATTENTION_KERNEL")
    return value


def use_flash(q: torch.Tensor, mask: Optional[torch.Tensor]) -> bool:
    if mask is not None:
        return False
    c = choice()
    if c == "flash_attn":
        return True
    return (c == "auto" and q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16)
            and _interface() is not None)


def forward(q, k, v, *, causal: bool, scale: float):
    """(out (b, h, sq, d), lse (b, h, sq) fp32) of one block; q/k/v in (b, h, s, d)."""
    fa = _interface()
    out, lse, _, _ = fa._flash_attn_forward(q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(),
                                            v.transpose(1, 2).contiguous(), 0.0, scale, causal, -1, -1, 0.0, None,
                                            False)
    return out.transpose(1, 2), lse.float()


def backward(dout, q, k, v, out, lse, *, causal: bool, scale: float):
    """(dq, dk, dv) in (b, h, s, d) of one block, given the merged out and lse."""
    fa = _interface()
    bshd = [t.transpose(1, 2).contiguous() for t in (dout, q, k, v, out)]
    dq, dk, dv = (torch.empty_like(t) for t in bshd[1:4])
    fa._flash_attn_backward(*bshd, lse.contiguous(), dq, dk, dv, 0.0, scale, causal, -1, -1, 0.0, None, False, None)
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)
