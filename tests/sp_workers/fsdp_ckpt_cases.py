"""Sharded checkpoints of a memo + FSDP2 model (NOTE [ Sharded checkpoints ]), on gloo.

``main(rank, world, sp, root, export, phase)``: W = world ranks, sequence parallelism P = sp, on a
mesh of all W ranks; replica d = rank // P trains on sequence ``_ids(step, d)``; AdamW + LambdaLR.

- both phases first (``first``) or last (``resume``): the same on a (replicate W/P, shard P) mesh,
  saved into ``root + "-hsdp"`` after two steps, then the third step.
- ``phase="first"``: two steps, ``save_checkpoint(root, step=2)``, ``export_pretrained(export)``;
  the third step (its loss, then the whole parameters); then a save of step 3 that fails on rank 1
  inside ``dcp.save`` (ENOSPC from DCP's writer), then a save of step 3 that every rank leaves by
  ``os._exit`` right after writing its shards (a kill in the middle of the save: ``.metadata`` and
  the commit never happen).
- ``phase="resume"``: fresh processes and process group; refused loads first (a plain model, an SGD
  optimizer, a root whose shard of rank 1 is corrupt, one whose DCP ``.metadata`` is a pickle that
  would create a directory: nothing changes, nothing runs), then ``load_checkpoint(root)``
  and the third step; then a save of step 3 into the root, which removes the leftovers.
"""

import errno
import os
import pickle
import shutil

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.filesystem import FileSystemWriter
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

import memo
from distributed import save_and_exit
from memo.integrations import fsdp as memo_fsdp
from memo.integrations.checkpoint import export_pretrained, latest_checkpoint, load_checkpoint, save_checkpoint
from memo.parallel import shard_batch
from models import build
from sp_workers.ckpt_sp import _error

SEQ, LR = 64, 1e-2
MEMO = dict(swap_ratio=0.5, keep_last_layers=1, host_memory_budget="1GiB", sp_timeout_s=60)


def _ids(step: int, replica: int) -> torch.Tensor:
    return torch.randint(0, 128, (1, SEQ), generator=torch.Generator().manual_seed(100 + step * 97 + replica))


