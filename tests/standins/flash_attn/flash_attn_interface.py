"""Stand-in of flash_attn.flash_attn_interface (see the package docstring)."""

import torch

aten = torch.ops.aten
CALLS = {"forward": 0, "backward": 0}


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
