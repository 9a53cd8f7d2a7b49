"""Checkpoints of a DeepSpeed ZeRO engine (stages 1-3, ``memo.integrations.deepspeed.initialize``), without pickle.

``save_checkpoint`` / ``load_checkpoint`` (integrations/checkpoint.py) come here when the optimizer
is DeepSpeed's ZeRO optimizer (stage 1 or 2: the optimizer state is partitioned; stage 3: the
weights too); the root, its ``latest.json`` pointer and the commit are those of every memo
checkpoint (NOTE [ Atomic checkpoint commit ]). ``export_pretrained`` gathers a ZeRO-3 model's
whole weights one module at a time and writes a plain Hugging Face model directory.

# NOTE [ ZeRO checkpoints ]
#
# 1. What a rank owns. Rank r of ZeRO's data-parallel group (the whole world under memo's sequence
#    parallelism: NOTE [ DeepSpeed and sequence parallelism ]) holds 1/W of the fp32 master weights
#    (stage 3: ``fp32_partitioned_groups_flat``; stages 1-2: ``single_partition_of_fp32_groups``,
#    one flat tensor per group) and the torch optimizer's state over them. Under stage 3 it also
#    holds 1/W of every weight (``p.ds_tensor``; frozen ones are not in the optimizer); the working
#    partitions are copies of the masters and are rebuilt from them on load, as DeepSpeed's own load
#    does. Under stages 1-2 every rank holds the whole weights.
# 2. A step directory holds ``state.json`` (``"optimizer_layout": "zero"``, ``"zero_stage"``, the
#    step, W, the torch optimizer's class, the scheduler's state), every rank's ``rank{r}.json``
#    (RNG, data position), ``config.json`` for an HF model, the whole weights as
#    ``model.safetensors`` (stages 1-2, rank 0, as for a plain model) or the persistent buffers in
#    ``state.safetensors`` (stage 3), and per rank ``zero{r}.json`` + ``zero{r}.safetensors``: its
#    data-parallel rank and W, the names and shapes of the parameters of each group (the partition
#    layout), its fp32 partitions (stages 1-2: without DeepSpeed's alignment padding), the torch
#    optimizer's ``state_dict`` over them, the loss scaler's numbers, stage 3's frozen partitions,
#    stages 1-2's paddings, partition counts and clip value, and the engine's step counters (when
#    the engine was passed). JSON + safetensors: nothing is pickled.
# 3. Save: each rank writes its own files; no collective besides the agreement that closes the
#    phase (checkpoint._agree), so a rank that fails (a full disk, a file-size limit) fails every
#    rank with a MemoError and the commit never happens; a save killed at any moment leaves
#    ``latest.json`` naming the previous complete checkpoint.
# 4. Load: read and check every file (``state.json``, the weights, this rank's rank and zero files)
#    against the live engine: the same stage, W and data-parallel rank, the same groups of
#    parameters (names and shapes), the fp32 partitions' shapes and dtypes, the torch optimizer's
#    class, param groups, hyperparameter types and state keys and shapes (NOTE [ Checked loads ]),
#    the loss scaler's class and field types, finite values everywhere; agree; only then apply:
#    the whole weights (stages 1-2), then the ZeRO optimizer's own ``load_state_dict`` with this
#    rank's state (fp32 masters copied, not rebuilt from the working weights; torch state), between
#    ``checkpoint_event_prologue`` / ``epilogue`` (stage 3: every parameter partitioned, frozen
#    partitions and buffers copied, persistent parameters gathered again), the engine's counters,
#    the scheduler and the RNG. A load refused by the checks changes nothing on any rank. Applying
#    can still fail after the checks (out of memory): the ranks agree before the epilogue's
#    collective, so every rank raises a MemoError saying to build the engine again, none waits.
# 5. Same W only (as DeepSpeed's own non-universal checkpoints): each rank's partitions, RNG and
#    data position are its own. Not handled (refused): NVMe offload (the state is in swap files),
#    DeepSpeed's elastic checkpoints and AutoEP / AutoTP layouts.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from memo.errors import MemoError

_WHO = "memo.checkpoint"
LAYOUT = "zero"
PARTITION_FORMAT = "memo-zero-partition"
_COUNTERS = ("global_steps", "global_samples", "micro_steps", "skipped_steps")
_ZERO_CLASSES = {"DeepSpeedZeroOptimizer_Stage3": 3, "DeepSpeedZeroOptimizer": None}


def is_zero3(module: torch.nn.Module) -> bool:
    """Whether ``module``'s parameters are partitioned by DeepSpeed ZeRO stage 3."""
    return any(hasattr(p, "ds_id") and hasattr(p, "ds_tensor") for p in module.parameters())


