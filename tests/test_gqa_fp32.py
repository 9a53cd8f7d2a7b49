"""Grouped-query attention where SDPA would take its math path (NOTE [ Grouped heads and the math
path ] in memo/attention/sdpa.py): the rule, and a wrapped model on the path the rule chooses.

On a GPU the case is fp32 on CUDA; here the CPU's own entry of ``GQA_KERNELS`` is removed, so the
rule chooses the repeat on the CPU and the wrapped model runs memo's repeat path end to end.
"""

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import memo
from memo.attention import sdpa
from memo.attention.sdpa import repeat_kv_heads
from memo.trace import ATTENTION_KERNELS
from models import DIMS, batch, build, run_step, twin

ALL = {"flash", "efficient", "cudnn"}


def test_the_rule_repeats_only_where_no_kernel_takes_grouped_heads():
    assert repeat_kv_heads("cuda", torch.float32, 32, 4, ALL)            # the H100 refusal of issue 8
    assert not repeat_kv_heads("cuda", torch.bfloat16, 32, 4, ALL)       # flash takes grouped heads
    assert not repeat_kv_heads("cuda", torch.float16, 32, 4, ALL)
    assert not repeat_kv_heads("cuda", torch.float32, 32, 32, ALL)       # no groups: nothing to repeat
    assert repeat_kv_heads("cuda", torch.bfloat16, 32, 4, {"efficient", "cudnn"})   # flash switched off
    assert not repeat_kv_heads("cpu", torch.float32, 32, 4, ALL)         # the CPU flash kernel takes them
    assert repeat_kv_heads("cpu", torch.float32, 32, 4, set())


class _KernelKVHeads(TorchDispatchMode):
    """The k/v heads of every attention kernel memo records, as the kernel receives them."""

    def __init__(self):
        super().__init__()
        self.kv_heads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in ATTENTION_KERNELS:
            self.kv_heads.append(args[1].shape[1])
        return func(*args, **(kwargs or {}))


def _max_err(grads, ref):
    return {n: (grads[n].double() - ref[n]).abs().max().item() for n in ref}


def test_repeated_heads_give_the_plain_models_gradients(monkeypatch):
    monkeypatch.setitem(sdpa.GQA_KERNELS, ("cpu", "flash"), ())
    heads, kv_heads = DIMS["num_attention_heads"], DIMS["num_key_value_heads"]
    assert kv_heads < heads and repeat_kv_heads("cpu", torch.float32, heads, kv_heads, ALL)
    model = build("llama", num_hidden_layers=3)
    micro = [batch(2, 32)]       # no padding: no mask, so HF itself would pass grouped heads (enable_gqa)
    _, ref64 = run_step(twin(model, torch.float64), micro)
    _, plain = run_step(twin(model), micro)
    wrapped = twin(model)
    memo.wrap(wrapped, memo.MemoConfig(swap_ratio=0.37, keep_last_layers=1, loss_chunk_size=None,
                                       host_memory_budget="1GiB"))
    assert wrapped.config._attn_implementation == sdpa.NAME
    with _KernelKVHeads() as seen:
        _, got = run_step(wrapped, micro)
    assert seen.kv_heads and set(seen.kv_heads) == {heads}        # every kernel got repeated k/v heads
    assert memo.stats(wrapped).recomputed_bytes > 0                # recomputation replayed the kernel
    plain_err, memo_err = _max_err(plain, ref64), _max_err(got, ref64)
    for name in ref64:
        assert memo_err[name] <= 2 * plain_err[name], (name, memo_err[name], plain_err[name])
    memo.unwrap(wrapped)
    assert wrapped.config._attn_implementation == "sdpa"
