"""memo.memtrack and memo.stats per rank under sequence parallelism (see tests/test_wrap_memory.py)."""

import copy

import torch

import memo
from memo.memtrack import track_storages
from memo.parallel import shard_batch
from models import build

LAYERS = 5


def main(rank, world):
    model = build("llama", num_hidden_layers=LAYERS)
    ids = torch.randint(0, 128, (2, 96), generator=torch.Generator().manual_seed(0))
    out = {}
    for keep in (0, 2):
        m = memo.wrap(copy.deepcopy(model), memo.MemoConfig(sequence_parallel_size=world, swap_ratio=0.5,
                                                            keep_last_layers=keep, host_memory_budget="1GiB"))
        batch = shard_batch({"input_ids": ids, "labels": ids}, group=m)
        m(**batch).loss.backward()            # warm-up: the host pool is reserved once, before
        with track_storages() as tracker:
            loss = m(**batch).loss
        # gloo's worker threads drop their references to the loss all-reduce's 4-byte buffers a
        # moment after wait() returns; let them, or that scalar is counted now and then
        torch.distributed.barrier()
        alive = tracker.alive_bytes()
        loss.backward()
        st = memo.stats(m)
        out[keep] = {"alive": alive, "kept_resident": sum(layer.resident_bytes for layer in st.layers if layer.kept),
                     "layers": [(layer.kept, layer.activation_bytes, layer.swapped_bytes, layer.recomputed_bytes)
                                for layer in st.layers]}
    return out