def stage_of(optimizer) -> int | None:
    """The ZeRO stage of DeepSpeed's ZeRO ``optimizer`` (1, 2 or 3), None for any other optimizer."""
    name = type(optimizer).__name__
    if name not in _ZERO_CLASSES or not type(optimizer).__module__.startswith("deepspeed."):
        return None
    return _ZERO_CLASSES[name] or (2 if optimizer.partition_gradients else 1)


def zero_optimizer(optimizer, engine, partitioned_weights: bool) -> int:
    """The stage of the ZeRO optimizer ``deepspeed.initialize`` returned (checked, NOTE [ ZeRO checkpoints ] rule 5)."""
    stage = stage_of(optimizer)
    if partitioned_weights and stage != 3:
        raise MemoError(f"{_WHO}: the model is partitioned by DeepSpeed ZeRO-3 but the optimizer is "
                        f"{type(optimizer).__name__}, not the engine's ZeRO-3 optimizer; pass the optimizer "
                        f"deepspeed.initialize returned (engine.optimizer), which holds the partitions and their "
                        f"optimizer state")
    if engine is not None and engine.optimizer is not optimizer:
        raise MemoError(f"{_WHO}: optimizer is not this engine's optimizer; pass engine.optimizer")
    if getattr(optimizer, "swap_optimizer", False) or getattr(optimizer, "params_in_nvme_swapper", False) \
            or getattr(optimizer, "elastic_checkpoint", False):
        raise MemoError(f"{_WHO}: the ZeRO optimizer swaps to NVMe (offload device 'nvme') or writes elastic "
                        f"checkpoints; memo's checkpoints do not read those layouts. Offload to 'cpu' and set "
                        f"elastic_checkpoint false, or use DeepSpeed's engine.save_checkpoint")
    return stage


def _names(module) -> dict:
    return {id(p): n for n, p in module.named_parameters(remove_duplicate=False)}


def _groups(module, optimizer, stage: int) -> list:
    """The parameters of each group as [name, whole shape] (NOTE [ ZeRO checkpoints ] rule 2)."""
    names = _names(module)
    if stage == 3:
        return [[[names.get(id(p), "?"), list(p.ds_shape)] for p in group] for group in optimizer.fp16_groups]
    return [[[names.get(id(p), "?"), list(p.shape)] for p in group] for group in optimizer.bit16_groups]


def _frozen(module) -> dict:
    seen, out = set(), {}
    for name, p in module.named_parameters():
        if not p.requires_grad and p.ds_id not in seen:
            seen.add(p.ds_id)
            out[name] = p.ds_tensor
    return out


def persistent_buffers(module) -> dict:
    out = {}
    for mname, m in module.named_modules():
        for bname, b in m.named_buffers(recurse=False):
            if b is not None and bname not in m._non_persistent_buffers_set:
                out[f"{mname}.{bname}" if mname else bname] = b
    return out


def _scaler_fields(scaler) -> dict:
    return {k: v for k, v in vars(scaler).items() if v is None or isinstance(v, (bool, int, float))}


def _live(optimizer, stage: int) -> dict:
    """This rank's state as the partition file holds it, by reference (no copies)."""
    from deepspeed.checkpoint import constants as C
    sd = optimizer.state_dict()
    if sd.get("ds_zero_partition_groups") is not None or sd.get(C.UNIVERSAL_CHECKPOINT_INFO) is not None:
        raise MemoError(f"{_WHO}: the ZeRO optimizer partitions expert or tensor-parallel groups (AutoEP / AutoTP); "
                        f"memo's checkpoints do not handle them, use DeepSpeed's engine.save_checkpoint")
    live = {"loss_scaler": {"class": _class(optimizer.loss_scaler), "fields": _scaler_fields(optimizer.loss_scaler)},
            "dynamic_loss_scale": bool(sd["dynamic_loss_scale"]), "overflow": bool(sd["overflow"])}
    if stage == 3:
        live.update(fp32=list(sd[C.FP32_FLAT_GROUPS]), optimizer=sd[C.OPTIMIZER_STATE_DICT], extra=None)
    else:
        live.update(fp32=list(sd[C.SINGLE_PARTITION_OF_FP32_GROUPS]), optimizer=sd[C.BASE_OPTIMIZER_STATE],
                    extra={"clip_grad": float(sd[C.CLIP_GRAD]), "group_paddings": list(sd[C.GROUP_PADDINGS]),
                           "param_alignment_paddings": [list(g) for g in sd[C.PARAM_ALIGNMENT_PADDINGS]],
                           "partition_count": list(sd[C.PARTITION_COUNT]), "ds_version": str(sd[C.DS_VERSION])})
    return live


