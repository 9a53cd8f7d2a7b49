"""Checkpoints under sequence parallelism on every rank (see tests/test_checkpoint.py).

1. ``save_pretrained`` by rank 0 of a wrapped SP model, ``from_pretrained`` + ``memo.wrap`` on every
   rank: identical parameters and an identical (global) loss.
2. Resume: N steps uninterrupted against K steps, ``save_checkpoint``, fresh objects, load, N - K
   steps. numpy is seeded per rank (each rank masks labels of its own tokens), so each rank must get
   its own stream back; as a control, every rank continuing with rank 0's numpy stream differs.
3. One rank fails: a full disk on rank 1 during a save fails the save on both ranks (nobody waits
   in a barrier) and the committed checkpoint still loads; a corrupt ``rank1.json`` fails the load
   on both ranks and changes neither rank's model (NOTE [ Checked loads ] rule 1).
"""

import errno
import os

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from transformers import LlamaForCausalLM

import memo
from memo.integrations import checkpoint
from memo.integrations.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from memo.parallel import shard_batch
from sp_workers import ckpt_loop

N, K = 5, 2


def pretrained_round_trip(path: str, world: int) -> dict:
    model, _, _ = ckpt_loop.make(model_seed=0, sp=world)
    ids = torch.randint(0, 128, (2, 64), generator=torch.Generator().manual_seed(5))
    shard = shard_batch({"input_ids": ids, "labels": ids}, group=model)
    loss = model(**shard).loss
    if dist.get_rank() == 0:
        model.save_pretrained(path)
    dist.barrier()
    fresh = LlamaForCausalLM.from_pretrained(path, attn_implementation="sdpa")
    memo.wrap(fresh, ckpt_loop.config(world))
    got = dict(fresh.named_parameters())
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    with open(os.path.join(path, "config.json")) as f:
        assert "memo" not in f.read(), "memo's attention implementation must not be saved in the config"
    return {"pretrained_params_equal": set(got) == {n for n, _ in model.named_parameters()} and all(
                torch.equal(got[n], p) for n, p in model.named_parameters()),
            "pretrained_loss_equal": torch.equal(fresh(**shard).loss, loss),
            "pretrained_keys": keys}


def _numpy_of_rank0() -> None:
    """Give this rank rank 0's numpy stream (the control: what a rank-0-only RNG save would do)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    t = torch.from_numpy(np.concatenate([keys.astype(np.int64), [pos, has_gauss]]))
    dist.broadcast(t, src=0)
    gauss = torch.tensor([cached], dtype=torch.float64)
    dist.broadcast(gauss, src=0)
    np.random.set_state((name, t[:-2].numpy().astype(np.uint32), int(t[-2]), int(t[-1]), float(gauss)))


def resume(path: str, world: int, rank: int) -> dict:
    def seed(s):
        ckpt_loop.seed_all(s, numpy_seed=s * 10 + rank)

    seed(0)
    model, opt, sched = ckpt_loop.make(model_seed=0, sp=world)
    full = ckpt_loop.train(model, opt, sched, N, {"cursor": 0}, sp=True)

    seed(0)
    model, opt, sched = ckpt_loop.make(model_seed=0, sp=world)
    data = {"cursor": 0}
    first = ckpt_loop.train(model, opt, sched, K, data, sp=True)
    keys = torch.from_numpy(np.random.get_state()[1].astype(np.int64))
    every = [torch.empty_like(keys) for _ in range(world)]
    dist.all_gather(every, keys)
    save_checkpoint(path, model=model, optimizer=opt, scheduler=sched, step=K, data_state=data)

    results = {}
    for control in (False, True):
        seed(99)
        model, opt, sched = ckpt_loop.make(model_seed=1, sp=world)
        state = load_checkpoint(path, model=model, optimizer=opt, scheduler=sched)
        assert state["step"] == K
        if control:
            _numpy_of_rank0()
        rest = ckpt_loop.train(model, opt, sched, N - K, state["data_state"], sp=True)
        results["with_rank0_numpy" if control else "resumed"] = rest if control else first + rest
    results.update(full=full, numpy_differs_between_ranks=not torch.equal(every[0], every[1]))
    return results


def _error(fn) -> str | None:
    try:
        fn()
    except memo.MemoError as e:
        return str(e)
    return None


def one_rank_fails(path: str, world: int, rank: int) -> dict:
    model, opt, sched = ckpt_loop.make(model_seed=0, sp=world)
    save_checkpoint(path, model=model, optimizer=opt, scheduler=sched, step=1)
    original = checkpoint._write

    def full_disk(file, *args):
        if rank == 1:
            raise OSError(errno.ENOSPC, "No space left on device", file)
        return original(file, *args)
    checkpoint._write = full_disk
    try:
        save_error = _error(lambda: save_checkpoint(path, model=model, optimizer=opt, scheduler=sched, step=2))
    finally:
        checkpoint._write = original
    fresh, opt2, sched2 = ckpt_loop.make(model_seed=1, sp=world)
    step_after = load_checkpoint(path, model=fresh, optimizer=opt2, scheduler=sched2)["step"]
    leftovers = sorted(os.listdir(path))

    if rank == 0:
        with open(os.path.join(latest_checkpoint(path), "rank1.json"), "w") as f:
            f.write("{corrupt")
    dist.barrier()
    other, opt3, sched3 = ckpt_loop.make(model_seed=2, sp=world)
    before = [p.detach().clone() for p in other.parameters()]
    load_error = _error(lambda: load_checkpoint(path, model=other, optimizer=opt3, scheduler=sched3))
    return {"save_error": save_error, "step_after_failed_save": step_after, "root_after_failed_save": leftovers,
            "load_error": load_error,
            "model_unchanged": all(torch.equal(a, b) for a, b in zip(before, other.parameters())),
            "optimizer_unchanged": not opt3.state}


def main(rank, world, path):
    out = pretrained_round_trip(os.path.join(path, "pretrained"), world)
    out.update(resume(os.path.join(path, "ckpt"), world, rank))
    out.update(one_rank_fails(os.path.join(path, "fails"), world, rank))
    return out
