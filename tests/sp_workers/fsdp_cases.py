"""memo + FSDP2 (memo.integrations.fsdp.fully_shard) under data x sequence parallelism, on gloo.

``main(rank, world, sp)``: W = world ranks, sequence parallelism P = sp, W/P data-parallel replicas.
Replica d = rank // P trains on sequence ``100 + step * replicas + d`` of every step.

- ``runs``: for each mesh (``flat``: all W ranks in one dimension; ``hsdp`` when W > P: replicate
  W/P x shard P), a memo-wrapped Llama (swap ratio 0.5) sharded with ``fully_shard``, three AdamW
  steps; ``zero3``: the same under DeepSpeed ZeRO-3 (memo.integrations.deepspeed). Reported: every step's loss (the replica's whole-sequence loss), the whole gradient of
  step 1 and the gradient norm of every step (gathered from the shards), the parameters after
  the last step, this rank's parameter bytes against the model's, and what every recompute saw.
- ``reference`` (rank 0): one process, no memo, no FSDP, on the same sequences (the W/P replicas'
  sequences one after another, gradients accumulated with weight 1/(W/P)), in fp32 and fp64.
- ``refusals``: a mesh whose shard groups split a sequence-parallel group (two layouts), a model
  DeepSpeed prepared, DeepSpeed on a sharded model, sharding twice.
"""

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor

import memo
import memo.executor
from memo.integrations import fsdp as memo_fsdp
from memo.parallel import shard_batch
from models import build

SEQ, STEPS, LR = 64, 3, 1e-2
MEMO = dict(swap_ratio=0.5, keep_last_layers=1, host_memory_budget="1GiB", sp_timeout_s=60)

_RECOMPUTES: list = []
_FULL_SHAPES: dict = {}
_original_recompute = memo.executor.LayerState._recompute


def _observing_recompute(self, records):
    """Records whether the layer's weights are whole (plain tensors of their full shape, storage
    allocated) while it is recomputed, then runs the real recompute."""
    whole = []
    for name, p in self.layer.named_parameters():   # FSDP2: plain tensors again; ZeRO-3: gathered
        full = _FULL_SHAPES.get((self.index, name))
        whole.append(not isinstance(p, DTensor) and tuple(p.shape) == full
                     and p.untyped_storage().nbytes() >= p.numel() * p.element_size())
    _RECOMPUTES.append({"layer": self.index, "params": len(whole), "whole": all(whole)})
    return _original_recompute(self, records)


memo.executor.LayerState._recompute = _observing_recompute


def _ids(step: int, replica: int) -> torch.Tensor:
    return torch.randint(0, 128, (1, SEQ), generator=torch.Generator().manual_seed(100 + step * 97 + replica))


def _model():
    model = build("llama", seed=0)
    for i, layer in enumerate(model.model.layers):
        for name, p in layer.named_parameters():
            _FULL_SHAPES[(i, name)] = tuple(p.shape)
    return model


def _full(t) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().double().clone()


def train(sp: int, mesh_kind: str, rank: int, world: int) -> dict:
    replicas = world // sp
    model = _model()
    full_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    memo.wrap(model, memo.MemoConfig(sequence_parallel_size=sp, **MEMO))
    mesh = None if mesh_kind == "flat" else init_device_mesh("cpu", (replicas, sp),
                                                             mesh_dim_names=("replicate", "shard"))
    memo_fsdp.fully_shard(model, mesh=mesh)
    local_bytes = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    del _RECOMPUTES[:]
    losses, norms, grads = [], [], None
    for step in range(STEPS):
        ids = _ids(step, rank // sp)
        loss = model(**shard_batch({"input_ids": ids, "labels": ids}, group=model)).loss
        loss.backward()
        full_grads = {n: _full(p.grad) for n, p in model.named_parameters()}
        if step == 0:
            grads = full_grads
        norms.append(torch.stack([g.norm() for g in full_grads.values()]).norm().item())
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach().double())
    st = memo.stats(model)
    return {"losses": torch.stack(losses), "norms": norms, "grads": grads,
            "params": {n: _full(p) for n, p in model.named_parameters()},
            "local_bytes": local_bytes, "full_bytes": full_bytes, "recomputes": list(_RECOMPUTES),
            "recomputed_bytes": sum(layer.recomputed_bytes for layer in st.layers),
            "swapped_bytes": sum(layer.swapped_bytes for layer in st.layers)}


