"""Sequence parallelism: groups, layouts, sharding and communication under timeouts."""

from memo.parallel.groups import SequenceParallel, sequence_parallel
from memo.parallel.layout import shard_indices
from memo.parallel.sharding import all_reduce_gradients, gather_sequence, shard_batch, shard_sequence

__all__ = ["SequenceParallel", "sequence_parallel", "shard_indices", "shard_sequence", "gather_sequence",
           "shard_batch", "all_reduce_gradients"]
