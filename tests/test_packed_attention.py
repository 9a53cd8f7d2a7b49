"""memo's attention op on packed documents, on one process: exact against each document alone, no mask or
other s x s tensor inside (measured by memo.memtrack around the op's own forward and backward), blocks
without a common document skipped, and the position_ids / mask rules (NOTE [ Packed documents ]).
"""

import pytest
import torch
import torch.nn.functional as F

from memo.attention.documents import doc_pairs
from memo.attention.op import sp_attention
from memo.attention.ring import ring_backward, ring_forward
from memo.errors import MemoError
from memo.memtrack import track_storages
from memo.parallel.documents import check_mask, check_rows, document_ids
from memo.parallel.groups import one_process


def _doc(rows):
    pos = torch.stack([torch.cat([torch.arange(n) for n in r]) for r in rows])
    return document_ids(pos, torch.arange(pos.shape[1]), pos.shape[0])


def _per_document(q, k, v, rows):
    """Attention of each document alone (SDPA, causal), written back in place: the reference."""
    out = torch.empty_like(q)
    rep = q.shape[1] // k.shape[1]
    for r, lengths in enumerate(rows):
        a = 0
        for n in lengths:
            sl = (slice(r, r + 1), slice(None), slice(a, a + n))
            out[sl] = F.scaled_dot_product_attention(q[sl], k[sl].repeat_interleave(rep, 1),
                                                     v[sl].repeat_interleave(rep, 1), is_causal=True)
            a += n
    return out


@pytest.mark.parametrize("rows, kvh", [([[20, 30, 14]], 4), ([[1, 1, 40, 1, 21], [64]], 2), ([[3] * 21 + [1]], 1)])
def test_op_matches_each_document_alone(rows, kvh):
    g = torch.Generator().manual_seed(0)
    b, h, s, d = len(rows), 4, sum(rows[0]), 16
    x64 = [torch.randn(b, n, s, d, generator=g, dtype=torch.float64) for n in (h, kvh, kvh)]
    dout = torch.randn(b, h, s, d, generator=g, dtype=torch.float64)
    doc = _doc(rows)
    res = {}
    for name, dt in (("ref64", torch.float64), ("ref32", torch.float32), ("memo", torch.float32)):
        ts = [t.detach().to(dt).requires_grad_() for t in x64]
        out = sp_attention(*ts, doc, one_process().id, d ** -0.5, True)[0] if name == "memo" else _per_document(*ts, rows)
        out.backward(dout.to(dt))
        res[name] = [out.detach().double()] + [t.grad.double() for t in ts]
    for i, what in enumerate(("out", "dq", "dk", "dv")):
        err = (res["memo"][i] - res["ref64"][i]).abs().max().item()
        plain = (res["ref32"][i] - res["ref64"][i]).abs().max().item()
        assert err <= 2 * plain, (what, err, plain)


def test_varlen_adapter_against_a_flash_attn_standin(monkeypatch):
    """The CUDA varlen path (memo.attention.varlen) cannot run here: with flash-attn's varlen functions played by
    a CPU stand-in with their layouts, the diagonal block goes to one varlen call each way, and stays exact."""
    import os
    import sys

    from memo.attention import flash, varlen
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(__file__), "standins"))
    monkeypatch.setenv("MEMO_ATTENTION_KERNEL", "flash_attn")
    flash._interface.cache_clear()
    try:
        from flash_attn.flash_attn_interface import CALLS
        rows = [[1, 1, 40, 1, 21], [30, 34]]
        test_op_matches_each_document_alone(rows, 2)
        q = torch.empty(1, 4, 8, 16)
        assert varlen.kernel_for(q) == "flash_attn"
        assert CALLS["varlen_forward"] == 1 and CALLS["varlen_backward"] == 1, CALLS
    finally:
        flash._interface.cache_clear()
        for name in [m for m in sys.modules if m == "flash_attn" or m.startswith("flash_attn.")]:
            del sys.modules[name]


def _internal_peak(lengths, s=2048, h=4, d=16):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, h, s, d, generator=g) for _ in range(3))
    dout = torch.randn(1, h, s, d, generator=g)
    doc = _doc([lengths])
    with track_storages() as tracker:
        out, lse = ring_forward(one_process(), q, k, v, doc, causal=True, scale=d ** -0.5)
        grads = ring_backward(one_process(), dout, q, k, v, out, lse, doc, causal=True, scale=d ** -0.5)
        del out, lse, grads
    return tracker.peak_bytes, q.nbytes


def test_no_s_by_s_tensor_inside_the_op():
    """The op's forward and backward, as the custom op runs them, hold a few (s, d)-sized tensors at most:
    8 documents of 256 need no more than one document of 2048 (an s x s mask alone would be 16 MiB here)."""
    packed, qbytes = _internal_peak([256] * 8)
    single, _ = _internal_peak([2048])
    assert packed <= 8 * qbytes, (packed, qbytes)
    assert packed <= 1.25 * single, (packed, single)


def test_blocks_without_a_common_document_are_skipped():
    doc = _doc([[10, 30, 24]])
    # keys [0, 10) (document 0) against queries [40, 64) (document 40): nothing to compute
    assert doc_pairs(doc[:, 40:], doc[:, :10]) == []
    # a document spanning both blocks: one full sub-block
    assert doc_pairs(doc[:, 20:40], doc[:, 0:20]) == [(0, 0, 20, 10, 20)]
    assert doc_pairs(doc, doc) == [(0, 0, 10, 0, 10), (0, 10, 40, 10, 40), (0, 40, 64, 40, 64)]


@pytest.mark.parametrize("row, token, words", [
    ([0, 1, 2, 0, 1, 1], 5, "go from 1 to 1 at token 5"),
    ([0, 1, 2, 3, 2, 3], 4, "go from 3 to 2 at token 4"),
    ([0, 1, 7, 8, 9, 10], 2, "go from 1 to 7 at token 2"),
    ([-2, -1, 0, 1, 2, 3], 0, "start at -2"),
])
def test_position_rule(row, token, words):
    check_rows(torch.tensor([[0, 1, 2, 0, 1, 2], [5, 6, 0, 0, 1, 2]]), "t")   # packed, 1-token, offset start: fine
    with pytest.raises(MemoError, match=f"t: position_ids of row 1 {words}"):
        check_rows(torch.tensor([[0, 1, 2, 0, 1, 2], row]), "t")


def test_mask_rule():
    doc = _doc([[3, 4, 3]])
    check_mask(doc, torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1, 0, 0]]), "t")   # padding after the last document
    check_mask(doc, torch.tensor([[1, 1, 0, 1, 1, 1, 1, 1, 1, 1]]), "t")   # at a document's end
    with pytest.raises(MemoError, match="masks token 4 of row 0, inside a packed document"):
        check_mask(doc, torch.tensor([[1, 1, 1, 1, 0, 1, 1, 1, 1, 1]]), "t")
