"""Ulysses (all-to-all over heads) around the ring: one forward/backward for ring, Ulysses and hybrid.

Inside a Ulysses group of U ranks an all-to-all turns (b, H, s, d) sequence shards into
(b, H/U, U*s, d) head shards of the group's whole token range; the tokens are put in ascending
global order (NOTE [ Sequence layouts ] rule 4), attention runs on them with the ring over the
R = P/U groups (R = 1: Ulysses alone; U = 1: the ring alone), and the inverse all-to-all brings
the outputs back. The saved tensors of the op are the sequence shards only, so the swap executor
sees token-wise tensors; the backward repeats the all-to-alls.
"""

from __future__ import annotations

from typing import Optional

import torch

from memo.attention.kernels import acc_dtype, reduce_kv, repeat_kv
from memo.attention.ring import ring_backward, ring_forward
from memo.errors import MemoError
from memo.parallel.comm import all_gather, all_to_all
from memo.parallel.groups import SequenceParallel
from memo.parallel.layout import shard_indices


def check_heads(sp: SequenceParallel, heads: int) -> None:
    u = sp.ulysses_size
    if u > 1 and heads % u:
        raise MemoError(f"memo.parallel: {sp.backend} sequence parallelism splits the {heads} attention heads over "
                        f"{u} ranks, which does not divide them; use sp_backend='ring' (no head-count limit)"
                        + (" or a ulysses_size dividing the heads" if sp.backend == "hybrid" else ""))


def _order(sp: SequenceParallel, s: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(perm, inverse): gathered concatenation order -> ascending global order, and back."""
    total = s * sp.size
    idx = torch.cat([shard_indices(total, sp.size, j, sp.layout, device) for j in sp.ulysses_peers()])
    perm = torch.argsort(idx)
    return perm, torch.argsort(perm)


def heads_to_seq(sp: SequenceParallel, x: torch.Tensor, perm: torch.Tensor, what: str) -> torch.Tensor:
    """(b, H, s, *rest) sequence shard -> (b, H/U, U*s, *rest) head shard, tokens ascending."""
    u = sp.ulysses_size
    b, H, s = x.shape[:3]
    rest = x.shape[3:]
    send = x.reshape(b, u, H // u, s, *rest).movedim(1, 0)
    got = all_to_all(sp, send, what)                       # (U: source rank, b, H/U, s, *rest)
    y = got.movedim(0, 2).reshape(b, H // u, u * s, *rest)
    return y.index_select(2, perm)


def seq_to_heads(sp: SequenceParallel, y: torch.Tensor, inv: torch.Tensor, what: str) -> torch.Tensor:
    """Inverse of ``heads_to_seq``."""
    u = sp.ulysses_size
    b, h, us = y.shape[:3]
    rest = y.shape[3:]
    s = us // u
    send = y.index_select(2, inv).reshape(b, h, u, s, *rest).movedim(2, 0)
    got = all_to_all(sp, send, what)                       # (U: head group, b, H/U, s, *rest)
    return got.movedim(0, 1).reshape(b, h * u, s, *rest)


def _gather_doc(sp: SequenceParallel, doc: Optional[torch.Tensor], perm) -> Optional[torch.Tensor]:
    if doc is None:
        return None
    peers = [sp.ranks[j] for j in sp.ulysses_peers()]
    parts = all_gather(sp, doc, "Ulysses document ids", group=sp.ulysses_group, peers=peers)
    return torch.cat(parts, dim=1).index_select(1, perm)


def sp_forward(sp: SequenceParallel, q, k, v, doc, *, causal: bool, scale: float):
    """out (b, H, s, d), lse (b, H, s) fp32 of this rank's tokens. q: (b, H, s, d); k, v: (b, KVH, s, d)."""
    if sp.ulysses_size == 1:
        return ring_forward(sp, q, k, v, doc, causal=causal, scale=scale)
    H = q.shape[1]
    check_heads(sp, H)
    if k.shape[1] % sp.ulysses_size:   # kv heads that do not split: give every query head its own
        k, v = repeat_kv(k, H), repeat_kv(v, H)
    perm, inv = _order(sp, q.shape[2], q.device)
    q2, k2, v2 = (heads_to_seq(sp, t, perm, f"Ulysses {n}") for t, n in ((q, "q"), (k, "k"), (v, "v")))
    out2, lse2 = ring_forward(sp, q2, k2, v2, _gather_doc(sp, doc, perm), causal=causal, scale=scale)
    return seq_to_heads(sp, out2, inv, "Ulysses out"), seq_to_heads(sp, lse2, inv, "Ulysses lse")


def sp_backward(sp: SequenceParallel, dout, q, k, v, out, lse, doc, *, causal: bool, scale: float):
    if sp.ulysses_size == 1:
        return ring_backward(sp, dout, q, k, v, out, lse, doc, causal=causal, scale=scale)
    H, kvh = q.shape[1], k.shape[1]
    repeated = kvh % sp.ulysses_size != 0
    if repeated:
        k, v = repeat_kv(k, H), repeat_kv(v, H)
    perm, inv = _order(sp, q.shape[2], q.device)
    to = lambda t, n: heads_to_seq(sp, t, perm, f"Ulysses backward {n}")   # noqa: E731
    dq2, dk2, dv2 = ring_backward(sp, to(dout, "dout"), to(q, "q"), to(k, "k"), to(v, "v"), to(out, "out"),
                                  to(lse, "lse"), _gather_doc(sp, doc, perm), causal=causal, scale=scale)
    dq = seq_to_heads(sp, dq2, inv, "Ulysses dq")
    dk = seq_to_heads(sp, dk2, inv, "Ulysses dk")
    dv = seq_to_heads(sp, dv2, inv, "Ulysses dv")
    if repeated:
        acc = acc_dtype(dk.dtype)
        dk, dv = reduce_kv(dk.to(acc), kvh).to(dk.dtype), reduce_kv(dv.to(acc), kvh).to(dv.dtype)
    return dq, dk, dv