def _class(obj) -> str:
    from memo.integrations.checkpoint import class_name
    return class_name(obj)


def _dp(optimizer) -> tuple[int, int]:
    import torch.distributed as dist
    return dist.get_rank(group=optimizer.dp_process_group), dist.get_world_size(group=optimizer.dp_process_group)


def write_partition(tmp: str, rank: int, module, optimizer, engine) -> None:
    """This rank's ``zero{r}.json`` + ``.safetensors`` (NOTE [ ZeRO checkpoints ] rule 2)."""
    from memo.integrations.checkpoint import _Encoder, _write
    stage = stage_of(optimizer)
    live = _live(optimizer, stage)
    enc = _Encoder()
    dp_rank, dp_world = _dp(optimizer)
    partition = {
        "format": PARTITION_FORMAT, "rank": rank, "zero_stage": stage, "dp_rank": dp_rank, "dp_world": dp_world,
        "groups": _groups(module, optimizer, stage), "fp32": enc(live["fp32"], "fp32"),
        "optimizer": enc(live["optimizer"], "optimizer"), "loss_scaler": live["loss_scaler"],
        "dynamic_loss_scale": live["dynamic_loss_scale"], "overflow": live["overflow"], "extra": live["extra"],
        "frozen": enc(_frozen(module) if stage == 3 else {}, "frozen"),
        "engine": None if engine is None else {k: getattr(engine, k) for k in _COUNTERS},
    }
    _write(partition_file(tmp, rank), partition, enc.tensors)


def partition_file(directory: str, rank: int) -> str:
    return os.path.join(directory, f"zero{rank}.json")


# --- load (NOTE [ ZeRO checkpoints ] rule 4) ------------------------------------------------------
def _fail(file: str, field: str, problem: str) -> MemoError:
    return MemoError(f"{_WHO}: {file}: field {field} {problem}; the file was edited, is corrupt or belongs to "
                     f"another model, optimizer or world size; build the engine of the saved run (same model, "
                     f"optimizer, ZeRO config and number of processes) or resume from another checkpoint")


