"""memo.wrap's contract: bad input refused early, host memory bounded, auto ratio, stats."""

import gc
import json
import os
import resource
import subprocess
import sys
import warnings

import pytest
import torch

import memo
from memo import MemoConfig, MemoError, _ext
from memo.planner.units import format_bytes
from models import batch, build, run_step, twin


def _wrap(model, **kw):
    kw.setdefault("loss_chunk_size", None)
    kw.setdefault("host_memory_budget", "1GiB")
    return memo.wrap(model, MemoConfig(**kw))


@pytest.mark.parametrize("ratio", [-0.1, 1.5, "most", True])
def test_bad_swap_ratio(ratio):
    with pytest.raises(MemoError, match="swap_ratio"):
        MemoConfig(swap_ratio=ratio)


def test_bad_budget_string():
    with pytest.raises(MemoError, match="host_memory_budget"):
        MemoConfig(host_memory_budget="plenty")


def test_budget_too_small_is_refused_before_the_first_forward_with_the_budget_that_suffices():
    model = _wrap(build("llama"), swap_ratio=1.0, host_memory_budget=4096)
    from torch._subclasses.fake_tensor import FakeTensor
    ran = []   # real (not traced) runs of the first layer's attention
    model.model.layers[0].self_attn.register_forward_hook(
        lambda mod, args, out: ran.append(1) if not isinstance(out[0], FakeTensor) else None)
    ids, mask, labels = batch(1, 64)
    with pytest.raises(MemoError, match=r"host_memory_budget='1GiB'.*0\.0 needs") as e:
        model(input_ids=ids, labels=labels)
    assert not ran, "the error must come before any layer computed"
    assert "swap_ratio=1.0 needs" in str(e.value)


def test_auto_budget_too_small_even_for_inputs():
    model = _wrap(build("llama"), swap_ratio="auto", host_memory_budget=4096)
    ids, _, labels = batch(1, 64)
    with pytest.raises(MemoError, match="cannot hold even the layer inputs"):
        model(input_ids=ids, labels=labels)


def test_wrap_twice_and_unwrap_unwrapped():
    model = _wrap(build("llama"))
    with pytest.raises(MemoError, match="already wrapped"):
        _wrap(model)
    memo.unwrap(model)
    with pytest.raises(MemoError, match="not wrapped"):
        memo.unwrap(model)
    with pytest.raises(MemoError, match="not wrapped"):
        memo.stats(model)


def test_unsupported_models_are_refused():
    from transformers import GPT2Config, GPT2LMHeadModel
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(MemoError, match="decoder stack"):
        _wrap(gpt2)
    eager = build("llama", attn_implementation="eager")
    with pytest.raises(MemoError, match="attn_implementation='sdpa'"):
        _wrap(eager)
    ckpt = build("llama")
    ckpt.activation_checkpointing_enable()
    with pytest.raises(MemoError, match="activation_checkpointing_disable"):
        _wrap(ckpt)


def test_exception_inside_forward_leaks_no_host_blocks():
    model = _wrap(build("llama"), swap_ratio=0.5)

    def boom(*args):
        raise RuntimeError("boom")

    handle = model.model.layers[2].register_forward_hook(boom)
    ids, _, labels = batch(2, 64)
    with pytest.raises(RuntimeError, match="boom"):
        model(input_ids=ids, labels=labels)
    gc.collect()
    pool = memo.stats(model).host_pool
    assert pool["high_water_bytes"] > 0 and pool["used_bytes"] == 0
    handle.remove()
    run_step(model, [batch(2, 64)])     # and the model still trains
    assert memo.stats(model).host_pool["used_bytes"] == 0


