"""memo under Hugging Face Accelerate: ``MemoPlugin`` (settings) and ``prepare`` (model, optimizer, data).

Accelerate accepts neither new kwargs-handler classes nor unknown keys in its config file, so memo
brings its own plugin in Accelerate's style: a dataclass whose unset fields come from ``MEMO_*``
environment variables (which ``memo launch`` exports from the ``memo:`` section of the config
file), and a ``prepare`` that does what ``accelerator.prepare`` does plus sequence parallelism::

    accelerator = Accelerator()
    model, optimizer, loader = memo.integrations.accelerate.prepare(accelerator, model, optimizer, loader)
    for batch in loader:                  # this rank's share of the sequence (shard_batch)
        loss = model(**batch).loss        # the whole sequence's loss, on every rank of its group
        accelerator.backward(loss)        # DDP: summed over SP ranks, averaged over DP replicas
        optimizer.step(); optimizer.zero_grad()

# NOTE [ Gradients under data x sequence parallelism ]
#
# 1. The world of W processes is cut into W/P consecutive blocks of P ranks (memo.wrap's
#    sequence_parallel_size): block d is data-parallel replica d, and its P ranks share one
#    sequence. Replica d's batch is the d-th of every W/P batches of the user's loader; the P ranks
#    of a block see that same full batch and keep their shard of its tokens (``shard_batch``).
# 2. Under memo's sequence-parallel loss (NOTE [ Sequence-parallel loss ] in memo/wrap.py) the
#    backward on one rank gives the gradient of its own tokens' share; the full-sequence gradient
#    of replica d is the SUM over its P ranks. The step's gradient is the MEAN over the W/P
#    replicas of those sums, i.e. (sum over all W ranks) / (W/P).
# 3. DDP over the whole world would divide the sum by W, P times too little. ``prepare`` keeps
#    Accelerate's DDP (its buckets, overlap, no_sync for gradient accumulation) and replaces only
#    the reduction with a communication hook: all-reduce SUM over the world, then divide by W/P.
#    This is exact, not a compensation: no rescaling by P happens anywhere (with P = W it is a
#    plain sum, as ``memo.parallel.all_reduce_gradients``).
# 4. Only DDP gets the hook. Accelerate's FSDP2 gets the same reduction from its units' divide
#    factors (NOTE [ FSDP2 and sequence parallelism ] in integrations/fsdp.py). Under other
#    data-parallel wrappers (DeepSpeed, FSDP1) with P > 1 ``prepare`` refuses, rather than train with
#    gradients P times too small.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any, Optional, Union

from memo.errors import MemoError

ENV_PREFIX = "MEMO_"
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_NONE = ("none", "off")


def _choices(name: str) -> tuple:
    if name == "sp_backend":
        from memo.parallel.groups import BACKENDS
        return BACKENDS
    if name == "sp_layout":
        from memo.parallel.layout import LAYOUTS
        return LAYOUTS
    from memo.config import _OFFLOAD_DTYPES
    return _OFFLOAD_DTYPES


def env_name(name: str) -> str:
    """``swap_ratio`` -> ``MEMO_SWAP_RATIO``."""
    return ENV_PREFIX + name.upper()


def _bad(where: str, value, want: str) -> MemoError:
    return MemoError(f"memo.integrations.accelerate: {where}={value!r} {want}")


def check_value(name: str, value: Any, where: str, *, text: bool = False) -> Any:
    """``value`` of field ``name`` checked (and, when ``text``, parsed from an environment string).

    ``where`` names the source in the error (``MEMO_SWAP_RATIO``, ``memo.swap_ratio`` of a config file,
    ``MemoPlugin.swap_ratio``). Strict types for values that are not text: an int field refuses
    ``2.0`` and ``"2"``, so a typo in a YAML file is caught before any process starts.
    """
    kind = _FIELD_KINDS[name]
    if text:
        value = value.strip()
    shown = value   # the errors show what the user wrote, not what it was parsed to
    if kind == "ratio":
        if isinstance(value, str) and value != "auto":
            if not text:
                raise _bad(where, shown, "is neither a number nor 'auto'; write e.g. 0.5 or auto (unquoted number)")
            try:
                value = float(value)
            except ValueError:
                raise _bad(where, shown, "is neither a number nor 'auto'; use a fraction in [0, 1] or auto") from None
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise _bad(where, shown, "must be a fraction in [0, 1] or 'auto'")
        if not isinstance(value, str):
            if not 0.0 <= float(value) <= 1.0:
                raise _bad(where, shown, "is outside [0, 1]; use the fraction of tokens to swap (1.0 swaps all, "
                                         "0.0 recomputes all) or auto")
            value = float(value)
        return value
    if kind in ("count0", "count1", "chunk"):
        if kind == "chunk" and isinstance(value, str) and value.lower() in _NONE:
            return "none"
        if text:
            try:
                value = int(value)
            except ValueError:
                raise _bad(where, shown, "is not an integer" + ("; write e.g. 4096, or none to keep the model's "
                                                                "own loss" if kind == "chunk" else "")) from None
        low = 0 if kind == "count0" else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            hint = "; or none to keep the model's own loss" if kind == "chunk" else ""
            raise _bad(where, shown, f"must be an integer >= {low}{hint}")
        return value
    if kind == "tile":   # NOTE [ Token tiling ] in memo/tiling.py
        if isinstance(value, str) and value.strip().lower() in _NONE + ("auto",):
            return value.strip().lower()
        if text:
            try:
                value = int(value)
            except ValueError:
                raise _bad(where, shown, "is not a tile; write auto, none or a number of tokens such as 8192") from None
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise _bad(where, shown, "must be auto, none or a positive number of tokens")
        return value
    if kind == "seconds":
        if text:
            try:
                value = float(value)
            except ValueError:
                raise _bad(where, shown, "is not a number of seconds; write e.g. 300") from None
        from memo.config import sp_timeout_problem   # NOTE [ Collective timeouts ]
        problem = sp_timeout_problem(value)
        if problem:
            raise _bad(where, shown, problem)
        return float(value)
    if kind == "bool":
        if text:
            if value.lower() not in _TRUE + _FALSE:
                raise _bad(where, shown, f"is not a boolean; write one of {_TRUE + _FALSE}")
            return value.lower() in _TRUE
        if not isinstance(value, bool):
            raise _bad(where, shown, "must be true or false")
        return value
    if kind == "bytes":
        from memo.planner.units import UnitError, parse_bytes
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise _bad(where, shown, "must be a size such as 64GiB or a byte count")
        try:
            if parse_bytes(value) <= 0:
                raise _bad(where, shown, "must be a positive size such as 64GiB")
        except UnitError as e:
            raise _bad(where, shown, f"is not a size ({e})") from e
        return value
    if kind == "choice":
        options = _choices(name)
        if value not in options:
            raise _bad(where, shown, f"is not one of {', '.join(options)}")
        return value
    assert kind == "path", kind
    if not isinstance(value, str) or not value:
        raise _bad(where, shown, "must be the path of a plan file written by `memo plan --out`")
    if not os.path.isfile(value):
        raise _bad(where, shown, "does not exist; write the plan with `memo plan ... --out PATH` and pass that path")
    return value


def render(value: Any) -> str:
    """A checked value as its ``MEMO_*`` environment string (``check_value(..., text=True)`` reads it back)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def _help(text: str, kind: str) -> dict:
    return {"help": text, "kind": kind}


