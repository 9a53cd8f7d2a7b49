"""The public attention functions, in flash-attn's (batch, seqlen, heads, head_dim) convention."""

from __future__ import annotations

from typing import Optional

import torch

from memo.attention.op import sp_attention
from memo.parallel.groups import SequenceParallel, setup_for


def sp_attention_bshd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sp: SequenceParallel, *, causal: bool = True,
                      scale: Optional[float] = None, doc: Optional[torch.Tensor] = None):
    """(out, lse): out (b, s, H, d), lse (b, H, s) fp32, for this rank's shard under ``sp``."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    out, lse = sp_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), doc, sp.id, scale, causal)
    return out.transpose(1, 2), lse


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group=None, causal: bool = True,
                   layout: str = "zigzag", *, backend: str = "ring", scale: Optional[float] = None,
                   doc: Optional[torch.Tensor] = None, ulysses_size: Optional[int] = None,
                   return_lse: bool = False):
    """Attention of this rank's shard of one sequence over the whole sequence.

    q: (batch, local_seq, heads, head_dim); k, v: (batch, local_seq, kv_heads, head_dim) with
    kv_heads dividing heads; the local shards in ``layout``'s order (``memo.parallel.shard_sequence``).
    ``group``: the ranks sharing the sequence (default: the world), or a
    ``memo.parallel.SequenceParallel``. ``backend``: "ring" (keys and values travel around the ring),
    "ulysses" (all-to-all over heads) or "hybrid" (Ulysses inside groups of ``ulysses_size``
    consecutive ranks, ring across). ``doc``: (batch, local_seq) int64, the global position of each
    token's document start, for packed sequences (tokens attend only within their document).
    Returns out (batch, local_seq, heads, head_dim), and lse (batch, heads, local_seq) fp32 if
    ``return_lse``. Differentiable in q, k and v (not through lse: a gradient reaching it raises).
    """
    sp = setup_for(group, backend, layout, ulysses_size)
    sp.generation += 1   # every call checks its shapes across ranks (memo.parallel.comm.check_same)
    out, lse = sp_attention_bshd(q, k, v, sp, causal=causal, scale=scale, doc=doc)
    return (out, lse) if return_lse else out
