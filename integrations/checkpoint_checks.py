"""Checks of a checkpoint's files against the live model, optimizer and scheduler, before anything changes.

# NOTE [ Checked loads ]
#
# 1. ``read_and_check`` reads every file of the step directory whole (state, weights, this rank's
#    RNG states and data position) and checks it against the live objects; only ``apply`` changes
#    them. Between the two the ranks agree that all of them passed (checkpoint._agree), so a load
#    that fails on any rank leaves every rank's model, optimizer and scheduler exactly as they were.
# 2. Every problem is a MemoError naming the file and the field (``optimizer/param_groups/0/lr``),
#    raised ``from`` the exception it wraps (safetensors, JSON, numpy, random).
# 3. Checked: the format and version; ``step`` an int >= 0; the world size; the weights' keys (a
#    key may be absent from the file only when tied to one present), shapes and dtypes against the
#    model; the optimizer's class, its param-group count and sizes, each hyperparameter against the
#    live group's (a number must be a finite number, a flag a bool, a tuple as long), the state keys
#    of each parameter against those its class keeps (torch.optim's classes) and the state tensors'
#    shapes against the parameters'; the scheduler's class, keys and value types; the RNG states
#    (each set on a scratch generator first); this rank's number.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass
from itertools import chain
from typing import Any

import torch

from memo.errors import MemoError
from memo.integrations.checkpoint import (FORMAT, STATE, VERSION, WEIGHTS, _WHO, _rank_file, _read, class_name,
                                          read_tensors)

_ADAM = {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
# Per-parameter state keys of torch.optim's classes (their step() writes no others), and whether every
# non-scalar state tensor has the parameter's shape. tests/test_checkpoint.py checks this table.
STATE_KEYS = {
    "SGD": {"momentum_buffer"}, "Adam": _ADAM, "AdamW": _ADAM, "Adagrad": {"step", "sum"},
    "Adadelta": {"step", "square_avg", "acc_delta"}, "Adamax": {"step", "exp_avg", "exp_inf"},
    "NAdam": {"step", "mu_product", "exp_avg", "exp_avg_sq"}, "RAdam": {"step", "exp_avg", "exp_avg_sq"},
    "RMSprop": {"step", "square_avg", "momentum_buffer", "grad_avg"}, "Rprop": {"step", "prev", "step_size"},
    "ASGD": {"step", "eta", "mu", "ax"}, "Muon": {"momentum_buffer"},
}


@dataclass
class Loaded:
    """Everything a load restores, read and checked (NOTE [ Checked loads ] rule 1)."""
    step: int
    weights: dict
    optimizer: dict
    scheduler: Any
    rng: dict
    data_state: Any


def _fail(file: str, field: str, problem: str, fix: str) -> MemoError:
    return MemoError(f"{_WHO}: {file}: field {field} {problem}; {fix}")


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _number_text(x: Any) -> str:
    return repr(x) if not isinstance(x, torch.Tensor) else f"tensor {x.tolist()!r}"


def check_like(saved: Any, live: Any, file: str, field: str) -> None:
    """``saved`` may replace ``live``: the same kind of value (numbers finite unless ``live`` is not)."""
    fix = "the file was edited or belongs to another optimizer / scheduler; resume from another checkpoint"
    if isinstance(live, bool):
        if not isinstance(saved, bool):
            raise _fail(file, field, f"is {saved!r}, not a bool like this object's {live!r}", fix)
    elif _is_number(live):
        if not _is_number(saved):
            raise _fail(file, field, f"is {saved!r}, not a number like this object's {live!r}", fix)
        if not math.isfinite(saved) and not (not math.isfinite(live) and saved == live):
            raise _fail(file, field, f"is {saved!r}, not a finite number", fix)
    elif isinstance(live, str):
        if not isinstance(saved, str):
            raise _fail(file, field, f"is {saved!r}, not a string like this object's {live!r}", fix)
    elif isinstance(live, torch.Tensor):
        if not isinstance(saved, torch.Tensor) or saved.shape != live.shape or saved.dtype != live.dtype:
            got = (f"a {saved.dtype} tensor of shape {tuple(saved.shape)}" if isinstance(saved, torch.Tensor)
                   else repr(saved))
            raise _fail(file, field, f"is {got}, not a {live.dtype} tensor of shape {tuple(live.shape)}", fix)
        if saved.is_floating_point() and not bool(torch.isfinite(saved).all()):
            raise _fail(file, field, f"is {_number_text(saved)}, not finite", fix)
    elif isinstance(live, (list, tuple)):
        if not isinstance(saved, (list, tuple)) or len(saved) != len(live):
            raise _fail(file, field, f"is {saved!r}, not a sequence of {len(live)} like this object's", fix)
        for i, (s, v) in enumerate(zip(saved, live)):
            check_like(s, v, file, f"{field}/{i}")
    elif isinstance(live, dict):
        if not isinstance(saved, dict):
            raise _fail(file, field, f"is {saved!r}, not a mapping like this object's", fix)
        for k in saved.keys() & live.keys():
            check_like(saved[k], live[k], file, f"{field}/{k}")
    elif live is None:
        check_plain(saved, file, field)


def check_plain(saved: Any, file: str, field: str) -> None:
    """A value with nothing live to compare against: finite numbers, recursively."""
    if _is_number(saved) and not math.isfinite(saved):
        raise _fail(file, field, f"is {saved!r}, not a finite number", "the file was edited; resume from another "
                    "checkpoint")
    if isinstance(saved, (list, tuple)):
        for i, v in enumerate(saved):
            check_plain(v, file, f"{field}/{i}")


def check_header(state: Any, file: str, world: int) -> int:
    """The format, version, step and world size of ``state.json``; returns the step."""
    fix = "the file was edited or is not memo's; resume from another checkpoint"
    if not isinstance(state, dict):
        raise _fail(file, "(top)", f"is a {type(state).__name__}, not a mapping", fix)
    for key in ("format", "version", "step", "world_size", "optimizer", "scheduler"):
        if key not in state:
            raise _fail(file, key, "is missing", fix)
    if state["format"] != FORMAT or state["version"] != VERSION:
        raise _fail(file, "format/version", f"is {state['format']!r} version {state['version']!r}, not {FORMAT} "
                    f"version {VERSION}", fix)
    step = state["step"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise _fail(file, "step", f"is {step!r}, not an int >= 0", fix)
    saved_world = state["world_size"]
    if isinstance(saved_world, bool) or not isinstance(saved_world, int) or saved_world < 1:
        raise _fail(file, "world_size", f"is {saved_world!r}, not an int >= 1", fix)
    if saved_world != world:
        raise MemoError(f"{_WHO}: the checkpoint was written by {saved_world} processes and is loaded by {world} "
                        f"({file}: field world_size); every rank's RNG and data position are saved separately, so "
                        f"resume with {saved_world} processes")
    return step


def check_weights(module: torch.nn.Module, tensors: dict, file: str) -> dict:
    """The full state dict to load: the file's tensors (checked) plus the tied keys stored once."""
    fix = "Build the model with the configuration (and dtype) it was trained with"
    live = module.state_dict()

    def ident(t: torch.Tensor) -> tuple:
        return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.device)
    present = {ident(t): k for k, t in live.items() if k in tensors and isinstance(t, torch.Tensor)}
    unexpected = sorted(set(tensors) - set(live))
    missing = sorted(k for k, t in live.items() if k not in tensors
                     and not (isinstance(t, torch.Tensor) and t.numel() and ident(t) in present))
    if unexpected or missing:
        raise MemoError(f"{_WHO}: the weights in {file} do not fit this model: keys missing from the file "
                        f"{missing[:5]}{' ...' if len(missing) > 5 else ''}, keys the model lacks "
                        f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}. {fix}")
    for k, t in tensors.items():
        if t.shape != live[k].shape or t.dtype != live[k].dtype:
            raise MemoError(f"{_WHO}: the weights in {file} do not fit this model: field {k} is a {t.dtype} tensor of "
                            f"shape {tuple(t.shape)}, the model's a {live[k].dtype} one of shape "
                            f"{tuple(live[k].shape)}. {fix}")
    return {k: tensors[k] if k in tensors else tensors[present[ident(t)]] for k, t in live.items()}