def read_and_check(directory: str, module, optimizer, engine, rank: int) -> dict:
    """This rank's partition file read and checked against the live engine; nothing changed."""
    from memo.integrations.checkpoint import _read
    from memo.integrations.checkpoint_checks import check_like, check_optimizer, check_plain
    file = partition_file(directory, rank)
    saved = _read(file)
    if not isinstance(saved, dict) or saved.get("format") != PARTITION_FORMAT:
        raise _fail(file, "format", f"is not {PARTITION_FORMAT!r}")
    keys = {"rank", "zero_stage", "dp_rank", "dp_world", "groups", "fp32", "optimizer", "loss_scaler",
            "dynamic_loss_scale", "overflow", "extra", "frozen", "engine"}
    if keys - set(saved):
        raise _fail(file, sorted(keys - set(saved))[0], "is missing")
    stage = stage_of(optimizer)
    if saved["zero_stage"] != stage:
        raise _fail(file, "zero_stage", f"is {saved['zero_stage']!r}, this engine runs ZeRO stage {stage}")
    live_dp = _dp(optimizer)
    if saved["rank"] != rank or (saved["dp_rank"], saved["dp_world"]) != live_dp:
        raise _fail(file, "rank/dp_rank/dp_world", f"is {saved['rank']!r}/{saved['dp_rank']!r}/{saved['dp_world']!r}, "
                    f"this process {rank}/{live_dp[0]}/{live_dp[1]}")
    if saved["groups"] != _groups(module, optimizer, stage):
        raise _fail(file, "groups", "lists other parameters (names or shapes) in the ZeRO groups than this engine's")
    live = _live(optimizer, stage)
    check_like(saved["fp32"], live["fp32"], file, "fp32")
    if stage == 3:   # the torch optimizer's groups hold the fp32 partitions only around state_dict / step
        optimizer._set_fp32_optimizer_param_groups()
    try:
        check_optimizer(optimizer.optimizer, saved["optimizer"], None, file)
    finally:
        if stage == 3:
            optimizer._clear_fp32_optimizer_param_groups()
    for pid, group in saved["optimizer"]["state"].items():
        for key, value in group.items():
            if isinstance(value, torch.Tensor) and value.dim() == 0 and not bool(torch.isfinite(value)):
                raise _fail(file, f"optimizer/state/{pid}/{key}", "is not finite")
    scaler, live_scaler = saved["loss_scaler"], live["loss_scaler"]
    if not isinstance(scaler, dict) or scaler.get("class") != live_scaler["class"] \
            or not isinstance(scaler.get("fields"), dict) or set(scaler["fields"]) != set(live_scaler["fields"]):
        raise _fail(file, "loss_scaler", f"is {scaler!r}, this engine's loss scaler a {live_scaler['class']} with "
                    f"fields {sorted(live_scaler['fields'])}")
    for key, value in live_scaler["fields"].items():
        if value is None:
            check_plain(scaler["fields"][key], file, f"loss_scaler/fields/{key}")
        else:
            check_like(scaler["fields"][key], value, file, f"loss_scaler/fields/{key}")
    for key in ("dynamic_loss_scale", "overflow"):
        check_like(saved[key], live[key], file, key)
    if stage == 3:
        if saved["extra"] is not None:
            raise _fail(file, "extra", "is set; a ZeRO-3 partition has none")
    else:
        extra, live_extra = saved["extra"], live["extra"]
        if not isinstance(extra, dict) or set(extra) != set(live_extra):
            raise _fail(file, "extra", f"is {extra!r}, not the fields {sorted(live_extra)}")
        check_like(extra["clip_grad"], live_extra["clip_grad"], file, "extra/clip_grad")
        check_like(extra["ds_version"], live_extra["ds_version"], file, "extra/ds_version")
        for key in ("group_paddings", "param_alignment_paddings", "partition_count"):
            if extra[key] != live_extra[key]:
                raise _fail(file, f"extra/{key}", f"is {extra[key]!r}, this engine's {live_extra[key]!r}")
    frozen = _frozen(module) if stage == 3 else {}
    if not isinstance(saved["frozen"], dict) or set(saved["frozen"]) != set(frozen):
        names = sorted(saved["frozen"]) if isinstance(saved["frozen"], dict) else saved["frozen"]
        raise _fail(file, "frozen", f"holds the frozen parameters {names!r}, this model's are {sorted(frozen)}")
    for name, t in frozen.items():
        check_like(saved["frozen"][name], t, file, f"frozen/{name}")
    if engine is not None and saved["engine"] is not None:
        if not isinstance(saved["engine"], dict) or set(saved["engine"]) != set(_COUNTERS):
            raise _fail(file, "engine", f"is {saved['engine']!r}, not the counters {list(_COUNTERS)}")
        for key in _COUNTERS:
            check_like(saved["engine"][key], getattr(engine, key), file, f"engine/{key}")
            if saved["engine"][key] < 0:
                raise _fail(file, f"engine/{key}", f"is {saved['engine'][key]!r}, not >= 0")
    return saved


def check_buffers(module, saved: Any, file: str) -> dict:
    from memo.integrations.checkpoint_checks import check_like
    live = persistent_buffers(module)
    if not isinstance(saved, dict) or set(saved) != set(live):
        raise _fail(file, "buffers", f"holds {sorted(saved) if isinstance(saved, dict) else saved!r}, this model's "
                    f"persistent buffers are {sorted(live)}")
    for name, b in live.items():
        check_like(saved[name], b, file, f"buffers/{name}")
    return saved


