"""Resumable training checkpoints without pickle: weights, optimizer, scheduler, RNG and data position.

    save_checkpoint(path, model=model, optimizer=opt, scheduler=sched, step=step, data_state={"cursor": c})
    ...
    state = load_checkpoint(path, model=model, optimizer=opt, scheduler=sched)   # fresh objects
    step, data_state = state["step"], state["data_state"]

A run resumed this way continues with bit-identical losses in fp32 on CPU (same world size, same
thread count): the weights, the optimizer's and scheduler's states, every RNG a training loop
draws from and the caller's data position come back exactly. Works on a memo-wrapped model (memo
adds no parameters or buffers, so the weights have the plain model's keys), under DDP and under
memo's sequence parallelism; call both functions on every rank.

# NOTE [ Checkpoint layout ]
#
# 1. ``model.safetensors`` (and ``config.json`` for an HF model): the weights, written by rank 0
#    with safetensors' ``save_model`` (tied weights stored once) under the plain model's keys.
# 2. ``state.json`` + ``state.safetensors``, written by rank 0: step, world size, the optimizer's
#    and the scheduler's ``state_dict``. Under data and sequence parallelism (DDP, memo.parallel)
#    every rank holds the same weights and, after the gradient all-reduce, the same optimizer and
#    scheduler state, so one copy serves all. ZeRO / FSDP shard them instead: refused.
# 3. ``rank{r}.json`` + ``rank{r}.safetensors``, written by every rank: its RNG states (torch CPU,
#    CUDA when available, python ``random``, numpy) and its ``data_state``. These differ per rank:
#    each process draws its own dropout masks, noise and samples (under sequence parallelism each
#    rank draws for its own tokens), and each data-parallel replica has its own data position.
# 4. Nothing is pickled. JSON holds the structure, with tuples, dicts with non-string keys and
#    tensors marked (``__memo_tuple__``, ``__memo_items__``, ``__memo_tensor__``: a name in the
#    safetensors file beside it); Python floats are written with repr, so they round-trip exactly.
# 5. Order: rank 0 removes an old ``state.json``; barrier; every rank writes its rank files; rank
#    0 writes the weights, ``state.safetensors`` and last ``state.json``; barrier. Every file goes
#    through a temporary name and ``os.replace``. Without ``state.json`` a directory is an
#    incomplete checkpoint and ``load_checkpoint`` refuses it.
"""

from __future__ import annotations

import json
import os
import random
import warnings
from typing import Any

import torch

from memo.errors import MemoError

_WHO = "memo.checkpoint"
FORMAT = "memo-checkpoint"
VERSION = 1
WEIGHTS = "model.safetensors"
STATE = "state.json"
STATE_TENSORS = "state.safetensors"
_TENSOR, _TUPLE, _ITEMS = "__memo_tensor__", "__memo_tuple__", "__memo_items__"


