"""Token tiling of the MLP (NOTE [ Token tiling ] in memo/tiling.py): exact against the plain model."""

import pytest
import torch
import transformers

import memo
from memo import tiling
from models import batch, build, run_step, twin

FAMILY_DIMS = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, vocab_size=128, pad_token_id=0, use_cache=False,
                   attn_implementation="sdpa")


def _family(family: str, **overrides):
    torch.manual_seed(0)
    config_name = {"Gemma3": "Gemma3TextConfig"}.get(family, f"{family}Config")   # Gemma3Config is multimodal
    config = getattr(transformers, config_name)(**{**FAMILY_DIMS, **overrides})
    return getattr(transformers, f"{family}ForCausalLM")(config)


def _max_err(grads, ref):
    return {n: (grads[n].double() - ref[n]).abs().max().item() for n in ref}


def _wrapped(model, **config):
    m = twin(model)
    memo.wrap(m, memo.MemoConfig(host_memory_budget="1GiB", loss_chunk_size=None, **config))
    return m


def _assert_within_twice_plain(model, micro, **config):
    _, ref64 = run_step(twin(model, torch.float64), micro)
    _, plain = run_step(twin(model), micro)
    wrapped = _wrapped(model, **config)
    _, got = run_step(wrapped, micro)
    plain_err, memo_err = _max_err(plain, ref64), _max_err(got, ref64)
    bad = {n: (memo_err[n], plain_err[n]) for n in ref64 if not memo_err[n] <= 2 * plain_err[n]}
    assert not bad, bad
    return wrapped


# --- the tiled MLP alone ---------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["Llama", "Phi3", "Starcoder2"])
def test_tiled_mlp_alone_against_fp64(family):
    """SwiGLU, fused gate_up (Phi3) and a GeLU MLP with biases (Starcoder2), 5 uneven tiles."""
    mlp = _family(family).model.layers[0].mlp
    x = torch.randn(2, 37, 64)
    g = torch.randn(2, 37, 64)
    ref = {}
    for dtype in (torch.float64, torch.float32):
        m = twin(mlp, dtype)
        xi = x.to(dtype).clone().requires_grad_()
        m(xi).backward(g.to(dtype))
        ref[dtype] = [xi.grad] + [p.grad for p in m.parameters()]
    m = twin(mlp)
    xi = x.clone().requires_grad_()
    out = tiling.tiled_mlp(m.forward, xi, list(m.parameters()), 8)
    torch.testing.assert_close(out, mlp(x), rtol=0, atol=1e-6)
    out.backward(g)
    got = [xi.grad] + [p.grad for p in m.parameters()]
    for a, plain, exact in zip(got, ref[torch.float32], ref[torch.float64]):
        assert (a.double() - exact).abs().max() <= 2 * (plain.double() - exact).abs().max() + 1e-12


def test_one_tile_is_bit_identical_to_the_untiled_mlp():
    mlp = build("llama").model.layers[0].mlp
    x = torch.randn(1, 40, 64)
    g = torch.randn(1, 40, 64)
    a, b = twin(mlp), twin(mlp)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_a = a(xa)
    out_b = tiling.tiled_mlp(b.forward, xb, list(b.parameters()), 40)
    assert torch.equal(out_a, out_b)
    out_a.backward(g)
    out_b.backward(g)
    assert torch.equal(xa.grad, xb.grad)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa.grad, pb.grad)


def test_tiled_backward_draws_the_forward_dropout_masks():
    """Dropout inside the MLP: the backward's recompute restores the RNG (NOTE [ Token tiling ] rule 4).
    The reference runs the same tiles with autograd under the same seed."""
    mlp = _family("Starcoder2", residual_dropout=0.5).model.layers[0].mlp.train()
    x = torch.randn(1, 30, 64)
    g = torch.randn(1, 30, 64)
    ref = twin(mlp)
    xr = x.clone().requires_grad_()
    torch.manual_seed(7)
    torch.cat([ref(xr[:, i:i + 8]) for i in range(0, 30, 8)], dim=1).backward(g)
    m = twin(mlp)
    xt = x.clone().requires_grad_()
    torch.manual_seed(7)
    out = tiling.tiled_mlp(m.forward, xt, list(m.parameters()), 8)
    torch.randn(100)   # the generator moves on before the backward
    out.backward(g)
    torch.testing.assert_close(xt.grad, xr.grad, rtol=1e-6, atol=1e-7)
    for pa, pb in zip(ref.parameters(), m.parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-5, atol=1e-6)


