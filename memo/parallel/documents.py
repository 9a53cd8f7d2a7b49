"""Packed documents: the rule position_ids follow, the document ids memo derives, checked on one or P ranks.

# NOTE [ Packed documents ]
#
# 1. A packed row holds documents one after another. Inside a row, position_ids count up by one
#    within a document and restart at 0 where the next document starts. The row's first token
#    starts a document at any position >= 0. Anything else (a position decreasing to other than 0,
#    repeated, jumping) is refused with the row, the token and this rule.
# 2. A document is named by the global index (in the row) of its first token: doc = index -
#    position. Under rule 1, doc is non-decreasing along a row, so in every token order memo uses
#    (ascending global order, NOTE [ Sequence layouts ] rules 3-4) a document is one contiguous run.
#    Attention uses only this (NOTE [ Document blocks ] in memo/attention/documents.py).
# 3. A row whose doc is constant (one document) is not packed; a batch with no packed row runs as
#    unpacked sequences, on the model's own attention path.
# 4. Under sequence parallelism a rank holds chunks of the row (NOTE [ Sequence layouts ]). It checks
#    rule 1 inside its chunks; the pairs that straddle two chunks are checked by every rank from the
#    gathered first and last positions of every chunk, and the first problem anywhere (smallest row,
#    then token) is gathered too, so every rank raises the same error together.
# 5. attention_mask with packing: a zero is allowed only where no unmasked token of the same
#    document follows it (padding after the last document, or at a document's end): no real query
#    attends to it, and the mask is dropped. A masked token inside a document is refused, saying to
#    use position_ids alone for packing, or attention_mask with unpacked rows.
"""

from __future__ import annotations

from typing import Optional

import torch

from memo.errors import MemoError
from memo.parallel.layout import chunk_ids, num_chunks

RULE = ("inside a row, position_ids must count up by one within a document and restart at 0 where the next "
        "document starts (packed sequences, NOTE [ Packed documents ])")


def position_error(who: str, row: int, token: int, before: Optional[int], value: int) -> MemoError:
    where = (f"position_ids of row {row} start at {value} (token 0)" if before is None else
             f"position_ids of row {row} go from {before} to {value} at token {token}")
    return MemoError(f"{who}: {where}; {RULE}. Fix the position_ids (for documents of lengths n1, n2, ...: "
                     f"torch.cat([torch.arange(n) for n in (n1, n2, ...)]))")


def first_violation(positions: torch.Tensor, row_start: bool = True
                    ) -> Optional[tuple[int, int, Optional[int], int]]:
    """(row, token, previous position or None, position) of the first break of rule 1 in (b, n) rows, or None.

    ``row_start``: token 0 is a row's first token (must be >= 0); otherwise its pair with the token
    before it is checked elsewhere (rule 4)."""
    positions = positions.long()
    bad = torch.zeros(positions.shape, dtype=torch.bool, device=positions.device)
    if row_start:
        bad[:, 0] = positions[:, 0] < 0
    if positions.shape[1] > 1:
        cur, prev = positions[:, 1:], positions[:, :-1]
        bad[:, 1:] = (cur != prev + 1) & (cur != 0)
    if not bool(bad.any()):
        return None
    row, token = (int(x) for x in bad.nonzero()[0])
    before = None if token == 0 else int(positions[row, token - 1])
    return row, token, before, int(positions[row, token])


def check_rows(positions: torch.Tensor, who: str) -> None:
    """NOTE [ Packed documents ] rule 1 on whole rows (b, s)."""
    found = first_violation(positions)
    if found is not None:
        raise position_error(who, *found)


def document_ids(positions: torch.Tensor, global_index: torch.Tensor, batch: int) -> torch.Tensor:
    """(batch, n) int64: the global index of each token's document start (rule 2)."""
    return (global_index - positions.long()).expand(batch, positions.shape[-1]).contiguous()


def is_packed(doc: torch.Tensor) -> bool:
    """Whether some row holds more than one document (rule 3)."""
    return bool((doc != doc[:, :1]).any())


def check_mask(doc: torch.Tensor, mask: torch.Tensor, who: str) -> None:
    """Rule 5: refuse a mask that hides a token from a later, unmasked token of its document. doc, mask: (b, s)."""
    keep = mask.bool()
    b, s = keep.shape
    index = torch.arange(s, device=keep.device).expand(b, s)
    slot = doc - doc[:, :1]   # each document's start within the row, in [0, s) (rules 1-2)
    last_kept = torch.full((b, s), -1, dtype=torch.long, device=keep.device).scatter_reduce(
        1, slot, torch.where(keep, index, -1), "amax")
    bad = ~keep & (last_kept.gather(1, slot) > index)
    if bool(bad.any()):
        row, token = (int(x) for x in bad.nonzero()[0])
        raise MemoError(f"{who}: attention_mask masks token {token} of row {row}, inside a packed document (a later "
                        f"token of the same document is not masked); memo cannot hide a token from its own document. "
                        f"Use one of the two: position_ids restarting at 0 to pack documents (attention_mask all ones, "
                        f"or zeros only for padding after the last document), or attention_mask with one unpacked "
                        f"sequence per row (position_ids counting up)")


def check_sharded(sp, positions: torch.Tensor, global_index: torch.Tensor, who: str) -> None:
    """Rule 4: rule 1 over the whole rows of a group whose ranks hold chunks; the same error on every rank.

    positions: (b, local_seq) this rank's shard (the same b and local_seq on every rank, checked
    before); global_index: (local_seq,) the shard's global token indices.
    """
    from memo.parallel.comm import all_gather
    b, s = positions.shape
    mine_chunks = chunk_ids(sp.size, sp.rank, sp.layout)
    per = s // len(mine_chunks)
    pos = positions.long().reshape(b, len(mine_chunks), per)
    local = [first_violation(pos[:, i], row_start=c == 0) for i, c in enumerate(mine_chunks)]
    # the first local problem as (found, row, global token, before, value); before -1: the row's first token
    # (before any break of rule 1 every position is >= 0, so -1 is never a real one)
    best = None
    for i, found in enumerate(local):
        if found is None:
            continue
        row, token, before, value = found
        cand = (row, int(global_index[i * per + token]), -1 if before is None else before, value)
        best = cand if best is None or cand[:2] < best[:2] else best
    problem = [0, 0, 0, 0, 0] if best is None else [1, *best]
    edges = torch.stack([pos[:, :, 0], pos[:, :, -1]], dim=-1).reshape(-1)   # (b * chunks * 2)
    mine = torch.cat([torch.tensor(problem, dtype=torch.long, device=positions.device), edges])
    gathered = [g.cpu() for g in all_gather(sp, mine, "position_ids check")]
    found = []
    total = num_chunks(sp.size, sp.layout)
    first = torch.empty(b, total, dtype=torch.long)
    last = torch.empty(b, total, dtype=torch.long)
    for r, g in enumerate(gathered):
        if int(g[0]):
            found.append(tuple(int(x) for x in g[1:5]))
        e = g[5:].reshape(b, len(mine_chunks), 2)
        for i, c in enumerate(chunk_ids(sp.size, r, sp.layout)):
            first[:, c], last[:, c] = e[:, i, 0], e[:, i, 1]
    chunk = (s * sp.size) // total
    if total > 1:
        cur, prev = first[:, 1:], last[:, :-1]
        bad = (cur != prev + 1) & (cur != 0)
        for row, c in bad.nonzero().tolist():
            found.append((row, (c + 1) * chunk, int(prev[row, c]), int(cur[row, c])))
    if found:
        row, token, before, value = min(found)
        raise position_error(who, row, token, None if before < 0 else before, value)
