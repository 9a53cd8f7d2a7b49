"""Resumable training checkpoints without pickle: weights, optimizer, scheduler, RNG and data position.

    save_checkpoint(path, model=model, optimizer=opt, scheduler=sched, step=step, data_state={"cursor": c})
    ...
    state = load_checkpoint(path, model=model, optimizer=opt, scheduler=sched)   # fresh objects
    step, data_state = state["step"], state["data_state"]

A run resumed this way continues with bit-identical losses in fp32 on CPU (same world size, same
thread count): the weights, the optimizer's and scheduler's states, every RNG a training loop
draws from and the caller's data position come back exactly. Works on a memo-wrapped model (memo
adds no parameters or buffers, so the weights have the plain model's keys), under DDP, under
memo's sequence parallelism, under FSDP2 (``memo.integrations.fsdp.fully_shard``: each rank
saves its shards through torch.distributed.checkpoint, NOTE [ Sharded checkpoints ] in
checkpoint_sharded.py) and under DeepSpeed ZeRO stages 1-3 (pass the engine and ``engine.optimizer``:
each rank saves its partitions, NOTE [ ZeRO checkpoints ] in checkpoint_zero.py);
``export_pretrained(model, directory)`` writes a sharded model's whole weights as a plain HF model.
Call both functions on every rank. Saving again to the same ``path``
is safe at any moment: a save killed half-way, or stopped by a full disk, leaves the previous
checkpoint loadable (NOTE [ Atomic checkpoint commit ]); a load checks every file before it
changes anything (NOTE [ Checked loads ] in checkpoint_checks.py).

# NOTE [ Checkpoint layout ]
#
# 1. ``path`` is a checkpoint root. ``latest.json`` names its current checkpoint, a directory
#    ``step-000000123`` (the step, 9 digits or more; ``-1``, ``-2`` ... when a step is saved again)
#    beside the previous ones (the last ``keep``, oldest first, listed in ``latest.json``).
#    ``load_checkpoint(path)`` reads the directory ``latest.json`` names and nothing else.
# 2. In a step directory: ``model.safetensors`` (and ``config.json`` for an HF model), the weights,
#    written by rank 0 with safetensors' ``save_model`` (tied weights stored once) under the plain
#    model's keys.
# 3. ``state.json`` + ``state.safetensors``, written by rank 0: step, world size, the optimizer's
#    and the scheduler's class and ``state_dict``. Under data and sequence parallelism (DDP,
#    memo.parallel) every rank holds the same weights and, after the gradient all-reduce, the same
#    optimizer and scheduler state, so one copy serves all. FSDP2 and DeepSpeed ZeRO shard them
#    instead: their step directories hold DCP shards (NOTE [ Sharded checkpoints ] in
#    checkpoint_sharded.py) or every rank's partitions (NOTE [ ZeRO checkpoints ] in
#    checkpoint_zero.py); FSDP1: refused.
# 4. ``rank{r}.json`` + ``rank{r}.safetensors``, written by every rank: its RNG states (torch CPU,
#    CUDA when available, python ``random``, numpy) and its ``data_state``. These differ per rank:
#    each process draws its own dropout masks, noise and samples (under sequence parallelism each
#    rank draws for its own tokens), and each data-parallel replica has its own data position.
# 5. Nothing is pickled. JSON holds the structure, with tuples, dicts with non-string keys and
#    tensors marked (``__memo_tuple__``, ``__memo_items__``, ``__memo_tensor__``: a name in the
#    safetensors file beside it); Python floats are written with repr, so they round-trip exactly.
# 6. A directory that holds ``state.json`` itself (one step directory, or a checkpoint written by
#    memo before ``latest.json`` existed) loads as it is. A save into such an old directory leaves
#    its files where they are; ``latest.json`` then takes precedence.

# NOTE [ Atomic checkpoint commit ]
#
# 1. Rank 0 removes what an interrupted save left (``.tmp-save``, ``latest.json.tmp``, step
#    directories ``latest.json`` does not list) and creates ``.tmp-save`` empty.
# 2. Every rank writes its files into ``.tmp-save``; rank 0 also the weights and the state. Each
#    file is flushed and fsynced before the next step.
# 3. The ranks agree that every one of them succeeded (an all-reduce of a flag at the end of each
#    phase, so a rank that failed, say on a full disk, fails all of them with a MemoError instead of
#    leaving them in a barrier). On failure rank 0 removes ``.tmp-save``; ``latest.json`` is untouched.
# 4. Rank 0 fsyncs ``.tmp-save``, renames it to ``step-N`` (atomic), fsyncs the root, writes
#    ``latest.json.tmp``, fsyncs it and ``os.replace``s it over ``latest.json`` (atomic), and fsyncs
#    the root. That replace is the commit: before it a load reads the previous checkpoint, after it
#    the new one, and each of them is complete on disk.
# 5. Only then does rank 0 remove the step directories beyond the last ``keep``.
# 6. Killed at any moment, the root holds a ``latest.json`` naming a complete directory (or none, if
#    no save ever committed). Leftovers are never read (rule 1 of the layout) and go at the next save.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from typing import Any

import torch

from memo.errors import MemoError
from memo.integrations import checkpoint_sharded as sharded_ckpt
from memo.integrations import checkpoint_zero as zero_ckpt
from memo.integrations.checkpoint_sharded import export_pretrained, is_fsdp2  # noqa: F401  (export: API)

_WHO = "memo.checkpoint"
FORMAT = "memo-checkpoint"
VERSION = 1
ROOT_FORMAT = "memo-checkpoint-root"
LATEST = "latest.json"
WEIGHTS = "model.safetensors"
STATE = "state.json"
STATE_TENSORS = "state.safetensors"
TMP = ".tmp-save"
_STEP_DIR = re.compile(r"^step-\d{9,}(-\d+)?$")
_TENSOR, _TUPLE, _ITEMS = "__memo_tensor__", "__memo_tuple__", "__memo_items__"


# --- structure <-> JSON + tensors (layout rule 5) ------------------------------------------------
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


def _decode(obj: Any, tensors: dict, file: str, where: str) -> Any:
    """The inverse of ``_Encoder``; a malformed marker or a tensor the file lacks is a MemoError."""
    def sub(key: Any) -> str:
        return f"{where}/{key}" if where else str(key)

    def bad(what: str) -> MemoError:
        return MemoError(f"{_WHO}: {file}: field {where or '(top)'} {what}; the file is corrupt or was edited, "
                         f"resume from another checkpoint")
    if isinstance(obj, list):
        return [_decode(v, tensors, file, sub(i)) for i, v in enumerate(obj)]
    if not isinstance(obj, dict):
        return obj
    if _TENSOR in obj:
        name = obj[_TENSOR]
        if len(obj) != 1 or not isinstance(name, str) or name not in tensors:
            raise bad(f"refers to tensor {name!r}, which the .safetensors file beside it does not hold")
        return tensors[name]
    if _TUPLE in obj:
        if len(obj) != 1 or not isinstance(obj[_TUPLE], list):
            raise bad(f"has a malformed {_TUPLE} marker")
        return tuple(_decode(v, tensors, file, sub(i)) for i, v in enumerate(obj[_TUPLE]))
    if _ITEMS in obj:
        items = obj[_ITEMS]
        if len(obj) != 1 or not isinstance(items, list) or not all(
                isinstance(p, list) and len(p) == 2 and (p[0] is None or isinstance(p[0], (bool, int, float, str)))
                for p in items):
            raise bad(f"has a malformed {_ITEMS} marker")
        return {k: _decode(v, tensors, file, sub(k)) for k, v in items}
    return {k: _decode(v, tensors, file, sub(k)) for k, v in obj.items()}


# --- files ---------------------------------------------------------------------------------------
def _fsync(path: str) -> None:
    """Flush a file or a directory to disk (a directory: its entries, i.e. creations and renames)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: str, structure: Any) -> None:
    with open(path, "w") as f:
        json.dump(structure, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _write(path: str, structure: dict, tensors: dict) -> None:
    """``path`` (.json) and its tensors (.safetensors beside it), both fsynced."""
    from safetensors.torch import save_file
    tensor_path = path[:-len(".json")] + ".safetensors"
    save_file(tensors, tensor_path, metadata={"format": "pt"})
    _fsync(tensor_path)
    _write_json(path, structure)


def _write_weights(tmp: str, module, views: bool = False) -> None:
    """``model.safetensors``: the whole weights under the plain model's keys (tied weights stored once).
    ``views``: the parameters are views into one flat buffer (DeepSpeed ZeRO stages 1-2), which
    safetensors' ``save_model`` refuses; each tensor is then copied, a tied one once."""
    from safetensors.torch import save_file, save_model
    path = os.path.join(tmp, WEIGHTS)
    if not views:
        save_model(module, path, metadata={"format": "pt"})
    else:
        tensors, seen = {}, set()
        for k, t in module.state_dict().items():
            ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
            if ident not in seen:   # a tied key: checkpoint_checks.check_weights fills it from the first
                seen.add(ident)
                tensors[k] = t.detach().cpu().clone().contiguous()
        save_file(tensors, path, metadata={"format": "pt"})
    _fsync(path)


def write_sharded_state(tmp: str, module, scheduler, step: int, world: int, layout: str, optimizer_class: str,
                        buffers: dict | None = None, zero_stage: int | None = None) -> None:
    """Rank 0's ``state.json`` (+ ``.safetensors``) and ``config.json`` of a sharded checkpoint: its layout
    (``"dcp"``, ``"zero"``), the optimizer's class, the scheduler; the optimizer state lives in the shards."""
    config = getattr(module, "config", None)
    if config is not None and hasattr(config, "save_pretrained"):
        config.save_pretrained(tmp)
        _fsync(os.path.join(tmp, "config.json"))
    enc = _Encoder()
    state = {"format": FORMAT, "version": VERSION, "step": step, "world_size": world, "optimizer_layout": layout,
             "optimizer_class": optimizer_class, "optimizer": None,
             "scheduler_class": None if scheduler is None else class_name(scheduler),
             "scheduler": None if scheduler is None else enc(scheduler.state_dict(), "scheduler")}
    if buffers is not None:
        state["buffers"] = enc(buffers, "buffers")
    if zero_stage is not None:
        state["zero_stage"] = zero_stage
    _write(os.path.join(tmp, STATE), state, enc.tensors)


def read_json(path: str) -> Any:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise MemoError(f"{_WHO}: cannot read {path} ({e.strerror}); the checkpoint is incomplete or was written by "
                        f"another number of processes") from e
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise MemoError(f"{_WHO}: {path} is not valid JSON ({e}); the file is corrupt, resume from another "
                        f"checkpoint") from e


def read_tensors(path: str) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(path)
    except FileNotFoundError as e:
        raise MemoError(f"{_WHO}: {path} is missing; the checkpoint is incomplete or was written by another number "
                        f"of processes") from e
    except (SafetensorError, OSError, ValueError) as e:
        raise MemoError(f"{_WHO}: {path} is not a readable safetensors file ({e}); the file is corrupt or "
                        f"truncated, resume from another checkpoint") from e


def _read(path: str) -> Any:
    """A .json and the .safetensors beside it, decoded (the tensors read whole, sizes checked)."""
    structure = read_json(path)
    tensors = read_tensors(path[:-len(".json")] + ".safetensors")
    return _decode(structure, tensors, path, "")


# --- RNG (layout rule 4) -------------------------------------------------------------------------
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


# --- ranks ---------------------------------------------------------------------------------------
def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_ok(ok: bool) -> bool:
    """Whether every rank passed ``ok`` (NOTE [ Atomic checkpoint commit ] rule 3); a barrier too."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return ok
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _agree(error: BaseException | None, what: str, unchanged: str = "the previous checkpoint is unchanged",
           on_failure=None) -> None:
    """Raise on every rank if any rank failed ``what``: this rank's own error, or one naming the others."""
    if _all_ok(error is None):
        return
    if on_failure is not None:
        on_failure()
    if error is None:
        raise MemoError(f"{_WHO}: another rank failed while {what} (see its error); {unchanged}")
    if isinstance(error, MemoError):
        raise error
    raise MemoError(f"{_WHO}: {what} failed on rank {_rank_world()[0]}: {error}. {unchanged[0].upper()}"
                    f"{unchanged[1:]}; free disk space (or raise the file-size limit) and save again") from error


def deepspeed_engine(model) -> Any:
    """``model`` when it is a DeepSpeed engine (any subclass: pipeline, hybrid), else None."""
    import sys
    deepspeed = sys.modules.get("deepspeed")   # no engine exists unless DeepSpeed was imported
    engine_class = getattr(getattr(deepspeed, "runtime", None), "engine", None)
    engine_class = getattr(engine_class, "DeepSpeedEngine", None)
    return model if engine_class is not None and isinstance(model, engine_class) else None


def _target(model: torch.nn.Module, optimizer) -> tuple[torch.nn.Module, str, Any]:
    """``(module, kind, engine)``: the module whose weights are saved (DDP's inner module, a DeepSpeed
    engine's module, an FSDP2 model itself), how its state is laid out ("plain"; "fsdp2": DCP shards,
    NOTE [ Sharded checkpoints ]; "zero": every rank's ZeRO partitions, NOTE [ ZeRO checkpoints ]) and
    the DeepSpeed engine when one was passed. FSDP1 and DeepSpeed's other optimizers are refused."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel
    if not isinstance(model, torch.nn.Module):
        raise MemoError(f"{_WHO}: model must be a torch.nn.Module, got {type(model).__name__}")
    engine = deepspeed_engine(model)
    if engine is not None:
        model = model.module
    if isinstance(model, (DistributedDataParallel, DataParallel)):
        model = model.module
    if is_fsdp2(model):
        return model, "fsdp2", None
    partitioned = zero_ckpt.is_zero3(model)
    if partitioned or zero_ckpt.stage_of(optimizer) is not None:
        zero_ckpt.zero_optimizer(optimizer, engine, partitioned)
        return model, "zero", engine
    kind = type(model).__name__
    if kind == "FullyShardedDataParallel" or any(type(p).__name__ == "DTensor" for p in model.parameters()):
        raise MemoError(f"{_WHO}: the model is {kind} (FSDP1 or a DTensor model); memo's checkpoints save plain "
                        f"and DDP models, FSDP2 (memo.integrations.fsdp.fully_shard) and DeepSpeed ZeRO engines. "
                        f"Shard with FSDP2, or use that framework's own checkpointing")
    if engine is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise MemoError(f"{_WHO}: the DeepSpeed engine's optimizer is {type(optimizer).__name__} (ZeRO stage 0 with "
                        f"a mixed-precision wrapper), whose state memo's checkpoints do not read; use a ZeRO stage "
                        f"1-3 config (memo.integrations.deepspeed.memo_zero_config), or engine.save_checkpoint")
    return model, "plain", None


def class_name(obj: Any) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _rank_file(directory: str, rank: int) -> str:
    return os.path.join(directory, f"rank{rank}.json")


# --- the root: latest.json and its step directories ----------------------------------------------
def _read_latest(root: str) -> dict | None:
    """``latest.json`` checked (layout rule 1), or None when the root has none."""
    path = os.path.join(root, LATEST)
    if not os.path.exists(path):
        return None
    latest = read_json(path)
    names = latest.get("checkpoints") if isinstance(latest, dict) else None
    if (not isinstance(latest, dict) or latest.get("format") != ROOT_FORMAT or latest.get("version") != 1
            or not isinstance(names, list) or not names
            or not all(isinstance(n, str) and _STEP_DIR.match(n) for n in names)):
        raise MemoError(f"{_WHO}: {path} is not a {ROOT_FORMAT} version 1 file (field 'checkpoints' must list step "
                        f"directories such as 'step-000000012', the current one last); the file was edited or is "
                        f"not memo's")
    return latest


def latest_checkpoint(path: str) -> str:
    """The directory ``load_checkpoint(path)`` reads: the one ``latest.json`` names, or ``path`` itself."""
    latest = _read_latest(path)
    if latest is not None:
        directory = os.path.join(path, latest["checkpoints"][-1])
        if not os.path.isfile(os.path.join(directory, STATE)):
            raise MemoError(f"{_WHO}: {os.path.join(path, LATEST)} names {latest['checkpoints'][-1]}, but "
                            f"{os.path.join(directory, STATE)} does not exist; the directory was removed by hand")
        return directory
    if os.path.isfile(os.path.join(path, STATE)):   # layout rule 6
        return path
    raise MemoError(f"{_WHO}: neither {os.path.join(path, LATEST)} nor {os.path.join(path, STATE)} exists: {path!r} "
                    f"is not a checkpoint, or no save into it finished; resume from an earlier checkpoint")


def _clean_root(root: str, listed: list[str]) -> None:
    """NOTE [ Atomic checkpoint commit ] rule 1: remove what an interrupted save left."""
    for name in os.listdir(root):
        full = os.path.join(root, name)
        if name == TMP or (_STEP_DIR.match(name) and name not in listed):
            shutil.rmtree(full)
        elif name == LATEST + ".tmp":
            os.remove(full)


def _commit(root: str, step: int, keep: int, listed: list[str]) -> str:
    """NOTE [ Atomic checkpoint commit ] rules 4 and 5 (rank 0): ``.tmp-save`` becomes current."""
    tmp = os.path.join(root, TMP)
    _fsync(tmp)
    name, n = f"step-{step:09d}", 0
    while name in listed or os.path.exists(os.path.join(root, name)):
        n += 1
        name = f"step-{step:09d}-{n}"
    os.rename(tmp, os.path.join(root, name))
    _fsync(root)
    kept = (listed + [name])[-keep:]
    _write_json(os.path.join(root, LATEST + ".tmp"),
                {"format": ROOT_FORMAT, "version": 1, "current": name, "checkpoints": kept})
    os.replace(os.path.join(root, LATEST + ".tmp"), os.path.join(root, LATEST))
    _fsync(root)   # the commit
    for old in listed:
        if old not in kept:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    return name


# --- API -----------------------------------------------------------------------------------------
def save_checkpoint(path: str, *, model: torch.nn.Module, optimizer, scheduler=None, step: int,
                    data_state: Any = None, keep: int = 2) -> str:
    """Write a resumable checkpoint of this training state under root directory ``path``. Call on every rank.

    ``data_state``: where this rank's data stream stands (a cursor, an epoch and index, a sampler's
    generator state): numbers, strings, tensors, lists, tuples and dicts. ``keep``: how many
    checkpoints ``path`` keeps (the newest; older ones are removed after the new one is committed).
    Returns the new checkpoint's directory. See NOTE [ Checkpoint layout ] and NOTE [ Atomic
    checkpoint commit ].
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise MemoError(f"{_WHO}: step={step!r} must be an int >= 0 (the number of optimizer steps taken)")
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise MemoError(f"{_WHO}: keep={keep!r} must be an int >= 1 (how many checkpoints to keep)")
    module, kind, engine = _target(model, optimizer)
    rank, world = _rank_world()
    tmp = os.path.join(path, TMP)

    error, listed = None, []
    if rank == 0:   # rule 1
        try:
            os.makedirs(path, exist_ok=True)
            latest = _read_latest(path)
            listed = [] if latest is None else latest["checkpoints"]
            _clean_root(path, listed)
            os.mkdir(tmp)
            _fsync(path)
        except (OSError, MemoError) as e:
            error = e
    _agree(error, f"preparing {path}")

    def remove_tmp() -> None:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)

    sharded, shards = kind == "fsdp2", None
    try:   # rule 2
        if sharded:
            shards = sharded_ckpt.state_to_save(module, optimizer)
        enc = _Encoder()
        mine = {"rank": rank, "rng": enc(rng_state(), "rng"), "data_state": enc(data_state, "data_state")}
        _write(_rank_file(tmp, rank), mine, enc.tensors)
        if kind == "zero":   # NOTE [ ZeRO checkpoints ] rules 2 and 3
            zero_ckpt.write_partition(tmp, rank, module, optimizer, engine)
        if rank == 0 and kind == "zero":
            stage = zero_ckpt.stage_of(optimizer)
            if stage < 3:
                _write_weights(tmp, module, views=True)
            write_sharded_state(tmp, module, scheduler, step, world, zero_ckpt.LAYOUT, class_name(optimizer.optimizer),
                                zero_ckpt.persistent_buffers(module) if stage == 3 else None, zero_stage=stage)
        elif rank == 0 and sharded:
            write_sharded_state(tmp, module, scheduler, step, world, sharded_ckpt.LAYOUT, class_name(optimizer))
        elif rank == 0:
            _write_weights(tmp, module)
            config = getattr(module, "config", None)
            if config is not None and hasattr(config, "save_pretrained"):
                config.save_pretrained(tmp)
                _fsync(os.path.join(tmp, "config.json"))
            enc = _Encoder()
            state = {"format": FORMAT, "version": VERSION, "step": step, "world_size": world,
                     "optimizer_class": class_name(optimizer), "optimizer": enc(optimizer.state_dict(), "optimizer"),
                     "scheduler_class": None if scheduler is None else class_name(scheduler),
                     "scheduler": None if scheduler is None else enc(scheduler.state_dict(), "scheduler")}
            _write(os.path.join(tmp, STATE), state, enc.tensors)
        error = None
    except Exception as e:   # any failure must reach the agreement below, or the other ranks would wait
        error = e
    _agree(error, f"writing the checkpoint of step {step} into {tmp}", on_failure=remove_tmp)

    if sharded:   # NOTE [ Sharded checkpoints ] rule 2 (b): only after every rank's own files are written
        try:
            sharded_ckpt.write_shards(tmp, shards)
            if rank == 0:
                sharded_ckpt.fsync_shards(tmp)
            error = None
        except Exception as e:   # DCP raises on every rank when one fails; each must reach the agreement
            error = e
        _agree(error, f"writing the shards of step {step} into {tmp}", on_failure=remove_tmp)

    name = None
    if rank == 0:   # rules 4 and 5
        try:
            name = _commit(path, step, keep, listed)
        except OSError as e:
            error = e
    _agree(error, f"committing the checkpoint of step {step} in {path}",
           "load_checkpoint reads the last checkpoint whose commit finished")
    return latest_checkpoint(path) if name is None else os.path.join(path, name)


