"""A small training loop whose every step depends on the state a checkpoint must restore.

Shared by tests/test_checkpoint.py (one process) and ckpt_sp.py (sequence parallelism on gloo).
Each step reads the token stream at the data position ``cursor`` (restored from ``data_state``),
shifted by offsets drawn from torch's RNG and python's ``random``, and drops
labels where numpy's RNG says so: under sequence parallelism each rank draws that mask for its own
tokens from its own numpy stream (seeded by rank), as per-rank dropout would be. AdamW and a
warm-up-then-decay LambdaLR make the optimizer and scheduler states matter.
"""

from __future__ import annotations

import random

import numpy as np
import torch

import memo
from memo.parallel import all_reduce_gradients, shard_batch
from models import build

SEQ, BATCH, STREAM = 64, 2, 64 * 64
LAYERS = 2   # keep_last_layers=1: the first swaps


def seed_all(seed: int, numpy_seed: int | None = None) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed if numpy_seed is None else numpy_seed)


def config(sp: int | None = None) -> memo.MemoConfig:
    return memo.MemoConfig(swap_ratio=0.5, keep_last_layers=1, host_memory_budget="1GiB", sequence_parallel_size=sp)


def make(model_seed: int, sp: int | None = None):
    """(wrapped model, AdamW, LambdaLR), built from scratch."""
    model = memo.wrap(build("llama", seed=model_seed, num_hidden_layers=LAYERS), config(sp))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3) * 0.8 ** s)
    return model, opt, sched


def stream() -> torch.Tensor:
    return torch.randint(0, 128, (STREAM,), generator=torch.Generator().manual_seed(1234))


def batch(tokens: torch.Tensor, data_state: dict, sp: bool) -> dict:
    """This step's batch (advances ``data_state``): every RNG is drawn here."""
    cursor = data_state["cursor"]
    offsets = torch.randint(0, 16, (BATCH,)) + random.randrange(16)
    ids = torch.stack([tokens[cursor + int(o):cursor + int(o) + SEQ] for o in offsets])
    data_state["cursor"] = cursor + SEQ
    if sp:
        out = shard_batch({"input_ids": ids, "labels": ids})
        labels = out["shift_labels"].clone()
    else:
        out = {"input_ids": ids}
        labels = ids.clone()
    labels[torch.from_numpy(np.random.rand(*labels.shape) < 0.2)] = -100
    out["labels"] = labels
    if sp:
        out["shift_labels"] = labels
    return out


def train(model, opt, sched, steps: int, data_state: dict, sp: bool = False) -> list[torch.Tensor]:
    tokens = stream()
    losses = []
    for _ in range(steps):
        loss = model(**batch(tokens, data_state, sp)).loss
        loss.backward()
        if sp:
            all_reduce_gradients(model)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach().clone())
    return losses
