"""MemoConfig: what a user chooses. Every default says why it is what it is."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Union

import torch

from memo.errors import MemoError
from memo.planner.units import UnitError, parse_bytes

_OFFLOAD_DTYPES = ("keep", "bf16", "fp16")

# NOTE [ Collective timeouts ]
#
# 1. torch hands a collective's timeout to gloo and NCCL in whole milliseconds (truncated), and a
#    timeout of 0 ms means "the process group's default": below 1 ms the timeout silently became
#    the default (a peer waited 20 s at sp_timeout_s=1e-4). SP_TIMEOUT_MIN_S is therefore 1 ms.
# 2. ``inf`` cannot become a timedelta (an OverflowError, which then read as a dead rank), and
#    past about 1e13 s gloo's deadline arithmetic overflows and the wait fails at once. Up to
#    SP_TIMEOUT_MAX_S = 1e9 s (31 years) the wait is honoured, and a deadline of now + timeout
#    still fits int64 nanoseconds. There is no "never": pass a long timeout instead.
# 3. ``sp_timeout_s`` is checked against both wherever it is accepted: MemoConfig (and its default,
#    MEMO_SP_TIMEOUT_S), MemoPlugin and ``memo.parallel.sequence_parallel(timeout_s=...)``.
SP_TIMEOUT_MIN_S = 0.001
SP_TIMEOUT_MAX_S = 1e9


# NOTE [ A plan decides the layers ]
#
# 1. With MemoConfig(plan=...), the plan decides each layer's policy ("memo", "input", "kept"), so
#    which last layers stay on the device, its alpha and, under tile_tokens="auto", the MLP tile:
#    its memory and times were computed for exactly those.
# 2. keep_last_layers left at its default: the plan's kept layers are used, silently (the default
#    2 is what runs without a plan; the planner chooses 0..4 by itself).
# 3. keep_last_layers given (even as 2) and different from the plan's kept layers: a contradiction,
#    refused at memo.wrap with a MemoError naming both and the two fixes (drop keep_last_layers, or
#    make the plan with `memo plan --keep-layers N`). The default is a ``_Default`` int, so that
#    MemoConfig tells it from the same value passed explicitly (``keep_last_layers_given``).
# 4. swap_ratio other than "auto" and different from the plan's alpha: the plan's alpha is used, with
#    a warning (alpha changes only the swap/recompute split, not which layers run what).
class _Default(int):
    """An int default MemoConfig can tell from the same value given (NOTE [ A plan decides the layers ])."""


DEFAULT_KEEP_LAST_LAYERS = _Default(2)


def default_sp_timeout() -> tuple[Any, str]:
    """(sp_timeout_s when none is given, where it came from): MEMO_SP_TIMEOUT_S, else 300 s. A variable
    that is not a number is refused naming it (it once stopped ``import memo`` with a bare ValueError)."""
    text = os.environ.get("MEMO_SP_TIMEOUT_S")
    if text is None or not text.strip():
        return 300.0, "sp_timeout_s"
    try:
        return float(text), "MEMO_SP_TIMEOUT_S"
    except ValueError:
        raise MemoError(f"memo.config: MEMO_SP_TIMEOUT_S={text!r} is not a number of seconds; set it to seconds "
                        f"from {SP_TIMEOUT_MIN_S:g} to {SP_TIMEOUT_MAX_S:g}, e.g. 300, or unset it") from None


def sp_timeout_problem(value: Any) -> Optional[str]:
    """NOTE [ Collective timeouts ]: None when ``value`` is a timeout the backends honour, else what
    is wrong with it and what to pass, to follow ``<where>=<value> ``."""
    import math
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return (f"is not a finite number of seconds; pass seconds from {SP_TIMEOUT_MIN_S:g} (1 ms) to "
                f"{SP_TIMEOUT_MAX_S:g}, e.g. 300 (there is no 'never': pass a long timeout such as 86400)")
    if not SP_TIMEOUT_MIN_S <= value <= SP_TIMEOUT_MAX_S:
        return (f"must be a positive number of seconds from {SP_TIMEOUT_MIN_S:g} to {SP_TIMEOUT_MAX_S:g}: gloo and "
                f"NCCL count whole milliseconds, so under 1 ms the timeout would silently become the process "
                f"group's default, and past {SP_TIMEOUT_MAX_S:g} s their deadlines overflow; pass e.g. 300")
    return None


def _available_host_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux); total physical memory otherwise."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError as e:
        raise MemoError("memo.config: cannot read /proc/meminfo to size the host budget; "
                        "pass MemoConfig(host_memory_budget='64GiB')") from e
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@dataclass
class MemoConfig:
    # Fraction of each non-input, non-attention activation's tokens that is swapped; the rest is
    # recomputed token-wise before the backward. "auto" measures a few steps (layer times from
    # device events, copy bandwidth from the copies) and keeps the ratio with the smallest step
    # time the host budget allows: NOTE [ Auto swap ratio ] in memo/auto_ratio.py.
    swap_ratio: Union[float, str] = "auto"
    # Host bytes this rank may use for swapped activations. None: half of the memory available
    # now, divided among the ranks of this node (LOCAL_WORLD_SIZE), so the OS and data loaders keep
    # the rest. Accepts ints or strings such as "64GiB".
    host_memory_budget: Union[int, str, None] = None
    # The paper keeps the last two layers on the device: their backward starts right after their
    # forward, so swapping them out would only be copied straight back. With a plan, the plan's kept
    # layers; given and different from the plan's: refused (NOTE [ A plan decides the layers ]).
    keep_last_layers: int = DEFAULT_KEEP_LAST_LAYERS
    # Tokens per chunk of the LM head and loss, so (sequence x vocabulary) logits never exist.
    # 4096 tokens x 128K vocabulary x fp32 = 2 GiB per chunk. None leaves the model's own loss.
    loss_chunk_size: Optional[int] = 4096
    # With the chunked loss, the decoder's final norm runs chunk by chunk inside it, so no normed
    # (sequence x hidden) tensor, its gradient or its fp32 intermediates exist (NOTE [ Chunked loss
    # with the final norm ] in memo/loss.py). False applies the norm to the whole sequence first.
    fuse_final_norm: bool = True
    # "keep" swaps activations in their own dtype (exact). "bf16"/"fp16" store fp32 activations at
    # half size on the host (lossy: gradients are then no longer bit-exact).
    offload_dtype: str = "keep"
    # A plan file from `memo plan --out` (a path): its layer policies, kept layers, alpha, tile (under
    # tile_tokens="auto") and arena offsets are used (NOTE [ A plan decides the layers ]).
    plan: Optional[str] = None
    # Serve the swapped layers' device allocations at the plan's Level-1 offsets, from one arena
    # per GPU (memo's allocator replaces PyTorch's: NOTE [ Planned memory at run time ] in
    # memo/planned_memory.py). Off by default: it must be installed before CUDA is first used.
    planned_memory: bool = False
    # Sequence parallelism: P ranks share one sequence (each holds S/P tokens). None or 1: off. The
    # world is split into consecutive blocks of P ranks (data parallel x sequence parallel), or pass
    # the group itself as sequence_parallel_group.
    sequence_parallel_size: Optional[int] = None
    sequence_parallel_group: Any = None
    # "ring" (default: no head-count limit, communication overlaps compute), "ulysses" (all-to-all
    # over heads; heads must split over the ranks) or "hybrid" (Ulysses inside groups of
    # ulysses_size consecutive ranks, by default the ranks of a node, ring across them).
    sp_backend: str = "ring"
    # "zigzag" balances causal work over the ranks; "contiguous" is the simple split.
    sp_layout: str = "zigzag"
    ulysses_size: Optional[int] = None
    # Every collective waits at most this long, so a dead rank fails the others instead of hanging.
    # None: MEMO_SP_TIMEOUT_S, else 300 s (long enough for a slow first step at 1M tokens). From
    # 0.001 s (the backends count whole milliseconds) to 1e9 s: NOTE [ Collective timeouts ].
    sp_timeout_s: Optional[float] = None
    # Tokens per tile of each decoder layer's MLP (NOTE [ Token tiling ] in memo/tiling.py): its
    # intermediates (batch x tile x intermediate) and their gradients exist one tile at a time, at the
    # cost of one more MLP forward in backward. "auto" tiles only sequences longer than 4096 tokens,
    # where the intermediates are what limits memory; None never tiles; an int is the tile.
    tile_tokens: Union[None, int, str] = "auto"
    # Off switch that keeps call sites unchanged (`memo.wrap(model, MemoConfig(enabled=False))`).
    enabled: bool = True
    # Resolved byte budget (filled in by __post_init__).
    host_budget_bytes: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        if isinstance(self.swap_ratio, str):
            if self.swap_ratio != "auto":
                try:
                    self.swap_ratio = float(self.swap_ratio)
                except ValueError as e:
                    raise MemoError(f"memo.config: swap_ratio={self.swap_ratio!r} is neither a number nor "
                                    f"'auto'; use a float in [0, 1] or 'auto'") from e
        if not isinstance(self.swap_ratio, str):
            if isinstance(self.swap_ratio, bool) or not 0.0 <= float(self.swap_ratio) <= 1.0:
                raise MemoError(f"memo.config: swap_ratio={self.swap_ratio!r} is outside [0, 1]; use a fraction "
                                f"of tokens to swap (1.0 swaps all, 0.0 recomputes all) or 'auto'")
            self.swap_ratio = float(self.swap_ratio)
        if isinstance(self.keep_last_layers, bool) or not isinstance(self.keep_last_layers, int) or \
                self.keep_last_layers < 0:
            raise MemoError(f"memo.config: keep_last_layers={self.keep_last_layers!r} must be an int >= 0")
        self.keep_last_layers_given = type(self.keep_last_layers) is not _Default
        self.keep_last_layers = int(self.keep_last_layers)
        if self.plan is not None:
            if isinstance(self.plan, os.PathLike):
                self.plan = os.fspath(self.plan)
            if not isinstance(self.plan, str) or not self.plan:
                # an int would be opened as a file descriptor: plan=0 read the process's stdin
                raise MemoError(f"memo.config: plan={self.plan!r} is not a path; pass the path of the plan file "
                                f"written by `memo plan ... --out plan.json`, or None")
        if not isinstance(self.fuse_final_norm, bool):
            raise MemoError(f"memo.config: fuse_final_norm={self.fuse_final_norm!r} must be True or False")
        if self.loss_chunk_size is not None and (not isinstance(self.loss_chunk_size, int) or self.loss_chunk_size <= 0):
            raise MemoError(f"memo.config: loss_chunk_size={self.loss_chunk_size!r} must be a positive int or None")
        from memo.tiling import check_tile_setting
        self.tile_tokens = check_tile_setting(self.tile_tokens)
        if self.offload_dtype not in _OFFLOAD_DTYPES:
            raise MemoError(f"memo.config: offload_dtype={self.offload_dtype!r} is not one of {_OFFLOAD_DTYPES}")
        from memo.parallel.groups import BACKENDS
        from memo.parallel.layout import LAYOUTS
        if self.sp_backend not in BACKENDS:
            raise MemoError(f"memo.config: sp_backend={self.sp_backend!r} is not one of {BACKENDS}")
        if self.sp_layout not in LAYOUTS:
            raise MemoError(f"memo.config: sp_layout={self.sp_layout!r} is not one of {LAYOUTS}")
        if self.sequence_parallel_size is not None and (isinstance(self.sequence_parallel_size, bool) or not isinstance(
                self.sequence_parallel_size, int) or self.sequence_parallel_size < 1):
            raise MemoError(f"memo.config: sequence_parallel_size={self.sequence_parallel_size!r} must be an int >= 1")
        where = "sp_timeout_s"
        if self.sp_timeout_s is None:
            self.sp_timeout_s, where = default_sp_timeout()
        problem = sp_timeout_problem(self.sp_timeout_s)
        if problem:
            raise MemoError(f"memo.config: {where}={self.sp_timeout_s!r} {problem}")
        self.sp_timeout_s = float(self.sp_timeout_s)
        if self.planned_memory and self.plan is None:
            raise MemoError("memo.config: planned_memory=True needs MemoConfig(plan='plan.json'), the plan whose "
                            "offsets the arena serves; make one with `memo plan ... --out plan.json`")
        sp = self.sequence_parallel_group is not None or (self.sequence_parallel_size or 1) > 1
        if self.planned_memory and sp:
            # Under a pluggable allocator record_stream does nothing (NOTE [ Pluggable allocator contract ]
            # in csrc/cuda/arena_alloc.cu), and NCCL relies on it unless TORCH_NCCL_AVOID_RECORD_STREAMS=1.
            raise MemoError("memo.config: planned_memory=True is not supported with sequence parallelism yet (NCCL's "
                            "buffers rely on record_stream, which memo's allocator cannot honour); drop planned_memory "
                            "or run without sequence_parallel_size")
        if self.host_memory_budget is None:
            local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
            self.host_budget_bytes = _available_host_bytes() // 2 // max(local, 1)
        else:
            try:
                self.host_budget_bytes = parse_bytes(self.host_memory_budget)
            except UnitError as e:
                raise MemoError(f"memo.config: host_memory_budget: {e}") from e

    @property
    def offload_torch_dtype(self) -> Optional[torch.dtype]:
        return {"keep": None, "bf16": torch.bfloat16, "fp16": torch.float16}[self.offload_dtype]

    @property
    def sequence_parallel(self) -> bool:
        return self.sequence_parallel_group is not None or (self.sequence_parallel_size or 1) > 1

    def to_dict(self) -> dict:
        group, self.sequence_parallel_group = self.sequence_parallel_group, None   # not copyable
        try:
            out = asdict(self)
        finally:
            self.sequence_parallel_group = group
        out["sequence_parallel_group"] = None if group is None else repr(group)
        return out