def load_checkpoint(path: str, *, model: torch.nn.Module, optimizer, scheduler=None) -> dict:
    """Restore the current checkpoint under ``path`` into these objects. Call on every rank.

    Loads the weights into ``model`` (wrapped by memo or not, the same keys), the optimizer's and
    scheduler's states, and this rank's RNG states. Every file is read and checked first (NOTE
    [ Checked loads ]): on any problem a MemoError names the file and the field, and nothing has
    changed. Returns ``{"step": int, "data_state": ...}`` (this rank's data position, as given to
    ``save_checkpoint``).
    """
    from memo.integrations import checkpoint_checks as checks
    module, kind, engine = _target(model, optimizer)
    if kind == "fsdp2":
        return _load_sharded(path, module, optimizer, scheduler)
    if kind == "zero":
        return _load_zero(path, module, optimizer, scheduler, engine)
    rank, world = _rank_world()
    error, loaded = None, None
    try:
        loaded = checks.read_and_check(latest_checkpoint(path), module, optimizer, scheduler, rank, world)
    except MemoError as e:
        error = e
    # Every rank has checked its files before any rank changes anything (NOTE [ Checked loads ] rule 1).
    _agree(error, f"checking the checkpoint in {path}", "nothing was loaded")
    checks.apply(loaded, module, optimizer, scheduler)
    set_rng_state(loaded.rng)   # last: nothing after it may draw random numbers
    return {"step": loaded.step, "data_state": loaded.data_state}


