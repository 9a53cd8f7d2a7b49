"""Cutting one sequence into per-rank shards and putting it back together.

``shard_sequence`` / ``gather_sequence`` take a tensor along its sequence dimension;
``shard_batch`` takes a whole training batch (``input_ids``, ``labels``, ``attention_mask``,
``position_ids``). Layouts: NOTE [ Sequence layouts ] in memo/parallel/layout.py.

# NOTE [ Labels under sequence parallelism ]
#
# 1. A causal LM predicts token t+1 at position t. Cut into shards first and shifted inside each
#    shard, the last position of every shard would lose its label. ``shard_batch`` shifts the
#    labels of the whole sequence first (``shift_labels``, as transformers calls them) and then
#    shards them, so every position keeps its own target.
# 2. Positions stay global (``position_ids`` of the full sequence, sharded), so RoPE sees the
#    true position of every token.
# 3. A length that does not split into the layout's chunks is padded at the end with ignored
#    labels (-100). Under causal attention no real token attends to a later one, so the padding
#    changes no real token's output, and it adds nothing to the loss.
"""

from __future__ import annotations

import warnings
import torch

from memo.errors import MemoError
from memo.parallel.comm import all_gather, all_reduce
from memo.parallel.documents import check_mask, check_rows, document_ids, is_packed
from memo.parallel.groups import SequenceParallel, setup_for
from memo.parallel.layout import check_divisible, num_chunks, shard_indices

IGNORE_INDEX = -100
_warned = {"pad": False}


def _sp(group, layout: str) -> SequenceParallel:
    return setup_for(group, "ring", layout)


def shard_sequence(x: torch.Tensor, dim: int = 1, group=None, layout: str = "zigzag") -> torch.Tensor:
    """This rank's shard of ``x`` along ``dim`` (a view-free copy, contiguous)."""
    sp = _sp(group, layout)
    check_divisible(x.shape[dim], sp.size, sp.layout, what=f"sequence length (dim {dim} of {tuple(x.shape)})")
    idx = shard_indices(x.shape[dim], sp.size, sp.rank, sp.layout, x.device)
    return x.index_select(dim, idx)


def gather_sequence(x: torch.Tensor, dim: int = 1, group=None, layout: str = "zigzag") -> torch.Tensor:
    """The inverse of ``shard_sequence``: the whole sequence on every rank (not differentiable)."""
    sp = _sp(group, layout)
    parts = all_gather(sp, x.detach(), "gather_sequence")
    total = x.shape[dim] * sp.size
    out = torch.empty(*x.shape[:dim], total, *x.shape[dim + 1:], dtype=x.dtype, device=x.device)
    for r, part in enumerate(parts):
        out.index_copy_(dim, shard_indices(total, sp.size, r, sp.layout, x.device), part)
    return out


def shard_batch(batch: dict, group=None, layout: str = "zigzag") -> dict:
    """This rank's shard of a causal-LM batch of (batch, seq) tensors. See NOTE [ Labels under sequence parallelism ].

    ``group``: a process group (default: the world), a ``SequenceParallel``, or a model wrapped by
    ``memo.wrap`` with sequence parallelism (its group and layout are used; so in every function here).

    Returns ``input_ids`` (and ``inputs_embeds``), ``position_ids`` (global), ``shift_labels`` and
    ``labels`` (both the shifted labels: transformers computes the loss from ``shift_labels`` when
    given, and needs ``labels`` to be present). An ``attention_mask`` may only mark right padding:
    its labels are ignored and causal attention hides it, so no mask is returned. Other padding is
    refused (use right padding, or packed sequences with restarting ``position_ids``). Packed
    ``position_ids`` follow NOTE [ Packed documents ]; with them the mask may also mark padding at a
    document's end (rule 5), whose labels are ignored likewise.
    """
    sp = _sp(group, layout)
    known = {"input_ids", "labels", "attention_mask", "position_ids", "inputs_embeds", "shift_labels"}
    unknown = set(batch) - known
    if unknown:
        raise MemoError(f"memo.parallel.shard_batch: keys {sorted(unknown)} are not known; memo shards "
                        f"{sorted(known)}. Remove them or shard them with shard_sequence")
    ref = batch.get("input_ids", batch.get("inputs_embeds"))
    if ref is None:
        raise MemoError("memo.parallel.shard_batch: the batch has neither input_ids nor inputs_embeds")
    b, seq = ref.shape[0], ref.shape[1]
    _check_same_batch(sp, ref)
    chunks = num_chunks(sp.size, sp.layout)
    pad = (-seq) % chunks
    if pad and not _warned["pad"]:
        warnings.warn(f"memo.parallel.shard_batch: sequence length {seq} does not split into {chunks} chunks; padding "
                      f"{pad} token(s) at the end with ignored labels (said once)", stacklevel=2)
        _warned["pad"] = True
    out = {}
    if "shift_labels" in batch:
        shifted = batch["shift_labels"]
    elif "labels" in batch:
        shifted = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)
    else:
        shifted = None
    positions = batch.get("position_ids")
    if positions is None:
        positions = torch.arange(seq, device=ref.device).expand(b, seq)
    elif positions.shape[-1] != seq:
        raise MemoError(f"memo.parallel.shard_batch: position_ids have length {positions.shape[-1]}, the sequence "
                        f"{seq}")
    else:   # NOTE [ Packed documents ] rule 1, on the full rows every rank holds: the same error everywhere
        check_rows(positions.expand(b, seq), "memo.parallel.shard_batch")
    mask = batch.get("attention_mask")
    packed = False
    if mask is not None and not bool(mask.bool().all()) and batch.get("position_ids") is not None:
        doc = document_ids(positions, torch.arange(seq, device=positions.device), b)
        packed = is_packed(doc)
        if packed:   # rule 5: zeros only where no later token of the document is kept
            check_mask(doc, mask, "memo.parallel.shard_batch")
    if mask is not None and not bool(mask.bool().all()):
        keep = mask.bool()
        if not packed and not bool((keep[:, 1:] <= keep[:, :-1]).all()):
            raise MemoError("memo.parallel.shard_batch: attention_mask has padding that is not at the end of the "
                            "sequence; under sequence parallelism use right padding (with labels -100) or pack "
                            "documents with position_ids restarting at 0")
        if shifted is not None:   # padding: its labels are ignored; causal attention (and documents) hide it
            shifted = shifted.masked_fill(~torch.nn.functional.pad(keep[:, 1:], (0, 1), value=False) | ~keep,
                                          IGNORE_INDEX)
    for name, x, value in (("input_ids", batch.get("input_ids"), 0), ("inputs_embeds", batch.get("inputs_embeds"), 0),
                           ("shift_labels", shifted, IGNORE_INDEX), ("position_ids", positions, None)):
        if x is None:
            continue
        if pad:
            if name == "position_ids":   # padding continues the last document's positions
                x = torch.cat([x, x[..., -1:] + torch.arange(1, pad + 1, device=x.device)], dim=-1)
            else:
                x = torch.nn.functional.pad(x, (0, 0, 0, pad) if x.dim() == 3 else (0, pad), value=value)
        out[name] = shard_sequence(x, dim=x.dim() - 1 if name == "position_ids" else 1, group=sp)
    if shifted is not None:
        out["labels"] = out["shift_labels"]
    return out


