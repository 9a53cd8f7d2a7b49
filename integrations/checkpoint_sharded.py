"""Checkpoints of an FSDP2-sharded model (memo.integrations.fsdp.fully_shard) through torch's DCP.

``save_checkpoint`` / ``load_checkpoint`` (integrations/checkpoint.py) come here when the model is
sharded by FSDP2; the root, its ``latest.json`` pointer and the commit are the same as for a plain
model (NOTE [ Atomic checkpoint commit ]). ``export_pretrained(model, directory)`` gathers the whole
weights and writes a plain Hugging Face model directory (``from_pretrained`` loads it, no memo, no
FSDP).

# NOTE [ Sharded checkpoints ]
#
# 1. A step directory of a sharded model holds ``state.json`` (``"optimizer_layout": "dcp"``, the
#    optimizer's class, the scheduler's state, the step, the world size W; the optimizer's state is
#    not in it), every rank's ``rank{r}.json`` (RNG, data position), ``config.json`` for an HF model,
#    and ``shards/``: ``torch.distributed.checkpoint`` (DCP) of ``{"model": ..., "optimizer": ...}``
#    as ``get_state_dict`` gives them (sharded: each rank writes its own shards, ``__r_0.distcp``,
#    and rank 0 the ``.metadata``). DCP fsyncs each file (``sync_files``).
# 2. Save in two phases, each closed by the ranks' agreement (checkpoint._agree): (a) each rank's
#    own files, rank 0's state and each rank's state dicts (``get_state_dict``, local); (b)
#    ``dcp.save``, a collective. A rank that failed in (a) never enters (b), so no rank waits in a
#    DCP collective for a peer that gave up; a failure inside (b) DCP raises on every rank itself
#    (it gathers every rank's result). The commit (rename, pointer) follows only after (b)
#    succeeded on all ranks: a save killed or failing in any phase leaves ``latest.json`` naming
#    the previous, complete checkpoint.
# 3. Load: read and check ``state.json`` and this rank's file (NOTE [ Checked loads ]), agree; then
#    ``dcp.load`` into clones of the live state dicts (the model's and optimizer's shards, so
#    twice their memory for a moment), check the loaded hyperparameters and that every floating
#    tensor is finite, agree; only then ``set_state_dict``, the scheduler and the RNG. A failed load
#    leaves every rank's model, optimizer and scheduler as they were (an optimizer without state, as
#    a fresh one is, gets the zero state ``get_state_dict`` gives it removed again).
# 4. Same world size W: DCP could reshard, but each rank's RNG and data position are saved per rank,
#    so a resume with other W would not continue the same run; refused (check_header).
# 5. DCP's ``.metadata`` is a pickle (torch's format). memo reads it with an unpickler that builds
#    only DCP's metadata classes, ``torch.Size``, dtypes, layouts and paths (``_MetadataUnpickler``),
#    so a crafted file cannot run code; anything else is a MemoError naming the file. DCP reads the
#    shard files' non-tensor values with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import pickle
import re
from typing import Any

import torch

from memo.errors import MemoError

_WHO = "memo.checkpoint"
SHARDS = "shards"
LAYOUT = "dcp"


def is_fsdp2(model: torch.nn.Module) -> bool:
    """Whether ``model`` is sharded by FSDP2 (``fully_shard``), whose state DCP saves per rank."""
    from torch.distributed.fsdp import FSDPModule
    return any(isinstance(m, FSDPModule) for m in model.modules())


def _state_dicts(model, optimizer) -> tuple[dict, dict]:
    from torch.distributed.checkpoint.state_dict import get_state_dict
    return get_state_dict(model, optimizer)


def state_to_save(model, optimizer) -> dict:
    """Phase (a) of NOTE [ Sharded checkpoints ] rule 2: this rank's shards, as DCP saves them (no
    collective, so a rank that fails here fails before any rank enters ``dcp.save``)."""
    model_sd, optim_sd = _state_dicts(model, optimizer)
    return {"model": model_sd, "optimizer": optim_sd}


def write_shards(tmp: str, state: dict) -> None:
    """Phase (b) of NOTE [ Sharded checkpoints ] rule 2: ``dcp.save``, a collective of every rank."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    try:
        dcp.save(state, checkpoint_id=os.path.join(tmp, SHARDS))
    except CheckpointException as e:   # a BaseException: it would pass the callers' ``except Exception``
        raise MemoError(f"{_WHO}: writing the shards into {os.path.join(tmp, SHARDS)} failed on rank(s) "
                        f"{sorted(e.failures)}: {_first_failure(e)}. The previous checkpoint is unchanged; free disk "
                        f"space (or raise the file-size limit) and save again") from e


def _first_failure(e) -> str:
    """The first failed rank's own exception, as text (CheckpointException holds one per rank)."""
    failures = getattr(e, "failures", {})
    if not failures:
        return str(e)[:600]
    first = failures[min(failures)]
    if isinstance(first, tuple) and first and isinstance(first[0], BaseException):   # (exception, its frames)
        first = first[0]
    return f"{type(first).__name__}: {first}"[:600]