def _load_sharded(path: str, model: torch.nn.Module, optimizer, scheduler) -> dict:
    """NOTE [ Sharded checkpoints ] rule 3: check, agree, read the shards into clones, agree, apply."""
    from memo.integrations import checkpoint_checks as checks
    rank, world = _rank_world()
    error, loaded, directory = None, None, None
    try:
        directory = latest_checkpoint(path)
        loaded = checks.read_and_check_sharded(directory, optimizer, scheduler, rank, world)
    except MemoError as e:
        error = e
    _agree(error, f"checking the checkpoint in {path}", "nothing was loaded")

    stateless = not optimizer.state   # a fresh optimizer: get_state_dict gives it a zero state
    model_sd = optim_sd = None
    try:
        model_sd, optim_sd = sharded_ckpt.read_shards(directory, model, optimizer)
        error = None
    except MemoError as e:
        error = e

    def forget_zero_state() -> None:
        if stateless:
            optimizer.state.clear()
    _agree(error, f"reading the shards of the checkpoint in {directory}", "nothing was loaded",
           on_failure=forget_zero_state)
    sharded_ckpt.apply(model, optimizer, model_sd, optim_sd)
    if scheduler is not None:
        scheduler.load_state_dict(loaded.scheduler)
    set_rng_state(loaded.rng)   # last: nothing after it may draw random numbers
    return {"step": loaded.step, "data_state": loaded.data_state}