@dataclass
class MemoPlugin:
    """memo's settings for an Accelerate job; ``None`` fields come from ``MEMO_<FIELD>`` or ``MemoConfig``'s default.

    Mirrors ``memo.MemoConfig`` (whose comments say why each default is what it is); see
    ``to_memo_config``. Every value, given or read from the environment, is checked here with the
    bad value in the error.
    """

    swap_ratio: Union[float, str, None] = field(default=None, metadata=_help(
        "Fraction of each layer's activation tokens swapped to host memory (the rest is recomputed), or 'auto' "
        "to choose it from the first steps' measured times. Env: MEMO_SWAP_RATIO.", "ratio"))
    host_memory_budget: Union[int, str, None] = field(default=None, metadata=_help(
        "Host bytes per rank for swapped activations, e.g. '64GiB'. Default: half of the available memory "
        "divided among the node's ranks. Env: MEMO_HOST_MEMORY_BUDGET.", "bytes"))
    keep_last_layers: Optional[int] = field(default=None, metadata=_help(
        "Last decoder layers that keep their activations on the device (default 2; with a plan, the plan's, and "
        "a different value is refused). Env: MEMO_KEEP_LAST_LAYERS.", "count0"))
    loss_chunk_size: Union[int, str, None] = field(default=None, metadata=_help(
        "Tokens per chunk of the LM head and loss (default 4096), or 'none' for the model's own loss. "
        "Env: MEMO_LOSS_CHUNK_SIZE.", "chunk"))
    fuse_final_norm: Optional[bool] = field(default=None, metadata=_help(
        "with the chunked loss, run the decoder's final norm chunk by chunk inside it (default true). Env: "
        "MEMO_FUSE_FINAL_NORM.", "bool"))
    offload_dtype: Optional[str] = field(default=None, metadata=_help(
        "'keep' (exact, default), 'bf16' or 'fp16' (fp32 activations stored at half size). "
        "Env: MEMO_OFFLOAD_DTYPE.", "choice"))
    plan: Optional[str] = field(default=None, metadata=_help(
        "Plan file written by `memo plan --out`. Env: MEMO_PLAN.", "path"))
    planned_memory: Optional[bool] = field(default=None, metadata=_help(
        "true serves the swapped layers' device memory at the plan's offsets (needs plan and a GPU; call "
        "memo.planned_memory.install() before CUDA starts). Env: MEMO_PLANNED_MEMORY.", "bool"))
    sequence_parallel_size: Optional[int] = field(default=None, metadata=_help(
        "Ranks that share one sequence; must divide the number of processes (default 1: off). "
        "Env: MEMO_SEQUENCE_PARALLEL_SIZE.", "count1"))
    sp_backend: Optional[str] = field(default=None, metadata=_help(
        "Sequence-parallel attention: 'ring' (default), 'ulysses' or 'hybrid'. Env: MEMO_SP_BACKEND.", "choice"))
    sp_layout: Optional[str] = field(default=None, metadata=_help(
        "Token layout over the SP ranks: 'zigzag' (default, balances causal work) or 'contiguous'. "
        "Env: MEMO_SP_LAYOUT.", "choice"))
    ulysses_size: Optional[int] = field(default=None, metadata=_help(
        "Hybrid only: Ulysses degree inside a node (default: the node's ranks). Env: MEMO_ULYSSES_SIZE.", "count1"))
    sp_timeout_s: Optional[float] = field(default=None, metadata=_help(
        "Seconds any sequence-parallel collective may wait before failing the job (default 300), from 0.001 "
        "(the backends count whole milliseconds) to 1e9. Env: MEMO_SP_TIMEOUT_S.", "seconds"))
    tile_tokens: Union[int, str, None] = field(default=None, metadata=_help(
        "Tokens per tile of each layer's MLP: auto (default: tiles sequences over 4096 tokens), none, or a count. "
        "Env: MEMO_TILE_TOKENS.", "tile"))
    enabled: Optional[bool] = field(default=None, metadata=_help(
        "false turns memo off while keeping the call sites (default true). Env: MEMO_ENABLED.", "bool"))

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                text = os.environ.get(env_name(f.name))
                if text is None or not text.strip():
                    continue
                value = check_value(f.name, text, env_name(f.name), text=True)
            else:
                value = check_value(f.name, value, f"MemoPlugin.{f.name}")
            setattr(self, f.name, value)

    def settings(self) -> dict:
        """The fields that are set (given or from the environment)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def to_memo_config(self, **overrides):
        """A ``memo.MemoConfig`` with the set fields; the others keep MemoConfig's defaults."""
        from memo.config import MemoConfig
        kwargs = self.settings()
        for name in ("loss_chunk_size", "tile_tokens"):
            if kwargs.get(name) == "none":
                kwargs[name] = None
        kwargs.update(overrides)
        return MemoConfig(**kwargs)


