"""memo under torch's FSDP2: ``fully_shard`` a memo-wrapped model, with sequence parallelism.

    dist.init_process_group(...)
    model = memo.wrap(model, memo.MemoConfig(sequence_parallel_size=2, swap_ratio=0.5))
    memo.integrations.fsdp.fully_shard(model)            # over all ranks; or mesh=init_device_mesh(...)
    optimizer = torch.optim.AdamW(model.parameters())     # made after sharding: it holds the shards
    for batch in loader:                                  # this replica's batches (rank // P of W / P)
        loss = model(**memo.parallel.shard_batch(batch, group=model)).loss
        loss.backward(); optimizer.step(); optimizer.zero_grad()

Each decoder layer is one FSDP unit, then the root (embeddings, final norm, LM head). Weights,
gradients and optimizer states are 1/W per rank over a one-dimensional mesh of all W ranks, 1/S
over a (replicate, shard) mesh of shard size S.

# NOTE [ FSDP2 and sequence parallelism ]
#
# 1. Gradients are those of NOTE [ Gradients under data x sequence parallelism ] in
#    integrations/accelerate.py: the SUM over all W ranks divided by the W/P data-parallel replicas.
#    FSDP2 averages over its mesh, all W ranks, P times too little (measured on 2 gloo ranks, SP 2:
#    every gradient exactly half the whole sequence's).
# 2. ``fully_shard`` sets every unit's gradient divide factor to W/P and makes FSDP2 use sum-only
#    collectives (``set_force_sum_reduction_for_comms``): the reduce-scatter over the shard dimension
#    (and the all-reduce over the replicate dimension of a 2-D mesh) SUM, then FSDP2 divides the
#    reduced shard by W/P. Without the force FSDP2 would ask for ReduceOp.PREMUL_SUM(P/W), which gloo
#    refuses ("Cannot use ReduceOp.PREMUL_SUM with Gloo"); with it gloo and NCCL run the same
#    collectives, and no loss or gradient is rescaled by P anywhere. (NCCL could fold the division
#    into a PREMUL_SUM; one division of the 1/W shard per unit costs less than a note on which
#    backend rounds how.) With P = 1 FSDP2's own reduction is left as it is.
# 3. The mesh: None is all W ranks in one dimension. A 2-D mesh is (replicate, shard) (HSDP). The P
#    ranks sharing a sequence must lie in one shard group (they shard the weights among themselves;
#    the replicate dimension runs over data-parallel replicas only), so R divides the W/P replicas;
#    ``init_device_mesh(device, (W // P, P), mesh_dim_names=("replicate", "shard"))`` is the layout of
#    memo's groups (consecutive blocks of P ranks). Any other mesh is refused on every rank at once.
# 4. Whole weights in recompute. ``fully_shard`` registers FSDP2's hooks on the decoder layer module,
#    and memo's layer forward is that module's ``forward`` (memo.wrap), so: the pre-forward hook
#    all-gathers the layer's weights before memo traces, classifies (by storage: the unsharded
#    parameters) and saves; the post-forward hook reshards them (their storage freed, the saved
#    references kept); the pre-backward hook, on the layer's outputs, all-gathers them again when the
#    gradient reaches the layer, before any node inside the layer unpacks a saved tensor, so before
#    memo's recompute (memo/executor.py ``materialize``), which calls the layer's original forward
#    directly and reads the unsharded parameters FSDP2 set on the modules. The layer reshards in its
#    post-backward hook, after its backward. tests/sp_workers/fsdp_cases.py records the weights each
#    recompute sees.
# 5. Refused: a model that DeepSpeed holds (ZeRO-3 hooks, leaf-module marks, an engine) or that FSDP1
#    or FSDP2 already wraps; DeepSpeed refuses a model this module sharded
#    (memo.integrations.deepspeed). FSDP1 has no per-unit divide factor, so sequence parallelism
#    under it is refused (memo.integrations.accelerate.prepare).
"""

from __future__ import annotations

from typing import Optional

from memo.errors import MemoError

_WHO = "memo.integrations.fsdp"