# --- structure <-> JSON + tensors (rule 4) -------------------------------------------------------
class _Encoder:
    """Turns a state (dicts, lists, tuples, numbers, strings, tensors) into JSON and named tensors."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self._storages: set = set()

    def __call__(self, obj: Any, where: str) -> Any:
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        if isinstance(obj, torch.Tensor):
            t = obj.detach().cpu().contiguous()
            if t.untyped_storage().data_ptr() in self._storages:
                t = t.clone()   # safetensors refuses tensors that share memory
            self._storages.add(t.untyped_storage().data_ptr())
            name = where
            while name in self.tensors:
                name += "'"
            self.tensors[name] = t
            return {_TENSOR: name}
        if isinstance(obj, tuple):
            return {_TUPLE: [self(v, f"{where}/{i}") for i, v in enumerate(obj)]}
        if isinstance(obj, list):
            return [self(v, f"{where}/{i}") for i, v in enumerate(obj)]
        if isinstance(obj, dict):
            if any(k in (_TENSOR, _TUPLE, _ITEMS) for k in obj):
                raise MemoError(f"{_WHO}: {where} has a key among {(_TENSOR, _TUPLE, _ITEMS)}, which the checkpoint "
                                f"format reserves; rename it")
            if all(isinstance(k, str) for k in obj):
                return {k: self(v, f"{where}/{k}") for k, v in obj.items()}
            bad = [k for k in obj if not (k is None or isinstance(k, (bool, int, float, str)))]
            if bad:
                raise MemoError(f"{_WHO}: {where} has a key {bad[0]!r} of type {type(bad[0]).__name__}; checkpoint "
                                f"dict keys must be str, int, float, bool or None")
            return {_ITEMS: [[k, self(v, f"{where}/{k}")] for k, v in obj.items()]}
        item = getattr(obj, "item", None)   # numpy scalars
        if callable(item) and type(obj).__module__ == "numpy" and getattr(obj, "ndim", 1) == 0:
            return item()
        raise MemoError(f"{_WHO}: {where} is a {type(obj).__name__}, which a checkpoint cannot hold without pickle; "
                        f"use tensors, numbers, strings, lists, tuples and dicts")


def _decode(obj: Any, tensors: dict) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if _TENSOR in obj:
            return tensors[obj[_TENSOR]]
        if _TUPLE in obj:
            return tuple(_decode(v, tensors) for v in obj[_TUPLE])
        if _ITEMS in obj:
            return {k: _decode(v, tensors) for k, v in obj[_ITEMS]}
        return {k: _decode(v, tensors) for k, v in obj.items()}
    return obj


def _write(path: str, structure: dict, tensors: dict) -> None:
    """``path`` (.json) and its tensors (.safetensors beside it), each through a temporary name."""
    from safetensors.torch import save_file
    tensor_path = path[:-len(".json")] + ".safetensors"
    save_file(tensors, tensor_path + ".tmp", metadata={"format": "pt"})
    os.replace(tensor_path + ".tmp", tensor_path)
    with open(path + ".tmp", "w") as f:
        json.dump(structure, f, indent=1)
    os.replace(path + ".tmp", path)


def _read(path: str) -> Any:
    from safetensors.torch import load_file
    tensor_path = path[:-len(".json")] + ".safetensors"
    for p in (path, tensor_path):
        if not os.path.isfile(p):
            raise MemoError(f"{_WHO}: {p} is missing; the checkpoint is incomplete or was written by another "
                            f"number of processes")
    with open(path) as f:
        structure = json.load(f)
    return _decode(structure, load_file(tensor_path))


# --- RNG (rule 3) --------------------------------------------------------------------------------
def rng_state() -> dict:
    """This process's RNG states: torch CPU, CUDA (all visible devices), python ``random``, numpy."""
    import numpy as np
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached))}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    saved_cuda = state.get("cuda")
    if saved_cuda is not None and torch.cuda.is_available():
        if len(saved_cuda) != torch.cuda.device_count():
            warnings.warn(f"{_WHO}: the checkpoint has CUDA RNG states for {len(saved_cuda)} devices, this process "
                          f"sees {torch.cuda.device_count()}; restoring the first ones (the resumed run may differ)",
                          stacklevel=3)
        for i, s in enumerate(saved_cuda[:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)
    elif saved_cuda is not None:
        warnings.warn(f"{_WHO}: the checkpoint has CUDA RNG states but CUDA is not available here; skipping them",
                      stacklevel=3)


# --- helpers -------------------------------------------------------------------------------------
def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _plain_module(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose weights are saved: DDP's inner module; sharded wrappers refused (rule 2)."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel
    if not isinstance(model, torch.nn.Module):
        raise MemoError(f"{_WHO}: model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, (DistributedDataParallel, DataParallel)):
        model = model.module
    kind = type(model).__name__
    if kind in ("DeepSpeedEngine", "FullyShardedDataParallel") or any(
            type(p).__name__ == "DTensor" or hasattr(p, "ds_id") for p in model.parameters()):
        raise MemoError(f"{_WHO}: the model's parameters are sharded ({kind}, DeepSpeed ZeRO or FSDP); one rank "
                        f"cannot save them. Use that framework's own checkpointing")
    return model


def _rank_file(path: str, rank: int) -> str:
    return os.path.join(path, f"rank{rank}.json")


# --- API -----------------------------------------------------------------------------------------
def save_checkpoint(path: str, *, model: torch.nn.Module, optimizer, scheduler=None, step: int,
                    data_state: Any = None) -> None:
    """Write a resumable checkpoint of this training state to directory ``path``. Call on every rank.

    ``data_state``: where this rank's data stream stands (a cursor, an epoch and index, a sampler's
    generator state): numbers, strings, tensors, lists, tuples and dicts. See NOTE [ Checkpoint layout ].
    """
    from safetensors.torch import save_model
    if isinstance(step, bool) or not isinstance(step, int):
        raise MemoError(f"{_WHO}: step={step!r} must be an int (the number of optimizer steps taken)")
    module = _plain_module(model)
    rank, world = _rank_world()
    os.makedirs(path, exist_ok=True)
    if rank == 0 and os.path.exists(os.path.join(path, STATE)):
        os.remove(os.path.join(path, STATE))   # incomplete until rewritten (rule 5)
    _barrier()

    enc = _Encoder()
    mine = {"rank": rank, "rng": enc(rng_state(), "rng"), "data_state": enc(data_state, "data_state")}
    _write(_rank_file(path, rank), mine, enc.tensors)
    if rank == 0:
        save_model(module, os.path.join(path, WEIGHTS + ".tmp"), metadata={"format": "pt"})
        os.replace(os.path.join(path, WEIGHTS + ".tmp"), os.path.join(path, WEIGHTS))
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "save_pretrained"):
            config.save_pretrained(path)
        enc = _Encoder()
        state = {"format": FORMAT, "version": VERSION, "step": step, "world_size": world,
                 "optimizer": enc(optimizer.state_dict(), "optimizer"),
                 "scheduler": None if scheduler is None else enc(scheduler.state_dict(), "scheduler")}
        _write(os.path.join(path, STATE), state, enc.tensors)
    _barrier()


def load_checkpoint(path: str, *, model: torch.nn.Module, optimizer, scheduler=None) -> dict:
    """Restore a checkpoint written by ``save_checkpoint`` into these objects. Call on every rank.

    Loads the weights into ``model`` (wrapped by memo or not, the same keys), the optimizer's and
    scheduler's states, and this rank's RNG states. Returns ``{"step": int, "data_state": ...}``
    (this rank's data position, as given to ``save_checkpoint``).
    """
    from safetensors.torch import load_model
    state_path = os.path.join(path, STATE)
    if not os.path.isfile(state_path):
        raise MemoError(f"{_WHO}: {state_path} does not exist: {path!r} is not a checkpoint, or its save did not "
                        f"finish; resume from an earlier checkpoint")
    state = _read(state_path)
    if state.get("format") != FORMAT or state.get("version") != VERSION:
        raise MemoError(f"{_WHO}: {state_path} is not a {FORMAT} version {VERSION} (format {state.get('format')!r}, "
                        f"version {state.get('version')!r})")
    rank, world = _rank_world()
    if state["world_size"] != world:
        raise MemoError(f"{_WHO}: the checkpoint was written by {state['world_size']} processes and is loaded by "
                        f"{world}; every rank's RNG and data position are saved separately, so resume with "
                        f"{state['world_size']} processes")
    module = _plain_module(model)
    try:
        load_model(module, os.path.join(path, WEIGHTS), strict=True)
    except (RuntimeError, FileNotFoundError, OSError) as e:
        raise MemoError(f"{_WHO}: the weights in {path} do not fit this model: {e}. Build the model with the "
                        f"configuration it was trained with") from e
    try:
        optimizer.load_state_dict(state["optimizer"])
    except (ValueError, KeyError) as e:
        raise MemoError(f"{_WHO}: the optimizer state in {path} does not fit this optimizer: {e}. Build the "
                        f"optimizer over the same parameters and param groups as in the saved run") from e
    if scheduler is not None:
        if state["scheduler"] is None:
            raise MemoError(f"{_WHO}: {path} was saved without a scheduler, and one was passed to load; pass "
                            f"scheduler=None or save with the scheduler")
        scheduler.load_state_dict(state["scheduler"])
    elif state["scheduler"] is not None:
        warnings.warn(f"{_WHO}: {path} has a scheduler state but no scheduler was passed; it is not restored",
                      stacklevel=2)
    mine = _read(_rank_file(path, rank))
    set_rng_state(mine["rng"])   # last: nothing after it may draw random numbers
    return {"step": state["step"], "data_state": mine["data_state"]}
