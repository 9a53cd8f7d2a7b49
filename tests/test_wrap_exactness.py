"""Wrapped models give the gradients of the unwrapped model (DESIGN section 4)."""

import pytest
import torch

import memo
from models import batch, build, run_step, twin

CASES = {
    "b1": lambda: [batch(1, 64)],
    "b2-padded": lambda: [batch(2, 64, pad_last=9)],
    "accum2": lambda: [batch(2, 48, seed=1), batch(2, 48, seed=2)],
}


def _wrapped(model, ratio, chunk):
    m = twin(model)
    memo.wrap(m, memo.MemoConfig(swap_ratio=ratio, loss_chunk_size=chunk, host_memory_budget="1GiB"))
    return m


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("case", list(CASES))
def test_bit_exact_when_nothing_is_recomputed(kind, case):
    model = build(kind)
    micro = CASES[case]()
    ref_losses, ref_grads = run_step(twin(model), micro)
    wrapped = _wrapped(model, 1.0, None)
    losses, got = run_step(wrapped, micro)
    for a, b in zip(ref_losses, losses):
        assert torch.equal(a, b)
    assert ref_grads.keys() == got.keys()
    for name in ref_grads:
        assert torch.equal(ref_grads[name], got[name]), name
    st = memo.stats(wrapped)
    assert st.recomputed_bytes == 0 and st.swapped_bytes > 0


def _max_err(grads, ref):
    return {n: (grads[n].double() - ref[n]).abs().max().item() for n in ref}


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("ratio,chunk", [(0.0, None), (0.37, None), (1.0, 24), (0.37, 40)])
@pytest.mark.parametrize("case", ["b2-padded", "accum2"])
def test_recompute_and_chunking_within_twice_plain_error(kind, ratio, chunk, case):
    model = build(kind)
    micro = CASES[case]()
    _, ref64 = run_step(twin(model, torch.float64), micro)
    _, plain = run_step(twin(model), micro)
    wrapped = _wrapped(model, ratio, chunk)
    _, got = run_step(wrapped, micro)
    plain_err, memo_err = _max_err(plain, ref64), _max_err(got, ref64)
    for name in ref64:
        assert memo_err[name] <= 2 * plain_err[name], (name, memo_err[name], plain_err[name])
    if ratio < 1.0:
        assert memo.stats(wrapped).recomputed_bytes > 0


def test_bf16_within_twice_plain_bf16_error():
    model = build("llama")
    micro = CASES["b2-padded"]()
    _, ref64 = run_step(twin(model, torch.float64), micro)
    _, plain = run_step(twin(model, torch.bfloat16), micro)
    wrapped = twin(model, torch.bfloat16)
    memo.wrap(wrapped, memo.MemoConfig(swap_ratio=0.5, loss_chunk_size=32, host_memory_budget="1GiB"))
    _, got = run_step(wrapped, micro)
    plain_err, memo_err = _max_err(plain, ref64), _max_err(got, ref64)
    for name in ref64:
        assert memo_err[name] <= 2 * plain_err[name], (name, memo_err[name], plain_err[name])


def test_unwrap_restores_the_plain_model():
    model = build("llama")
    micro = CASES["b1"]()
    _, ref = run_step(twin(model), micro)
    m = twin(model)
    memo.wrap(m, memo.MemoConfig(swap_ratio=0.0, loss_chunk_size=16, host_memory_budget="1GiB"))
    run_step(m, micro)
    memo.unwrap(m)
    out = m(input_ids=micro[0][0], labels=micro[0][2])
    assert out.logits is not None     # the model's own head and loss are back
    _, got = run_step(m, micro)
    for name in ref:
        assert torch.equal(ref[name], got[name]), name


@pytest.mark.parametrize("ratio", [1.0, 0.37])
def test_frozen_embeddings(ratio):
    """The first layer's input does not require grad; its parameters do. memo still swaps it."""
    model = build("llama")
    model.model.embed_tokens.weight.requires_grad_(False)
    micro = CASES["b2-padded"]()
    _, ref64 = run_step(twin(model, torch.float64), micro)
    _, plain = run_step(twin(model), micro)
    wrapped = _wrapped(model, ratio, None)
    _, got = run_step(wrapped, micro)
    assert "model.embed_tokens.weight" not in got and memo.stats(wrapped).layers[0].swapped_bytes > 0
    plain_err, memo_err = _max_err(plain, ref64), _max_err(got, ref64)
    for name in ref64:
        if ratio == 1.0:
            assert torch.equal(plain[name], got[name]), name
        assert memo_err[name] <= 2 * plain_err[name], (name, memo_err[name], plain_err[name])


def test_offload_dtype_bf16_halves_host_bytes():
    model = build("llama")
    micro = CASES["b2-padded"]()
    _, plain = run_step(twin(model), micro)
    exact = _wrapped(model, 1.0, None)
    run_step(exact, micro)
    half = twin(model)
    memo.wrap(half, memo.MemoConfig(swap_ratio=1.0, loss_chunk_size=None, offload_dtype="bf16",
                                    host_memory_budget="1GiB"))
    _, got = run_step(half, micro)
    assert memo.stats(half).swapped_bytes * 2 == memo.stats(exact).swapped_bytes
    for name in plain:   # lossy by design: bf16 keeps 8 bits of mantissa
        torch.testing.assert_close(got[name], plain[name], rtol=5e-2, atol=5e-3 * plain[name].abs().max().item())


