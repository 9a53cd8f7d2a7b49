"""SGD steps of a tiny Llama through accelerate.Accelerator(cpu=True) + memo.integrations.accelerate.prepare.

memo's settings come from the MEMO_* variables the test sets (prepare's plugin=None path). Each rank
returns, per step, the shards it was given (input_ids, global position_ids, shifted labels) and its
loss, then its final parameters; the test rebuilds each replica's full batches from the shards and
trains a plain single-process model on them as the reference.
"""

import torch
from accelerate import Accelerator

import memo
from memo.integrations.accelerate import SequenceShardedLoader, _data_parallel_loader, prepare, skip_first_batches
from memo.wrap import runtime_of
from models import build

SEQ, BATCH, SAMPLES, LR = 64, 2, 16, 0.2


def dataset():
    """SAMPLES sequences of SEQ tokens; the first 3 labels of each are ignored."""
    g = torch.Generator().manual_seed(21)
    ids = torch.randint(0, 128, (SAMPLES, SEQ), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100
    return [{"input_ids": ids[i], "labels": labels[i]} for i in range(SAMPLES)]


def main(rank, world, steps):
    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == world and accelerator.process_index == rank
    model = build("llama", seed=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    loader = torch.utils.data.DataLoader(dataset(), batch_size=BATCH, shuffle=True,
                                         generator=torch.Generator().manual_seed(5))
    model, optimizer, loader = prepare(accelerator, model, optimizer, loader)
    seen = []
    for step, batch in enumerate(loader):
        if step == steps:
            break
        loss = model(**batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        seen.append({k: batch[k].clone() for k in ("input_ids", "position_ids", "labels")} | {"loss": loss.item()})
    inner = accelerator.unwrap_model(model)
    sp = runtime_of(inner).sp
    # Resuming mid-epoch: skipping one batch of an unshuffled loader starts at its second batch.
    ordered = SequenceShardedLoader(_data_parallel_loader(
        accelerator, torch.utils.data.DataLoader(dataset(), batch_size=BATCH), sp), sp)
    second = list(ordered)[1]
    resumed = next(iter(skip_first_batches(accelerator, ordered, 1)))
    return {"seen": seen, "params": {n: p.detach().clone() for n, p in inner.named_parameters()},
            "sp_ranks": sp.ranks, "sp_backend": sp.backend, "ddp": type(model).__name__,
            "sharded_loader": isinstance(loader, SequenceShardedLoader),
            "skip_resumes_at_the_second_batch": all(torch.equal(second[k], resumed[k]) for k in second),
            "swapped_bytes": memo.stats(inner).swapped_bytes, "distributed_type": str(accelerator.distributed_type)}
