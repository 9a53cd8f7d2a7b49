"""ring_attention (and Ulysses / hybrid) against full-sequence attention in one process."""

import torch
import torch.nn.functional as F

from memo.attention import ring_attention
from memo.parallel import gather_sequence, shard_sequence


def reference(q, k, v, causal, doc=None):
    """Full-sequence attention in (b, s, h, d) by SDPA, as a plain single-process model runs it."""
    h, kvh = q.shape[2], k.shape[2]
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    kt, vt = kt.repeat_interleave(h // kvh, 1), vt.repeat_interleave(h // kvh, 1)
    mask = None
    if doc is not None:
        s = q.shape[1]
        mask = doc[:, None, :, None] == doc[:, None, None, :]
        if causal:
            mask = mask & torch.ones(s, s, dtype=torch.bool).tril()
        causal = False
    return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, is_causal=causal).transpose(1, 2)


def run_case(rank, world, *, b, s, h, kvh, d, causal, layout, backend="ring", docs=None, seed=0, ulysses_size=None,
             dtype="float32"):
    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(seed)
    q64, k64, v64 = (torch.randn(b, s, n, d, generator=g, dtype=torch.float64) for n in (h, kvh, kvh))
    dout64 = torch.randn(b, s, h, d, generator=g, dtype=torch.float64)
    doc = None
    if docs is not None:   # packed documents: the global position of each token's document start
        pos = torch.cat([torch.arange(n) for n in docs]).expand(b, s)
        doc = torch.arange(s).expand(b, s) - pos
    grads = {}
    for name, ref_dtype in (("ref64", torch.float64), ("ref32", torch.float32)):
        ts = [t.detach().to(ref_dtype).requires_grad_() for t in (q64, k64, v64)]
        out = reference(*ts, causal, doc)
        out.backward(dout64.to(ref_dtype))
        grads[name] = [out.detach().double()] + [t.grad.double() for t in ts]
    shards = [shard_sequence(t.to(dt), 1, layout=layout).requires_grad_() for t in (q64, k64, v64)]
    local_doc = None if doc is None else shard_sequence(doc, 1, layout=layout)
    out = ring_attention(*shards, causal=causal, layout=layout, backend=backend, doc=local_doc,
                         ulysses_size=ulysses_size)
    out.backward(shard_sequence(dout64.to(dt), 1, layout=layout))
    ring = [gather_sequence(t, 1, layout=layout).double() for t in [out.detach()] + [x.grad for x in shards]]
    names = ("out", "dq", "dk", "dv")
    return {n: {"ring": (r - e).abs().max().item(), "ref32": (f - e).abs().max().item()}
            for n, r, f, e in zip(names, ring, grads["ref32"], grads["ref64"])}


CASES = [
    dict(b=1, s=64, h=4, kvh=4, d=64, causal=True, layout="zigzag"),
    dict(b=2, s=64, h=4, kvh=2, d=64, causal=True, layout="zigzag"),
    dict(b=1, s=64, h=4, kvh=1, d=128, causal=True, layout="contiguous"),
    dict(b=2, s=64, h=4, kvh=2, d=64, causal=False, layout="zigzag"),
    dict(b=1, s=64, h=4, kvh=2, d=128, causal=False, layout="contiguous"),
    dict(b=2, s=64, h=4, kvh=2, d=64, causal=True, layout="zigzag", docs=[20, 30, 14]),
    dict(b=1, s=64, h=4, kvh=4, d=64, causal=True, layout="contiguous", docs=[5, 40, 19]),
    # fp64 accumulates (and keeps lse) in fp64: its error must stay far below fp32's
    dict(b=1, s=64, h=4, kvh=2, d=64, causal=True, layout="zigzag", docs=[20, 30, 14], dtype="float64"),
]


def main(rank, world, flash_standin=False):
    if flash_standin:   # memo's flash-attn adapter against the CPU stand-in (tests/standins/flash_attn)
        from flash_attn.flash_attn_interface import CALLS
        cases = [c for c in CASES if "docs" not in c][:3]
        return {"results": [(c, run_case(rank, world, **c)) for c in cases], "calls": dict(CALLS)}
    return [(c, run_case(rank, world, **c)) for c in CASES + backend_cases(world)]


def backend_cases(world):
    """Ulysses and hybrid on a subset of the ring cases (hybrid needs 4 ranks: Ulysses 2 x ring 2)."""
    out = []
    for c in (CASES[1], CASES[2], CASES[3], CASES[5]):
        out.append(dict(c, backend="ulysses"))
        if world == 4:
            out.append(dict(c, backend="hybrid", ulysses_size=2))
    return out