def _inner_optimizer(optimizer):
    """Accelerate's AcceleratedOptimizer (and the like) hold the real one in ``.optimizer``."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def check_optimizer(optimizer, saved: Any, saved_class: Any, file: str) -> None:
    fix = ("build the optimizer of the saved run (its class, over the same parameters and param groups), or resume "
           "from another checkpoint")
    inner = _inner_optimizer(optimizer)
    if saved_class is not None and saved_class not in (class_name(optimizer), class_name(inner)):
        raise _fail(file, "optimizer_class", f"is {saved_class!r}: the optimizer state in {file} does not fit this "
                    f"optimizer ({class_name(inner)})", fix)
    if not isinstance(saved, dict) or not {"state", "param_groups"} <= set(saved):
        raise _fail(file, "optimizer", "is not an optimizer state_dict (keys 'state' and 'param_groups')", fix)
    groups, live_groups = saved["param_groups"], optimizer.state_dict()["param_groups"]
    if not isinstance(groups, list) or len(groups) != len(live_groups):
        n = len(groups) if isinstance(groups, list) else repr(groups)
        raise _fail(file, "optimizer/param_groups", f"has {n} param groups, this optimizer {len(live_groups)}: the "
                    f"optimizer state does not fit this optimizer", fix)
    for i, (g, lg) in enumerate(zip(groups, live_groups)):
        where = f"optimizer/param_groups/{i}"
        if not isinstance(g, dict) or not isinstance(g.get("params"), list):
            raise _fail(file, where, "is not a param group (a mapping with 'params')", fix)
        if len(g["params"]) != len(lg["params"]) or not all(
                isinstance(p, int) and not isinstance(p, bool) for p in g["params"]):
            raise _fail(file, f"{where}/params", f"holds {len(g['params'])} parameter ids, this optimizer's group "
                        f"{len(lg['params'])}: the optimizer state does not fit this optimizer", fix)
    ids = list(chain.from_iterable(g["params"] for g in groups))
    if len(set(ids)) != len(ids):
        raise _fail(file, "optimizer/param_groups", "lists a parameter id twice", fix)
    params = dict(zip(ids, chain.from_iterable(g["params"] for g in optimizer.param_groups)))
    _check_optimizer_state(saved["state"], params, inner, file, fix)
    for i, (g, lg) in enumerate(zip(groups, live_groups)):
        where = f"optimizer/param_groups/{i}"
        for key, value in lg.items():
            if key in ("params", "param_names"):
                continue
            if key in g:
                check_like(g[key], value, file, f"{where}/{key}")
            elif _is_number(value) or isinstance(value, (torch.Tensor, tuple)):
                raise _fail(file, f"{where}/{key}", "is missing (a hyperparameter this optimizer has)", fix)
        for key in g.keys() - lg.keys():
            check_plain(g[key], file, f"{where}/{key}")


def _check_optimizer_state(state: Any, params: dict, inner, file: str, fix: str) -> None:
    """Per-parameter states: known parameter ids, the keys the class keeps, shapes, finite values."""
    if not isinstance(state, dict):
        raise _fail(file, "optimizer/state", "is not a mapping from parameter ids to states", fix)
    allowed = STATE_KEYS.get(type(inner).__name__) if type(inner).__module__.startswith("torch.optim") else None
    for pid, st in state.items():
        where = f"optimizer/state/{pid}"
        if pid not in params:
            raise _fail(file, where, f"is the state of parameter id {pid!r}, which no param group lists", fix)
        if not isinstance(st, dict):
            raise _fail(file, where, "is not a mapping", fix)
        if allowed is not None and set(st) - allowed:
            raise _fail(file, where, f"holds {sorted(set(st) - allowed)}, state that {type(inner).__name__} does not "
                        f"keep (the state of another optimizer class, e.g. AdamW's loaded into SGD)", fix)
        for key, v in st.items():
            if isinstance(v, torch.Tensor):
                if allowed is not None and v.dim() > 0 and v.shape != params[pid].shape:
                    raise _fail(file, f"{where}/{key}", f"has shape {tuple(v.shape)}, its parameter "
                                f"{tuple(params[pid].shape)}", fix)
                if v.is_floating_point() and not bool(torch.isfinite(v).all()):
                    raise _fail(file, f"{where}/{key}", "holds values that are not finite", fix)
            else:
                check_plain(v, file, f"{where}/{key}")


def check_scheduler(scheduler, saved: Any, saved_class: Any, file: str) -> None:
    fix = "build the scheduler of the saved run, or resume from another checkpoint"
    if saved is None:
        raise MemoError(f"{_WHO}: {file} was saved without a scheduler (field scheduler is null), and one was "
                        f"passed to load; pass scheduler=None or save with the scheduler")
    if saved_class is not None and saved_class != class_name(scheduler):
        raise _fail(file, "scheduler_class", f"is {saved_class!r}, this scheduler a {class_name(scheduler)}", fix)
    live = scheduler.state_dict()
    # Private bookkeeping keys (``_is_initial``) come and go with torch versions: they may be absent.
    if not isinstance(saved, dict) or set(saved) - set(live) or {k for k in live if not k.startswith("_")} - set(saved):
        keys = sorted(saved) if isinstance(saved, dict) else repr(saved)
        raise _fail(file, "scheduler", f"has keys {keys}, this scheduler's state {sorted(live)}", fix)
    for key in ("last_epoch", "_step_count"):
        v = saved.get(key, 0)
        if key in saved and (isinstance(v, bool) or not isinstance(v, int) or v < -1):
            raise _fail(file, f"scheduler/{key}", f"is {v!r}, not an int", fix)
    check_like(saved, live, file, "scheduler")


def check_rng(rng: Any, file: str) -> None:
    """Each state set on a scratch generator first: what it refuses, set_rng_state would."""
    import numpy as np
    fix = "the file was edited or is corrupt; resume from another checkpoint"
    if not isinstance(rng, dict) or not {"torch", "python", "numpy"} <= set(rng):
        raise _fail(file, "rng", "is not a mapping with 'torch', 'python' and 'numpy' states", fix)
    try:
        torch.Generator().set_state(rng["torch"])
    except (TypeError, RuntimeError) as e:
        raise _fail(file, "rng/torch", f"is not a torch CPU generator state ({e})", fix) from e
    try:
        random.Random().setstate(rng["python"])
    except (TypeError, ValueError, OverflowError, IndexError) as e:
        raise _fail(file, "rng/python", f"is not a python random state ({e})", fix) from e
    try:
        name, keys, pos, has_gauss, cached = rng["numpy"]
        np.random.RandomState().set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    except (TypeError, ValueError, OverflowError, IndexError) as e:
        raise _fail(file, "rng/numpy", f"is not a numpy random state ({e})", fix) from e
    cuda = rng.get("cuda")
    if cuda is not None and not (isinstance(cuda, list) and all(
            isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.dim() == 1 for t in cuda)):
        raise _fail(file, "rng/cuda", "is not a list of CUDA generator states (uint8 tensors)", fix)


_LAYOUTS = {None: "plain", "dcp": "fsdp2", "zero": "zero"}
_LAYOUT_FIX = {
    "plain": "load it into the model before sharding it (fully_shard or deepspeed.initialize, the optimizer made "
             "after), then save again to get a sharded checkpoint",
    "fsdp2": "shard the model with memo.integrations.fsdp.fully_shard on {w} ranks and make the optimizer before "
             "loading, or load the weights of memo.integrations.checkpoint.export_pretrained",
    "zero": "build the engine with memo.integrations.deepspeed.initialize under ZeRO stage {stage} on {w} ranks and "
            "pass it and engine.optimizer",
}
_LAYOUT_WHAT = {"plain": "holds whole weights and optimizer state (a checkpoint of an unsharded model)",
                "fsdp2": "is a sharded checkpoint (FSDP2, written by {w} ranks; field optimizer_layout 'dcp')",
                "zero": "is a sharded checkpoint (DeepSpeed ZeRO-{stage}, written by {w} ranks; field "
                        "optimizer_layout 'zero')"}
_MODEL_WHAT = {"plain": "not sharded", "fsdp2": "sharded by FSDP2", "zero": "trained by a DeepSpeed ZeRO optimizer"}


def _layout(state: dict, file: str, kind: str) -> None:
    """A checkpoint loads into a model of the kind that wrote it: plain, FSDP2 (NOTE [ Sharded checkpoints ])
    or DeepSpeed ZeRO (NOTE [ ZeRO checkpoints ])."""
    layout = state.get("optimizer_layout")
    if layout not in _LAYOUTS:
        raise _fail(file, "optimizer_layout", f"is {layout!r}, not 'dcp', 'zero' or absent", "the file was edited "
                    "or is not memo's; resume from another checkpoint")
    saved = _LAYOUTS[layout]
    if saved != kind:
        w, stage = state["world_size"], state.get("zero_stage")
        raise MemoError(f"{_WHO}: {file} {_LAYOUT_WHAT[saved].format(w=w, stage=stage)} and the model is "
                        f"{_MODEL_WHAT[kind]}: {_LAYOUT_FIX[saved].format(w=w, stage=stage)}")


def _check_rank_file(directory: str, rank: int) -> dict:
    rank_file = _rank_file(directory, rank)
    mine = _read(rank_file)
    if not isinstance(mine, dict) or mine.get("rank") != rank or "rng" not in mine or "data_state" not in mine:
        raise _fail(rank_file, "rank", f"is {mine.get('rank') if isinstance(mine, dict) else mine!r}, not this "
                    f"rank's {rank} (or rng / data_state are missing)", "the file was edited or moved; resume from "
                    "another checkpoint")
    check_rng(mine["rng"], rank_file)
    return mine


def _check_scheduler_or_warn(scheduler, state: dict, file: str, directory: str) -> None:
    if scheduler is not None:
        check_scheduler(scheduler, state["scheduler"], state.get("scheduler_class"), file)
    elif state["scheduler"] is not None:
        import warnings
        warnings.warn(f"{_WHO}: {directory} has a scheduler state but no scheduler was passed; it is not restored",
                      stacklevel=4)


def read_and_check(directory: str, module, optimizer, scheduler, rank: int, world: int) -> Loaded:
    """NOTE [ Checked loads ] rule 1: every file read and checked; nothing changed."""
    state_file = os.path.join(directory, STATE)
    state = _read(state_file)
    step = check_header(state, state_file, world)
    _layout(state, state_file, "plain")
    weights = check_weights(module, read_tensors(os.path.join(directory, WEIGHTS)), os.path.join(directory, WEIGHTS))
    check_optimizer(optimizer, state["optimizer"], state.get("optimizer_class"), state_file)
    _check_scheduler_or_warn(scheduler, state, state_file, directory)
    mine = _check_rank_file(directory, rank)
    return Loaded(step=step, weights=weights, optimizer=state["optimizer"], scheduler=state["scheduler"],
                  rng=mine["rng"], data_state=mine["data_state"])


def read_and_check_sharded(directory: str, optimizer, scheduler, rank: int, world: int, kind: str = "fsdp2") -> Loaded:
    """The files of a sharded checkpoint other than its shards (NOTE [ Sharded checkpoints ] rule 3, NOTE
    [ ZeRO checkpoints ] rule 4): the header (the same world size), the optimizer's class, the
    scheduler, this rank's RNG and data; for ZeRO ``weights`` holds the saved persistent buffers (stage 3)."""
    state_file = os.path.join(directory, STATE)
    state = _read(state_file)
    step = check_header(state, state_file, world)
    _layout(state, state_file, kind)
    inner = _inner_optimizer(optimizer) if kind == "fsdp2" else optimizer.optimizer
    saved_class = state.get("optimizer_class")
    if saved_class not in (class_name(optimizer), class_name(inner)):
        raise _fail(state_file, "optimizer_class", f"is {saved_class!r}, this optimizer a {class_name(inner)}",
                    "build the optimizer of the saved run, or resume from another checkpoint")
    _check_scheduler_or_warn(scheduler, state, state_file, directory)
    mine = _check_rank_file(directory, rank)
    return Loaded(step=step, weights=state.get("buffers"), optimizer={}, scheduler=state["scheduler"],
                  rng=mine["rng"], data_state=mine["data_state"])


def read_and_check_zero(directory: str, optimizer, scheduler, rank: int, world: int) -> Loaded:
    return read_and_check_sharded(directory, optimizer, scheduler, rank, world, kind="zero")


def apply(loaded: Loaded, module, optimizer, scheduler) -> None:
    """Change the live objects (after every rank's ``read_and_check`` passed)."""
    module.load_state_dict(loaded.weights, strict=True)
    optimizer.load_state_dict(loaded.optimizer)
    if scheduler is not None:
        scheduler.load_state_dict(loaded.scheduler)
