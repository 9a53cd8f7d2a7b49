"""Data, model and arguments shared by tests/test_trainer.py and trainer_sp.py.

Every third sample is right-padded (labels -100 there), so the loss depends on counting tokens
right (``num_items_in_batch``). SGD with a large rate and no clipping makes each step's loss and
gradient norm follow the gradient's scale (AdamW would hide a gradient off by a factor), and
gradient accumulation over 2 micro-batches exercises the Trainer's token count over a step.
"""

from __future__ import annotations

import torch

import memo
from models import build

SEQ = 64
LAYERS = 2


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, 128, (n, SEQ), generator=g)
        self.mask = torch.ones(n, SEQ, dtype=torch.long)
        for i in range(0, n, 3):
            self.mask[i, SEQ - 5 - i:] = 0

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i],
                "labels": self.ids[i].masked_fill(self.mask[i] == 0, -100)}


def train_set(n: int = 16) -> Tokens:
    return Tokens(n, seed=1)


def eval_set(n: int = 5) -> Tokens:
    """5 samples in batches of 2: the last batch is short."""
    return Tokens(n, seed=2)


def model(dtype=torch.float32):
    return build("llama", seed=0, num_hidden_layers=LAYERS).to(dtype)


def memo_config(sp=None, **overrides) -> memo.MemoConfig:
    return memo.MemoConfig(**{**dict(swap_ratio=0.5, keep_last_layers=1, host_memory_budget="1GiB",
                                     sequence_parallel_size=sp), **overrides})


def token_metrics(prediction) -> dict:
    """Next-token accuracy and mean logit over labelled positions: needs whole-sequence logits."""
    logits, labels = prediction.predictions, prediction.label_ids   # (n, seq, vocab), (n, seq)
    keep = labels[:, 1:] != -100
    hits = logits[:, :-1].argmax(-1) == labels[:, 1:]
    return {"accuracy": float(hits[keep].mean()), "logit_mean": float(logits[:, :-1][keep].mean())}


def arguments(output_dir: str, **overrides):
    from transformers import TrainingArguments
    base = dict(output_dir=output_dir, use_cpu=True, report_to="none", max_steps=4, per_device_train_batch_size=2,
                per_device_eval_batch_size=2, gradient_accumulation_steps=2, optim="sgd", learning_rate=0.5,
                lr_scheduler_type="constant", max_grad_norm=0.0, logging_steps=1, save_strategy="no",
                eval_strategy="no", disable_tqdm=True, seed=0, dataloader_num_workers=0)
    base.update(overrides)
    return TrainingArguments(**base)


def summary(trainer) -> dict:
    """Per-step loss and gradient norm; eval loss on 5 samples (a short last batch) and on 4."""
    logs = [h for h in trainer.state.log_history if "loss" in h and "grad_norm" in h]
    return {"loss": [h["loss"] for h in logs], "grad_norm": [h["grad_norm"] for h in logs],
            "eval_loss": trainer.evaluate()["eval_loss"],
            "eval_loss_even": trainer.evaluate(eval_dataset=eval_set(4))["eval_loss"]}
