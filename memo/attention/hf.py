"""Sequence-parallel attention for Hugging Face models, through transformers' AttentionInterface.

``install(model, layers, sp)`` registers memo's attention function under the name ``memo_sp`` and
switches the model to it (``set_attn_implementation``), without editing model classes. The model
class then builds no mask for it (transformers creates masks only for implementations it knows);
memo's decoder-stack wrapper turns ``position_ids`` into document ids for packed sequences
(``SPBinding.doc``) and checks ``attention_mask`` (memo/wrap.py).

Without sequence parallelism the layers get the same binding on a ring of one
(``memo.parallel.groups.one_process``) and keep ``memo_sdpa``; ``packed_call`` sets its documents
for a packed batch, which then runs memo's op (NOTE [ Packed documents ] in memo/parallel/documents.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from memo.attention.op import sp_attention
from memo.errors import MemoError
from memo.parallel.groups import SequenceParallel

NAME = "memo_sp"


@dataclass(eq=False)
class SPBinding:
    """What a wrapped model's attention modules share: the group and this forward's document ids."""

    sp: SequenceParallel
    doc: Optional[torch.Tensor] = None     # (batch, local_seq) int64, or None: one causal sequence


def memo_sp_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                      is_causal=None, **kwargs):
    """HF attention signature: query (b, H, s, d), key/value (b, KVH, s, d) -> ((b, s, H, d), None)."""
    binding: Optional[SPBinding] = getattr(module, "_memo_sp", None)
    if binding is None:
        raise MemoError("memo.attention: the attention implementation 'memo_sp' was used by a module that memo.wrap "
                        "did not set up; wrap the model with memo.wrap(model, MemoConfig(sequence_parallel_size=...))")
    if dropout:
        raise MemoError(f"memo.attention: attention dropout {dropout} is not supported under sequence parallelism "
                        f"(the ring would draw different masks per block); set config.attention_dropout=0.0")
    for name in ("softcap", "sinks", "s_aux"):
        if kwargs.get(name) is not None:
            raise MemoError(f"memo.attention: {name!r} is not supported under sequence parallelism; use a model "
                            f"without it or sequence_parallel_size=1")
    window = kwargs.get("sliding_window")
    if window is not None and window < query.shape[2] * binding.sp.size:
        raise MemoError(f"memo.attention: sliding-window attention (window {window}) over a {query.shape[2] * binding.sp.size}"
                        f"-token sequence is not supported under sequence parallelism yet; use sequences no longer "
                        f"than the window or a model without one")
    scale = query.shape[-1] ** -0.5 if scaling is None else float(scaling)
    causal = True if is_causal is None else bool(is_causal)
    out, _ = sp_attention(query, key, value, binding.doc, binding.sp.id, scale, causal)
    return out.transpose(1, 2), None


def _register() -> None:
    from transformers import AttentionInterface
    AttentionInterface.register(NAME, memo_sp_attention)


def bind(layers: list, sp: SequenceParallel) -> SPBinding:
    """Give the attention modules of ``layers`` one shared binding (``memo_sp_attention`` reads it)."""
    binding = SPBinding(sp)
    for layer in layers:
        layer.self_attn._memo_sp = binding
    return binding


def unbind(layers: list) -> None:
    for layer in layers:
        if "_memo_sp" in layer.self_attn.__dict__:
            del layer.self_attn._memo_sp


def install(model: torch.nn.Module, layers: list, sp: SequenceParallel) -> SPBinding:
    """Route the attention of ``layers`` through memo's sequence-parallel op; returns the shared binding."""
    _register()
    binding = bind(layers, sp)
    model.set_attn_implementation(NAME)
    return binding


def uninstall(model: torch.nn.Module, layers: list, implementation: str) -> None:
    unbind(layers)
    model.set_attn_implementation(implementation)


def packed_call(binding: SPBinding, args: tuple, kwargs: dict) -> tuple[dict, bool]:
    """One process: this forward's documents from ``position_ids`` (NOTE [ Packed documents ]).

    Sets ``binding.doc`` ((batch, seq) int64, or None when no row holds more than one document) and
    returns the decoder stack's keyword arguments (a packed batch's attention_mask, checked, dropped)
    and whether the batch is packed. While it is, the model's attention function (memo_sdpa) runs
    memo's attention op on the documents and sdpa's mask builder makes no mask (memo.attention.sdpa).
    """
    from memo.parallel.documents import check_mask, check_rows, document_ids, is_packed
    who = "memo.wrap"
    binding.doc = None
    positions = kwargs.get("position_ids")
    ref = next((t for t in (kwargs.get("inputs_embeds"), kwargs.get("input_ids"), *args[:1]) if t is not None), None)
    if positions is None or ref is None or positions.dim() != 2 or positions.shape[-1] != ref.shape[1]:
        return kwargs, False   # unpacked, or arguments the model itself refuses
    b, s = ref.shape[0], ref.shape[1]
    positions = positions.expand(b, s)
    check_rows(positions, who)
    doc = document_ids(positions, torch.arange(s, device=positions.device), b)
    if not is_packed(doc):
        return kwargs, False
    mask = kwargs.get("attention_mask")
    if mask is not None:
        if mask.dim() != 2:
            raise MemoError(f"{who}: a {mask.dim()}-D attention_mask was given with packed position_ids (restarting at "
                            f"0); use one of the two: position_ids alone to pack documents, or the mask with unpacked "
                            f"rows")
        check_mask(doc, mask, who)
        kwargs = dict(kwargs, attention_mask=None)   # NOTE [ Packed documents ] rule 5
    binding.doc = doc
    return kwargs, True