_FIELD_KINDS = {f.name: f.metadata["kind"] for f in fields(MemoPlugin)}
FIELDS = tuple(_FIELD_KINDS)


def check_settings(section: Any, where: str = "memo") -> dict:
    """A ``memo:`` section of a config file checked key by key: ``{field: value}`` (``None`` values dropped)."""
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise MemoError(f"memo.integrations.accelerate: the {where!r} section must be a mapping of settings "
                        f"(e.g. sequence_parallel_size: 2), got {type(section).__name__}")
    out = {}
    for key, value in section.items():
        if key not in _FIELD_KINDS:
            raise MemoError(f"memo.integrations.accelerate: unknown key {where}.{key}; known keys: "
                            f"{', '.join(FIELDS)}. Remove it or fix its spelling")
        if value is not None:
            out[key] = check_value(key, value, f"{where}.{key}")
    return out


def settings_env(settings: dict) -> dict:
    """``{MEMO_FIELD: text}`` for checked settings, as ``memo launch`` exports them."""
    return {env_name(k): render(v) for k, v in settings.items()}


# --- prepare -------------------------------------------------------------------------------------

_DDP_TYPES = ("NO", "MULTI_CPU", "MULTI_GPU", "MULTI_NPU", "MULTI_MLU", "MULTI_SDAA", "MULTI_MUSA", "MULTI_XPU",
              "MULTI_HPU", "MULTI_NEURON")


