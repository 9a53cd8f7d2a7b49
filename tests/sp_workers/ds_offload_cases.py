"""A tiny Llama under DeepSpeed ZeRO-3 with its weights and optimizer on the host (``offload_param`` and
``offload_optimizer``, from ``memo_zero_config`` of a plan that says ``offload_params``), with and without
memo, three steps each, on DeepSpeed's CPU accelerator.

The memo twin swaps half its tokens and recomputes the rest in backward (swap_ratio 0.5, keep_last_layers
1), so every recomputation needs its layer's weights gathered from the host (NOTE [ ZeRO-3 and
recomputation ] rule 3 in integrations/deepspeed.py). Reports losses, the final weights (gathered), what
DeepSpeed's engine says it offloads, where the weight shards live, and per recomputation whether the
layer's weights were whole.
"""

import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")   # DeepSpeed's CPU accelerator: gloo, torch CPU tensors

import deepspeed  # noqa: E402
import torch  # noqa: E402

import memo  # noqa: E402
from memo.integrations import deepspeed as memo_ds  # noqa: E402
from models import build  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ds_cases  # noqa: E402  (the recompute observer, the batches and the step loop of the ZeRO cases)

PLAN = {"zero_stage": 3, "offload_optimizer": True, "offload_params": True, "micro_batch": ds_cases.MICRO,
        "dtype": "fp32", "model": {"model_type": "llama"}}


def config() -> dict:
    cfg = memo_ds.memo_zero_config(PLAN)
    # The runs pass torch's AdamW (as the other ZeRO cases do); DeepSpeed refuses a client optimizer under
    # offload unless told it is meant (its CPU Adam is faster; not the point here).
    cfg["zero_force_ds_cpu_optimizer"] = False
    return cfg


def train(cfg: dict, *, use_memo: bool, rank: int, world: int) -> dict:
    with deepspeed.zero.Init(config_dict_or_path=cfg):   # weights born partitioned, on the host
        model = build("llama", seed=0)
    if use_memo:
        memo.wrap(model, memo.MemoConfig(loss_chunk_size=None, **ds_cases.MEMO))
    optimizer = torch.optim.AdamW(model.parameters(), lr=ds_cases.LR)
    init = memo_ds.initialize if use_memo else (lambda m, c, **kw: deepspeed.initialize(model=m, config=c, **kw))
    engine, *_ = init(model, cfg, optimizer=optimizer)
    del ds_cases._RECOMPUTES[:]
    result = {"initial": _gathered(model)}
    result.update({"losses": ds_cases._steps(engine, engine.backward, engine.step, rank, world),
              "offload_param": str(engine.zero_offload_param().device) if engine.zero_offload_param() else None,
              "offload_optimizer": str(engine.zero_offload_optimizer().device)
              if engine.zero_offload_optimizer() else None,
              "shard_devices": sorted({str(p.ds_tensor.device) for p in model.parameters()}),
              "params": _gathered(model)})
    if use_memo:
        result.update(ds_cases._memo_report(model))
    engine.destroy()
    return result


def _gathered(model) -> dict:
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        return {n: p.detach().clone() for n, p in model.named_parameters()}


def train_torch(initial: dict, rank: int, world: int) -> dict:
    """The plain model without DeepSpeed, from the weights ``initial`` (zero.Init's, which differ from an
    eager build's): torch's AdamW on the same batches (DeepSpeed clips nothing unless the config says
    ``gradient_clipping``, and memo_zero_config does not)."""
    model = build("llama", seed=0)
    model.load_state_dict(initial)
    optimizer = torch.optim.AdamW(model.parameters(), lr=ds_cases.LR)

    def step():
        optimizer.step()
        optimizer.zero_grad()
    losses = ds_cases._steps(model, lambda loss: loss.backward(), step, rank, world)
    return {"losses": losses, "params": {n: p.detach().clone() for n, p in model.named_parameters()}}


def main(rank, world):
    cfg = config()
    plain = train(cfg, use_memo=False, rank=rank, world=world)
    return {"config": cfg, "plain": plain, "memo": train(cfg, use_memo=True, rank=rank, world=world),
            "torch": train_torch(plain["initial"], rank, world)}
