"""Sequence-parallel groups: which ranks share one sequence, and how they split the work.

A ``SequenceParallel`` describes one group of P ranks that together hold one sequence: the
backend (ring, Ulysses or hybrid), the token layout (NOTE [ Sequence layouts ]), the ring and
Ulysses sub-groups, and the timeout every collective runs under. Custom ops cannot take a
process group as an argument, so each object gets an integer id in a registry (``lookup``).
"""

from __future__ import annotations

import datetime
import math
import os
from dataclasses import dataclass, field
from typing import Optional

import torch.distributed as dist

from memo.errors import MemoError
from memo.parallel.layout import check_layout

BACKENDS = ("ring", "ulysses", "hybrid")
# Long enough for a slow first step (kernels warming up, a 1M-token layer), short enough that a dead
# rank is reported within minutes instead of hanging a job for NCCL's default 10 minutes.
# MEMO_SP_TIMEOUT_S, checked where a timeout is taken (memo.config.default_sp_timeout names a bad value);
# not a number here reads as nan, which sequence_parallel() and MemoConfig refuse, so `import memo` works.
try:
    DEFAULT_TIMEOUT_S = float(os.environ.get("MEMO_SP_TIMEOUT_S") or "300")
except ValueError:
    DEFAULT_TIMEOUT_S = float("nan")

_REGISTRY: dict[int, "SequenceParallel"] = {}


@dataclass(eq=False)
class SequenceParallel:
    group: object                    # the ProcessGroup of all P ranks
    ranks: list[int]                 # global ranks of the group, in group order
    backend: str = "ring"
    layout: str = "zigzag"
    ulysses_size: int = 1            # U: Ulysses degree (1 for the ring, P for Ulysses)
    ulysses_group: object = None     # ranks rank//U*U ... +U-1 of the group (None when U == 1)
    ring_group: object = None        # ranks with the same rank % U (None when U == P)
    timeout_s: float = DEFAULT_TIMEOUT_S
    id: int = field(default=0, init=False)
    checked: set = field(default_factory=set, init=False)   # signatures already checked across ranks
    # check_same skips a signature it checked in the same generation. Callers bump the generation
    # at a point every rank passes together (memo.wrap: each forward; ring_attention: each call),
    # so no rank skips a check that another one makes (NOTE in memo.parallel.comm.check_same).
    generation: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.id = max(_REGISTRY, default=0) + 1
        _REGISTRY[self.id] = self

    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def rank(self) -> int:
        """This process's index in the group."""
        return self.ranks.index(dist.get_rank())

    @property
    def ring_size(self) -> int:
        return self.size // self.ulysses_size

    @property
    def ring_rank(self) -> int:
        return self.rank // self.ulysses_size

    @property
    def ulysses_rank(self) -> int:
        return self.rank % self.ulysses_size

    def ring_peer(self, ring_rank: int) -> int:
        """Global rank of ring position ``ring_rank`` (same Ulysses index as this rank)."""
        return self.ranks[(ring_rank % self.ring_size) * self.ulysses_size + self.ulysses_rank]

    def ulysses_peers(self) -> list[int]:
        """Group indices of this rank's Ulysses group, in order."""
        start = self.ring_rank * self.ulysses_size
        return list(range(start, start + self.ulysses_size))

    @property
    def timeout(self) -> datetime.timedelta:
        return datetime.timedelta(seconds=self.timeout_s)

    def describe(self) -> str:
        return (f"{self.backend} over {self.size} ranks {self.ranks} ({self.layout} layout"
                + (f", Ulysses {self.ulysses_size} x ring {self.ring_size}" if self.backend == "hybrid" else "") + ")")


@dataclass(eq=False)
class OneProcess(SequenceParallel):
    """The whole sequence on this process, with no process group and no messages: what memo's attention op
    runs under for packed documents without sequence parallelism (a ring of one; NOTE [ Packed documents ])."""

    @property
    def rank(self) -> int:
        return 0


_ONE: list[OneProcess] = []


def one_process() -> OneProcess:
    """The process-wide ``OneProcess`` (torch.distributed not needed)."""
    if not _ONE:
        _ONE.append(OneProcess(group=None, ranks=[0], backend="ring", layout="contiguous"))
    return _ONE[0]


def lookup(sp_id: int) -> SequenceParallel:
    try:
        return _REGISTRY[sp_id]
    except KeyError:
        raise AssertionError(f"memo.parallel: unknown sequence-parallel id {sp_id} (bug in memo)") from None


def _require_dist() -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise MemoError("memo.parallel: torch.distributed is not initialised; call "
                        "torch.distributed.init_process_group(...) (or launch with torchrun / accelerate) before "
                        "using sequence parallelism")