def train_zero3(sp: int, rank: int, world: int) -> dict:
    """The same job under DeepSpeed ZeRO-3 through memo.integrations.deepspeed.initialize (NOTE [ DeepSpeed
    and sequence parallelism ] rule 4), no gradient clipping, torch AdamW on the partitions."""
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    import memo.integrations.deepspeed as memo_ds
    model = _model()
    full_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    memo.wrap(model, memo.MemoConfig(sequence_parallel_size=sp, **MEMO))
    config = memo_ds.memo_zero_config(3, micro_batch=1, model=model)
    config["gradient_clipping"] = 0.0
    engine, *_ = memo_ds.initialize(model, config, optimizer=torch.optim.AdamW(model.parameters(), lr=LR))
    local_bytes = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in model.parameters())
    del _RECOMPUTES[:]
    losses, norms, grads = [], [], None
    for step in range(STEPS):
        ids = _ids(step, rank // sp)
        out = engine(**shard_batch({"input_ids": ids, "labels": ids}, group=model))
        engine.backward(out.loss)
        full_grads = {n: safe_get_full_grad(p).detach().double().clone() for n, p in model.named_parameters()}
        if step == 0:
            grads = full_grads
        norms.append(torch.stack([g.norm() for g in full_grads.values()]).norm().item())
        engine.step()
        losses.append(out.loss.detach().double())
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        params = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    st = memo.stats(model)
    result = {"losses": torch.stack(losses), "norms": norms, "grads": grads, "params": params,
              "local_bytes": local_bytes, "full_bytes": full_bytes, "recomputes": list(_RECOMPUTES),
              "recomputed_bytes": sum(layer.recomputed_bytes for layer in st.layers),
              "swapped_bytes": sum(layer.swapped_bytes for layer in st.layers)}
    engine.destroy()
    return result


def reference(dtype, replicas: int) -> dict:
    """One process, no memo, no FSDP: each step's sequences one after another, their gradients
    accumulated with weight 1/replicas (the mean data parallelism takes), torch AdamW."""
    model = _model().to(dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    losses, norms, grads = [], [], None
    for step in range(STEPS):
        step_losses = []
        for d in range(replicas):
            ids = _ids(step, d)
            # The loss in the model's dtype: transformers' own loss casts the logits to fp32, which would
            # leave an fp32 error in the fp64 reference.
            logits = model(input_ids=ids).logits[0, :-1]
            loss = F.cross_entropy(logits, ids[0, 1:])
            (loss / replicas).backward()
            step_losses.append(loss.detach().double())
        g = {n: p.grad.detach().double().clone() for n, p in model.named_parameters()}
        if step == 0:
            grads = g
        norms.append(torch.stack([t.norm() for t in g.values()]).norm().item())
        optimizer.step()
        optimizer.zero_grad()
        losses.append(torch.stack(step_losses))
    return {"losses": torch.stack(losses), "norms": norms, "grads": grads,
            "params": {n: p.detach().double().clone() for n, p in model.named_parameters()}}


def _error(fn) -> str | None:
    try:
        fn()
    except memo.MemoError as e:
        return str(e)
    return None


def refusals(sp: int, rank: int, world: int) -> dict:
    import memo.integrations.deepspeed as memo_ds
    out = {}
    wrapped = lambda: memo.wrap(build("llama", seed=0), memo.MemoConfig(sequence_parallel_size=sp, **MEMO))  # noqa: E731
    # Shard groups across the sequence-parallel groups: the transpose of memo's layout.
    ranks = torch.arange(world).view(world // sp, sp).t().contiguous()
    out["transposed_mesh"] = _error(lambda: memo_fsdp.fully_shard(
        wrapped(), mesh=DeviceMesh("cpu", ranks, mesh_dim_names=("replicate", "shard"))))
    out["replicate_all"] = _error(lambda: memo_fsdp.fully_shard(
        wrapped(), mesh=init_device_mesh("cpu", (world, 1), mesh_dim_names=("replicate", "shard"))))
    model = wrapped()
    memo_ds.prepare(model)
    out["deepspeed_then_fsdp"] = _error(lambda: memo_fsdp.fully_shard(model))
    model = memo_fsdp.fully_shard(wrapped())
    out["fsdp_then_deepspeed"] = _error(lambda: memo_ds.prepare(model))
    out["fsdp_then_ds_initialize"] = _error(lambda: memo_ds.initialize(model, {"train_micro_batch_size_per_gpu": 1}))
    out["twice"] = _error(lambda: memo_fsdp.fully_shard(model))
    return out


def main(rank, world, sp):
    out = {"runs": {"flat": train(sp, "flat", rank, world), "zero3": train_zero3(sp, rank, world)}}
    if world > sp:
        out["runs"]["hsdp"] = train(sp, "hsdp", rank, world)
        out["refusals"] = refusals(sp, rank, world)
    if rank == 0:
        out["reference"] = {"fp32": reference(torch.float32, world // sp),
                            "fp64": reference(torch.float64, world // sp)}
    dist.barrier()
    return out