def test_bf16_parameter_gradients_sum_in_fp32():
    mlp = build("llama").model.layers[0].mlp
    x = torch.randn(1, 256, 64)
    g = torch.randn(1, 256, 64)
    exact = twin(mlp, torch.float64)
    exact(x.double()).backward(g.double())
    plain, tiled = twin(mlp, torch.bfloat16), twin(mlp, torch.bfloat16)
    plain(x.bfloat16()).backward(g.bfloat16())
    out = tiling.tiled_mlp(tiled.forward, x.bfloat16(), list(tiled.parameters()), 16)
    out.backward(g.bfloat16())
    for e, p, t in zip(exact.parameters(), plain.parameters(), tiled.parameters()):
        assert t.grad.dtype == torch.bfloat16
        assert (t.grad.double() - e.grad).abs().max() <= 2 * (p.grad.double() - e.grad).abs().max()


# --- wrapped models ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_one_tile_covering_the_sequence_is_bit_exact(kind):
    """alpha = 1 and one tile: the same ops as the plain model, the same bits."""
    model = build(kind)
    micro = [batch(2, 64)]
    ref_losses, ref = run_step(twin(model), micro)
    wrapped = _wrapped(model, swap_ratio=1.0, tile_tokens=64)
    losses, got = run_step(wrapped, micro)
    assert torch.equal(ref_losses[0], losses[0])
    for name in ref:
        assert torch.equal(ref[name], got[name]), name
    assert [s.tile_tokens for s in memo.stats(wrapped).layers] == [64] * 4


@pytest.mark.parametrize("ratio", [0.0, 0.37, 1.0])
@pytest.mark.parametrize("keep", [0, 2])
def test_tiles_at_every_ratio_and_in_kept_layers(ratio, keep):
    model = build("llama")
    wrapped = _assert_within_twice_plain(model, [batch(2, 64, pad_last=9)], swap_ratio=ratio, tile_tokens=24,
                                         keep_last_layers=keep)
    st = memo.stats(wrapped)
    assert [s.tile_tokens for s in st.layers] == [24] * 4
    assert [s.policy for s in st.layers] == ["memo"] * (4 - keep) + ["kept"] * keep


@pytest.mark.parametrize("ratio,tile,seq", [(0.75, 24, 64), (0.5, "auto", 4608)])
def test_recompute_of_a_short_prefix_tiles_as_the_forward_did(ratio, tile, seq):
    """Rule 3: memo recomputes a prefix shorter than the tile (16 of 64 tokens; 2304 of 4608, where "auto"
    would not tile); it must tile and fuse the norm as the forward did, or it saves other tensors."""
    model = build("llama", num_hidden_layers=2)
    wrapped = _assert_within_twice_plain(model, [batch(1, seq)], swap_ratio=ratio, tile_tokens=tile,
                                         keep_last_layers=0)
    assert [s.tile_tokens for s in memo.stats(wrapped).layers] == [24 if tile == 24 else 4096] * 2


@pytest.mark.parametrize("family", ["Mistral", "Qwen3", "Gemma", "Gemma3", "Olmo2", "Phi3", "Starcoder2"])
def test_tiles_in_every_family(family):
    model = _family(family)
    wrapped = _assert_within_twice_plain(model, [batch(2, 40)], swap_ratio=0.37, tile_tokens=16)
    assert {s.tile_tokens for s in memo.stats(wrapped).layers} == {16}


def test_tiled_layers_save_no_mlp_intermediates():
    """The MLP's four (batch, seq, intermediate) tensors (gate, SiLU, up, product) are no longer saved."""
    model = build("llama", intermediate_size=512)
    micro = [batch(1, 64)]
    untiled = _wrapped(model, swap_ratio=1.0, tile_tokens=None, keep_last_layers=0)
    tiled = _wrapped(model, swap_ratio=1.0, tile_tokens=16, keep_last_layers=0)
    run_step(untiled, micro)
    run_step(tiled, micro)
    per_token_mlp = 64 * 512 * 4
    # NOTE [ Token tiling ] rule 8: the norm before the MLP is tiled with it, so its output (the MLP's
    # input) and its rsqrt are not saved either; its input is, in their place.
    normed = 64 * 64 * 4 + 64 * 4
    for u, t in zip(memo.stats(untiled).layers, memo.stats(tiled).layers):
        assert u.activation_bytes - t.activation_bytes >= 4 * per_token_mlp + normed, (u.activation_bytes,
                                                                                       t.activation_bytes)


