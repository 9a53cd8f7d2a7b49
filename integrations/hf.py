"""memo under Hugging Face's ``Trainer``: ``MemoTrainer``, a ``Trainer`` for a memo-wrapped model.

    trainer = MemoTrainer(model=model, args=TrainingArguments(...), train_dataset=..., eval_dataset=...,
                          memo_config=memo.MemoConfig(swap_ratio=0.5, sequence_parallel_size=2))
    trainer.train(); trainer.evaluate(); trainer.save_model()

Without sequence parallelism a wrapped model is an ordinary HF model to the Trainer and nothing
is overridden. With it, the hooks below make every sequence-parallel block of P ranks behave as
one data-parallel replica of the plain Trainer (NOTE [ MemoTrainer under sequence parallelism ]).

# NOTE [ MemoTrainer under sequence parallelism ]
#
# The world of W processes is D = W/P data-parallel replicas of P ranks each; the gradient
# reduction follows NOTE [ Gradients under data x sequence parallelism ] (integrations/accelerate.py).
# 1. Data: Accelerate shards each loader over all W processes. ``get_*_dataloader`` re-point its
#    shard (``BatchSamplerShard`` / ``IterableDatasetShard``, as Trainer itself does for
#    ``BatchRebalanceSampler``) at replica d = rank // P of D, so the P ranks of a block read the same
#    full batches.
# 2. Sharding: ``get_batch_samples`` (training) and ``prediction_step`` (evaluation) cut each batch
#    along the sequence with ``memo.parallel.shard_batch`` before the Trainer looks at it. The
#    Trainer then counts ``num_items_in_batch`` from this rank's ``shift_labels`` (its own tokens),
#    which is what memo's loss sums over the block (NOTE [ Sequence-parallel loss ] rule 2).
#    With ``average_tokens_across_devices`` the count is gathered over W ranks (every token once),
#    memo's sum makes it P times that, and the Trainer's factor W leaves D: each rank's loss is
#    D x (its block's token sum) / (all tokens), as on a plain D-process run. Without it, memo's
#    sum is the block's count and the loss the block's mean, as on one process of such a run.
# 3. Gradients: the first ``training_step`` registers a DDP communication hook: SUM over the world,
#    divide by D. With the loss of rule 2 the result is the plain Trainer's gradient (D = 1: the
#    full-sequence gradient). Wrappers other than DDP (DeepSpeed, FSDP) are refused.
# 4. Evaluation: every rank of a block returns the same loss (memo's loss is the block's), and
#    logits gathered along the sequence with the unsharded labels. ``gather_function`` keeps one
#    rank per block, so metrics see D replicas and the last batch is trimmed as Accelerate does.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from memo.errors import MemoError

try:
    from transformers import Trainer
except ImportError as e:   # pragma: no cover - transformers is a dependency of memo
    raise MemoError("memo.integrations.hf: transformers is not installed; pip install transformers") from e

from memo.integrations.accelerate import sum_over_sequence_mean_over_data

_WHO = "memo.integrations.hf"


class MemoTrainer(Trainer):
    """``transformers.Trainer`` for a model wrapped by ``memo.wrap``, with or without sequence parallelism.

    Pass a wrapped model, or an unwrapped one and ``memo_config`` (the model is moved to
    ``args.device`` and wrapped after the Trainer's distributed setup, which sequence parallelism
    needs). Everything else is the ``Trainer``'s. Under sequence parallelism batches must be dicts of
    ``input_ids`` (batch, seq) and optionally ``labels``, ``attention_mask`` (right padding only) and
    ``position_ids``; label smoothing and ``compute_loss_func`` are refused (they would see one
    shard's logits).
    """

    def __init__(self, model=None, args=None, *posargs, memo_config=None, **kwargs):
        import memo
        from memo.wrap import runtime_of
        if model is None:
            raise MemoError(f"{_WHO}: MemoTrainer needs model= (model_init is not supported); build the model and "
                            f"pass it, wrapped or with memo_config=")
        wrapped = hasattr(model, "_memo_runtime")
        if memo_config is not None:
            if wrapped:
                raise MemoError(f"{_WHO}: the model is already wrapped by memo and memo_config= was given too; pass "
                                f"one of them")
            if args is None:
                raise MemoError(f"{_WHO}: memo_config= needs args= (TrainingArguments): the model is wrapped after "
                                f"the distributed setup they describe")
            model = memo.wrap(model.to(args.device), memo_config)   # args.device sets up torch.distributed
        elif not wrapped:
            raise MemoError(f"{_WHO}: the model is not wrapped by memo; pass memo_config=memo.MemoConfig(...) or "
                            f"call memo.wrap(model, ...) first (or use transformers.Trainer)")
        self._memo_sp = runtime_of(model).sp
        self._memo_hooked: set[int] = set()
        super().__init__(model, args, *posargs, **kwargs)
        if self._memo_sp is not None:
            self._check_sequence_parallel()

    # --- setup ---------------------------------------------------------------------------------
    def _check_sequence_parallel(self) -> None:
        import torch.distributed as dist
        sp = self._memo_sp
        why = None
        if self.label_smoother is not None:
            why = "label smoothing (label_smoothing_factor) sees one shard's logits; set it to 0"
        elif self.compute_loss_func is not None:
            why = "compute_loss_func sees one shard's logits and labels; leave the loss to the model"
        elif self.is_deepspeed_enabled or self.is_fsdp_enabled:
            why = ("DeepSpeed and FSDP reduce gradients over all ranks, P times too little; use DDP (the default "
                   "for multi-process runs)")
        elif self.args.n_gpu > 1:
            why = "torch DataParallel (n_gpu > 1 in one process) is not supported; launch one process per device"
        elif self.args.world_size != dist.get_world_size():
            why = f"the Trainer's world size {self.args.world_size} is not torch.distributed's {dist.get_world_size()}"
        else:
            block = dist.get_rank() // sp.size
            if sp.ranks != list(range(block * sp.size, (block + 1) * sp.size)):
                why = (f"the sequence-parallel group {sp.ranks} is not a block of consecutive ranks; use "
                       f"MemoConfig(sequence_parallel_size=P), which makes them")
        if why is not None:
            raise MemoError(f"{_WHO}: under sequence parallelism {why}")

    @property
    def _memo_replicas(self) -> tuple[int, int]:
        """(this rank's data-parallel replica, number of replicas)."""
        import torch.distributed as dist
        return dist.get_rank() // self._memo_sp.size, dist.get_world_size() // self._memo_sp.size

    # --- data: NOTE [ MemoTrainer under sequence parallelism ] rules 1-2 -------------------------
    def _one_replica_per_block(self, loader):
        if self._memo_sp is None:
            return loader
        from accelerate.data_loader import BatchSamplerShard, DataLoaderDispatcher, IterableDatasetShard
        replica, replicas = self._memo_replicas
        if isinstance(loader, DataLoaderDispatcher):
            raise MemoError(f"{_WHO}: under sequence parallelism the loader must not dispatch batches from rank 0; "
                            f"pass TrainingArguments(accelerator_config={{'dispatch_batches': False}})")
        shard = getattr(loader, "batch_sampler", None)
        if not isinstance(shard, BatchSamplerShard):
            shard = getattr(loader, "dataset", None)
            if not isinstance(shard, IterableDatasetShard):
                raise MemoError(f"{_WHO}: cannot make the ranks of a sequence-parallel block read the same batches "
                                f"from a {type(loader).__name__} whose batches Accelerate did not shard; use a "
                                f"map-style or iterable torch Dataset")
        shard.num_processes, shard.process_index = replicas, replica
        if replicas == 1 and isinstance(shard, BatchSamplerShard):
            shard.even_batches = False   # no other replica to keep in step: a short last batch, as on one process
        return loader

    def get_train_dataloader(self):
        return self._one_replica_per_block(super().get_train_dataloader())

    def get_eval_dataloader(self, eval_dataset=None):
        return self._one_replica_per_block(super().get_eval_dataloader(eval_dataset))

    def get_test_dataloader(self, test_dataset):
        return self._one_replica_per_block(super().get_test_dataloader(test_dataset))

    def get_total_train_batch_size(self, args) -> int:
        total = super().get_total_train_batch_size(args)
        return total if self._memo_sp is None else total // self._memo_sp.size

    def _shard(self, batch):
        from memo.parallel import shard_batch
        if not hasattr(batch, "keys"):
            raise MemoError(f"{_WHO}: the data collator yields {type(batch).__name__}; under sequence parallelism "
                            f"batches must be dicts with input_ids (and labels, attention_mask, position_ids)")
        return shard_batch(dict(batch), group=self._memo_sp)

    def get_batch_samples(self, epoch_iterator, num_batches: int, device):
        if self._memo_sp is None:
            return super().get_batch_samples(epoch_iterator, num_batches, device)
        # A generator: the Trainer draws exactly num_batches from it, so the iterator advances as much.
        return super().get_batch_samples((self._shard(b) for b in epoch_iterator), num_batches, device)

    # --- gradients: rule 3 ---------------------------------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None):
        if self._memo_sp is not None and id(model) not in self._memo_hooked:
            from torch.nn.parallel import DistributedDataParallel
            if not isinstance(model, DistributedDataParallel):
                raise MemoError(f"{_WHO}: under sequence parallelism the Trainer must wrap the model in "
                                f"DistributedDataParallel (it got {type(model).__name__}), or the gradients are not "
                                f"summed over the sequence-parallel ranks")
            model.register_comm_hook(self._memo_replicas[1], sum_over_sequence_mean_over_data)
            self._memo_hooked.add(id(model))
        return super().training_step(model, inputs, num_items_in_batch)

    # --- evaluation: rule 4 --------------------------------------------------------------------
    def prediction_step(self, model, inputs, prediction_loss_only: bool, ignore_keys: Optional[list] = None):
        if self._memo_sp is None:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        from memo.parallel import gather_sequence
        labels = inputs.get("labels")
        seq = inputs["input_ids"].shape[1] if "input_ids" in inputs else inputs["inputs_embeds"].shape[1]
        loss, logits, shard_labels = super().prediction_step(model, self._shard(inputs), prediction_loss_only,
                                                             ignore_keys=ignore_keys)
        if prediction_loss_only:
            return loss, None, None

        def whole(x):
            if isinstance(x, (tuple, list)):
                return type(x)(whole(t) for t in x)
            if isinstance(x, torch.Tensor) and x.dim() >= 2:
                return gather_sequence(x, dim=1, group=self._memo_sp)[:, :seq]
            return x
        return loss, whole(logits), (None if shard_labels is None else self._prepare_input(labels))

    @property
    def gather_function(self):
        inner = self.__dict__.get("_memo_gather_inner")
        if getattr(self, "_memo_sp", None) is None:
            return inner
        return self._gather_one_per_block

    @gather_function.setter
    def gather_function(self, fn) -> None:   # the Trainer sets Accelerate's gather_for_metrics
        self.__dict__["_memo_gather_inner"] = fn

    def _gather_one_per_block(self, data: Any):
        """``accelerator.gather_for_metrics`` over the D replicas: the rows of the first rank of each block."""
        from accelerate.utils import recursively_apply
        acc = self.accelerator
        p = self._memo_sp.size
        world = acc.num_processes

        def first_of_block(t):
            rows = t.shape[0] // world
            return t.reshape(world, rows, *t.shape[1:])[::p].reshape(-1, *t.shape[1:])
        data = recursively_apply(first_of_block, acc.gather(data))
        state = acc.gradient_state
        if state.end_of_dataloader and state.remainder > 0:
            data = recursively_apply(lambda t: t[:state.remainder], data)
        return data
