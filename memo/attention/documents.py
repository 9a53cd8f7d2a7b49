"""Attention inside packed documents: each block splits into same-document sub-blocks, with no mask.

Plain functions used by the ring loops (memo.attention.ring) for every block of a packed call;
q/k/v/out in (batch, heads, tokens, head_dim), lse (batch, heads, tokens), doc (batch, tokens).

# NOTE [ Document blocks ]
#
# 1. ``doc`` names each token's document by the global index of its first token (NOTE [ Packed
#    documents ] in memo/parallel/documents.py). Every block memo computes holds its tokens in
#    ascending global order, and doc is non-decreasing in it, so in a block's queries and in its keys
#    each document is one contiguous run.
# 2. A (query block, key block) pair is computed as one sub-block per document present on both
#    sides: that document's query run against its key run, on the kernels of memo.attention.kernels,
#    without a mask. Documents on one side only add nothing; a pair with no common document is
#    skipped (no kernel call).
# 3. Causality: in the diagonal block (the same tokens as queries and keys) a document's query run
#    and key run are the same tokens, so the kernel's own causal flag is exact. Every other block the
#    ring computes under causal attention has all its keys before all its queries (NOTE [ Ring step
#    order ] rule 2): its sub-blocks are full. Not causal: every sub-block is full.
# 4. Sub-blocks of one block have disjoint query rows: each merges into its own rows of the
#    accumulators (``merge_into`` on views); blocks of different ring steps merge by log-sum-exp as
#    before. Backward: each sub-block's gradients use the merged out and lse of its rows, and add into
#    its rows of dq and of the block's dk/dv.
# 5. No tensor here is larger than one sub-block's q, k, v and out: memory is linear in the tokens,
#    and the work is the sum over documents of their squared lengths (halved when causal).
# 6. On CUDA the diagonal block's documents go to one varlen kernel call where one exists
#    (memo.attention.varlen: flash-attn's varlen functions, or torch.nn.attention.varlen's ops), one
#    sequence per document of every row. Other blocks share at most one document under causal
#    attention (a document in two disjoint token ranges contains the gap between them) and use the
#    dense kernels.
"""

from __future__ import annotations

import torch

from memo.attention import varlen
from memo.attention.kernels import acc_dtype, block_backward, block_forward, merge_into, reduce_kv, repeat_kv


def _runs(row: torch.Tensor) -> dict[int, tuple[int, int]]:
    """document -> (start, stop) of its run in a non-decreasing (tokens,) row of document ids."""
    values, counts = torch.unique_consecutive(row, return_counts=True)
    out, start = {}, 0
    for value, count in zip(values.tolist(), counts.tolist()):
        out[value] = (start, start + count)
        start += count
    return out


def doc_pairs(doc_q: torch.Tensor, doc_k: torch.Tensor) -> list[tuple[int, int, int, int, int]]:
    """(row, q start, q stop, k start, k stop) of every document in both blocks. NOTE [ Document blocks ] rule 2."""
    pairs = []
    for r in range(doc_q.shape[0]):
        keys = _runs(doc_k[r])
        for d, (qa, qb) in _runs(doc_q[r]).items():
            if d in keys:
                pairs.append((r, qa, qb, *keys[d]))
    return pairs


def doc_block_forward(q, k, v, pairs, out_acc, lse_acc, *, causal: bool, scale: float) -> None:
    """Merge the sub-blocks ``pairs`` of one block into ``out_acc``/``lse_acc`` (views of its query rows).

    q: (b, H, sq, d); k, v: (b, KVH, sk, d); out_acc (b, H, sq, d) and lse_acc (b, H, sq) accumulate.
    """
    h = q.shape[1]
    if causal and varlen.kernel_for(q) is not None:   # rule 6: the diagonal block in one call
        o, lse = varlen.forward(q, repeat_kv(k, h), repeat_kv(v, h), pairs, scale=scale)
        merge_into(out_acc, lse_acc, o, lse)
        return
    for r, qa, qb, ka, kb in pairs:
        assert not causal or (qa, qb) == (ka, kb), "memo.attention: a causal sub-block off the diagonal (bug in memo)"
        rows = (slice(r, r + 1), slice(None), slice(qa, qb))
        keys = (slice(r, r + 1), slice(None), slice(ka, kb))
        o, lse = block_forward(q[rows], repeat_kv(k[keys], h), repeat_kv(v[keys], h), causal=causal, mask=None,
                               scale=scale)
        merge_into(out_acc[rows], lse_acc[rows], o, lse)


def doc_block_backward(dout, q, k, v, out, lse, pairs, dq_acc, dk_acc, dv_acc, *, causal: bool, scale: float) -> None:
    """Add the gradients of the sub-blocks ``pairs`` of one block into dq_acc (its query rows) and dk_acc/dv_acc
    (its key rows, kv heads, accumulation dtype), given the merged ``out`` and ``lse`` of the query rows."""
    h, kvh = q.shape[1], k.shape[1]
    acc = acc_dtype(q.dtype)
    if causal and varlen.kernel_for(q) is not None:
        gq, gk, gv = varlen.backward(dout, q, repeat_kv(k, h), repeat_kv(v, h), out, lse, pairs, scale=scale)
        dq_acc += gq.to(acc)
        dk_acc += reduce_kv(gk.to(acc), kvh)
        dv_acc += reduce_kv(gv.to(acc), kvh)
        return
    for r, qa, qb, ka, kb in pairs:
        rows = (slice(r, r + 1), slice(None), slice(qa, qb))
        keys = (slice(r, r + 1), slice(None), slice(ka, kb))
        gq, gk, gv = block_backward(dout[rows], q[rows], repeat_kv(k[keys], h), repeat_kv(v[keys], h), out[rows],
                                    lse[rows], causal=causal, mask=None, scale=scale)
        dq_acc[rows] += gq.to(acc)
        dk_acc[keys] += reduce_kv(gk.to(acc), kvh)
        dv_acc[keys] += reduce_kv(gv.to(acc), kvh)
