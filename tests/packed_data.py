"""Packed batches and their reference: the same documents run one by one by the plain model.

``pack(rows)`` builds a batch whose row r holds documents of lengths ``rows[r]`` (position_ids
restarting at 0 at each), then ``pad`` padding tokens (attention_mask 0, labels ignored, positions
continuing the last document). ``reference`` runs every document alone through a deep copy of the
plain model in ``dtype``; ``errors`` compares a packed run's loss and gradients with fp64's and puts
the plain fp32 model's own error beside each (the 2x rule memo holds itself to).
"""

import copy

import numpy as np
import torch

IGNORE = -100


def pack(rows, vocab: int = 128, seed: int = 12, pad: int = 0):
    """(ids, position_ids, shift_labels, attention_mask or None, docs) with docs = [(row, start, stop)]."""
    g = torch.Generator().manual_seed(seed)
    seq = max(sum(r) for r in rows) + pad
    ids = torch.randint(0, vocab, (len(rows), seq), generator=g)
    positions = torch.zeros(len(rows), seq, dtype=torch.long)
    shift = torch.full((len(rows), seq), IGNORE)
    mask = torch.ones(len(rows), seq, dtype=torch.long)
    docs = []
    for r, lengths in enumerate(rows):
        start = 0
        for n in lengths:
            positions[r, start:start + n] = torch.arange(n)
            shift[r, start:start + n - 1] = ids[r, start + 1:start + n]   # no label across a document boundary
            docs.append((r, start, start + n))
            start += n
        rest = seq - start   # padding: positions go on, nothing is predicted from or of it
        positions[r, start:] = positions[r, start - 1] + 1 + torch.arange(rest)
        mask[r, start:] = 0
    return ids, positions, shift, (mask if bool((mask == 0).any()) else None), docs


def grads(model) -> dict:
    return {n: p.grad.detach().double().clone() for n, p in model.named_parameters() if p.grad is not None}


def reference(model, ids, shift, docs, dtype=torch.float32):
    """(loss, grads) of the documents run one by one (the loss normalised over all their labels)."""
    m = copy.deepcopy(model).to(dtype)
    m.zero_grad()
    total = int((shift != IGNORE).sum())
    loss = 0.0
    for r, a, b in docs:
        out = m(input_ids=ids[r:r + 1, a:b], shift_labels=shift[r:r + 1, a:b], labels=shift[r:r + 1, a:b],
                num_items_in_batch=total)
        out.loss.backward()
        loss += out.loss.item()
    return loss, grads(m)


def errors(model, got_loss, got, ids, shift, docs) -> list:
    """Failures of the rule: each error against fp64 at most twice the plain fp32 model's (loss: or one fp32
    spacing of it, where the plain model hits fp64 exactly)."""
    ref_loss, ref = reference(model, ids, shift, docs, torch.float64)
    plain_loss, plain = reference(model, ids, shift, docs)
    out = []
    floor = float(np.spacing(np.float32(ref_loss)))
    if not abs(got_loss - ref_loss) <= 2 * max(abs(plain_loss - ref_loss), floor):
        out.append(f"loss {got_loss} vs fp64 {ref_loss}, plain fp32 {plain_loss}")
    for n in ref:
        err, base = (got[n] - ref[n]).abs().max().item(), (plain[n] - ref[n]).abs().max().item()
        if not err <= 2 * base:
            out.append(f"{n}: error {err:.3g} > 2 x plain fp32 {base:.3g}")
    return out
