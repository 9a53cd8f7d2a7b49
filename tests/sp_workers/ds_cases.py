"""A tiny Llama trained a few steps under DeepSpeed, with and without memo, per ZeRO stage.

Every rank builds the same model (same seed). Cases:

- ``zero``: for each stage, the plain model under ``deepspeed.initialize`` and a memo-wrapped twin
  (swap_ratio 0.5, keep_last_layers 1: the first layers swap half their tokens and recompute the rest
  in backward) under ``memo.integrations.deepspeed.initialize``, with the same config, each rank
  feeding its own micro-batches (data parallel over the world). Stage 3 builds the model under
  ``deepspeed.zero.Init`` (weights born partitioned).
- ``accelerate``: the same through Accelerate's DeepSpeed plugin (Accelerate creates the engine; only
  the config's ``leaf_module`` section protects ZeRO-3).
- ``sp``: memo's sequence parallelism over the world inside one engine (the ranks share each
  sequence), against torch without DeepSpeed on the whole sequence.

Every memo case also reports, per recomputation, whether the layer's weights were whole at that
moment (NOTE [ ZeRO-3 and recomputation ] in integrations/deepspeed.py).
"""

import copy
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")   # DeepSpeed's CPU accelerator: gloo, torch CPU tensors

import deepspeed  # noqa: E402
import torch  # noqa: E402

import memo  # noqa: E402
import memo.executor  # noqa: E402
from memo.integrations import deepspeed as memo_ds  # noqa: E402
from memo.parallel import shard_batch  # noqa: E402
from models import batch, build  # noqa: E402

# The CPU accelerator JIT-compiles a shared-memory all-reduce (used by DeepSpeed inference only) when
# its comm backend starts: about 2 minutes on 2 cores on a fresh machine. Training does not use it.
deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

SEQ, MICRO, STEPS, LR = 32, 2, 3, 1e-2
MEMO = dict(swap_ratio=0.5, keep_last_layers=1, host_memory_budget="1GiB")

_RECOMPUTES: list = []
_original_recompute = memo.executor.LayerState._recompute


def _observing_recompute(self, records):
    """Records whether the layer's weights are whole while it is recomputed, then runs the real one."""
    zero = [p for p in self.layer.parameters() if hasattr(p, "ds_shape")]
    _RECOMPUTES.append({"layer": self.index, "zero_params": len(zero),
                        "whole": all(tuple(p.shape) == tuple(p.ds_shape) for p in zero)})
    return _original_recompute(self, records)


memo.executor.LayerState._recompute = _observing_recompute


def _config(stage: int) -> dict:
    # From a plan-like dict: stage 3 names the Llama decoder layer as its leaf module (NOTE [ ZeRO-3 and
    # recomputation ] rule 5), for the plain run as for memo's, so both run the same DeepSpeed setup.
    return memo_ds.memo_zero_config({"zero_stage": stage, "micro_batch": MICRO, "dtype": "fp32",
                                     "model": {"model_type": "llama"}})


def _model(config, zero_init: bool):
    if zero_init:   # weights are born partitioned (each rank holds 1/world of every tensor)
        with deepspeed.zero.Init(config_dict_or_path=config):
            return build("llama", seed=0)
    return build("llama", seed=0)


def _steps(engine, backward, step_fn, rank, world) -> torch.Tensor:
    losses = []
    for step in range(STEPS):
        ids, mask, labels = batch(MICRO, SEQ, seed=100 + step * world + rank)
        out = engine(input_ids=ids, attention_mask=mask, labels=labels)
        backward(out.loss)
        step_fn()
        losses.append(out.loss.detach().clone())
    return torch.stack(losses)


def _memo_report(model) -> dict:
    st = memo.stats(model)
    return {"recomputed_bytes": sum(layer.recomputed_bytes for layer in st.layers), "recomputes": list(_RECOMPUTES)}


def train(config: dict, *, use_memo: bool, zero_init: bool, rank: int, world: int) -> dict:
    model = _model(config, zero_init)
    result = {}
    if use_memo:
        memo.wrap(model, memo.MemoConfig(loss_chunk_size=None, **MEMO))
        result["config_from_model"] = memo_ds.memo_zero_config(config["zero_optimization"]["stage"],
                                                               micro_batch=MICRO, model=model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    if use_memo:
        # Without the config's leaf_module section: memo's initialize must make the layers ZeRO-3 leaves
        # itself (prepare); the plain run gets them from the config, so both run the same DeepSpeed setup.
        own = copy.deepcopy(config)
        own["zero_optimization"].pop("leaf_module", None)
        engine, *_ = memo_ds.initialize(model, own, optimizer=optimizer)
    else:
        engine, *_ = deepspeed.initialize(model=model, config=config, optimizer=optimizer)
    del _RECOMPUTES[:]
    result["losses"] = _steps(engine, engine.backward, engine.step, rank, world)
    if use_memo:
        result.update(_memo_report(model))
    engine.destroy()
    return result


def train_accelerate(config: dict, *, use_memo: bool, rank: int, world: int) -> dict:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DeepSpeedPlugin
    AcceleratorState._reset_state(True)   # one Accelerator (one DeepSpeed engine) per run
    model = build("llama", seed=0)
    if use_memo:
        memo.wrap(model, memo.MemoConfig(loss_chunk_size=None, **MEMO))
    accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=copy.deepcopy(config)))
    engine, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=LR))
    del _RECOMPUTES[:]

    def step():
        optimizer.step()
        optimizer.zero_grad()

    result = {"losses": _steps(engine, accelerator.backward, step, rank, world), "engine": type(engine).__name__,
              "distributed_type": str(accelerator.distributed_type)}
    if use_memo:
        result.update(_memo_report(model))
    engine.destroy()
    AcceleratorState._reset_state(True)
    return result


