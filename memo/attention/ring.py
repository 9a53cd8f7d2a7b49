"""Ring attention: forward and backward as explicit ring loops over blocks of keys and values.

Plain functions on (batch, heads, local_seq, head_dim) tensors; ``memo.attention.op`` wraps them in
one custom op with an autograd formula.

# NOTE [ Ring step order ]
#
# 1. Ring rank g holds its queries and starts with its own keys/values (step 0). At step i it
#    holds the keys/values of ring rank src = (g - i) mod R, and has already queued the exchange
#    that brings it src - 1's (send to g + 1, receive from g - 1) before computing on src's.
# 2. Which block pairs are computed (causal): step 0 is the diagonal, causal. zigzag (ranks hold
#    chunks g and 2R-1-g): src < g: all queries vs the first half of the keys; src > g: the second
#    half of the queries vs all keys; both full (non-causal) blocks of half the work. contiguous:
#    src < g: all vs all; src > g: nothing. Not causal: every step is all vs all.
# 3. With documents (packed sequences), each computed block splits into same-document sub-blocks
#    and a block with no common document is skipped (NOTE [ Document blocks ] in
#    memo/attention/documents.py); no mask is built. A document is identified by its first token's
#    global position (``doc``), which travels with the keys.
# 4. Forward: per-block (out, lse) are merged in fp32 (``merge_into``). Backward: every block's
#    gradient uses the merged out and lse; dq stays on its rank, dk/dv accumulate in fp32 and travel
#    with the block they belong to, so after R steps and one last exchange each rank holds the full
#    dk/dv of its own keys/values.
"""

from __future__ import annotations

from typing import Optional

import torch

from memo.attention.documents import doc_block_backward, doc_block_forward, doc_pairs
from memo.attention.kernels import acc_dtype, block_backward, block_forward, merge_into, reduce_kv, repeat_kv
from memo.parallel.comm import RingExchange
from memo.parallel.groups import SequenceParallel

_ALL = slice(None)


def select_block(layout: str, causal: bool, rank: int, src: int, s: int) -> Optional[tuple]:
    """(query slice, key slice, is_causal) computed at this step, or None. NOTE [ Ring step order ] rule 2."""
    if not causal:
        return _ALL, _ALL, False
    if src == rank:
        return _ALL, _ALL, True
    if layout == "zigzag":
        half = s // 2
        return (_ALL, slice(0, half), False) if src < rank else (slice(half, None), _ALL, False)
    return (_ALL, _ALL, False) if src < rank else None


class _Blocks:
    """Block geometry shared by forward and backward of one call."""

    def __init__(self, sp: SequenceParallel, s: int, causal: bool, doc) -> None:
        self.sp, self.s, self.causal, self.doc = sp, s, causal, doc
        self.R, self.g = sp.ring_size, sp.ring_rank

    def at(self, step: int, doc_k):
        """(query slice, key slice, is_causal, document pairs or None) of ``step``, or None to skip it."""
        src = (self.g - step) % self.R
        sel = select_block(self.sp.layout, self.causal, self.g, src, self.s)
        if sel is None:
            return None
        qs, ks, is_causal = sel
        if self.doc is None:
            return qs, ks, is_causal, None
        pairs = doc_pairs(self.doc[:, qs], doc_k[:, ks])   # NOTE [ Document blocks ] rule 2
        return (qs, ks, is_causal, pairs) if pairs else None


def _pass_kv(sp: SequenceParallel, blocks: "_Blocks", step: int, what: str, kk, vv, doc_k) -> Optional[RingExchange]:
    """Start sending this step's keys/values (and their document ids) on; None at the last step."""
    if step + 1 >= blocks.R:
        return None
    ex = RingExchange(sp, f"ring attention {what} step {step}")
    ex.send_recv([kk, vv] + ([doc_k] if doc_k is not None else []))
    return ex.commit()


def _received_kv(ex: Optional[RingExchange], kk, vv, doc_k) -> tuple:
    """The next step's (keys, values, document ids): what ``ex`` brought, or the current ones."""
    if ex is None:
        return kk, vv, doc_k
    got = ex.wait()
    return got[0], got[1], (got[2] if doc_k is not None else None)