def _check_same_batch(sp: SequenceParallel, ref: torch.Tensor) -> None:
    """Every rank of a group must shard the same full batch; a loader split over all ranks would not."""
    if sp.size == 1:
        return
    if ref.is_floating_point():
        digest = ref.detach().double().sum().reshape(1).view(torch.int64)
    else:
        weights = torch.arange(1, ref.shape[1] + 1, device=ref.device, dtype=torch.int64) % 9973 + 1
        digest = (ref.long() * weights).sum().reshape(1)
    mine = torch.cat([torch.tensor(ref.shape[:2], device=ref.device), digest.to(ref.device)])
    got = [g.cpu().tolist() for g in all_gather(sp, mine, "shard_batch check")]
    if any(g != got[0] for g in got):
        rows = "; ".join(f"rank {sp.ranks[i]}: batch x seq {g[0]} x {g[1]}, digest {g[2]}" for i, g in enumerate(got))
        raise MemoError(f"memo.parallel.shard_batch: the ranks of one sequence-parallel group were given different "
                        f"batches ({rows}); give every rank of a group the same full batch (split the data over "
                        f"data-parallel replicas only, e.g. memo.integrations.accelerate.prepare)")


def gradient_group(model: torch.nn.Module, group=None, layout: str = "zigzag"):
    """The SequenceParallel ``all_reduce_gradients`` sums over (None: nothing to sum).

    See NOTE [ Gradients under data x sequence parallelism ] in integrations/accelerate.py: under
    data x sequence parallelism only the P ranks of one replica share a sequence, so the sum is over
    the model's own group, never the world.
    """
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    from memo.parallel.groups import _group_ranks
    who = "memo.parallel.all_reduce_gradients"
    inner = model.module if isinstance(model, (DistributedDataParallel, DataParallel)) else model
    runtime = getattr(inner, "_memo_runtime", None)   # a model wrapped by memo.wrap
    if runtime is None:
        if group is None:
            raise MemoError(f"{who}: the model is not wrapped by memo, so it has no sequence-parallel group; wrap it "
                            f"with memo.wrap(model, MemoConfig(sequence_parallel_size=...)) or pass group= (the "
                            f"ranks that share one sequence)")
        return _sp(group, layout)
    sp = runtime.sp
    if sp is None:
        if group is not None:
            raise MemoError(f"{who}: the model was wrapped without sequence parallelism, so its gradients need no sum "
                            f"over group={group!r}; average data-parallel gradients with DDP instead")
        return None
    if group is None or group is sp or group is model or group is inner:
        return sp
    ranks = group.ranks if isinstance(group, SequenceParallel) else _group_ranks(group)
    if ranks != sp.ranks:
        raise MemoError(f"{who}: group has ranks {ranks}, the model's sequence-parallel group {sp.ranks}; summing "
                        f"over other ranks gives wrong gradients (under data x sequence parallelism the replicas' "
                        f"gradients are averaged by the data-parallel wrapper, not summed). Leave group unset")
    return sp


def all_reduce_gradients(model: torch.nn.Module, group=None, layout: str = "zigzag") -> None:
    """Sum every parameter's ``.grad`` over the model's sequence-parallel group, under its timeout.

    With memo's sequence-parallel loss each rank's backward gives the gradient of its own tokens'
    share of the full-sequence loss; their sum is the full-sequence gradient. A parameter without a
    gradient on this rank counts as zeros (it may have one on another rank).

    ``model``: wrapped by ``memo.wrap`` (or DDP around one). Its sequence-parallel group and
    ``sp_timeout_s`` are used: under data x sequence parallelism that is this rank's replica only.
    ``group``, if given, must have the same ranks (anything else is refused); a model not wrapped by
    memo needs it. A model wrapped without sequence parallelism has nothing to sum: a no-op.
    """
    sp = gradient_group(model, group, layout)
    if sp is None or sp.size == 1:
        return
    buckets: dict[tuple, list[torch.Tensor]] = {}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        buckets.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)
    for grads in buckets.values():   # one all-reduce per dtype and device
        flat = all_reduce(sp, torch.cat([g.reshape(-1) for g in grads]), "all_reduce_gradients")
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