class SequenceShardedLoader:
    """This data-parallel replica's batches, each cut along the sequence for this rank (``shard_batch``).

    ``base`` is Accelerate's prepared loader over the data-parallel replicas (it is in
    ``accelerator._dataloaders``, so ``save_state`` / ``load_state`` keep its position). Other
    attributes (``set_epoch``, ``batch_size``, ``dataset``, ...) are the base loader's.
    Batches are mappings with ``input_ids`` and optionally ``labels``, ``attention_mask``,
    ``position_ids``: (batch, seq) each; yielded shards are (batch, seq / P) plus global positions.
    """

    def __init__(self, base, sp):
        self.base = base
        self.sp = sp

    def __iter__(self):
        from memo.parallel import shard_batch
        for batch in self.base:
            if not hasattr(batch, "keys"):
                raise MemoError(f"memo.integrations.accelerate: the dataloader yields {type(batch).__name__}; under "
                                f"sequence parallelism batches must be dicts with input_ids (and labels, "
                                f"attention_mask, position_ids) so that they can be cut along the sequence")
            yield shard_batch(dict(batch), group=self.sp)

    def __len__(self) -> int:
        return len(self.base)

    def __getattr__(self, name):
        if name in ("base", "sp"):   # not yet set (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.base, name)


def skip_first_batches(accelerator, dataloader, num_batches: int):
    """``accelerator.skip_first_batches`` for a loader from ``prepare`` (for resuming mid-epoch)."""
    if isinstance(dataloader, SequenceShardedLoader):
        return SequenceShardedLoader(accelerator.skip_first_batches(dataloader.base, num_batches), dataloader.sp)
    return accelerator.skip_first_batches(dataloader, num_batches)


def sum_over_sequence_mean_over_data(state, bucket):
    """DDP communication hook. See NOTE [ Gradients under data x sequence parallelism ] rule 3."""
    import torch.distributed as dist
    replicas = state
    fut = dist.all_reduce(bucket.buffer(), op=dist.ReduceOp.SUM, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0].div_(replicas))


