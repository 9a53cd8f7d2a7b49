"""Several forwards before one backward (issue 18 item 7, NOTE [ Several forwards before one backward ] in
memo/runtime.py): summed micro-batch losses train as the plain model does, each forward served from a
pool of its own within host_memory_budget; past the budget the forward that would cross it is refused
before it computes, saying to call backward per micro-batch."""

import pytest
import torch

import memo
from memo import MemoError
from models import batch, build, grads, twin

MICRO = [batch(2, 64, seed=s) for s in (1, 2, 3)]


def _kw(b):
    ids, mask, labels = b
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def _summed(model, micro):
    model.zero_grad(set_to_none=True)
    losses = [model(**_kw(b)).loss for b in micro]
    sum(losses).backward()
    return [l.detach() for l in losses], grads(model)


def _wrap(model, ratio, budget):
    return memo.wrap(model, memo.MemoConfig(swap_ratio=ratio, keep_last_layers=1, loss_chunk_size=None,
                                            host_memory_budget=budget))


@pytest.mark.parametrize("ratio", [0.0, 0.5, 1.0])
def test_summed_losses_give_the_plain_models_gradients(ratio):
    model = build("llama")
    plain_losses, plain = _summed(twin(model), MICRO)
    wrapped = _wrap(twin(model), ratio, "1GiB")
    for step in range(2):   # the second step reuses the pools of the first
        losses, got = _summed(wrapped, MICRO)
        assert [torch.equal(a, b) for a, b in zip(losses, plain_losses)] == [True] * 3
        assert sorted(got) == sorted(plain)
        for name in plain:
            assert torch.equal(got[name], plain[name]), (ratio, step, name)
        pool = memo.stats(wrapped).host_pool
        assert pool["pools"] == 3 and pool["used_bytes"] == 0 and len(pool["capacities"]) == 3, pool
    assert all(memo.stats(wrapped).layers[i].swapped_bytes > 0 for i in range(3))


def _one_forward_bytes() -> int:
    wrapped = _wrap(build("llama"), 0.5, "1GiB")
    wrapped(**_kw(MICRO[0])).loss.backward()
    return memo.stats(wrapped).host_pool["capacity_bytes"]


def test_the_budget_bounds_the_forwards_and_the_refusal_says_what_to_do():
    one = _one_forward_bytes()
    model = build("llama")
    _, plain = _summed(twin(model), MICRO[:2])
    wrapped = _wrap(twin(model), 0.5, 2 * one)          # two forwards fit, not three
    losses, got = _summed(wrapped, MICRO[:2])
    assert all(torch.equal(got[n], plain[n]) for n in plain)
    first = wrapped(**_kw(MICRO[0])).loss
    second = wrapped(**_kw(MICRO[1])).loss
    with pytest.raises(MemoError) as e:
        wrapped(**_kw(MICRO[2]))
    msg = str(e.value)
    assert "from 2 earlier forward(s) still wait for their backward" in msg, msg
    assert "Call backward after each micro-batch's forward" in msg and "host_memory_budget=" in msg, msg
    assert memo.stats(wrapped).host_pool["pools"] == 2
    # the graphs alive at the refusal still train
    wrapped.zero_grad(set_to_none=True)
    (first + second).backward()
    got = grads(wrapped)
    assert all(torch.equal(got[n], plain[n]) for n in plain)
    assert memo.stats(wrapped).host_pool["used_bytes"] == 0
    # and per-micro-batch backward runs in one pool's budget
    small = _wrap(twin(model), 0.5, one)
    small.zero_grad(set_to_none=True)
    for b in MICRO[:2]:
        small(**_kw(b)).loss.backward()
    assert all(torch.equal(grads(small)[n], plain[n]) for n in plain)
    with pytest.raises(MemoError, match="from 1 earlier forward"):
        small(**_kw(MICRO[0])).loss + small(**_kw(MICRO[1])).loss


def test_micro_batches_of_other_lengths_and_sizes():
    model = build("llama")
    micro = [batch(2, 64, seed=1), batch(2, 96, seed=2), batch(1, 32, seed=3)]
    _, plain = _summed(twin(model), micro)
    wrapped = _wrap(twin(model), 0.5, "1GiB")
    _, got = _summed(wrapped, micro)
    assert all(torch.equal(got[n], plain[n]) for n in plain)
    assert memo.stats(wrapped).host_pool["used_bytes"] == 0