def make(sp: int, shard: bool = True, hsdp: bool = False):
    model = build("llama", seed=0)
    memo.wrap(model, memo.MemoConfig(sequence_parallel_size=sp, **MEMO))
    if shard:
        world = dist.get_world_size()
        mesh = init_device_mesh("cpu", (world // sp, sp), mesh_dim_names=("replicate", "shard")) if hsdp else None
        memo_fsdp.fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.9 ** s)
    return model, optimizer, scheduler


def step(model, optimizer, scheduler, i: int, rank: int, sp: int) -> torch.Tensor:
    ids = _ids(i, rank // sp)
    loss = model(**shard_batch({"input_ids": ids, "labels": ids}, group=model)).loss
    loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()
    return loss.detach().clone()


def full_params(model) -> dict:
    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in model.named_parameters()}


def local_state(model, optimizer) -> dict:
    """This rank's shards of the weights and optimizer state, to tell whether a refused load changed them."""
    local = lambda t: (t.to_local() if isinstance(t, DTensor) else t).detach().clone()  # noqa: E731
    return {"params": {n: local(p) for n, p in model.named_parameters()},
            "optimizer": {id(p): {k: local(v) for k, v in s.items()} for p, s in optimizer.state.items()}}


def _same_local(a: dict, b: dict) -> bool:
    return (a["params"].keys() == b["params"].keys() and all(torch.equal(a["params"][k], b["params"][k])
                                                               for k in a["params"])
            and a["optimizer"].keys() == b["optimizer"].keys()
            and all(a["optimizer"][p].keys() == b["optimizer"][p].keys()
                    and all(torch.equal(a["optimizer"][p][k], b["optimizer"][p][k]) for k in a["optimizer"][p])
                    for p in a["optimizer"]))


class _MakesDirectory:
    """A pickle that, unpickled by pickle.load, creates a directory (as a crafted .metadata could run anything)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def hsdp_run(rank: int, sp: int, root: str, resume: bool) -> dict:
    """On a (replicate, shard) mesh: two steps and a save, or a load; then the third step."""
    model, optimizer, scheduler = make(sp, hsdp=True)
    if resume:
        load_checkpoint(root, model=model, optimizer=optimizer, scheduler=scheduler)
    else:
        for i in range(2):
            step(model, optimizer, scheduler, i, rank, sp)
        save_checkpoint(root, model=model, optimizer=optimizer, scheduler=scheduler, step=2)
    return {"loss_3": step(model, optimizer, scheduler, 2, rank, sp), "params_at_3": full_params(model)}


def first(rank: int, world: int, sp: int, root: str, export: str) -> dict:
    hsdp = hsdp_run(rank, sp, root + "-hsdp", resume=False)
    model, optimizer, scheduler = make(sp)
    losses = [step(model, optimizer, scheduler, i, rank, sp) for i in range(2)]
    saved_dir = save_checkpoint(root, model=model, optimizer=optimizer, scheduler=scheduler, step=2,
                                data_state={"cursor": 2, "rank": rank})
    export_pretrained(model, export)
    out = {"saved_dir": saved_dir, "params_at_2": full_params(model), "losses": losses, "hsdp": hsdp}
    out["loss_3"] = step(model, optimizer, scheduler, 2, rank, sp)
    out["params_at_3"] = full_params(model)

    # A save that fails on one rank inside dcp.save: every rank raises, the pointer stays at step 2.
    original = FileSystemWriter.write_data

    def full_disk(self, plan, planner):
        if dist.get_rank() == 1:
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        return original(self, plan, planner)
    FileSystemWriter.write_data = full_disk
    out["failed_save"] = _error(lambda: save_checkpoint(root, model=model, optimizer=optimizer, scheduler=scheduler,
                                                        step=3, data_state={"cursor": 3, "rank": rank}))
    FileSystemWriter.write_data = original
    current = latest_checkpoint(root)
    dist.barrier()   # rank 0 removes .tmp-save after the agreement, while the others go on
    out["after_failed_save"] = (current, sorted(os.listdir(root)))
    dist.barrier()   # every rank has looked before rank 0 makes the next save's .tmp-save

    # A save killed after every rank wrote its shards, before DCP's .metadata and the commit.
    def killed(self, plan, planner):
        future = original(self, plan, planner)
        future.wait()
        save_and_exit(rank, out)
    FileSystemWriter.write_data = killed
    save_checkpoint(root, model=model, optimizer=optimizer, scheduler=scheduler, step=3,
                    data_state={"cursor": 3, "rank": rank})
    raise AssertionError("the killed save returned")


def resume(rank: int, world: int, sp: int, root: str) -> dict:
    out = {"listing_before": sorted(os.listdir(root)),
           "tmp_before": sorted(os.listdir(os.path.join(root, ".tmp-save", "shards")))}
    # Refused loads change nothing.
    plain, plain_opt, plain_sched = make(sp, shard=False)
    out["plain_model"] = _error(lambda: load_checkpoint(root, model=plain, optimizer=plain_opt,
                                                        scheduler=plain_sched))
    model, optimizer, scheduler = make(sp)
    fresh = local_state(model, optimizer)
    sgd = torch.optim.SGD(model.parameters(), lr=LR)
    out["sgd"] = _error(lambda: load_checkpoint(root, model=model, optimizer=sgd, scheduler=None))
    corrupt, crafted = root + "-corrupt", root + "-crafted"
    if rank == 0:
        shutil.copytree(root, corrupt)
        shard = os.path.join(latest_checkpoint(corrupt), "shards", "__1_0.distcp")
        with open(shard, "r+b") as f:
            f.truncate(os.path.getsize(shard) // 2)
        shutil.copytree(root, crafted)
        with open(os.path.join(latest_checkpoint(crafted), "shards", ".metadata"), "wb") as f:
            pickle.dump(_MakesDirectory(crafted + "-ran"), f)
    dist.barrier()
    out["corrupt"] = _error(lambda: load_checkpoint(corrupt, model=model, optimizer=optimizer, scheduler=scheduler))
    out["crafted"] = _error(lambda: load_checkpoint(crafted, model=model, optimizer=optimizer, scheduler=scheduler))
    out["crafted_ran"] = os.path.exists(crafted + "-ran")
    out["unchanged_after_refusals"] = _same_local(fresh, local_state(model, optimizer)) and not optimizer.state

    got = load_checkpoint(root, model=model, optimizer=optimizer, scheduler=scheduler)
    out["loaded"] = got
    out["params_at_2"] = full_params(model)
    out["loss_3"] = step(model, optimizer, scheduler, 2, rank, sp)
    out["params_at_3"] = full_params(model)
    save_checkpoint(root, model=model, optimizer=optimizer, scheduler=scheduler, step=3,
                    data_state={"cursor": 3, "rank": rank})
    out["listing_after"] = sorted(os.listdir(root))
    out["hsdp"] = hsdp_run(rank, sp, root + "-hsdp", resume=True)
    return out


def main(rank, world, sp, root, export, phase):
    return first(rank, world, sp, root, export) if phase == "first" else resume(rank, world, sp, root)
