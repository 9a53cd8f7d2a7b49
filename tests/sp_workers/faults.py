"""Bad input and faults under sequence parallelism: every rank gets a MemoError, nobody hangs."""

import time

import torch
import torch.distributed as dist

import memo
from distributed import save_and_exit
from memo.attention import ring_attention
from memo.parallel import sequence_parallel, shard_batch, shard_sequence
from models import build


def _error(fn):
    start = time.time()
    try:
        fn()
    except memo.MemoError as e:
        return str(e), time.time() - start
    return None, time.time() - start


def main(rank, world, mode):
    out = {}
    if mode == "input":
        q = lambda s, h=4, dtype=torch.float32: torch.randn(1, s, h, 16, dtype=dtype)  # noqa: E731
        s = 16 if rank == 0 else 24   # rank 1 holds a longer shard
        out["length"] = _error(lambda: ring_attention(q(s), q(s), q(s)))
        dtype = torch.float32 if rank == 0 else torch.float64
        out["dtype"] = _error(lambda: ring_attention(q(16, dtype=dtype), q(16, dtype=dtype), q(16, dtype=dtype)))
        out["ulysses_heads"] = _error(lambda: ring_attention(q(16, 3), q(16, 3), q(16, 3), backend="ulysses"))
        odd = 16 if rank == 0 else 15   # a problem on one rank only: both must raise, neither may hang
        out["one_rank_odd"] = _error(lambda: ring_attention(q(odd), q(odd), q(odd)))
        out["indivisible"] = _error(lambda: shard_sequence(torch.zeros(1, 30), 1))
        model = build("llama", num_attention_heads=3, num_key_value_heads=3, hidden_size=48)
        out["wrap_ulysses_heads"] = _error(lambda: memo.wrap(model, memo.MemoConfig(
            sequence_parallel_size=world, sp_backend="ulysses", host_memory_budget="1GiB")))
        out["wrap_size"] = _error(lambda: memo.wrap(build("llama"), memo.MemoConfig(
            sequence_parallel_size=3, host_memory_budget="1GiB")))
        model = memo.wrap(build("llama"), memo.MemoConfig(sequence_parallel_size=world, host_memory_budget="1GiB"))
        ids = torch.randint(0, 128, (1, 64))
        shard = shard_batch({"input_ids": ids, "labels": ids})
        out["unshifted_labels"] = _error(lambda: model(input_ids=shard["input_ids"], labels=shard["labels"]))
        mine = torch.randint(0, 128, (1, 64), generator=torch.Generator().manual_seed(rank))
        out["different_batches"] = _error(lambda: shard_batch({"input_ids": mine, "labels": mine}))
        mask = torch.ones(1, 64 // world, dtype=torch.long)
        if rank == 0:   # padding on rank 0's shard only: rank 1 must fail too, not wait in the ring
            mask[0, 0] = 0
        out["padding_mask"] = _error(lambda: model(**shard, attention_mask=mask))

        def lse_grad():
            x = torch.randn(1, 16, 4, 16, requires_grad=True)
            o, lse = ring_attention(x, x, x, return_lse=True)
            (o.sum() + lse.sum()).backward()
        out["lse_grad"] = _error(lse_grad)
        return out
    sp = sequence_parallel(backend="ring", timeout_s=5)
    x = torch.randn(1, 16, 4, 16)
    ring_attention(x, x, x, group=sp)   # first call: checks shapes across ranks, then one good step
    dist.barrier()
    if rank == 1:
        if mode == "hang":
            time.sleep(15)
        save_and_exit(rank, {})          # "die": gone without a word
    out[mode] = _error(lambda: ring_attention(x, x, x, group=sp))
    save_and_exit(rank, out)
