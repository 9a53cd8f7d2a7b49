"""Which global tokens each sequence-parallel rank holds.

# NOTE [ Sequence layouts ]
#
# 1. ``contiguous``: the sequence of S tokens is cut into P chunks; rank r holds chunk r.
# 2. ``zigzag``: the sequence is cut into 2P chunks; rank r holds chunk r followed by chunk
#    2P-1-r. Under causal attention every rank then does the same work (a rank holding an early
#    chunk also holds a late one).
# 3. A rank's local tokens are always in ascending global order within each chunk, and its
#    chunks are concatenated in the order above.
# 4. Hybrid (Ulysses inside groups of U consecutive ranks, ring across the R = P/U groups) needs
#    no layout of its own: the union of the chunks of ranks gU..gU+U-1 is, in ascending order,
#    exactly what rank g of a ring of R ranks holds under the same layout with 2R (zigzag) or R
#    (contiguous) chunks. So a batch sharded for P ranks serves ring, Ulysses and hybrid alike.
"""

from __future__ import annotations

import torch

from memo.errors import MemoError

LAYOUTS = ("zigzag", "contiguous")


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise MemoError(f"memo.parallel: layout={layout!r} is not one of {LAYOUTS}; use 'zigzag' (balanced causal "
                        f"work, the default) or 'contiguous'")


def num_chunks(world: int, layout: str) -> int:
    check_layout(layout)
    return 2 * world if layout == "zigzag" else world


def check_divisible(seq_len: int, world: int, layout: str, what: str = "sequence length") -> None:
    chunks = num_chunks(world, layout)
    if seq_len % chunks:
        raise MemoError(f"memo.parallel: {what} {seq_len} does not split into {chunks} equal chunks "
                        f"({layout} layout over {world} ranks); pad it to a multiple of {chunks} "
                        f"(memo.parallel.shard_batch pads with ignored labels) ")


def chunk_ids(world: int, rank: int, layout: str) -> list[int]:
    """The chunks rank ``rank`` holds, in local order. See NOTE [ Sequence layouts ]."""
    if layout == "zigzag":
        return [rank, 2 * world - 1 - rank]
    check_layout(layout)
    return [rank]


def shard_indices(seq_len: int, world: int, rank: int, layout: str, device=None) -> torch.Tensor:
    """Global token positions of rank ``rank``'s shard, in local order: (seq_len // world,) int64."""
    check_divisible(seq_len, world, layout)
    size = seq_len // num_chunks(world, layout)
    return torch.cat([torch.arange(c * size, (c + 1) * size, device=device) for c in chunk_ids(world, rank, layout)])


def all_shard_indices(seq_len: int, world: int, layout: str, device=None) -> torch.Tensor:
    """(world, seq_len // world): row r is ``shard_indices(..., rank=r)``."""
    return torch.stack([shard_indices(seq_len, world, r, layout, device) for r in range(world)])
