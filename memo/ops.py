"""Typed Python face of memo's copy ops, with the pure-torch fallback of each.

The C++ extension ``memo._C`` (see ``csrc/``) provides faster implementations; when it is
missing, or ``MEMO_DISABLE_CSRC=1``, the fallbacks below run. Both give identical bytes.
"""

from __future__ import annotations

import torch


def token_slice_shape(src: torch.Tensor, dim: int, start: int, stop: int) -> tuple[int, ...]:
    shape = list(src.shape)
    shape[dim] = stop - start
    return tuple(shape)


def pack_tokens(src: torch.Tensor, dim: int, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
    """Copy ``src.narrow(dim, start, stop - start)`` into contiguous ``out``.

    src: any shape and strides; dim: the token dimension; out: contiguous, same dtype, exactly
    as many elements as the slice (any shape). Returns ``out`` viewed with the slice's shape.
    """
    view = out.view(token_slice_shape(src, dim, start, stop))
    view.copy_(src.narrow(dim, start, stop - start))
    return view


def unpack_tokens(packed: torch.Tensor, dst: torch.Tensor, dim: int, start: int) -> None:
    """Inverse of :func:`pack_tokens`: write contiguous ``packed`` into ``dst.narrow(dim, start, n)``."""
    n = packed.numel() // max(1, dst.numel() // max(dst.shape[dim], 1)) if dst.shape[dim] else 0
    target = dst.narrow(dim, start, n)
    target.copy_(packed.view(target.shape))
