"""Stream ordering of the swap engine, checked on the CPU with deferred copy streams.

See NOTE [ Swap stream ordering ] in memo/swap/engine.py and tests/deferred_streams.py.
"""

import pytest
import torch

import memo
import memo.swap.engine as engine_module
from deferred_streams import DeferredStreams, poison
from memo.executor import LayerState
from memo.wrap import runtime_of
from memo.swap.record import SwapRecord
from models import batch, build, run_step, twin

MICRO = [batch(2, 48, seed=1, pad_last=5), batch(2, 48, seed=2)]


def _poisoning(monkeypatch, release_without_wait=False, skip_restore_wait=False):
    """Deferred copy streams, and poison wherever a GPU allocator could hand memory to someone else."""
    monkeypatch.setattr(engine_module, "Streams", DeferredStreams)

    original_release = LayerState.release_sources

    def release_sources(self):
        sources = [rec.source for rec in self.records.values() if rec.source is not None]
        if release_without_wait:           # the bug: drop the tensors without waiting for their copy
            for rec in self.records.values():
                rec.source = None
            self.call.hidden_states = None
        else:
            original_release(self)
        for t in sources:                  # the allocator may now reuse their memory
            poison(t)

    original_allocate = SwapRecord.allocate_device

    def allocate_device(self):
        original_allocate(self)
        poison(self.value)                 # fresh memory holds garbage until the copy in lands

    original_free = SwapRecord.free_host

    def free_host(self):
        if self.host is not None:
            poison(self.host.view(torch.uint8, (self.host.nbytes,)))
        original_free(self)

    monkeypatch.setattr(LayerState, "release_sources", release_sources)
    monkeypatch.setattr(SwapRecord, "allocate_device", allocate_device)
    monkeypatch.setattr(SwapRecord, "free_host", free_host)
    if skip_restore_wait:
        monkeypatch.setattr(engine_module.SwapEngine, "wait_restored", lambda self, state: None)


def _run(model, ratio):
    m = twin(model)
    memo.wrap(m, memo.MemoConfig(swap_ratio=ratio, keep_last_layers=1, loss_chunk_size=None,
                                 host_memory_budget="1GiB"))
    losses, grads = run_step(m, MICRO)
    return m, losses, grads


@pytest.mark.parametrize("ratio", [1.0, 0.37])
def test_deferred_copies_give_the_same_bits(monkeypatch, ratio):
    model = build("llama")
    _, ref_losses, ref = _run(model, ratio)
    _poisoning(monkeypatch)
    m, losses, got = _run(model, ratio)
    assert isinstance(runtime_of(m).engine.streams, DeferredStreams)
    for a, b in zip(ref_losses, losses):
        assert torch.equal(a, b)
    for name in ref:
        assert torch.equal(ref[name], got[name]), name
    assert memo.stats(m).host_pool["used_bytes"] == 0


@pytest.mark.parametrize("bug", ["release_without_wait", "skip_restore_wait"])
def test_the_double_catches_a_missing_wait(monkeypatch, bug):
    """Negative control: remove one wait and the deferred streams turn it into NaN gradients."""
    model = build("llama")
    _poisoning(monkeypatch, **{bug: True})
    _, _, got = _run(model, 0.37)
    assert any(torch.isnan(g).any() for g in got.values())
