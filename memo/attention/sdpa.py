"""SDPA for wrapped models without sequence parallelism: Hugging Face's own, routed so that a kernel
memo can record always runs.

``install(model)`` registers ``memo_sdpa`` with transformers' AttentionInterface (and sdpa's mask
builder with its AttentionMaskInterface, so masks are made exactly as for ``sdpa``) and switches the
model to it. ``memo_sdpa_attention`` is HF's ``sdpa_attention_forward`` unchanged, except where
SDPA would fall back to its math path for grouped-query attention (see NOTE [ Grouped heads and
the math path ]), and for packed batches (position_ids restarting at 0): there the mask builder makes
no mask and memo's own attention op runs on the documents (NOTE [ Packed documents ] in
memo/parallel/documents.py, NOTE [ Document blocks ] in memo/attention/documents.py).

# NOTE [ Grouped heads and the math path ]
#
# 1. memo swaps the attention kernel's outputs and replays them during recomputation; it can do so
#    only for the fused kernels (memo.trace.ATTENTION_KERNELS). SDPA's math path is a composite of
#    matmuls and a softmax that memo cannot see as one kernel, and a wrapped layer using it is refused.
# 2. HF passes grouped k/v heads (kv_heads < heads) to SDPA with ``enable_gqa=True`` when there is
#    no mask. Only some kernels take grouped heads (``GQA_KERNELS``); with none of them enabled for
#    the device and dtype, SDPA takes the math path: on CUDA in fp32 (flash is fp16/bf16 only; the
#    efficient kernel did not take grouped heads either on the H100 with torch 2.11, in memo's
#    measured H100 run of 2026-11-22, "fp32 + GQA").
# 3. There, memo repeats k/v to the query heads first (HF's ``repeat_kv``, as HF itself does when a
#    mask is given) and SDPA runs the efficient kernel. The maths is unchanged: autograd sums the
#    repeated heads' gradients back onto each k/v head.
# 4. When to repeat is ``repeat_kv_heads``, a pure function of (device type, dtype, heads, kv heads,
#    enabled kernels), so the rule is tested on any machine.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Collection, Iterator, Optional

import torch

NAME = "memo_sdpa"

_ALL_FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# (device type, SDPA kernel) -> dtypes in which that kernel takes grouped k/v heads (enable_gqa) and
# memo records it. Absent: not known to, so heads are repeated (which is always correct). See NOTE
# [ Grouped heads and the math path ] rule 2.
GQA_KERNELS: dict[tuple[str, str], tuple[torch.dtype, ...]] = {
    ("cpu", "flash"): _ALL_FLOATS,
    ("cuda", "flash"): (torch.float16, torch.bfloat16),
}


def repeat_kv_heads(device_type: str, dtype: torch.dtype, heads: int, kv_heads: int,
                    kernels: Collection[str]) -> bool:
    """Whether to repeat k/v heads to the query heads before SDPA: grouped heads, and none of the
    enabled ``kernels`` ("flash", "efficient", "cudnn") takes them on this device in this dtype.
    NOTE [ Grouped heads and the math path ] rule 4."""
    if kv_heads == heads:
        return False
    return not any(dtype in GQA_KERNELS.get((device_type, k), ()) for k in kernels)


def enabled_kernels(device: torch.device) -> frozenset[str]:
    """The SDPA kernels torch may choose on ``device`` now (its ``torch.backends.cuda`` switches
    govern the CPU kernels too; on CUDA flash also needs a build with it and sm80+)."""
    names = {name for name, on in (("flash", torch.backends.cuda.flash_sdp_enabled()),
                                   ("efficient", torch.backends.cuda.mem_efficient_sdp_enabled()),
                                   ("cudnn", torch.backends.cuda.cudnn_sdp_enabled())) if on}
    if device.type == "cuda" and "flash" in names and not (
            torch.backends.cuda.is_flash_attention_available() and torch.cuda.get_device_capability(device)[0] >= 8):
        names.discard("flash")
    return frozenset(names)


class _Ungrouped:
    """The attention module as HF's sdpa sees it once k/v heads are repeated: one group per head."""

    num_key_value_groups = 1

    def __init__(self, module: torch.nn.Module) -> None:
        self._module = module

    def __getattr__(self, name: str):
        return getattr(self._module, name)


# Set while the decoder stack of a wrapped model runs a packed batch on one process (memo.attention.hf.packed_call).
_PACKED = contextvars.ContextVar("memo_packed_forward", default=False)


@contextlib.contextmanager
def packed_forward(packed: bool) -> Iterator[None]:
    """While ``packed``: sdpa's mask builder makes no mask, since memo's attention op keeps the documents apart."""
    token = _PACKED.set(packed)
    try:
        yield
    finally:
        _PACKED.reset(token)


def memo_sdpa_mask(*args, **kwargs):
    """transformers' ``sdpa_mask``, except in a packed forward: None (no s x s mask; NOTE [ Document blocks ])."""
    from transformers.masking_utils import sdpa_mask
    if _PACKED.get():
        return None
    return sdpa_mask(*args, **kwargs)


def memo_sdpa_attention(module, query, key, value, attention_mask, **kwargs):
    """HF attention signature: query (b, H, s, d), key/value (b, KVH, s, d) -> ((b, s, H, d), None).

    A packed batch (``module._memo_sp.doc`` set, memo.attention.hf.packed_call) runs memo's attention
    op on its documents instead, which the swap executor records and replays like SDPA's kernel.
    """
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
    binding = getattr(module, "_memo_sp", None)
    if binding is not None and binding.doc is not None:
        from memo.attention.hf import memo_sp_attention
        assert attention_mask is None, "memo.attention: a mask was built for a packed forward (bug in memo)"
        return memo_sp_attention(module, query, key, value, attention_mask, **kwargs)
    heads, kv_heads = query.shape[1], key.shape[1]
    if repeat_kv_heads(query.device.type, query.dtype, heads, kv_heads, enabled_kernels(query.device)):
        key, value = repeat_kv(key, heads // kv_heads), repeat_kv(value, heads // kv_heads)
        module = _Ungrouped(module)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def install(model: torch.nn.Module) -> Optional[str]:
    """Switch a model that uses ``sdpa`` to ``memo_sdpa``; returns the implementation it had (to
    restore on unwrap), or None when the model uses another one (flash-attn, eager), left as chosen."""
    previous = getattr(model.config, "_attn_implementation", None)
    if previous != "sdpa":
        return None
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    AttentionInterface.register(NAME, memo_sdpa_attention)
    AttentionMaskInterface.register(NAME, memo_sdpa_mask)
    model.set_attn_implementation(NAME)
    return previous
