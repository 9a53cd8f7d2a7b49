"""memo.memtrack on plain torch and a plain HF Llama (no memo runtime involved)."""

import gc
import weakref

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from memo.errors import MemoError
from memo.memtrack import track_storages


def test_counts_new_storages_once_and_ignores_older_ones():
    before = torch.randn(1000)                     # made before the context: invisible
    with track_storages() as tr:
        view = before.view(10, 100)                # a view of an old storage
        before.add_(1)                             # in place on an old storage
        new = before * 2                           # a new storage: 4000 B
        alias, again = new[10:20], new.view(20, 50)  # more views of it: still 4000 B
        out = torch.empty(0)                       # made inside with 0 B ...
        torch.mul(before, 3, out=out)              # ... and resized to 4000 B by an out= op
    assert view.untyped_storage()._cdata == before.untyped_storage()._cdata
    assert tr.alive_bytes() == 8000
    # shape is that of the first tensor seen on the storage; nbytes follows the resize.
    assert sorted((r.nbytes, r.shape) for r in tr.alive()) == [(4000, (0,)), (4000, (1000,))]
    assert tr.num_created == 2 and tr.created_bytes == 4000    # created_bytes: size at creation
    del new, alias, again, out
    assert tr.alive_bytes() == 0
    assert tr.created_bytes == 4000


def test_keeps_nothing_alive():
    with track_storages() as tr:
        x = torch.ones(256, 256)
    ref = weakref.ref(x)
    assert tr.alive_bytes() == 256 * 256 * 4
    del x
    gc.collect()
    assert ref() is None and tr.alive_bytes() == 0


def test_tags_marks_and_device_filter():
    with track_storages() as tr:
        a = torch.zeros(100)                       # 400 B untagged
        with tr.tag("host"):
            b = torch.zeros(50)                    # 200 B tagged while created
        c = torch.zeros(25)                        # 100 B, re-tagged afterwards
    assert tr.mark(c, "host")
    assert not tr.mark(torch.zeros(1), "host")     # made outside: not tracked, nothing re-tagged
    assert tr.alive_bytes() == 700
    assert tr.alive_bytes(tags=["host"]) == 300
    assert tr.alive_bytes(exclude_tags=["host"]) == 400
    assert tr.alive_bytes(device="cpu") == 700 and tr.alive_bytes(device="cuda") == 0
    assert "3 alive storages, 700 B" in tr.summary()
    del a, b, c


def test_pack_hook_copies_can_be_told_apart():
    """The benchmark's save-on-cpu accounting: copies made by a pack hook carry a tag."""
    w = torch.randn(64, 64, requires_grad=True)
    x = torch.randn(32, 64)
    with track_storages() as tr:
        def pack(t):
            with tr.tag("host"):
                return t.clone()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = torch.tanh(x @ w)                   # saves x (w needs no grad of x) and tanh's output
        loss = y.sum()
    host = tr.alive_bytes(tags=["host"])
    assert host == (32 * 64 + 32 * 64) * 4
    assert tr.alive_bytes(exclude_tags=["host"]) == 32 * 64 * 4 + 4  # x @ w's output died; y, loss live
    loss.backward()
    assert tr.alive_bytes(tags=["host"]) == 0      # the graph released its copies


def test_reentering_a_tracker_is_refused():
    tr = track_storages()
    with tr:
        with pytest.raises(MemoError, match=r"^memo.memtrack: .*use a new track_storages\(\)"):
            tr.__enter__()


def _llama_alive_after_forward(checkpointing):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, use_cache=False)
    model = LlamaForCausalLM(cfg).train()
    if checkpointing:
        model.activation_checkpointing_enable()    # what gradient_checkpointing_enable() now aliases
    ids = torch.randint(0, 128, (1, 256))
    with track_storages() as tr:
        loss = model(ids, labels=ids).loss
    after_forward = tr.alive_bytes()
    loss.backward()                                 # outside the context: grads are not counted
    after_backward = tr.alive_bytes()
    del loss
    return after_forward, after_backward, tr.alive_bytes()


def test_llama_activations_alive_until_backward_and_checkpointing_shrinks_them():
    fwd, bwd, end = _llama_alive_after_forward(checkpointing=False)
    # 4 layers x 256 tokens: per layer at least the q/k/v/o, MLP and norm activations saved.
    assert fwd > 4 * 256 * 64 * 4 * 8
    assert bwd <= 8 and end == 0                    # only the 0-dim loss survives the backward
    fwd_ckpt, bwd_ckpt, end_ckpt = _llama_alive_after_forward(checkpointing=True)
    # Checkpointing keeps each layer's input and the head/loss tensors only.
    assert fwd_ckpt < fwd / 3
    assert bwd_ckpt <= 8 and end_ckpt == 0


def test_peak_bytes_sees_the_largest_live_total():
    """NOTE [ What memtrack counts ] rule 8: three 4 KiB tensors alive at once, then one."""
    with track_storages() as tracker:
        a = torch.ones(1024)
        b = a * 2
        c = a + b
        del a, b, c
        d = torch.zeros(1024)
    assert tracker.peak_bytes == 3 * 4096
    tracker.reset_peak()
    assert tracker.peak_bytes == 4096
    del d
