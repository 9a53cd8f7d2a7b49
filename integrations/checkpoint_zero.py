"""Checkpoints of a DeepSpeed ZeRO-3 model (``memo.integrations.deepspeed.initialize``), without pickle.

``save_checkpoint`` / ``load_checkpoint`` (integrations/checkpoint.py) come here when the model's
parameters are partitioned by ZeRO stage 3; the root, its ``latest.json`` pointer and the commit
are those of every memo checkpoint (NOTE [ Atomic checkpoint commit ]). ``export_pretrained``
gathers the whole weights one module at a time and writes a plain Hugging Face model directory.

# NOTE [ ZeRO-3 checkpoints ]
#
# 1. What a rank owns. Under ZeRO-3 rank r of the data-parallel group (the whole world under
#    memo's sequence parallelism: NOTE [ DeepSpeed and sequence parallelism ]) holds 1/W of every
#    trained parameter as fp32 master partitions (the optimizer's ``fp32_partitioned_groups_flat``,
#    one flat tensor per sub-group), the torch optimizer's state over those partitions, and 1/W of
#    every frozen parameter (``p.ds_tensor``). The working partitions (bf16/fp16/fp32,
#    ``p.ds_tensor``) are copies of the masters and are rebuilt from them on load, as DeepSpeed's
#    own load does.
# 2. A step directory of a ZeRO-3 model holds ``state.json`` (``"optimizer_layout": "zero3"``, the
#    step, W, the torch optimizer's class, the scheduler's state; the weights and the optimizer
#    state are not in it) + ``state.safetensors`` (the persistent buffers, whole on every rank),
#    ``config.json`` for an HF model, and per rank ``rank{r}.json`` (RNG, data position) and
#    ``zero{r}.json`` + ``zero{r}.safetensors``: its data-parallel rank and W, the names and shapes
#    of the parameters of each sub-group (the partition layout), its fp32 partitions, the torch
#    optimizer's ``state_dict`` over them, the loss scaler's numbers, its frozen partitions and the
#    engine's step counters (when the engine was passed). JSON + safetensors: nothing is pickled.
# 3. Save: each rank writes its own files; no collective besides the agreement that closes the
#    phase (checkpoint._agree), so a rank that fails (a full disk, a file-size limit) fails every
#    rank with a MemoError and the commit never happens; a save killed at any moment leaves
#    ``latest.json`` naming the previous complete checkpoint.
# 4. Load: read and check every file (``state.json``, this rank's rank and zero files) against the
#    live engine: the same W and data-parallel rank, the same sub-groups of parameters (names and
#    shapes), the fp32 partitions' shapes and dtypes, the torch optimizer's class, param groups,
#    hyperparameter types and state keys and shapes (NOTE [ Checked loads ]), the loss scaler's
#    class and field types, finite values everywhere; agree; only then apply: partition every
#    parameter (``checkpoint_event_prologue``), hand the ZeRO optimizer its state through its
#    ``load_state_dict`` (fp32 masters, torch state, working partitions rebuilt from the masters),
#    copy the frozen partitions and buffers, gather the persistent parameters again
#    (``checkpoint_event_epilogue``), restore the engine's counters, the scheduler and the RNG.
#    A failed load changes nothing on any rank.
# 5. Same W only (as DeepSpeed's own non-universal checkpoints): each rank's partitions, RNG and
#    data position are its own. ZeRO stages 1 and 2 keep whole weights but partitioned optimizer
#    state in another layout; memo refuses them (DeepSpeed's ``engine.save_checkpoint`` saves them).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from memo.errors import MemoError

_WHO = "memo.checkpoint"
LAYOUT = "zero3"
PARTITION_FORMAT = "memo-zero3-partition"


def is_zero3(module: torch.nn.Module) -> bool:
    """Whether ``module``'s parameters are partitioned by DeepSpeed ZeRO stage 3."""
    return any(hasattr(p, "ds_id") and hasattr(p, "ds_tensor") for p in module.parameters())


def zero_optimizer(optimizer, engine):
    """The ZeRO-3 optimizer ``deepspeed.initialize`` returned (checked), whose state the checkpoint holds."""
    if (type(optimizer).__name__ != "DeepSpeedZeroOptimizer_Stage3"
            or not hasattr(optimizer, "fp32_partitioned_groups_flat")):
        raise MemoError(f"{_WHO}: the model is partitioned by DeepSpeed ZeRO-3 but the optimizer is "
                        f"{type(optimizer).__name__}, not the engine's ZeRO-3 optimizer; pass the optimizer "
                        f"deepspeed.initialize returned "
                        f"(engine.optimizer), which holds the partitions and their optimizer state")
    if engine is not None and engine.optimizer is not optimizer:
        raise MemoError(f"{_WHO}: optimizer is not this engine's optimizer; pass engine.optimizer")
    if getattr(optimizer, "swap_optimizer", False) or getattr(optimizer, "params_in_nvme_swapper", False):
        raise MemoError(f"{_WHO}: the ZeRO-3 optimizer swaps to NVMe (offload_optimizer/offload_param device "
                        f"'nvme'); memo's checkpoints do not read swapped state. Offload to 'cpu', or use DeepSpeed's "
                        f"engine.save_checkpoint")
    return optimizer


