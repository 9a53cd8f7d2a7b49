"""Sequence-parallel attention for Hugging Face models, through transformers' AttentionInterface.

``install(model, layers, sp)`` registers memo's attention function under the name ``memo_sp`` and
switches the model to it (``set_attn_implementation``), without editing model classes. The model
class then builds no mask for it (transformers creates masks only for implementations it knows);
memo's decoder-stack wrapper turns ``position_ids`` into document ids for packed sequences
(``SPBinding.doc``) and checks ``attention_mask`` (memo/wrap.py).
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


def install(model: torch.nn.Module, layers: list, sp: SequenceParallel) -> SPBinding:
    """Route the attention of ``layers`` through memo's sequence-parallel op; returns the shared binding."""
    _register()
    binding = SPBinding(sp)
    for layer in layers:
        layer.self_attn._memo_sp = binding
    model.set_attn_implementation(NAME)
    return binding


def uninstall(model: torch.nn.Module, layers: list, implementation: str) -> None:
    for layer in layers:
        if "_memo_sp" in layer.self_attn.__dict__:
            del layer.self_attn._memo_sp
    model.set_attn_implementation(implementation)
