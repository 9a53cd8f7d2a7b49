"""Checkpoints of a memo + DeepSpeed ZeRO engine (NOTE [ ZeRO checkpoints ]), on gloo.

``main(rank, world, sp, root, export, phase)``: W = world ranks, memo's sequence parallelism P = sp
inside one ZeRO engine (memo.integrations.deepspeed.initialize; ZeRO's partitions span all W
ranks); replica d = rank // P trains on sequence ``_ids(step, d)``; torch AdamW + LambdaLR; the
token embedding and the final norm frozen (under ZeRO-3 their partitions are saved apart from the
optimizer's; the norm is small enough to stay gathered, a "persistent" parameter).

- ``phase="first"``: under ZeRO stage 1 (root + "-stage1") and under ZeRO-3 with weights and
  optimizer offloaded to the host (root + "-offload"): two steps, a save, the third step. Under ZeRO-3: two steps, ``save_checkpoint(root, step=2)``, ``export_pretrained(export)``, the
  third step (its loss, then the whole parameters), a second export over another; then a save of
  step 3 that fails on rank 1 (a file-size limit: EFBIG while it writes its partition), then a save
  every rank leaves by ``os._exit`` right after writing its partition (killed mid-save).
- ``phase="resume"``: fresh processes and process group, the frozen embedding built differently.
  Stage 1: a ZeRO-3 engine and an edited partition count are refused, then the load and the third
  step. ZeRO-3: refused loads first (a plain model, an SGD optimizer, the torch optimizer instead of
  the engine's, a truncated partition of rank 1, an edited learning rate in rank 1's partition):
  nothing changes on any rank; then ``load_checkpoint(root)`` and the third step; then a save of
  step 3, which removes the killed save's leftovers.
"""

import json
import os
import resource
import shutil
import signal

os.environ.setdefault("DS_ACCELERATOR", "cpu")   # DeepSpeed's CPU accelerator: gloo, torch CPU tensors

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import memo  # noqa: E402
from distributed import save_and_exit  # noqa: E402
from memo.integrations import checkpoint_zero  # noqa: E402
from memo.integrations import deepspeed as memo_ds  # noqa: E402
from memo.integrations.checkpoint import (export_pretrained, latest_checkpoint, load_checkpoint,  # noqa: E402
                                          save_checkpoint)
from memo.parallel import shard_batch  # noqa: E402
from models import build  # noqa: E402
from sp_workers.ckpt_sp import _error  # noqa: E402

deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False   # see ds_cases.py

SEQ, LR = 64, 1e-2
MEMO = dict(swap_ratio=0.5, keep_last_layers=1, host_memory_budget="1GiB", sp_timeout_s=60)


def _ids(step: int, replica: int) -> torch.Tensor:
    return torch.randint(0, 128, (1, SEQ), generator=torch.Generator().manual_seed(100 + step * 97 + replica))


def make(sp: int, stage: int = 3, optimizer_cls=torch.optim.AdamW, other_embedding: bool = False,
         offload: bool = False, dtype: str = "fp32"):
    model = build("llama", seed=0)
    frozen = (model.model.embed_tokens.weight, model.model.norm.weight)   # large, and small (ZeRO-3 persistent)
    for p in frozen:
        p.requires_grad_(False)
    if other_embedding:
        with torch.no_grad():
            for p in frozen:
                p.add_(0.5)
    memo.wrap(model, memo.MemoConfig(sequence_parallel_size=sp, **MEMO))
    plan = {"zero_stage": stage, "micro_batch": 1, "dtype": dtype, "model": {"model_type": "llama"},
            "offload_optimizer": offload, "offload_params": offload}
    config = memo_ds.memo_zero_config(plan, model=model)
    config["gradient_clipping"] = 0.0
    config["zero_force_ds_cpu_optimizer"] = False   # torch AdamW on the host copies (see ds_offload_cases.py)
    if dtype == "fp16":   # a loss scale that overflows fp16 at first: the dynamic scaler's state moves every step
        config["fp16"].update(initial_scale_power=40, hysteresis=2, loss_scale_window=2)
    base = optimizer_cls([p for p in model.parameters() if p.requires_grad], lr=LR)
    scheduler = torch.optim.lr_scheduler.LambdaLR(base, lambda s: 0.9 ** s)
    engine, optimizer, _, _ = memo_ds.initialize(model, config, optimizer=base)
    return engine, optimizer, scheduler, base


