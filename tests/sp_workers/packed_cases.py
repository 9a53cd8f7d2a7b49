"""Packed documents under sequence parallelism against the documents run one by one (tests/packed_data.py).

Every rank builds the same model and packed batch, shards it with memo.parallel.shard_batch, runs a
memo-wrapped twin with sequence parallelism and all_reduce_gradients, and reports the failures of the
2x rule; and the error each rank raises for position_ids that break NOTE [ Packed documents ] rule 1.
"""

import copy

import torch

import memo
from memo.parallel import all_reduce_gradients, shard_batch, shard_sequence
from models import build
from packed_data import errors, grads, pack


def packed_step(rank, world, family="llama", rows=((40, 56, 1, 31),), pad=0, backend="ring", layout="zigzag",
                ratio=0.5, keep=1):
    model = build(family, seed=5)
    ids, positions, shift, mask, docs = pack([list(r) for r in rows], pad=pad)
    twin = memo.wrap(copy.deepcopy(model), memo.MemoConfig(
        sequence_parallel_size=world, sp_backend=backend, sp_layout=layout, swap_ratio=ratio, keep_last_layers=keep,
        host_memory_budget="1GiB"))
    batch = {"input_ids": ids, "shift_labels": shift, "position_ids": positions}
    if mask is not None:
        batch["attention_mask"] = mask
    out = twin(**shard_batch(batch, layout=layout))
    out.loss.backward()
    all_reduce_gradients(twin)
    # gradients are summed over the group, so the same on every rank: rank 0 compares them (half the CPU time)
    failures = errors(model, out.loss.item(), grads(twin), ids, shift, docs) if rank == 0 else []
    return {"failures": failures, "loss": out.loss.item(),
            "recomputed_bytes": memo.stats(twin).recomputed_bytes}


def bad_positions(world, token):
    """The error of a forward whose position_ids jump at global ``token`` (sharded without shard_batch,
    whose own check would refuse them first)."""
    model = memo.wrap(build("llama", seed=5), memo.MemoConfig(sequence_parallel_size=world, swap_ratio=0.5,
                                                              host_memory_budget="1GiB"))
    ids = torch.randint(0, 128, (2, 64), generator=torch.Generator().manual_seed(4))
    positions = torch.cat([torch.arange(20), torch.arange(44)]).expand(2, 64).clone()
    positions[1, token:] += 3
    try:
        model(input_ids=shard_sequence(ids), position_ids=shard_sequence(positions))
    except memo.MemoError as e:
        return str(e)
    return None


def mask_inside_a_document():
    """shard_batch's error for packing plus an attention_mask hiding a token inside a document."""
    ids, positions, shift, _, _ = pack([[20, 30, 14]])
    mask = torch.ones_like(ids)
    mask[0, 25] = 0
    try:
        shard_batch({"input_ids": ids, "shift_labels": shift, "position_ids": positions, "attention_mask": mask})
    except memo.MemoError as e:
        return str(e)
    return None


def main(rank, world):
    out = {"ring-zigzag": packed_step(rank, world)}
    if world == 2:   # the other cases once, on 2 ranks (the suite's time); 4 ranks: zigzag, hybrid, errors
        out.update({
            "ring-contiguous-batch-2": packed_step(rank, world, rows=((30, 1, 1, 60, 36), (64, 28, 36)),
                                                   layout="contiguous"),
            "ring-padding-after-last": packed_step(rank, world, rows=((50, 30),), pad=48, ratio=0.0, keep=0),
            "ulysses-mistral-kept": packed_step(rank, world, family="mistral", rows=((33, 20, 75),),
                                                backend="ulysses", keep=4),
        })
    else:
        out["hybrid-qwen2"] = packed_step(rank, world, family="qwen2", rows=((33, 20, 75),), backend="hybrid")
    # inside rank 0's first chunk, and where the chunk of the last rank before the middle ends
    out["bad-inside"] = bad_positions(world, 5) if world == 2 else None
    out["bad-at-chunk-edge"] = bad_positions(world, 64 // (2 * world) * world)
    out["bad-mask"] = mask_inside_a_document()
    return out
