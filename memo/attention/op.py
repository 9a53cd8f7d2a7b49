"""``torch.ops.memo.sp_attention``: sequence-parallel attention as one op with an autograd formula.

One op, so that memo's swap executor sees it as one attention kernel: it records the op's outputs
(out, lse) in the forward and replays them during token-wise recomputation, so a wrapped layer
never recomputes attention nor re-runs the ring's communication (NOTE [ Saved tensor classes ]
rule 4 in memo/trace.py). Saved for backward: q, k, v, out, lse, all (b, heads, local_seq, ...)
sequence shards with the token dimension at 2, like the SDPA kernels'.

Signature: q (b, H, s, d), k and v (b, KVH, s, d), doc None or (b, s) int64 document ids (the global
position of each token's document start; packed sequences), sp_id from ``memo.parallel.groups``.
Returns out (b, H, s, d) in q's dtype and memory layout (``empty_like(q)``: for HF's q, a transposed
(b, s, H, d) buffer, so the attention output needs no copy on its way to o_proj) and lse (b, H, s) fp32.
"""

from __future__ import annotations

from typing import Optional

import torch

from memo.attention.ulysses import check_heads, sp_backward, sp_forward
from memo.errors import MemoError
from memo.parallel.comm import check_same
from memo.parallel.groups import lookup

_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@torch.library.custom_op("memo::sp_attention", mutates_args=())
def sp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc: Optional[torch.Tensor], sp_id: int,
                 scale: float, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    sp = lookup(sp_id)
    _check(sp, q, k, v, doc, causal)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        k, v = k.to(q.dtype), v.to(q.dtype)
    out, lse = sp_forward(sp, q, k, v, doc, causal=causal, scale=scale)
    if out.stride() != q.stride():   # out in q's layout, as the fake says (HF's q is a transposed view)
        out = torch.empty_like(q).copy_(out)
    return out, lse.contiguous()


@sp_attention.register_fake
def _(q, k, v, doc, sp_id, scale, causal):
    b, h, s, _ = q.shape
    return torch.empty_like(q), q.new_empty((b, h, s), dtype=torch.float32)


def _local_problem(sp, q, k, v, doc, causal: bool) -> Optional[MemoError]:
    """What is wrong with this rank's arguments, or None."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] \
            or q.shape[2] != k.shape[2] or q.shape[3] != k.shape[3] or q.shape[1] % k.shape[1]:
        return MemoError(f"memo.attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} are not "
                         f"(batch, heads, local_seq, head_dim) with kv_heads dividing heads")
    if q.dtype not in _DTYPES:
        return MemoError(f"memo.attention: dtype {q.dtype} is not supported; use one of {_DTYPES}")
    if doc is not None and tuple(doc.shape) != (q.shape[0], q.shape[2]):
        return MemoError(f"memo.attention: document ids have shape {tuple(doc.shape)}, expected "
                         f"(batch, local_seq) = {(q.shape[0], q.shape[2])}")
    if sp.layout == "zigzag" and causal and q.shape[2] % 2:
        return MemoError(f"memo.attention: a zigzag shard holds two equal chunks, but the local length is "
                         f"{q.shape[2]} (odd); shard the sequence with memo.parallel.shard_sequence")
    try:
        check_heads(sp, q.shape[1])
    except MemoError as e:
        return e
    return None


def _check(sp, q, k, v, doc, causal: bool) -> None:
    """The same values on every rank, and this rank's own problems, raised on every rank together.

    A rank that raised alone would leave the others waiting in the ring: every local problem is
    a value in the exchange instead (``input_ok``), so all ranks see it and raise.
    """
    problem = _local_problem(sp, q, k, v, doc, causal)
    shape = tuple(q.shape) if q.dim() == 4 else (0, 0, 0, 0)
    names = ("input_ok", "batch", "heads", "kv_heads", "local_seq", "head_dim", "dtype", "causal", "documents")
    values = (int(problem is None), shape[0], shape[1], k.shape[1] if k.dim() == 4 else 0, shape[2], shape[3],
              _DTYPES.index(q.dtype) if q.dtype in _DTYPES else -1, int(causal), int(doc is not None))
    try:
        check_same(sp, "attention call", names, values, device=q.device if q.device.type != "cpu" else None)
    except MemoError as e:
        if problem is not None:
            raise problem from e
        raise
    if problem is not None:
        raise problem


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, doc, sp_id, scale, causal = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.set_materialize_grads(False)   # an unused lse gets no gradient (None), see _backward
    # Not saved through autograd: the saved-tensor hooks of the swap executor must see only the
    # token-wise tensors of the attention call (doc is the same per-forward tensor for every layer).
    ctx.doc, ctx.sp_id, ctx.scale, ctx.causal = doc, sp_id, scale, causal


def _backward(ctx, dout, dlse):
    if dlse is not None:
        raise MemoError("memo.attention: the log-sum-exp returned by sequence-parallel attention is not "
                        "differentiable; use it detached (lse.detach()) or compute the loss from the output only")
    q, k, v, out, lse = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    k_, v_ = (k.to(q.dtype), v.to(q.dtype)) if k.dtype != q.dtype or v.dtype != q.dtype else (k, v)
    dq, dk, dv = sp_backward(lookup(ctx.sp_id), dout, q, k_, v_, out, lse, ctx.doc, causal=ctx.causal,
                             scale=ctx.scale)
    return dq, dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


sp_attention.register_autograd(_backward, setup_context=_setup_context)
