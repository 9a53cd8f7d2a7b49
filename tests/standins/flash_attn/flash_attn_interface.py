"""Stand-in of flash_attn.flash_attn_interface (see the package docstring)."""

import torch

aten = torch.ops.aten
CALLS = {"forward": 0, "backward": 0, "varlen_forward": 0, "varlen_backward": 0}


def _check(*ts):
    for t in ts:
        assert t.dim() == 4 and t.stride(-1) == 1, "flash-attn wants (b, s, h, d) with a contiguous last dim"


def _flash_attn_forward(q, k, v, dropout_p, softmax_scale, causal, window_size_left, window_size_right, softcap,
                        alibi_slopes, return_softmax):
    _check(q, k, v)
    assert dropout_p == 0.0 and window_size_left == -1 and window_size_right == -1 and softcap == 0.0
    CALLS["forward"] += 1
    out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q.transpose(1, 2), k.transpose(1, 2),
                                                                v.transpose(1, 2), 0.0, causal, scale=softmax_scale)
    return out.transpose(1, 2).contiguous(), lse.contiguous(), None, None


def _flash_attn_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal,
                         window_size_left, window_size_right, softcap, alibi_slopes, deterministic, rng_state=None):
    _check(dout, q, k, v, out)
    assert softmax_lse.shape == (q.shape[0], q.shape[2], q.shape[1]), "lse is (batch, heads, seqlen)"
    CALLS["backward"] += 1
    t = lambda x: x.transpose(1, 2)  # noqa: E731
    gq, gk, gv = aten._scaled_dot_product_flash_attention_for_cpu_backward(
        t(dout), t(q), t(k), t(v), t(out), softmax_lse, 0.0, causal, scale=softmax_scale)
    dq.copy_(t(gq))
    dk.copy_(t(gk))
    dv.copy_(t(gv))
    return None


def _sequences(cu_seqlens_q, cu_seqlens_k):
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    assert cu_seqlens_q.dtype == torch.int32 and cq[0] == 0 and len(cq) == len(ck), "cu_seqlens: int32, from 0"
    return [(slice(a, b), slice(c, d)) for a, b, c, d in zip(cq[:-1], cq[1:], ck[:-1], ck[1:])]


def _varlen_check(*ts):
    for t in ts:
        assert t.dim() == 3 and t.stride(-1) == 1, "flash-attn varlen wants (total, h, d) with a contiguous last dim"


def _flash_attn_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                               softmax_scale, causal, window_size_left=-1, window_size_right=-1, softcap=0.0,
                               alibi_slopes=None, return_softmax=False, block_table=None, leftpad_k=None,
                               seqused_k=None, zero_tensors=False):
    """out (total_q, h, d); softmax_lse (h, total_q) fp32, each sequence of cu_seqlens on its own."""
    _varlen_check(q, k, v)
    assert dropout_p == 0.0 and window_size_left == -1 and window_size_right == -1 and softcap == 0.0
    CALLS["varlen_forward"] += 1
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[1], q.shape[0], dtype=torch.float32)
    for sq, sk in _sequences(cu_seqlens_q, cu_seqlens_k):
        assert sq.stop - sq.start <= max_seqlen_q and sk.stop - sk.start <= max_seqlen_k
        t = lambda x: x.transpose(0, 1).unsqueeze(0)  # noqa: E731  (n, h, d) -> (1, h, n, d)
        o, l = aten._scaled_dot_product_flash_attention_for_cpu(t(q[sq]), t(k[sk]), t(v[sk]), 0.0, causal,
                                                                scale=softmax_scale)
        out[sq] = o[0].transpose(0, 1)
        lse[:, sq] = l[0].float()
    return out, lse, None, None


def _flash_attn_varlen_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k,
                                max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal, window_size_left,
                                window_size_right, softcap, alibi_slopes, deterministic, rng_state=None,
                                zero_tensors=False):
    _varlen_check(dout, q, k, v, out)
    assert softmax_lse.shape == (q.shape[1], q.shape[0]), "varlen lse is (heads, total_q)"
    CALLS["varlen_backward"] += 1
    t = lambda x: x.transpose(0, 1).unsqueeze(0)  # noqa: E731
    for sq, sk in _sequences(cu_seqlens_q, cu_seqlens_k):
        gq, gk, gv = aten._scaled_dot_product_flash_attention_for_cpu_backward(
            t(dout[sq]), t(q[sq]), t(k[sk]), t(v[sk]), t(out[sq]), softmax_lse[:, sq].unsqueeze(0).contiguous(), 0.0,
            causal, scale=softmax_scale)
        dq[sq], dk[sk], dv[sk] = gq[0].transpose(0, 1), gk[0].transpose(0, 1), gv[0].transpose(0, 1)
    return None
