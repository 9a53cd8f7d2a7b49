"""Communication of sequence parallelism: ring exchanges, all-to-all, checks, under timeouts.

Every collective here waits with the group's timeout and turns a failure (a rank that died, hung,
or called something else) into a ``MemoError`` naming this rank, the peers and the operation, so a
job fails within the timeout instead of hanging.

# NOTE [ Ring exchange life cycle ]
#
# 1. ``RingExchange(sp, what)`` is QUEUED: ``send_recv(tensors)`` may add tensors; each gets an
#    empty receive buffer of its shape and dtype.
# 2. ``commit()`` starts every send to the next ring rank and receive from the previous one
#    (``batch_isend_irecv``): COMMITTED. Tensors handed to ``send_recv`` must not be written
#    until ``wait()`` returns.
# 3. ``wait()`` blocks (up to the timeout) until all of them completed: WAITED; it returns the
#    receive buffers. Waiting before committing, or committing twice, is a bug and raises.
"""

from __future__ import annotations

import enum
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from memo.errors import MemoError
from memo.parallel.groups import SequenceParallel

# Messages started by this process (each p2p batch, all-to-all or all-reduce counts one). Tests read it
# to check that recomputation sends nothing.
MESSAGES = {"count": 0}


def _failed(sp: SequenceParallel, what: str, peers: Sequence[int], e: Exception) -> MemoError:
    return MemoError(
        f"memo.parallel: rank {dist.get_rank()} gave up on {what} with rank(s) "
        f"{sorted(set(peers) - {dist.get_rank()})} "
        f"(timeout {sp.timeout_s:g} s): {e}. A rank died, hung, or ran a different step; check the other ranks' "
        f"logs, or raise the timeout with MemoConfig(sp_timeout_s=...) / MEMO_SP_TIMEOUT_S if a step is just slow")


def _wait(sp: SequenceParallel, work, what: str, peers: Sequence[int]) -> None:
    try:
        work.wait(timeout=sp.timeout)
    except Exception as e:   # gloo/NCCL raise RuntimeError or DistBackendError subclasses
        raise _failed(sp, what, peers, e) from e


class ExchangeState(enum.Enum):
    QUEUED = "queued"
    COMMITTED = "committed"
    WAITED = "waited"


class RingExchange:
    """One step of the ring: send to the next ring rank, receive from the previous one.

    See NOTE [ Ring exchange life cycle ].
    """

    def __init__(self, sp: SequenceParallel, what: str) -> None:
        self.sp = sp
        self.what = what
        self.state = ExchangeState.QUEUED
        self.next = sp.ring_peer(sp.ring_rank + 1)
        self.prev = sp.ring_peer(sp.ring_rank - 1)
        self.ops: list = []
        self.received: list[torch.Tensor] = []
        self.works: list = []

    def send_recv(self, tensors: Sequence[torch.Tensor]) -> None:
        if self.state is not ExchangeState.QUEUED:
            raise AssertionError(f"memo.parallel: {self.what}: send_recv after commit (bug in memo)")
        for t in tensors:
            t = t.contiguous()
            buf = torch.empty_like(t)
            self.ops.append(dist.P2POp(dist.isend, t, self.next, self.sp.ring_group))
            self.ops.append(dist.P2POp(dist.irecv, buf, self.prev, self.sp.ring_group))
            self.received.append(buf)

    def commit(self) -> "RingExchange":
        if self.state is not ExchangeState.QUEUED:
            raise AssertionError(f"memo.parallel: {self.what}: committed twice (bug in memo)")
        self.state = ExchangeState.COMMITTED
        MESSAGES["count"] += 1
        try:
            self.works = dist.batch_isend_irecv(self.ops)
        except Exception as e:
            raise _failed(self.sp, self.what, [self.next, self.prev], e) from e
        return self

    def wait(self) -> list[torch.Tensor]:
        if self.state is not ExchangeState.COMMITTED:
            raise AssertionError(f"memo.parallel: {self.what}: wait in state {self.state.value} (bug in memo)")
        for w in self.works:
            _wait(self.sp, w, self.what, [self.next, self.prev])
        self.state = ExchangeState.WAITED
        self.ops = []
        return self.received


def all_to_all(sp: SequenceParallel, x: torch.Tensor, what: str) -> torch.Tensor:
    """``all_to_all_single`` over the Ulysses group: slice j of dim 0 goes to Ulysses rank j."""
    x = x.contiguous()
    out = torch.empty_like(x)
    MESSAGES["count"] += 1
    peers = [sp.ranks[i] for i in sp.ulysses_peers()]
    try:
        work = dist.all_to_all_single(out, x, group=sp.ulysses_group, async_op=True)
    except Exception as e:
        raise _failed(sp, what, peers, e) from e
    _wait(sp, work, what, peers)
    return out


def all_gather(sp: SequenceParallel, x: torch.Tensor, what: str, group=None, peers=None) -> list[torch.Tensor]:
    group = sp.group if group is None else group
    peers = sp.ranks if peers is None else peers
    x = x.contiguous()
    out = [torch.empty_like(x) for _ in range(len(peers))]
    MESSAGES["count"] += 1
    try:
        work = dist.all_gather(out, x, group=group, async_op=True)
    except Exception as e:
        raise _failed(sp, what, peers, e) from e
    _wait(sp, work, what, peers)
    return out


def all_reduce(sp: SequenceParallel, x: torch.Tensor, what: str, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In place over the whole group; returns ``x``."""
    MESSAGES["count"] += 1
    try:
        work = dist.all_reduce(x, op=op, group=sp.group, async_op=True)
    except Exception as e:
        raise _failed(sp, what, sp.ranks, e) from e
    _wait(sp, work, what, sp.ranks)
    return x


def check_same(sp: SequenceParallel, what: str, names: Sequence[str], values: Sequence[int],
               device: Optional[torch.device] = None) -> None:
    """Raise the same MemoError on every rank if ``values`` differ between the group's ranks.

    Every rank gathers every rank's values, so all of them see a difference and raise together
    instead of hanging in a later exchange. A ``(what, values)`` already checked in the current
    ``sp.generation`` is skipped: within one generation every rank has passed the same first check,
    so their values agree unless the ranks diverge inside it; a new generation checks again.
    """
    key = (sp.generation, what, tuple(values))
    if key in sp.checked or sp.size == 1:   # one rank: nothing to compare with
        return
    t = torch.tensor([len(values), *values], dtype=torch.int64, device=device)
    gathered = [g.cpu().tolist() for g in all_gather(sp, t, f"{what} check")]
    if any(g != gathered[0] for g in gathered):
        rows = "; ".join(f"rank {sp.ranks[i]}: " + ", ".join(f"{n}={v}" for n, v in zip(names, g[1:]))
                         for i, g in enumerate(gathered))
        raise MemoError(f"memo.parallel: {what} differs between the ranks of one sequence ({rows}); every rank "
                        f"must call with the same batch, heads, head_dim, dtype and local length (shard one batch "
                        f"with memo.parallel.shard_batch)")
    sp.checked = {k for k in sp.checked if k[0] == sp.generation}
    sp.checked.add(key)