def _group_ranks(group) -> list[int]:
    if group is None or group is dist.group.WORLD:
        return list(range(dist.get_world_size()))
    return dist.get_process_group_ranks(group)


def sequence_parallel(group=None, *, size: Optional[int] = None, backend: str = "ring", layout: str = "zigzag",
                      ulysses_size: Optional[int] = None, timeout_s: Optional[float] = None) -> SequenceParallel:
    """The sequence-parallel setup for this process.

    ``group``: the ranks sharing one sequence (default: the world). ``size``: instead of a group, split
    the world into consecutive blocks of ``size`` ranks (data parallel x sequence parallel); every rank
    must call this. ``ulysses_size`` (hybrid only): Ulysses degree inside a node; default the ranks per
    node (``LOCAL_WORLD_SIZE``) when it divides the group size.
    """
    from memo.config import default_sp_timeout, sp_timeout_problem   # NOTE [ Collective timeouts ] in memo/config.py
    where = "timeout_s"
    if timeout_s is None:
        timeout_s, where = default_sp_timeout()
    problem = sp_timeout_problem(timeout_s)
    if problem:
        raise MemoError(f"memo.parallel: {where}={timeout_s!r} {problem}")
    timeout_s = float(timeout_s)
    _require_dist()
    if backend not in BACKENDS:
        raise MemoError(f"memo.parallel: sp_backend={backend!r} is not one of {BACKENDS}")
    check_layout(layout)
    world = dist.get_world_size()
    if group is None and size is not None:
        if size < 1 or world % size:
            raise MemoError(f"memo.parallel: sequence_parallel_size={size} does not divide the world size {world}; "
                            f"choose a divisor of {world} (the world forms {world}/size data-parallel replicas)")
        if size == world:
            group = dist.group.WORLD
        else:
            mine = None
            for start in range(0, world, size):   # every rank creates every group, in the same order
                g = dist.new_group(list(range(start, start + size)), timeout=datetime.timedelta(seconds=timeout_s))
                if start <= dist.get_rank() < start + size:
                    mine = g
            group = mine
    ranks = _group_ranks(group)
    if dist.get_rank() not in ranks:
        raise MemoError(f"memo.parallel: rank {dist.get_rank()} is not in the sequence-parallel group {ranks}")
    p = len(ranks)
    if backend == "ring":
        u = 1
    elif backend == "ulysses":
        u = p
    else:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", p))
        u = ulysses_size if ulysses_size is not None else math.gcd(local, p)
        if u < 1 or p % u:
            raise MemoError(f"memo.parallel: hybrid sequence parallelism needs the Ulysses degree {u} to divide the "
                            f"group size {p}; pass ulysses_size= a divisor of {p}")
    sp = SequenceParallel(group=group, ranks=ranks, backend=backend, layout=layout, ulysses_size=u,
                          timeout_s=timeout_s)
    if 1 < u < p:   # hybrid: Ulysses groups of consecutive ranks, rings across them
        # Only this group's members create these (local synchronization): other groups of a larger
        # world create theirs independently, in whatever order.
        td = datetime.timedelta(seconds=timeout_s)
        start = sp.ring_rank * u
        sp.ulysses_group = dist.new_group([ranks[i] for i in range(start, start + u)], timeout=td,
                                          use_local_synchronization=True)
        sp.ring_group = dist.new_group([ranks[i] for i in range(sp.ulysses_rank, p, u)], timeout=td,
                                       use_local_synchronization=True)
    elif u == p:
        sp.ulysses_group = group
    else:
        sp.ring_group = group
    return sp


_SETUPS: dict[tuple, SequenceParallel] = {}


def setup_for(group, backend: str = "ring", layout: str = "zigzag", ulysses_size: Optional[int] = None
              ) -> SequenceParallel:
    """The SequenceParallel for ``group``: itself if it is one, a memo-wrapped model's, or one made once
    per (process group, backend, layout)."""
    if isinstance(group, SequenceParallel):
        return group
    runtime = getattr(group, "_memo_runtime", None)   # a model wrapped by memo.wrap
    if runtime is not None:
        if runtime.sp is None:
            raise MemoError("memo.parallel: this model was wrapped without sequence parallelism; wrap it with "
                            "MemoConfig(sequence_parallel_size=...) or pass a process group")
        return runtime.sp
    key = (id(group), backend, layout, ulysses_size)
    if key not in _SETUPS:
        _SETUPS[key] = sequence_parallel(group, backend=backend, layout=layout, ulysses_size=ulysses_size)
    return _SETUPS[key]