def fsync_shards(tmp: str) -> None:
    """Rank 0, before the commit: the entries of ``shards/`` (every rank's files) on disk."""
    from memo.integrations.checkpoint import _fsync
    _fsync(os.path.join(tmp, SHARDS))


class _MetadataUnpickler(pickle.Unpickler):
    """NOTE [ Sharded checkpoints ] rule 5: DCP's metadata classes and torch's plain types only."""

    _ALLOWED = {
        "torch.distributed.checkpoint.metadata": {"Metadata", "StorageMeta", "TensorProperties",
                                                  "TensorStorageMetadata", "BytesStorageMetadata",
                                                  "ChunkStorageMetadata", "MetadataIndex", "_MEM_FORMAT_ENCODING"},
        "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
        "torch.serialization": {"_get_layout"},
        "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path"},
        "torch": {"Size"},
    }

    def find_class(self, module: str, name: str) -> Any:
        if name in self._ALLOWED.get(module, ()) or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                                   torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not one of DCP's metadata types")


def _metadata_reader(shards: str):
    """DCP's FileSystemReader, reading ``.metadata`` with ``_MetadataUnpickler``."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    class Reader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
            path = self._get_metadata_path(kwargs.get("rank"))
            try:
                with self.fs.create_stream(path, "rb") as f:
                    metadata = _MetadataUnpickler(f).load()
            except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError, IndexError) as e:
                raise MemoError(f"{_WHO}: {path} is not DCP metadata ({type(e).__name__}: {e}); the file is corrupt "
                                f"or not torch's, resume from another checkpoint") from e
            if not isinstance(metadata, Metadata):
                raise MemoError(f"{_WHO}: {path} holds a {type(metadata).__name__}, not DCP metadata; the file is "
                                f"corrupt or not torch's, resume from another checkpoint")
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata
    return Reader(shards)


def _clone(tree: Any) -> Any:
    from torch.utils._pytree import tree_map_only
    return tree_map_only(torch.Tensor, lambda t: t.detach().clone(), tree)


def read_shards(directory: str, model, optimizer) -> tuple[dict, dict]:
    """``dcp.load`` into clones of the live state dicts (NOTE [ Sharded checkpoints ] rule 3), checked."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    from memo.integrations.checkpoint_checks import check_like
    shards = os.path.join(directory, SHARDS)
    model_sd, optim_sd = _state_dicts(model, optimizer)
    staged = {"model": _clone(model_sd), "optimizer": _clone(optim_sd)}
    try:
        dcp.load(staged, storage_reader=_metadata_reader(shards))
    except (CheckpointException, RuntimeError, ValueError, OSError, KeyError) as e:
        what = _first_failure(e) if isinstance(e, CheckpointException) else f"{type(e).__name__}: {str(e)[:600]}"
        raise MemoError(f"{_WHO}: cannot read the shards in {shards} ({what}); they "
                        f"are incomplete or corrupt, or were written for another model or optimizer. Build the "
                        f"model and optimizer of the saved run, or resume from another checkpoint") from e
    groups, live = staged["optimizer"].get("param_groups", []), optim_sd.get("param_groups", [])
    if len(groups) != len(live):
        raise MemoError(f"{_WHO}: {shards}: field optimizer/param_groups has {len(groups)} groups, this optimizer "
                        f"{len(live)}; build the optimizer of the saved run")
    for i, (g, lg) in enumerate(zip(groups, live)):
        for key, value in lg.items():
            if key not in ("params", "param_names") and key in g:
                check_like(g[key], value, shards, f"optimizer/param_groups/{i}/{key}")
    for part in ("model", "optimizer"):
        _check_finite(staged[part], shards, part)
    return staged["model"], staged["optimizer"]


def _check_finite(tree: Any, file: str, where: str) -> None:
    from torch.distributed.tensor import DTensor
    if isinstance(tree, dict):
        for k, v in tree.items():
            _check_finite(v, file, f"{where}/{k}")
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            _check_finite(v, file, f"{where}/{i}")
    elif isinstance(tree, torch.Tensor):
        local = tree.to_local() if isinstance(tree, DTensor) else tree
        if local.is_floating_point() and not bool(torch.isfinite(local).all()):
            raise MemoError(f"{_WHO}: {file}: field {where} holds values that are not finite; the checkpoint is "
                            f"corrupt or the run had diverged, resume from another checkpoint")


def apply(model, optimizer, model_sd: dict, optim_sd: dict) -> None:
    from torch.distributed.checkpoint.state_dict import set_state_dict
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)