def step(engine, scheduler, i: int, rank: int, sp: int) -> torch.Tensor:
    loss = engine(**shard_batch({"input_ids": _ids(i, rank // sp), "labels": _ids(i, rank // sp)},
                                group=engine.module)).loss
    engine.backward(loss)
    engine.step()
    scheduler.step()
    return loss.detach().clone()


def full_params(engine) -> dict:
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):   # a no-op below stage 3
        return {n: p.detach().clone() for n, p in engine.module.named_parameters()}


def local_state(engine, optimizer, scheduler) -> dict:
    """This rank's partitions, fp32 masters, optimizer state, counters and lr: what a refused load must keep."""
    state = optimizer.optimizer.state
    zero3 = hasattr(optimizer, "fp32_partitioned_groups_flat")
    return {"partitions": {n: (p.ds_tensor if zero3 else p).detach().clone()
                           for n, p in engine.module.named_parameters()},
            "fp32": [t.detach().clone() for t in (optimizer.fp32_partitioned_groups_flat if zero3 else
                                                  optimizer.single_partition_of_fp32_groups)],
            "optimizer": [{k: v.detach().clone() for k, v in s.items()} for s in state.values()],
            "counters": (engine.global_steps, engine.global_samples, engine.micro_steps),
            "scaler": {k: v for k, v in vars(optimizer.loss_scaler).items() if isinstance(v, (bool, int, float))},
            "rng": torch.get_rng_state(), "buffers": {n: b.clone() for n, b in engine.module.named_buffers()},
            "scheduler": scheduler.state_dict()["last_epoch"], "lr": [g["lr"] for g in optimizer.param_groups]}


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _scaler(engine, optimizer) -> dict:
    fields = {k: v for k, v in vars(optimizer.loss_scaler).items() if isinstance(v, (bool, int, float))}
    return dict(fields, skipped_steps=engine.skipped_steps, global_steps=engine.global_steps)


def first_variant(rank: int, sp: int, root: str, stage: int, offload: bool, dtype: str) -> dict:
    """Another ZeRO setup: two steps, a save, the third step."""
    engine, optimizer, scheduler, _ = make(sp, stage=stage, offload=offload, dtype=dtype)
    [step(engine, scheduler, i, rank, sp) for i in range(2)]
    saved_dir = save_checkpoint(root, model=engine, optimizer=optimizer, scheduler=scheduler, step=2,
                                data_state={"cursor": 2, "rank": rank})
    out = {"files": sorted(os.listdir(saved_dir)), "params_at_2": full_params(engine),
           "scaler_at_2": _scaler(engine, optimizer)}
    out["loss_3"] = step(engine, scheduler, 2, rank, sp)
    out["params_at_3"] = full_params(engine)
    out["scaler_at_3"] = _scaler(engine, optimizer)
    engine.destroy()
    return out


# ZeRO-1; ZeRO-3 with weights and optimizer on the host; ZeRO-1 in bf16 (bf16 weights, fp32 masters);
# ZeRO-3 in fp16 with DeepSpeed's dynamic loss scaler.
VARIANTS = {"stage1": (1, False, "fp32"), "offload": (3, True, "fp32"), "bf16_stage1": (1, False, "bf16"),
            "fp16_stage3": (3, False, "fp16")}


def first(rank: int, world: int, sp: int, root: str, export: str) -> dict:
    out = {name: first_variant(rank, sp, f"{root}-{name}", *v) for name, v in VARIANTS.items()}
    engine, optimizer, scheduler, _ = make(sp)
    losses = [step(engine, scheduler, i, rank, sp) for i in range(2)]
    saved_dir = save_checkpoint(root, model=engine, optimizer=optimizer, scheduler=scheduler, step=2,
                                data_state={"cursor": 2, "rank": rank})
    export_pretrained(engine, export)
    out.update({"saved_dir": saved_dir, "params_at_2": full_params(engine), "losses": losses,
                "files": sorted(os.listdir(saved_dir))})
    out["loss_3"] = step(engine, scheduler, 2, rank, sp)
    out["params_at_3"] = full_params(engine)
    export_pretrained(engine, export + "-twice")
    export_pretrained(engine.module, export + "-twice")   # replaces the first export into the same directory
    dist.barrier()
    out["export_listing"] = sorted(n for n in os.listdir(os.path.dirname(export)) if n.startswith("export"))

    # A save that fails on rank 1 (a file-size limit: its partition file cannot be written).
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    if rank == 1:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
    out["failed_save"] = _error(lambda: save_checkpoint(root, model=engine, optimizer=optimizer, scheduler=scheduler,
                                                        step=3, data_state={"cursor": 3, "rank": rank}))
    if rank == 1:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    current = latest_checkpoint(root)
    dist.barrier()   # rank 0 removes .tmp-save after the agreement, while the others go on
    out["after_failed_save"] = (current, sorted(os.listdir(root)))
    dist.barrier()   # every rank has looked before rank 0 makes the next save's .tmp-save

    # A save killed after every rank wrote its partition: state.json and the commit never happen.
    original = checkpoint_zero.write_partition

    def killed(*args, **kwargs):
        original(*args, **kwargs)
        dist.barrier()
        save_and_exit(rank, out)
    checkpoint_zero.write_partition = killed
    save_checkpoint(root, model=engine, optimizer=optimizer, scheduler=scheduler, step=3,
                    data_state={"cursor": 3, "rank": rank})
    raise AssertionError("the killed save returned")


def _edited_copy(root: str, dst: str, edit) -> None:
    shutil.copytree(root, dst)
    edit(latest_checkpoint(dst))


def _truncate(directory: str) -> None:
    path = os.path.join(directory, "zero1.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _edit_lr(directory: str) -> None:
    path = os.path.join(directory, "zero1.json")
    with open(path) as f:
        partition = json.load(f)
    partition["optimizer"]["param_groups"][0]["lr"] = "abc"
    with open(path, "w") as f:
        json.dump(partition, f)


def _edit_partition_count(directory: str) -> None:
    path = os.path.join(directory, "zero1.json")
    with open(path) as f:
        partition = json.load(f)
    partition["extra"]["partition_count"] = [3]
    with open(path, "w") as f:
        json.dump(partition, f)


def resume_variant(rank: int, sp: int, root: str, stage: int, offload: bool, dtype: str) -> dict:
    """The load and the third step; for ZeRO-1 also the refusals of an engine of another stage and of an
    edited partition count, which change nothing."""
    out = {}
    if stage == 1:
        engine3, optimizer3, _, _ = make(sp, stage=3)
        out["stage3_engine"] = _error(lambda: load_checkpoint(root, model=engine3, optimizer=optimizer3))
        engine3.destroy()
    engine, optimizer, scheduler, _ = make(sp, stage=stage, offload=offload, dtype=dtype, other_embedding=True)
    if stage == 1:
        fresh = local_state(engine, optimizer, scheduler)
        if rank == 0:
            _edited_copy(root, root + "-edited", _edit_partition_count)
        dist.barrier()
        out["edited"] = _error(lambda: load_checkpoint(root + "-edited", model=engine, optimizer=optimizer,
                                                       scheduler=scheduler))
        out["unchanged_after_refusals"] = _same(fresh, local_state(engine, optimizer, scheduler))
    out["loaded"] = load_checkpoint(root, model=engine, optimizer=optimizer, scheduler=scheduler)
    out["params_at_2"] = full_params(engine)
    out["scaler_at_2"] = _scaler(engine, optimizer)
    out["loss_3"] = step(engine, scheduler, 2, rank, sp)
    out["params_at_3"] = full_params(engine)
    out["scaler_at_3"] = _scaler(engine, optimizer)
    engine.destroy()
    return out


def resume(rank: int, world: int, sp: int, root: str) -> dict:
    out = {"listing_before": sorted(os.listdir(root)),
           "tmp_before": sorted(os.listdir(os.path.join(root, ".tmp-save"))),
           **{name: resume_variant(rank, sp, f"{root}-{name}", *v) for name, v in VARIANTS.items()}}
    plain = build("llama", seed=0)
    out["plain_model"] = _error(lambda: load_checkpoint(root, model=plain, optimizer=torch.optim.AdamW(
        plain.parameters(), lr=LR)))
    sgd_engine, sgd_optimizer, _, _ = make(sp, optimizer_cls=torch.optim.SGD)
    out["sgd"] = _error(lambda: load_checkpoint(root, model=sgd_engine, optimizer=sgd_optimizer))
    sgd_engine.destroy()

    engine, optimizer, scheduler, base = make(sp, other_embedding=True)
    out["torch_optimizer"] = _error(lambda: load_checkpoint(root, model=engine, optimizer=base, scheduler=scheduler))
    fresh = local_state(engine, optimizer, scheduler)
    if rank == 0:
        _edited_copy(root, root + "-truncated", _truncate)
        _edited_copy(root, root + "-edited", _edit_lr)
    dist.barrier()
    for name in ("truncated", "edited"):
        out[name] = _error(lambda: load_checkpoint(f"{root}-{name}", model=engine, optimizer=optimizer,
                                                   scheduler=scheduler))
    out["unchanged_after_refusals"] = _same(fresh, local_state(engine, optimizer, scheduler))

    out["embedding_before_load"] = full_params(engine)["model.embed_tokens.weight"]
    out["loaded"] = load_checkpoint(root, model=engine, optimizer=optimizer, scheduler=scheduler)
    out["counters"] = (engine.global_steps, engine.global_samples, engine.micro_steps)
    out["params_at_2"] = full_params(engine)
    out["loss_3"] = step(engine, scheduler, 2, rank, sp)
    out["params_at_3"] = full_params(engine)
    save_checkpoint(root, model=engine, optimizer=optimizer, scheduler=scheduler, step=3,
                    data_state={"cursor": 3, "rank": rank})
    out["listing_after"] = sorted(os.listdir(root))
    engine.destroy()
    return out


def main(rank, world, sp, root, export, phase):
    return first(rank, world, sp, root, export) if phase == "first" else resume(rank, world, sp, root)
