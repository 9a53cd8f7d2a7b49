"""SwapRecord: one storage of a layer's saved activations, and where its bytes are.

# NOTE [ Which tokens are recomputed ]
#
# 1. A record in ``tokens`` mode holds one view whose token dimension is known. Tokens
#    ``[0, split)`` are dropped after the forward and recomputed before the backward; tokens
#    ``[split, seq)`` are swapped. ``split = seq - round(alpha * seq)``: the last alpha share is
#    swapped, so the recomputation is one contiguous prefix run of the layer.
# 2. A record in ``whole`` mode (layer input, attention output, anything without exactly one
#    token dimension, or several views of one storage) swaps the span of its storage that its
#    views touch, and rebuilds every view with ``as_strided`` at the same strides.
# 3. Restored tensors keep the original strides, so kernels that depend on layout (GEMMs on
#    transposed operands) see the same layout and produce the same bits when nothing is
#    recomputed (alpha = 1).
# 4. A layer that draws random numbers outside attention (dropout) recomputes nothing: the
#    prefix would get other random numbers than the forward used. Its alpha is 1.
# 5. A ``dropped`` record (a layer running the "input" policy, NOTE [ Layer policies ] in
#    memo/executor.py) puts nothing on the host: the whole layer's recompute hands it its tensor.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Optional

import torch

from memo import ops
from memo.swap.host_pool import HostBlock, HostPool
from memo.trace import SavedClass, TokenLayout, extent, is_dense


class RecordState(enum.Enum):
    CAPTURED = "captured"      # the device tensor is referenced; nothing copied yet
    ON_HOST = "on_host"        # swapped part copied out (device reference may still be held)
    RESTORED = "restored"      # device buffer rebuilt (swapped part copied in, dropped part recomputed)
    RELEASED = "released"      # device buffer handed back to autograd and dropped here


_TRANSITIONS = {
    RecordState.CAPTURED: {RecordState.ON_HOST, RecordState.RESTORED},
    RecordState.ON_HOST: {RecordState.RESTORED},
    RecordState.RESTORED: {RecordState.RELEASED},
    RecordState.RELEASED: set(),
}


@dataclass
class View:
    shape: tuple
    stride: tuple
    offset: int  # elements from the start of the record's span


@dataclass
class SwapRecord:
    cls: SavedClass
    dtype: torch.dtype
    device: torch.device
    views: list[View]
    mode: str                        # "tokens" or "whole"
    span: tuple[int, int]            # storage elements [lo, hi) covered (whole mode)
    layout: Optional[TokenLayout]    # tokens mode
    batch: int
    seq: int
    split: int = 0                   # tokens [0, split) are recomputed (tokens mode)
    source: Optional[torch.Tensor] = None
    host: Optional[HostBlock] = None
    host_dtype: Optional[torch.dtype] = None
    value: Optional[torch.Tensor] = None   # restored buffer (tokens: the view; whole: the flat span)
    state: RecordState = RecordState.CAPTURED
    unpacks: int = 0
    handles: int = 0
    first_index: int = -1
    dropped: bool = False            # rule 5: nothing swapped, all recomputed with the whole layer
    meta: dict = field(default_factory=dict)

    # --- life cycle -----------------------------------------------------------------------
    def to(self, new: RecordState) -> None:
        assert new in _TRANSITIONS[self.state], f"memo.swap: record {self.state.value} -> {new.value} (bug in memo)"
        self.state = new

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def token_dim(self) -> int:
        assert self.layout is not None and self.layout.dim is not None
        return self.layout.dim

    def numel(self) -> int:
        if self.mode == "whole":
            return self.span[1] - self.span[0]
        n = 1
        for s in self.views[0].shape:
            n *= s
        return n

    def bytes(self) -> int:
        return self.numel() * self.itemsize

    def swapped_numel(self) -> int:
        if self.dropped:
            return 0
        if self.mode == "whole":
            return self.numel()
        return self.numel() // self.seq * (self.seq - self.split)

    def recomputed_bytes(self) -> int:
        return (self.numel() - self.swapped_numel()) * self.itemsize

    def host_bytes(self) -> int:
        dtype = self.host_dtype or self.dtype
        return self.swapped_numel() * torch.empty((), dtype=dtype).element_size()

    # --- copies ---------------------------------------------------------------------------
    def allocate_host(self, pool: HostPool) -> None:
        """Take the host block the swapped part goes to (on the host, when the copy is issued)."""
        self.to(RecordState.ON_HOST)
        if self.swapped_numel() > 0:
            self.host = pool.allocate(self.host_bytes())

    def copy_out(self, source: torch.Tensor) -> None:
        """Copy the swapped part of ``source`` into the host block (runs on the D2H stream)."""
        if self.host is None:
            return
        dtype = self.host_dtype or self.dtype
        if self.mode == "whole":
            flat = source.as_strided((self.numel(),), (1,), self.span[0])
            self.host.view(dtype, (self.numel(),)).copy_(flat, non_blocking=True)
            ops.count_torch_copy("d2h_whole_bytes" if dtype == self.dtype else "d2h_convert_bytes", self.host_bytes())
            return
        src = self.layout.tokens_view(source, self.batch)
        dst = self.host.view(dtype, ops.token_slice_shape(src, self.token_dim, self.split, self.seq))
        if dtype == self.dtype:
            ops.pack_tokens(src, self.token_dim, self.split, self.seq, dst)
        else:
            dst.copy_(src.narrow(self.token_dim, self.split, self.seq - self.split), non_blocking=True)
            ops.count_torch_copy("d2h_convert_bytes", self.host_bytes())

    def allocate_device(self) -> None:
        """The device buffer the swapped part comes back into (compute stream)."""
        if self.dropped:
            return   # the recompute's own tensor becomes the value (fill_dropped)
        if self.mode == "whole":
            self.value = torch.empty(self.numel(), dtype=self.dtype, device=self.device)
        else:
            v = self.views[0]
            self.value = torch.empty_strided(v.shape, v.stride, dtype=self.dtype, device=self.device)

    def copy_in(self) -> None:
        """Copy the swapped part back from the host block into ``value`` (runs on the H2D stream)."""
        dtype = self.host_dtype or self.dtype
        if self.host is None:
            return
        if self.mode == "whole":
            self.value.copy_(self.host.view(dtype, (self.numel(),)), non_blocking=True)
            ops.count_torch_copy("h2d_whole_bytes" if dtype == self.dtype else "h2d_convert_bytes", self.host_bytes())
        else:
            dst = self.layout.tokens_view(self.value, self.batch)
            shape = ops.token_slice_shape(dst, self.token_dim, self.split, self.seq)
            packed = self.host.view(dtype, shape)
            if dtype == self.dtype:
                ops.unpack_tokens(packed, dst, self.token_dim, self.split)
            else:
                dst.narrow(self.token_dim, self.split, self.seq - self.split).copy_(packed, non_blocking=True)
                ops.count_torch_copy("h2d_convert_bytes", self.host_bytes())

    def fill_recomputed(self, recomputed: torch.Tensor) -> None:
        """Write the recomputed tokens ``[0, split)`` (compute stream)."""
        dst = self.layout.tokens_view(self.value, self.batch).narrow(self.token_dim, 0, self.split)
        src = self.layout.tokens_view(recomputed, self.batch)
        assert src.shape == dst.shape, (f"memo.executor: recomputed tensor has shape {tuple(src.shape)}, expected "
                                        f"{tuple(dst.shape)} (bug in memo)")
        dst.copy_(src)

    def fill_dropped(self, recomputed: torch.Tensor) -> None:
        """Take the whole layer's recomputed tensor as the value (rule 5); same geometry as the forward's."""
        if self.mode == "tokens":
            v = self.views[0]
            assert (tuple(recomputed.shape), tuple(recomputed.stride())) == (v.shape, v.stride), (
                f"memo.executor: recomputed tensor has geometry {tuple(recomputed.shape)}/{recomputed.stride()}, "
                f"expected {v.shape}/{v.stride} (bug in memo)")
            self.value = recomputed
        else:   # the span of its storage, so that view_value rebuilds every view at its offset
            self.value = recomputed.as_strided((self.numel(),), (1,), self.span[0])

    def view_value(self, i: int) -> torch.Tensor:
        """The restored tensor for view ``i`` of this record."""
        if self.mode == "tokens":
            return self.value
        v = self.views[i]
        return self.value.as_strided(v.shape, v.stride, self.value.storage_offset() + v.offset)

    def release(self) -> None:
        """Autograd has the restored tensor; drop ours and give the host block back."""
        self.value = None
        self.free_host()
        self.to(RecordState.RELEASED)

    def free_host(self) -> None:
        if self.host is not None:
            self.host.pool.free(self.host)
            self.host = None


Geometry = tuple  # (shape, stride, storage_offset)


def geometry(t: torch.Tensor) -> Geometry:
    return (tuple(t.shape), tuple(t.stride()), t.storage_offset())


def make_record(cls: SavedClass, geoms: list[Geometry], dtype: torch.dtype, device: torch.device,
                layout: Optional[TokenLayout], batch: int, seq: int, alpha: float,
                host_dtype: Optional[torch.dtype], dropped: bool = False) -> SwapRecord:
    """A record for the views ``geoms`` of one storage. See NOTE [ Which tokens are recomputed ]."""
    unique: list[Geometry] = []
    for g in geoms:
        if g not in unique:
            unique.append(g)
    lo = min(extent(*g)[0] for g in unique)
    hi = max(extent(*g)[1] for g in unique)
    token_mode = (cls is SavedClass.OTHER and len(unique) == 1 and layout is not None and layout.dim is not None
                  and is_dense(unique[0][0], unique[0][1]))
    if token_mode:
        views = [View(unique[0][0], unique[0][1], 0)]
        split = seq - int(round(alpha * seq))
        rec = SwapRecord(cls=cls, dtype=dtype, device=device, views=views, mode="tokens", span=(lo, hi),
                         layout=layout, batch=batch, seq=seq, split=split)
    else:
        views = [View(sh, st, off - lo) for sh, st, off in unique]
        rec = SwapRecord(cls=cls, dtype=dtype, device=device, views=views, mode="whole", span=(lo, hi),
                         layout=None, batch=batch, seq=seq)
    if host_dtype is not None and dtype == torch.float32 and host_dtype != dtype:
        rec.host_dtype = host_dtype
    rec.dropped = dropped
    return rec

    
def view_index(rec: SwapRecord, g: Geometry) -> int:
    """Index of geometry ``g`` among the record's views."""
    if rec.mode == "tokens":
        return 0
    lo = rec.span[0]
    for i, v in enumerate(rec.views):
        if (v.shape, v.stride, v.offset + lo) == g:
            return i
    raise AssertionError(f"memo.swap: view {g} not in record (bug in memo)")