def _names(module) -> dict:
    return {id(p): n for n, p in module.named_parameters(remove_duplicate=False)}


def _layout(module, optimizer) -> list:
    """The parameters of each sub-group as [name, whole shape] (NOTE [ ZeRO-3 checkpoints ] rule 2)."""
    names = _names(module)
    return [[[names.get(id(p), "?"), list(p.ds_shape)] for p in group] for group in optimizer.fp16_groups]


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


_COUNTERS = ("global_steps", "global_samples", "micro_steps", "skipped_steps")


def write_partition(tmp: str, rank: int, module, optimizer, engine) -> None:
    """This rank's ``zero{r}.json`` + ``.safetensors`` (NOTE [ ZeRO-3 checkpoints ] rule 2)."""
    import torch.distributed as dist

    from memo.integrations.checkpoint import _Encoder, _write, class_name
    from deepspeed.checkpoint.constants import FP32_FLAT_GROUPS, OPTIMIZER_STATE_DICT
    sd = optimizer.state_dict()
    if sd.get("ds_zero_partition_groups") is not None:
        raise MemoError(f"{_WHO}: the ZeRO-3 optimizer partitions expert groups (AutoEP); memo's checkpoints do "
                        f"not handle them, use DeepSpeed's engine.save_checkpoint")
    enc = _Encoder()
    partition = {
        "format": PARTITION_FORMAT, "rank": rank,
        "dp_rank": dist.get_rank(group=optimizer.dp_process_group),
        "dp_world": dist.get_world_size(group=optimizer.dp_process_group),
        "layout": _layout(module, optimizer),
        "fp32_flat_groups": enc(list(sd[FP32_FLAT_GROUPS]), "fp32_flat_groups"),
        "optimizer": enc(sd[OPTIMIZER_STATE_DICT], "optimizer"),
        "loss_scaler": {"class": class_name(optimizer.loss_scaler), "fields": _scaler_fields(optimizer.loss_scaler)},
        "dynamic_loss_scale": bool(sd["dynamic_loss_scale"]), "overflow": bool(sd["overflow"]),
        "frozen": enc(_frozen(module), "frozen"),
        "engine": None if engine is None else {k: getattr(engine, k) for k in _COUNTERS},
    }
    _write(partition_file(tmp, rank), partition, enc.tensors)


def partition_file(directory: str, rank: int) -> str:
    return os.path.join(directory, f"zero{rank}.json")


# --- load (NOTE [ ZeRO-3 checkpoints ] rule 4) ----------------------------------------------------
def _fail(file: str, field: str, problem: str) -> MemoError:
    return MemoError(f"{_WHO}: {file}: field {field} {problem}; the file was edited, is corrupt or belongs to "
                     f"another model, optimizer or world size; build the engine of the saved run (same model, "
                     f"optimizer, ZeRO config and number of processes) or resume from another checkpoint")


