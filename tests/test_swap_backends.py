"""The swap path through memo._C and through the pure-torch fallback gives the same bits
(issue 3, item 7): a wrapped model trained one step with MEMO_DISABLE_CSRC=0 and =1."""

import pytest
import torch

import memo
from memo.wrap import runtime_of
from memo import _ext, ops
from models import batch, build, run_step, twin

pytestmark = pytest.mark.skipif(_ext._module is None, reason=f"memo._C not built: {_ext._load_error}")


@pytest.mark.parametrize("dtype,ratio", [(torch.float32, 1.0), (torch.float32, 0.5), (torch.bfloat16, 0.5)])
def test_wrapped_step_identical_on_both_backends(monkeypatch, dtype, ratio):
    model = build("llama")
    micro = [batch(2, 64, pad_last=5)]
    results = {}
    for flag in ("0", "1"):
        monkeypatch.setenv(_ext.DISABLE_ENV, flag)
        native_calls = []
        real = ops._native

        def counting(*tensors, _real=real, _calls=native_calls):
            got = _real(*tensors)
            if got is not None:
                _calls.append(1)
            return got

        monkeypatch.setattr(ops, "_native", counting)
        m = twin(model, dtype)
        memo.wrap(m, memo.MemoConfig(swap_ratio=ratio, host_memory_budget="1GiB"))
        losses, grads = run_step(m, micro)
        pool = runtime_of(m).pool
        results[flag] = (losses, grads, len(native_calls), pool.backend, memo.stats(m).swapped_bytes)
        monkeypatch.setattr(ops, "_native", real)
    (l0, g0, calls0, pool0, sw0), (l1, g1, calls1, pool1, sw1) = results["0"], results["1"]
    assert calls0 > 0 and calls1 == 0          # token-wise swaps went through torch.ops.memo only with csrc on
    assert (pool0, pool1) == ("csrc", "python")
    assert sw0 == sw1 > 0
    assert all(torch.equal(a, b) for a, b in zip(l0, l1))
    assert g0.keys() == g1.keys()
    for name in g0:
        assert torch.equal(g0[name], g1[name]), name