def prepare(accelerator, model, optimizer=None, dataloader=None, plugin: Optional[MemoPlugin] = None):
    """Wrap ``model`` with memo and prepare ``(model, optimizer, dataloader)`` with ``accelerator``.

    ``plugin``: memo's settings (default ``MemoPlugin()``: from ``MEMO_*`` variables). With
    ``sequence_parallel_size`` P > 1 the ``accelerator.num_processes`` ranks form data parallel x
    sequence parallel (consecutive blocks of P ranks); the dataloader is split over the data-parallel
    replicas only and its batches are cut along the sequence for this rank; gradients under DDP are
    summed over the P ranks of a block and averaged over the replicas (NOTE [ Gradients under data x
    sequence parallelism ]). Returns the prepared ``(model, optimizer, dataloader)``; use
    ``accelerator.unwrap_model(model)`` for ``memo.stats`` and ``save_pretrained``.
    """
    import memo
    from memo.wrap import runtime_of
    plugin = plugin if plugin is not None else MemoPlugin()
    if not isinstance(plugin, MemoPlugin):
        raise MemoError(f"memo.integrations.accelerate.prepare: plugin must be a MemoPlugin, got "
                        f"{type(plugin).__name__}")
    world = accelerator.num_processes
    sp_size = plugin.sequence_parallel_size or 1
    if world % sp_size:
        raise MemoError(f"memo.integrations.accelerate.prepare: sequence_parallel_size={sp_size} does not divide the "
                        f"{world} processes; choose a divisor of {world} (the processes form {world}/size "
                        f"data-parallel replicas) or launch a multiple of {sp_size} processes")
    kind = str(accelerator.distributed_type).split(".")[-1]
    if sp_size > 1 and kind == "FSDP" and _fsdp_version(accelerator) != 2:
        raise MemoError(f"memo.integrations.accelerate.prepare: sequence parallelism under FSDP1 (fsdp_version "
                        f"{_fsdp_version(accelerator)}) is not supported: it averages gradients over all ranks and "
                        f"cannot sum them over a sequence's ranks; set fsdp_config.fsdp_version: 2 (FSDP2, "
                        f"NOTE [ FSDP2 and sequence parallelism ]) or use DDP")
    if sp_size > 1 and kind not in _DDP_TYPES and kind != "FSDP":
        raise MemoError(f"memo.integrations.accelerate.prepare: sequence parallelism under Accelerate's {kind} is "
                        f"not supported (its gradient reduction would average over the sequence-parallel ranks); "
                        f"use DDP (distributed_type MULTI_GPU / MULTI_CPU), FSDP2 (distributed_type FSDP, "
                        f"fsdp_version 2), memo.integrations.deepspeed.initialize in the script, or "
                        f"sequence_parallel_size 1")
    if accelerator.device_placement:
        model = model.to(accelerator.device)   # before memo.wrap: its runtime lives on the model's device
    config = plugin.to_memo_config()
    memo.wrap(model, config)
    if kind == "DEEPSPEED":   # ZeRO-3 must gather each swapped layer's weights for trace and recompute
        from memo.integrations.deepspeed import prepare as deepspeed_prepare
        deepspeed_prepare(model)
    if optimizer is not None:
        model, optimizer = accelerator.prepare(model, optimizer)
    else:
        model = accelerator.prepare(model)
    if config.enabled and config.sequence_parallel:
        _reduce_over_data_parallel_only(model, world // sp_size, world)
    if dataloader is not None:
        if sp_size > 1 and config.enabled:
            sp = runtime_of(accelerator.unwrap_model(model)).sp
            dataloader = SequenceShardedLoader(_data_parallel_loader(accelerator, dataloader, sp), sp)
        else:
            dataloader = accelerator.prepare(dataloader)
    return model, optimizer, dataloader


def _fsdp_version(accelerator) -> Optional[int]:
    plugin = getattr(getattr(accelerator, "state", None), "fsdp_plugin", None)
    return getattr(plugin, "fsdp_version", None)


def _reduce_over_data_parallel_only(model, replicas: int, world: int) -> None:
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel
    if isinstance(model, FSDPModule):   # Accelerate's FSDP2 (GPU only): NOTE [ FSDP2 and sequence parallelism ]
        from memo.integrations import fsdp
        fsdp.check_mesh(model, fsdp.sharding_mesh(model))
        fsdp.sum_over_sequence_mean_over_data(model)
    elif isinstance(model, DistributedDataParallel):
        try:
            model.register_comm_hook(replicas, sum_over_sequence_mean_over_data)
        except RuntimeError as e:   # DDP takes one hook: the user gave Accelerate one already
            raise MemoError("memo.integrations.accelerate.prepare: DDP already has a communication hook (from "
                            "DistributedDataParallelKwargs(comm_hook=...)); under sequence parallelism memo "
                            "installs its own (NOTE [ Gradients under data x sequence parallelism ]), so remove "
                            "comm_hook from the kwargs handler") from e
    elif world > 1:
        raise MemoError(f"memo.integrations.accelerate.prepare: Accelerate wrapped the model in "
                        f"{type(model).__name__}, not DistributedDataParallel, so memo cannot sum gradients over the "
                        f"sequence-parallel ranks; use DDP or sequence_parallel_size 1")


def _data_parallel_loader(accelerator, dataloader, sp):
    """Accelerate's loader for replica ``rank // P`` of ``W / P`` (NOTE [ Gradients under data x sequence
    parallelism ] rule 1): the same arguments as ``accelerator.prepare_data_loader``, other process counts."""
    import warnings

    from accelerate.data_loader import prepare_data_loader
    if accelerator.dispatch_batches:
        warnings.warn("memo.integrations.accelerate: dispatch_batches=True would cut batches over all processes; "
                      "memo reads them per data-parallel replica instead (dispatch_batches=False)", stacklevel=3)
    rank = accelerator.process_index
    replica, replicas = rank // sp.size, accelerator.num_processes // sp.size
    assert sp.ranks == list(range(replica * sp.size, (replica + 1) * sp.size)), (sp.ranks, rank)
    config = accelerator.dataloader_config
    loader = prepare_data_loader(
        dataloader, accelerator.device, num_processes=replicas, process_index=replica,
        split_batches=accelerator.split_batches, put_on_device=accelerator.device_placement,
        rng_types=accelerator.rng_types.copy(), dispatch_batches=False, even_batches=accelerator.even_batches,
        use_seedable_sampler=accelerator.use_seedable_sampler, data_seed=config.data_seed,
        non_blocking=accelerator.non_blocking, use_stateful_dataloader=accelerator.use_stateful_dataloader)
    accelerator._dataloaders.append(loader)   # as accelerator.prepare_data_loader does: save_state / load_state
    return loader
