"""A whole tiny Llama / Mistral training step with sequence parallelism against one process.

Every rank builds the same model (same seed) and batch, computes the plain single-process fp32 and
fp64 references, then a memo-wrapped twin with SP over the world (with and without swapping),
fed by memo.parallel.shard_batch, followed by memo.parallel.all_reduce_gradients.
"""

import copy

import torch

import memo
import memo.executor
from memo.parallel import all_reduce_gradients, shard_batch
from memo.parallel.comm import MESSAGES
from models import build

SEQ = 128


def _grads(model):
    return {n: p.grad.detach().double().clone() for n, p in model.named_parameters() if p.grad is not None}


def _plain(model, ids, labels, position_ids=None, dtype=None):
    m = copy.deepcopy(model)
    if dtype is not None:
        m = m.to(dtype)
    m.zero_grad()
    out = m(input_ids=ids, labels=labels, position_ids=position_ids)
    out.loss.backward()
    return out.loss.detach().double().item(), _grads(m)


def _errors(got_loss, got, ref_loss, ref, plain_loss, plain):
    """Per tensor: (memo's error against fp64, plain fp32's error against fp64)."""
    out = {"loss": (abs(got_loss - ref_loss), abs(plain_loss - ref_loss))}
    for n in ref:
        out[n] = ((got[n] - ref[n]).abs().max().item(), (plain[n] - ref[n]).abs().max().item())
    return out


_RECOMPUTE = {"calls": 0, "messages": 0}
_original_recompute = memo.executor.LayerState._recompute


def _counting_recompute(self, records):
    before = MESSAGES["count"]
    _original_recompute(self, records)
    _RECOMPUTE["calls"] += 1
    _RECOMPUTE["messages"] += MESSAGES["count"] - before


memo.executor.LayerState._recompute = _counting_recompute   # observes; the real recompute runs


def sp_step(kind, world, *, swap, backend="ring", layout="zigzag", dtype=None, seq=SEQ, loss_chunk_size=4096,
            **extra):
    """``extra``: more MemoConfig fields (tile_tokens; swap_ratio and host_memory_budget override)."""
    model = build(kind, seed=3)
    if dtype is not None:
        model = model.to(dtype)
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(0, 128, (1, seq), generator=g)
    labels = ids.clone()
    labels[0, :5] = -100
    ref = _plain(model, ids, labels, dtype=torch.float64)
    plain = _plain(model, ids, labels)
    twin = copy.deepcopy(model)
    config = memo.MemoConfig(**{**dict(sequence_parallel_size=world, sp_backend=backend, sp_layout=layout,
                                       swap_ratio=0.5, keep_last_layers=1 if swap else 4, host_memory_budget="1GiB",
                                       loss_chunk_size=loss_chunk_size), **extra})
    memo.wrap(twin, config)
    shard = shard_batch({"input_ids": ids, "labels": labels}, layout=layout)
    _RECOMPUTE.update(calls=0, messages=0)
    out = twin(**shard)
    out.loss.backward()
    all_reduce_gradients(twin)
    st = memo.stats(twin)
    # The same op path on one rank holding the whole sequence: a group of this rank alone.
    alone = [torch.distributed.new_group([r]) for r in range(world)][torch.distributed.get_rank()]
    one = memo.wrap(copy.deepcopy(model), memo.MemoConfig(sequence_parallel_group=alone, sp_backend=backend,
                                                          swap_ratio=0.5, keep_last_layers=1 if swap else 4,
                                                          host_memory_budget="1GiB"))
    one(**shard_batch({"input_ids": ids, "labels": labels}, group=alone))
    return {"one_process_swapped_bytes": memo.stats(one).swapped_bytes,
            "errors": _errors(out.loss.item(), _grads(twin), ref[0], ref[1], plain[0], plain[1]),
            "loss": out.loss.item(), "swapped_bytes": st.swapped_bytes, "recomputed_bytes": st.recomputed_bytes,
            "recompute_calls": _RECOMPUTE["calls"], "recompute_messages": _RECOMPUTE["messages"],
            "policies": [s.policy for s in st.layers], "tiles": [s.tile_tokens for s in st.layers],
            "layer_swapped_bytes": [s.swapped_bytes for s in st.layers]}


def input_layers_budget(world, seq=SEQ, hidden=64, swapped=3):
    """A host budget that holds the three swapped layers' inputs only: auto makes them "input" layers."""
    from memo.runtime import _aligned
    return swapped * _aligned(seq // world * hidden * 4)


def packed_step(world):
    """Three documents packed in one sequence (positions restart at 0) against running them one by one."""
    model = build("llama", seed=5)
    docs = [40, 56, 32]
    g = torch.Generator().manual_seed(12)
    ids = torch.randint(0, 128, (1, sum(docs)), generator=g)
    positions = torch.cat([torch.arange(n) for n in docs]).unsqueeze(0)
    shift = torch.nn.functional.pad(ids[:, 1:], (0, 1), value=-100)
    starts = torch.cumsum(torch.tensor(docs), 0)
    shift[0, starts - 1] = -100          # no label across a document boundary
    total = int((shift != -100).sum())
    ref = copy.deepcopy(model)
    ref.zero_grad()
    ref_loss = 0.0
    for a, b in zip([0] + starts[:-1].tolist(), starts.tolist()):
        out = ref(input_ids=ids[:, a:b], labels=ids[:, a:b], num_items_in_batch=total)
        out.loss.backward()
        ref_loss += out.loss.item()
    twin = copy.deepcopy(model)
    memo.wrap(twin, memo.MemoConfig(sequence_parallel_size=world, swap_ratio=0.5, keep_last_layers=1,
                                    host_memory_budget="1GiB"))
    shard = shard_batch({"input_ids": ids, "shift_labels": shift, "position_ids": positions})
    out = twin(**shard)
    out.loss.backward()
    all_reduce_gradients(twin)
    got = _grads(twin)
    want = _grads(ref)
    return {"loss": (out.loss.item(), ref_loss),
            "grad_max_diff": max((got[n] - want[n]).abs().max().item() for n in want),
            "grad_scale": max(want[n].abs().max().item() for n in want)}


def main(rank, world):
    return {
        "llama-swap": sp_step("llama", world, swap=True),
        "llama-noswap": sp_step("llama", world, swap=False),
        "mistral-swap": sp_step("mistral", world, swap=True),
        "llama-swap-contiguous": sp_step("llama", world, swap=True, layout="contiguous"),
        "llama-swap-model-loss": sp_step("llama", world, swap=True, loss_chunk_size=None),
        "llama-ulysses-swap": sp_step("llama", world, swap=True, backend="ulysses" if world == 2 else "hybrid"),
        "packed": packed_step(world),
        # NOTE [ Token tiling ]: 16-token tiles of 128 / world local tokens
        "llama-tiled-swap": sp_step("llama", world, swap=True, tile_tokens=16),
        "llama-tiled-ulysses-swap": sp_step("llama", world, swap=True, tile_tokens=16,
                                            backend="ulysses" if world == 2 else "hybrid"),
        # NOTE [ Layer policies ]: every swapped layer recomputes its attention (the ring runs again)
        "llama-input-layers": sp_step("llama", world, swap=True, swap_ratio="auto", tile_tokens=None,
                                      host_memory_budget=input_layers_budget(world)),
    }