def _load_zero(path: str, module: torch.nn.Module, optimizer, scheduler, engine) -> dict:
    """NOTE [ ZeRO checkpoints ] rule 4: every file checked on every rank, agree, then apply."""
    from memo.integrations import checkpoint_checks as checks
    rank, world = _rank_world()
    error = loaded = partition = weights = buffers = None
    try:
        directory = latest_checkpoint(path)
        loaded = checks.read_and_check_zero(directory, optimizer, scheduler, rank, world)
        partition = zero_ckpt.read_and_check(directory, module, optimizer, engine, rank)
        if zero_ckpt.stage_of(optimizer) < 3:
            file = os.path.join(directory, WEIGHTS)
            weights = checks.check_weights(module, read_tensors(file), file)
        else:
            buffers = zero_ckpt.check_buffers(module, loaded.weights, os.path.join(directory, STATE))
    except MemoError as e:
        error = e
    _agree(error, f"checking the checkpoint in {path}", "nothing was loaded")
    zero_ckpt.apply(partition, weights, buffers, module, optimizer, engine, agree=_agree)
    if scheduler is not None:
        scheduler.load_state_dict(loaded.scheduler)
    set_rng_state(loaded.rng)   # last: nothing after it may draw random numbers
    return {"step": loaded.step, "data_state": loaded.data_state}
