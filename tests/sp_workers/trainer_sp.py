"""MemoTrainer with swapping and sequence parallelism (see tests/test_trainer.py).

Every rank trains with ``memo_config=MemoConfig(sequence_parallel_size=sp)`` and evaluates; returns
the logged losses and gradient norms, the eval losses and memo's swap count. With SP over the whole
world it also saves with ``save_model`` (rank 0 writes; its keys are returned), evaluates an untrained
model with ``compute_metrics`` (whole-sequence logits) and returns the message of a refused
configuration (label smoothing).
"""

import os

import torch

from safetensors import safe_open

import memo
from memo.integrations.hf import MemoTrainer
from sp_workers import trainer_data as data


def feed(out, sp) -> dict:
    """Which samples each rank reads from an eval loader of 7 samples in batches of 2, and what
    ``gather_function`` makes of one row per sample holding the rank."""
    trainer = MemoTrainer(model=data.model(), args=data.arguments(os.path.join(out, "feed")),
                          memo_config=data.memo_config(sp))
    rank = torch.distributed.get_rank()
    samples = data.eval_set(7)
    batches, gathered = [], []
    for batch in trainer.get_eval_dataloader(samples):
        batches.append([int((samples.ids == row).all(1).nonzero()[0]) for row in batch["input_ids"]])
        gathered.append(trainer.gather_function(torch.full((len(batch["input_ids"]),), float(rank))).tolist())
    return {"batches": batches, "gathered": gathered}


def main(rank, world, out, sp, per_device=2):
    args = data.arguments(os.path.join(out, "run"), per_device_train_batch_size=per_device,
                          per_device_eval_batch_size=per_device)
    trainer = MemoTrainer(model=data.model(), args=args, train_dataset=data.train_set(),
                          eval_dataset=data.eval_set(), memo_config=data.memo_config(sp))
    trainer.train()
    result = data.summary(trainer)
    result["swapped_bytes"] = memo.stats(trainer.model).swapped_bytes
    if world != sp:
        result["feed"] = feed(out, sp)
        return result
    trainer.save_model(os.path.join(out, "saved"))
    if rank == 0:
        with safe_open(os.path.join(out, "saved", "model.safetensors"), "pt") as f:
            result["saved_keys"] = set(f.keys())
    metrics = MemoTrainer(model=data.model(), args=data.arguments(os.path.join(out, "metrics")),
                          eval_dataset=data.eval_set(), compute_metrics=data.token_metrics,
                          memo_config=data.memo_config(sp, loss_chunk_size=None)).evaluate()
    result["metrics"] = {k: metrics[f"eval_{k}"] for k in ("loss", "accuracy", "logit_mean")}
    try:
        MemoTrainer(model=data.model(), args=data.arguments(os.path.join(out, "bad"), label_smoothing_factor=0.1),
                    train_dataset=data.train_set(), memo_config=data.memo_config(sp))
    except memo.MemoError as e:
        result["label_smoothing_error"] = str(e)
    return result
