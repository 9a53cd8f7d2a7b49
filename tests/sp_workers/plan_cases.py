"""MemoConfig(plan=...) under sequence parallelism: an SP plan is used, a plan for another SP size refused."""

import torch

import memo
from memo.parallel import shard_batch
from models import build


def main(rank, world, sp_plan, one_rank_plan):
    ids = torch.randint(0, 128, (1, 64), generator=torch.Generator().manual_seed(0))
    model = memo.wrap(build("llama"), memo.MemoConfig(sequence_parallel_size=world, plan=sp_plan,
                                                      host_memory_budget="1GiB"))
    model(**shard_batch({"input_ids": ids, "labels": ids}, group=model)).loss.backward()
    st = memo.stats(model)
    out = {"alpha": st.swap_ratio, "reason": st.swap_ratio_reason, "recomputed": st.recomputed_bytes}
    other = memo.wrap(build("llama"), memo.MemoConfig(sequence_parallel_size=world, plan=one_rank_plan,
                                                      host_memory_budget="1GiB"))
    try:
        other(**shard_batch({"input_ids": ids, "labels": ids}, group=other))
        out["refused"] = None
    except memo.MemoError as e:
        out["refused"] = str(e)
    return out