@pytest.mark.parametrize("family,norm", [("Llama", "post_attention_layernorm"), ("Phi3", "post_attention_layernorm"),
                                         ("Starcoder2", "post_attention_layernorm"),
                                         ("Gemma3", "pre_feedforward_layernorm"), ("Olmo2", None)])
def test_the_norm_feeding_the_mlp_is_tiled_with_it(family, norm):
    """Rule 8: which norm feeds the MLP; while tiled it passes its input on and the MLP tiles both, so the
    tiled Function saves the norm's input (the layer's hidden state after attention)."""
    model = _family(family)
    layer = model.model.layers[0]
    found = tiling.norm_before_mlp(layer)
    assert found is (getattr(layer, norm) if norm else None)
    if norm is None:
        return
    norm_calls, saved = [], []
    getattr(layer, norm).register_forward_hook(lambda mod, args, out: norm_calls.append((args[0], out)))

    def pack(t):
        saved.append(t)
        return t
    tiled = tiling.install(model.model.layers, 16, model.config.intermediate_size)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=batch(1, 40)[0])
    finally:
        tiling.uninstall(tiled)
    [(norm_input, norm_output)] = norm_calls
    assert norm_output is norm_input, "the tiled norm passes its input on"
    assert any(t is norm_input for t in saved), "the norm's input is what the tiled Function saves"


def test_an_mlp_fed_something_else_than_its_norm_is_refused():
    """Rule 8's guard: a layer that changes the norm's output before the MLP cannot be tiled with the norm."""
    model = build("llama")
    wrapped = _wrapped(model, tile_tokens=16)
    wrapped.model.layers[1].mlp.register_forward_pre_hook(lambda mod, args: (args[0] * 1.0,))
    with pytest.raises(memo.MemoError, match="not the output of the norm before it.*tile_tokens=None"):
        run_step(wrapped, [batch(1, 40)])


def test_unwrap_removes_the_tiling():
    model = build("llama")
    m = _wrapped(model, tile_tokens=8)
    assert "forward" in m.model.layers[0].mlp.__dict__
    memo.unwrap(m)
    assert "forward" not in m.model.layers[0].mlp.__dict__


def test_auto_rule():
    # Llama-3-8B at 128K tokens, bf16: 256 MiB of intermediate per tile -> 9216 tokens.
    assert tiling.auto_tile(batch=1, seq=131072, hidden=4096, intermediate=14336, itemsize=2) == 9216
    # Short sequences run untiled; the tile never goes below 4096 tokens.
    assert tiling.auto_tile(batch=1, seq=4096, hidden=4096, intermediate=14336, itemsize=2) is None
    assert tiling.auto_tile(batch=1, seq=8192, hidden=64, intermediate=128, itemsize=4) == 4096
    # The intermediate of one tile is at most one hidden-state tensor of the whole sequence.
    assert tiling.auto_tile(batch=1, seq=32768, hidden=256, intermediate=2048, itemsize=4) == 4096
    assert tiling.auto_tile(batch=1, seq=65536, hidden=1024, intermediate=2048, itemsize=4) == 32768


@pytest.mark.parametrize("bad", [0, -4, 2.5, "big", True])
def test_bad_tile_setting_is_refused(bad):
    with pytest.raises(memo.MemoError, match="tile_tokens=.*None.*'auto'.*positive int"):
        memo.MemoConfig(tile_tokens=bad)


@pytest.mark.parametrize("family,per_step", [("Llama", 2), ("Olmo2", 3)])
def test_recompute_skips_the_mlp_output_nothing_saves(family, per_step):
    """NOTE [ Token tiling ] rule 7: at ratio 0 Llama's MLP runs over the sequence twice per step (forward,
    tiled backward), as untiled; Olmo2 normalises the MLP's output (a saved tensor), so its recompute
    computes it: three times."""
    from torch._subclasses.fake_tensor import FakeTensor
    model = _family(family)
    wrapped = _wrapped(model, swap_ratio=0.0, tile_tokens=16, keep_last_layers=0)
    tokens = []
    for layer in wrapped.model.layers:
        layer.mlp.down_proj.register_forward_hook(
            lambda mod, args, out: tokens.append(out.shape[1]) if not isinstance(out, FakeTensor) else None)
    micro = [batch(2, 40)]
    run_step(wrapped, micro)
    assert sum(tokens) == per_step * 40 * 3, tokens
    _, ref64 = run_step(twin(model, torch.float64), micro)
    _, plain = run_step(twin(model), micro)
    _, got = run_step(wrapped, micro)
    for n in ref64:
        assert (got[n].double() - ref64[n]).abs().max() <= 2 * (plain[n].double() - ref64[n]).abs().max(), n
