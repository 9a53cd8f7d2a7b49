"""Typed Python face of memo's copy ops, with the pure-torch fallback of each.

The C++ extension ``memo._C`` (see ``csrc/``) provides multi-threaded CPU implementations and,
in CUDA builds, pitched DMA copies between a GPU and host memory (a gather/scatter kernel only
for layouts that need one; NOTE [ Token slice copy plan ]); when it is missing, or ``MEMO_DISABLE_CSRC=1``, the
fallbacks below run. Both give identical bytes (``tests/test_ops.py``). See
NOTE [ Token slice layout ] in ``csrc/layout.h``.
"""

from __future__ import annotations

import torch

from memo import _ext
from memo.errors import MemoError


def token_slice_shape(src: torch.Tensor, dim: int, start: int, stop: int) -> tuple[int, ...]:
    shape = list(src.shape)
    shape[dim] = stop - start
    return tuple(shape)


def _tokens_in(packed: torch.Tensor, dst: torch.Tensor, dim: int) -> int:
    """How many tokens of ``dst`` the contiguous ``packed`` holds."""
    per_token = dst.numel() // dst.shape[dim] if dst.shape[dim] else 0
    if per_token == 0:
        return 0
    if packed.numel() % per_token:
        raise MemoError(f"memo.ops: unpack_tokens: packed has {packed.numel()} elements, not a whole number of "
                        f"tokens of {per_token} elements of dst {tuple(dst.shape)} along dim {dim}; pass the "
                        "buffer pack_tokens filled for this tensor")
    return packed.numel() // per_token


def _check(op: str, strided: torch.Tensor, dim: int, start: int, stop: int, packed: torch.Tensor,
           name: str) -> int:
    """Validates a token slice and its contiguous side; returns ``dim`` made non-negative."""
    if not -strided.dim() <= dim < strided.dim():
        raise MemoError(f"memo.ops: {op}: dim {dim} is out of range for a tensor of shape "
                        f"{tuple(strided.shape)}; pass the token dimension")
    dim %= strided.dim()
    if not 0 <= start <= stop <= strided.shape[dim]:
        raise MemoError(f"memo.ops: {op}: tokens [{start}, {stop}) are not inside the {strided.shape[dim]} "
                        f"tokens of dim {dim} of shape {tuple(strided.shape)}; pass 0 <= start <= stop <= seq")
    want = strided.numel() // strided.shape[dim] * (stop - start) if strided.shape[dim] else 0
    if packed.numel() != want or packed.dtype != strided.dtype or not packed.is_contiguous():
        raise MemoError(f"memo.ops: {op}: {name} must be contiguous {strided.dtype} with {want} elements, got "
                        f"{packed.dtype} with {packed.numel()} elements (contiguous={packed.is_contiguous()}); "
                        f"size {name} from token_slice_shape()")
    return dim


def _cpp_message(e: RuntimeError) -> str:
    """A C++ check's message (csrc/checks.h: "memo.ops: <op>: argument '<arg>' ..."), plus the fix."""
    first = str(e).splitlines()[0] if str(e) else repr(e)
    return f"{first}; pass arguments as documented in memo/ops.py (shapes beside each op)"


def _native(*tensors: torch.Tensor):
    """``torch.ops.memo`` when the extension is active and has a kernel for these devices."""
    if _ext.csrc() is None:
        return None
    if all(t.is_cpu for t in tensors) or (_ext.cuda_part() and any(t.is_cuda for t in tensors)):
        return torch.ops.memo
    return None


# Bytes copied through torch's ``copy_`` (memo._C counts its own; see copy_counters): the
# pure-torch fallbacks below, and the swap records' whole-tensor and dtype-converting copies.
TORCH_COPY_KINDS = ("torch_fallback_bytes", "d2h_whole_bytes", "h2d_whole_bytes", "d2h_convert_bytes",
                    "h2d_convert_bytes")
_torch_bytes = dict.fromkeys(TORCH_COPY_KINDS, 0)


def count_torch_copy(kind: str, nbytes: int) -> None:
    """Count a copy made with torch's ``copy_`` under ``kind`` (one of TORCH_COPY_KINDS)."""
    _torch_bytes[kind] += nbytes