def is_sharded(model) -> bool:
    """Whether ``model`` or one of its modules is sharded by FSDP2 (``fully_shard``) or FSDP1."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    return any(isinstance(m, (FSDPModule, FullyShardedDataParallel)) for m in model.modules())


def _check_not_deepspeed(model) -> None:
    if type(model).__name__ == "DeepSpeedEngine":
        raise MemoError(f"{_WHO}.fully_shard: got a DeepSpeedEngine; FSDP2 and DeepSpeed both shard the weights and "
                        f"cannot be mixed. Pass the memo-wrapped model itself and do not call deepspeed.initialize")
    for name, m in model.named_modules():
        if getattr(m, "_z3_leaf", False) or hasattr(m, "ds_id") or any(
                hasattr(p, "ds_id") for p in m.parameters(recurse=False)):
            raise MemoError(f"{_WHO}.fully_shard: module {name or 'the model'} carries DeepSpeed ZeRO marks (a "
                            f"ZeRO-3 leaf module, hook or partitioned parameter); FSDP2 and DeepSpeed cannot be "
                            f"mixed. Use one of them: fully_shard on a model DeepSpeed never saw, or "
                            f"memo.integrations.deepspeed.initialize without fully_shard")


def _layers(model) -> list:
    from memo.wrap import _find_layers, runtime_of
    try:
        return list(runtime_of(model).layers)
    except MemoError:   # memo not on the model (MemoConfig(enabled=False)): its decoder layers all the same
        return list(_find_layers(model)[1])


def _sequence_parallel_size(model) -> tuple[int, Optional[list]]:
    from memo.wrap import runtime_of
    try:
        sp = runtime_of(model).sp
    except MemoError:
        return 1, None
    return (1, None) if sp is None else (sp.size, list(sp.ranks))


def _check_mesh(mesh, world: int, sp_size: int, sp_ranks: Optional[list]) -> Optional[str]:
    """What is wrong with ``mesh`` for this rank (NOTE [ FSDP2 and sequence parallelism ] rule 3), or None."""
    import torch.distributed as dist
    shape = tuple(mesh.mesh.shape)
    if mesh.mesh.numel() != world:
        return (f"the mesh {shape} holds {mesh.mesh.numel()} ranks, the world {world}; FSDP2 under memo shards over "
                f"every rank (its gradient division counts W/P replicas of the whole world)")
    if mesh.ndim == 1:
        return None
    if mesh.ndim != 2:
        return f"the mesh has {mesh.ndim} dimensions; use one (shard) or two (replicate, shard)"
    if sp_ranks is None:
        return None
    rank = dist.get_rank()
    row = next(r for r in mesh.mesh.tolist() if rank in r)
    if not set(sp_ranks) <= set(row):
        return (f"rank {rank}'s shard group {row} (replicate x shard = {shape[0]} x {shape[1]}) does not hold its "
                f"sequence-parallel group {sp_ranks}: the replicate dimension must run over data-parallel replicas "
                f"only, so its size must divide the {world // sp_size} replicas; use init_device_mesh(device, "
                f"({world // sp_size}, {sp_size}), mesh_dim_names=('replicate', 'shard')) or mesh=None")
    return None


def check_mesh(model, mesh) -> None:
    """Refuse, on every rank at once, a mesh that does not fit ``model``'s sequence-parallel groups
    (NOTE [ FSDP2 and sequence parallelism ] rule 3): one rank raising alone would leave the others
    waiting in their first all-gather. A collective: every rank calls it."""
    import torch.distributed as dist
    world = dist.get_world_size()
    sp_size, sp_ranks = _sequence_parallel_size(model)
    problems = [None] * world
    dist.all_gather_object(problems, _check_mesh(mesh, world, sp_size, sp_ranks))
    bad = next((p for p in problems if p is not None), None)
    if bad is not None:
        raise MemoError(f"{_WHO}: {bad}")


def sum_over_sequence_mean_over_data(model) -> None:
    """Make every FSDP2 unit of ``model`` reduce gradients as NOTE [ FSDP2 and sequence parallelism ]
    rule 2 says: summed over all ranks, divided by the W/P replicas. Nothing to do without sequence
    parallelism."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule
    sp_size, _ = _sequence_parallel_size(model)
    if sp_size == 1:
        return
    replicas = dist.get_world_size() // sp_size
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(float(replicas))
            m.set_force_sum_reduction_for_comms(True)


def sharding_mesh(model):
    """The DeviceMesh the parameters of an FSDP2-sharded ``model`` are sharded over."""
    from torch.distributed.tensor import DTensor
    mesh = next((p.device_mesh for p in model.parameters() if isinstance(p, DTensor)), None)
    if mesh is None:
        raise MemoError(f"{_WHO}: the model has no parameter sharded by FSDP2 (no DTensor); shard it with "
                        f"memo.integrations.fsdp.fully_shard")
    return mesh


def fully_shard(model, mesh=None, **fsdp_kwargs):
    """Shard the memo-wrapped ``model`` with FSDP2: each decoder layer a unit, then the root.

    ``mesh``: a ``DeviceMesh`` of all ranks, one dimension (shard) or two (replicate, shard); None
    is all ranks in one dimension on the model's device type. ``fsdp_kwargs`` go to
    ``torch.distributed.fsdp.fully_shard`` (``reshard_after_forward``, ``mp_policy``,
    ``offload_policy``, ...). Under memo's sequence parallelism of P ranks the gradients are summed
    over each sequence's P ranks and averaged over the W/P replicas (NOTE [ FSDP2 and sequence
    parallelism ]). Call it after ``memo.wrap`` and before making the optimizer; returns ``model``
    (now an ``FSDPModule``, its parameters DTensor shards). A collective: every rank calls it.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard as torch_fully_shard

    if not dist.is_available() or not dist.is_initialized():
        raise MemoError(f"{_WHO}.fully_shard: torch.distributed is not initialised; call "
                        f"dist.init_process_group(...) (or launch with memo launch / torchrun) first")
    _check_not_deepspeed(model)
    if is_sharded(model):
        raise MemoError(f"{_WHO}.fully_shard: the model is already sharded by FSDP (FSDP1 or FSDP2); call "
                        f"memo.integrations.fsdp.fully_shard once, on the memo-wrapped model as it is")
    if mesh is None:
        mesh = init_device_mesh(next(model.parameters()).device.type, (dist.get_world_size(),))
    check_mesh(model, mesh)
    for layer in _layers(model):
        torch_fully_shard(layer, mesh=mesh, **fsdp_kwargs)
    torch_fully_shard(model, mesh=mesh, **fsdp_kwargs)
    sum_over_sequence_mean_over_data(model)
    return model