def export_pretrained(model, directory: str) -> str:
    """Write the whole weights of a sharded HF ``model`` as a plain ``save_pretrained`` directory.

    ``model``: sharded by FSDP2 (``memo.integrations.fsdp.fully_shard``) or partitioned by DeepSpeed
    ZeRO-3 (the engine or its module). FSDP2: the full state dict is gathered onto rank 0's CPU
    (``StateDictOptions(full_state_dict=True, cpu_offload=True)``); ZeRO-3: one module's parameters
    at a time (``deepspeed.zero.GatheredParameters``), rank 0 keeping a CPU copy. Rank 0 writes the
    model's own ``save_pretrained`` (``model.safetensors`` + ``config.json``), which
    ``AutoModelForCausalLM.from_pretrained(directory)`` loads without memo, FSDP or DeepSpeed.
    Atomic (NOTE [ Atomic export ]): killed at any moment, ``directory`` holds the previous export
    whole or the new one; files the export does not write (a tokenizer's) are kept. A collective:
    call it on every rank. Returns ``directory``.
    """
    from memo.integrations.checkpoint import _agree, _rank_world, deepspeed_engine
    from memo.integrations.checkpoint_zero import gathered_state_dict, is_zero3
    if deepspeed_engine(model) is not None:
        model = model.module
    if not isinstance(model, torch.nn.Module) or not (is_fsdp2(model) or is_zero3(model)):
        raise MemoError(f"{_WHO}.export_pretrained: the model is not sharded by FSDP2 or partitioned by DeepSpeed "
                        f"ZeRO-3 (got {type(model).__name__}); for an unsharded HF model call "
                        f"model.save_pretrained(directory) on rank 0")
    if not callable(getattr(model, "save_pretrained", None)):
        raise MemoError(f"{_WHO}.export_pretrained: {type(model).__name__} has no save_pretrained (not a Hugging "
                        f"Face model); gather its weights with torch.distributed.checkpoint.state_dict."
                        f"get_model_state_dict (FSDP2) or deepspeed.zero.GatheredParameters (ZeRO-3) instead")
    if not isinstance(directory, (str, os.PathLike)):
        raise MemoError(f"{_WHO}.export_pretrained: directory={directory!r} must be a path")
    directory = os.path.abspath(os.fspath(directory))
    rank, _ = _rank_world()
    error = None
    try:
        if is_fsdp2(model):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
            full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        else:
            full = gathered_state_dict(model)   # rank 0 failing to copy still enters every gather
        if rank == 0:
            _export_atomically(model, full, directory)
    except Exception as e:   # any failure must reach the agreement below, or the other ranks would wait
        error = e
    _agree(error, f"exporting the weights to {directory}", f"{directory} is as it was before the export")
    return directory


# NOTE [ Atomic export ]
#
# 1. Rank 0 first finishes what an interrupted export left: ``D.old-export`` without ``D`` is a previous
#    export whose replacement was cut between the two renames of rule 3; it becomes ``D`` again.
#    ``D.tmp-export`` is removed.
# 2. The model's ``save_pretrained`` writes ``D.tmp-export``. What ``D`` holds besides a model's weights
#    and the files ``save_pretrained`` wrote anew (a tokenizer, a README) is copied into it; every file
#    in it and the directory are fsynced.
# 3. With no ``D``: ``D.tmp-export`` is renamed to ``D``. Otherwise ``D`` is renamed to ``D.old-export``,
#    ``D.tmp-export`` to ``D``, the parent fsynced, and only then ``D.old-export`` removed. Killed at any
#    moment, the previous export is ``D`` or ``D.old-export`` (rule 1 brings it back), whole, or the new
#    one is ``D``, whole, with the other files. A ``D`` that is not a directory is refused.
_WEIGHT_FILE = re.compile(r"^(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?$")


def _export_atomically(model, full: dict, directory: str) -> None:
    import shutil

    from memo.integrations.checkpoint import _fsync
    tmp, old, parent = directory + ".tmp-export", directory + ".old-export", os.path.dirname(directory)
    if os.path.isdir(old) and not os.path.exists(directory):   # rule 1
        os.rename(old, directory)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise MemoError(f"{_WHO}.export_pretrained: {directory} exists and is not a directory; export into a "
                        f"directory (new, or a previous export)")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    os.makedirs(parent, exist_ok=True)
    model.save_pretrained(tmp, state_dict=full, safe_serialization=True)   # rule 2
    if os.path.isdir(directory):
        for name in os.listdir(directory):
            if not os.path.exists(os.path.join(tmp, name)) and not _WEIGHT_FILE.match(name):
                src = os.path.join(directory, name)
                (shutil.copytree if os.path.isdir(src) else shutil.copy2)(src, os.path.join(tmp, name))
    for name in os.listdir(tmp):
        if os.path.isfile(os.path.join(tmp, name)):
            _fsync(os.path.join(tmp, name))
    _fsync(tmp)
    if os.path.exists(directory):   # rule 3
        os.rename(directory, old)
    os.rename(tmp, directory)
    _fsync(parent)
    shutil.rmtree(old, ignore_errors=True)