def copy_counters() -> dict[str, int]:
    """Bytes pack/unpack copied since the last reset, by direction and path.

    ``d2h_dma_bytes`` / ``h2d_dma_bytes``: pitched DMA copies between a GPU and host memory (no
    kernel); ``d2h_kernel_bytes`` / ``h2d_kernel_bytes``: layouts that needed the gather/scatter
    kernel; ``d2d_kernel_bytes``: on-device copies; ``host_pack_bytes`` / ``host_unpack_bytes``:
    memo._C's CPU copies; ``torch_fallback_bytes``: the pure-torch fallback's ``copy_``;
    ``*_whole_bytes``: records swapped whole (one contiguous span: a single cudaMemcpyAsync on a
    GPU); ``*_convert_bytes``: records swapped in another dtype (torch's cast-and-copy kernel).
    Counted when a copy is issued, process-wide. See NOTE [ Copy counters ] in ``csrc/token_copy.h``.
    """
    counts = dict(_ext._module.copy_counters()) if _ext._module is not None else {}
    counts.update(_torch_bytes)
    return counts


def reset_copy_counters() -> None:
    for kind in _torch_bytes:
        _torch_bytes[kind] = 0
    if _ext._module is not None:
        _ext._module.reset_copy_counters()


def copy_plan(shape, strides, dim: int, start: int, stop: int, element_size: int) -> dict:
    """How memo copies ``narrow(dim, start, stop - start)`` of a tensor with this layout between a
    GPU and host memory: ``dma`` (pitched ``cudaMemcpy2DAsync`` / ``cudaMemcpy3DAsync`` pieces:
    ``pieces`` calls of ``width`` bytes x ``height`` rows x ``depth`` slices) or, when ``dma`` is
    False, the gather kernel (``reason`` says why). strides in elements. Pure computation, any
    machine; see NOTE [ Token slice copy plan ] in ``csrc/layout.h``.
    """
    if _ext._module is None:
        raise MemoError(f"memo.ops: copy_plan needs memo._C: {_ext._load_error}")
    try:
        return _ext._module.copy_plan(list(shape), list(strides), dim, start, stop, element_size)
    except RuntimeError as e:
        raise MemoError(_cpp_message(e)) from e


def pack_tokens(src: torch.Tensor, dim: int, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
    """Copy ``src.narrow(dim, start, stop - start)`` into contiguous ``out``.

    src: any shape and strides; dim: the token dimension; out: contiguous, same dtype, exactly
    as many elements as the slice (any shape). Returns ``out`` viewed with the slice's shape.
    Between a GPU and pinned host memory the copy is only enqueued on the current stream: read
    ``out`` after an event recorded there (the swap engine does; see NOTE [ Swap stream ordering ]).
    """
    native = _native(src, out)
    if native is not None:
        # The C++ op checks its arguments itself; on failure, say it in memo's words.
        try:
            native.pack_tokens(src, dim, start, stop, out)
        except RuntimeError as e:
            _check("pack_tokens", src, dim, start, stop, out, "out")
            raise MemoError(_cpp_message(e)) from e
        return out.view(token_slice_shape(src, dim, start, stop))
    dim = _check("pack_tokens", src, dim, start, stop, out, "out")
    view = out.view(token_slice_shape(src, dim, start, stop))
    view.copy_(src.narrow(dim, start, stop - start))
    count_torch_copy("torch_fallback_bytes", view.numel() * view.element_size())
    return view


def unpack_tokens(packed: torch.Tensor, dst: torch.Tensor, dim: int, start: int) -> None:
    """Inverse of :func:`pack_tokens`: write contiguous ``packed`` into ``dst.narrow(dim, start, n)``.

    packed: contiguous, ``n`` tokens' worth of elements (n = packed.numel() / elements of dst per
    token); dst: any shape and strides, token dimension ``dim``.
    """
    native = _native(packed, dst)
    if native is not None:
        try:
            native.unpack_tokens(packed, dst, dim, start)
            return
        except RuntimeError as e:
            _check_unpack(packed, dst, dim, start)
            raise MemoError(_cpp_message(e)) from e
    dim, n = _check_unpack(packed, dst, dim, start)
    target = dst.narrow(dim, start, n)
    target.copy_(packed.view(target.shape))
    count_torch_copy("torch_fallback_bytes", target.numel() * target.element_size())


def _check_unpack(packed: torch.Tensor, dst: torch.Tensor, dim: int, start: int) -> tuple[int, int]:
    """Validates unpack_tokens' arguments; returns (non-negative dim, tokens in packed)."""
    if not -dst.dim() <= dim < dst.dim():
        raise MemoError(f"memo.ops: unpack_tokens: dim {dim} is out of range for dst of shape "
                        f"{tuple(dst.shape)}; pass the token dimension")
    dim %= dst.dim()
    n = _tokens_in(packed, dst, dim)
    _check("unpack_tokens", dst, dim, start, start + n, packed, "packed")
    return dim, n