def apply(saved: dict, weights: dict | None, buffers: dict | None, module, optimizer, engine, agree) -> None:
    """Hand every checked state to the live engine (NOTE [ ZeRO checkpoints ] rule 4). ``agree``:
    checkpoint._agree, so that a rank failing here (out of memory) fails every rank before the
    epilogue's collective instead of leaving them waiting in it."""
    error = None
    try:
        _apply_local(saved, weights, buffers, module, optimizer)
    except Exception as e:   # every rank must reach the agreement below
        error = e
    agree(error, "loading the checked checkpoint into the engine", "the engine is now partly loaded: build it "
          "again (a fresh model, engine and optimizer) before loading or training")
    epilogue = getattr(optimizer, "checkpoint_event_epilogue", None)
    if epilogue is not None:
        epilogue()   # stage 3: persistent parameters gathered again (a collective)
    if saved["engine"] is None and engine is not None or saved["engine"] is not None and engine is None:
        import warnings
        warnings.warn(f"{_WHO}: the checkpoint was saved with{'out' if engine is not None else ''} the DeepSpeed "
                      f"engine as model= and is loaded with{'' if engine is not None else 'out'} it: the engine's "
                      f"step counters ({', '.join(_COUNTERS)}) are not restored; pass the engine both times",
                      stacklevel=3)
    if engine is not None and saved["engine"] is not None:
        for key in _COUNTERS:
            setattr(engine, key, saved["engine"][key])


def _apply_local(saved: dict, weights: dict | None, buffers: dict | None, module, optimizer) -> None:
    """This rank's part of ``apply``: no collective."""
    from deepspeed.checkpoint import constants as C
    stage = stage_of(optimizer)
    if stage < 3:
        module.load_state_dict(weights, strict=True)   # the whole weights, before the masters (DeepSpeed's order)
    prologue = getattr(optimizer, "checkpoint_event_prologue", None)
    if prologue is not None:
        prologue()   # stage 3: every parameter partitioned
    for key, value in saved["loss_scaler"]["fields"].items():
        setattr(optimizer.loss_scaler, key, value)
    state = {C.LOSS_SCALER: optimizer.loss_scaler, "dynamic_loss_scale": saved["dynamic_loss_scale"],
             "overflow": saved["overflow"]}
    if stage == 3:
        state.update({C.OPTIMIZER_STATE_DICT: saved["optimizer"], C.FP32_FLAT_GROUPS: saved["fp32"]})
        kwargs = {}
    else:
        from deepspeed.runtime.zero.config import ZeroStageEnum
        extra = saved["extra"]
        state.update({C.BASE_OPTIMIZER_STATE: saved["optimizer"], C.SINGLE_PARTITION_OF_FP32_GROUPS: saved["fp32"],
                      C.CLIP_GRAD: extra["clip_grad"], C.GROUP_PADDINGS: extra["group_paddings"],
                      C.PARAM_ALIGNMENT_PADDINGS: extra["param_alignment_paddings"],
                      C.PARTITION_COUNT: extra["partition_count"], C.DS_VERSION: extra["ds_version"],
                      C.ZERO_STAGE: ZeroStageEnum(stage), C.PARAM_SLICE_MAPPINGS: optimizer._param_slice_mappings})
        kwargs = {"load_from_fp32_weights": True}   # this rank's masters as saved, not rounded from bit16 weights
    # load_state_dict takes every data-parallel rank's state and reads its own: the list's entry at this rank.
    optimizer.load_state_dict([state] * _dp(optimizer)[1], load_optimizer_states=True, **kwargs)
    if stage == 3:
        with torch.no_grad():
            for name, t in _frozen(module).items():
                t.copy_(saved["frozen"][name])
            for name, b in persistent_buffers(module).items():
                b.copy_(buffers[name])


# --- export --------------------------------------------------------------------------------------
def gathered_state_dict(module) -> dict | None:
    """The whole weights on rank 0's CPU (None elsewhere), gathered one module at a time, so no rank ever
    holds more than one module's whole parameters besides rank 0's copy. A collective."""
    import deepspeed
    import torch.distributed as dist
    rank = dist.get_rank()
    out, by_id = ({} if rank == 0 else None), {}

    failed: list = []

    def visit(m, prefix: str) -> None:
        params = list(m.parameters(recurse=False))
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):   # a collective: every rank enters
            if rank == 0 and not failed:
                try:
                    for name, p in m.named_parameters(recurse=False):
                        if p.ds_id in by_id:   # tied: the same tensor under both keys, as save_pretrained expects
                            out[prefix + name] = by_id[p.ds_id]
                        else:
                            out[prefix + name] = by_id[p.ds_id] = p.detach().cpu().clone()
                    for name, b in m.named_buffers(recurse=False):
                        if b is not None and name not in m._non_persistent_buffers_set:
                            out[prefix + name] = b.detach().cpu().clone()
                except Exception as e:   # out of host memory: keep entering the others' gathers, report after
                    failed.append(e)
        for name, child in m.named_children():
            visit(child, f"{prefix}{name}.")
    visit(module, "")
    if failed:
        raise failed[0]
    return out
