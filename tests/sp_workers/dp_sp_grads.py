"""Data x sequence parallelism on 4 ranks (2 replicas x SP 2) and memo.parallel.all_reduce_gradients.

1. Replica d (ranks 2d, 2d+1) trains on its own batch. After backward and
   ``all_reduce_gradients(model)`` each rank's gradient is its replica's full-sequence gradient
   (within twice the plain fp32 model's own error against fp64), not a sum over both replicas.
2. A group that is not the model's (the world) is refused; the model's own group is accepted; an
   unwrapped model without a group is refused.
3. Rank 3 does not call: rank 2, its sequence-parallel peer, fails with a MemoError after the
   model's timeout (3 s), while rank 3 is still alive (it leaves after 12 s); the other replica
   finishes. The model is wrapped with ``sp_timeout_s=20`` (making groups under 3 s fails on a busy
   2-core machine) and its SequenceParallel's timeout set to 3 s before this phase.
"""

import copy
import time

import torch
import torch.distributed as dist

import memo
from distributed import save_and_exit
from memo.parallel import all_reduce_gradients, shard_batch
from memo.wrap import runtime_of
from models import build

TIMEOUT_S = 3.0


def _grads(model) -> dict:
    return {n: p.grad.detach().double().clone() for n, p in model.named_parameters() if p.grad is not None}


def _plain(model, ids, dtype=None) -> dict:
    m = copy.deepcopy(model)
    if dtype is not None:
        m = m.to(dtype)
    m(input_ids=ids, labels=ids).loss.backward()
    return _grads(m)


def _error(fn):
    start = time.time()
    try:
        fn()
    except memo.MemoError as e:
        return str(e), time.time() - start
    return None, time.time() - start


def main(rank, world):
    replica = rank // 2
    model = build("llama", seed=3)
    ids = torch.randint(0, 128, (1, 64), generator=torch.Generator().manual_seed(100 + replica))
    ref, plain = _plain(model, ids, torch.float64), _plain(model, ids)
    twin = memo.wrap(copy.deepcopy(model), memo.MemoConfig(
        sequence_parallel_size=2, sp_timeout_s=20, swap_ratio=0.5, keep_last_layers=1,
        host_memory_budget="1GiB"))
    twin(**shard_batch({"input_ids": ids, "labels": ids}, group=twin)).loss.backward()
    all_reduce_gradients(twin)
    got = _grads(twin)
    out = {"sp_ranks": runtime_of(twin).sp.ranks,
           "errors": {n: ((got[n] - ref[n]).abs().max().item(), (plain[n] - ref[n]).abs().max().item(),
                          ref[n].abs().max().item()) for n in ref}}
    out["world_group"] = _error(lambda: all_reduce_gradients(twin, group=dist.group.WORLD))
    out["own_group"] = _error(lambda: all_reduce_gradients(twin, group=runtime_of(twin).sp.group))
    out["unwrapped"] = _error(lambda: all_reduce_gradients(copy.deepcopy(model)))
    dist.barrier()
    runtime_of(twin).sp.timeout_s = TIMEOUT_S
    if rank == 3:   # alive but not calling: rank 2 must give up after the model's timeout
        time.sleep(12)
    else:
        out["peer_silent"] = _error(lambda: all_reduce_gradients(twin))
    save_and_exit(rank, out)