def test_host_memory_does_not_grow_over_20_steps():
    model = _wrap(build("llama"), swap_ratio=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    micro = [batch(2, 128)]
    reserved, rss = [], []
    for step in range(20):
        run_step(model, micro)
        opt.step()
        pool = memo.stats(model).host_pool
        assert pool["used_bytes"] == 0
        reserved.append(pool["reserved_bytes"])
        rss.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    assert len(set(reserved)) == 1 and reserved[0] > 0
    assert memo.stats(model).host_pool["num_allocs"] > 20
    assert rss[-1] - rss[2] < 20 * 1024, "peak RSS (KiB) grew after warm-up"


def test_second_backward_through_a_swapped_layer_is_refused():
    model = _wrap(build("llama"), swap_ratio=1.0)
    ids, _, labels = batch(1, 32)
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward(retain_graph=True)
    with pytest.raises(MemoError, match="retain_graph"):
        loss.backward()


def test_no_grad_forward_swaps_nothing_and_matches():
    model = build("llama")
    ref = twin(model)
    _wrap(model, swap_ratio=0.0)
    ids, mask, _ = batch(2, 32)
    with torch.no_grad():
        a = ref(input_ids=ids, attention_mask=mask).logits
        b = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(a, b)
    assert memo.stats(model).swapped_bytes == 0


def test_stats_report_what_was_swapped_and_kept():
    model = _wrap(build("llama", num_hidden_layers=5), swap_ratio=0.25, keep_last_layers=2)
    run_step(model, [batch(2, 64)])
    st = memo.stats(model)
    d = st.to_dict()
    assert [layer["kept"] for layer in d["layers"]] == [False, False, False, True, True]
    for layer in st.layers[:3]:
        assert layer.swapped_bytes > 0 and layer.recomputed_bytes > 0 and layer.resident_bytes == 0
        assert layer.swapped_bytes + layer.recomputed_bytes == layer.activation_bytes
    for layer in st.layers[3:]:
        assert layer.resident_bytes == layer.activation_bytes > 0 and layer.swapped_bytes == 0
    assert d["host_pool"]["high_water_bytes"] >= sum(layer.swapped_bytes for layer in st.layers)
    assert "forward_s" in d["step"]
    # The text says which ratio the step used, the setting it came from and why; then a row per layer.
    assert st.swap_ratio == 0.25 and st.swap_ratio_reason
    lines = str(st).splitlines()
    assert lines[0] == f"memo: swap_ratio 0.250 (0.25); {st.swap_ratio_reason}"
    for layer, row in zip(st.layers, lines[2:7]):
        assert row.split()[:2] == [str(layer.index), "kept" if layer.kept else "memo"], row
        assert format_bytes(layer.swapped_bytes) in row and format_bytes(layer.recomputed_bytes) in row, row
    assert lines[7].startswith("host pool: reserved ")


def _backend_info_in_a_fresh_process(before: str = "", **env) -> dict:
    """memo.backend_info() of a new interpreter with ``env`` set, after running ``before``."""
    script = before + "import json, memo; print(json.dumps(memo.backend_info()))"
    run = subprocess.run([sys.executable, "-c", script], env=dict(os.environ, **env), capture_output=True, text=True,
                         check=True)
    return json.loads(run.stdout.splitlines()[-1])


def test_backend_info_says_what_runs():
    """Each backend that does not run says why: MEMO_DISABLE_CSRC=1, a memo._C that does not load,
    a CPU build of torch (no CUDA part, no streams, no pinned memory)."""
    on = _backend_info_in_a_fresh_process(MEMO_DISABLE_CSRC="0")
    off = _backend_info_in_a_fresh_process(MEMO_DISABLE_CSRC="1")
    missing = _backend_info_in_a_fresh_process("import sys; sys.modules['memo._C'] = None  # import fails\n",
                                               MEMO_DISABLE_CSRC="0")
    built = _ext._module is not None
    assert on["csrc"]["loaded"] is on["csrc"]["active"] is built
    assert ("reason" in on["csrc"]) is not built
    assert off["csrc"]["loaded"] is built and off["csrc"]["active"] is False
    if built:
        assert off["csrc"]["reason"].startswith("MEMO_DISABLE_CSRC=1: the pure-torch fallbacks"), off["csrc"]
    assert missing["csrc"]["loaded"] is missing["csrc"]["active"] is False
    assert missing["csrc"]["reason"].startswith("memo._C did not load"), missing["csrc"]
    assert "pip install --no-build-isolation -e ." in missing["csrc"]["reason"]

    if torch.version.cuda is None:              # a CPU build of torch
        assert on["device"] == "cpu" and on["pinned_host_memory"] is False
        assert on["streams"].startswith("cpu: torch.Stream/torch.Event are no-ops"), on["streams"]
        if built:
            assert on["csrc"]["cuda_part"] is False
            assert "CPU build of torch" in on["csrc"]["cuda_reason"], on["csrc"]
    elif built:
        assert ("cuda_reason" in on["csrc"]) is not on["csrc"]["cuda_part"], on["csrc"]
    try:
        import flash_attn  # noqa: F401
        assert on["flash_attn"] == "available"
    except ImportError:
        assert on["flash_attn"].startswith("not installed") and "memo[flash]" in on["flash_attn"]


def test_a_kv_cache_during_training_is_dropped_with_a_warning():
    """HF configs default to use_cache=True: the model then hands every layer a cache (``cache=``
    since transformers 5.x). A cache would keep every layer's keys and values alive; memo drops it."""
    model = build("llama", use_cache=True)
    plain = twin(model)
    # the model's own loss (the chunked loss calls the decoder stack with use_cache=False itself)
    memo.wrap(model, memo.MemoConfig(swap_ratio=0.5, keep_last_layers=1, host_memory_budget="1GiB",
                                     loss_chunk_size=None))
    micro = batch(1, 32)
    with pytest.warns(UserWarning, match="KV cache was passed to a wrapped layer"):
        losses, grads = run_step(model, [micro])
    plain_losses, plain_grads = run_step(plain, [micro])
    assert abs(losses[0].item() - plain_losses[0].item()) < 1e-5
    assert memo.stats(model).swapped_bytes > 0
