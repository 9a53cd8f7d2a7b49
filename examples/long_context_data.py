"""Real text for examples/train_long_context.py: documents read, tokenized and packed into sequences.

    docs = read_documents(["corpus.jsonl", "book.txt"])       # DataError names the file and line
    data = PackedText(tokenizer, docs, seq_len=4096)           # a torch Dataset of packed sequences

A ``.jsonl`` file holds one JSON object per line with a string ``"text"`` field (blank lines are
skipped); any other file is read as UTF-8 text, one document. Packing: every document's tokens
followed by EOS, all documents one stream, cut into ``seq_len`` sequences (the tail shorter than
one sequence is dropped). ``position_ids`` restart at 0 where a document starts and at the start of
every sequence (a document cut in two continues from 0: nothing before it is visible); the label of
a document's first token is -100 (the EOS before it does not predict it). memo reads the restarting
positions as document boundaries (NOTE [ Packed documents ] in memo/attention).
"""

from __future__ import annotations

import json
import os

import torch


class DataError(ValueError):
    """A --data file that cannot be used; the message names the file (and line) and the fix."""


def _jsonl(path: str) -> list[str]:
    docs = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {n}: not a JSON object ({e.msg}); write one object per line, "
                                f'e.g. {{"text": "..."}}') from e
            if not isinstance(obj, dict) or "text" not in obj:
                raise DataError(f'{path} line {n}: no "text" field; each line needs {{"text": "..."}}')
            if not isinstance(obj["text"], str):
                raise DataError(f'{path} line {n}: "text" is a {type(obj["text"]).__name__}, not a string')
            if obj["text"]:
                docs.append(obj["text"])
    return docs


def read_documents(paths: list[str]) -> list[str]:
    """The documents of every file, in order; DataError for a missing, unreadable, empty or malformed file."""
    docs: list[str] = []
    for path in paths:
        if not os.path.isfile(path):
            raise DataError(f"{path}: no such file; pass .jsonl files (one {{\"text\": ...}} per line) or .txt files")
        try:
            found = _jsonl(path) if path.endswith(".jsonl") else [open(path, encoding="utf-8").read()]
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})") from e
        except OSError as e:
            raise DataError(f"{path}: cannot read it ({e.strerror})") from e
        found = [d for d in found if d.strip()]
        if not found:
            raise DataError(f"{path}: empty (no documents); remove it from --data or add text")
        docs.extend(found)
    return docs


def pack(token_lists: list[list[int]], seq_len: int, eos_id: int) -> dict:
    """Documents' token ids -> {"input_ids", "labels", "position_ids"}: (sequences, seq_len) each."""
    ids, pos, labels = [], [], []
    for tokens in token_lists:
        doc = list(tokens) + [eos_id]
        ids += doc
        pos += range(len(doc))
        labels += [-100] + doc[1:]
    n = len(ids) // seq_len
    if n == 0:
        raise DataError(f"the documents hold {len(ids)} tokens with their EOS, fewer than one sequence of "
                        f"--seq-len {seq_len}; add text or lower --seq-len")
    ids_t = torch.tensor(ids[:n * seq_len]).view(n, seq_len)
    labels_t = torch.tensor(labels[:n * seq_len]).view(n, seq_len)
    pos_t = torch.tensor(pos[:n * seq_len]).view(n, seq_len)
    # A document cut at a sequence start continues from position 0 (its beginning is not visible).
    for row in range(1, n):
        first = pos_t[row, 0].item()
        if first:
            run = int((pos_t[row] - torch.arange(seq_len) == first).long().cumprod(0).sum())
            pos_t[row, :run] -= first
    return {"input_ids": ids_t, "labels": labels_t, "position_ids": pos_t}


class PackedText(torch.utils.data.Dataset):
    """Packed sequences of ``docs`` tokenized by ``tokenizer`` (a transformers tokenizer with an EOS token),
    repeated in order up to ``length`` samples (as many as the training steps take)."""

    def __init__(self, tokenizer, docs: list[str], seq_len: int, length: int = 0) -> None:
        if tokenizer.eos_token_id is None:
            raise DataError("the tokenizer has no EOS token, which packing puts after every document; use a "
                            "tokenizer with eos_token set")
        tokens = [tokenizer(d, add_special_tokens=False)["input_ids"] for d in docs]
        self.tensors = pack(tokens, seq_len, tokenizer.eos_token_id)
        self.sequences = self.tensors["input_ids"].shape[0]
        self.length = max(length, self.sequences)   # the packed sequences repeated up to ``length``

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        return {k: v[i % self.sequences] for k, v in self.tensors.items()}