def _reference(dtype, seq: int) -> dict:
    """The whole sequence without DeepSpeed or memo: torch AdamW on the same batches, gradients clipped to
    norm 1 as DeepSpeed does by default (``gradient_clipping: 1.0``)."""
    model = build("llama", seed=0).to(dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    losses, norms = [], []
    for step in range(STEPS):
        ids, _, labels = batch(MICRO, seq, seed=100 + step)
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)))
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach().double())
    return {"losses": torch.stack(losses), "norms": norms}


def train_sequence_parallel(stage: int, *, rank: int, world: int, seq: int = 64) -> dict:
    """memo's sequence parallelism over the world in one engine (NOTE [ DeepSpeed and sequence parallelism ])."""
    model = build("llama", seed=0)
    memo.wrap(model, memo.MemoConfig(sequence_parallel_size=world, **MEMO))
    config = memo_ds.memo_zero_config(stage, micro_batch=MICRO, model=model)
    engine, *_ = memo_ds.initialize(model, config, optimizer=torch.optim.AdamW(model.parameters(), lr=LR))
    del _RECOMPUTES[:]
    losses, norms = [], []
    for step in range(STEPS):
        ids, _, labels = batch(MICRO, seq, seed=100 + step)   # the same batch on every rank; each keeps its shard
        out = engine(**shard_batch({"input_ids": ids, "labels": labels}, group=model))
        engine.backward(out.loss)
        if stage == 0:   # the reduced gradients are in .grad until the step; stage 0 does not keep their norm
            norms.append(float(torch.stack([p.grad.norm() for p in model.parameters()]).norm()))
        engine.step()
        if stage > 0:    # stages 1-2 keep the norm they clipped with
            norms.append(float(engine.get_global_grad_norm()))
        losses.append(out.loss.detach().double())
    result = {"losses": torch.stack(losses), "norms": norms, **_memo_report(model)}
    engine.destroy()
    return result


def sequence_parallel_zero3_reduce_scatter_refused(world: int) -> str:
    """ZeRO-3's reduce-scatter path averages over the SP ranks (NOTE [ DeepSpeed and sequence parallelism ]
    rule 4): asked for explicitly, it is refused."""
    model = build("llama", seed=0)
    memo.wrap(model, memo.MemoConfig(sequence_parallel_size=world, **MEMO))
    config = memo_ds.memo_zero_config(3, model=model)
    config["zero_optimization"]["reduce_scatter"] = True
    try:
        memo_ds.initialize(model, config, optimizer=torch.optim.AdamW(model.parameters(), lr=LR))
    except memo.MemoError as e:
        return str(e)
    return "not refused"


def prepare_after_engine_refused() -> str:
    """memo.integrations.deepspeed.prepare on a model whose ZeRO-3 engine (and hooks) exist already."""
    model = build("llama", seed=0)
    memo.wrap(model, memo.MemoConfig(**MEMO))
    config = memo_ds.memo_zero_config(3, micro_batch=MICRO)   # no model: no leaf_module section
    engine, *_ = deepspeed.initialize(model=model, config=config,
                                      optimizer=torch.optim.AdamW(model.parameters(), lr=LR))
    try:
        memo_ds.prepare(model)
    except memo.MemoError as e:
        return str(e)
    finally:
        engine.destroy()
    return "not refused"


def main(rank, world, zero=(0, 1, 2, 3), accelerate=(1, 2, 3), sp=(0, 1, 2, 3)):
    out = {"zero": {}, "accelerate": {}, "sp": {}}
    for stage in zero:
        config = _config(stage)
        zero_init = stage == 3
        out["zero"][stage] = {"config": config,
                              "plain": train(config, use_memo=False, zero_init=zero_init, rank=rank, world=world),
                              "memo": train(config, use_memo=True, zero_init=zero_init, rank=rank, world=world)}
    if 3 in zero:
        out["late_prepare"] = prepare_after_engine_refused()
    for stage in accelerate:
        config = _config(stage)
        out["accelerate"][stage] = {"plain": train_accelerate(config, use_memo=False, rank=rank, world=world),
                                    "memo": train_accelerate(config, use_memo=True, rank=rank, world=world)}
    for stage in sp:
        out["sp"][stage] = train_sequence_parallel(stage, rank=rank, world=world)
    if sp:
        out["sp_reference"] = {"fp32": _reference(torch.float32, 64), "fp64": _reference(torch.float64, 64)}
        out["sp_zero3"] = sequence_parallel_zero3_reduce_scatter_refused(world)
    return out
