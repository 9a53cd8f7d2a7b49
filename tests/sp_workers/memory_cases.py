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
        # Scalars (<= 8 bytes) are left out on both sides: gloo's worker thread drops its reference
        # to the loss all-reduce's 4-byte buffer some time after wait() returns, so whether it is
        # still alive here is a race (seen in ~1 of 5 runs). No activation is that small.
        alive = sum(r.nbytes for r in tracker.alive() if r.nbytes > 8)
        loss.backward()
        st = memo.stats(m)
        out[keep] = {"alive": alive, "kept_resident": sum(layer.resident_bytes for layer in st.layers if layer.kept),
                     "layers": [(layer.kept, layer.activation_bytes, layer.swapped_bytes, layer.recomputed_bytes)
                                for layer in st.layers]}
    return out