@pytest.mark.parametrize("family", ["Qwen3", "Gemma", "Olmo2", "Phi3", "Starcoder2"])
def test_more_families(family):
    """Other HF decoder families (q/k norms, post-norms, fused qkv, LayerNorm + GeLU with biases)."""
    import transformers
    config_cls = getattr(transformers, f"{family}Config")
    model_cls = getattr(transformers, f"{family}ForCausalLM")
    torch.manual_seed(0)
    model = model_cls(config_cls(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                                 num_key_value_heads=2, head_dim=16, vocab_size=128, pad_token_id=0, use_cache=False,
                                 attn_implementation="sdpa"))
    micro = [batch(2, 40)]
    _, ref64 = run_step(twin(model, torch.float64), micro)
    _, plain = run_step(twin(model), micro)
    wrapped = _wrapped(model, 0.37, None)
    _, got = run_step(wrapped, micro)
    assert memo.stats(wrapped).recomputed_bytes > 0
    plain_err, memo_err = _max_err(plain, ref64), _max_err(got, ref64)
    for name in ref64:
        assert memo_err[name] <= 2 * plain_err[name], (name, memo_err[name], plain_err[name])


@pytest.mark.parametrize("family", ["Cohere", "Granite"])
def test_chunked_loss_on_scaled_heads(family):
    """Cohere scales its logits (reproduced); Granite divides them by logits_scaling (refused)."""
    import transformers
    torch.manual_seed(0)
    model = getattr(transformers, f"{family}ForCausalLM")(getattr(transformers, f"{family}Config")(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, pad_token_id=0, use_cache=False, attn_implementation="sdpa"))
    if family == "Granite":
        with pytest.raises(memo.MemoError, match="loss_chunk_size=None"):
            _wrapped(model, 1.0, 16)
        return
    micro = [batch(2, 40)]
    _, ref64 = run_step(twin(model, torch.float64), micro)
    _, plain = run_step(twin(model), micro)
    _, got = run_step(_wrapped(model, 1.0, 16), micro)
    plain_err, memo_err = _max_err(plain, ref64), _max_err(got, ref64)
    for name in ref64:
        assert memo_err[name] <= 2 * plain_err[name], (name, memo_err[name], plain_err[name])


def test_csrc_and_pure_torch_swap_paths_agree(monkeypatch):
    """The swap path packs through memo._C when it is active and through torch otherwise: same bits."""
    from memo import _ext
    if _ext.csrc() is None:
        pytest.skip(f"memo._C is not active: {_ext.status().get('reason')}")
    model = build("llama")
    micro = CASES["b2-padded"]()
    runs = {}
    for disabled in ("0", "1"):
        monkeypatch.setenv("MEMO_DISABLE_CSRC", disabled)
        wrapped = _wrapped(model, 0.37, None)
        runs[disabled] = run_step(wrapped, micro)[1]
        assert memo.stats(wrapped).swapped_bytes > 0
    for name in runs["0"]:
        assert torch.equal(runs["0"][name], runs["1"][name]), name


def test_dropout_layers_recompute_nothing_and_stay_exact():
    """Phi3 drops out its residual branches: a recomputed prefix would draw other masks, so such
    layers swap every token (NOTE [ Which tokens are recomputed ] rule 4)."""
    import transformers
    torch.manual_seed(0)
    model = transformers.Phi3ForCausalLM(transformers.Phi3Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, pad_token_id=0, resid_pdrop=0.3, use_cache=False, attn_implementation="sdpa")).train()
    micro = [batch(2, 40)]
    torch.manual_seed(5)
    _, plain = run_step(twin(model), micro)
    wrapped = _wrapped(model, 0.37, None)
    torch.manual_seed(5)
    _, got = run_step(wrapped, micro)
    assert memo.stats(wrapped).recomputed_bytes == 0 and memo.stats(wrapped).swapped_bytes > 0
    for name in plain:
        assert torch.equal(plain[name], got[name]), name


@pytest.mark.parametrize("ratio", [1.0, 0.37])
def test_autocast_bf16(ratio):
    """Recomputation runs inside backward, where autocast is off; memo re-enters the forward's."""
    model = build("llama")
    micro = CASES["b2-padded"]()
    _, ref64 = run_step(twin(model, torch.float64), micro)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, plain = run_step(twin(model), micro)
        wrapped = _wrapped(model, ratio, None)
        _, got = run_step(wrapped, micro)
    plain_err, memo_err = _max_err(plain, ref64), _max_err(got, ref64)
    for name in ref64:
        if ratio == 1.0:
            assert torch.equal(plain[name], got[name]), name
        assert memo_err[name] <= 2 * plain_err[name], (name, memo_err[name], plain_err[name])