def ring_forward(sp: SequenceParallel, q, k, v, doc: Optional[torch.Tensor], *, causal: bool, scale: float):
    """out (b, h, s, d) in q's dtype and lse (b, h, s) fp32 (fp64 for fp64 q) of this rank's queries.

    q: (b, h, s, d); k, v: (b, kv_heads, s, d); doc: None or (b, s) int64 document ids.
    """
    b, h, s, d = q.shape
    blocks = _Blocks(sp, s, causal, doc)
    acc = acc_dtype(q.dtype)
    out = torch.zeros_like(q, dtype=acc)   # q's layout: HF's transpose back to (b, s, H, d) is then a view
    lse = torch.full((b, h, s), float("-inf"), dtype=acc, device=q.device)
    kk, vv, doc_k = k, v, doc
    for step in range(blocks.R):
        ex = _pass_kv(sp, blocks, step, "forward", kk, vv, doc_k)
        blk = blocks.at(step, doc_k)
        if blk is not None and blk[3] is not None:
            qs, ks, is_causal, pairs = blk
            doc_block_forward(q[:, :, qs], kk[:, :, ks], vv[:, :, ks], pairs, out[:, :, qs], lse[:, :, qs],
                              causal=is_causal, scale=scale)
        elif blk is not None:
            qs, ks, is_causal, _ = blk
            o, l = block_forward(q[:, :, qs], repeat_kv(kk[:, :, ks], h), repeat_kv(vv[:, :, ks], h),
                                 causal=is_causal, mask=None, scale=scale)
            merge_into(out[:, :, qs], lse[:, :, qs], o, l)
        kk, vv, doc_k = _received_kv(ex, kk, vv, doc_k)
    return out.to(q.dtype), lse


def ring_backward(sp: SequenceParallel, dout, q, k, v, out, lse, doc: Optional[torch.Tensor], *, causal: bool,
                  scale: float):
    """(dq, dk, dv) in the dtypes of q, k, v. NOTE [ Ring step order ] rule 4."""
    b, h, s, d = q.shape
    kvh = k.shape[1]
    blocks = _Blocks(sp, s, causal, doc)
    acc = acc_dtype(q.dtype)
    # zeros_like keeps q's strides: HF hands in a transposed view, and a dq in the same layout flows back
    # through that transpose without a copy
    dq = torch.zeros_like(q, dtype=acc)
    kk, vv, doc_k = k, v, doc
    dkv_ex = None
    dk_acc = dv_acc = None
    for step in range(blocks.R):
        kv_ex = _pass_kv(sp, blocks, step, "backward", kk, vv, doc_k)
        dk_blk = torch.zeros(k.shape, dtype=acc, device=k.device)
        dv_blk = torch.zeros(v.shape, dtype=acc, device=v.device)
        blk = blocks.at(step, doc_k)
        if blk is not None and blk[3] is not None:
            qs, ks, is_causal, pairs = blk
            doc_block_backward(dout[:, :, qs], q[:, :, qs], kk[:, :, ks], vv[:, :, ks], out[:, :, qs], lse[:, :, qs],
                               pairs, dq[:, :, qs], dk_blk[:, :, ks], dv_blk[:, :, ks], causal=is_causal, scale=scale)
        elif blk is not None:
            qs, ks, is_causal, _ = blk
            gq, gk, gv = block_backward(dout[:, :, qs], q[:, :, qs], repeat_kv(kk[:, :, ks], h),
                                        repeat_kv(vv[:, :, ks], h), out[:, :, qs], lse[:, :, qs],
                                        causal=is_causal, mask=None, scale=scale)
            dq[:, :, qs] += gq.to(acc)
            dk_blk[:, :, ks] += reduce_kv(gk.to(acc), kvh)
            dv_blk[:, :, ks] += reduce_kv(gv.to(acc), kvh)
        if dkv_ex is None:
            dk_acc, dv_acc = dk_blk, dv_blk
        else:
            got = dkv_ex.wait()
            dk_acc, dv_acc = got[0] + dk_blk, got[1] + dv_blk
        if blocks.R > 1:
            dkv_ex = RingExchange(sp, f"ring attention dk/dv step {step}")
            dkv_ex.send_recv([dk_acc, dv_acc])
            dkv_ex.commit()
        kk, vv, doc_k = _received_kv(kv_ex, kk, vv, doc_k)
    if dkv_ex is not None:
        dk_acc, dv_acc = dkv_ex.wait()
    return dq.to(q.dtype), dk_acc.to(k.dtype), dv_acc.to(v.dtype)