def read_and_check(directory: str, module, optimizer, engine, rank: int) -> dict:
    """This rank's partition file read and checked against the live engine; nothing changed."""
    import torch.distributed as dist

    from deepspeed.checkpoint.constants import FP32_FLAT_GROUPS
    from memo.integrations.checkpoint import _read, class_name
    from memo.integrations.checkpoint_checks import check_like, check_optimizer, check_plain
    file = partition_file(directory, rank)
    saved = _read(file)
    if not isinstance(saved, dict) or saved.get("format") != PARTITION_FORMAT:
        raise _fail(file, "format", f"is not {PARTITION_FORMAT!r}")
    keys = {"rank", "dp_rank", "dp_world", "layout", "fp32_flat_groups", "optimizer", "loss_scaler",
            "dynamic_loss_scale", "overflow", "frozen", "engine"}
    if keys - set(saved):
        raise _fail(file, sorted(keys - set(saved))[0], "is missing")
    live_dp = (dist.get_rank(group=optimizer.dp_process_group), dist.get_world_size(group=optimizer.dp_process_group))
    if saved["rank"] != rank or (saved["dp_rank"], saved["dp_world"]) != live_dp:
        raise _fail(file, "rank/dp_rank/dp_world", f"is {saved['rank']!r}/{saved['dp_rank']!r}/{saved['dp_world']!r}, "
                    f"this process {rank}/{live_dp[0]}/{live_dp[1]}")
    if saved["layout"] != _layout(module, optimizer):
        raise _fail(file, "layout", "lists other parameters (names or shapes) in the ZeRO sub-groups than this "
                    "engine's")
    live = optimizer.state_dict()   # references to the live partitions and state, no copies
    check_like(saved["fp32_flat_groups"], list(live[FP32_FLAT_GROUPS]), file, "fp32_flat_groups")
    optimizer._set_fp32_optimizer_param_groups()   # the torch optimizer's groups over the fp32 partitions
    try:
        check_optimizer(optimizer.optimizer, saved["optimizer"], None, file)
    finally:
        optimizer._clear_fp32_optimizer_param_groups()
    for group in saved["optimizer"]["state"].values():
        for key, value in group.items():
            if isinstance(value, torch.Tensor) and value.dim() == 0 and not bool(torch.isfinite(value)):
                raise _fail(file, f"optimizer/state/.../{key}", "is not finite")
    scaler = saved["loss_scaler"]
    if not isinstance(scaler, dict) or scaler.get("class") != class_name(optimizer.loss_scaler) \
            or not isinstance(scaler.get("fields"), dict):
        raise _fail(file, "loss_scaler/class", f"is {scaler.get('class') if isinstance(scaler, dict) else scaler!r}, "
                    f"this engine's loss scaler a {class_name(optimizer.loss_scaler)}")
    live_fields = _scaler_fields(optimizer.loss_scaler)
    if set(scaler["fields"]) != set(live_fields):
        raise _fail(file, "loss_scaler/fields", f"has {sorted(scaler['fields'])}, this loss scaler "
                    f"{sorted(live_fields)}")
    for key, value in live_fields.items():
        if value is None:
            check_plain(scaler["fields"][key], file, f"loss_scaler/fields/{key}")
        else:
            check_like(scaler["fields"][key], value, file, f"loss_scaler/fields/{key}")
    for key in ("dynamic_loss_scale", "overflow"):
        check_like(saved[key], bool(live[key]), file, key)
    frozen = _frozen(module)
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


def apply(saved: dict, buffers: dict, module, optimizer, engine) -> None:
    """Hand every checked state to the live engine (NOTE [ ZeRO-3 checkpoints ] rule 4)."""
    import torch.distributed as dist

    from deepspeed.checkpoint.constants import FP32_FLAT_GROUPS, LOSS_SCALER, OPTIMIZER_STATE_DICT
    optimizer.checkpoint_event_prologue()   # every parameter partitioned
    for key, value in saved["loss_scaler"]["fields"].items():
        setattr(optimizer.loss_scaler, key, value)
    state = {LOSS_SCALER: optimizer.loss_scaler, "dynamic_loss_scale": saved["dynamic_loss_scale"],
             "overflow": saved["overflow"], OPTIMIZER_STATE_DICT: saved["optimizer"],
             FP32_FLAT_GROUPS: saved["fp32_flat_groups"]}
    # load_state_dict takes every data-parallel rank's state and reads its own: the list's entry at this rank.
    optimizer.load_state_dict([state] * dist.get_world_size(group=optimizer.dp_process_group),
                              load_optimizer_states=True)
    with torch.no_grad():
        for name, t in _frozen(module).items():
            t.copy_(saved["frozen"][name])
        for name, b in persistent_buffers(module).items():
            b.copy_(buffers[name])
    optimizer.checkpoint_event_epilogue()   # persistent parameters gathered again
    if engine is not None and saved["engine"] is not None:
        for key in _COUNTERS:
            setattr(engine, key, saved["engine"][key])


# --- export --------------------------------------------------------------------------------------
def gathered_state_dict(module) -> dict | None:
    """The whole weights on rank 0's CPU (None elsewhere), gathered one module at a time, so no rank ever
    holds more than one module's whole parameters besides rank 0's copy. A collective."""
    import deepspeed
    import torch.distributed as dist
    rank = dist.get_rank()
    out, by_id = ({} if rank == 0 else None), {}

    def visit(m, prefix: str) -> None:
        params = list(m.parameters(recurse=False))
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            if rank == 0:
                for name, p in m.named_parameters(recurse=False):
                    if p.ds_id in by_id:   # tied: the same tensor under both keys, as save_pretrained expects
                        out[prefix + name] = by_id[p.ds_id]
                    else:
                        out[prefix + name] = by_id[p.ds_id] = p.detach().cpu().clone()
                for name, b in m.named_buffers(recurse=False):
                    if b is not None and name not in m._non_persistent_buffers_set:
                        out[prefix + name] = b.detach().cpu().clone()
        for name, child in m.named_children():
            visit(child, f"{prefix}{name}.")
    visit(module, "")
    return out
